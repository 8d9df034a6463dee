//! Account self-service (AccountService): balance, entries, PINs, the no-PIN tier, card loss and
//! family registration (000 §9–§13, §17; 002 Q8–Q13). No gRPC here.

use crate::domain::family::{link_refusal, LinkRefusal, Party};
use crate::domain::{mask_psn_no, CardStatus, Money, Relation};
use crate::error::{Failure, Outcome, Reason};
use crate::gateway::Gateway;
use crate::ledger::{EntryQuery, EntryRecord, FamilyLinkRecord, FamilyView, NewFamilyLink, PersonRecord};
use crate::pin::{self, Secret};
use chrono::NaiveDate;

/// Entries per page by default, and at most.
pub const ENTRIES_PAGE_DEFAULT: usize = 50;
pub const ENTRIES_PAGE_MAX: usize = 500;

#[derive(Debug, Clone)]
pub struct BalanceView {
    pub person: PersonRecord,
    pub available: Money,
}

pub async fn balance(gateway: &Gateway, psn_no: &str) -> Outcome<BalanceView> {
    let person = gateway.person(psn_no).await?;
    let available = match &person.account {
        Some(account) => {
            let cached = gateway.cache.get(account.id).await?;
            match cached {
                // Never more than the ledger says, whatever the cache holds.
                Some(cached) => account.balance.saturating_sub(cached.held).min(cached.available()),
                None => account.balance,
            }
        }
        None => Money::ZERO,
    };
    Ok(BalanceView { person, available })
}

pub async fn entries(
    gateway: &Gateway,
    psn_no: &str,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    page_size: usize,
    before_entry: Option<i64>,
) -> Outcome<(Vec<EntryRecord>, Option<i64>)> {
    let person = gateway.person(psn_no).await?;
    let account =
        person.account.ok_or_else(|| Failure::new(Reason::NoAccount, "this person has no personal account"))?;
    let limit = if page_size == 0 { ENTRIES_PAGE_DEFAULT } else { page_size.min(ENTRIES_PAGE_MAX) };
    // One more than asked tells whether another page exists.
    let mut rows =
        gateway.ledger.entries(EntryQuery { account_id: account.id, from, to, before_entry, limit: limit + 1 }).await?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|row| row.entry_id)
    } else {
        None
    };
    Ok((rows, next))
}

async fn checked_new_pin(gateway: &Gateway, person: &PersonRecord, new_pin: &Secret) -> Outcome<String> {
    let policy = gateway.policy(&person.region)?;
    if !pin::is_well_formed(new_pin.expose(), policy.pin_length) {
        return Err(Failure::invalid("new_pin", format!("must be {} digits", policy.pin_length)));
    }
    if policy.is_weak_pin(new_pin.expose()) {
        return Err(
            Failure::new(Reason::PinTooWeak, "this PIN is too easy to guess; choose another").with_field("new_pin")
        );
    }
    gateway.pins.hash(new_pin).await.map_err(|error| {
        tracing::error!(%error, "PIN hashing failed");
        Failure::new(Reason::Internal, "PIN hashing failed")
    })
}

pub async fn set_pin(gateway: &Gateway, psn_no: &str, new_pin: &Secret) -> Outcome<()> {
    let person = gateway.person(psn_no).await?;
    if person.pin_set {
        return Err(Failure::new(Reason::AlreadyExists, "a PIN is already set; use ChangePin"));
    }
    let phc = checked_new_pin(gateway, &person, new_pin).await?;
    if !gateway.ledger.store_pin(psn_no, &phc, true).await? {
        return Err(Failure::new(Reason::AlreadyExists, "a PIN is already set; use ChangePin"));
    }
    Ok(())
}

/// Verifies the current PIN with the same durable lockout as payments.
pub async fn check_pin(gateway: &Gateway, person: &PersonRecord, pin: &Secret, field: &str) -> Outcome<()> {
    if pin.is_empty() {
        return Err(Failure::invalid(field, "is required"));
    }
    let policy = gateway.policy(&person.region)?.clone();
    crate::settle::authenticate::verify_pin(gateway, &policy, &person.psn_no, pin).await.map_err(|mut failure| {
        if failure.field.is_some() {
            failure.field = Some(field.to_string());
            failure.message = format!("{field}: must be {} digits", policy.pin_length);
        }
        failure
    })
}

pub async fn change_pin(gateway: &Gateway, psn_no: &str, current: &Secret, new_pin: &Secret) -> Outcome<()> {
    let person = gateway.person(psn_no).await?;
    check_pin(gateway, &person, current, "current_pin").await?;
    let phc = checked_new_pin(gateway, &person, new_pin).await?;
    gateway.ledger.store_pin(psn_no, &phc, false).await?;
    Ok(())
}

/// Operator reset (no current PIN needed): also clears the lock.
pub async fn reset_pin(gateway: &Gateway, psn_no: &str, new_pin: &Secret) -> Outcome<()> {
    let person = gateway.person(psn_no).await?;
    let phc = checked_new_pin(gateway, &person, new_pin).await?;
    gateway.ledger.store_pin(psn_no, &phc, false).await?;
    Ok(())
}

pub async fn set_no_pin_tier(gateway: &Gateway, psn_no: &str, pin: &Secret, tier: &str) -> Outcome<()> {
    let person = gateway.person(psn_no).await?;
    let policy = gateway.policy(&person.region)?.clone();
    let tier = match tier {
        "NONE" => None,
        name if policy.tier(name).is_some() => Some(name),
        "" => return Err(Failure::invalid("tier", "is required (a tier name or NONE)")),
        other => {
            let names: Vec<&str> = policy.no_pin_tiers.iter().map(|t| t.name.as_str()).collect();
            return Err(Failure::invalid("tier", format!("{other:?} is not one of NONE, {}", names.join(", "))));
        }
    };
    // Turning the exemption off needs no PIN; turning it on or up does.
    if tier.is_some() {
        check_pin(gateway, &person, pin, "pin").await?;
    }
    gateway.ledger.set_no_pin_tier(psn_no, tier).await?;
    Ok(())
}

pub async fn report_card_loss(gateway: &Gateway, psn_no: &str) -> Outcome<()> {
    gateway.person(psn_no).await?;
    gateway.ledger.set_card_status(psn_no, CardStatus::Lost).await?;
    Ok(())
}

pub async fn restore_card(gateway: &Gateway, psn_no: &str, pin: &Secret) -> Outcome<()> {
    let person = gateway.person(psn_no).await?;
    check_pin(gateway, &person, pin, "pin").await?;
    gateway.ledger.set_card_status(psn_no, CardStatus::Normal).await?;
    Ok(())
}

/// The owner registers a member (备案, 000 §9): insured in the same region, with a relation the
/// region allows, usable from the later of today and the region's family start date.
/// One side of a family link, as the shared family rules see it.
pub fn party(person: &PersonRecord) -> Party {
    Party {
        region: person.region.clone(),
        status: person.status,
        account_status: person.account.as_ref().map(|account| account.status),
    }
}

pub async fn register_family(
    gateway: &Gateway,
    owner_psn_no: &str,
    member_psn_no: &str,
    relation: Relation,
) -> Outcome<FamilyLinkRecord> {
    if owner_psn_no == member_psn_no {
        return Err(Failure::invalid("member_psn_no", "must differ from owner_psn_no"));
    }
    let owner = gateway.person(owner_psn_no).await?;
    let member = gateway.person(member_psn_no).await?;
    let policy = gateway.policy(&owner.region)?;
    if let Some(refusal) = link_refusal(&party(&owner), &party(&member), relation, policy) {
        let reason = match refusal {
            LinkRefusal::OwnerHasNoAccount => Reason::NoAccount,
            LinkRefusal::OwnerAccountClosed => Reason::AccountClosed,
            _ => Reason::FamilyRelationNotAllowed,
        };
        let message = match refusal {
            LinkRefusal::MemberWithoutBenefits => {
                format!("the member {} no longer enjoys benefits (000 §14)", mask_psn_no(member_psn_no))
            }
            other => other.message(relation, &policy.region),
        };
        return Err(Failure::new(reason, message));
    }
    let today = gateway.clock.today();
    let link = NewFamilyLink {
        owner_psn_no: owner_psn_no.to_string(),
        member_psn_no: member_psn_no.to_string(),
        relation,
        effective_from: today.max(policy.family_start_date),
        at: gateway.clock.now(),
    };
    gateway
        .ledger
        .register_family(link)
        .await?
        .map_err(|_| Failure::new(Reason::AlreadyExists, "this member is already registered"))
}

pub async fn revoke_family(gateway: &Gateway, owner_psn_no: &str, member_psn_no: &str) -> Outcome<FamilyLinkRecord> {
    gateway.person(owner_psn_no).await?;
    gateway
        .ledger
        .revoke_family(owner_psn_no, member_psn_no, gateway.clock.now())
        .await?
        .ok_or_else(|| Failure::new(Reason::NotRegisteredFamily, "this member is not registered by this owner"))
}

pub async fn family(gateway: &Gateway, psn_no: &str) -> Outcome<(PersonRecord, FamilyView)> {
    let person = gateway.person(psn_no).await?;
    let view = gateway.ledger.family(psn_no, gateway.clock.today()).await?;
    Ok((person, view))
}

pub async fn set_deduction_order(
    gateway: &Gateway,
    member_psn_no: &str,
    owners: &[String],
) -> Outcome<(PersonRecord, FamilyView)> {
    gateway.person(member_psn_no).await?;
    let mut unique = owners.to_vec();
    unique.sort();
    unique.dedup();
    if unique.len() != owners.len() {
        return Err(Failure::invalid("owner_psn_nos", "lists an owner twice"));
    }
    if !gateway.ledger.set_deduction_order(member_psn_no, owners).await? {
        return Err(Failure::new(
            Reason::NotRegisteredFamily,
            "owner_psn_nos must list exactly the owners who registered this member",
        )
        .with_field("owner_psn_nos"));
    }
    family(gateway, member_psn_no).await
}

impl Failure {
    pub fn with_field(mut self, field: &str) -> Failure {
        self.field = Some(field.to_string());
        self
    }
}
