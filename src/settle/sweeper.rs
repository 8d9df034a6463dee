//! The hold sweeper: settles holds whose lease ran out (a gateway crashed between reserve and
//! commit, or its ledger commit outcome was unknown) against the ledger — commit the hold if the
//! ledger has the settlement, release it if not (DESIGN §2).

use crate::cache::memory::unix_ms;
use crate::error::Outcome;
use crate::gateway::Gateway;
use crate::ledger::AccountId;
use std::sync::Arc;
use std::time::Duration;

/// Expired holds handled per pass at most.
const SWEEP_BATCH_MAX: usize = 256;
/// A hold is swept only this long after its lease ended, beyond any clock difference between
/// gateways: the ledger refuses a write after its lease ended, so by then its fate is final.
pub const SWEEP_GRACE_MS: u64 = 5_000;

/// One pass at `now_ms` (Unix ms); returns how many holds it settled.
pub async fn sweep_once(gateway: &Gateway, now_ms: u64) -> usize {
    let expired = match gateway.cache.expired_holds(now_ms.saturating_sub(SWEEP_GRACE_MS), SWEEP_BATCH_MAX).await {
        Ok(expired) => expired,
        Err(error) => {
            tracing::warn!(%error, "sweeper cannot list holds");
            return 0;
        }
    };
    let mut settled = 0;
    for hold in expired {
        let committed = match gateway.ledger.resolve_hold(&hold.hold_id).await {
            Ok(committed) => committed,
            Err(error) => {
                tracing::warn!(%error, "sweeper cannot reach the ledger");
                return settled;
            }
        };
        match settle_hold(gateway, hold.account_id, &hold.hold_id, committed).await {
            Ok(()) => {
                tracing::info!(hold_id = %hold.hold_id, committed, "sweeper settled an expired hold");
                settled += 1;
            }
            // One hold the cache would not update does not hold up the others.
            Err(failure) => tracing::warn!(%failure, hold_id = %hold.hold_id, "sweeper cannot settle a hold"),
        }
    }
    settled
}

/// Brings the cache in line with a hold's final fate in the ledger: a committed hold is dropped
/// with the account's ledger balance installed, a fenced one released.
pub async fn settle_hold(gateway: &Gateway, account_id: AccountId, hold_id: &str, committed: bool) -> Outcome<()> {
    let balance = if committed { gateway.ledger.account_balance(account_id).await? } else { None };
    match balance {
        Some((balance, seq)) => gateway.cache.commit_hold(account_id, hold_id, balance, seq).await?,
        None => gateway.cache.release_hold(account_id, hold_id).await?,
    }
    Ok(())
}

/// Runs passes every `interval` until the gateway is dropped.
pub fn spawn(gateway: std::sync::Weak<Gateway>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            let Some(gateway): Option<Arc<Gateway>> = gateway.upgrade() else {
                break;
            };
            sweep_once(&gateway, unix_ms()).await;
        }
    })
}
