//! Money coming in (DESIGN §1): contributions as recorded, the monthly crediting run, the
//! operators' interest rates and the interest run. No gRPC here.

use crate::domain::credit::{credit_for_month, CreditLine, Period, Skip};
use crate::domain::interest;
use crate::domain::policy::InterestRate;
use crate::domain::{AccountStatus, Money, PersonCategory, SystemAccount, TxnKind};
use crate::error::{Failure, Outcome, Reason};
use crate::gateway::Gateway;
use crate::ledger::{ContributionImport, CreditBatch, CreditPosting, ImportChunk, ImportVerdict, InterestCandidate};
use chrono::NaiveDate;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Accounts read and credited per ledger transaction.
pub const CREDIT_CHUNK: usize = 2_000;

/// Records a month's contribution for a person (replacing what was recorded for that month), with
/// the person's category in that month: given, else what was recorded for that month before, else
/// what the person is now. A back payment is credited by it.
pub async fn record_contribution(
    gateway: &Gateway,
    psn_no: &str,
    period: Period,
    base: Money,
    paid: bool,
    category: Option<PersonCategory>,
) -> Outcome<()> {
    if period > Period::of(gateway.clock.today()) {
        return Err(Failure::invalid("period", format!("{period} is in the future")));
    }
    let row = ContributionImport { line: 1, psn_no: psn_no.to_string(), period, base, paid, category };
    let chunk = ImportChunk {
        rows: vec![row],
        at: gateway.clock.now(),
        business_date: gateway.clock.today(),
        reference: format!("RecordContribution {period}"),
    };
    match gateway.ledger.import_contributions(chunk).await?.pop() {
        Some(ImportVerdict::Applied | ImportVerdict::AlreadyThere) => Ok(()),
        _ => Err(Failure::new(Reason::UnknownPerson, "no such person")),
    }
}

/// What a crediting run did, so far or in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreditReport {
    /// Accounts of the region looked at.
    pub accounts: u64,
    /// Accounts credited for the run's month by this run.
    pub credited: u64,
    /// Accounts whose run month was credited before (a repeated or resumed run).
    pub already_credited: u64,
    /// Accounts not credited for the run's month, by why.
    pub skipped: BTreeMap<Skip, u64>,
    /// Earlier months credited now because they were paid since (补缴).
    pub back_months_credited: u64,
    /// Earlier paid months still not credited, by why (for example before the policy's rules).
    pub back_months_skipped: BTreeMap<Skip, u64>,
    /// Money credited (run month and back months), before the mutual-aid deductions.
    pub credited_total: Money,
    /// Mutual-aid premiums deducted.
    pub mutual_aid_total: Money,
    /// Where to resume: the last person looked at. `None` once the region is done.
    pub resume_after: Option<String>,
}

impl CreditReport {
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    fn add(&mut self, other: &CreditReport) {
        self.accounts += other.accounts;
        self.credited += other.credited;
        self.already_credited += other.already_credited;
        self.back_months_credited += other.back_months_credited;
        for (skip, n) in &other.skipped {
            *self.skipped.entry(*skip).or_default() += n;
        }
        for (skip, n) in &other.back_months_skipped {
            *self.back_months_skipped.entry(*skip).or_default() += n;
        }
        self.credited_total = self.credited_total.checked_add(other.credited_total).expect("total in range");
        self.mutual_aid_total = self.mutual_aid_total.checked_add(other.mutual_aid_total).expect("total in range");
        self.resume_after = other.resume_after.clone();
    }
}

/// How many accounts the next chunk of a run reads: `None` once `max_accounts` are done.
fn next_chunk(max_accounts: Option<u64>, done: u64) -> Option<usize> {
    match max_accounts {
        Some(max) if done >= max => None,
        Some(max) => Some((max - done).min(CREDIT_CHUNK as u64) as usize),
        None => Some(CREDIT_CHUNK),
    }
}

/// Checks a run's month: a month is credited once it is over (by the 5th of the next, 000 §4).
pub fn check_credit_period(period: Period, today: NaiveDate) -> Outcome<()> {
    if period >= Period::of(today) {
        return Err(Failure::invalid(
            "period",
            format!("{period} is not over yet; a month is credited in the following month"),
        ));
    }
    Ok(())
}

/// Credits `region`'s accounts for `period`, and every earlier month paid since (补缴), in chunks
/// of [`CREDIT_CHUNK`] accounts, each chunk one ledger transaction. Starts after the person
/// `resume_after` and stops after `max_accounts` accounts when given (the report says where
/// to resume); `progress` sees the running totals after each chunk. Repeating or resuming a run
/// credits nothing twice: the ledger keeps each (account, month, kind) once.
pub async fn run_monthly_credit(
    gateway: &Arc<Gateway>,
    region: &str,
    period: Period,
    resume_after: Option<String>,
    max_accounts: Option<u64>,
    mut progress: impl FnMut(&CreditReport) + Send,
) -> Outcome<CreditReport> {
    let policy = gateway
        .policies
        .region(region)
        .ok_or_else(|| Failure::invalid("region", format!("{region} has no policy file loaded")))?
        .clone();
    check_credit_period(period, gateway.clock.today())?;
    let reference = format!("credit {region} {period}");
    // Credited money counts for interest from the day it arrives.
    let today = gateway.clock.today();
    let mut report = CreditReport { resume_after: resume_after.clone(), ..CreditReport::default() };
    let mut after = resume_after.unwrap_or_default();
    loop {
        let Some(limit) = next_chunk(max_accounts, report.accounts) else {
            return Ok(report);
        };
        let candidates = gateway.ledger.credit_candidates(region, period, &after, limit).await?;
        let Some(last) = candidates.last() else {
            report.resume_after = None;
            return Ok(report);
        };
        after = last.psn_no.clone();
        let mut chunk =
            CreditReport { accounts: candidates.len() as u64, resume_after: Some(after.clone()), ..Default::default() };
        // Which posting is what, to count it once the ledger says it was applied.
        let mut postings: Vec<CreditPosting> = Vec::new();
        let mut run_month: Vec<bool> = Vec::new();
        for candidate in &candidates {
            let current = candidate.contributions.iter().find(|c| c.period == period);
            if candidate.period_done {
                chunk.already_credited += 1;
            } else {
                match credit_for_month(&policy, &candidate.subject, period, current) {
                    Ok(lines) => {
                        for line in lines {
                            postings.push(CreditPosting {
                                account_id: candidate.account_id,
                                psn_no: candidate.psn_no.clone(),
                                period: period.to_string(),
                                value_date: today,
                                line,
                                interest_seen: None,
                            });
                            run_month.push(true);
                        }
                    }
                    Err(skip) => *chunk.skipped.entry(skip).or_default() += 1,
                }
            }
            for back in candidate.contributions.iter().filter(|c| c.period < period) {
                match credit_for_month(&policy, &candidate.subject, back.period, Some(back)) {
                    Ok(lines) => {
                        for line in lines {
                            postings.push(CreditPosting {
                                account_id: candidate.account_id,
                                psn_no: candidate.psn_no.clone(),
                                period: back.period.to_string(),
                                value_date: today,
                                line,
                                interest_seen: None,
                            });
                            run_month.push(false);
                        }
                    }
                    Err(skip) => *chunk.back_months_skipped.entry(skip).or_default() += 1,
                }
            }
        }
        // Row locks in account order, as the settlement batches take theirs: no deadlock cycle.
        let mut order: Vec<usize> = (0..postings.len()).collect();
        order.sort_by_key(|&i| postings[i].account_id);
        let postings: Vec<CreditPosting> = order.iter().map(|&i| postings[i].clone()).collect();
        let run_month: Vec<bool> = order.iter().map(|&i| run_month[i]).collect();
        if !postings.is_empty() {
            let batch = CreditBatch {
                postings: postings.clone(),
                reference: reference.clone(),
                business_date: gateway.clock.today(),
                at: gateway.clock.now(),
            };
            let applied = gateway.ledger.apply_credits(batch).await?;
            for ((posting, applied), run_month) in postings.iter().zip(&applied.applied).zip(&run_month) {
                let amount = posting.line.amount;
                match (posting.line.kind, *applied, *run_month) {
                    (TxnKind::MutualAid, true, _) => {
                        chunk.mutual_aid_total = chunk.mutual_aid_total.checked_add(amount).expect("in range")
                    }
                    (TxnKind::MutualAid, false, _) => {}
                    (_, true, run_month) => {
                        if run_month {
                            chunk.credited += 1;
                        } else {
                            chunk.back_months_credited += 1;
                        }
                        chunk.credited_total = chunk.credited_total.checked_add(amount).expect("in range");
                    }
                    // Credited meanwhile by another run, or the account closed meanwhile.
                    (_, false, true) => chunk.already_credited += 1,
                    (_, false, false) => {}
                }
            }
            apply_to_cache(gateway, &applied.changes).await;
        }
        report.add(&chunk);
        progress(&report);
    }
}

/// Credits reach the cache only after the ledger committed them. A cache that cannot take them
/// now is stale-low, never high: a warning, not a failure of the committed run.
async fn apply_to_cache(gateway: &Arc<Gateway>, changes: &[crate::ledger::BalanceChange]) {
    let mut tasks = tokio::task::JoinSet::new();
    for change in changes.chunks(256) {
        let (gateway, change) = (gateway.clone(), change.to_vec());
        tasks.spawn(async move {
            for c in change {
                gateway.cache.apply(c.account_id, c.balance_after, c.seq).await?;
            }
            Ok::<(), crate::cache::CacheUnavailable>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(error)) = done {
            tracing::warn!(%error, "credited balances did not all reach the cache");
        }
    }
}

/// Adds a rate in force from `effective_from` for `region` (SetInterestRate). The same rate
/// again is a no-op; another rate for a date that has one (in the policy file or entered
/// before) is refused.
pub async fn set_interest_rate(
    gateway: &Gateway,
    region: &str,
    effective_from: NaiveDate,
    annual_rate_percent: Decimal,
) -> Outcome<()> {
    let policy = gateway
        .policies
        .region(region)
        .ok_or_else(|| Failure::invalid("region", format!("{region} has no policy file loaded")))?;
    if annual_rate_percent.is_sign_negative() || annual_rate_percent > Decimal::ONE_HUNDRED {
        return Err(Failure::invalid("annual_rate_percent", "must be a percentage within 0..=100"));
    }
    if annual_rate_percent.scale() > 6 {
        return Err(Failure::invalid("annual_rate_percent", "has more than 6 decimals"));
    }
    let rate = InterestRate { effective_from, annual_rate_percent: annual_rate_percent.normalize() };
    if let Some(file) = policy.interest.rates.iter().find(|r| r.effective_from == effective_from) {
        return same_rate(file, &rate, "the policy file");
    }
    match gateway.ledger.insert_interest_rate(region, rate, gateway.clock.now()).await? {
        Ok(()) => Ok(()),
        Err(stored) => same_rate(&stored, &rate, "an operator"),
    }
}

fn same_rate(stored: &InterestRate, wanted: &InterestRate, by: &str) -> Outcome<()> {
    if stored.annual_rate_percent == wanted.annual_rate_percent {
        return Ok(());
    }
    Err(Failure::new(
        Reason::AlreadyExists,
        format!(
            "a rate of {}% is in force from {} (set by {by}); a rate period cannot be overwritten",
            stored.annual_rate_percent, stored.effective_from
        ),
    ))
}

/// The region's rate table: the policy file's rows and the operators', in date order (an
/// operator's row for a date the file has is refused when entered, so none collide).
pub async fn interest_rates(gateway: &Gateway, region: &str) -> Outcome<Vec<InterestRate>> {
    let policy = gateway.policy(region)?;
    let mut rates = policy.interest.rates.clone();
    rates.extend(gateway.ledger.interest_rates(region).await?);
    rates.sort_by_key(|r| r.effective_from);
    Ok(rates)
}

/// What an interest run did, so far or in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterestReport {
    /// Accounts of the region looked at.
    pub accounts: u64,
    /// Accounts paid interest for the period by this run.
    pub credited: u64,
    /// Accounts whose period was settled before (a repeated run).
    pub already_settled: u64,
    /// Closed accounts (their interest was settled when they closed).
    pub closed: u64,
    /// Accounts whose interest rounds to 0.00.
    pub nothing_due: u64,
    pub total: Money,
    /// Where to resume: the last person looked at. `None` once the region is done.
    pub resume_after: Option<String>,
}

/// The interest period ending `as_of` for `region`, and each of its days' rate weights.
pub struct InterestPeriod {
    pub start: NaiveDate,
    pub end: NaiveDate,
    weights: Vec<Decimal>,
}

impl InterestPeriod {
    /// Interest on `candidate` for this period (from the day after an earlier settlement within
    /// it, if any); `None` when it was settled through the period's end already.
    pub fn interest_for(&self, candidate: &InterestCandidate) -> Option<Money> {
        let from = match candidate.settled_through {
            Some(through) if through >= self.end => return None,
            Some(through) if through >= self.start => through.succ_opt().expect("date in range"),
            _ => self.start,
        };
        let amounts: Vec<(NaiveDate, Money)> =
            candidate.amounts.iter().map(|&(day, amount)| (day.max(from), amount)).collect();
        Some(interest::interest(&amounts, &self.weights, self.start))
    }
}

/// The period `start..=end` with the region's rates (the file's and the operators').
pub async fn interest_period(
    gateway: &Gateway,
    region: &str,
    start: NaiveDate,
    end: NaiveDate,
) -> Outcome<InterestPeriod> {
    let policy = gateway.policy(region)?;
    let rates = interest_rates(gateway, region).await?;
    let weights = interest::day_weights(&rates, policy.interest.rate_applies, start, end).map_err(|message| {
        Failure::invalid("as_of", format!("region {region}: {message}; enter the rate with SetInterestRate"))
    })?;
    Ok(InterestPeriod { start, end, weights })
}

/// Pays `region`'s accounts the interest of the period that ends on `as_of` (a settlement date of
/// the region's policy, already over), in chunks like [`run_monthly_credit`]. Each account's
/// period is paid once, with value date `as_of`; a repeated run pays nothing.
pub async fn accrue_interest(
    gateway: &Arc<Gateway>,
    region: &str,
    as_of: NaiveDate,
    resume_after: Option<String>,
    max_accounts: Option<u64>,
    mut progress: impl FnMut(&InterestReport) + Send,
) -> Outcome<InterestReport> {
    let policy = gateway
        .policies
        .region(region)
        .ok_or_else(|| Failure::invalid("region", format!("{region} has no policy file loaded")))?
        .clone();
    let today = gateway.clock.today();
    if as_of >= today {
        return Err(Failure::invalid(
            "as_of",
            format!("{as_of} is not over yet; interest is paid once the day is over"),
        ));
    }
    let (start, end) = interest::period_ending(policy.interest.settlement, as_of)
        .map_err(|message| Failure::invalid("as_of", format!("{message} (region {region})")))?;
    let period = interest_period(gateway, region, start, end).await?;
    let reference = format!("interest {region} {as_of}");
    let mut report = InterestReport { resume_after: resume_after.clone(), ..InterestReport::default() };
    let mut after = resume_after.unwrap_or_default();
    loop {
        let Some(limit) = next_chunk(max_accounts, report.accounts) else {
            return Ok(report);
        };
        let candidates = gateway.ledger.interest_candidates(region, start, end, &after, limit, None).await?;
        let Some(last) = candidates.last() else {
            report.resume_after = None;
            return Ok(report);
        };
        after = last.psn_no.clone();
        report.accounts += candidates.len() as u64;
        report.resume_after = Some(after.clone());
        let mut postings = Vec::new();
        for candidate in &candidates {
            if candidate.account_status == AccountStatus::Closed {
                report.closed += 1;
                continue;
            }
            match period.interest_for(candidate) {
                None => report.already_settled += 1,
                Some(amount) if amount.is_zero() => report.nothing_due += 1,
                Some(amount) => postings.push(interest_posting(candidate, end, amount)),
            }
        }
        postings.sort_by_key(|p| p.account_id);
        if !postings.is_empty() {
            let batch = CreditBatch {
                postings: postings.clone(),
                reference: reference.clone(),
                business_date: today,
                at: gateway.clock.now(),
            };
            let applied = gateway.ledger.apply_credits(batch).await?;
            for (posting, applied) in postings.iter().zip(&applied.applied) {
                if *applied {
                    report.credited += 1;
                    report.total = report.total.checked_add(posting.line.amount).expect("in range");
                } else {
                    report.already_settled += 1;
                }
            }
            apply_to_cache(gateway, &applied.changes).await;
        }
        progress(&report);
    }
}

/// Interest for an account through `through`, paid with that value date, once.
pub fn interest_posting(candidate: &InterestCandidate, through: NaiveDate, amount: Money) -> CreditPosting {
    CreditPosting {
        account_id: candidate.account_id,
        psn_no: candidate.psn_no.clone(),
        period: through.to_string(),
        value_date: through,
        line: CreditLine { kind: TxnKind::Interest, amount, counterpart: SystemAccount::InterestExpense },
        interest_seen: Some(candidate.settled_through.map(|day| day.to_string()).unwrap_or_default()),
    }
}
