//! yibao-gateway: the payment gateway for employee medical insurance personal accounts
//! (职工医保个人账户). See `../shared/DESIGN.md` for the rules and the architecture.
//!
//! Read one payment top-down: `rpc::settlement` → `settle` (orchestration) → `settle::reserve`
//! (holds and the group commit) → `ledger::sqlite` (the durable rows).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod app;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crediting;
pub mod demo;
pub mod domain;
pub mod error;
pub mod gateway;
pub mod import;
pub mod ledger;
pub mod lifecycle;
pub mod loadgen;
pub mod pin;
pub mod rpc;
pub mod settle;
