//! Operator work (AdminService): people, institutions, API keys, audited adjustments, PIN resets,
//! freezing. No gRPC here.

use crate::cache::memory::unix_ms;
use crate::cache::Reserve;
use crate::domain::{AccountStatus, InstitutionKind, Money, Role};
use crate::error::{Failure, Outcome, Reason};
use crate::gateway::{digest, Gateway};
use crate::ledger::{
    AdjustmentRecord, InstitutionRecord, LedgerWrite, NewAdjustment, NewApiKey, PersonRecord, PersonUpsert,
    WriteOutcome,
};
use argon2::password_hash::rand_core::{OsRng, RngCore};
use chrono::NaiveDate;
use std::sync::Arc;
use std::time::Duration;

/// A new bearer key: `yb_` and 160 random bits in hex. Only its SHA-256 is stored; a key has
/// enough entropy that a slow hash adds nothing.
pub fn new_api_key() -> String {
    let mut bytes = [0u8; 20];
    OsRng.fill_bytes(&mut bytes);
    format!("yb_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

pub fn hash_api_key(key: &str) -> String {
    digest(&["api-key/v1", key])
}

pub async fn upsert_person(gateway: &Gateway, person: PersonUpsert) -> Outcome<PersonRecord> {
    let policy = gateway
        .policies
        .region(&person.region)
        .ok_or_else(|| Failure::invalid("region", format!("{} has no policy file loaded", person.region)))?;
    if person.birth_date > gateway.clock.today() {
        return Err(Failure::invalid("birth_date", "is in the future"));
    }
    let open_account = policy.has_account(person.category);
    Ok(gateway.ledger.upsert_person(person, open_account, gateway.clock.now()).await?)
}

pub async fn register_institution(
    gateway: &Gateway,
    code: &str,
    name: &str,
    kind: InstitutionKind,
    region: &str,
) -> Outcome<String> {
    if gateway.policies.region(region).is_none() {
        return Err(Failure::invalid("region", format!("{region} has no policy file loaded")));
    }
    let api_key = new_api_key();
    let key = NewApiKey {
        key_hash: hash_api_key(&api_key),
        key_id: gateway.new_id('K'),
        role: Role::Institution,
        institution_code: Some(code.to_string()),
        label: name.to_string(),
        at: gateway.clock.now(),
    };
    let institution =
        InstitutionRecord { code: code.to_string(), name: name.to_string(), kind, region: region.to_string() };
    gateway
        .ledger
        .register_institution(institution, key)
        .await?
        .map_err(|_| Failure::new(Reason::AlreadyExists, format!("institution {code} is already registered")))?;
    Ok(api_key)
}

pub async fn issue_api_key(gateway: &Gateway, role: Role, label: &str) -> Outcome<(String, String)> {
    if role == Role::Institution {
        return Err(Failure::invalid("role", "institution keys come from RegisterInstitution"));
    }
    let api_key = new_api_key();
    let key_id = gateway.new_id('K');
    gateway
        .ledger
        .insert_api_key(NewApiKey {
            key_hash: hash_api_key(&api_key),
            key_id: key_id.clone(),
            role,
            institution_code: None,
            label: label.to_string(),
            at: gateway.clock.now(),
        })
        .await?;
    Ok((key_id, api_key))
}

#[derive(Debug, Clone)]
pub struct AdjustCommand {
    pub request_id: String,
    pub psn_no: String,
    pub amount: Money,
    pub credit: bool,
    pub reason: String,
    pub value_date: Option<NaiveDate>,
}

/// An audited manual correction. A debit takes a hold first, like a payment, so the cache never
/// overstates; the ledger's own check refuses a negative balance.
pub async fn adjust(gateway: &Arc<Gateway>, command: AdjustCommand) -> Outcome<AdjustmentRecord> {
    let _admitted = gateway.admit()?;
    let today = gateway.clock.today();
    let value_date = command.value_date.unwrap_or(today);
    if value_date > today {
        return Err(Failure::invalid("value_date", "is in the future"));
    }
    // The value date as sent (none: empty), so a retry after midnight is still the same request.
    let sent_value_date = command.value_date.map(|day| day.to_string()).unwrap_or_default();
    let person = gateway.person(&command.psn_no).await?;
    let account =
        person.account.ok_or_else(|| Failure::new(Reason::NoAccount, "this person has no personal account"))?;
    let amount = command.amount.to_string();
    let fingerprint = digest(&[
        "adjust/v1",
        &command.psn_no,
        &amount,
        if command.credit { "credit" } else { "debit" },
        &command.reason,
        &sent_value_date,
    ]);
    let delta = if command.credit { command.amount } else { command.amount.negated() };
    let debit = delta.is_negative();
    // A fresh hold id per attempt: a retried or concurrent duplicate never shares (and so never
    // releases) another attempt's hold; the ledger records it so the sweeper can resolve it.
    let hold_id = gateway.new_id('A');
    let new = NewAdjustment {
        request_id: command.request_id.clone(),
        hold_id: hold_id.clone(),
        hold_deadline_ms: debit.then(|| unix_ms() + gateway.settings.hold_lease_ms),
        fingerprint: fingerprint.clone(),
        psn_no: command.psn_no.clone(),
        account_id: account.id,
        delta,
        reason: command.reason.clone(),
        value_date,
        business_date: today,
        at: gateway.clock.now(),
    };
    let gateway = gateway.clone();
    let task = tokio::spawn(async move {
        if debit {
            if gateway.cache.get(account.id).await?.is_none() {
                gateway.cache.load(account.id, account.balance, account.seq).await?;
            }
            let want = new.delta.negated();
            let held = match gateway.cache.reserve(account.id, &hold_id, want, gateway.settings.hold_lease_ms).await? {
                Reserve::Held(held) => held,
                Reserve::NotLoaded => Money::ZERO,
            };
            if held != want {
                gateway.cache.release_hold(account.id, &hold_id).await?;
                return Err(Failure::new(Reason::InsufficientBalance, "the account cannot cover this debit"));
            }
        }
        let timeout = Duration::from_millis(gateway.settings.commit_timeout_ms);
        // On a timeout or an unknown outcome the hold stays for the sweeper.
        let result = tokio::time::timeout(timeout, gateway.committer.commit(LedgerWrite::Adjust(new)))
            .await
            .map_err(|_| Failure::new(Reason::BackendUnavailable, "the ledger did not answer in time"))??;
        let finalized = match &result {
            Ok(WriteOutcome::Adjusted { changes, .. }) => {
                let mut finalized = Ok(());
                for change in changes {
                    finalized = if debit {
                        gateway.cache.commit_hold(change.account_id, &hold_id, change.balance_after, change.seq).await
                    } else {
                        gateway.cache.apply(change.account_id, change.balance_after, change.seq).await
                    };
                }
                finalized
            }
            _ if debit => gateway.cache.release_hold(account.id, &hold_id).await,
            _ => Ok(()),
        };
        if let Err(error) = finalized {
            // Committed or not, the answer stands; the sweeper or the next load mends the cache.
            tracing::warn!(%error, "could not finalize an adjustment's hold");
        }
        match result {
            Ok(WriteOutcome::Adjusted { record, .. }) => Ok(record),
            Ok(WriteOutcome::AdjustmentExists(existing)) if existing.fingerprint == fingerprint => Ok(existing),
            Ok(WriteOutcome::AdjustmentExists(_)) => {
                Err(Failure::new(Reason::RequestIdReused, "request_id was used before for a different adjustment"))
            }
            Ok(other) => unreachable!("an adjustment answered {other:?}"),
            Err(decline) => Err(crate::settle::reserve::decline_failure(decline)),
        }
    });
    task.await.map_err(|_| Failure::new(Reason::Internal, "adjustment task failed"))?
}

pub async fn set_account_status(gateway: &Gateway, psn_no: &str, status: AccountStatus) -> Outcome<PersonRecord> {
    let person = gateway.person(psn_no).await?;
    match &person.account {
        None => return Err(Failure::new(Reason::NoAccount, "this person has no personal account")),
        Some(account) if account.status == AccountStatus::Closed => {
            return Err(Failure::new(Reason::AccountClosed, "the account is closed"))
        }
        Some(_) => {}
    }
    gateway.ledger.set_account_status(psn_no, status).await?;
    gateway.person(psn_no).await
}
