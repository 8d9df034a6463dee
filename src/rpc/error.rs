//! The one map from [`Failure`] to a gRPC status: a code per reason, and
//! `google.rpc.ErrorInfo{reason, domain: "yibao.v1"}` (plus `BadRequest` naming the field, when a
//! field is at fault). Reasons never change meaning.

use crate::error::{Failure, Reason};
use std::collections::HashMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const DOMAIN: &str = "yibao.v1";

pub fn code(reason: Reason) -> Code {
    match reason {
        Reason::InvalidAmount | Reason::InvalidArgument | Reason::PinTooWeak => Code::InvalidArgument,
        Reason::Unauthenticated => Code::Unauthenticated,
        Reason::PermissionDenied | Reason::PinIncorrect | Reason::PinLocked => Code::PermissionDenied,
        Reason::UnknownPerson | Reason::NotFound => Code::NotFound,
        Reason::RequestIdReused | Reason::AlreadyExists => Code::AlreadyExists,
        Reason::BackendUnavailable | Reason::Overloaded => Code::Unavailable,
        Reason::Internal => Code::Internal,
        Reason::NoAccount
        | Reason::PinRequired
        | Reason::PinNotSet
        | Reason::CardLost
        | Reason::AccountFrozen
        | Reason::AccountClosed
        | Reason::ChannelNotAllowed
        | Reason::CategoryNotAllowed
        | Reason::InsufficientBalance
        | Reason::OriginalReversed
        | Reason::RefundExceedsPaid
        | Reason::FamilyRelationNotAllowed
        | Reason::NotRegisteredFamily
        | Reason::PersonTerminated
        | Reason::PersonNotTerminated => Code::FailedPrecondition,
    }
}

pub fn to_status(failure: Failure) -> Status {
    let metadata: HashMap<String, String> =
        failure.metadata.iter().map(|(key, value)| (key.replace('-', "_"), value.clone())).collect();
    let mut details = ErrorDetails::with_error_info(failure.reason.name(), DOMAIN, metadata);
    if let Some(field) = &failure.field {
        details.add_bad_request_violation(field.clone(), failure.message.clone());
    }
    let mut status = Status::with_error_details(code(failure.reason), failure.message.clone(), details);
    for (key, value) in &failure.metadata {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::AsciiMetadataValue::try_from(value.as_str()),
        ) {
            status.metadata_mut().insert(key, value);
        }
    }
    status
}

impl From<Failure> for Status {
    fn from(failure: Failure) -> Status {
        to_status(failure)
    }
}

/// For methods that belong to a later issue.
pub fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!("{method} is not implemented yet"))
}
