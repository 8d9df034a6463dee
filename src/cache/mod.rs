//! The balance cache: each account's balance and its open holds (DESIGN §2).
//!
//! It never overstates money. A payment reserves (holds) on each account it draws from, with a
//! lease; after the ledger commits, the hold is committed (removed, and the balance set to the
//! ledger's balance after); on failure it is released. Balances only ever move to a *newer* ledger
//! state: every balance carries the account's ledger sequence number, and a write with an older
//! sequence is ignored, so out-of-order updates and reloads can leave the cache stale-low for a
//! moment but never stale-high. Credits reach the cache only after the ledger committed them.
//!
//! Every operation touches exactly one account (one Redis hash tag), because family graphs overlap.

pub mod memory;
pub mod redis;

use crate::domain::Money;
use crate::ledger::AccountId;
use async_trait::async_trait;

/// The cache could not answer. The settlement path fails closed (UNAVAILABLE).
#[derive(Debug, Clone, thiserror::Error)]
#[error("balance cache unavailable: {0}")]
pub struct CacheUnavailable(pub String);

pub type CacheResult<T> = Result<T, CacheUnavailable>;

/// What the cache holds for one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedBalance {
    /// The ledger balance as of `seq`.
    pub balance: Money,
    /// Sum of open holds.
    pub held: Money,
    pub seq: i64,
}

impl CachedBalance {
    pub fn available(&self) -> Money {
        self.balance.saturating_sub(self.held)
    }
}

/// Result of a reservation attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Held this much (possibly zero, then no hold exists).
    Held(Money),
    /// The account is not in the cache: load it from the ledger and try again.
    NotLoaded,
}

/// What `BalanceCache::claim_request` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The request settled before: its setl_id, for the replay fast path.
    Answered(String),
    /// The caller holds the claim now, until it ends it or the claim's time runs out.
    Claimed,
    /// Another attempt at this request holds the claim (on this gateway or another): wait, then
    /// claim again.
    Busy,
}

/// A hold whose lease ran out: its owner crashed or is very late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredHold {
    pub account_id: AccountId,
    pub hold_id: String,
}

#[async_trait]
pub trait BalanceCache: Send + Sync + 'static {
    async fn ping(&self) -> CacheResult<()>;
    async fn get(&self, account_id: AccountId) -> CacheResult<Option<CachedBalance>>;
    /// Installs a ledger balance unless the cache already has one as new or newer.
    async fn load(&self, account_id: AccountId, balance: Money, seq: i64) -> CacheResult<()>;
    /// `load`, then `get`: what the cache holds once a balance read from the ledger is installed
    /// (unless the cache has one as new or newer). A cache across the network does it in one trip.
    async fn load_and_get(&self, account_id: AccountId, balance: Money, seq: i64) -> CacheResult<CachedBalance> {
        self.load(account_id, balance, seq).await?;
        self.get(account_id)
            .await?
            .ok_or_else(|| CacheUnavailable("the cache lost an account it had just loaded".into()))
    }
    /// Holds up to `want` of what is available, under `hold_id`, for `lease_ms`.
    async fn reserve(&self, account_id: AccountId, hold_id: &str, want: Money, lease_ms: u64) -> CacheResult<Reserve>;
    /// `load`, then `reserve`: a ledger balance installed (unless the cache has one as new or
    /// newer), then up to `want` of what is available held. A cache across the network does it in
    /// one trip.
    async fn load_and_reserve(
        &self,
        account_id: AccountId,
        balance: Money,
        seq: i64,
        hold_id: &str,
        want: Money,
        lease_ms: u64,
    ) -> CacheResult<Reserve> {
        self.load(account_id, balance, seq).await?;
        self.reserve(account_id, hold_id, want, lease_ms).await
    }
    /// The ledger committed the debit: drop the hold and take the ledger's balance if newer (or
    /// install it if the account is not cached, so no older balance can be loaded later).
    async fn commit_hold(
        &self,
        account_id: AccountId,
        hold_id: &str,
        balance_after: Money,
        seq: i64,
    ) -> CacheResult<()>;
    /// The payment did not commit: drop the hold.
    async fn release_hold(&self, account_id: AccountId, hold_id: &str) -> CacheResult<()>;
    /// A committed change without a hold (credits, refunds): take the balance if newer, or install
    /// it if the account is not cached.
    async fn apply(&self, account_id: AccountId, balance_after: Money, seq: i64) -> CacheResult<()>;
    /// One attempt at a time per request id, across every gateway sharing the cache, and the
    /// idempotency fast path: the settlement this request settled if the cache remembers it, else
    /// the claim for `owner` for `ttl_ms` unless another attempt holds it. A miss proves nothing
    /// (the ledger's unique key is the truth); the claim only keeps concurrent duplicates from
    /// reserving against the same balances.
    async fn claim_request(
        &self,
        institution_code: &str,
        request_id: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> CacheResult<Claim>;
    /// Remembers the answer, if there is one, and ends `owner`'s claim (a claim that ran out and
    /// was taken by another attempt is left to that attempt).
    async fn end_claim(
        &self,
        institution_code: &str,
        request_id: &str,
        owner: &str,
        setl_id: Option<&str>,
    ) -> CacheResult<()>;
    /// Forgets the remembered answer `setl_id` of a request, if it is still the one remembered
    /// (the ledger does not know that settlement: a ledger reset under a shared cache), so that
    /// the request can be claimed again.
    async fn forget_answer(&self, institution_code: &str, request_id: &str, setl_id: &str) -> CacheResult<()>;
    /// Holds whose lease ended before `now_ms` (Unix milliseconds), at most `limit`.
    async fn expired_holds(&self, now_ms: u64, limit: usize) -> CacheResult<Vec<ExpiredHold>>;
}
