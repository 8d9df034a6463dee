//! Plain records the ledger reads and writes. No behaviour beyond small helpers.

use crate::domain::credit::{Contribution, CreditLine, Period, Subject};
use crate::domain::family::Party;
use crate::domain::{
    AccountStatus, AuthMethod, CardStatus, Category, Channel, InstitutionKind, InsuranceStatus, Money, PersonCategory,
    Relation, Role, SettlementStatus, SystemAccount, TxnKind,
};
use chrono::{DateTime, NaiveDate, Utc};
use std::sync::Arc;

pub type AccountId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    pub id: AccountId,
    pub status: AccountStatus,
    pub balance: Money,
    /// Per-account posting counter: the cache takes a balance only if it is newer than its own.
    pub seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonRecord {
    pub psn_no: String,
    pub name: String,
    pub birth_date: NaiveDate,
    pub region: String,
    pub category: PersonCategory,
    pub status: InsuranceStatus,
    pub card_status: CardStatus,
    pub no_pin_tier: Option<String>,
    pub pin_set: bool,
    pub pin_locked_until: Option<NaiveDate>,
    pub account: Option<AccountRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonUpsert {
    pub psn_no: String,
    pub name: String,
    pub birth_date: NaiveDate,
    pub region: String,
    pub category: PersonCategory,
    pub status: InsuranceStatus,
}

/// A family member's account the payer may draw on.
#[derive(Debug, Clone)]
pub struct FamilySource {
    pub owner_psn_no: String,
    pub relation: Relation,
    pub effective_from: NaiveDate,
    pub account: AccountRecord,
}

/// Everything the settlement path needs to know about a payer, read in one go. (The stored PIN
/// hash is not part of it: a PIN is verified against the hash read when its attempt is counted.)
#[derive(Debug, Clone)]
pub struct PayerContext {
    pub person: PersonRecord,
    /// Active links to owners in the payer's deduction order (effective or not yet; the caller
    /// filters by date so that it can say why).
    pub family: Vec<FamilySource>,
    /// Account money already drawn on the day asked by no-PIN-tier payments (not reversed);
    /// `None` when no day was asked.
    pub no_pin_used_today: Option<Money>,
}

#[derive(Debug, Clone)]
pub enum SettlementKey {
    SetlId(String),
    Request { institution_code: String, request_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebitLine {
    pub account_id: AccountId,
    pub owner_psn_no: String,
    pub amount: Money,
    pub family: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebitRecord {
    pub account_id: AccountId,
    pub owner_psn_no: String,
    pub amount: Money,
    pub refunded: Money,
    pub family: bool,
}

#[derive(Debug, Clone)]
pub struct NewSettlement {
    pub setl_id: String,
    pub institution_code: String,
    pub request_id: String,
    /// Digest of the request's content (not the PIN): a replay must match it.
    pub fingerprint: String,
    pub psn_no: String,
    pub amount: Money,
    pub channel: Channel,
    pub category: Category,
    pub auth_method: AuthMethod,
    pub mdtrt_id: String,
    pub beneficiary_psn_no: String,
    /// In deduction order; zero-amount lines are left out.
    pub debits: Vec<DebitLine>,
    /// The payer's own account, to report `balc` even when it gave nothing.
    pub own_account: Option<AccountId>,
    /// For a no-PIN-tier payment: the daily ceiling, re-checked inside the transaction.
    pub no_pin_daily_max: Option<Money>,
    /// Unix ms after which the ledger refuses this write: the first hold's lease end. The sweeper
    /// releases holds only after it, so a late commit can never land behind a released hold.
    pub hold_deadline_ms: Option<u64>,
    pub business_date: NaiveDate,
    pub at: DateTime<Utc>,
}

impl NewSettlement {
    /// The record this write becomes once committed with the payer's own balance `balc`: what the
    /// write said plus what the ledger computed, so a ledger need not read back what it just wrote.
    pub fn settled_record(&self, balc: Money) -> SettlementRecord {
        let drawn = Money::sum(self.debits.iter().map(|d| d.amount));
        let acct_pay = Money::sum(self.debits.iter().filter(|d| !d.family).map(|d| d.amount));
        SettlementRecord {
            setl_id: self.setl_id.clone(),
            institution_code: self.institution_code.clone(),
            request_id: self.request_id.clone(),
            fingerprint: self.fingerprint.clone(),
            psn_no: self.psn_no.clone(),
            status: SettlementStatus::Settled,
            amount: self.amount,
            acct_pay,
            acct_mulaid_pay: drawn.checked_sub(acct_pay).expect("family part within drawn"),
            psn_cash_pay: self.amount.checked_sub(drawn).expect("drawn within amount"),
            balc,
            refunded: Money::ZERO,
            channel: Some(self.channel),
            category: Some(self.category),
            auth_method: Some(self.auth_method),
            mdtrt_id: self.mdtrt_id.clone(),
            beneficiary_psn_no: self.beneficiary_psn_no.clone(),
            // Ledgers store microseconds.
            settled_at: DateTime::from_timestamp_micros(self.at.timestamp_micros()).expect("time in range"),
            debits: self
                .debits
                .iter()
                .map(|d| DebitRecord {
                    account_id: d.account_id,
                    owner_psn_no: d.owner_psn_no.clone(),
                    amount: d.amount,
                    refunded: Money::ZERO,
                    family: d.family,
                })
                .collect(),
            tombstone: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRecord {
    pub setl_id: String,
    pub institution_code: String,
    pub request_id: String,
    pub fingerprint: String,
    pub psn_no: String,
    pub status: SettlementStatus,
    pub amount: Money,
    pub acct_pay: Money,
    pub acct_mulaid_pay: Money,
    pub psn_cash_pay: Money,
    pub balc: Money,
    pub refunded: Money,
    pub channel: Option<Channel>,
    pub category: Option<Category>,
    pub auth_method: Option<AuthMethod>,
    pub mdtrt_id: String,
    pub beneficiary_psn_no: String,
    pub settled_at: DateTime<Utc>,
    pub debits: Vec<DebitRecord>,
    /// A reversal arrived before (or instead of) the original: nothing was debited.
    pub tombstone: bool,
}

impl SettlementRecord {
    pub fn paid(&self) -> Money {
        self.acct_pay.checked_add(self.acct_mulaid_pay).expect("paid within range")
    }

    pub fn refundable(&self) -> Money {
        if self.status == SettlementStatus::Reversed {
            return Money::ZERO;
        }
        self.paid().saturating_sub(self.refunded)
    }
}

#[derive(Debug, Clone)]
pub struct NewRefund {
    pub refund_id: String,
    pub institution_code: String,
    pub request_id: String,
    pub fingerprint: String,
    pub setl_id: String,
    /// None: everything still refundable.
    pub amount: Option<Money>,
    pub business_date: NaiveDate,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRecord {
    pub refund_id: String,
    pub institution_code: String,
    pub request_id: String,
    pub fingerprint: String,
    pub setl_id: String,
    pub amount: Money,
    /// Last-drawn account first.
    pub credits: Vec<DebitLine>,
    pub settlement_status: SettlementStatus,
    pub refunded_total: Money,
    pub refundable: Money,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct ReverseCommand {
    pub institution_code: String,
    pub original_request_id: String,
    /// Used for the tombstone when the original was never seen.
    pub tombstone_setl_id: String,
    pub business_date: NaiveDate,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewAdjustment {
    pub request_id: String,
    /// The cache hold of a debit (unique per attempt), so the sweeper can find it in the ledger.
    pub hold_id: String,
    pub hold_deadline_ms: Option<u64>,
    pub fingerprint: String,
    pub psn_no: String,
    pub account_id: AccountId,
    /// Signed: positive credits the person, negative debits.
    pub delta: Money,
    pub reason: String,
    pub value_date: NaiveDate,
    pub business_date: NaiveDate,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustmentRecord {
    pub request_id: String,
    pub fingerprint: String,
    pub psn_no: String,
    pub entry_id: i64,
    pub delta: Money,
    pub balance_after: Money,
    pub at: DateTime<Utc>,
}

/// An account's life event (DESIGN §1 Lifecycle): the whole balance out to another region
/// (转移), the whole balance paid out once after termination (清算 / 一次性支取), or money coming in
/// from another region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleKind {
    TransferOut,
    Liquidation,
    TransferIn,
}

impl LifecycleKind {
    pub fn name(self) -> &'static str {
        match self {
            LifecycleKind::TransferOut => "TRANSFER_OUT",
            LifecycleKind::Liquidation => "LIQUIDATION",
            LifecycleKind::TransferIn => "TRANSFER_IN",
        }
    }

    pub fn parse(text: &str) -> Option<LifecycleKind> {
        [LifecycleKind::TransferOut, LifecycleKind::Liquidation, LifecycleKind::TransferIn]
            .into_iter()
            .find(|kind| kind.name() == text)
    }

    /// The ledger transaction it writes, and the system account on the other side.
    pub fn txn(self) -> (TxnKind, SystemAccount) {
        match self {
            LifecycleKind::TransferOut => (TxnKind::TransferOut, SystemAccount::TransferClearing),
            LifecycleKind::Liquidation => (TxnKind::Withdrawal, SystemAccount::WithdrawalsPayable),
            LifecycleKind::TransferIn => (TxnKind::TransferIn, SystemAccount::TransferClearing),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewLifecycle {
    pub request_id: String,
    /// Digest of the request's content: a replay must match it.
    pub fingerprint: String,
    pub kind: LifecycleKind,
    pub psn_no: String,
    /// TransferIn: the money coming in. Out: none (the whole balance at commit).
    pub amount: Option<Money>,
    /// Out: interest up to the day before, paid first: (the last day it covers, amount).
    pub interest: Option<(NaiveDate, Money)>,
    /// Out: the account's last paid interest period the interest was computed from. Should an
    /// interest run have paid another meanwhile, the ledger declines ([`WriteDecline::Stale`]).
    pub interest_seen: Option<NaiveDate>,
    /// TransferIn for a person without an account: open one (their category gets one).
    pub open_account: bool,
    /// The other region, or the liquidation's reason.
    pub memo: String,
    /// From when the money moved counts for interest: a transfer in may be dated back to when the
    /// other region sent it; out, the day itself.
    pub value_date: NaiveDate,
    pub business_date: NaiveDate,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleRecord {
    pub request_id: String,
    pub fingerprint: String,
    pub kind: LifecycleKind,
    pub psn_no: String,
    /// What moved: out of the account (transfer out, liquidation) or into it (transfer in).
    pub amount: Money,
    /// Interest paid first (out only).
    pub interest: Money,
    pub account_status: AccountStatus,
    pub at: DateTime<Utc>,
}

/// A write that moves money, committed through [`super::Ledger::commit_batch`].
#[derive(Debug, Clone)]
pub enum LedgerWrite {
    Settle(NewSettlement),
    Refund(NewRefund),
    Reverse(ReverseCommand),
    Adjust(NewAdjustment),
    Lifecycle(NewLifecycle),
}

/// A personal account's balance after a committed write, for the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceChange {
    pub account_id: AccountId,
    pub balance_after: Money,
    pub seq: i64,
}

#[derive(Debug, Clone)]
pub enum WriteOutcome {
    Settled {
        record: SettlementRecord,
        changes: Vec<BalanceChange>,
    },
    /// The key was committed before; here is what it holds (the caller compares fingerprints).
    SettlementExists(SettlementRecord),
    Refunded {
        record: RefundRecord,
        changes: Vec<BalanceChange>,
    },
    RefundExists(RefundRecord),
    /// Reversal done (or a tombstone written, or it was reversed already: `changes` empty).
    Reversed {
        record: SettlementRecord,
        changes: Vec<BalanceChange>,
    },
    Adjusted {
        record: AdjustmentRecord,
        changes: Vec<BalanceChange>,
    },
    AdjustmentExists(AdjustmentRecord),
    Lifecycle {
        record: LifecycleRecord,
        changes: Vec<BalanceChange>,
    },
    LifecycleExists(LifecycleRecord),
}

/// Why the ledger refused one write. Nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteDecline {
    /// A reversal tombstone holds this request id.
    OriginalReversed,
    NotFound,
    RefundExceedsPaid {
        refundable: Money,
    },
    /// The ledger's own non-negative check refused the debit.
    InsufficientBalance {
        account_id: AccountId,
    },
    AccountNotOpen {
        account_id: AccountId,
        status: AccountStatus,
    },
    NoPinDailyExceeded {
        used: Money,
    },
    /// The request id is taken by a different kind of request.
    RequestIdReused,
    /// The write arrived after its holds' lease ended; nothing was applied.
    HoldExpired,
    /// The person has no personal account (and none is to be opened).
    NoAccount,
    /// What the write was computed from changed meanwhile (a lifecycle's interest basis): compute
    /// it again.
    Stale,
}

pub type WriteResult = Result<WriteOutcome, WriteDecline>;

#[derive(Debug, Clone)]
pub struct EntryQuery {
    pub account_id: AccountId,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub before_entry: Option<i64>,
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    pub entry_id: i64,
    pub kind: TxnKind,
    /// True when somebody else (a family member) drew on this account.
    pub family_use: bool,
    pub amount: Money,
    pub balance_after: Money,
    pub at: DateTime<Utc>,
    pub value_date: NaiveDate,
    pub setl_id: String,
    pub counterparty: String,
    pub memo: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyLinkRecord {
    pub owner_psn_no: String,
    pub member_psn_no: String,
    pub relation: Relation,
    pub effective_from: NaiveDate,
    pub registered_at: DateTime<Utc>,
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct NewFamilyLink {
    pub owner_psn_no: String,
    pub member_psn_no: String,
    pub relation: Relation,
    pub effective_from: NaiveDate,
    pub at: DateTime<Utc>,
}

impl From<NewFamilyLink> for FamilyLinkRecord {
    fn from(link: NewFamilyLink) -> FamilyLinkRecord {
        FamilyLinkRecord {
            owner_psn_no: link.owner_psn_no,
            member_psn_no: link.member_psn_no,
            relation: link.relation,
            effective_from: link.effective_from,
            registered_at: link.at,
            revoked: false,
        }
    }
}

/// True when `wanted` names exactly the owners in `current`, in any order.
pub fn same_owners(current: &[String], wanted: &[String]) -> bool {
    let (mut current, mut wanted) = (current.to_vec(), wanted.to_vec());
    current.sort();
    wanted.sort();
    current == wanted
}

#[derive(Debug, Clone)]
pub struct UsableRecord {
    pub owner_psn_no: String,
    pub relation: Relation,
    pub effective_from: NaiveDate,
    pub account_status: AccountStatus,
}

#[derive(Debug, Clone, Default)]
pub struct FamilyView {
    /// People this person registered (who may draw on this person's account).
    pub members: Vec<FamilyLinkRecord>,
    /// Owners whose accounts this person may draw on, in this person's deduction order.
    pub usable: Vec<UsableRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstitutionRecord {
    pub code: String,
    pub name: String,
    pub kind: InstitutionKind,
    pub region: String,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub key_hash: String,
    pub key_id: String,
    pub role: Role,
    pub institution_code: Option<String>,
    pub label: String,
    pub at: DateTime<Utc>,
}

/// Who a bearer key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
    pub institution: Option<InstitutionRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialBalance {
    pub personal: Money,
    pub system: Money,
    /// Transactions whose postings do not sum to zero (must be 0).
    pub unbalanced_txns: i64,
    /// Personal accounts whose stored balance differs from the sum of their postings (must be 0).
    pub drifted_accounts: i64,
}

// ---- bulk import (`yibao admin import`) ----------------------------------------------------------

/// A chunk of import rows, committed in one transaction.
#[derive(Debug, Clone)]
pub struct ImportChunk<T> {
    pub rows: Vec<T>,
    pub at: DateTime<Utc>,
    pub business_date: NaiveDate,
    /// Names the chunk in the ledger (the opening-balance transaction's `ref`): file and lines.
    pub reference: String,
}

/// One person row, valid on its own (the file alone says nothing wrong with it).
#[derive(Debug, Clone)]
pub struct PersonImport {
    /// The row's line in its file, for the report.
    pub line: u64,
    pub person: PersonUpsert,
    /// Whether the person's category gets an account in their region (policy).
    pub open_account: bool,
    /// The balance carried over from the legacy system; zero when there is none.
    pub opening: Money,
}

/// What the ledger already holds of a person an import row names.
#[derive(Debug, Clone)]
pub struct ExistingImport {
    pub person: PersonUpsert,
    /// The opening balance an earlier import recorded for the account, if any.
    pub imported_opening: Option<Money>,
}

impl ExistingImport {
    /// A re-run applies nothing twice and overwrites nothing: the same person with the same
    /// imported opening balance is already there; anything else is refused, never merged.
    pub fn verdict(&self, row: &PersonImport) -> ImportVerdict {
        if self.person != row.person {
            return ImportVerdict::Refused(
                "this person already exists with other details; change them with AdminService.UpsertPerson".into(),
            );
        }
        match self.imported_opening {
            Some(amount) if amount == row.opening => ImportVerdict::AlreadyThere,
            Some(amount) => ImportVerdict::Refused(format!(
                "an opening balance of {amount} was imported before; this row says {}",
                row.opening
            )),
            None if row.opening.is_zero() => ImportVerdict::AlreadyThere,
            None => ImportVerdict::Refused(
                "this person already exists without an imported opening balance; credit it with AdminService.Adjust"
                    .into(),
            ),
        }
    }
}

/// One contribution row: a month's base and whether it was paid in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContributionImport {
    pub line: u64,
    pub psn_no: String,
    pub period: Period,
    pub base: Money,
    pub paid: bool,
    /// What the person was that month; `None`: what the person is now.
    pub category: Option<PersonCategory>,
}

/// One family row: `member_psn_no` may draw on `owner_psn_no`'s account.
#[derive(Debug, Clone)]
pub struct FamilyImport {
    pub line: u64,
    pub owner_psn_no: String,
    pub member_psn_no: String,
    pub relation: Relation,
}

/// What the ledger holds of a family row's two people and their current link.
#[derive(Debug, Clone)]
pub struct FamilyFacts {
    pub owner: Option<Party>,
    pub member: Option<Party>,
    /// The relation of the active link between them, if one is registered.
    pub active_relation: Option<Relation>,
    /// A link between them was registered once and revoked since.
    pub revoked_before: bool,
}

impl FamilyFacts {
    /// The link's `effective_from` when the row is to be applied; otherwise its verdict. A link
    /// already registered with the same relation is already there (whatever has changed since);
    /// with another relation, or revoked since, it is refused; a new one is judged by `check`.
    pub fn judge(&self, row: &FamilyImport, check: &FamilyCheck) -> Result<NaiveDate, ImportVerdict> {
        match self.active_relation {
            Some(relation) if relation == row.relation => Err(ImportVerdict::AlreadyThere),
            Some(relation) => Err(ImportVerdict::Refused(format!(
                "this member is already registered with the owner as {relation}; revoke that link first"
            ))),
            // A re-run of an old file must not bring back what the owner revoked since.
            None if self.revoked_before => Err(ImportVerdict::Refused(
                "this link was registered before and revoked since; register it again with RegisterFamilyMember if that is meant"
                    .into(),
            )),
            None => check(row, self).map_err(ImportVerdict::Refused),
        }
    }
}

/// Decides a family row once the ledger has looked its people up (inside the chunk's
/// transaction): the link's `effective_from`, or why the row is refused.
pub type FamilyCheck = Arc<dyn Fn(&FamilyImport, &FamilyFacts) -> Result<NaiveDate, String> + Send + Sync>;

/// What became of one import row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportVerdict {
    Applied,
    /// A re-run: the ledger already holds exactly this.
    AlreadyThere,
    /// Nothing of the row was applied.
    Refused(String),
}

// ---- money coming in (monthly crediting) ---------------------------------------------------------

/// A person's account as a crediting run sees it, with the months it may owe them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditCandidate {
    pub psn_no: String,
    pub account_id: AccountId,
    pub subject: Subject,
    /// The run's month is credited already (its MONTHLY_CREDIT is in the ledger).
    pub period_done: bool,
    /// Recorded contributions not yet credited: the run's month whatever its state, and earlier
    /// months only when paid (back payments), oldest first.
    pub contributions: Vec<Contribution>,
}

/// One line of a month's credit on one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditPosting {
    pub account_id: AccountId,
    pub psn_no: String,
    /// What is credited once: the month (`YYYY-MM`) of a monthly credit or mutual-aid premium, the
    /// last day (`YYYY-MM-DD`) of an interest period.
    pub period: String,
    /// The ledger transaction's value date: from when the money counts for interest.
    pub value_date: NaiveDate,
    pub line: CreditLine,
    /// An interest line: the account's last paid interest period it was computed from. Should a
    /// closure have paid interest since (and the account been reopened), the line is not applied.
    pub interest_seen: Option<String>,
}

/// Lines committed in one transaction; each (account, month, kind) at most once, ever.
#[derive(Debug, Clone)]
pub struct CreditBatch {
    pub postings: Vec<CreditPosting>,
    /// The run, in the ledger transactions' `ref`.
    pub reference: String,
    pub business_date: NaiveDate,
    pub at: DateTime<Utc>,
}

/// What became of a [`CreditBatch`]: per posting, whether it was applied now (false: that
/// account-month-kind was credited before, or the account was closed meanwhile), and each changed
/// account's balance after the batch.
#[derive(Debug, Clone, Default)]
pub struct CreditsApplied {
    pub applied: Vec<bool>,
    pub changes: Vec<BalanceChange>,
}

/// An account as an interest run sees it: its money by the day it starts to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterestCandidate {
    pub psn_no: String,
    pub account_id: AccountId,
    pub account_status: AccountStatus,
    /// The last day interest was settled to before (an earlier run, or a closure mid-period).
    pub settled_through: Option<NaiveDate>,
    /// Amounts by the first day of the period they count on: each posting from its value date,
    /// everything from before the period from its first day. Only value dates up to its end.
    pub amounts: Vec<(NaiveDate, Money)>,
}

/// Parses the ledgers' compact form of an interest candidate's amounts: `YYYY-MM-DD,fen` joined
/// by `;`.
pub fn parse_amounts(text: &str) -> Option<Vec<(NaiveDate, Money)>> {
    text.split(';')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (day, fen) = item.split_once(',')?;
            Some((NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()?, Money::from_fen(fen.parse().ok()?)))
        })
        .collect()
}

/// Parses the ledgers' compact form of a candidate's contributions:
/// `period,base_fen,paid(0|1),category` joined by `;`, sorted oldest first.
pub fn parse_contributions(text: &str) -> Option<Vec<Contribution>> {
    let mut contributions = Vec::new();
    for item in text.split(';').filter(|item| !item.is_empty()) {
        let mut fields = item.split(',');
        let period = Period::parse(fields.next()?)?;
        let base = Money::from_fen(fields.next()?.parse().ok()?);
        let paid = match fields.next()? {
            "1" => true,
            "0" => false,
            _ => return None,
        };
        let category = PersonCategory::parse(fields.next()?)?;
        contributions.push(Contribution { period, base, paid, category });
    }
    contributions.sort_by_key(|c| c.period);
    Some(contributions)
}

/// Each account's last state among a batch's personal postings, in first-seen order.
pub fn last_changes(changes: impl IntoIterator<Item = BalanceChange>) -> Vec<BalanceChange> {
    let mut last: Vec<BalanceChange> = Vec::new();
    let mut index: std::collections::HashMap<AccountId, usize> = std::collections::HashMap::new();
    for change in changes {
        match index.get(&change.account_id) {
            Some(&i) if last[i].seq < change.seq => last[i] = change,
            Some(_) => {}
            None => {
                index.insert(change.account_id, last.len());
                last.push(change);
            }
        }
    }
    last
}
