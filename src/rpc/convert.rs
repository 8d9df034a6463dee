//! proto ⇄ domain. Input is validated strictly here: every malformed field is named in the error.

use super::pb;
use crate::domain::{
    AccountStatus, AuthMethod, CardStatus, Category, Channel, InstitutionKind, InsuranceStatus, Money, PayMode,
    PersonCategory, Relation, Role, SettlementStatus, TxnKind,
};
use crate::error::{Failure, Outcome};
use crate::ledger::{DebitLine, DebitRecord, EntryRecord, FamilyLinkRecord, RefundRecord, SettlementRecord};
use chrono::{DateTime, NaiveDate, Utc};

pub const REQUEST_ID_LEN_MAX: usize = 64;
const TEXT_LEN_MAX: usize = 128;

pub fn timestamp(at: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 })
}

pub fn money(field: &str, text: &str) -> Outcome<Money> {
    Money::parse_positive(text).map_err(|error| Failure::invalid_amount(field, error))
}

/// An amount that may be zero (a contribution base of a month not paid).
pub fn amount(field: &str, text: &str) -> Outcome<Money> {
    Money::parse(text).map_err(|error| Failure::invalid_amount(field, error))
}

pub fn period(field: &str, text: &str) -> Outcome<crate::domain::credit::Period> {
    crate::domain::credit::Period::parse(text).ok_or_else(|| Failure::invalid(field, "must be a month YYYY-MM"))
}

/// An annual rate in percent: digits with an optional decimal point, nothing else.
pub fn rate_percent(field: &str, text: &str) -> Outcome<rust_decimal::Decimal> {
    let plain = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|&b| b == b'.').count() <= 1
        && !text.starts_with('.')
        && !text.ends_with('.');
    text.parse()
        .ok()
        .filter(|_| plain)
        .ok_or_else(|| Failure::invalid(field, "must be a percentage like 0.35 (no sign, no exponent)"))
}

pub fn optional_money(field: &str, text: &str) -> Outcome<Option<Money>> {
    if text.is_empty() {
        Ok(None)
    } else {
        money(field, text).map(Some)
    }
}

pub fn psn_no(field: &str, text: &str) -> Outcome<String> {
    if text.is_empty() {
        return Err(Failure::invalid(field, "is required"));
    }
    if !crate::domain::is_psn_no(text) {
        return Err(Failure::invalid(field, "must be 1–30 letters and digits"));
    }
    Ok(text.to_string())
}

pub fn request_id(field: &str, text: &str) -> Outcome<String> {
    if text.is_empty() {
        return Err(Failure::invalid(field, "is required"));
    }
    if text.len() > REQUEST_ID_LEN_MAX || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Failure::invalid(field, format!("must be 1–{REQUEST_ID_LEN_MAX} printable ASCII characters")));
    }
    Ok(text.to_string())
}

/// Free text (names, reasons, mdtrt_id): bounded, no control characters.
pub fn text(field: &str, value: &str, required: bool) -> Outcome<String> {
    if required && value.trim().is_empty() {
        return Err(Failure::invalid(field, "is required"));
    }
    if value.chars().count() > TEXT_LEN_MAX || value.chars().any(char::is_control) {
        return Err(Failure::invalid(
            field,
            format!("must be at most {TEXT_LEN_MAX} characters, no control characters"),
        ));
    }
    Ok(value.to_string())
}

pub fn date(field: &str, text: &str) -> Outcome<NaiveDate> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .filter(|_| text.len() == 10)
        .ok_or_else(|| Failure::invalid(field, "must be a date YYYY-MM-DD"))
}

pub fn optional_date(field: &str, text: &str) -> Outcome<Option<NaiveDate>> {
    if text.is_empty() {
        Ok(None)
    } else {
        date(field, text).map(Some)
    }
}

pub fn region(field: &str, text: &str) -> Outcome<String> {
    if !crate::domain::is_region_code(text) {
        return Err(Failure::invalid(field, "must be a 6-digit region code like 110000"));
    }
    Ok(text.to_string())
}

fn unspecified(field: &str) -> Failure {
    Failure::invalid(field, "is required (…_UNSPECIFIED is not a value)")
}

pub fn channel(value: i32) -> Outcome<Channel> {
    match pb::Channel::try_from(value) {
        Ok(pb::Channel::Card) => Ok(Channel::Card),
        Ok(pb::Channel::EVoucher) => Ok(Channel::EVoucher),
        Ok(pb::Channel::Registration) => Ok(Channel::Registration),
        Ok(pb::Channel::CrossRegion) => Ok(Channel::CrossRegion),
        _ => Err(unspecified("channel")),
    }
}

pub fn category(value: i32) -> Outcome<Category> {
    match pb::Category::try_from(value) {
        Ok(pb::Category::Outpatient) => Ok(Category::Outpatient),
        Ok(pb::Category::Inpatient) => Ok(Category::Inpatient),
        Ok(pb::Category::Pharmacy) => Ok(Category::Pharmacy),
        Ok(pb::Category::Registration) => Ok(Category::Registration),
        Ok(pb::Category::Premium) => Ok(Category::Premium),
        _ => Err(unspecified("category")),
    }
}

pub fn pay_mode(value: i32) -> Outcome<PayMode> {
    match pb::PayMode::try_from(value) {
        Ok(pb::PayMode::Partial) => Ok(PayMode::Partial),
        Ok(pb::PayMode::FullOnly) => Ok(PayMode::FullOnly),
        _ => Err(unspecified("mode")),
    }
}

pub fn person_category(value: i32) -> Outcome<PersonCategory> {
    match pb::PersonCategory::try_from(value) {
        Ok(pb::PersonCategory::Employee) => Ok(PersonCategory::Employee),
        Ok(pb::PersonCategory::Retiree) => Ok(PersonCategory::Retiree),
        Ok(pb::PersonCategory::Flexible) => Ok(PersonCategory::Flexible),
        Ok(pb::PersonCategory::Resident) => Ok(PersonCategory::Resident),
        _ => Err(unspecified("category")),
    }
}

pub fn insurance_status(value: i32) -> Outcome<InsuranceStatus> {
    match pb::InsuranceStatus::try_from(value) {
        Ok(pb::InsuranceStatus::Active) => Ok(InsuranceStatus::Active),
        Ok(pb::InsuranceStatus::Suspended) => Ok(InsuranceStatus::Suspended),
        Ok(pb::InsuranceStatus::Removed) => Ok(InsuranceStatus::Removed),
        Ok(pb::InsuranceStatus::Terminated) => Ok(InsuranceStatus::Terminated),
        _ => Err(unspecified("status")),
    }
}

pub fn relation(value: i32) -> Outcome<Relation> {
    match pb::Relation::try_from(value) {
        Ok(pb::Relation::Spouse) => Ok(Relation::Spouse),
        Ok(pb::Relation::Parent) => Ok(Relation::Parent),
        Ok(pb::Relation::Child) => Ok(Relation::Child),
        Ok(pb::Relation::Sibling) => Ok(Relation::Sibling),
        Ok(pb::Relation::Grandparent) => Ok(Relation::Grandparent),
        Ok(pb::Relation::Grandchild) => Ok(Relation::Grandchild),
        _ => Err(unspecified("relation")),
    }
}

pub fn institution_kind(value: i32) -> Outcome<InstitutionKind> {
    match pb::InstitutionKind::try_from(value) {
        Ok(pb::InstitutionKind::Hospital) => Ok(InstitutionKind::Hospital),
        Ok(pb::InstitutionKind::Pharmacy) => Ok(InstitutionKind::Pharmacy),
        Ok(pb::InstitutionKind::CrossRegionPlatform) => Ok(InstitutionKind::CrossRegionPlatform),
        _ => Err(unspecified("kind")),
    }
}

pub fn role(value: i32) -> Outcome<Role> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Institution) => Ok(Role::Institution),
        Ok(pb::Role::Service) => Ok(Role::Service),
        Ok(pb::Role::Operator) => Ok(Role::Operator),
        _ => Err(unspecified("role")),
    }
}

pub fn relation_to_pb(relation: Relation) -> pb::Relation {
    match relation {
        Relation::Spouse => pb::Relation::Spouse,
        Relation::Parent => pb::Relation::Parent,
        Relation::Child => pb::Relation::Child,
        Relation::Sibling => pb::Relation::Sibling,
        Relation::Grandparent => pb::Relation::Grandparent,
        Relation::Grandchild => pb::Relation::Grandchild,
    }
}

pub fn channel_to_pb(channel: Option<Channel>) -> pb::Channel {
    match channel {
        Some(Channel::Card) => pb::Channel::Card,
        Some(Channel::EVoucher) => pb::Channel::EVoucher,
        Some(Channel::Registration) => pb::Channel::Registration,
        Some(Channel::CrossRegion) => pb::Channel::CrossRegion,
        None => pb::Channel::Unspecified,
    }
}

pub fn category_to_pb(category: Option<Category>) -> pb::Category {
    match category {
        Some(Category::Outpatient) => pb::Category::Outpatient,
        Some(Category::Inpatient) => pb::Category::Inpatient,
        Some(Category::Pharmacy) => pb::Category::Pharmacy,
        Some(Category::Registration) => pb::Category::Registration,
        Some(Category::Premium) => pb::Category::Premium,
        None => pb::Category::Unspecified,
    }
}

pub fn status_to_pb(status: SettlementStatus) -> pb::SettlementStatus {
    match status {
        SettlementStatus::Planned => pb::SettlementStatus::Planned,
        SettlementStatus::Settled => pb::SettlementStatus::Settled,
        SettlementStatus::Reversed => pb::SettlementStatus::Reversed,
        SettlementStatus::PartiallyRefunded => pb::SettlementStatus::PartiallyRefunded,
        SettlementStatus::Refunded => pb::SettlementStatus::Refunded,
    }
}

pub fn auth_to_pb(method: Option<AuthMethod>) -> pb::AuthMethod {
    match method {
        Some(AuthMethod::Pin) => pb::AuthMethod::Pin,
        Some(AuthMethod::NoPinLimit) => pb::AuthMethod::NoPinLimit,
        Some(AuthMethod::ChannelExempt) => pb::AuthMethod::ChannelExempt,
        None => pb::AuthMethod::Unspecified,
    }
}

pub fn account_status_to_pb(status: Option<AccountStatus>) -> pb::AccountStatus {
    match status {
        Some(AccountStatus::Open) => pb::AccountStatus::Open,
        Some(AccountStatus::Frozen) => pb::AccountStatus::Frozen,
        Some(AccountStatus::Closed) => pb::AccountStatus::Closed,
        None => pb::AccountStatus::None,
    }
}

pub fn card_status_to_pb(status: CardStatus) -> pb::CardStatus {
    match status {
        CardStatus::Normal => pb::CardStatus::Normal,
        CardStatus::Lost => pb::CardStatus::Lost,
    }
}

pub fn person_category_to_pb(category: PersonCategory) -> pb::PersonCategory {
    match category {
        PersonCategory::Employee => pb::PersonCategory::Employee,
        PersonCategory::Retiree => pb::PersonCategory::Retiree,
        PersonCategory::Flexible => pb::PersonCategory::Flexible,
        PersonCategory::Resident => pb::PersonCategory::Resident,
    }
}

pub fn insurance_status_to_pb(status: InsuranceStatus) -> pb::InsuranceStatus {
    match status {
        InsuranceStatus::Active => pb::InsuranceStatus::Active,
        InsuranceStatus::Suspended => pb::InsuranceStatus::Suspended,
        InsuranceStatus::Removed => pb::InsuranceStatus::Removed,
        InsuranceStatus::Terminated => pb::InsuranceStatus::Terminated,
    }
}

fn debit_to_pb(debit: &DebitRecord) -> pb::Debit {
    pb::Debit {
        owner_psn_no: debit.owner_psn_no.clone(),
        amount: debit.amount.to_string(),
        family: debit.family,
        refunded: debit.refunded.to_string(),
    }
}

fn credit_to_pb(line: &DebitLine) -> pb::Debit {
    pb::Debit {
        owner_psn_no: line.owner_psn_no.clone(),
        amount: line.amount.to_string(),
        family: line.family,
        refunded: String::new(),
    }
}

pub fn settlement_to_pb(record: &SettlementRecord, pin_required: bool) -> pb::Settlement {
    pb::Settlement {
        setl_id: record.setl_id.clone(),
        request_id: record.request_id.clone(),
        psn_no: record.psn_no.clone(),
        status: status_to_pb(record.status) as i32,
        amount: record.amount.to_string(),
        acct_pay: record.acct_pay.to_string(),
        acct_mulaid_pay: record.acct_mulaid_pay.to_string(),
        psn_cash_pay: record.psn_cash_pay.to_string(),
        balc: record.balc.to_string(),
        debits: record.debits.iter().map(debit_to_pb).collect(),
        auth_method: auth_to_pb(record.auth_method) as i32,
        pin_required,
        institution_code: record.institution_code.clone(),
        mdtrt_id: record.mdtrt_id.clone(),
        settled_at: timestamp(record.settled_at),
        refunded_amount: record.refunded.to_string(),
        refundable_amount: record.refundable().to_string(),
        channel: channel_to_pb(record.channel) as i32,
        category: category_to_pb(record.category) as i32,
        beneficiary_psn_no: record.beneficiary_psn_no.clone(),
    }
}

pub fn refund_to_pb(record: &RefundRecord) -> pb::Refund {
    pb::Refund {
        refund_id: record.refund_id.clone(),
        request_id: record.request_id.clone(),
        setl_id: record.setl_id.clone(),
        amount: record.amount.to_string(),
        credits: record.credits.iter().map(credit_to_pb).collect(),
        settlement_status: status_to_pb(record.settlement_status) as i32,
        refunded_total: record.refunded_total.to_string(),
        refundable_amount: record.refundable.to_string(),
        refunded_at: timestamp(record.at),
    }
}

pub fn entry_kind_to_pb(kind: TxnKind, family_use: bool) -> pb::EntryKind {
    match kind {
        TxnKind::Settlement if family_use => pb::EntryKind::FamilySettlement,
        TxnKind::Settlement => pb::EntryKind::Settlement,
        TxnKind::Refund => pb::EntryKind::Refund,
        TxnKind::Reversal => pb::EntryKind::Reversal,
        TxnKind::Adjustment => pb::EntryKind::Adjustment,
        TxnKind::MonthlyCredit => pb::EntryKind::MonthlyCredit,
        TxnKind::MutualAid => pb::EntryKind::MutualAid,
        TxnKind::Interest => pb::EntryKind::Interest,
        TxnKind::TransferOut => pb::EntryKind::TransferOut,
        TxnKind::TransferIn => pb::EntryKind::TransferIn,
        TxnKind::Withdrawal => pb::EntryKind::Withdrawal,
        TxnKind::OpeningBalance => pb::EntryKind::OpeningBalance,
    }
}

pub fn entry_to_pb(entry: &EntryRecord) -> pb::Entry {
    pb::Entry {
        entry_id: entry.entry_id.to_string(),
        kind: entry_kind_to_pb(entry.kind, entry.family_use) as i32,
        amount: entry.amount.to_string(),
        balance_after: entry.balance_after.to_string(),
        at: timestamp(entry.at),
        setl_id: entry.setl_id.clone(),
        counterparty: entry.counterparty.clone(),
        value_date: entry.value_date.to_string(),
        memo: entry.memo.clone(),
    }
}

pub fn family_link_to_pb(link: &FamilyLinkRecord) -> pb::FamilyMember {
    pb::FamilyMember {
        owner_psn_no: link.owner_psn_no.clone(),
        member_psn_no: link.member_psn_no.clone(),
        relation: relation_to_pb(link.relation) as i32,
        effective_from: link.effective_from.to_string(),
        registered_at: timestamp(link.registered_at),
        revoked: link.revoked,
    }
}
