//! `yibao serve --demo`: a few people with balances, a family, an institution and its key, so a
//! newcomer can settle within minutes. Idempotent: running it again on the same data directory
//! changes no balance and issues a fresh institution key.

use crate::admin::{self, AdjustCommand};
use crate::domain::{InstitutionKind, InsuranceStatus, Money, PersonCategory, Relation, Role};
use crate::error::{Outcome, Reason};
use crate::gateway::Gateway;
use crate::ledger::{NewApiKey, PersonUpsert};
use chrono::NaiveDate;
use std::sync::Arc;

pub const INSTITUTION_CODE: &str = "H11010001";

/// The demo people: (psn_no, name, birth date, category, opening balance).
const PEOPLE: &[(&str, &str, &str, PersonCategory, &str)] = &[
    ("D1001", "张伟 (payer)", "1985-03-14", PersonCategory::Employee, "120.00"),
    ("D1002", "王芳 (spouse)", "1987-07-02", PersonCategory::Employee, "800.00"),
    ("D1003", "张建国 (father)", "1955-11-20", PersonCategory::Retiree, "1500.00"),
    ("D1004", "张小明 (child, resident)", "2015-05-01", PersonCategory::Resident, "0"),
];

/// Seeds the demo data; returns a fresh institution API key.
pub async fn seed(gateway: &Arc<Gateway>) -> Outcome<String> {
    for (psn_no, name, birth, category, opening) in PEOPLE {
        admin::upsert_person(
            gateway,
            PersonUpsert {
                psn_no: psn_no.to_string(),
                name: name.to_string(),
                birth_date: NaiveDate::parse_from_str(birth, "%Y-%m-%d").expect("demo date"),
                region: "110000".into(),
                category: *category,
                status: InsuranceStatus::Active,
            },
        )
        .await?;
        let opening = Money::parse(opening).expect("demo amount");
        if !opening.is_zero() {
            admin::adjust(
                gateway,
                AdjustCommand {
                    request_id: format!("demo-opening-{psn_no}"),
                    psn_no: psn_no.to_string(),
                    amount: opening,
                    credit: true,
                    reason: "demo opening balance".into(),
                    value_date: None,
                },
            )
            .await?;
        }
    }
    // The spouse and the father register the payer; the child is registered by the payer.
    for (owner, member, relation) in
        [("D1002", "D1001", Relation::Spouse), ("D1003", "D1001", Relation::Child), ("D1001", "D1004", Relation::Child)]
    {
        match crate::accounts::register_family(gateway, owner, member, relation).await {
            Ok(_) => {}
            Err(failure) if failure.reason == Reason::AlreadyExists => {}
            Err(failure) => return Err(failure),
        }
    }
    let api_key = match admin::register_institution(
        gateway,
        INSTITUTION_CODE,
        "北京示范医院 Demo Hospital",
        InstitutionKind::Hospital,
        "110000",
    )
    .await
    {
        Ok(key) => key,
        Err(failure) if failure.reason == Reason::AlreadyExists => {
            let key = admin::new_api_key();
            gateway
                .ledger
                .insert_api_key(NewApiKey {
                    key_hash: admin::hash_api_key(&key),
                    key_id: gateway.new_id('K'),
                    role: Role::Institution,
                    institution_code: Some(INSTITUTION_CODE.into()),
                    label: "demo".into(),
                    at: gateway.clock.now(),
                })
                .await?;
            key
        }
        Err(failure) => return Err(failure),
    };
    Ok(api_key)
}
