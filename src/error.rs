//! Declines and failures as values with stable reasons (DESIGN §3 "Errors"). `rpc::error` is the
//! one place that turns a [`Failure`] into a `tonic::Status` with `google.rpc.ErrorInfo`.

use crate::cache::CacheUnavailable;
use crate::ledger::LedgerUnavailable;
use std::fmt;

/// A stable reason. The names never change meaning; clients switch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InvalidAmount,
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    UnknownPerson,
    NoAccount,
    PinRequired,
    PinIncorrect,
    PinLocked,
    PinNotSet,
    PinTooWeak,
    CardLost,
    AccountFrozen,
    AccountClosed,
    ChannelNotAllowed,
    CategoryNotAllowed,
    InsufficientBalance,
    RequestIdReused,
    OriginalReversed,
    NotFound,
    RefundExceedsPaid,
    FamilyRelationNotAllowed,
    NotRegisteredFamily,
    AlreadyExists,
    /// The person's insurance is terminated (death, emigration, …): no payments, no transfers.
    PersonTerminated,
    /// Liquidation is only for a person whose insurance is terminated.
    PersonNotTerminated,
    BackendUnavailable,
    /// Too many payments in flight: refused at once, safe to retry.
    Overloaded,
    Internal,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::InvalidAmount => "INVALID_AMOUNT",
            Reason::InvalidArgument => "INVALID_ARGUMENT",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::PermissionDenied => "PERMISSION_DENIED",
            Reason::UnknownPerson => "UNKNOWN_PERSON",
            Reason::NoAccount => "NO_ACCOUNT",
            Reason::PinRequired => "PIN_REQUIRED",
            Reason::PinIncorrect => "PIN_INCORRECT",
            Reason::PinLocked => "PIN_LOCKED",
            Reason::PinNotSet => "PIN_NOT_SET",
            Reason::PinTooWeak => "PIN_TOO_WEAK",
            Reason::CardLost => "CARD_LOST",
            Reason::AccountFrozen => "ACCOUNT_FROZEN",
            Reason::AccountClosed => "ACCOUNT_CLOSED",
            Reason::ChannelNotAllowed => "CHANNEL_NOT_ALLOWED",
            Reason::CategoryNotAllowed => "CATEGORY_NOT_ALLOWED",
            Reason::InsufficientBalance => "INSUFFICIENT_BALANCE",
            Reason::RequestIdReused => "REQUEST_ID_REUSED",
            Reason::OriginalReversed => "ORIGINAL_REVERSED",
            Reason::NotFound => "NOT_FOUND",
            Reason::RefundExceedsPaid => "REFUND_EXCEEDS_PAID",
            Reason::FamilyRelationNotAllowed => "FAMILY_RELATION_NOT_ALLOWED",
            Reason::NotRegisteredFamily => "NOT_REGISTERED_FAMILY",
            Reason::AlreadyExists => "ALREADY_EXISTS",
            Reason::PersonTerminated => "PERSON_TERMINATED",
            Reason::PersonNotTerminated => "PERSON_NOT_TERMINATED",
            Reason::BackendUnavailable => "BACKEND_UNAVAILABLE",
            Reason::Overloaded => "OVERLOADED",
            Reason::Internal => "INTERNAL",
        }
    }
}

/// A refused or failed request: the reason, a message for people (never a secret), the malformed
/// field if any, and extra metadata (e.g. `attempts_left`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
    pub field: Option<String>,
    pub metadata: Vec<(String, String)>,
}

impl Failure {
    pub fn new(reason: Reason, message: impl Into<String>) -> Failure {
        Failure { reason, message: message.into(), field: None, metadata: Vec::new() }
    }

    /// A malformed field: INVALID_ARGUMENT naming it.
    pub fn invalid(field: &str, message: impl fmt::Display) -> Failure {
        Failure {
            reason: Reason::InvalidArgument,
            message: format!("{field}: {message}"),
            field: Some(field.to_string()),
            metadata: Vec::new(),
        }
    }

    pub fn invalid_amount(field: &str, message: impl fmt::Display) -> Failure {
        Failure { reason: Reason::InvalidAmount, ..Failure::invalid(field, message) }
    }

    pub fn with_metadata(mut self, key: &str, value: impl ToString) -> Failure {
        self.metadata.push((key.to_string(), value.to_string()));
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.name(), self.message)
    }
}

impl From<LedgerUnavailable> for Failure {
    fn from(error: LedgerUnavailable) -> Failure {
        tracing::warn!(%error, "ledger unavailable");
        Failure::new(Reason::BackendUnavailable, "the ledger is unavailable; retry later")
    }
}

impl From<CacheUnavailable> for Failure {
    fn from(error: CacheUnavailable) -> Failure {
        tracing::warn!(%error, "balance cache unavailable");
        Failure::new(Reason::BackendUnavailable, "the balance cache is unavailable; retry later")
    }
}

pub type Outcome<T> = Result<T, Failure>;
