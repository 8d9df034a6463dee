//! AdminService: operator work.

use super::convert;
use super::pb::{self, admin_service_server::AdminService};
use super::Services;
use crate::admin::{self, AdjustCommand};
use crate::crediting;
use crate::domain::credit::Skip;
use crate::domain::{AccountStatus, Role};
use crate::error::Outcome;
use crate::error::{Failure, Reason};
use crate::ledger::{LifecycleRecord, PersonRecord, PersonUpsert};
use crate::lifecycle;
use crate::pin::Secret;
use tonic::{Request, Response, Status};

impl Services {
    async fn operator<T>(&self, request: &Request<T>) -> Outcome<()> {
        let caller = self.caller(request).await?;
        caller.require(&[Role::Operator])
    }
}

/// A batch run's step: where to resume (a person number, or from the start) and how many
/// accounts at most (0: all).
fn steps(resume_after: &str, max_accounts: u64) -> Result<(Option<String>, Option<u64>), Status> {
    let resume_after = match resume_after {
        "" => None,
        after => Some(convert::psn_no("resume_after", after)?),
    };
    Ok((resume_after, (max_accounts > 0).then_some(max_accounts)))
}

fn lifecycle_to_pb(record: &LifecycleRecord) -> pb::LifecycleResponse {
    pb::LifecycleResponse {
        psn_no: record.psn_no.clone(),
        amount: record.amount.to_string(),
        account_status: convert::account_status_to_pb(Some(record.account_status)) as i32,
        at: convert::timestamp(record.at),
        interest: record.interest.to_string(),
    }
}

fn person_to_pb(person: &PersonRecord) -> pb::Person {
    pb::Person {
        psn_no: person.psn_no.clone(),
        name: person.name.clone(),
        birth_date: person.birth_date.to_string(),
        region: person.region.clone(),
        category: convert::person_category_to_pb(person.category) as i32,
        status: convert::insurance_status_to_pb(person.status) as i32,
        account_status: convert::account_status_to_pb(person.account.as_ref().map(|a| a.status)) as i32,
        balance: person.account.as_ref().map(|a| a.balance).unwrap_or_default().to_string(),
    }
}

#[tonic::async_trait]
impl AdminService for Services {
    async fn upsert_person(&self, request: Request<pb::UpsertPersonRequest>) -> Result<Response<pb::Person>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let upsert = PersonUpsert {
            psn_no: convert::psn_no("psn_no", &body.psn_no)?,
            name: convert::text("name", &body.name, true)?,
            birth_date: convert::date("birth_date", &body.birth_date)?,
            region: convert::region("region", &body.region)?,
            category: convert::person_category(body.category)?,
            status: convert::insurance_status(body.status)?,
        };
        let person = admin::upsert_person(&self.gateway, upsert).await?;
        Ok(Response::new(person_to_pb(&person)))
    }

    async fn register_institution(
        &self,
        request: Request<pb::RegisterInstitutionRequest>,
    ) -> Result<Response<pb::RegisterInstitutionResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let code = convert::psn_no("code", &body.code)?;
        let name = convert::text("name", &body.name, true)?;
        let kind = convert::institution_kind(body.kind)?;
        let region = convert::region("region", &body.region)?;
        let api_key = admin::register_institution(&self.gateway, &code, &name, kind, &region).await?;
        tracing::info!(%code, %kind, "institution registered");
        Ok(Response::new(pb::RegisterInstitutionResponse { code, api_key }))
    }

    async fn issue_api_key(
        &self,
        request: Request<pb::IssueApiKeyRequest>,
    ) -> Result<Response<pb::IssueApiKeyResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let role = convert::role(body.role)?;
        let label = convert::text("label", &body.label, true)?;
        let (key_id, api_key) = admin::issue_api_key(&self.gateway, role, &label).await?;
        tracing::info!(%key_id, %role, "API key issued");
        Ok(Response::new(pb::IssueApiKeyResponse { key_id, api_key }))
    }

    async fn adjust(&self, request: Request<pb::AdjustRequest>) -> Result<Response<pb::AdjustResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let credit = match pb::AdjustDirection::try_from(body.direction) {
            Ok(pb::AdjustDirection::Credit) => true,
            Ok(pb::AdjustDirection::Debit) => false,
            _ => {
                return Err(crate::error::Failure::invalid(
                    "direction",
                    "is required (ADJUST_DIRECTION_CREDIT or _DEBIT)",
                )
                .into())
            }
        };
        let command = AdjustCommand {
            request_id: convert::request_id("request_id", &body.request_id)?,
            psn_no: convert::psn_no("psn_no", &body.psn_no)?,
            amount: convert::money("amount", &body.amount)?,
            credit,
            reason: convert::text("reason", &body.reason, true)?,
            value_date: convert::optional_date("value_date", &body.value_date)?,
        };
        let record = admin::adjust(&self.gateway, command).await?;
        tracing::info!(request_id = %record.request_id, delta = %record.delta, "adjusted");
        Ok(Response::new(pb::AdjustResponse {
            entry_id: record.entry_id.to_string(),
            psn_no: record.psn_no,
            amount: record.delta.to_string(),
            balance: record.balance_after.to_string(),
            at: convert::timestamp(record.at),
        }))
    }

    async fn record_contribution(
        &self,
        request: Request<pb::RecordContributionRequest>,
    ) -> Result<Response<pb::RecordContributionResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        let period = convert::period("period", &body.period)?;
        let base = convert::amount("base", &body.base)?;
        let category = match body.category {
            0 => None,
            value => Some(convert::person_category(value)?),
        };
        crediting::record_contribution(&self.gateway, &psn_no, period, base, body.paid, category).await?;
        Ok(Response::new(pb::RecordContributionResponse {}))
    }

    async fn run_monthly_credit(
        &self,
        request: Request<pb::RunMonthlyCreditRequest>,
    ) -> Result<Response<pb::RunMonthlyCreditResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let region = convert::region("region", &body.region)?;
        let period = convert::period("period", &body.period)?;
        let (resume_after, max_accounts) = steps(&body.resume_after, body.max_accounts)?;
        // The run goes on to the end of its chunk if the caller goes away: every chunk commits
        // whole, and a repeated run picks up what is left.
        let gateway = self.gateway.clone();
        let run = tokio::spawn(async move {
            let started = std::time::Instant::now();
            crediting::run_monthly_credit(&gateway, &region, period, resume_after, max_accounts, |report| {
                tracing::info!(
                    %region, %period, accounts = report.accounts, credited = report.credited,
                    already = report.already_credited, skipped = report.skipped_total(),
                    back = report.back_months_credited, total = %report.credited_total,
                    seconds = started.elapsed().as_secs(), "monthly credit progress"
                );
            })
            .await
        });
        let report = run.await.map_err(|_| Failure::new(Reason::Internal, "the crediting run failed"))??;
        let counts = |map: &std::collections::BTreeMap<Skip, u64>| {
            map.iter().map(|(skip, n)| pb::SkipCount { reason: skip.name().into(), accounts: *n }).collect()
        };
        Ok(Response::new(pb::RunMonthlyCreditResponse {
            credited: report.credited,
            skipped: report.skipped_total(),
            total: report.credited_total.to_string(),
            accounts: report.accounts,
            already_credited: report.already_credited,
            skipped_by_reason: counts(&report.skipped),
            back_months_credited: report.back_months_credited,
            back_months_skipped: counts(&report.back_months_skipped),
            mutual_aid_total: report.mutual_aid_total.to_string(),
            resume_after: report.resume_after.unwrap_or_default(),
        }))
    }

    async fn accrue_interest(
        &self,
        request: Request<pb::AccrueInterestRequest>,
    ) -> Result<Response<pb::AccrueInterestResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let region = convert::region("region", &body.region)?;
        let as_of = convert::date("as_of", &body.as_of)?;
        let (resume_after, max_accounts) = steps(&body.resume_after, body.max_accounts)?;
        let gateway = self.gateway.clone();
        // As a crediting run: chunks commit whole whether or not the caller waits.
        let run = tokio::spawn(async move {
            crediting::accrue_interest(&gateway, &region, as_of, resume_after, max_accounts, |report| {
                tracing::info!(
                    %region, %as_of, accounts = report.accounts, credited = report.credited,
                    already = report.already_settled, total = %report.total, "interest progress"
                );
            })
            .await
        });
        let report = run.await.map_err(|_| Failure::new(Reason::Internal, "the interest run failed"))??;
        let policy = self.gateway.policy(&body.region)?;
        let start = crate::domain::interest::period_ending(policy.interest.settlement, as_of)
            .map(|(start, _)| start.to_string())
            .unwrap_or_default();
        Ok(Response::new(pb::AccrueInterestResponse {
            accounts: report.accounts,
            total: report.total.to_string(),
            credited: report.credited,
            already_settled: report.already_settled,
            closed: report.closed,
            nothing_due: report.nothing_due,
            resume_after: report.resume_after.unwrap_or_default(),
            period_start: start,
        }))
    }

    async fn set_interest_rate(
        &self,
        request: Request<pb::SetInterestRateRequest>,
    ) -> Result<Response<pb::SetInterestRateResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let region = convert::region("region", &body.region)?;
        let effective_from = convert::date("effective_from", &body.effective_from)?;
        let rate = convert::rate_percent("annual_rate_percent", &body.annual_rate_percent)?;
        crediting::set_interest_rate(&self.gateway, &region, effective_from, rate).await?;
        tracing::info!(%region, %effective_from, %rate, "interest rate set");
        Ok(Response::new(pb::SetInterestRateResponse {}))
    }

    async fn transfer_out(
        &self,
        request: Request<pb::TransferOutRequest>,
    ) -> Result<Response<pb::LifecycleResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let request_id = convert::request_id("request_id", &body.request_id)?;
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        let record = lifecycle::transfer_out(&self.gateway, &request_id, &psn_no, &body.to_region).await?;
        Ok(Response::new(lifecycle_to_pb(&record)))
    }

    async fn transfer_in(
        &self,
        request: Request<pb::TransferInRequest>,
    ) -> Result<Response<pb::LifecycleResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let request_id = convert::request_id("request_id", &body.request_id)?;
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        let amount = convert::money("amount", &body.amount)?;
        let value_date = convert::optional_date("value_date", &body.value_date)?;
        let record =
            lifecycle::transfer_in(&self.gateway, &request_id, &psn_no, &body.from_region, amount, value_date).await?;
        Ok(Response::new(lifecycle_to_pb(&record)))
    }

    async fn liquidate(
        &self,
        request: Request<pb::LiquidateRequest>,
    ) -> Result<Response<pb::LifecycleResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let request_id = convert::request_id("request_id", &body.request_id)?;
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        let reason = convert::text("reason", &body.reason, true)?;
        let record = lifecycle::liquidate(&self.gateway, &request_id, &psn_no, &reason).await?;
        Ok(Response::new(lifecycle_to_pb(&record)))
    }

    async fn reset_pin(&self, request: Request<pb::ResetPinRequest>) -> Result<Response<pb::ResetPinResponse>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        crate::accounts::reset_pin(&self.gateway, &psn_no, &Secret::new(body.new_pin.clone())).await?;
        tracing::info!(psn_no = %crate::domain::mask_psn_no(&psn_no), "PIN reset by an operator");
        Ok(Response::new(pb::ResetPinResponse { psn_no }))
    }

    async fn freeze_account(&self, request: Request<pb::FreezeAccountRequest>) -> Result<Response<pb::Person>, Status> {
        self.operator(&request).await?;
        let body = request.get_ref();
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        convert::text("reason", &body.reason, false)?;
        let person = admin::set_account_status(&self.gateway, &psn_no, AccountStatus::Frozen).await?;
        Ok(Response::new(person_to_pb(&person)))
    }

    async fn unfreeze_account(
        &self,
        request: Request<pb::UnfreezeAccountRequest>,
    ) -> Result<Response<pb::Person>, Status> {
        self.operator(&request).await?;
        let psn_no = convert::psn_no("psn_no", &request.get_ref().psn_no)?;
        let person = admin::set_account_status(&self.gateway, &psn_no, AccountStatus::Open).await?;
        Ok(Response::new(person_to_pb(&person)))
    }
}
