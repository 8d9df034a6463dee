//! Pure domain types and rules: money, the vocabulary, regional policy and the deduction plan.
//! No I/O, no tokio, no gRPC.

pub mod credit;
pub mod family;
pub mod interest;
pub mod money;
pub mod plan;
pub mod policy;
pub mod types;

pub use money::{Money, MoneyError};
pub use types::*;
