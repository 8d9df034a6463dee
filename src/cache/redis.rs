//! The production balance cache on Redis (redis-rs; a standalone server through a connection
//! manager, or a Redis Cluster, behind one type).
//!
//! Per account: a hash `{a:<id>}` with the balance `b` (fen) and the ledger sequence `s`, and a
//! hash `{a:<id>}:h` of hold id → fen (held money is always summed from it, never counted apart). Both carry the same hash tag, and every
//! script touches exactly one account, so the layout works on a cluster however family graphs
//! overlap. Lease ends live in one sorted set, an index only: the sweeper reads it to find holds
//! whose lease ran out, and the holds themselves stay authoritative. Per request:
//! `r:{<code length>:<institution>:<request id>}`, the setl_id it settled (remembered 48 h), and
//! the same key with `:c`, the claim of the attempt in flight.

use super::*;
use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use std::future::Future;
use std::time::Duration;

/// How long a settled request id is remembered for the replay fast path (terminals retry within
/// minutes; the ledger answers older replays).
const REQUEST_TTL_SECONDS: u64 = 48 * 3600;
/// Every Redis call must finish within this; the settlement path fails closed after it.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A standalone server or a cluster, one type for the callers (the hyperswitch `RedisConn` shape).
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(conn) => conn.req_packed_command(cmd),
            RedisConnection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            RedisConnection::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(conn) => conn.get_db(),
            RedisConnection::Cluster(conn) => conn.get_db(),
        }
    }
}

struct Scripts {
    get: Script,
    load: Script,
    reserve: Script,
    finish: Script,
    claim: Script,
    end_claim: Script,
    forget_answer: Script,
}

pub struct RedisCache {
    connection: RedisConnection,
    /// A standalone server: the reserve and finish scripts write the lease index themselves.
    index_in_scripts: bool,
    /// Prepended to every key, so several gateways (or tests) can share one Redis.
    prefix: String,
    scripts: Scripts,
}

fn unavailable(error: impl std::fmt::Display) -> CacheUnavailable {
    CacheUnavailable(error.to_string())
}

async fn deadline<T>(work: impl Future<Output = ::redis::RedisResult<T>>) -> CacheResult<T> {
    match tokio::time::timeout(CALL_TIMEOUT, work).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(CacheUnavailable("Redis did not answer in time".into())),
    }
}

impl RedisCache {
    /// `redis://host:port/db` for one server; several comma-separated URLs for a cluster.
    pub async fn connect(url: &str, prefix: &str) -> CacheResult<RedisCache> {
        let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let connection = if urls.len() > 1 {
            let client = ::redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(CALL_TIMEOUT)
                .build()
                .map_err(unavailable)?;
            RedisConnection::Cluster(deadline(client.get_async_connection()).await?)
        } else {
            let client = ::redis::Client::open(url).map_err(unavailable)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(CALL_TIMEOUT));
            RedisConnection::Single(deadline(ConnectionManager::new_with_config(client, config)).await?)
        };
        // One URL may still name a node of a cluster (or a proxy in front of one), where a script
        // may not touch keys of two slots: the lease index then keeps commands of its own.
        let index_in_scripts = match &connection {
            RedisConnection::Cluster(_) => false,
            // A server that will not say (INFO refused by a proxy) gets the separate commands.
            RedisConnection::Single(manager) => {
                deadline(::redis::cmd("INFO").arg("cluster").query_async::<String>(&mut manager.clone()))
                    .await
                    .is_ok_and(|info| !info.lines().any(|line| line.trim() == "cluster_enabled:1"))
            }
        };
        Ok(RedisCache {
            connection,
            index_in_scripts,
            prefix: prefix.to_string(),
            scripts: Scripts {
                // The scripts that bring a ledger balance into the cache share install.lua.
                get: Script::new(concat!(include_str!("scripts/install.lua"), include_str!("scripts/get.lua"))),
                load: Script::new(concat!(include_str!("scripts/install.lua"), include_str!("scripts/load.lua"))),
                reserve: Script::new(concat!(include_str!("scripts/install.lua"), include_str!("scripts/reserve.lua"))),
                finish: Script::new(concat!(include_str!("scripts/install.lua"), include_str!("scripts/finish.lua"))),
                claim: Script::new(include_str!("scripts/claim.lua")),
                end_claim: Script::new(include_str!("scripts/end_claim.lua")),
                forget_answer: Script::new(include_str!("scripts/forget_answer.lua")),
            },
        })
    }

    fn account_key(&self, account_id: AccountId) -> String {
        format!("{}{{a:{account_id}}}", self.prefix)
    }

    fn holds_key(&self, account_id: AccountId) -> String {
        format!("{}{{a:{account_id}}}:h", self.prefix)
    }

    /// A request's remembered answer; its claim is this key with `:c` appended, so both always
    /// hash to the same slot (whatever braces the request id holds, the tag ends at or before the
    /// `}` written here).
    fn request_key(&self, institution_code: &str, request_id: &str) -> String {
        // Length-prefixed so that no (code, id) pair can collide with another.
        format!("{}r:{{{}:{institution_code}:{request_id}}}", self.prefix, institution_code.len())
    }

    fn lease_index_key(&self) -> String {
        format!("{}holds", self.prefix)
    }

    fn lease_member(account_id: AccountId, hold_id: &str) -> String {
        format!("{account_id}|{hold_id}")
    }

    /// Drops a hold's entry from the lease index.
    async fn unindex(&self, conn: &mut RedisConnection, account_id: AccountId, hold_id: &str) -> CacheResult<()> {
        let _: i64 = deadline(
            ::redis::cmd("ZREM")
                .arg(self.lease_index_key())
                .arg(Self::lease_member(account_id, hold_id))
                .query_async(conn),
        )
        .await?;
        Ok(())
    }

    async fn finish(&self, account_id: AccountId, hold_id: &str, balance: Option<(Money, i64)>) -> CacheResult<()> {
        let mut conn = self.connection.clone();
        let (balance_fen, seq) = match balance {
            Some((balance, seq)) => (balance.to_fen().to_string(), seq.to_string()),
            None => (String::new(), String::new()),
        };
        let mut invocation = self.scripts.finish.key(self.account_key(account_id));
        invocation.key(self.holds_key(account_id)).arg(hold_id).arg(balance_fen).arg(seq);
        if self.single_server() {
            // The script unindexes the hold itself, after dropping it: one round trip.
            invocation.key(self.lease_index_key()).arg(Self::lease_member(account_id, hold_id));
            let _: i64 = deadline(invocation.invoke_async(&mut conn)).await?;
        } else {
            let _: i64 = deadline(invocation.invoke_async(&mut conn)).await?;
            // The index entry goes last: a hold is never unindexed while it exists.
            self.unindex(&mut conn, account_id, hold_id).await?;
        }
        Ok(())
    }

    /// `reserve`, installing a ledger balance first when one is given (in the same script).
    async fn reserve_loading(
        &self,
        account_id: AccountId,
        load: Option<(Money, i64)>,
        hold_id: &str,
        want: Money,
        lease_ms: u64,
    ) -> CacheResult<Reserve> {
        let mut conn = self.connection.clone();
        let lease_end = memory::unix_ms() + lease_ms;
        let member = Self::lease_member(account_id, hold_id);
        let (balance_fen, seq) = match load {
            Some((balance, seq)) => (balance.to_fen().to_string(), seq.to_string()),
            None => (String::new(), String::new()),
        };
        let mut invocation = self.scripts.reserve.key(self.account_key(account_id));
        invocation.key(self.holds_key(account_id)).arg(hold_id).arg(want.to_fen()).arg(balance_fen).arg(seq);
        let held: i64 = if self.single_server() {
            // The script indexes the hold and reserves in one step (one round trip).
            invocation.key(self.lease_index_key()).arg(lease_end).arg(&member);
            deadline(invocation.invoke_async(&mut conn)).await?
        } else {
            // Index first: a hold that exists is always findable by the sweeper.
            let _: i64 = deadline(
                ::redis::cmd("ZADD").arg(self.lease_index_key()).arg(lease_end).arg(&member).query_async(&mut conn),
            )
            .await?;
            let held = deadline(invocation.invoke_async(&mut conn)).await?;
            if held <= 0 {
                self.unindex(&mut conn, account_id, hold_id).await?;
            }
            held
        };
        Ok(if held < 0 { Reserve::NotLoaded } else { Reserve::Held(Money::from_fen(held)) })
    }

    /// On one server a script may also touch the lease index; on a cluster the index is on
    /// another slot than the account, so it takes commands of its own.
    fn single_server(&self) -> bool {
        self.index_in_scripts
    }
}

#[async_trait]
impl BalanceCache for RedisCache {
    async fn ping(&self) -> CacheResult<()> {
        let mut conn = self.connection.clone();
        let _: String = deadline(::redis::cmd("PING").query_async(&mut conn)).await?;
        Ok(())
    }

    async fn get(&self, account_id: AccountId) -> CacheResult<Option<CachedBalance>> {
        let mut conn = self.connection.clone();
        let mut invocation = self.scripts.get.key(self.account_key(account_id));
        invocation.key(self.holds_key(account_id));
        let values: Vec<i64> = deadline(invocation.invoke_async(&mut conn)).await?;
        Ok(match values.as_slice() {
            [balance, seq, held] => {
                Some(CachedBalance { balance: Money::from_fen(*balance), held: Money::from_fen(*held), seq: *seq })
            }
            _ => None,
        })
    }

    async fn load(&self, account_id: AccountId, balance: Money, seq: i64) -> CacheResult<()> {
        let mut conn = self.connection.clone();
        let mut invocation = self.scripts.load.key(self.account_key(account_id));
        invocation.arg(balance.to_fen()).arg(seq);
        let _: i64 = deadline(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn load_and_get(&self, account_id: AccountId, balance: Money, seq: i64) -> CacheResult<CachedBalance> {
        let mut conn = self.connection.clone();
        let mut invocation = self.scripts.get.key(self.account_key(account_id));
        invocation.key(self.holds_key(account_id)).arg(balance.to_fen()).arg(seq);
        let values: Vec<i64> = deadline(invocation.invoke_async(&mut conn)).await?;
        match values.as_slice() {
            [balance, seq, held] => {
                Ok(CachedBalance { balance: Money::from_fen(*balance), held: Money::from_fen(*held), seq: *seq })
            }
            _ => Err(CacheUnavailable("the cache lost an account it had just loaded".into())),
        }
    }

    async fn reserve(&self, account_id: AccountId, hold_id: &str, want: Money, lease_ms: u64) -> CacheResult<Reserve> {
        self.reserve_loading(account_id, None, hold_id, want, lease_ms).await
    }

    async fn load_and_reserve(
        &self,
        account_id: AccountId,
        balance: Money,
        seq: i64,
        hold_id: &str,
        want: Money,
        lease_ms: u64,
    ) -> CacheResult<Reserve> {
        self.reserve_loading(account_id, Some((balance, seq)), hold_id, want, lease_ms).await
    }

    async fn commit_hold(
        &self,
        account_id: AccountId,
        hold_id: &str,
        balance_after: Money,
        seq: i64,
    ) -> CacheResult<()> {
        self.finish(account_id, hold_id, Some((balance_after, seq))).await
    }

    async fn release_hold(&self, account_id: AccountId, hold_id: &str) -> CacheResult<()> {
        self.finish(account_id, hold_id, None).await
    }

    async fn apply(&self, account_id: AccountId, balance_after: Money, seq: i64) -> CacheResult<()> {
        // A committed change without a hold reaches the cache by the same rule as a reload.
        self.load(account_id, balance_after, seq).await
    }

    async fn claim_request(
        &self,
        institution_code: &str,
        request_id: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> CacheResult<Claim> {
        let mut conn = self.connection.clone();
        let key = self.request_key(institution_code, request_id);
        let mut invocation = self.scripts.claim.key(&key);
        invocation.key(format!("{key}:c")).arg(owner).arg(ttl_ms);
        let (found, setl_id): (i64, String) = deadline(invocation.invoke_async(&mut conn)).await?;
        match found {
            1 => Ok(Claim::Answered(setl_id)),
            2 => Ok(Claim::Claimed),
            3 => Ok(Claim::Busy),
            other => Err(CacheUnavailable(format!("the claim script answered {other}"))),
        }
    }

    async fn end_claim(
        &self,
        institution_code: &str,
        request_id: &str,
        owner: &str,
        setl_id: Option<&str>,
    ) -> CacheResult<()> {
        let mut conn = self.connection.clone();
        let key = self.request_key(institution_code, request_id);
        let mut invocation = self.scripts.end_claim.key(&key);
        invocation.key(format!("{key}:c")).arg(owner).arg(setl_id.unwrap_or("")).arg(REQUEST_TTL_SECONDS);
        let _: i64 = deadline(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn forget_answer(&self, institution_code: &str, request_id: &str, setl_id: &str) -> CacheResult<()> {
        let mut conn = self.connection.clone();
        let mut invocation = self.scripts.forget_answer.key(self.request_key(institution_code, request_id));
        invocation.arg(setl_id);
        let _: i64 = deadline(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn expired_holds(&self, now_ms: u64, limit: usize) -> CacheResult<Vec<ExpiredHold>> {
        let mut conn = self.connection.clone();
        let members: Vec<String> = deadline(
            ::redis::cmd("ZRANGEBYSCORE")
                .arg(self.lease_index_key())
                .arg("-inf")
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut conn),
        )
        .await?;
        Ok(members
            .into_iter()
            .filter_map(|member| {
                let (account, hold) = member.split_once('|')?;
                Some(ExpiredHold { account_id: account.parse().ok()?, hold_id: hold.to_string() })
            })
            .collect())
    }
}
