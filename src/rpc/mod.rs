//! gRPC: proto ⇄ domain conversions, the four service implementations, and the one place that
//! turns a [`crate::error::Failure`] into a `tonic::Status`. Knows nothing of Redis or SQL.

pub mod account;
pub mod admin;
pub mod convert;
pub mod error;
pub mod reconciliation;
pub mod settlement;

/// Generated from `proto/yibao/v1/*.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("yibao.v1");

    /// The file descriptor set that server reflection serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("yibao_descriptor");
}

use crate::auth::Authenticator;
use crate::error::Outcome;
use crate::gateway::Gateway;
use crate::ledger::Principal;
use std::sync::Arc;

/// What every service implementation holds.
#[derive(Clone)]
pub struct Services {
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Authenticator>,
}

impl Services {
    pub async fn caller<T>(&self, request: &tonic::Request<T>) -> Outcome<Principal> {
        let header = request.metadata().get("authorization").and_then(|value| value.to_str().ok());
        self.auth.authenticate(header).await
    }
}
