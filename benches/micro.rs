//! criterion micro-benchmarks of the settlement path's parts: the deduction plan, money parsing,
//! PIN verification at the configured cost, and one in-process settlement on the embedded backends.
//!
//! `cargo bench --bench micro`; under `cargo test` each runs once (criterion's test mode).

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use yibao::domain::plan::plan;
use yibao::domain::{Category, Channel, InstitutionKind, InsuranceStatus, Money, PayMode, PersonCategory};
use yibao::ledger::{InstitutionRecord, PersonUpsert};
use yibao::pin::{PinCost, PinHasher, Secret};

fn money(c: &mut Criterion) {
    c.bench_function("money_parse", |b| b.iter(|| Money::parse(black_box("12345.67")).unwrap()));
    c.bench_function("money_parse_refused", |b| b.iter(|| Money::parse(black_box("1e3")).is_err()));
    let amount = Money::parse("987.65").unwrap();
    c.bench_function("money_display", |b| b.iter(|| black_box(amount).to_string()));
}

fn deduction_plan(c: &mut Criterion) {
    let available: Vec<Money> =
        ["120.00", "800.00", "1500.00", "30.00"].iter().map(|a| Money::parse(a).unwrap()).collect();
    let amount = Money::parse("1000.00").unwrap();
    c.bench_function("plan_own_plus_three_family", |b| {
        b.iter(|| plan(black_box(amount), PayMode::Partial, black_box(&available)).unwrap())
    });
}

fn pin(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let hasher = PinHasher::new(b"bench-pepper".to_vec(), PinCost::OWASP, 2).unwrap();
    let pin = Secret::new("284617");
    let phc = runtime.block_on(hasher.hash(&pin)).unwrap();
    let mut group = c.benchmark_group("pin");
    group.sample_size(10);
    group.bench_function("verify_owasp_cost", |b| {
        b.to_async(&runtime).iter(|| async { hasher.verify(&pin, &phc).await.unwrap() })
    });
    group.finish();
}

fn settlement(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = yibao::config::Config {
        pepper: b"bench".to_vec(),
        pin_cost: PinCost::TEST,
        ..yibao::config::Config::embedded(dir.path().to_path_buf())
    };
    let gateway = runtime.block_on(async {
        let app = yibao::app::build(&config, Arc::new(yibao::clock::SystemClock)).await.unwrap();
        let gateway = app.gateway.clone();
        yibao::admin::register_institution(&gateway, "H001", "bench", InstitutionKind::Hospital, "110000")
            .await
            .unwrap();
        let person = PersonUpsert {
            psn_no: "M1".into(),
            name: "M1".into(),
            birth_date: chrono::NaiveDate::from_ymd_opt(1980, 1, 1).unwrap(),
            region: "110000".into(),
            category: PersonCategory::Employee,
            status: InsuranceStatus::Active,
        };
        yibao::admin::upsert_person(&gateway, person).await.unwrap();
        let credit = yibao::admin::AdjustCommand {
            request_id: "open".into(),
            psn_no: "M1".into(),
            amount: Money::parse("1000000.00").unwrap(),
            credit: true,
            reason: "bench".into(),
            value_date: None,
        };
        yibao::admin::adjust(&gateway, credit).await.unwrap();
        gateway
    });
    let institution = InstitutionRecord {
        code: "H001".into(),
        name: "bench".into(),
        kind: InstitutionKind::Hospital,
        region: "110000".into(),
    };
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("settle");
    group.sample_size(20);
    group.bench_function("embedded_one_settlement_durable", |b| {
        b.to_async(&runtime).iter(|| async {
            let command = yibao::settle::SettleCommand {
                request_id: format!("m-{}", next.fetch_add(1, Ordering::Relaxed)),
                psn_no: "M1".into(),
                amount: Money::parse("0.01").unwrap(),
                channel: Channel::EVoucher,
                category: Category::Outpatient,
                mode: PayMode::Partial,
                self_only: true,
                pin: None,
                mdtrt_id: String::new(),
                ec_token: "bench".into(),
                beneficiary_psn_no: String::new(),
            };
            yibao::settle::settle(&gateway, &institution, command).await.unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, money, deduction_plan, pin, settlement);
criterion_main!(benches);
