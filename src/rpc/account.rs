//! AccountService: the service platform (SERVICE keys) and window clerks (OPERATOR keys); an
//! institution may only look up a balance.

use super::convert::{self, family_link_to_pb};
use super::pb::{self, account_service_server::AccountService};
use super::Services;
use crate::accounts;
use crate::domain::Role;
use crate::error::{Failure, Outcome};
use crate::ledger::{FamilyView, PersonRecord, Principal};
use crate::pin::Secret;
use tonic::{Request, Response, Status};

const SELF_SERVICE: &[Role] = &[Role::Service, Role::Operator];

impl Services {
    async fn self_service<T>(&self, request: &Request<T>) -> Outcome<Principal> {
        let caller = self.caller(request).await?;
        caller.require(SELF_SERVICE)?;
        Ok(caller)
    }

    async fn balance_pb(&self, psn_no: &str) -> Outcome<pb::Balance> {
        let view = accounts::balance(&self.gateway, psn_no).await?;
        Ok(balance_to_pb(&view.person, view.available, self.gateway.clock.today()))
    }
}

fn balance_to_pb(person: &PersonRecord, available: crate::domain::Money, today: chrono::NaiveDate) -> pb::Balance {
    pb::Balance {
        psn_no: person.psn_no.clone(),
        balance: person.account.as_ref().map(|a| a.balance).unwrap_or_default().to_string(),
        available: available.to_string(),
        account_status: convert::account_status_to_pb(person.account.as_ref().map(|a| a.status)) as i32,
        card_status: convert::card_status_to_pb(person.card_status) as i32,
        no_pin_tier: person.no_pin_tier.clone().unwrap_or_else(|| "NONE".into()),
        pin_set: person.pin_set,
        pin_locked: person.pin_locked_until.is_some_and(|until| today < until),
    }
}

fn family_to_pb(
    view: &FamilyView,
    person: &PersonRecord,
    today: chrono::NaiveDate,
    family_start: chrono::NaiveDate,
) -> pb::ListFamilyResponse {
    let mut usable = Vec::new();
    if let Some(account) = &person.account {
        usable.push(pb::UsableAccount {
            owner_psn_no: person.psn_no.clone(),
            relation: pb::Relation::Unspecified as i32,
            own: true,
            effective_from: String::new(),
            usable_now: account.status == crate::domain::AccountStatus::Open,
        });
    }
    for record in &view.usable {
        usable.push(pb::UsableAccount {
            owner_psn_no: record.owner_psn_no.clone(),
            relation: convert::relation_to_pb(record.relation) as i32,
            own: false,
            effective_from: record.effective_from.to_string(),
            usable_now: record.effective_from <= today
                && today >= family_start
                && record.account_status == crate::domain::AccountStatus::Open,
        });
    }
    pb::ListFamilyResponse { members: view.members.iter().map(family_link_to_pb).collect(), usable_accounts: usable }
}

#[tonic::async_trait]
impl AccountService for Services {
    async fn get_balance(&self, request: Request<pb::GetBalanceRequest>) -> Result<Response<pb::Balance>, Status> {
        let caller = self.caller(&request).await?;
        caller.require(&[Role::Service, Role::Operator, Role::Institution])?;
        let psn_no = convert::psn_no("psn_no", &request.get_ref().psn_no)?;
        Ok(Response::new(self.balance_pb(&psn_no).await?))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.self_service(&request).await?;
        let body = request.get_ref();
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        let from = convert::optional_date("from_date", &body.from_date)?;
        let to = convert::optional_date("to_date", &body.to_date)?;
        if let (Some(from), Some(to)) = (from, to) {
            if from > to {
                return Err(Failure::invalid("to_date", "is before from_date").into());
            }
        }
        let before = if body.page_token.is_empty() {
            None
        } else {
            Some(
                body.page_token
                    .parse::<i64>()
                    .map_err(|_| Failure::invalid("page_token", "is not a token from a previous page"))?,
            )
        };
        let (entries, next) =
            accounts::entries(&self.gateway, &psn_no, from, to, body.page_size as usize, before).await?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(convert::entry_to_pb).collect(),
            next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn set_pin(&self, request: Request<pb::SetPinRequest>) -> Result<Response<pb::PinResponse>, Status> {
        self.self_service(&request).await?;
        let body = request.get_ref();
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        accounts::set_pin(&self.gateway, &psn_no, &Secret::new(body.new_pin.clone())).await?;
        Ok(Response::new(pb::PinResponse { psn_no, pin_set: true }))
    }

    async fn change_pin(&self, request: Request<pb::ChangePinRequest>) -> Result<Response<pb::PinResponse>, Status> {
        self.self_service(&request).await?;
        let body = request.get_ref();
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        accounts::change_pin(
            &self.gateway,
            &psn_no,
            &Secret::new(body.current_pin.clone()),
            &Secret::new(body.new_pin.clone()),
        )
        .await?;
        Ok(Response::new(pb::PinResponse { psn_no, pin_set: true }))
    }

    async fn list_no_pin_tiers(
        &self,
        request: Request<pb::ListNoPinTiersRequest>,
    ) -> Result<Response<pb::ListNoPinTiersResponse>, Status> {
        self.self_service(&request).await?;
        let psn_no = convert::psn_no("psn_no", &request.get_ref().psn_no)?;
        let person = self.gateway.person(&psn_no).await?;
        let policy = self.gateway.policy(&person.region)?;
        let tiers = policy
            .no_pin_tiers
            .iter()
            .map(|tier| pb::NoPinTier {
                name: tier.name.clone(),
                per_payment_max: tier.per_payment_max.to_string(),
                daily_max: tier.daily_max.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListNoPinTiersResponse {
            tiers,
            current: person.no_pin_tier.unwrap_or_else(|| "NONE".into()),
        }))
    }

    async fn set_no_pin_tier(
        &self,
        request: Request<pb::SetNoPinTierRequest>,
    ) -> Result<Response<pb::Balance>, Status> {
        self.self_service(&request).await?;
        let body = request.get_ref();
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        accounts::set_no_pin_tier(&self.gateway, &psn_no, &Secret::new(body.pin.clone()), &body.tier).await?;
        Ok(Response::new(self.balance_pb(&psn_no).await?))
    }

    async fn report_card_loss(
        &self,
        request: Request<pb::ReportCardLossRequest>,
    ) -> Result<Response<pb::Balance>, Status> {
        self.self_service(&request).await?;
        let psn_no = convert::psn_no("psn_no", &request.get_ref().psn_no)?;
        accounts::report_card_loss(&self.gateway, &psn_no).await?;
        Ok(Response::new(self.balance_pb(&psn_no).await?))
    }

    async fn restore_card(&self, request: Request<pb::RestoreCardRequest>) -> Result<Response<pb::Balance>, Status> {
        self.self_service(&request).await?;
        let body = request.get_ref();
        let psn_no = convert::psn_no("psn_no", &body.psn_no)?;
        accounts::restore_card(&self.gateway, &psn_no, &Secret::new(body.pin.clone())).await?;
        Ok(Response::new(self.balance_pb(&psn_no).await?))
    }

    async fn register_family_member(
        &self,
        request: Request<pb::RegisterFamilyMemberRequest>,
    ) -> Result<Response<pb::FamilyMember>, Status> {
        self.self_service(&request).await?;
        let body = request.get_ref();
        let owner = convert::psn_no("owner_psn_no", &body.owner_psn_no)?;
        let member = convert::psn_no("member_psn_no", &body.member_psn_no)?;
        let relation = convert::relation(body.relation)?;
        let link = accounts::register_family(&self.gateway, &owner, &member, relation).await?;
        Ok(Response::new(family_link_to_pb(&link)))
    }

    async fn revoke_family_member(
        &self,
        request: Request<pb::RevokeFamilyMemberRequest>,
    ) -> Result<Response<pb::FamilyMember>, Status> {
        self.self_service(&request).await?;
        let body = request.get_ref();
        let owner = convert::psn_no("owner_psn_no", &body.owner_psn_no)?;
        let member = convert::psn_no("member_psn_no", &body.member_psn_no)?;
        let link = accounts::revoke_family(&self.gateway, &owner, &member).await?;
        Ok(Response::new(family_link_to_pb(&link)))
    }

    async fn list_family(
        &self,
        request: Request<pb::ListFamilyRequest>,
    ) -> Result<Response<pb::ListFamilyResponse>, Status> {
        self.self_service(&request).await?;
        let psn_no = convert::psn_no("psn_no", &request.get_ref().psn_no)?;
        let (person, view) = accounts::family(&self.gateway, &psn_no).await?;
        let start = self.gateway.policy(&person.region)?.family_start_date;
        Ok(Response::new(family_to_pb(&view, &person, self.gateway.clock.today(), start)))
    }

    async fn set_deduction_order(
        &self,
        request: Request<pb::SetDeductionOrderRequest>,
    ) -> Result<Response<pb::ListFamilyResponse>, Status> {
        self.self_service(&request).await?;
        let body = request.get_ref();
        let member = convert::psn_no("member_psn_no", &body.member_psn_no)?;
        let owners = body
            .owner_psn_nos
            .iter()
            .map(|owner| convert::psn_no("owner_psn_nos", owner))
            .collect::<Outcome<Vec<_>>>()?;
        let (person, view) = accounts::set_deduction_order(&self.gateway, &member, &owners).await?;
        let start = self.gateway.policy(&person.region)?.family_start_date;
        Ok(Response::new(family_to_pb(&view, &person, self.gateway.clock.today(), start)))
    }
}
