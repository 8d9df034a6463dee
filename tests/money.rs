//! Money in and out by regional policy (issue 5): contributions, the monthly crediting run,
//! interest, transfers and liquidation, and what a person's status does to paying — through the
//! real gRPC API (and the `yibao` binary) on both backends, with amounts to the fen.

mod common;

use common::*;
use tonic::Code;
use yibao::rpc::pb;

const JILIN: &str = "220000";

/// A gateway whose business date is 2 January 2025, when the people of a test are created; runs
/// happen after [`after_the_months`].
async fn start_in_2025(backend: Backend) -> TestGateway {
    let gw = TestGateway::start_with(backend).await;
    set_today(&gw, "2025-01-02");
    gw
}

/// Moves the business date past the months the tests credit (2025-01 … 2025-11).
fn after_the_months(gw: &TestGateway) {
    set_today(gw, "2025-12-01");
}

async fn upsert(
    gw: &TestGateway,
    psn_no: &str,
    region: &str,
    category: pb::PersonCategory,
    birth: &str,
    status: pb::InsuranceStatus,
) {
    let request = pb::UpsertPersonRequest {
        psn_no: psn_no.into(),
        name: format!("name of {psn_no}"),
        birth_date: birth.into(),
        region: region.into(),
        category: category as i32,
        status: status as i32,
    };
    gw.admin().upsert_person(auth(request, OPERATOR_KEY)).await.expect("upsert person");
}

async fn person_born(gw: &TestGateway, psn_no: &str, region: &str, category: pb::PersonCategory, birth: &str) {
    upsert(gw, psn_no, region, category, birth, pb::InsuranceStatus::Active).await
}

async fn set_rate(gw: &TestGateway, region: &str, effective_from: &str, percent: &str) {
    let rate = pb::SetInterestRateRequest {
        region: region.into(),
        effective_from: effective_from.into(),
        annual_rate_percent: percent.into(),
    };
    gw.admin().set_interest_rate(auth(rate, OPERATOR_KEY)).await.expect("rate");
}

async fn contribution(gw: &TestGateway, psn_no: &str, period: &str, base: &str, paid: bool) {
    let request = pb::RecordContributionRequest {
        psn_no: psn_no.into(),
        period: period.into(),
        base: base.into(),
        paid,
        ..Default::default()
    };
    gw.admin().record_contribution(auth(request, OPERATOR_KEY)).await.expect("record contribution");
}

async fn run_credit(
    gw: &TestGateway,
    region: &str,
    period: &str,
    resume_after: &str,
    max_accounts: u64,
) -> pb::RunMonthlyCreditResponse {
    let request = pb::RunMonthlyCreditRequest {
        region: region.into(),
        period: period.into(),
        resume_after: resume_after.into(),
        max_accounts,
    };
    gw.admin().run_monthly_credit(auth(request, OPERATOR_KEY)).await.expect("credit run").into_inner()
}

async fn credit_all(gw: &TestGateway, region: &str, period: &str) -> pb::RunMonthlyCreditResponse {
    run_credit(gw, region, period, "", 0).await
}

fn skips(counts: &[pb::SkipCount]) -> Vec<(String, u64)> {
    counts.iter().map(|c| (c.reason.clone(), c.accounts)).collect()
}

/// (kind, amount, memo) of a person's entries, oldest first.
async fn entries(gw: &TestGateway, psn_no: &str) -> Vec<(pb::EntryKind, String, String)> {
    let request = pb::ListEntriesRequest { psn_no: psn_no.into(), page_size: 100, ..Default::default() };
    let mut list = gw.account().list_entries(auth(request, OPERATOR_KEY)).await.expect("entries").into_inner().entries;
    list.reverse();
    list.into_iter().map(|e| (e.kind(), e.amount, e.memo)).collect()
}

async fn a_month_is_credited_to_the_fen_by_regional_rules(backend: Backend) {
    let gw = start_in_2025(backend).await;
    person_born(&gw, "E1", BEIJING, pb::PersonCategory::Employee, "1985-03-02").await;
    person_born(&gw, "E2", BEIJING, pb::PersonCategory::Employee, "1985-03-02").await;
    person_born(&gw, "E3", BEIJING, pb::PersonCategory::Employee, "1985-03-02").await;
    person_born(&gw, "R1", BEIJING, pb::PersonCategory::Retiree, "1955-06-18").await;
    person_born(&gw, "H1", HUNAN, pb::PersonCategory::Retiree, "1950-01-01").await;
    // The cache holds E1 and R1 before the run: the run's credits must reach it.
    assert_eq!(gw.balance_of("E1").await, "0.00");
    assert_eq!(gw.balance_of("R1").await, "0.00");
    after_the_months(&gw);
    // A retiree whose account opened later (moved here in December): May was credited elsewhere.
    person_born(&gw, "R2", BEIJING, pb::PersonCategory::Retiree, "1950-01-01").await;
    contribution(&gw, "E1", "2025-05", "12345.67", true).await;
    contribution(&gw, "E3", "2025-05", "9000.00", false).await;

    let may = credit_all(&gw, BEIJING, "2025-05").await;
    assert_eq!((may.accounts, may.credited, may.skipped, may.already_credited), (5, 2, 3, 0));
    assert_eq!(
        skips(&may.skipped_by_reason),
        vec![("NO_CONTRIBUTION".into(), 1), ("NOT_PAID".into(), 1), ("OPENED_LATER".into(), 1)]
    );
    // 12,345.67 × 2% = 246.9134 → 246.91; the retiree, the month before turning 70: 100.00.
    assert_eq!((may.total.as_str(), may.mutual_aid_total.as_str()), ("346.91", "3.00"));
    assert_eq!(may.resume_after, "");
    assert_eq!(gw.balance_of("E1").await, "246.91");
    assert_eq!(gw.balance_of("R1").await, "97.00");
    assert_eq!(gw.balance_of("E2").await, "0.00");
    assert_eq!(gw.balance_of("H1").await, "0.00", "another region's run credits nobody here");

    // The month of the 70th birthday: 110.00, less the 3.00 premium as its own entry.
    let june = credit_all(&gw, BEIJING, "2025-06").await;
    assert_eq!((june.credited, june.total.as_str(), june.mutual_aid_total.as_str()), (1, "110.00", "3.00"));
    assert_eq!(gw.balance_of("R1").await, "204.00");
    assert_eq!(
        entries(&gw, "R1").await,
        vec![
            (pb::EntryKind::MonthlyCredit, "100.00".into(), "2025-05".into()),
            (pb::EntryKind::MutualAid, "-3.00".into(), "2025-05".into()),
            (pb::EntryKind::MonthlyCredit, "110.00".into(), "2025-06".into()),
            (pb::EntryKind::MutualAid, "-3.00".into(), "2025-06".into()),
        ]
    );

    // Repeating a run credits nothing twice.
    let again = credit_all(&gw, BEIJING, "2025-06").await;
    assert_eq!((again.credited, again.already_credited, again.total.as_str()), (0, 1, "0.00"));
    assert_eq!(again.mutual_aid_total, "0.00");
    assert_eq!(gw.balance_of("R1").await, "204.00");

    let hunan = credit_all(&gw, HUNAN, "2025-06").await;
    assert_eq!((hunan.credited, hunan.total.as_str(), hunan.mutual_aid_total.as_str()), (1, "75.00", "0.00"));
    assert_eq!(gw.balance_of("H1").await, "75.00");

    assert_eq!(gw.balance_of("R2").await, "0.00");
    let all: Vec<String> = ["E1", "E2", "E3", "R1", "R2", "H1"].iter().map(|p| p.to_string()).collect();
    gw.assert_quiet_cache_equals_ledger(&all).await;
    gw.assert_books_balance().await;
}

async fn a_missed_month_paid_later_is_credited_by_the_next_run(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    person_born(&gw, "E1", BEIJING, pb::PersonCategory::Employee, "1980-01-01").await;
    contribution(&gw, "E1", "2025-03", "8000.00", false).await;
    let march = credit_all(&gw, BEIJING, "2025-03").await;
    assert_eq!((march.credited, skips(&march.skipped_by_reason)), (0, vec![("NOT_PAID".into(), 1)]));
    // 补缴: March is paid in April, and April itself.
    contribution(&gw, "E1", "2025-03", "8000.00", true).await;
    contribution(&gw, "E1", "2025-04", "5360.25", true).await;
    // A month before Beijing's rules (2022-09, 000 §21) is not credited by them.
    contribution(&gw, "E1", "2022-08", "3000.00", true).await;
    let april = credit_all(&gw, BEIJING, "2025-04").await;
    // April: 5,360.25 × 2% = 107.205 → 107.21 (half-up); March: 160.00.
    assert_eq!((april.credited, april.back_months_credited, april.total.as_str()), (1, 1, "267.21"));
    assert_eq!(skips(&april.back_months_skipped), vec![("BEFORE_POLICY".into(), 1)]);
    assert_eq!(gw.balance_of("E1").await, "267.21");
    let memos: Vec<String> = entries(&gw, "E1").await.into_iter().map(|e| e.2).collect();
    assert_eq!(memos, vec!["2025-04".to_string(), "2025-03".to_string()]);
    // The next run does not credit March again.
    let may = credit_all(&gw, BEIJING, "2025-05").await;
    assert_eq!((may.credited, may.back_months_credited, may.total.as_str()), (0, 0, "0.00"));
    assert_eq!(gw.balance_of("E1").await, "267.21");
    gw.assert_books_balance().await;
}

async fn an_interrupted_run_resumes_and_credits_each_account_once(backend: Backend) {
    let gw = start_in_2025(backend).await;
    for i in 1..=5 {
        person_born(&gw, &format!("H{i}"), HUNAN, pb::PersonCategory::Retiree, "1950-01-01").await;
    }
    after_the_months(&gw);
    let first = run_credit(&gw, HUNAN, "2025-07", "", 2).await;
    assert_eq!((first.accounts, first.credited, first.total.as_str()), (2, 2, "150.00"));
    assert_eq!(first.resume_after, "H2");
    let rest = run_credit(&gw, HUNAN, "2025-07", &first.resume_after, 0).await;
    assert_eq!((rest.accounts, rest.credited, rest.total.as_str(), rest.resume_after.as_str()), (3, 3, "225.00", ""));
    // An operator who starts over from the beginning credits nothing twice.
    let over = credit_all(&gw, HUNAN, "2025-07").await;
    assert_eq!((over.accounts, over.credited, over.already_credited, over.total.as_str()), (5, 0, 5, "0.00"));
    for i in 1..=5 {
        assert_eq!(gw.balance_of(&format!("H{i}")).await, "75.00");
    }
    gw.assert_books_balance().await;
}

async fn who_gets_no_credit_and_why(backend: Backend) {
    let gw = start_in_2025(backend).await;
    // A Hunan flexible employee has no account (003): no account, nothing to credit.
    person_born(&gw, "F1", HUNAN, pb::PersonCategory::Flexible, "1990-01-01").await;
    let request = pb::GetBalanceRequest { psn_no: "F1".into() };
    let balance = gw.account().get_balance(auth(request, OPERATOR_KEY)).await.unwrap().into_inner();
    assert_eq!(balance.account_status(), pb::AccountStatus::None);
    // A Jilin retiree: the 2021 average pension is an operator input not set in the shipped file.
    person_born(&gw, "J1", JILIN, pb::PersonCategory::Retiree, "1950-01-01").await;
    after_the_months(&gw);
    let jilin = credit_all(&gw, JILIN, "2025-07").await;
    assert_eq!((jilin.credited, skips(&jilin.skipped_by_reason)), (0, vec![("PENSION_NOT_SET".into(), 1)]));
    let hunan = credit_all(&gw, HUNAN, "2025-07").await;
    assert_eq!((hunan.accounts, hunan.credited), (0, 0));
    // A month that is not over, a bad month, a region without a policy.
    let this_month = {
        use yibao::clock::Clock;
        gw.clock.today().format("%Y-%m").to_string()
    };
    for (region, period) in [(BEIJING, this_month.as_str()), (BEIJING, "2025-13"), ("990000", "2025-01")] {
        let request =
            pb::RunMonthlyCreditRequest { region: region.into(), period: period.into(), ..Default::default() };
        assert_refused(
            gw.admin().run_monthly_credit(auth(request, OPERATOR_KEY)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
    }
    let unknown = pb::RecordContributionRequest {
        psn_no: "NOBODY".into(),
        period: "2025-01".into(),
        base: "1.00".into(),
        paid: true,
        ..Default::default()
    };
    assert_refused(gw.admin().record_contribution(auth(unknown, OPERATOR_KEY)).await, Code::NotFound, "UNKNOWN_PERSON");
    let negative = pb::RecordContributionRequest {
        psn_no: "J1".into(),
        period: "2025-01".into(),
        base: "-1.00".into(),
        paid: true,
        ..Default::default()
    };
    assert_refused(
        gw.admin().record_contribution(auth(negative, OPERATOR_KEY)).await,
        Code::InvalidArgument,
        "INVALID_AMOUNT",
    );
    gw.assert_books_balance().await;
}

async fn a_jilin_retiree_gets_2_8_percent_of_the_configured_pension(backend: Backend) {
    let policies = tempfile::tempdir().unwrap();
    for file in ["beijing.toml", "hunan.toml", "jilin.toml"] {
        let mut text = std::fs::read_to_string(format!("config/policy/{file}")).unwrap();
        if file == "jilin.toml" {
            // A made-up figure (no seed gives it).
            text = text.replace("# retiree_average_pension_2021 = \"…\"", "retiree_average_pension_2021 = \"3218.45\"");
        }
        std::fs::write(policies.path().join(file), text).unwrap();
    }
    let dir = policies.path().to_path_buf();
    let gw = TestGateway::start_adjusted(backend, move |config| config.policy_dir = Some(dir)).await;
    set_today(&gw, "2025-01-02");
    person_born(&gw, "J1", JILIN, pb::PersonCategory::Retiree, "1950-01-01").await;
    after_the_months(&gw);
    let run = credit_all(&gw, JILIN, "2025-07").await;
    // 3,218.45 × 2.8% = 90.1166 → 90.12; Jilin deducts no mutual-aid premium.
    assert_eq!((run.credited, run.total.as_str(), run.mutual_aid_total.as_str()), (1, "90.12", "0.00"));
    assert_eq!(gw.balance_of("J1").await, "90.12");
    gw.assert_books_balance().await;
}

async fn operators_add_interest_rates_but_never_rewrite_one(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let set = |region: &str, from: &str, rate: &str| pb::SetInterestRateRequest {
        region: region.into(),
        effective_from: from.into(),
        annual_rate_percent: rate.into(),
    };
    let admin = gw.admin();
    admin.clone().set_interest_rate(auth(set(BEIJING, "2025-05-20", "0.15"), OPERATOR_KEY)).await.expect("new rate");
    admin.clone().set_interest_rate(auth(set(BEIJING, "2025-05-20", "0.150"), OPERATOR_KEY)).await.expect("same again");
    assert_refused(
        admin.clone().set_interest_rate(auth(set(BEIJING, "2025-05-20", "0.10"), OPERATOR_KEY)).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    // The policy file's own row: the same rate is fine, another is refused.
    admin.clone().set_interest_rate(auth(set(BEIJING, "2015-10-24", "0.35"), OPERATOR_KEY)).await.expect("file's rate");
    assert_refused(
        admin.clone().set_interest_rate(auth(set(BEIJING, "2015-10-24", "0.30"), OPERATOR_KEY)).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    for (from, rate) in [("2025-05-21", "-0.1"), ("2025-05-21", "1e-2"), ("2025-05-21", "101"), ("2025-5-21", "0.1")] {
        assert_refused(
            admin.clone().set_interest_rate(auth(set(BEIJING, from, rate), OPERATOR_KEY)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
    }
    let rates = yibao::crediting::interest_rates(&gw.app.gateway, BEIJING).await.unwrap();
    let rates: Vec<String> = rates.iter().map(|r| format!("{} {}", r.effective_from, r.annual_rate_percent)).collect();
    assert_eq!(rates, vec!["2015-10-24 0.35".to_string(), "2025-05-20 0.15".to_string()]);
}

async fn adjust(gw: &TestGateway, psn_no: &str, amount: &str, credit: bool, value_date: &str) {
    let direction = if credit { pb::AdjustDirection::Credit } else { pb::AdjustDirection::Debit };
    let request = pb::AdjustRequest {
        request_id: format!("adj-{psn_no}-{amount}-{value_date}"),
        psn_no: psn_no.into(),
        amount: amount.into(),
        direction: direction as i32,
        reason: "history for an interest test".into(),
        value_date: value_date.into(),
    };
    gw.admin().adjust(auth(request, OPERATOR_KEY)).await.expect("adjust");
}

async fn accrue(gw: &TestGateway, region: &str, as_of: &str) -> pb::AccrueInterestResponse {
    let request = pb::AccrueInterestRequest { region: region.into(), as_of: as_of.into(), ..Default::default() };
    gw.admin().accrue_interest(auth(request, OPERATOR_KEY)).await.expect("interest run").into_inner()
}

/// Beijing pays quarterly at 活期 0.35% on the daily product of value-dated balances.
async fn a_beijing_quarter_is_paid_on_value_dates_once(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    person_born(&gw, "B1", BEIJING, pb::PersonCategory::Employee, "1980-01-01").await;
    person_born(&gw, "B2", BEIJING, pb::PersonCategory::Employee, "1980-01-01").await;
    adjust(&gw, "B1", "1000.00", true, "2024-11-03").await;
    adjust(&gw, "B1", "500.00", true, "2025-02-15").await;
    adjust(&gw, "B1", "123.45", false, "2025-03-20").await;
    // Money that counts only from after the quarter.
    adjust(&gw, "B2", "100000.00", true, "2025-04-01").await;
    // 1,000.00 × 90 + 500.00 × 45 − 123.45 × 12 = 111,018.60 yuan-days × 0.35% ÷ 360 = 1.0793 → 1.08
    let q1 = accrue(&gw, BEIJING, "2025-03-31").await;
    assert_eq!((q1.accounts, q1.credited, q1.nothing_due, q1.total.as_str()), (2, 1, 1, "1.08"));
    assert_eq!(q1.period_start, "2025-01-01");
    assert_eq!(gw.balance_of("B1").await, "1377.63");
    let again = accrue(&gw, BEIJING, "2025-03-31").await;
    assert_eq!((again.credited, again.already_settled, again.total.as_str()), (0, 1, "0.00"));
    assert_eq!(gw.balance_of("B1").await, "1377.63");
    // Q2: 1,377.63 (the interest counts from 31 March) × 91 days × 0.35% ÷ 360 = 1.2188 → 1.22;
    // 100,000.00 × 91 × 0.35% ÷ 360 = 88.4722 → 88.47.
    let q2 = accrue(&gw, BEIJING, "2025-06-30").await;
    assert_eq!((q2.credited, q2.total.as_str()), (2, "89.69"));
    assert_eq!(gw.balance_of("B1").await, "1378.85");
    let request = pb::ListEntriesRequest { psn_no: "B1".into(), page_size: 2, ..Default::default() };
    let newest = gw.account().list_entries(auth(request, OPERATOR_KEY)).await.unwrap().into_inner().entries;
    let seen: Vec<(pb::EntryKind, &str, &str)> =
        newest.iter().map(|e| (e.kind(), e.amount.as_str(), e.value_date.as_str())).collect();
    assert_eq!(
        seen,
        vec![(pb::EntryKind::Interest, "1.22", "2025-06-30"), (pb::EntryKind::Interest, "1.08", "2025-03-31")]
    );
    for (as_of, why) in [("2025-05-15", "the next is 2025-06-30"), ("2999-03-31", "is not over yet")] {
        let request = pb::AccrueInterestRequest { region: BEIJING.into(), as_of: as_of.into(), ..Default::default() };
        let status = assert_refused(
            gw.admin().accrue_interest(auth(request, OPERATOR_KEY)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert!(status.message().contains(why), "{status:?}");
    }
    gw.assert_quiet_cache_equals_ledger(&["B1".to_string(), "B2".to_string()]).await;
    gw.assert_books_balance().await;
}

/// Jilin pays yearly on 31 December, at the rate in force on that day for the whole year (001 §6);
/// an operator enters a mid-year rate change.
async fn a_jilin_year_with_a_balance_and_a_rate_change(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    person_born(&gw, "J1", JILIN, pb::PersonCategory::Employee, "1980-01-01").await;
    adjust(&gw, "J1", "10000.00", true, "2020-01-01").await;
    adjust(&gw, "J1", "2000.00", true, "2025-07-01").await;
    // A made-up change of the 3-month rate from 1.10% to 0.90% on 20 May 2025.
    set_rate(&gw, JILIN, "2025-05-20", "0.90").await;
    // (10,000.00 × 365 + 2,000.00 × 184) × 0.90% ÷ 360 = 100.45 (each day at its own rate it would
    // be 108.17: see domain::interest's tests).
    let year = accrue(&gw, JILIN, "2025-12-31").await;
    assert_eq!((year.credited, year.total.as_str(), year.period_start.as_str()), (1, "100.45", "2025-01-01"));
    assert_eq!(gw.balance_of("J1").await, "12100.45");
    let quarter = pb::AccrueInterestRequest { region: JILIN.into(), as_of: "2025-09-30".into(), ..Default::default() };
    assert_refused(
        gw.admin().accrue_interest(auth(quarter, OPERATOR_KEY)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    gw.assert_books_balance().await;
}

/// Moves the gateway's business date to `day` (tests of dated rules).
fn set_today(gw: &TestGateway, day: &str) {
    use yibao::clock::Clock;
    let target = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap();
    gw.clock.advance_days((target - gw.clock.today()).num_days());
}

async fn set_status(gw: &TestGateway, psn_no: &str, status: pb::InsuranceStatus) {
    upsert(gw, psn_no, BEIJING, pb::PersonCategory::Employee, "1980-01-01", status).await
}

fn transfer_out_request(request_id: &str, psn_no: &str, to_region: &str) -> pb::TransferOutRequest {
    pb::TransferOutRequest { request_id: request_id.into(), psn_no: psn_no.into(), to_region: to_region.into() }
}

/// Jilin, a transfer out on 15 September 2025: interest for 1 January – 14 September first, at the
/// rate in force on the 14th (001 §6), then the whole balance out and the account closed.
async fn a_mid_year_transfer_out_settles_interest_first(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    set_today(&gw, "2025-01-06");
    person_born(&gw, "J1", JILIN, pb::PersonCategory::Employee, "1980-01-01").await;
    adjust(&gw, "J1", "10000.00", true, "2020-01-01").await;
    // 2024 at 1.10%: 10,000.00 × 366 × 1.10% ÷ 360 = 111.83.
    let year = accrue(&gw, JILIN, "2024-12-31").await;
    assert_eq!(year.total, "111.83");
    set_today(&gw, "2025-07-01");
    adjust(&gw, "J1", "2000.00", true, "2025-07-01").await;
    set_rate(&gw, JILIN, "2025-05-20", "0.90").await;
    set_today(&gw, "2025-09-15");
    // (10,111.83 × 257 days + 2,000.00 × 76 days) × 0.90% ÷ 360 = 68.7685 → 68.77.
    let out = gw.admin().transfer_out(auth(transfer_out_request("T1", "J1", BEIJING), OPERATOR_KEY)).await.unwrap();
    let out = out.into_inner();
    assert_eq!((out.interest.as_str(), out.amount.as_str()), ("68.77", "12180.60"));
    assert_eq!(out.account_status(), pb::AccountStatus::Closed);
    assert_eq!(gw.balance_of("J1").await, "0.00");
    let last: Vec<(pb::EntryKind, String, String)> = entries(&gw, "J1").await.into_iter().rev().take(2).collect();
    assert_eq!(
        last,
        vec![
            (pb::EntryKind::TransferOut, "-12180.60".into(), "to 110000".into()),
            (pb::EntryKind::Interest, "68.77".into(), "2025-09-14".into()),
        ]
    );
    // The same request again answers the same; the same id for something else is refused.
    let again = gw.admin().transfer_out(auth(transfer_out_request("T1", "J1", BEIJING), OPERATOR_KEY)).await.unwrap();
    assert_eq!(again.into_inner(), out);
    assert_refused(
        gw.admin().transfer_out(auth(transfer_out_request("T1", "J1", HUNAN), OPERATOR_KEY)).await,
        Code::AlreadyExists,
        "REQUEST_ID_REUSED",
    );
    // A closed account takes no debit or credit, and no more interest.
    assert_refused(
        gw.admin().transfer_out(auth(transfer_out_request("T2", "J1", BEIJING), OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "ACCOUNT_CLOSED",
    );
    let credit = pb::AdjustRequest {
        request_id: "late-credit".into(),
        psn_no: "J1".into(),
        amount: "1.00".into(),
        direction: pb::AdjustDirection::Credit as i32,
        reason: "a credit after the transfer".into(),
        value_date: String::new(),
    };
    assert_refused(gw.admin().adjust(auth(credit, OPERATOR_KEY)).await, Code::FailedPrecondition, "ACCOUNT_CLOSED");
    set_today(&gw, "2026-01-05");
    let year = accrue(&gw, JILIN, "2025-12-31").await;
    assert_eq!((year.accounts, year.closed, year.credited, year.total.as_str()), (1, 1, 0, "0.00"));
    // Coming back: money transferred in reopens the account.
    let back = |value_date: &str| pb::TransferInRequest {
        request_id: "B1".into(),
        psn_no: "J1".into(),
        from_region: BEIJING.into(),
        amount: "500.00".into(),
        value_date: value_date.into(),
    };
    assert_refused(
        gw.admin().transfer_in(auth(back("2026-01-06"), OPERATOR_KEY)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let back = gw.admin().transfer_in(auth(back("2026-01-02"), OPERATOR_KEY)).await.unwrap().into_inner();
    assert_eq!((back.amount.as_str(), back.account_status()), ("500.00", pb::AccountStatus::Open));
    assert_eq!(gw.balance_of("J1").await, "500.00");
    // The money counts for interest from when Beijing sent it.
    let request = pb::ListEntriesRequest { psn_no: "J1".into(), page_size: 1, ..Default::default() };
    let newest = gw.account().list_entries(auth(request, OPERATOR_KEY)).await.unwrap().into_inner().entries;
    assert_eq!((newest[0].kind(), newest[0].value_date.as_str()), (pb::EntryKind::TransferIn, "2026-01-02"));
    gw.assert_quiet_cache_equals_ledger(&["J1".to_string()]).await;
    // A replay answers what was done, whatever changed since (here the person's region).
    upsert(&gw, "J1", BEIJING, pb::PersonCategory::Employee, "1980-01-01", pb::InsuranceStatus::Active).await;
    let replay = gw.admin().transfer_out(auth(transfer_out_request("T1", "J1", BEIJING), OPERATOR_KEY)).await;
    assert_eq!(replay.unwrap().into_inner(), out);
    gw.assert_books_balance().await;
}

/// What a person's insurance status does to paying, and liquidation after termination.
async fn statuses_decide_who_pays_and_liquidation_pays_out_once(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let hospital = gw.hospital().await;
    gw.employee("O1", "300.00").await;
    gw.employee("M1", "10.00").await;
    gw.family("O1", "M1", pb::Relation::Child).await;
    // SUSPENDED (contributions interrupted) still pays, with family.
    set_status(&gw, "M1", pb::InsuranceStatus::Suspended).await;
    let paid = gw.settle(&hospital, settle_request("s1", "M1", "20.00")).await.unwrap();
    assert_eq!(debits(&paid), vec![("M1".into(), "10.00".into(), false), ("O1".into(), "10.00".into(), true)]);
    // REMOVED pays from its own account only …
    gw.credit("M1", "5.00").await;
    set_status(&gw, "M1", pb::InsuranceStatus::Removed).await;
    let paid = gw.settle(&hospital, settle_request("s2", "M1", "20.00")).await.unwrap();
    assert_eq!((debits(&paid), paid.psn_cash_pay.as_str()), (vec![("M1".into(), "5.00".into(), false)], "15.00"));
    // … and a REMOVED owner's account is not drawn for family.
    set_status(&gw, "M1", pb::InsuranceStatus::Active).await;
    set_status(&gw, "O1", pb::InsuranceStatus::Removed).await;
    let paid = gw.settle(&hospital, settle_request("s3", "M1", "20.00")).await.unwrap();
    assert_eq!((debits(&paid), paid.psn_cash_pay.as_str()), (vec![], "20.00"));
    // TERMINATED cannot settle; its balance is paid out once by liquidation.
    set_status(&gw, "O1", pb::InsuranceStatus::Active).await;
    let liquidate =
        |id: &str| pb::LiquidateRequest { request_id: id.into(), psn_no: "O1".into(), reason: "死亡 (death)".into() };
    assert_refused(
        gw.admin().liquidate(auth(liquidate("L1"), OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "PERSON_NOT_TERMINATED",
    );
    set_status(&gw, "O1", pb::InsuranceStatus::Terminated).await;
    assert_refused(
        gw.settle(&hospital, settle_request("s4", "O1", "1.00")).await,
        Code::FailedPrecondition,
        "PERSON_TERMINATED",
    );
    assert_refused(
        gw.admin().transfer_out(auth(transfer_out_request("T1", "O1", JILIN), OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "PERSON_TERMINATED",
    );
    let out = gw.admin().liquidate(auth(liquidate("L1"), OPERATOR_KEY)).await.unwrap().into_inner();
    assert_eq!(
        (out.amount.as_str(), out.interest.as_str(), out.account_status()),
        ("290.00", "0.00", pb::AccountStatus::Closed)
    );
    assert_eq!(gw.admin().liquidate(auth(liquidate("L1"), OPERATOR_KEY)).await.unwrap().into_inner(), out);
    assert_refused(
        gw.admin().liquidate(auth(liquidate("L2"), OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "ACCOUNT_CLOSED",
    );
    assert_eq!(
        entries(&gw, "O1").await.last().unwrap(),
        &(pb::EntryKind::Withdrawal, "-290.00".into(), "死亡 (death)".into())
    );
    // A frozen account is not transferred out; a Hunan flexible employee has no account to take money in.
    gw.employee("F1", "1.00").await;
    let freeze = pb::FreezeAccountRequest { psn_no: "F1".into(), reason: "under review".into() };
    gw.admin().freeze_account(auth(freeze, OPERATOR_KEY)).await.unwrap();
    assert_refused(
        gw.admin().transfer_out(auth(transfer_out_request("T2", "F1", JILIN), OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "ACCOUNT_FROZEN",
    );
    person_born(&gw, "H9", HUNAN, pb::PersonCategory::Flexible, "1990-01-01").await;
    let incoming = pb::TransferInRequest {
        request_id: "I1".into(),
        psn_no: "H9".into(),
        from_region: BEIJING.into(),
        amount: "9.00".into(),
        value_date: String::new(),
    };
    assert_refused(gw.admin().transfer_in(auth(incoming, OPERATOR_KEY)).await, Code::FailedPrecondition, "NO_ACCOUNT");
    gw.assert_books_balance().await;
}

/// A month recorded again without a category keeps the category it was recorded with (a back
/// payment after the person retired is still an employee month); a category may also be given.
async fn a_month_recorded_again_keeps_its_category(backend: Backend) {
    let gw = start_in_2025(backend).await;
    person_born(&gw, "K1", BEIJING, pb::PersonCategory::Employee, "1950-03-03").await;
    after_the_months(&gw);
    contribution(&gw, "K1", "2025-06", "20000.00", false).await;
    upsert(&gw, "K1", BEIJING, pb::PersonCategory::Retiree, "1950-03-03", pb::InsuranceStatus::Active).await;
    contribution(&gw, "K1", "2025-06", "20000.00", true).await;
    let may = pb::RecordContributionRequest {
        psn_no: "K1".into(),
        period: "2025-05".into(),
        base: "10000.00".into(),
        paid: true,
        category: pb::PersonCategory::Employee as i32,
    };
    gw.admin().record_contribution(auth(may, OPERATOR_KEY)).await.expect("record with a category");
    // July as a retiree of 75: 110.00 − 3.00; June and May as employee months: 400.00 + 200.00.
    let july = credit_all(&gw, BEIJING, "2025-07").await;
    assert_eq!((july.credited, july.back_months_credited), (1, 2));
    assert_eq!((july.total.as_str(), july.mutual_aid_total.as_str()), ("710.00", "3.00"));
    assert_eq!(gw.balance_of("K1").await, "707.00");
    gw.assert_books_balance().await;
}

/// Runs the `yibao` binary with `args`, on this gateway's ledger (imports) or server (calls).
fn yibao(gw: &TestGateway, args: &[&str], on_ledger: bool) -> (Option<i32>, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_yibao"));
    command.args(args);
    if on_ledger {
        match &gw.config.ledger_url {
            Some(url) => command.args(["--ledger-url", url]),
            None => command.arg("--data-dir").arg(gw.data_dir()),
        };
    } else {
        command.args(["--server", &gw.server, "--key", OPERATOR_KEY]);
    }
    for name in ["YIBAO_CONFIG", "YIBAO_LEDGER_URL", "YIBAO_DATA_DIR", "YIBAO_SERVER", "YIBAO_API_KEY"] {
        command.env_remove(name);
    }
    let output = command.output().expect("the yibao binary runs");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

const CONTRIBUTIONS: &str = "\
psn_no,period,base,paid,category
C1,2025-08,12345.67,true,
C2,2025-08,8000.00,false,EMPLOYEE
NOBODY,2025-08,1.00,true,
C1,2025-13,1.00,true,
C2,2025-07,5360.25,yes,employee
C1,2025-08,9999.00,true,
C3,2025-06,20000.00,true,EMPLOYEE
";

async fn contributions_imported_from_csv_are_credited_by_the_operators_run(backend: Backend) {
    let gw = start_in_2025(backend).await;
    person_born(&gw, "C1", BEIJING, pb::PersonCategory::Employee, "1980-01-01").await;
    person_born(&gw, "C2", BEIJING, pb::PersonCategory::Employee, "1980-01-01").await;
    person_born(&gw, "C3", BEIJING, pb::PersonCategory::Retiree, "1950-01-01").await;
    after_the_months(&gw);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("contributions.csv");
    std::fs::write(&file, CONTRIBUTIONS).unwrap();
    let file = file.to_str().unwrap();
    let import = ["admin", "contributions", "import", file];
    let (code, stdout, stderr) = yibao(&gw, &import, true);
    assert_eq!(code, Some(1), "rows were refused: exit 1\n{stdout}\n{stderr}");
    assert!(stdout.contains("contributions.csv: 4 imported, 0 already there, 3 refused (7 rows"), "{stdout}");
    for refusal in [
        "contributions.csv:4: unknown psn_no NOBODY",
        "contributions.csv:5: period: \"2025-13\" is not a month YYYY-MM",
        "contributions.csv:7: repeats the key of line 2 with other content",
    ] {
        assert!(stderr.contains(refusal), "{refusal}\n{stderr}");
    }
    let (_, stdout, stderr) = yibao(&gw, &import, true);
    assert!(stdout.contains("contributions.csv: 0 imported, 4 already there, 3 refused (7 rows"), "{stdout}\n{stderr}");
    // The category column may be left out.
    let short = dir.path().join("short.csv");
    std::fs::write(&short, "psn_no,period,base,paid\nC2,2025-09,1000.00,true\n").unwrap();
    let (code, stdout, stderr) = yibao(&gw, &["admin", "contributions", "import", short.to_str().unwrap()], true);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("short.csv: 1 imported, 0 already there, 0 refused (1 rows"), "{stdout}");

    let (code, stdout, stderr) =
        yibao(&gw, &["admin", "credit", "--region", BEIJING, "--period", "2025-08", "--step", "1"], false);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    // Three calls of one account each, a progress line after each.
    assert_eq!(stderr.lines().filter(|l| l.starts_with("110000 2025-08: ")).count(), 3, "{stderr}");
    // C1 12,345.67 × 2% = 246.91; C3, over 70, 110.00 (less 3.00 mutual aid); C2's July paid later:
    // 5,360.25 × 2% = 107.21; C3's June, paid later for a month C3 still worked (EMPLOYEE in the
    // file, a retiree now): 20,000.00 × 2% = 400.00.
    for line in [
        "  accounts looked at   3",
        "  credited             2  (already credited before: 0)",
        "  skipped              1  (NOT_PAID 1)",
        "  back months credited 2",
        "  money credited       864.12",
        "  mutual aid deducted  3.00",
    ] {
        assert!(stdout.contains(line), "{line:?}\n{stdout}");
    }
    assert_eq!(gw.balance_of("C1").await, "246.91");
    assert_eq!(gw.balance_of("C2").await, "107.21");
    assert_eq!(gw.balance_of("C3").await, "507.00");
    gw.assert_books_balance().await;
}

on_both_backends!(
    a_month_recorded_again_keeps_its_category,
    a_mid_year_transfer_out_settles_interest_first,
    statuses_decide_who_pays_and_liquidation_pays_out_once,
    a_beijing_quarter_is_paid_on_value_dates_once,
    a_jilin_year_with_a_balance_and_a_rate_change,
    contributions_imported_from_csv_are_credited_by_the_operators_run,
    a_month_is_credited_to_the_fen_by_regional_rules,
    a_missed_month_paid_later_is_credited_by_the_next_run,
    an_interrupted_run_resumes_and_credits_each_account_once,
    who_gets_no_credit_and_why,
    a_jilin_retiree_gets_2_8_percent_of_the_configured_pension,
    operators_add_interest_rates_but_never_rewrite_one,
);
