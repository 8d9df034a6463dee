//! The critical section: reserve holds on each account in deduction order, commit to the ledger,
//! then finalize the holds. It runs in its own task (see `settle::run`), so it always completes or
//! compensates, whatever happens to the request that started it.
//!
//! Holds are per account (one Redis hash tag each), the "balancing debits" shape: a multi-account
//! payment is a sequence of single-account holds with compensation, never one script over many.

use super::sweeper::{settle_hold, SWEEP_GRACE_MS};
use super::Source;
use crate::cache::memory::unix_ms;
use crate::cache::Reserve;
use crate::domain::{Money, PayMode};
use crate::error::{Failure, Outcome, Reason};
use crate::gateway::Gateway;
use crate::ledger::{DebitLine, LedgerWrite, NewSettlement, SettlementRecord, WriteDecline, WriteOutcome};
use std::sync::Arc;
use std::time::Duration;

/// Reserves up to `draw_max` over `sources`, commits, finalizes. Returns the committed record (or
/// the record already committed under the same request id, for the caller to compare).
///
/// If the ledger refuses a debit the cache allowed (the cache was behind the ledger, e.g. after a
/// commit it never heard of), the accounts are reloaded from the ledger and the payment is tried
/// once more with fresh holds.
///
/// No hold deadline later than `hold_deadline_limit_ms` is taken (the request's claim must outlive
/// the write). With a failure whose outcome is unknown (the write may yet commit) comes what the
/// caller needs to find it out (`settle_unknown`).
///
/// With `install_context`, the balances the ledger gave with the payer's context (`sources`) are
/// installed in the cache with the first attempt's holds: for a payment that was not planned
/// against the cache first, whose accounts the cache may not hold yet.
pub async fn run(
    gateway: Arc<Gateway>,
    new: NewSettlement,
    sources: Vec<Source>,
    draw_max: Money,
    mode: PayMode,
    hold_deadline_limit_ms: Option<u64>,
    install_context: bool,
) -> (Outcome<SettlementRecord>, Option<Unsettled>) {
    const ATTEMPTS_MAX: usize = 2;
    let mut attempt = 1;
    loop {
        // Never with a retry: it follows a reload from the ledger, newer than the context.
        let load = install_context && attempt == 1;
        match run_once(&gateway, new.clone(), &sources, draw_max, mode, hold_deadline_limit_ms, load).await {
            Err(Retry::Reloaded) if attempt < ATTEMPTS_MAX => attempt += 1,
            Err(Retry::Reloaded) => {
                let failure =
                    Failure::new(Reason::InsufficientBalance, "the ledger refused: the balance is not sufficient");
                return (Err(failure), None);
            }
            Err(Retry::Done(failure)) => return (Err(failure), None),
            Err(Retry::Unknown(failure, unsettled)) => return (Err(failure), Some(unsettled)),
            Ok(record) => return (Ok(record), None),
        }
    }
}

enum Retry {
    /// The ledger refused a debit the cache allowed; the cache now holds the ledger's balances.
    Reloaded,
    Done(Failure),
    /// The write may still commit.
    Unknown(Failure, Unsettled),
}

/// A settlement write whose outcome is unknown (the commit timed out, or the ledger failed while
/// it was in flight): it may still commit until its hold deadline, and its holds stay meanwhile.
#[derive(Debug)]
pub struct Unsettled {
    /// The settlement's id, which is also its holds' id.
    pub setl_id: String,
    pub account_ids: Vec<i64>,
    pub hold_deadline_ms: u64,
}

/// Finds out what became of an unsettled write and settles its holds accordingly: asks the ledger
/// to fence the hold (as the sweeper does after the lease), which it refuses if the write
/// committed. Retries while the ledger cannot be reached, until the deadline and the sweeper's
/// grace have passed (the sweeper then takes over). `Some(committed)` once known.
pub async fn settle_unknown(gateway: &Gateway, unsettled: &Unsettled) -> Option<bool> {
    let give_up_at_ms = unsettled.hold_deadline_ms + SWEEP_GRACE_MS;
    let mut pause = Duration::from_millis(50);
    loop {
        let failure = match gateway.ledger.resolve_hold(&unsettled.setl_id).await {
            Ok(committed) => {
                for account_id in &unsettled.account_ids {
                    if let Err(failure) = settle_hold(gateway, *account_id, &unsettled.setl_id, committed).await {
                        // The hold stays, with the ledger's fate final: the sweeper finishes it.
                        tracing::warn!(%failure, setl_id = %unsettled.setl_id, "could not settle a hold");
                    }
                }
                return Some(committed);
            }
            Err(error) => error,
        };
        if unix_ms() >= give_up_at_ms {
            tracing::warn!(%failure, setl_id = %unsettled.setl_id, "the fate of a write is unknown; left to the sweeper");
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

impl From<Failure> for Retry {
    fn from(failure: Failure) -> Retry {
        Retry::Done(failure)
    }
}

async fn run_once(
    gateway: &Gateway,
    mut new: NewSettlement,
    sources: &[Source],
    draw_max: Money,
    mode: PayMode,
    hold_deadline_limit_ms: Option<u64>,
    load: bool,
) -> Result<SettlementRecord, Retry> {
    let hold_id = gateway.new_id('S');
    new.setl_id = hold_id.clone();
    // Every hold taken below has a lease ending at or after this deadline; the ledger refuses the
    // write after it, and the sweeper releases holds only after it.
    let hold_deadline_ms = unix_ms() + gateway.settings.hold_lease_ms;
    if hold_deadline_limit_ms.is_some_and(|limit| hold_deadline_ms > limit) {
        return Err(Failure::new(
            Reason::BackendUnavailable,
            "the payment took too long to prepare; nothing was paid, retry",
        )
        .into());
    }
    new.hold_deadline_ms = Some(hold_deadline_ms);
    let mut holds: Vec<(i64, Money)> = Vec::new();
    let mut left = draw_max;
    for source in sources {
        if left.is_zero() {
            break;
        }
        match reserve_one(gateway, source, &hold_id, left, load).await {
            Ok(held) if held.is_zero() => {}
            Ok(held) => {
                holds.push((source.account.id, held));
                new.debits.push(DebitLine {
                    account_id: source.account.id,
                    owner_psn_no: source.owner_psn_no.clone(),
                    amount: held,
                    family: source.family,
                });
                left = left.checked_sub(held).expect("held <= left");
            }
            Err(failure) => {
                release_all(gateway, &holds, &hold_id).await;
                return Err(failure.into());
            }
        }
    }
    if mode == PayMode::FullOnly && !left.is_zero() {
        // Balances moved between plan and reserve: all or nothing.
        release_all(gateway, &holds, &hold_id).await;
        return Err(
            Failure::new(Reason::InsufficientBalance, "the accounts cannot cover this full-only payment").into()
        );
    }

    let unsettled = || Unsettled {
        setl_id: hold_id.clone(),
        account_ids: holds.iter().map(|(account_id, _)| *account_id).collect(),
        hold_deadline_ms,
    };
    let timeout = Duration::from_millis(gateway.settings.commit_timeout_ms);
    let committed = tokio::time::timeout(timeout, gateway.committer.commit(LedgerWrite::Settle(new))).await;
    let result = match committed {
        Ok(Ok(result)) => result,
        // The outcome is unknown: the batch may have committed. Leave the holds for the caller
        // to settle once the ledger says (`settle_unknown`), or the sweeper after their lease;
        // either way the cache never overstates.
        Ok(Err(unavailable)) => return Err(Retry::Unknown(Failure::from(unavailable), unsettled())),
        Err(_elapsed) => {
            let failure = Failure::new(Reason::BackendUnavailable, "the ledger did not answer in time");
            return Err(Retry::Unknown(failure, unsettled()));
        }
    };
    match result {
        Ok(WriteOutcome::Settled { record, changes }) => {
            for change in changes {
                if let Err(error) =
                    gateway.cache.commit_hold(change.account_id, &hold_id, change.balance_after, change.seq).await
                {
                    // The hold stays until the sweeper finds it committed; money is safe.
                    tracing::warn!(%error, setl_id = %record.setl_id, "could not finalize a hold");
                }
            }
            Ok(record)
        }
        Ok(WriteOutcome::SettlementExists(existing)) => {
            release_all(gateway, &holds, &hold_id).await;
            Ok(existing)
        }
        Ok(other) => unreachable!("a settlement write answered {other:?}"),
        Err(WriteDecline::InsufficientBalance { .. }) => {
            release_all(gateway, &holds, &hold_id).await;
            for (account_id, _) in &holds {
                reload(gateway, *account_id).await?;
            }
            Err(Retry::Reloaded)
        }
        Err(decline) => {
            release_all(gateway, &holds, &hold_id).await;
            Err(decline_failure(decline).into())
        }
    }
}

/// Installs the ledger's balance in the cache (it wins only if newer than what the cache has).
async fn reload(gateway: &Gateway, account_id: i64) -> Outcome<()> {
    let (balance, seq) = gateway
        .ledger
        .account_balance(account_id)
        .await?
        .ok_or_else(|| Failure::new(Reason::Internal, "account vanished from the ledger"))?;
    gateway.cache.load(account_id, balance, seq).await?;
    Ok(())
}

/// Holds up to `want` on one source. With `load`, the balance the ledger gave with the payer's
/// context is installed on the way (it wins only if newer than the cache's), so a payment that was
/// not planned against the cache first still draws on a loaded, caught-up account in one trip.
async fn reserve_one(gateway: &Gateway, source: &Source, hold_id: &str, want: Money, load: bool) -> Outcome<Money> {
    let lease_ms = gateway.settings.hold_lease_ms;
    let (account_id, balance, seq) = (source.account.id, source.account.balance, source.account.seq);
    let reserved = if load {
        gateway.cache.load_and_reserve(account_id, balance, seq, hold_id, want, lease_ms).await?
    } else {
        gateway.cache.reserve(account_id, hold_id, want, lease_ms).await?
    };
    match reserved {
        Reserve::Held(amount) => Ok(amount),
        Reserve::NotLoaded => {
            // Flushed or evicted between the load and the hold (a cache that does not do both in
            // one step): reload from the ledger, then try once more.
            let (balance, seq) = gateway
                .ledger
                .account_balance(source.account.id)
                .await?
                .ok_or_else(|| Failure::new(Reason::Internal, "account vanished from the ledger"))?;
            gateway.cache.load(source.account.id, balance, seq).await?;
            match gateway.cache.reserve(source.account.id, hold_id, want, lease_ms).await? {
                Reserve::Held(amount) => Ok(amount),
                Reserve::NotLoaded => {
                    Err(Failure::new(Reason::BackendUnavailable, "the balance cache keeps losing the account"))
                }
            }
        }
    }
}

/// Compensation: drop every hold taken. A failure here leaves the hold to the sweeper.
pub async fn release_all(gateway: &Gateway, holds: &[(i64, Money)], hold_id: &str) {
    for (account_id, _) in holds {
        if let Err(error) = gateway.cache.release_hold(*account_id, hold_id).await {
            tracing::warn!(%error, hold_id, "could not release a hold; the sweeper will");
        }
    }
}

pub fn decline_failure(decline: WriteDecline) -> Failure {
    match decline {
        WriteDecline::OriginalReversed => {
            Failure::new(Reason::OriginalReversed, "this request was reversed (冲正) and cannot be settled")
        }
        WriteDecline::NotFound => Failure::new(Reason::NotFound, "no such settlement for this institution"),
        WriteDecline::RefundExceedsPaid { refundable } => Failure::new(
            Reason::RefundExceedsPaid,
            format!("the refund exceeds what is still refundable ({refundable})"),
        )
        .with_metadata("refundable", refundable),
        WriteDecline::InsufficientBalance { .. } => {
            Failure::new(Reason::InsufficientBalance, "the ledger refused: the balance is not sufficient")
        }
        WriteDecline::AccountNotOpen { status, .. } => match status {
            crate::domain::AccountStatus::Frozen => {
                Failure::new(Reason::AccountFrozen, "an account to debit is frozen")
            }
            _ => Failure::new(Reason::AccountClosed, "an account to post to is closed"),
        },
        WriteDecline::NoPinDailyExceeded { .. } => {
            Failure::new(Reason::PinRequired, "the no-PIN daily ceiling is reached; this payment needs the PIN")
        }
        WriteDecline::RequestIdReused => {
            Failure::new(Reason::RequestIdReused, "request_id was used before for a different request")
        }
        WriteDecline::HoldExpired => Failure::new(
            Reason::BackendUnavailable,
            "the ledger was too slow to commit in time; nothing was paid, retry",
        ),
        WriteDecline::NoAccount => Failure::new(Reason::NoAccount, "this person has no personal account"),
        WriteDecline::Stale => Failure::new(
            Reason::BackendUnavailable,
            "the account changed while this was prepared; nothing was done, retry",
        ),
    }
}
