//! The in-process balance cache of the embedded default: the same semantics as the Redis one,
//! behind a sharded mutex. Nothing survives a restart, which is fine: balances reload from the
//! ledger on first use.

use super::*;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const SHARDS: usize = 64;

#[derive(Debug, Default)]
struct Entry {
    balance: Money,
    seq: i64,
    /// hold id → (amount, lease end in Unix ms)
    holds: HashMap<String, (Money, u64)>,
}

impl Entry {
    fn held(&self) -> Money {
        Money::sum(self.holds.values().map(|(amount, _)| *amount))
    }
}

/// Request ids remembered at most; beyond it the memory starts over (a miss is always safe).
const REQUESTS_MAX: usize = 100_000;

pub struct MemoryCache {
    shards: Vec<Mutex<HashMap<AccountId, Entry>>>,
    /// Answers and claims per request, under one lock, as one Redis script sees them.
    requests: Mutex<Requests>,
}

#[derive(Default)]
struct Requests {
    /// (institution code, request id) → setl_id.
    answers: HashMap<(String, String), String>,
    /// (institution code, request id) → (owner, claim end in Unix ms), for attempts in flight.
    claims: HashMap<(String, String), (String, u64)>,
}

impl Default for MemoryCache {
    fn default() -> Self {
        MemoryCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            requests: Mutex::new(Requests::default()),
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl MemoryCache {
    fn shard(&self, account_id: AccountId) -> std::sync::MutexGuard<'_, HashMap<AccountId, Entry>> {
        let index = (account_id as u64 % SHARDS as u64) as usize;
        self.shards[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl BalanceCache for MemoryCache {
    async fn ping(&self) -> CacheResult<()> {
        Ok(())
    }

    async fn get(&self, account_id: AccountId) -> CacheResult<Option<CachedBalance>> {
        let shard = self.shard(account_id);
        Ok(shard.get(&account_id).map(|e| CachedBalance { balance: e.balance, held: e.held(), seq: e.seq }))
    }

    async fn load(&self, account_id: AccountId, balance: Money, seq: i64) -> CacheResult<()> {
        let mut shard = self.shard(account_id);
        let entry = shard.entry(account_id).or_insert_with(|| Entry { balance, seq, holds: HashMap::new() });
        if seq > entry.seq {
            entry.balance = balance;
            entry.seq = seq;
        }
        Ok(())
    }

    async fn reserve(&self, account_id: AccountId, hold_id: &str, want: Money, lease_ms: u64) -> CacheResult<Reserve> {
        let mut shard = self.shard(account_id);
        let Some(entry) = shard.get_mut(&account_id) else {
            return Ok(Reserve::NotLoaded);
        };
        if let Some((amount, _)) = entry.holds.get(hold_id) {
            return Ok(Reserve::Held(*amount)); // a retried reserve is idempotent
        }
        let available = entry.balance.saturating_sub(entry.held());
        let take = want.min(available);
        if !take.is_zero() {
            entry.holds.insert(hold_id.to_string(), (take, unix_ms() + lease_ms));
        }
        Ok(Reserve::Held(take))
    }

    async fn commit_hold(
        &self,
        account_id: AccountId,
        hold_id: &str,
        balance_after: Money,
        seq: i64,
    ) -> CacheResult<()> {
        let mut shard = self.shard(account_id);
        let entry =
            shard.entry(account_id).or_insert_with(|| Entry { balance: balance_after, seq, holds: HashMap::new() });
        entry.holds.remove(hold_id);
        if seq > entry.seq {
            entry.balance = balance_after;
            entry.seq = seq;
        }
        Ok(())
    }

    async fn release_hold(&self, account_id: AccountId, hold_id: &str) -> CacheResult<()> {
        let mut shard = self.shard(account_id);
        if let Some(entry) = shard.get_mut(&account_id) {
            entry.holds.remove(hold_id);
        }
        Ok(())
    }

    async fn apply(&self, account_id: AccountId, balance_after: Money, seq: i64) -> CacheResult<()> {
        let mut shard = self.shard(account_id);
        let entry =
            shard.entry(account_id).or_insert_with(|| Entry { balance: balance_after, seq, holds: HashMap::new() });
        if seq > entry.seq {
            entry.balance = balance_after;
            entry.seq = seq;
        }
        Ok(())
    }

    async fn claim_request(
        &self,
        institution_code: &str,
        request_id: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> CacheResult<Claim> {
        let key = (institution_code.to_string(), request_id.to_string());
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(setl_id) = requests.answers.get(&key) {
            return Ok(Claim::Answered(setl_id.clone()));
        }
        let now = unix_ms();
        if let Some((holder, end)) = requests.claims.get(&key) {
            if *end > now && holder != owner {
                return Ok(Claim::Busy);
            }
        }
        if requests.claims.len() >= REQUESTS_MAX {
            // Only claims whose owner vanished without ending them can have run out.
            requests.claims.retain(|_, (_, end)| *end > now);
        }
        requests.claims.insert(key, (owner.to_string(), now + ttl_ms));
        Ok(Claim::Claimed)
    }

    async fn end_claim(
        &self,
        institution_code: &str,
        request_id: &str,
        owner: &str,
        setl_id: Option<&str>,
    ) -> CacheResult<()> {
        let key = (institution_code.to_string(), request_id.to_string());
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(setl_id) = setl_id {
            if requests.answers.len() >= REQUESTS_MAX {
                requests.answers.clear();
            }
            requests.answers.insert(key.clone(), setl_id.to_string());
        }
        if requests.claims.get(&key).is_some_and(|(holder, _)| holder == owner) {
            requests.claims.remove(&key);
        }
        Ok(())
    }

    async fn forget_answer(&self, institution_code: &str, request_id: &str, setl_id: &str) -> CacheResult<()> {
        let key = (institution_code.to_string(), request_id.to_string());
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if requests.answers.get(&key).is_some_and(|remembered| remembered == setl_id) {
            requests.answers.remove(&key);
        }
        Ok(())
    }

    async fn expired_holds(&self, now_ms: u64, limit: usize) -> CacheResult<Vec<ExpiredHold>> {
        let mut expired = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (account_id, entry) in shard.iter() {
                for (hold_id, (_, lease_end)) in &entry.holds {
                    if *lease_end < now_ms {
                        expired.push(ExpiredHold { account_id: *account_id, hold_id: hold_id.clone() });
                        if expired.len() >= limit {
                            return Ok(expired);
                        }
                    }
                }
            }
        }
        Ok(expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yuan(text: &str) -> Money {
        Money::parse(text).unwrap()
    }

    #[tokio::test]
    async fn holds_never_overstate() {
        let cache = MemoryCache::default();
        assert_eq!(cache.reserve(1, "h1", yuan("10"), 1000).await.unwrap(), Reserve::NotLoaded);
        cache.load(1, yuan("50"), 3).await.unwrap();
        assert_eq!(cache.reserve(1, "h1", yuan("30"), 1000).await.unwrap(), Reserve::Held(yuan("30")));
        assert_eq!(cache.reserve(1, "h2", yuan("30"), 1000).await.unwrap(), Reserve::Held(yuan("20")));
        assert_eq!(cache.reserve(1, "h3", yuan("1"), 1000).await.unwrap(), Reserve::Held(Money::ZERO));
        // An older ledger state never replaces a newer one.
        cache.load(1, yuan("999"), 2).await.unwrap();
        assert_eq!(cache.get(1).await.unwrap().unwrap().balance, yuan("50"));
        cache.commit_hold(1, "h1", yuan("20"), 4).await.unwrap();
        cache.release_hold(1, "h2").await.unwrap();
        let now = cache.get(1).await.unwrap().unwrap();
        assert_eq!((now.balance, now.held, now.available()), (yuan("20"), Money::ZERO, yuan("20")));
    }

    #[tokio::test]
    async fn a_committed_balance_is_installed_when_the_account_is_not_cached() {
        let cache = MemoryCache::default();
        cache.apply(9, yuan("40"), 7).await.unwrap();
        // A balance read from the ledger before that commit cannot replace it.
        cache.load(9, yuan("100"), 5).await.unwrap();
        assert_eq!(cache.get(9).await.unwrap().unwrap().balance, yuan("40"));
        cache.commit_hold(10, "gone", yuan("3"), 2).await.unwrap();
        assert_eq!(cache.get(10).await.unwrap().unwrap().balance, yuan("3"));
    }

    #[tokio::test]
    async fn expired_holds_are_listed() {
        let cache = MemoryCache::default();
        cache.load(7, yuan("5"), 1).await.unwrap();
        cache.reserve(7, "old", yuan("1"), 0).await.unwrap();
        cache.reserve(7, "new", yuan("1"), 60_000).await.unwrap();
        let expired = cache.expired_holds(unix_ms() + 1, 10).await.unwrap();
        assert_eq!(expired, vec![ExpiredHold { account_id: 7, hold_id: "old".into() }]);
    }
}
