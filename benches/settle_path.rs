//! In-process settlement throughput on the embedded default (SQLite ledger with group commit,
//! in-process balance cache): many concurrent e-voucher settlements, each durable before it
//! returns. No gRPC: this measures the settlement path itself. The open-loop gRPC load generator
//! is a later issue.
//!
//! `cargo bench --bench settle_path` runs the measurement; under `cargo test` (no `--bench`
//! argument) it runs a small smoke pass so the benchmark cannot rot.

use std::sync::Arc;
use std::time::{Duration, Instant};
use yibao::admin::{self, AdjustCommand};
use yibao::clock::SystemClock;
use yibao::config::Config;
use yibao::domain::{Category, Channel, InstitutionKind, InsuranceStatus, Money, PayMode, PersonCategory};
use yibao::ledger::{InstitutionRecord, PersonUpsert};
use yibao::pin::PinCost;
use yibao::settle::{self, SettleCommand};

fn main() {
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let (accounts, settlements, concurrency) = if measuring { (10_000, 40_000, 128) } else { (50, 200, 16) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(run(accounts, settlements, concurrency, measuring));
}

async fn run(accounts: usize, settlements: usize, concurrency: usize, measuring: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        // YIBAO_BENCH_LEDGER_URL / YIBAO_BENCH_REDIS_URL measure the production backends instead.
        ledger_url: std::env::var("YIBAO_BENCH_LEDGER_URL").ok().filter(|u| !u.is_empty()),
        redis_url: std::env::var("YIBAO_BENCH_REDIS_URL").ok().filter(|u| !u.is_empty()),
        pepper: b"bench".to_vec(),
        pin_cost: PinCost::TEST,
        ..Config::embedded(dir.path().to_path_buf())
    };
    let app = yibao::app::build(&config, Arc::new(SystemClock)).await.unwrap();
    let run_id = std::process::id();
    let gateway = app.gateway.clone();
    let institution = InstitutionRecord {
        code: "H001".into(),
        name: "bench".into(),
        kind: InstitutionKind::Hospital,
        region: "110000".into(),
    };
    // Already there when a database is reused between runs; that is fine.
    let _ = admin::register_institution(
        &gateway,
        &institution.code,
        &institution.name,
        institution.kind,
        &institution.region,
    )
    .await;
    for i in 0..accounts {
        let psn_no = format!("B{run_id}x{i:08}");
        let person = PersonUpsert {
            psn_no: psn_no.clone(),
            name: psn_no.clone(),
            birth_date: chrono::NaiveDate::from_ymd_opt(1980, 1, 1).unwrap(),
            region: "110000".into(),
            category: PersonCategory::Employee,
            status: InsuranceStatus::Active,
        };
        admin::upsert_person(&gateway, person).await.unwrap();
        let credit = AdjustCommand {
            request_id: format!("open-{psn_no}"),
            psn_no,
            amount: Money::parse("100000.00").unwrap(),
            credit: true,
            reason: "bench opening balance".into(),
            value_date: None,
        };
        admin::adjust(&gateway, credit).await.unwrap();
    }

    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(settlements);
    for i in 0..settlements {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let (gateway, institution) = (gateway.clone(), institution.clone());
        tasks.push(tokio::spawn(async move {
            let command = SettleCommand {
                request_id: format!("bench-{run_id}-{i}"),
                psn_no: format!("B{run_id}x{:08}", (i * 7919) % accounts),
                amount: Money::parse("12.34").unwrap(),
                channel: Channel::EVoucher,
                category: Category::Outpatient,
                mode: PayMode::Partial,
                self_only: true,
                pin: None,
                mdtrt_id: String::new(),
                ec_token: "bench".into(),
                beneficiary_psn_no: String::new(),
            };
            let begin = Instant::now();
            settle::settle(&gateway, &institution, command).await.expect("settles");
            drop(permit);
            begin.elapsed()
        }));
    }
    let mut latencies: Vec<Duration> = Vec::with_capacity(settlements);
    for task in tasks {
        latencies.push(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let line = format!(
        "settle_path {}: {settlements} settlements over {accounts} accounts, concurrency {concurrency}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        if config.ledger_url.is_some() { "postgres+redis" } else { "embedded" },
        settlements as f64 / elapsed.as_secs_f64(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
    );
    if measuring {
        println!("{line}");
    }
    let trial = gateway.ledger.trial_balance().await.unwrap();
    assert_eq!(trial.personal.checked_add(trial.system), Some(Money::ZERO));
    assert_eq!((trial.unbalanced_txns, trial.drifted_accounts), (0, 0));
}
