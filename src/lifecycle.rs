//! An account's life events (DESIGN §1 Lifecycle, 000 §15–16, 001 §6–8, 002 Q16): a transfer out
//! to another region, a one-time payout after termination (清算), money transferred in. Each is
//! idempotent by request id. No gRPC here.

use crate::crediting::interest_rates;
use crate::domain::interest::{interest_between, period_containing};
use crate::domain::{is_region_code, InsuranceStatus, Money};
use crate::error::{Failure, Outcome, Reason};
use crate::gateway::{digest, Gateway};
use crate::ledger::{LedgerWrite, LifecycleKind, LifecycleRecord, NewLifecycle, PersonRecord, WriteOutcome};
use chrono::{Days, NaiveDate};
use std::sync::Arc;
use std::time::Duration;

/// The whole balance to the transfer clearing account and the account closed, after interest up
/// to the day before (001 §6). Refused for a frozen or closed account and for a terminated person
/// (whose balance is paid out with [`liquidate`]).
pub async fn transfer_out(
    gateway: &Arc<Gateway>,
    request_id: &str,
    psn_no: &str,
    to_region: &str,
) -> Outcome<LifecycleRecord> {
    if !is_region_code(to_region) {
        return Err(Failure::invalid("to_region", "must be a 6-digit region code like 220000"));
    }
    let fingerprint = digest(&["transfer-out/v1", psn_no, to_region]);
    if let Some(done) = replayed(gateway, request_id, &fingerprint).await? {
        return Ok(done);
    }
    let person = gateway.person(psn_no).await?;
    if person.region == to_region {
        return Err(Failure::invalid("to_region", format!("the person is insured in {to_region} already")));
    }
    if person.status == InsuranceStatus::Terminated {
        return Err(Failure::new(
            Reason::PersonTerminated,
            "the person's insurance is terminated: the balance is paid out with Liquidate, not transferred",
        ));
    }
    closing(gateway, request_id, &person, LifecycleKind::TransferOut, fingerprint, format!("to {to_region}")).await
}

/// After termination (death, emigration, …: 000 §15, 001 §8, 002 Q16): the whole balance paid out
/// once to withdrawals payable, to the person or their heirs, and the account closed.
pub async fn liquidate(
    gateway: &Arc<Gateway>,
    request_id: &str,
    psn_no: &str,
    reason: &str,
) -> Outcome<LifecycleRecord> {
    let fingerprint = digest(&["liquidate/v1", psn_no, reason]);
    if let Some(done) = replayed(gateway, request_id, &fingerprint).await? {
        return Ok(done);
    }
    let person = gateway.person(psn_no).await?;
    if person.status != InsuranceStatus::Terminated {
        return Err(Failure::new(
            Reason::PersonNotTerminated,
            format!("the person's insurance is {}; an account is liquidated only after termination", person.status),
        ));
    }
    closing(gateway, request_id, &person, LifecycleKind::Liquidation, fingerprint, reason.to_string()).await
}

/// Money transferred in from another region, merged into the person's account (opened if the
/// person has none and their category gets one here; reopened if it was closed).
pub async fn transfer_in(
    gateway: &Arc<Gateway>,
    request_id: &str,
    psn_no: &str,
    from_region: &str,
    amount: Money,
    value_date: Option<NaiveDate>,
) -> Outcome<LifecycleRecord> {
    if !is_region_code(from_region) {
        return Err(Failure::invalid("from_region", "must be a 6-digit region code like 110000"));
    }
    // The value date as sent (none: empty), so a retry after midnight is still the same request.
    let sent_value_date = value_date.map(|day| day.to_string()).unwrap_or_default();
    let fingerprint = digest(&["transfer-in/v1", psn_no, from_region, &amount.to_string(), &sent_value_date]);
    if let Some(done) = replayed(gateway, request_id, &fingerprint).await? {
        return Ok(done);
    }
    let person = gateway.person(psn_no).await?;
    if person.region == from_region {
        return Err(Failure::invalid("from_region", format!("the person is insured in {from_region} already")));
    }
    if person.status == InsuranceStatus::Terminated {
        return Err(Failure::new(Reason::PersonTerminated, "the person's insurance is terminated"));
    }
    let today = gateway.clock.today();
    let value_date = value_date.unwrap_or(today);
    if value_date > today {
        return Err(Failure::invalid("value_date", "is in the future"));
    }
    // Money dated into a period whose interest is paid would never earn it (or earn it twice).
    let paid_through = match &person.account {
        Some(_) => gateway
            .ledger
            .interest_candidates(&person.region, today, today, "", 1, Some(psn_no))
            .await?
            .into_iter()
            .next()
            .and_then(|candidate| candidate.settled_through),
        None => None,
    };
    if let Some(paid_through) = paid_through.filter(|paid| value_date <= *paid) {
        return Err(Failure::invalid(
            "value_date",
            format!("interest on this account is paid through {paid_through}; date the money after it"),
        ));
    }
    let policy = gateway.policy(&person.region)?;
    let open_account = person.account.is_none() && policy.has_account(person.category);
    if person.account.is_none() && !open_account {
        return Err(Failure::new(
            Reason::NoAccount,
            format!("{} has no personal account in region {}", person.category, person.region),
        ));
    }
    let new = NewLifecycle {
        request_id: request_id.to_string(),
        fingerprint,
        kind: LifecycleKind::TransferIn,
        psn_no: psn_no.to_string(),
        amount: Some(amount),
        interest: None,
        interest_seen: None,
        open_account,
        memo: format!("from {from_region}"),
        value_date,
        business_date: today,
        at: now_micros(gateway),
    };
    commit(gateway, new).await
}

/// Transfer out or liquidation: interest up to the day before first, then the whole balance. The
/// interest is computed before the write; should an interest run pay a period meanwhile, the
/// ledger says so and it is computed again.
async fn closing(
    gateway: &Arc<Gateway>,
    request_id: &str,
    person: &PersonRecord,
    kind: LifecycleKind,
    fingerprint: String,
    memo: String,
) -> Outcome<LifecycleRecord> {
    if person.account.is_none() {
        return Err(Failure::new(Reason::NoAccount, "this person has no personal account"));
    }
    let mut attempts = 0;
    loop {
        attempts += 1;
        let today = gateway.clock.today();
        // Computed whatever the status read before says: the ledger refuses an account that is not
        // open, and one unfrozen meanwhile must not close without its interest.
        let (interest, interest_seen) = interest_to_yesterday(gateway, person, today).await?;
        let new = NewLifecycle {
            request_id: request_id.to_string(),
            fingerprint: fingerprint.clone(),
            kind,
            psn_no: person.psn_no.clone(),
            amount: None,
            interest,
            interest_seen,
            open_account: false,
            memo: memo.clone(),
            value_date: today,
            business_date: today,
            at: now_micros(gateway),
        };
        match commit(gateway, new).await {
            Err(failure) if attempts < 3 && is_stale(&failure) => continue,
            result => return result,
        }
    }
}

fn is_stale(failure: &Failure) -> bool {
    *failure == crate::settle::reserve::decline_failure(crate::ledger::WriteDecline::Stale)
}

/// The answer of a request done before under this id (or REQUEST_ID_REUSED for other content):
/// a replay answers the same whatever has changed since.
async fn replayed(gateway: &Gateway, request_id: &str, fingerprint: &str) -> Outcome<Option<LifecycleRecord>> {
    match gateway.ledger.lifecycle(request_id).await? {
        Some(done) if done.fingerprint == fingerprint => Ok(Some(done)),
        Some(_) => Err(Failure::new(Reason::RequestIdReused, "request_id was used before for a different request")),
        None => Ok(None),
    }
}

/// Interest not yet paid, from the day after the account's last paid interest (or from the start
/// of the settlement period before the current one, for an account never paid any) through the day
/// before `today`; and the last paid period it was computed from.
async fn interest_to_yesterday(
    gateway: &Gateway,
    person: &PersonRecord,
    today: NaiveDate,
) -> Outcome<(Option<(NaiveDate, Money)>, Option<NaiveDate>)> {
    let policy = gateway.policy(&person.region)?;
    let Some(through) = today.checked_sub_days(Days::new(1)) else { return Ok((None, None)) };
    let settlement = policy.interest.settlement;
    let current = period_containing(settlement, through).0;
    let mut start = period_containing(settlement, current.pred_opt().expect("date in range")).0;
    let mut candidate = None;
    // Twice at most: once more from further back when the last paid period is older than `start`
    // (so that the periods in between count the money from their own first day).
    for _ in 0..2 {
        let found =
            gateway.ledger.interest_candidates(&person.region, start, through, "", 1, Some(&person.psn_no)).await?;
        let Some(found) = found.into_iter().next() else { return Ok((None, None)) };
        match found.settled_through.and_then(|settled| settled.succ_opt()) {
            Some(from) if from < start => start = from,
            _ => {
                candidate = Some(found);
                break;
            }
        }
    }
    let Some(candidate) = candidate else { return Ok((None, None)) };
    let seen = candidate.settled_through;
    let from = match seen {
        Some(settled) if settled >= through => return Ok((None, seen)),
        Some(settled) => settled.succ_opt().expect("date in range"),
        None => start,
    };
    let rates = interest_rates(gateway, &person.region).await?;
    let amount = interest_between(&candidate.amounts, &rates, policy.interest.rate_applies, settlement, from, through)
        .map_err(|message| {
            Failure::new(
                Reason::InvalidArgument,
                format!("region {}: {message}; enter the rate with SetInterestRate", person.region),
            )
        })?;
    Ok(((!amount.is_zero()).then_some((through, amount)), seen))
}

/// Now, as the ledgers store it (microseconds), so a first answer and its replay are the same.
fn now_micros(gateway: &Gateway) -> chrono::DateTime<chrono::Utc> {
    let now = gateway.clock.now();
    chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// Commits through the group committer, in a task of its own so a client going away cannot cut it
/// short; then the cache takes the new balance.
async fn commit(gateway: &Arc<Gateway>, new: NewLifecycle) -> Outcome<LifecycleRecord> {
    let _admitted = gateway.admit()?;
    let fingerprint = new.fingerprint.clone();
    let gateway = gateway.clone();
    let task = tokio::spawn(async move {
        let timeout = Duration::from_millis(gateway.settings.commit_timeout_ms);
        let result = tokio::time::timeout(timeout, gateway.committer.commit(LedgerWrite::Lifecycle(new)))
            .await
            .map_err(|_| Failure::new(Reason::BackendUnavailable, "the ledger did not answer in time"))??;
        match result {
            Ok(WriteOutcome::Lifecycle { record, changes }) => {
                for change in changes {
                    if let Err(error) = gateway.cache.apply(change.account_id, change.balance_after, change.seq).await {
                        // Stale-low at worst (the account is closed, or got money): the next load mends it.
                        tracing::warn!(%error, "could not update the cache after a lifecycle event");
                    }
                }
                tracing::info!(
                    kind = record.kind.name(), psn_no = %crate::domain::mask_psn_no(&record.psn_no),
                    amount = %record.amount, interest = %record.interest, "account lifecycle event"
                );
                Ok(record)
            }
            Ok(WriteOutcome::LifecycleExists(existing)) if existing.fingerprint == fingerprint => Ok(existing),
            Ok(WriteOutcome::LifecycleExists(_)) => {
                Err(Failure::new(Reason::RequestIdReused, "request_id was used before for a different request"))
            }
            Ok(other) => unreachable!("a lifecycle write answered {other:?}"),
            Err(decline) => Err(crate::settle::reserve::decline_failure(decline)),
        }
    });
    task.await.map_err(|_| Failure::new(Reason::Internal, "lifecycle task failed"))?
}
