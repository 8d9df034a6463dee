//! The ledger: the only authority on money (DESIGN §2).
//!
//! Double-entry and append-only: every transaction's postings sum to zero across personal and
//! system accounts, and corrections are new transactions. The ledger itself refuses a personal
//! balance below zero, in the same database transaction that writes the postings. Idempotency keys
//! (an institution's request id) are unique in the ledger.
//!
//! Everything that moves money goes through [`Ledger::commit_batch`]: a batch of [`LedgerWrite`]s
//! committed in one database transaction, each with its own outcome, so one refused write never
//! fails the others. The group committer (`settle::commit`) decides what a batch is.

pub mod postgres;
mod records;
pub mod sqlite;

pub use records::*;

use crate::domain::credit::Period;
use crate::domain::policy::InterestRate;
use crate::domain::{AccountStatus, CardStatus, Money, Relation};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use std::fmt;

/// The ledger could not answer; nothing is known to have happened. Callers map this to
/// UNAVAILABLE / BACKEND_UNAVAILABLE.
#[derive(Debug, Clone, thiserror::Error)]
#[error("ledger unavailable: {0}")]
pub struct LedgerUnavailable(pub String);

pub type LedgerResult<T> = Result<T, LedgerUnavailable>;

#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Commits every write in one durable transaction; one outcome per write, same order.
    /// `Err` means the whole batch is unknown to have committed (the connection failed); the
    /// caller may retry each write, which is safe because every write is idempotent by key.
    async fn commit_batch(&self, writes: Vec<LedgerWrite>) -> LedgerResult<Vec<WriteResult>>;

    // --- reads ---
    async fn ping(&self) -> LedgerResult<()>;
    async fn person(&self, psn_no: &str) -> LedgerResult<Option<PersonRecord>>;
    /// The payer, their accounts in deduction order, PIN state and, when `no_pin_day` is given,
    /// the money no-PIN-tier payments drew that day (a sum over the day's settlements: asked only
    /// when the payment could use the tier).
    async fn payer_context(&self, psn_no: &str, no_pin_day: Option<NaiveDate>) -> LedgerResult<Option<PayerContext>>;
    async fn account_balance(&self, account_id: AccountId) -> LedgerResult<Option<(Money, i64)>>;
    async fn settlement(&self, key: SettlementKey) -> LedgerResult<Option<SettlementRecord>>;
    async fn refund_by_request(&self, institution_code: &str, request_id: &str) -> LedgerResult<Option<RefundRecord>>;
    /// The sweeper's question about a hold whose lease ended: did the write that took it (a
    /// settlement's `setl_id`, or a debit adjustment's hold id) commit? If not, the answer is made
    /// final: the hold is fenced in the ledger, so that write can never commit afterwards.
    async fn resolve_hold(&self, hold_id: &str) -> LedgerResult<bool>;
    /// Postings on one account, newest first, strictly below `before_entry` when given.
    async fn entries(&self, query: EntryQuery) -> LedgerResult<Vec<EntryRecord>>;
    async fn family(&self, psn_no: &str, today: NaiveDate) -> LedgerResult<FamilyView>;
    async fn principal(&self, key_hash: &str) -> LedgerResult<Option<Principal>>;
    async fn institution(&self, code: &str) -> LedgerResult<Option<InstitutionRecord>>;
    /// Sum of personal balances, sum of system balances, and postings that do not balance.
    async fn trial_balance(&self) -> LedgerResult<TrialBalance>;

    // --- administrative writes, each its own transaction ---
    async fn upsert_person(
        &self,
        person: PersonUpsert,
        open_account: bool,
        at: DateTime<Utc>,
    ) -> LedgerResult<PersonRecord>;
    async fn register_institution(
        &self,
        institution: InstitutionRecord,
        key: NewApiKey,
    ) -> LedgerResult<Result<(), AlreadyExists>>;
    async fn insert_api_key(&self, key: NewApiKey) -> LedgerResult<()>;
    /// Stores a PIN hash. With `only_if_unset`, refuses when one is set already (SetPin).
    /// Any store resets the failure count and the lock.
    async fn store_pin(&self, psn_no: &str, phc: &str, only_if_unset: bool) -> LedgerResult<bool>;
    /// Durably counts an attempt *before* it is verified, so concurrent guesses cannot exceed the
    /// lockout count; [`Ledger::pin_attempt_succeeded`] clears it.
    async fn pin_attempt_begin(
        &self,
        psn_no: &str,
        today: NaiveDate,
        lockout_failures: u32,
    ) -> LedgerResult<PinAttempt>;
    async fn pin_attempt_succeeded(&self, psn_no: &str) -> LedgerResult<()>;
    async fn set_card_status(&self, psn_no: &str, status: CardStatus) -> LedgerResult<()>;
    async fn set_no_pin_tier(&self, psn_no: &str, tier: Option<&str>) -> LedgerResult<()>;
    async fn set_account_status(&self, psn_no: &str, status: AccountStatus) -> LedgerResult<()>;
    async fn register_family(&self, link: NewFamilyLink) -> LedgerResult<Result<FamilyLinkRecord, AlreadyExists>>;
    async fn revoke_family(
        &self,
        owner: &str,
        member: &str,
        at: DateTime<Utc>,
    ) -> LedgerResult<Option<FamilyLinkRecord>>;
    /// Replaces the member's order; refused unless `owners` is exactly the member's active owners.
    async fn set_deduction_order(&self, member: &str, owners: &[String]) -> LedgerResult<bool>;

    // --- bulk import, one transaction per chunk; one verdict per row, in order ---
    /// People, their accounts (when `open_account`) and opening balances: each positive opening
    /// balance is a posting against `MIGRATION_CLEARING` in one transaction for the chunk, and is
    /// recorded in `imported_openings` so a re-run can tell it is there. Existing people are
    /// judged by [`ExistingImport::verdict`] and never changed.
    async fn import_people(&self, chunk: ImportChunk<PersonImport>) -> LedgerResult<Vec<ImportVerdict>>;
    /// Family links, each judged by `check` against what the ledger holds; an accepted link is
    /// appended to the member's deduction order, as a registration through the API would be.
    async fn import_families(
        &self,
        chunk: ImportChunk<FamilyImport>,
        check: FamilyCheck,
    ) -> LedgerResult<Vec<ImportVerdict>>;
    // --- money coming in ---
    /// People of `region` with an account, in `psn_no` order after `after`, at most `limit`, with
    /// what a crediting run for `period` needs to know of each.
    async fn credit_candidates(
        &self,
        region: &str,
        period: Period,
        after: &str,
        limit: usize,
    ) -> LedgerResult<Vec<CreditCandidate>>;
    /// Applies a crediting batch in one transaction: each line against its counterpart system
    /// account, one ledger transaction per (month, kind, counterpart).
    async fn apply_credits(&self, batch: CreditBatch) -> LedgerResult<CreditsApplied>;
    /// Accounts of `region` (in `psn_no` order after `after`, at most `limit`; or only `psn_no`
    /// when given) with their money by the day it counts from in the interest period
    /// `start..=end`.
    async fn interest_candidates(
        &self,
        region: &str,
        start: NaiveDate,
        end: NaiveDate,
        after: &str,
        limit: usize,
        only: Option<&str>,
    ) -> LedgerResult<Vec<InterestCandidate>>;
    /// A transfer or liquidation done before under this request id.
    async fn lifecycle(&self, request_id: &str) -> LedgerResult<Option<LifecycleRecord>>;
    /// Operator-entered interest rates of a region (`SetInterestRate`), in date order.
    async fn interest_rates(&self, region: &str) -> LedgerResult<Vec<InterestRate>>;
    /// Stores a rate unless one is stored for that date already; then returns the stored one.
    async fn insert_interest_rate(
        &self,
        region: &str,
        rate: InterestRate,
        at: DateTime<Utc>,
    ) -> LedgerResult<Result<(), InterestRate>>;

    /// Contributions (`yibao admin contributions import`, `RecordContribution`): a row for an unknown
    /// person is refused; the same month with the same base, paid flag and category is already
    /// there; anything else records or replaces the month. A row without a category keeps the one
    /// recorded for that month before, else takes the person's category now.
    async fn import_contributions(&self, chunk: ImportChunk<ContributionImport>) -> LedgerResult<Vec<ImportVerdict>>;
    /// After an import: refresh the query planner's statistics, so the first payments on millions of
    /// new rows do not run on plans made for an empty table.
    async fn import_finished(&self) -> LedgerResult<()> {
        Ok(())
    }
}

/// Something that already exists (an institution code, an active family link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlreadyExists;

/// Outcome of a PIN attempt's durable count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinAttempt {
    /// No PIN stored.
    NotSet,
    /// Locked until the given business date.
    Locked { until: NaiveDate },
    /// Counted: verify the PIN now against `phc`, the hash stored when the attempt was counted
    /// (read under the same row lock, so a concurrent change of PIN is not verified stale).
    /// `failures` includes this attempt.
    Proceed { failures: u32, phc: StoredPin },
}

/// A stored PIN hash (PHC string): not a secret by itself, but never printed either, and read
/// only by name.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredPin(String);

impl StoredPin {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for StoredPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoredPin(****)")
    }
}

impl FamilyView {
    pub fn relation_for(&self, owner: &str) -> Option<Relation> {
        self.usable.iter().find(|u| u.owner_psn_no == owner).map(|u| u.relation)
    }
}
