//! The settlement path (DESIGN §2), one function owning the control flow:
//!
//! idempotency → payer and policy checks → plan (pure) → authenticate → reserve → commit → receipt
//!
//! The section from reserve to finalize runs in a spawned task (`reserve::run`) that the caller
//! awaits, so a client that cancels or whose deadline passes cannot leave it half done.

pub mod authenticate;
pub mod commit;
pub mod refund;
pub mod reserve;
pub mod sweeper;

use crate::domain::plan::{self, Insufficient};
use crate::domain::{
    mask_psn_no, AccountStatus, CardStatus, Category, Channel, InsuranceStatus, Money, PayMode, SettlementStatus,
};
use crate::error::{Failure, Outcome, Reason};
use crate::gateway::{digest, ClaimGuard, Gateway, RequestClaim};
use crate::ledger::{
    AccountRecord, DebitRecord, InstitutionRecord, NewSettlement, PayerContext, SettlementKey, SettlementRecord,
};
use crate::pin::Secret;
use chrono::NaiveDate;
use std::sync::Arc;

/// A settlement request, parsed and validated for form by the rpc layer.
#[derive(Debug, Clone)]
pub struct SettleCommand {
    pub request_id: String,
    pub psn_no: String,
    pub amount: Money,
    pub channel: Channel,
    pub category: Category,
    pub mode: PayMode,
    pub self_only: bool,
    pub pin: Option<Secret>,
    pub mdtrt_id: String,
    pub ec_token: String,
    pub beneficiary_psn_no: String,
}

impl SettleCommand {
    /// What a replay must repeat exactly. The PIN is not part of it: it is never stored.
    pub fn fingerprint(&self) -> String {
        let amount = self.amount.to_string();
        digest(&[
            "settle/v1",
            &self.psn_no,
            &amount,
            self.channel.name(),
            self.category.name(),
            self.mode.name(),
            if self.self_only { "self" } else { "family" },
            &self.mdtrt_id,
            &self.beneficiary_psn_no,
        ])
    }
}

/// A settlement as answered: the record plus what the record does not keep.
#[derive(Debug, Clone)]
pub struct Answer {
    pub record: SettlementRecord,
    pub pin_required: bool,
}

/// An account the payment may draw on, in deduction order.
#[derive(Debug, Clone)]
pub struct Source {
    pub owner_psn_no: String,
    pub family: bool,
    pub account: AccountRecord,
}

/// PreSettle: the plan and whether a PIN is needed, without side effects.
pub async fn pre_settle(
    gateway: &Arc<Gateway>,
    institution: &InstitutionRecord,
    command: SettleCommand,
) -> Outcome<Answer> {
    run(gateway, institution, command, true).await
}

/// Settle: pay, durably, exactly once per request id.
pub async fn settle(
    gateway: &Arc<Gateway>,
    institution: &InstitutionRecord,
    command: SettleCommand,
) -> Outcome<Answer> {
    run(gateway, institution, command, false).await
}

/// The answer to a request id that was seen before.
pub fn replay(existing: SettlementRecord, fingerprint: &str) -> Outcome<Answer> {
    if existing.tombstone || existing.status == SettlementStatus::Reversed {
        return Err(Failure::new(Reason::OriginalReversed, "this request was reversed (冲正) and cannot be settled"));
    }
    if existing.fingerprint != fingerprint {
        return Err(Failure::new(Reason::RequestIdReused, "request_id was used before for a different request"));
    }
    let pin_required = existing.auth_method == Some(crate::domain::AuthMethod::Pin);
    Ok(Answer { record: existing, pin_required })
}

/// How many remembered answers unknown to the ledger one request forgets before it goes on
/// unclaimed.
const STALE_ANSWERS_MAX: u32 = 3;

async fn run(
    gateway: &Arc<Gateway>,
    institution: &InstitutionRecord,
    command: SettleCommand,
    dry_run: bool,
) -> Outcome<Answer> {
    let fingerprint = command.fingerprint();
    if dry_run {
        return attempt(gateway, institution, command, &fingerprint, true, &mut None, None).await;
    }
    let _admitted = gateway.admit()?;
    // One attempt at a time per request id: a duplicate of one in flight waits for it here. The
    // payer's context is read meanwhile (reading it has no effect; a replay discards it).
    let (claim, context) =
        tokio::join!(gateway.claim_request(&institution.code, &command.request_id), payer_context(gateway, &command));
    let mut context = Some(context);
    let (mut claim, mut stale_answers) = (claim?, 0);
    let mut claim = loop {
        match claim {
            RequestClaim::Attempt(claim) => {
                if claim.waited() || stale_answers > 0 {
                    context = None; // read before another attempt finished: read it again
                }
                break Some(claim);
            }
            // The fast path: a replay the cache remembers is answered from the ledger's record.
            RequestClaim::Answered(setl_id, unclaimed) => {
                match gateway.ledger.settlement(SettlementKey::SetlId(setl_id.clone())).await? {
                    Some(existing) => return replay(existing, &fingerprint),
                    // Remembered, but unknown to the ledger (a ledger reset under a shared cache):
                    // forget that answer and claim the request again, so that duplicates still
                    // wait for one attempt. (An answer that comes back stale again and again:
                    // attempt unclaimed; the ledger's unique key still settles it once.)
                    None if stale_answers < STALE_ANSWERS_MAX => {
                        tracing::warn!(
                            institution = %institution.code,
                            request_id = %command.request_id,
                            %setl_id,
                            "the cache remembered a settlement the ledger does not know"
                        );
                        stale_answers += 1;
                        gateway.cache.forget_answer(&institution.code, &command.request_id, &setl_id).await?;
                        claim = gateway.claim_request(&institution.code, &command.request_id).await?;
                    }
                    None => break Some(unclaimed),
                }
            }
        }
    };
    let key =
        SettlementKey::Request { institution_code: institution.code.clone(), request_id: command.request_id.clone() };
    let outcome = attempt(gateway, institution, command, &fingerprint, false, &mut claim, context).await;
    // Still here if the attempt ended before its critical section (which ends the claim itself).
    if let Some(claim) = claim {
        gateway.background.spawn(claim.end(None));
    }
    match outcome {
        Ok(answer) => Ok(answer),
        // A decline may answer a retry of a request the cache forgot: the ledger decides. (A new
        // request that commits is checked by the ledger's unique key inside the commit.)
        Err(failure) if !matches!(failure.reason, Reason::BackendUnavailable | Reason::Internal) => {
            match gateway.ledger.settlement(key).await? {
                Some(existing) => replay(existing, &fingerprint),
                None => Err(failure),
            }
        }
        Err(failure) => Err(failure),
    }
}

async fn attempt(
    gateway: &Arc<Gateway>,
    institution: &InstitutionRecord,
    command: SettleCommand,
    fingerprint: &str,
    dry_run: bool,
    claim: &mut Option<ClaimGuard>,
    context: Option<(NaiveDate, Outcome<Option<PayerContext>>)>,
) -> Outcome<Answer> {
    let (today, context) = match context {
        Some(read) => read,
        None => payer_context(gateway, &command).await,
    };
    let context = context?.ok_or_else(|| {
        Failure::new(Reason::UnknownPerson, format!("person {} is not known", mask_psn_no(&command.psn_no)))
    })?;
    let policy = gateway.policy(&context.person.region)?.clone();

    // Scope: channel and category per institution kind (001 §11, DESIGN §1 Paying 8).
    let rules = policy.kind_rules(institution.kind);
    if !rules.channels.contains(&command.channel) {
        return Err(Failure::new(
            Reason::ChannelNotAllowed,
            format!("channel {} is not allowed for a {}", command.channel, institution.kind),
        ));
    }
    if !rules.categories.contains(&command.category)
        || (command.channel == Channel::Registration && command.category != Category::Registration)
    {
        return Err(Failure::new(
            Reason::CategoryNotAllowed,
            format!(
                "category {} is not allowed for a {} on channel {}",
                command.category, institution.kind, command.channel
            ),
        ));
    }
    if command.channel == Channel::Card && context.person.card_status == CardStatus::Lost {
        return Err(Failure::new(Reason::CardLost, "the card is reported lost; pay with the e-voucher"));
    }
    if command.channel == Channel::EVoucher && command.ec_token.is_empty() {
        return Err(Failure::invalid("ec_token", "is required on the e-voucher channel"));
    }

    let premium = command.category == Category::Premium;
    if !premium && !command.beneficiary_psn_no.is_empty() {
        return Err(Failure::invalid("beneficiary_psn_no", "is only for CATEGORY_PREMIUM"));
    }
    if premium && !command.beneficiary_psn_no.is_empty() && command.beneficiary_psn_no != command.psn_no {
        check_premium_beneficiary(gateway, &command, today).await?;
    }

    let sources = sources(&context, &command, &policy, today)?;
    // Premiums are all or nothing (002 Q6), whatever mode was asked for.
    let mode = if premium { PayMode::FullOnly } else { command.mode };
    // A channel exempt from the PIN for the whole amount is exempt for whatever the accounts give
    // (`decide` only ever narrows an exemption as the draw grows): such a partial payment is not
    // planned against the cache first. Its holds, taken in deduction order, are the plan (each
    // account gives what it has, up to what is still owed, the rest is cash), one cache trip per
    // account fewer. Everything else is planned first: the PIN decision depends on what the
    // accounts give, and a full-only payment they cannot cover is refused without holding
    // anything that other payments would meanwhile find missing.
    let exempt = authenticate::decide(&policy, command.channel, command.amount, None, Money::ZERO, false);
    let unplanned = !dry_run && mode == PayMode::Partial && exempt.method == crate::domain::AuthMethod::ChannelExempt;
    let (draw_max, decision) = if unplanned {
        (command.amount, exempt)
    } else {
        let available = available(gateway, &sources).await?;
        let plan = plan::plan(command.amount, mode, &available).map_err(|Insufficient { .. }| {
            Failure::new(Reason::InsufficientBalance, "the accounts cannot cover this full-only payment")
        })?;
        let decision = authenticate::decide(
            &policy,
            command.channel,
            plan.total,
            context.person.no_pin_tier.as_deref(),
            // Not read only for a payment exempt everywhere, which `decide` answers before the tier.
            context.no_pin_used_today.unwrap_or(Money::ZERO),
            command.pin.is_some(),
        );
        if dry_run {
            let now = gateway.clock.now();
            return Ok(planned_answer(institution, &command, &sources, &plan, decision, &context, now));
        }
        (plan.total, decision)
    };
    let now = gateway.clock.now();
    match (&command.pin, decision.pin_required) {
        (Some(pin), _) if decision.method == crate::domain::AuthMethod::Pin => {
            authenticate::verify_pin(gateway, &policy, &command.psn_no, pin).await?
        }
        (None, true) => return Err(Failure::new(Reason::PinRequired, "this payment needs the payer's PIN")),
        _ => {}
    }

    let new = NewSettlement {
        setl_id: String::new(), // each attempt of the critical section takes a fresh one
        institution_code: institution.code.clone(),
        request_id: command.request_id.clone(),
        fingerprint: fingerprint.to_string(),
        psn_no: command.psn_no.clone(),
        amount: command.amount,
        channel: command.channel,
        category: command.category,
        auth_method: decision.method,
        mdtrt_id: command.mdtrt_id.clone(),
        beneficiary_psn_no: command.beneficiary_psn_no.clone(),
        debits: Vec::new(),
        own_account: context.person.account.as_ref().map(|a| a.id),
        no_pin_daily_max: decision.no_pin_daily_max,
        hold_deadline_ms: None,
        business_date: today,
        at: now,
    };
    // The critical section runs to completion even if this future is dropped, and holds the
    // request's claim until the outcome is known (then remembers the answer for replays).
    let claim = claim.take();
    let limit_ms = claim.as_ref().and_then(ClaimGuard::hold_deadline_limit_ms);
    // A planned payment's balances reached the cache while it was planned (`available`).
    let critical = reserve::run(gateway.clone(), new, sources, draw_max, mode, limit_ms, unplanned);
    let after = gateway.clone();
    let task = gateway.background.spawn(async move {
        let (outcome, unsettled) = critical.await;
        let answer = outcome.as_ref().ok().map(|record| record.setl_id.clone());
        // Off the answer's path: an unknown commit's fate is found out (its holds settled) before
        // the claim ends, so a retry neither reserves beside holds that may still commit nor
        // misses the answer.
        after.background.spawn({
            let gateway = after.clone();
            async move {
                let answer = match unsettled {
                    None => answer,
                    Some(unsettled) => match reserve::settle_unknown(&gateway, &unsettled).await {
                        Some(true) => Some(unsettled.setl_id),
                        _ => None,
                    },
                };
                if let Some(claim) = claim {
                    claim.end(answer.as_deref()).await;
                }
            }
        });
        outcome
    });
    let record = match task.await {
        Ok(outcome) => outcome?,
        Err(join_error) => {
            tracing::error!(%join_error, "settlement task failed");
            return Err(Failure::new(Reason::Internal, "settlement task failed"));
        }
    };
    replay(record, fingerprint).map(|answer| Answer { pin_required: decision.pin_required, ..answer })
}

/// Today, and the payer's context as of today from the ledger.
async fn payer_context(gateway: &Gateway, command: &SettleCommand) -> (NaiveDate, Outcome<Option<PayerContext>>) {
    let today = gateway.clock.today();
    // A payment no region asks a PIN for never looks at the no-PIN tier: it skips summing the
    // payer's no-PIN payments of the day.
    let no_pin_day = (!gateway.policies.exempt_everywhere(command.channel, command.amount)).then_some(today);
    (today, gateway.ledger.payer_context(&command.psn_no, no_pin_day).await.map_err(Failure::from))
}

/// A premium for somebody else: only for a family member the payer registered (002 Q6).
async fn check_premium_beneficiary(
    gateway: &Gateway,
    command: &SettleCommand,
    today: chrono::NaiveDate,
) -> Outcome<()> {
    let family = gateway.ledger.family(&command.psn_no, today).await?;
    let registered = family
        .members
        .iter()
        .any(|link| link.member_psn_no == command.beneficiary_psn_no && link.effective_from <= today);
    if registered {
        Ok(())
    } else {
        Err(Failure::new(Reason::NotRegisteredFamily, "the beneficiary is not a registered family member of the payer"))
    }
}

/// The accounts this payment may draw on, own first, then family in the payer's order.
fn sources(
    context: &PayerContext,
    command: &SettleCommand,
    policy: &crate::domain::policy::RegionPolicy,
    today: chrono::NaiveDate,
) -> Outcome<Vec<Source>> {
    let person = &context.person;
    if person.status == InsuranceStatus::Terminated {
        return Err(Failure::new(
            Reason::PersonTerminated,
            "the payer's insurance is terminated; the account no longer pays (its balance is liquidated)",
        ));
    }
    let mut sources = Vec::new();
    if let Some(account) = &person.account {
        match account.status {
            AccountStatus::Open => {
                sources.push(Source { owner_psn_no: person.psn_no.clone(), family: false, account: account.clone() })
            }
            AccountStatus::Frozen => return Err(Failure::new(Reason::AccountFrozen, "the payer's account is frozen")),
            AccountStatus::Closed => return Err(Failure::new(Reason::AccountClosed, "the payer's account is closed")),
        }
    }
    // Premiums come from the payer's own account only; REMOVED people no longer draw on family
    // accounts (000 §14, 002 Q14), and nobody draws on a REMOVED or TERMINATED owner's account
    // (the ledger leaves those owners out of the family sources).
    let family_allowed = !command.self_only
        && command.category != Category::Premium
        && matches!(person.status, InsuranceStatus::Active | InsuranceStatus::Suspended)
        && today >= policy.family_start_date;
    if family_allowed {
        for source in &context.family {
            if source.effective_from <= today && source.account.status == AccountStatus::Open {
                sources.push(Source {
                    owner_psn_no: source.owner_psn_no.clone(),
                    family: true,
                    account: source.account.clone(),
                });
            }
        }
    }
    if sources.is_empty() {
        if command.category == Category::Premium || person.account.is_none() && context.family.is_empty() {
            return Err(Failure::new(Reason::NoAccount, "the payer has no personal account to pay from"));
        }
        if person.account.is_none() {
            return Err(Failure::new(
                Reason::NoAccount,
                "the payer has no personal account and no usable family account",
            ));
        }
    }
    Ok(sources)
}

/// What each source has available now. The ledger's balance read with the payer's context is
/// installed on the way (a miss loads the account; a cache behind the ledger catches up), in one
/// cache call per account whether the account was cached or not.
async fn available(gateway: &Gateway, sources: &[Source]) -> Outcome<Vec<Money>> {
    let mut available = Vec::with_capacity(sources.len());
    for source in sources {
        let cached = gateway.cache.load_and_get(source.account.id, source.account.balance, source.account.seq).await?;
        available.push(cached.available());
    }
    Ok(available)
}

fn planned_answer(
    institution: &InstitutionRecord,
    command: &SettleCommand,
    sources: &[Source],
    plan: &plan::Plan,
    decision: authenticate::Decision,
    context: &PayerContext,
    now: chrono::DateTime<chrono::Utc>,
) -> Answer {
    let debits: Vec<DebitRecord> = sources
        .iter()
        .zip(&plan.draws)
        .filter(|(_, draw)| !draw.is_zero())
        .map(|(source, draw)| DebitRecord {
            account_id: source.account.id,
            owner_psn_no: source.owner_psn_no.clone(),
            amount: *draw,
            refunded: Money::ZERO,
            family: source.family,
        })
        .collect();
    let acct_pay = Money::sum(debits.iter().filter(|d| !d.family).map(|d| d.amount));
    let own_balance = context.person.account.as_ref().map(|a| a.balance).unwrap_or(Money::ZERO);
    let record = SettlementRecord {
        setl_id: String::new(),
        institution_code: institution.code.clone(),
        request_id: command.request_id.clone(),
        fingerprint: String::new(),
        psn_no: command.psn_no.clone(),
        status: SettlementStatus::Planned,
        amount: command.amount,
        acct_pay,
        acct_mulaid_pay: plan.total.checked_sub(acct_pay).expect("family within total"),
        psn_cash_pay: plan.cash,
        balc: own_balance.saturating_sub(acct_pay),
        refunded: Money::ZERO,
        channel: Some(command.channel),
        category: Some(command.category),
        auth_method: Some(decision.method),
        mdtrt_id: command.mdtrt_id.clone(),
        beneficiary_psn_no: command.beneficiary_psn_no.clone(),
        settled_at: now,
        debits,
        tombstone: false,
    };
    Answer { record, pin_required: decision.pin_required }
}
