//! The bench population, set up through the API as an operator would: people with balances, a
//! group of payers with empty own accounts who draw on 1–3 family accounts, a group with PINs, and
//! an institution. Idempotent for a prefix: a second run reuses what is there.

use super::{LoadOptions, Mix, BENCH_PIN};
use crate::rpc::pb;
use std::sync::Arc;
use tonic::transport::Channel;

/// Calls in flight during set-up.
const SETUP_CONCURRENCY: usize = 64;
/// Opening balance of every funded bench account: far more than a run spends.
const OPENING: &str = "100000.00";

#[derive(Debug, Clone)]
pub struct Population {
    pub institution_key: String,
    /// Funded accounts; the first 1% are the hot ones.
    pub payers: Vec<String>,
    /// Payers with an empty own account and 1–3 registered family accounts.
    pub family_payers: Vec<String>,
    /// Funded payers with a PIN (BENCH_PIN).
    pub pin_payers: Vec<String>,
}

impl Population {
    /// The hottest 1% of the funded accounts (at least one when there are any): where
    /// `LoadOptions::hot_share` of the traffic goes, and what `--audit` checks.
    pub fn hot_payers(&self) -> &[String] {
        let hot = (self.payers.len() / 100).max(1).min(self.payers.len());
        &self.payers[..hot]
    }

    /// The n-th request of a run, drawn by the scenario's shares.
    pub fn request(&self, options: &LoadOptions, mix: &mut Mix, n: u64) -> pb::SettleRequest {
        let pick = mix.unit();
        let (psn_no, card) = if pick < options.pin_share && !self.pin_payers.is_empty() {
            (&self.pin_payers[mix.below(self.pin_payers.len())], true)
        } else if pick < options.pin_share + options.family_share && !self.family_payers.is_empty() {
            (&self.family_payers[mix.below(self.family_payers.len())], false)
        } else if mix.unit() < options.hot_share {
            let hot = self.hot_payers();
            (&hot[mix.below(hot.len())], false)
        } else {
            (&self.payers[mix.below(self.payers.len())], false)
        };
        pb::SettleRequest {
            request_id: format!("{}-{n}", options.run_id),
            psn_no: psn_no.clone(),
            amount: options.amount.clone(),
            channel: if card { pb::Channel::Card } else { pb::Channel::EVoucher } as i32,
            category: pb::Category::Outpatient as i32,
            mode: pb::PayMode::Partial as i32,
            pin: if card { BENCH_PIN.into() } else { String::new() },
            ec_token: if card { String::new() } else { "bench".into() },
            ..Default::default()
        }
    }
}

fn auth<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Runs `work` over `items` with bounded concurrency, printing progress on one line.
async fn for_all<F, Fut>(label: &str, items: Vec<String>, work: F) -> Result<(), String>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let total = items.len();
    let work = Arc::new(work);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(SETUP_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (done, item) in items.into_iter().enumerate() {
        let permit = semaphore.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let work = work.clone();
        tasks.spawn(async move {
            let result = work(item).await;
            drop(permit);
            result
        });
        while let Some(result) = tasks.try_join_next() {
            result.map_err(|e| e.to_string())??;
        }
        if done % 1000 == 0 {
            eprint!("\r{label}: {done}/{total}");
        }
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| e.to_string())??;
    }
    eprintln!("\r{label}: {total}/{total}");
    Ok(())
}

fn ignore_exists(result: Result<(), tonic::Status>) -> Result<(), String> {
    match result {
        Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(()),
        other => other.map_err(|status| format!("{:?}: {}", status.code(), status.message())),
    }
}

/// The population's person numbers.
pub struct Names {
    /// Funded accounts; the first 1% are the hot ones.
    pub payers: Vec<String>,
    /// Payers with an empty own account who draw on 1–3 family accounts.
    pub family_payers: Vec<String>,
    /// Funded payers with a PIN: 1,000 spread over the payers.
    pub pin_payers: Vec<String>,
}

pub fn names(prefix: &str, accounts: usize) -> Names {
    let accounts = accounts.max(100);
    let payers: Vec<String> = (0..accounts).map(|i| format!("{prefix}{i:08}")).collect();
    let family_payers: Vec<String> = (0..(accounts / 10).max(10)).map(|i| format!("{prefix}F{i:07}")).collect();
    let pin_payers: Vec<String> = payers.iter().step_by((accounts / 1000).max(1)).take(1000).cloned().collect();
    Names { payers, family_payers, pin_payers }
}

/// Family payer `index` draws on 1–3 funded accounts (indexes into the payers), in this order.
fn family_owners(index: usize, payers: usize) -> Vec<(usize, pb::Relation)> {
    let mut mix = Mix::new(index as u64);
    let relations = [pb::Relation::Spouse, pb::Relation::Parent, pb::Relation::Child];
    relations
        .iter()
        .take(1 + index % 3)
        .enumerate()
        .map(|(slot, relation)| ((index * 7 + slot * 13 + mix.below(5)) % payers, *relation))
        .collect()
}

/// Writes the population `prefix` as the two CSV files `yibao admin import` takes (people.csv and
/// families.csv in `dir`): the same people, balances and families `setup` would create through the
/// API, for populations too large to create call by call.
pub fn write_population(prefix: &str, accounts: usize, dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let Names { payers, family_payers, .. } = names(prefix, accounts);
    std::fs::create_dir_all(dir)?;
    let mut people = std::io::BufWriter::new(std::fs::File::create(dir.join("people.csv"))?);
    writeln!(people, "psn_no,name,birth_date,region,category,status,opening_balance")?;
    for psn_no in &payers {
        writeln!(people, "{psn_no},{psn_no},1980-01-01,110000,EMPLOYEE,ACTIVE,{OPENING}")?;
    }
    for psn_no in &family_payers {
        writeln!(people, "{psn_no},{psn_no},1980-01-01,110000,EMPLOYEE,ACTIVE,0.00")?;
    }
    people.flush()?;
    let mut families = std::io::BufWriter::new(std::fs::File::create(dir.join("families.csv"))?);
    writeln!(families, "owner_psn_no,member_psn_no,relation")?;
    for (index, member) in family_payers.iter().enumerate() {
        for (owner, relation) in family_owners(index, payers.len()) {
            let relation = relation.as_str_name().trim_start_matches("RELATION_");
            writeln!(families, "{},{member},{relation}", payers[owner])?;
        }
    }
    families.flush()
}

/// People, opening balances and families through the API, as an operator would.
async fn set_up_people(
    key: &str,
    channel: &Channel,
    payers: &[String],
    family_payers: &[String],
) -> Result<(), String> {
    let (payers, family_payers, key, channel) =
        (payers.to_vec(), family_payers.to_vec(), key.to_string(), channel.clone());
    let upsert = |key: String, channel: Channel| {
        move |psn_no: String| {
            let (key, channel) = (key.clone(), channel.clone());
            async move {
                let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
                let person = pb::UpsertPersonRequest {
                    psn_no: psn_no.clone(),
                    name: psn_no.clone(),
                    birth_date: "1980-01-01".into(),
                    region: "110000".into(),
                    category: pb::PersonCategory::Employee as i32,
                    status: pb::InsuranceStatus::Active as i32,
                };
                admin.upsert_person(auth(person, &key)).await.map_err(|s| s.message().to_string())?;
                Ok::<(), String>(())
            }
        }
    };
    for_all("people", payers.clone(), upsert(key.clone(), channel.clone())).await?;
    for_all("family payers", family_payers.clone(), upsert(key.clone(), channel.clone())).await?;
    let (k, c) = (key.clone(), channel.clone());
    for_all("balances", payers.clone(), move |psn_no: String| {
        let (key, channel) = (k.clone(), c.clone());
        async move {
            let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
            let credit = pb::AdjustRequest {
                request_id: format!("bench-open-{psn_no}"),
                psn_no,
                amount: OPENING.into(),
                direction: pb::AdjustDirection::Credit as i32,
                reason: "bench opening balance".into(),
                value_date: String::new(),
            };
            admin.adjust(auth(credit, &key)).await.map(|_| ()).map_err(|s| s.message().to_string())
        }
    })
    .await?;
    // Family payer i draws on 1–3 funded accounts, in registration order.
    let payers_for_family = Arc::new(payers.clone());
    let (k, c) = (key.clone(), channel.clone());
    for_all("families", family_payers.clone(), move |member: String| {
        let (key, channel, payers) = (k.clone(), c.clone(), payers_for_family.clone());
        async move {
            let mut account = pb::account_service_client::AccountServiceClient::new(channel);
            let index: usize = member.rsplit('F').next().and_then(|n| n.parse().ok()).unwrap_or(0);
            for (owner, relation) in family_owners(index, payers.len()) {
                let request = pb::RegisterFamilyMemberRequest {
                    owner_psn_no: payers[owner].clone(),
                    member_psn_no: member.clone(),
                    relation: relation as i32,
                };
                ignore_exists(account.register_family_member(auth(request, &key)).await.map(|_| ()))?;
            }
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// Sets up (or reuses) the population `prefix` on the gateway at `channel`. With `imported`, its
/// people, balances and families were imported before (`write_population`), and only PINs and the
/// run's institution are set up here.
pub async fn setup(
    channel: Channel,
    operator_key: &str,
    prefix: &str,
    accounts: usize,
    run_id: &str,
    imported: bool,
) -> Result<Population, String> {
    let Names { payers, family_payers, pin_payers } = names(prefix, accounts);
    let key = operator_key.to_string();
    if imported {
        eprintln!("people, balances and families: imported before (yibao bench population + yibao admin import)");
    } else {
        set_up_people(&key, &channel, &payers, &family_payers).await?;
    }

    let (k, c) = (key.clone(), channel.clone());
    for_all("PINs", pin_payers.clone(), move |psn_no: String| {
        let (key, channel) = (k.clone(), c.clone());
        async move {
            let mut account = pb::account_service_client::AccountServiceClient::new(channel);
            let request = pb::SetPinRequest { psn_no, new_pin: BENCH_PIN.into() };
            ignore_exists(account.set_pin(auth(request, &key)).await.map(|_| ()))
        }
    })
    .await?;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
    let institution = pb::RegisterInstitutionRequest {
        // A fresh institution per run, its code short and valid whatever the scenario name.
        code: format!("B{}", &crate::gateway::digest(&[run_id])[..16]),
        name: "bench hospital".into(),
        kind: pb::InstitutionKind::Hospital as i32,
        region: "110000".into(),
    };
    let institution_key = admin
        .register_institution(auth(institution, &key))
        .await
        .map_err(|s| format!("register the bench institution: {}", s.message()))?
        .into_inner()
        .api_key;
    Ok(Population { institution_key, payers, family_payers, pin_payers })
}
