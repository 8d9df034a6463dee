//! SettlementService: institutions settle, reverse, refund and look up their own settlements.

use super::convert::{self, settlement_to_pb};
use super::pb::{self, settlement_service_server::SettlementService};
use super::Services;
use crate::error::{Failure, Outcome};
use crate::ledger::SettlementKey;
use crate::pin::Secret;
use crate::settle::{self, refund::RefundCommand, SettleCommand};
use tonic::{Request, Response, Status};

fn settle_command(request: &pb::SettleRequest) -> Outcome<SettleCommand> {
    let beneficiary = if request.beneficiary_psn_no.is_empty() {
        String::new()
    } else {
        convert::psn_no("beneficiary_psn_no", &request.beneficiary_psn_no)?
    };
    Ok(SettleCommand {
        request_id: convert::request_id("request_id", &request.request_id)?,
        psn_no: convert::psn_no("psn_no", &request.psn_no)?,
        amount: convert::money("amount", &request.amount)?,
        channel: convert::channel(request.channel)?,
        category: convert::category(request.category)?,
        mode: convert::pay_mode(request.mode)?,
        self_only: request.self_only,
        pin: (!request.pin.is_empty()).then(|| Secret::new(request.pin.clone())),
        mdtrt_id: convert::text("mdtrt_id", &request.mdtrt_id, false)?,
        ec_token: convert::text("ec_token", &request.ec_token, false)?,
        beneficiary_psn_no: beneficiary,
    })
}

#[tonic::async_trait]
impl SettlementService for Services {
    async fn pre_settle(&self, request: Request<pb::SettleRequest>) -> Result<Response<pb::Settlement>, Status> {
        let caller = self.caller(&request).await?;
        let institution = caller.institution()?;
        let command = settle_command(request.get_ref())?;
        let answer = settle::pre_settle(&self.gateway, institution, command).await?;
        Ok(Response::new(settlement_to_pb(&answer.record, answer.pin_required)))
    }

    async fn settle(&self, request: Request<pb::SettleRequest>) -> Result<Response<pb::Settlement>, Status> {
        let caller = self.caller(&request).await?;
        let institution = caller.institution()?;
        let command = settle_command(request.get_ref())?;
        let request_id = command.request_id.clone();
        let result = settle::settle(&self.gateway, institution, command).await;
        match &result {
            Ok(answer) => tracing::info!(
                institution = %institution.code, %request_id, setl_id = %answer.record.setl_id,
                acct_pay = %answer.record.acct_pay, acct_mulaid_pay = %answer.record.acct_mulaid_pay, "settled"
            ),
            Err(failure) => {
                tracing::info!(institution = %institution.code, %request_id, reason = failure.reason.name(), "settlement declined")
            }
        }
        let answer = result?;
        Ok(Response::new(settlement_to_pb(&answer.record, answer.pin_required)))
    }

    async fn reverse(&self, request: Request<pb::ReverseRequest>) -> Result<Response<pb::Settlement>, Status> {
        let caller = self.caller(&request).await?;
        let institution = caller.institution()?;
        let original = convert::request_id("original_request_id", &request.get_ref().original_request_id)?;
        let record = settle::refund::reverse(&self.gateway, institution, original).await?;
        tracing::info!(institution = %institution.code, request_id = %record.request_id, tombstone = record.tombstone, "reversed");
        Ok(Response::new(settlement_to_pb(&record, false)))
    }

    async fn refund(&self, request: Request<pb::RefundRequest>) -> Result<Response<pb::Refund>, Status> {
        let caller = self.caller(&request).await?;
        let institution = caller.institution()?;
        let body = request.get_ref();
        let command = RefundCommand {
            request_id: convert::request_id("request_id", &body.request_id)?,
            setl_id: convert::text("setl_id", &body.setl_id, true)?,
            amount: convert::optional_money("amount", &body.amount)?,
        };
        let record = settle::refund::refund(&self.gateway, institution, command).await?;
        tracing::info!(institution = %institution.code, setl_id = %record.setl_id, amount = %record.amount, "refunded");
        Ok(Response::new(convert::refund_to_pb(&record)))
    }

    async fn get_settlement(
        &self,
        request: Request<pb::GetSettlementRequest>,
    ) -> Result<Response<pb::Settlement>, Status> {
        let caller = self.caller(&request).await?;
        let institution = caller.institution()?;
        let key = match &request.get_ref().key {
            Some(pb::get_settlement_request::Key::SetlId(id)) => {
                SettlementKey::SetlId(convert::text("setl_id", id, true)?)
            }
            Some(pb::get_settlement_request::Key::RequestId(id)) => SettlementKey::Request {
                institution_code: institution.code.clone(),
                request_id: convert::request_id("request_id", id)?,
            },
            None => return Err(Failure::invalid("key", "give setl_id or request_id").into()),
        };
        let record = settle::refund::get(&self.gateway, institution, key).await?;
        let pin_required = record.auth_method == Some(crate::domain::AuthMethod::Pin);
        Ok(Response::new(settlement_to_pb(&record, pin_required)))
    }
}
