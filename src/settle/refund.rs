//! Refunds (退费) and reversals (冲正): money goes back the way it came (000 §10).
//!
//! A refund returns money to the accounts in reverse deduction order and never exceeds what was
//! paid; the ledger checks that inside its transaction, so racing refunds cannot over-refund. A
//! reversal undoes a settlement fully, or leaves a tombstone when the original was never seen.

use super::reserve::decline_failure;
use crate::domain::Money;
use crate::error::{Failure, Outcome, Reason};
use crate::gateway::{digest, Gateway};
use crate::ledger::{
    BalanceChange, InstitutionRecord, LedgerWrite, NewRefund, RefundRecord, ReverseCommand, SettlementKey,
    SettlementRecord, WriteOutcome,
};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct RefundCommand {
    pub request_id: String,
    pub setl_id: String,
    /// None: everything still refundable.
    pub amount: Option<Money>,
}

impl RefundCommand {
    fn fingerprint(&self) -> String {
        let amount = self.amount.map(|a| a.to_string()).unwrap_or_default();
        digest(&["refund/v1", &self.setl_id, &amount])
    }
}

fn refund_replay(existing: RefundRecord, fingerprint: &str) -> Outcome<RefundRecord> {
    if existing.fingerprint != fingerprint {
        return Err(Failure::new(Reason::RequestIdReused, "request_id was used before for a different request"));
    }
    Ok(existing)
}

pub async fn refund(
    gateway: &Arc<Gateway>,
    institution: &InstitutionRecord,
    command: RefundCommand,
) -> Outcome<RefundRecord> {
    let fingerprint = command.fingerprint();
    if let Some(existing) = gateway.ledger.refund_by_request(&institution.code, &command.request_id).await? {
        return refund_replay(existing, &fingerprint);
    }
    let _admitted = gateway.admit()?;
    let now = gateway.clock.now();
    let new = NewRefund {
        refund_id: gateway.new_id('R'),
        institution_code: institution.code.clone(),
        request_id: command.request_id.clone(),
        fingerprint: fingerprint.clone(),
        setl_id: command.setl_id.clone(),
        amount: command.amount,
        business_date: crate::clock::business_date(now),
        at: now,
    };
    let task_gateway = gateway.clone();
    let task = tokio::spawn(async move {
        let result = task_gateway.committer.commit(LedgerWrite::Refund(new)).await?;
        match result {
            Ok(WriteOutcome::Refunded { record, changes }) => {
                apply_credits(&task_gateway, &changes).await;
                Ok(record)
            }
            Ok(WriteOutcome::RefundExists(existing)) => refund_replay(existing, &fingerprint),
            Ok(other) => unreachable!("a refund write answered {other:?}"),
            Err(decline) => Err(decline_failure(decline)),
        }
    });
    task.await.map_err(|_| Failure::new(Reason::Internal, "refund task failed"))?
}

pub async fn reverse(
    gateway: &Arc<Gateway>,
    institution: &InstitutionRecord,
    original_request_id: String,
) -> Outcome<SettlementRecord> {
    let _admitted = gateway.admit()?;
    let now = gateway.clock.now();
    let command = ReverseCommand {
        institution_code: institution.code.clone(),
        original_request_id,
        tombstone_setl_id: gateway.new_id('T'),
        business_date: crate::clock::business_date(now),
        at: now,
    };
    let task_gateway = gateway.clone();
    let task = tokio::spawn(async move {
        match task_gateway.committer.commit(LedgerWrite::Reverse(command)).await? {
            Ok(WriteOutcome::Reversed { record, changes }) => {
                apply_credits(&task_gateway, &changes).await;
                Ok(record)
            }
            Ok(other) => unreachable!("a reversal answered {other:?}"),
            Err(decline) => Err(decline_failure(decline)),
        }
    });
    task.await.map_err(|_| Failure::new(Reason::Internal, "reversal task failed"))?
}

/// Committed credits reach the cache only now, after the ledger has them.
pub async fn apply_credits(gateway: &Gateway, changes: &[BalanceChange]) {
    for change in changes {
        if let Err(error) = gateway.cache.apply(change.account_id, change.balance_after, change.seq).await {
            // The cache stays stale-low until the account reloads; it never overstates.
            tracing::warn!(%error, "could not apply a committed credit to the cache");
        }
    }
}

/// A settlement by setl_id or request_id, only if it belongs to the caller.
pub async fn get(gateway: &Gateway, institution: &InstitutionRecord, key: SettlementKey) -> Outcome<SettlementRecord> {
    let found = gateway.ledger.settlement(key).await?;
    match found {
        Some(record) if record.institution_code == institution.code => Ok(record),
        _ => Err(Failure::new(Reason::NotFound, "no such settlement for this institution")),
    }
}
