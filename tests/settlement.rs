//! The settlement path over real gRPC: every rule of DESIGN §1 "Paying", with exact amounts, codes
//! and reasons.

mod common;

on_both_backends!(
    an_overloaded_gateway_refuses_at_once_and_changes_nothing,
    own_account_first_then_family_in_the_payers_order,
    partial_leaves_the_rest_to_cash_and_full_only_is_all_or_nothing,
    fifty_concurrent_full_only_payments_against_one_account,
    replay_returns_the_first_answer_and_a_changed_request_is_refused,
    a_duplicate_waits_for_the_attempt_in_flight_even_on_another_gateway,
    a_remembered_answer_the_ledger_does_not_know_is_forgotten_and_the_request_claimed,
    a_commit_that_timed_out_is_found_out_before_its_retry_goes_on,
    pin_rules_and_the_durable_lockout,
    pin_management_weak_change_and_operator_reset,
    no_pin_tier_per_payment_and_per_day,
    exempt_channels_and_the_registration_cap,
    channels_and_categories_are_checked_per_institution_kind,
    a_lost_card_refuses_card_payments_but_not_the_e_voucher,
    refunds_go_back_in_reverse_order_and_never_exceed_what_was_paid,
    reversal_undoes_a_settlement_and_a_tombstone_refuses_a_late_original,
    institutions_see_and_refund_only_their_own_settlements,
    family_rules_status_relations_frozen_accounts_and_self_only,
    premiums_are_full_or_nothing_from_the_own_account_for_registered_family,
    pre_settle_plans_without_side_effects,
    malformed_input_is_refused_with_the_field_named_and_changes_nothing,
    callers_need_a_key_with_the_right_role,
    entries_show_every_change_with_paging,
    settled_money_survives_a_restart_and_the_cache_reloads,
);

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{Notify, Semaphore};
use tonic::Code;
use yibao::cache::{BalanceCache, CacheResult, CachedBalance, Claim, ExpiredHold, Reserve};
use yibao::domain::Money;
use yibao::rpc::pb;

async fn own_account_first_then_family_in_the_payers_order(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "120.00").await;
    gw.employee("SPOUSE", "800.00").await;
    gw.person("FATHER", BEIJING, pb::PersonCategory::Retiree, "1500.00").await;
    gw.family("SPOUSE", "P1", pb::Relation::Spouse).await;
    gw.family("FATHER", "P1", pb::Relation::Child).await;

    let paid = gw.settle(&key, settle_request("r1", "P1", "1000.00")).await.unwrap();
    assert_eq!(pb::SettlementStatus::try_from(paid.status), Ok(pb::SettlementStatus::Settled));
    assert_eq!(
        (paid.acct_pay.as_str(), paid.acct_mulaid_pay.as_str(), paid.psn_cash_pay.as_str()),
        ("120.00", "880.00", "0.00")
    );
    assert_eq!(paid.balc, "0.00");
    assert_eq!(
        debits(&paid),
        vec![
            ("P1".into(), "120.00".into(), false),
            ("SPOUSE".into(), "800.00".into(), true),
            ("FATHER".into(), "80.00".into(), true)
        ]
    );
    assert_eq!(pb::AuthMethod::try_from(paid.auth_method), Ok(pb::AuthMethod::ChannelExempt));
    assert_eq!(gw.balance_of("SPOUSE").await, "0.00");
    assert_eq!(gw.balance_of("FATHER").await, "1420.00");

    // The payer chooses the order: father first now.
    gw.credit("SPOUSE", "100.00").await;
    let order = pb::SetDeductionOrderRequest {
        member_psn_no: "P1".into(),
        owner_psn_nos: vec!["FATHER".into(), "SPOUSE".into()],
    };
    let family = gw.account().set_deduction_order(auth(order, OPERATOR_KEY)).await.unwrap().into_inner();
    let owners: Vec<_> = family.usable_accounts.iter().map(|a| a.owner_psn_no.as_str()).collect();
    assert_eq!(owners, ["P1", "FATHER", "SPOUSE"]);
    let paid = gw.settle(&key, settle_request("r2", "P1", "1450.00")).await.unwrap();
    assert_eq!(debits(&paid), vec![("FATHER".into(), "1420.00".into(), true), ("SPOUSE".into(), "30.00".into(), true)]);
    assert_eq!((paid.acct_pay.as_str(), paid.acct_mulaid_pay.as_str()), ("0.00", "1450.00"));

    // An order that is not exactly the registered owners is refused.
    let bad = pb::SetDeductionOrderRequest { member_psn_no: "P1".into(), owner_psn_nos: vec!["FATHER".into()] };
    assert_refused(
        gw.account().set_deduction_order(auth(bad, OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "NOT_REGISTERED_FAMILY",
    );
    gw.assert_books_balance().await;
}

async fn partial_leaves_the_rest_to_cash_and_full_only_is_all_or_nothing(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "50.00").await;

    let paid = gw.settle(&key, settle_request("partial", "P1", "80.00")).await.unwrap();
    assert_eq!((paid.acct_pay.as_str(), paid.psn_cash_pay.as_str(), paid.balc.as_str()), ("50.00", "30.00", "0.00"));

    gw.credit("P1", "20.00").await;
    let full = pb::SettleRequest { mode: pb::PayMode::FullOnly as i32, ..settle_request("full", "P1", "20.01") };
    assert_refused(gw.settle(&key, full).await, Code::FailedPrecondition, "INSUFFICIENT_BALANCE");
    assert_eq!(gw.balance("P1").await, ("20.00".into(), "20.00".into()), "a refused payment changes nothing");

    // An account with nothing in it still settles partially: everything to cash.
    gw.employee("P2", "0").await;
    let paid = gw.settle(&key, settle_request("empty", "P2", "12.30")).await.unwrap();
    assert_eq!((paid.acct_pay.as_str(), paid.psn_cash_pay.as_str()), ("0.00", "12.30"));
    gw.assert_books_balance().await;
}

async fn fifty_concurrent_full_only_payments_against_one_account(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "500.00").await;
    let mut calls = Vec::new();
    for i in 0..50 {
        let client = gw.settlement();
        let request =
            pb::SettleRequest { mode: pb::PayMode::FullOnly as i32, ..settle_request(&format!("c{i}"), "P1", "30.00") };
        let key = key.clone();
        calls.push(tokio::spawn(async move {
            let mut client = client;
            client.settle(auth(request, &key)).await
        }));
    }
    let (mut settled, mut insufficient) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(answer) => {
                assert_eq!(answer.get_ref().acct_pay, "30.00");
                settled += 1;
            }
            Err(status) => {
                assert_eq!(
                    (status.code(), reason(&status).as_str()),
                    (Code::FailedPrecondition, "INSUFFICIENT_BALANCE")
                );
                insufficient += 1;
            }
        }
    }
    assert_eq!((settled, insufficient), (16, 34));
    assert_eq!(gw.balance("P1").await, ("20.00".into(), "20.00".into()));
    gw.assert_books_balance().await;
}

/// A balance cache that, once armed, pauses the first reservation after it has held until told
/// to go on, and says when a claim is found busy.
struct PausingCache {
    inner: Arc<dyn BalanceCache>,
    cues: Arc<Cues>,
}

struct Cues {
    armed: AtomicBool,
    paused: Notify,
    go: Semaphore,
    busy: Notify,
}

impl Default for Cues {
    fn default() -> Cues {
        Cues { armed: AtomicBool::new(false), paused: Notify::new(), go: Semaphore::new(0), busy: Notify::new() }
    }
}

#[async_trait::async_trait]
impl BalanceCache for PausingCache {
    async fn ping(&self) -> CacheResult<()> {
        self.inner.ping().await
    }
    async fn get(&self, account_id: i64) -> CacheResult<Option<CachedBalance>> {
        self.inner.get(account_id).await
    }
    async fn load(&self, account_id: i64, balance: Money, seq: i64) -> CacheResult<()> {
        self.inner.load(account_id, balance, seq).await
    }
    async fn load_and_get(&self, account_id: i64, balance: Money, seq: i64) -> CacheResult<CachedBalance> {
        self.inner.load_and_get(account_id, balance, seq).await
    }
    async fn reserve(&self, account_id: i64, hold_id: &str, want: Money, lease_ms: u64) -> CacheResult<Reserve> {
        let held = self.inner.reserve(account_id, hold_id, want, lease_ms).await;
        if self.cues.armed.swap(false, Ordering::SeqCst) {
            self.cues.paused.notify_one();
            let _ = self.cues.go.acquire().await.expect("open");
        }
        held
    }
    async fn commit_hold(&self, account_id: i64, hold_id: &str, balance_after: Money, seq: i64) -> CacheResult<()> {
        self.inner.commit_hold(account_id, hold_id, balance_after, seq).await
    }
    async fn release_hold(&self, account_id: i64, hold_id: &str) -> CacheResult<()> {
        self.inner.release_hold(account_id, hold_id).await
    }
    async fn apply(&self, account_id: i64, balance_after: Money, seq: i64) -> CacheResult<()> {
        self.inner.apply(account_id, balance_after, seq).await
    }
    async fn claim_request(&self, code: &str, request_id: &str, owner: &str, ttl_ms: u64) -> CacheResult<Claim> {
        let claim = self.inner.claim_request(code, request_id, owner, ttl_ms).await;
        if matches!(claim, Ok(Claim::Busy)) {
            self.cues.busy.notify_one();
        }
        claim
    }
    async fn end_claim(&self, code: &str, request_id: &str, owner: &str, setl_id: Option<&str>) -> CacheResult<()> {
        self.inner.end_claim(code, request_id, owner, setl_id).await
    }
    async fn forget_answer(&self, code: &str, request_id: &str, setl_id: &str) -> CacheResult<()> {
        self.inner.forget_answer(code, request_id, setl_id).await
    }
    async fn expired_holds(&self, now_ms: u64, limit: usize) -> CacheResult<Vec<ExpiredHold>> {
        self.inner.expired_holds(now_ms, limit).await
    }
}

/// A duplicate sent while the first attempt is in flight (here: paused right after it held the
/// whole balance) waits for it and answers what it settled. In partial mode a duplicate that
/// went ahead would hold nothing, reach the ledger first and settle it all as cash. In
/// production the duplicate goes to a second gateway on the same PostgreSQL and Redis.
async fn a_duplicate_waits_for_the_attempt_in_flight_even_on_another_gateway(backend: Backend) {
    a_duplicate_waits(backend, None).await;
}

/// The same when the cache remembers an answer for the request that the ledger does not know (a
/// ledger restored or reset under a shared Redis): the first attempt forgets it and claims the
/// request, so the duplicate still waits (going on unclaimed, both would reserve). Afterwards
/// the cache remembers the settlement the ledger holds.
async fn a_remembered_answer_the_ledger_does_not_know_is_forgotten_and_the_request_claimed(backend: Backend) {
    a_duplicate_waits(backend, Some("S20260101080000000000000000dead")).await;
}

async fn a_duplicate_waits(backend: Backend, stale_answer: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir, backend).await;
    let cues = Arc::new(Cues::default());
    let wrap = |cues: &Arc<Cues>| {
        let cues = cues.clone();
        move |inner| Arc::new(PausingCache { inner, cues }) as Arc<dyn BalanceCache>
    };
    let gw = TestGateway::start_wrapped(backend, config.clone(), wrap(&cues)).await;
    let other = match backend {
        Backend::Production => Some(TestGateway::start_wrapped(backend, config, wrap(&cues)).await),
        Backend::Embedded => None, // its balances live in the first gateway's process
    };
    let second_gateway = other.as_ref().unwrap_or(&gw);
    let key = gw.hospital().await;
    gw.employee("P1", "7.00").await;
    let cache = gw.app.gateway.cache.clone();
    if let Some(stale) = stale_answer {
        cache.end_claim("H001", "dup", "an attempt before the ledger was reset", Some(stale)).await.unwrap();
        assert!(matches!(cache.claim_request("H001", "dup", "probe", 1).await, Ok(Claim::Answered(s)) if s == stale));
    }

    cues.armed.store(true, Ordering::SeqCst);
    let mut first = {
        let (mut client, key) = (gw.settlement(), key.clone());
        tokio::spawn(async move { client.settle(auth(settle_request("dup", "P1", "7.00"), &key)).await })
    };
    tokio::select! {
        _ = cues.paused.notified() => {}
        done = &mut first => panic!("the first attempt ended before it held anything: {done:?}"),
    }
    let mut second = {
        let (mut client, key) = (second_gateway.settlement(), key.clone());
        tokio::spawn(async move { client.settle(auth(settle_request("dup", "P1", "7.00"), &key)).await })
    };
    // The first goes on once the duplicate found the request claimed — or once the duplicate has
    // finished without waiting, which is the failure this test is for.
    let finished_early = tokio::select! {
        _ = cues.busy.notified() => None,
        done = &mut second => Some(done),
    };
    cues.go.add_permits(1);
    let first = first.await.unwrap().unwrap().into_inner();
    let second = match finished_early {
        Some(done) => done,
        None => second.await,
    }
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(
        (first.acct_pay.as_str(), first.psn_cash_pay.as_str()),
        ("7.00", "0.00"),
        "the whole balance pays, as the first attempt held it"
    );
    assert_eq!(second, first, "the duplicate answers what the first settled");
    assert_eq!(gw.balance_of("P1").await, "0.00");
    // (The claim ends, with the answer, just after the answer went out.)
    let mut last = None;
    for _ in 0..1_000 {
        match cache.claim_request("H001", "dup", "probe after", 1).await.unwrap() {
            Claim::Answered(remembered) => {
                last = Some(Claim::Answered(remembered));
                break;
            }
            other => last = Some(other),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let Some(Claim::Answered(remembered)) = last else {
        panic!("the cache never remembered the settlement: last {last:?}");
    };
    assert_eq!(remembered, first.setl_id, "the cache remembers the settlement the ledger holds");
    gw.assert_quiet_cache_equals_ledger(&["P1".to_string()]).await;
    gw.assert_books_balance().await;
}

/// Something outside the gateway that keeps the ledger from writing P1's account: on SQLite a
/// write transaction of its own, on PostgreSQL a row lock on the account. Dropped, it lets go.
enum LedgerBlock {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl LedgerBlock {
    async fn take(gw: &TestGateway, psn_no: &str) -> LedgerBlock {
        match &gw.config.ledger_url {
            None => {
                let conn = rusqlite::Connection::open(gw.data_dir().join("ledger.db")).unwrap();
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                LedgerBlock::Sqlite(conn)
            }
            Some(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(connection);
                client.batch_execute("BEGIN").await.unwrap();
                client.query("SELECT 1 FROM accounts WHERE psn_no = $1 FOR UPDATE", &[&psn_no]).await.unwrap();
                LedgerBlock::Postgres(client)
            }
        }
    }

    async fn release(self) {
        match self {
            LedgerBlock::Sqlite(conn) => conn.execute_batch("ROLLBACK").unwrap(),
            LedgerBlock::Postgres(client) => client.batch_execute("ROLLBACK").await.unwrap(),
        }
    }
}

/// A commit that outlives the commit timeout answers BACKEND_UNAVAILABLE, and its outcome is
/// unknown. The gateway asks the ledger what became of it (fencing the write if it had not
/// committed) and settles its holds before a retry may go on, so the retry answers the one
/// settlement and finds no hold left behind to wait for the sweeper.
async fn a_commit_that_timed_out_is_found_out_before_its_retry_goes_on(backend: Backend) {
    let gw = TestGateway::start_adjusted(backend, |config| {
        config.settings.hold_lease_ms = 60_000;
        config.settings.commit_timeout_ms = 2_000;
    })
    .await;
    let key = gw.hospital().await;
    gw.employee("P1", "10.00").await;
    let block = LedgerBlock::take(&gw, "P1").await;
    assert_refused(
        gw.settle(&key, settle_request("slow", "P1", "7.00")).await,
        Code::Unavailable,
        "BACKEND_UNAVAILABLE",
    );
    let retry = {
        let (mut client, key) = (gw.settlement(), key.clone());
        tokio::spawn(async move { client.settle(auth(settle_request("slow", "P1", "7.00"), &key)).await })
    };
    block.release().await;
    // Long before the claim (two leases) or the sweeper (one lease and grace) could end the wait.
    let retried = tokio::time::timeout(std::time::Duration::from_secs(40), retry)
        .await
        .expect("the retry is answered once the timed-out write's fate is known")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!((retried.acct_pay.as_str(), retried.psn_cash_pay.as_str()), ("7.00", "0.00"));
    // Whichever attempt settled, nothing is held any more: the timed-out attempt's hold was
    // settled before the retry went on (the sweeper would only come after the 60 s lease).
    let account = gw.app.gateway.ledger.person("P1").await.unwrap().unwrap().account.unwrap().id;
    let cached = gw.app.gateway.cache.get(account).await.unwrap().expect("cached");
    assert_eq!(cached.held, Money::ZERO, "no hold is left for the sweeper");
    assert_eq!(gw.balance_of("P1").await, "3.00", "paid once");
    let again = gw.settle(&key, settle_request("slow", "P1", "7.00")).await.unwrap();
    assert_eq!(again, retried);
    gw.assert_books_balance().await;
}

async fn replay_returns_the_first_answer_and_a_changed_request_is_refused(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "100.00").await;
    let first = gw.settle(&key, settle_request("same", "P1", "40.00")).await.unwrap();
    let again = gw.settle(&key, settle_request("same", "P1", "40.00")).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(gw.balance_of("P1").await, "60.00", "paid once");
    assert_refused(
        gw.settle(&key, settle_request("same", "P1", "41.00")).await,
        Code::AlreadyExists,
        "REQUEST_ID_REUSED",
    );

    // Concurrent duplicates: one payment, the same answer for all.
    let mut calls = Vec::new();
    for _ in 0..10 {
        let (client, key) = (gw.settlement(), key.clone());
        calls.push(tokio::spawn(async move {
            let mut client = client;
            client.settle(auth(settle_request("dup", "P1", "7.00"), &key)).await.map(|r| r.into_inner().setl_id)
        }));
    }
    let mut ids = Vec::new();
    for call in calls {
        ids.push(call.await.unwrap().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one settlement id for every duplicate");
    assert_eq!(gw.balance_of("P1").await, "53.00");

    // Request ids belong to the institution: another institution may use the same one.
    let other = gw.institution("H002", pb::InstitutionKind::Hospital).await;
    let theirs = gw.settle(&other, settle_request("same", "P1", "3.00")).await.unwrap();
    assert_ne!(theirs.setl_id, first.setl_id);
    assert_eq!(gw.balance_of("P1").await, "50.00");
    gw.assert_books_balance().await;
}

async fn pin_rules_and_the_durable_lockout(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "100.00").await;

    assert_refused(
        gw.settle(&key, card_request("a", "P1", "10.00", "")).await,
        Code::FailedPrecondition,
        "PIN_REQUIRED",
    );
    assert_refused(
        gw.settle(&key, card_request("b", "P1", "10.00", "284617")).await,
        Code::FailedPrecondition,
        "PIN_NOT_SET",
    );
    gw.set_pin("P1", "284617").await;
    let paid = gw.settle(&key, card_request("c", "P1", "10.00", "284617")).await.unwrap();
    assert_eq!(pb::AuthMethod::try_from(paid.auth_method), Ok(pb::AuthMethod::Pin));
    assert!(paid.pin_required);

    // A wrong PIN says how many attempts are left; a correct one resets the count.
    let status = assert_refused(
        gw.settle(&key, card_request("d", "P1", "10.00", "111222")).await,
        Code::PermissionDenied,
        "PIN_INCORRECT",
    );
    assert_eq!(status.metadata().get("attempts-left").unwrap(), "4");
    gw.settle(&key, card_request("e", "P1", "10.00", "284617")).await.unwrap();
    for (i, left) in ["4", "3", "2", "1", "0"].iter().enumerate() {
        let status = assert_refused(
            gw.settle(&key, card_request(&format!("w{i}"), "P1", "10.00", "999111")).await,
            Code::PermissionDenied,
            "PIN_INCORRECT",
        );
        assert_eq!(status.metadata().get("attempts-left").unwrap(), left);
    }
    // Locked, even for the right PIN, and still after a restart (the count is in the ledger).
    assert_refused(
        gw.settle(&key, card_request("f", "P1", "10.00", "284617")).await,
        Code::PermissionDenied,
        "PIN_LOCKED",
    );
    let gw = gw.restart().await;
    assert_refused(
        gw.settle(&key, card_request("g", "P1", "10.00", "284617")).await,
        Code::PermissionDenied,
        "PIN_LOCKED",
    );
    // PIN-exempt channels still work while the PIN is locked.
    gw.settle(&key, settle_request("h", "P1", "1.00")).await.unwrap();
    // The next Asia/Shanghai day it unlocks.
    gw.clock.advance_days(1);
    gw.settle(&key, card_request("i", "P1", "10.00", "284617")).await.unwrap();
    assert_eq!(gw.balance_of("P1").await, "69.00");

    // A malformed PIN is named.
    let status = assert_refused(
        gw.settle(&key, card_request("j", "P1", "10.00", "12345")).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert!(status.message().starts_with("pin:"), "{}", status.message());
    gw.assert_books_balance().await;
}

async fn pin_management_weak_change_and_operator_reset(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    gw.employee("P1", "0").await;
    let weak = pb::SetPinRequest { psn_no: "P1".into(), new_pin: "123456".into() };
    assert_refused(gw.account().set_pin(auth(weak, OPERATOR_KEY)).await, Code::InvalidArgument, "PIN_TOO_WEAK");
    gw.set_pin("P1", "284617").await;
    let again = pb::SetPinRequest { psn_no: "P1".into(), new_pin: "385720".into() };
    assert_refused(gw.account().set_pin(auth(again, OPERATOR_KEY)).await, Code::AlreadyExists, "ALREADY_EXISTS");
    let wrong = pb::ChangePinRequest { psn_no: "P1".into(), current_pin: "000001".into(), new_pin: "385720".into() };
    assert_refused(gw.account().change_pin(auth(wrong, OPERATOR_KEY)).await, Code::PermissionDenied, "PIN_INCORRECT");
    let right = pb::ChangePinRequest { psn_no: "P1".into(), current_pin: "284617".into(), new_pin: "385720".into() };
    gw.account().change_pin(auth(right, OPERATOR_KEY)).await.unwrap();

    let key = gw.hospital().await;
    gw.credit("P1", "5.00").await;
    gw.settle(&key, card_request("new-pin", "P1", "1.00", "385720")).await.unwrap();
    assert_refused(
        gw.settle(&key, card_request("old-pin", "P1", "1.00", "284617")).await,
        Code::PermissionDenied,
        "PIN_INCORRECT",
    );
    let reset = pb::ResetPinRequest { psn_no: "P1".into(), new_pin: "573920".into() };
    gw.admin().reset_pin(auth(reset, OPERATOR_KEY)).await.unwrap();
    gw.settle(&key, card_request("reset-pin", "P1", "1.00", "573920")).await.unwrap();
}

async fn no_pin_tier_per_payment_and_per_day(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "2000.00").await;
    gw.set_pin("P1", "284617").await;
    let no_pin = pb::SetNoPinTierRequest { psn_no: "P1".into(), pin: String::new(), tier: "T200".into() };
    assert_refused(
        gw.account().set_no_pin_tier(auth(no_pin, OPERATOR_KEY)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let set = pb::SetNoPinTierRequest { psn_no: "P1".into(), pin: "284617".into(), tier: "T200".into() };
    let balance = gw.account().set_no_pin_tier(auth(set, OPERATOR_KEY)).await.unwrap().into_inner();
    assert_eq!(balance.no_pin_tier, "T200");

    let paid = gw.settle(&key, card_request("t1", "P1", "200.00", "")).await.unwrap();
    assert_eq!(pb::AuthMethod::try_from(paid.auth_method), Ok(pb::AuthMethod::NoPinLimit));
    assert!(!paid.pin_required);
    assert_refused(
        gw.settle(&key, card_request("t2", "P1", "200.01", "")).await,
        Code::FailedPrecondition,
        "PIN_REQUIRED",
    );
    gw.settle(&key, card_request("t3", "P1", "150.00", "")).await.unwrap();
    gw.settle(&key, card_request("t4", "P1", "150.00", "")).await.unwrap();
    // 500.00 used today: the daily ceiling is reached. Planning already knows (it reads the day's
    // no-PIN total; the ledger's re-check at commit is not involved in a plan).
    let plan =
        gw.settlement().pre_settle(auth(card_request("t5-plan", "P1", "0.01", ""), &key)).await.unwrap().into_inner();
    assert!(plan.pin_required);
    assert_refused(
        gw.settle(&key, card_request("t5", "P1", "0.01", "")).await,
        Code::FailedPrecondition,
        "PIN_REQUIRED",
    );
    // With the PIN it goes through and does not count against the tier.
    gw.settle(&key, card_request("t6", "P1", "300.00", "284617")).await.unwrap();
    // A new Asia/Shanghai day starts a new allowance.
    gw.clock.advance_days(1);
    gw.settle(&key, card_request("t7", "P1", "200.00", "")).await.unwrap();
    assert_eq!(gw.balance_of("P1").await, "1000.00");

    // Concurrent no-PIN payments cannot together pass the daily ceiling.
    gw.clock.advance_days(1);
    let mut calls = Vec::new();
    for i in 0..8 {
        let (client, key) = (gw.settlement(), key.clone());
        calls.push(tokio::spawn(async move {
            let mut client = client;
            client.settle(auth(card_request(&format!("race{i}"), "P1", "100.00", ""), &key)).await
        }));
    }
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(reason(&status), "PIN_REQUIRED"),
        }
    }
    assert_eq!(ok, 5, "500.00 a day in 100.00 payments");
    assert_eq!(gw.balance_of("P1").await, "500.00");

    let off = pb::SetNoPinTierRequest { psn_no: "P1".into(), pin: String::new(), tier: "NONE".into() };
    assert_eq!(gw.account().set_no_pin_tier(auth(off, OPERATOR_KEY)).await.unwrap().into_inner().no_pin_tier, "NONE");
    let unknown = pb::SetNoPinTierRequest { psn_no: "P1".into(), pin: "284617".into(), tier: "T9999".into() };
    assert_refused(
        gw.account().set_no_pin_tier(auth(unknown, OPERATOR_KEY)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
}

async fn exempt_channels_and_the_registration_cap(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let hospital = gw.hospital().await;
    let platform = gw.institution("X001", pb::InstitutionKind::CrossRegionPlatform).await;
    gw.employee("P1", "1000.00").await;
    let registration = |id: &str, amount: &str| pb::SettleRequest {
        channel: pb::Channel::Registration as i32,
        category: pb::Category::Registration as i32,
        ec_token: String::new(),
        ..settle_request(id, "P1", amount)
    };
    let paid = gw.settle(&hospital, registration("g1", "100.00")).await.unwrap();
    assert_eq!(pb::AuthMethod::try_from(paid.auth_method), Ok(pb::AuthMethod::ChannelExempt));
    assert_refused(gw.settle(&hospital, registration("g2", "100.01")).await, Code::FailedPrecondition, "PIN_REQUIRED");
    let cross = pb::SettleRequest {
        channel: pb::Channel::CrossRegion as i32,
        ec_token: String::new(),
        ..settle_request("x1", "P1", "300.00")
    };
    let paid = gw.settle(&platform, cross).await.unwrap();
    assert_eq!(pb::AuthMethod::try_from(paid.auth_method), Ok(pb::AuthMethod::ChannelExempt));
    let voucher_without_token = pb::SettleRequest { ec_token: String::new(), ..settle_request("v1", "P1", "1.00") };
    let status =
        assert_refused(gw.settle(&hospital, voucher_without_token).await, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert!(status.message().starts_with("ec_token"));
    assert_eq!(gw.balance_of("P1").await, "600.00");
}

async fn channels_and_categories_are_checked_per_institution_kind(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let hospital = gw.hospital().await;
    let pharmacy = gw.institution("Y001", pb::InstitutionKind::Pharmacy).await;
    gw.employee("P1", "100.00").await;
    let registration_at_pharmacy = pb::SettleRequest {
        channel: pb::Channel::Registration as i32,
        category: pb::Category::Registration as i32,
        ..settle_request("p1", "P1", "5.00")
    };
    assert_refused(
        gw.settle(&pharmacy, registration_at_pharmacy).await,
        Code::FailedPrecondition,
        "CHANNEL_NOT_ALLOWED",
    );
    let registration_fee_by_voucher =
        pb::SettleRequest { category: pb::Category::Registration as i32, ..settle_request("p2", "P1", "5.00") };
    assert_refused(
        gw.settle(&pharmacy, registration_fee_by_voucher).await,
        Code::FailedPrecondition,
        "CATEGORY_NOT_ALLOWED",
    );
    let inpatient_at_pharmacy =
        pb::SettleRequest { category: pb::Category::Inpatient as i32, ..settle_request("p3", "P1", "5.00") };
    assert_refused(gw.settle(&pharmacy, inpatient_at_pharmacy).await, Code::FailedPrecondition, "CATEGORY_NOT_ALLOWED");
    let cross_at_hospital =
        pb::SettleRequest { channel: pb::Channel::CrossRegion as i32, ..settle_request("p4", "P1", "5.00") };
    assert_refused(gw.settle(&hospital, cross_at_hospital).await, Code::FailedPrecondition, "CHANNEL_NOT_ALLOWED");
    let medicine = pb::SettleRequest { category: pb::Category::Pharmacy as i32, ..settle_request("p5", "P1", "5.00") };
    gw.settle(&pharmacy, medicine).await.unwrap();
    assert_eq!(gw.balance_of("P1").await, "95.00");
}

async fn a_lost_card_refuses_card_payments_but_not_the_e_voucher(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "100.00").await;
    gw.set_pin("P1", "284617").await;
    gw.account().report_card_loss(auth(pb::ReportCardLossRequest { psn_no: "P1".into() }, OPERATOR_KEY)).await.unwrap();
    assert_refused(
        gw.settle(&key, card_request("l1", "P1", "10.00", "284617")).await,
        Code::FailedPrecondition,
        "CARD_LOST",
    );
    gw.settle(&key, settle_request("l2", "P1", "10.00")).await.unwrap();
    let restore = pb::RestoreCardRequest { psn_no: "P1".into(), pin: "284617".into() };
    let balance = gw.account().restore_card(auth(restore, OPERATOR_KEY)).await.unwrap().into_inner();
    assert_eq!(pb::CardStatus::try_from(balance.card_status), Ok(pb::CardStatus::Normal));
    gw.settle(&key, card_request("l3", "P1", "10.00", "284617")).await.unwrap();
    assert_eq!(gw.balance_of("P1").await, "80.00");
}

async fn refunds_go_back_in_reverse_order_and_never_exceed_what_was_paid(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "60.00").await;
    gw.employee("SPOUSE", "100.00").await;
    gw.family("SPOUSE", "P1", pb::Relation::Spouse).await;
    let paid = gw.settle(&key, settle_request("s1", "P1", "100.00")).await.unwrap();
    assert_eq!((paid.acct_pay.as_str(), paid.acct_mulaid_pay.as_str()), ("60.00", "40.00"));

    // The last account drawn is repaid first.
    let refund = pb::RefundRequest { request_id: "f1".into(), setl_id: paid.setl_id.clone(), amount: "50.00".into() };
    let refund = gw.settlement().refund(auth(refund, &key)).await.unwrap().into_inner();
    let credits: Vec<_> =
        refund.credits.iter().map(|c| (c.owner_psn_no.as_str(), c.amount.as_str(), c.family)).collect();
    assert_eq!(credits, [("SPOUSE", "40.00", true), ("P1", "10.00", false)]);
    assert_eq!(pb::SettlementStatus::try_from(refund.settlement_status), Ok(pb::SettlementStatus::PartiallyRefunded));
    assert_eq!((refund.refunded_total.as_str(), refund.refundable_amount.as_str()), ("50.00", "50.00"));
    assert_eq!(gw.balance_of("SPOUSE").await, "100.00");
    assert_eq!(gw.balance_of("P1").await, "10.00");

    // Ten concurrent refunds of 7.00 against 50.00 still refundable: exactly seven succeed.
    let mut calls = Vec::new();
    for i in 0..10 {
        let (client, key, setl_id) = (gw.settlement(), key.clone(), paid.setl_id.clone());
        calls.push(tokio::spawn(async move {
            let mut client = client;
            let request = pb::RefundRequest { request_id: format!("race{i}"), setl_id, amount: "7.00".into() };
            client.refund(auth(request, &key)).await
        }));
    }
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!((status.code(), reason(&status).as_str()), (Code::FailedPrecondition, "REFUND_EXCEEDS_PAID"))
            }
        }
    }
    assert_eq!(ok, 7);
    assert_eq!(gw.balance_of("P1").await, "59.00");

    // Empty amount: everything still refundable.
    let rest = pb::RefundRequest { request_id: "f-rest".into(), setl_id: paid.setl_id.clone(), amount: String::new() };
    let rest = gw.settlement().refund(auth(rest, &key)).await.unwrap().into_inner();
    assert_eq!(rest.amount, "1.00");
    assert_eq!(pb::SettlementStatus::try_from(rest.settlement_status), Ok(pb::SettlementStatus::Refunded));
    assert_eq!(gw.balance_of("P1").await, "60.00");
    let more = pb::RefundRequest { request_id: "f-more".into(), setl_id: paid.setl_id.clone(), amount: "0.01".into() };
    assert_refused(gw.settlement().refund(auth(more, &key)).await, Code::FailedPrecondition, "REFUND_EXCEEDS_PAID");

    // A replayed refund returns the first answer; a changed one is refused.
    let replay = pb::RefundRequest { request_id: "f1".into(), setl_id: paid.setl_id.clone(), amount: "50.00".into() };
    assert_eq!(gw.settlement().refund(auth(replay, &key)).await.unwrap().into_inner().refund_id, refund.refund_id);
    let changed = pb::RefundRequest { request_id: "f1".into(), setl_id: paid.setl_id.clone(), amount: "49.00".into() };
    assert_refused(gw.settlement().refund(auth(changed, &key)).await, Code::AlreadyExists, "REQUEST_ID_REUSED");
    gw.assert_books_balance().await;
}

async fn reversal_undoes_a_settlement_and_a_tombstone_refuses_a_late_original(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "30.00").await;
    gw.employee("MOTHER", "50.00").await;
    gw.family("MOTHER", "P1", pb::Relation::Child).await;
    gw.settle(&key, settle_request("orig", "P1", "45.00")).await.unwrap();
    assert_eq!((gw.balance_of("P1").await, gw.balance_of("MOTHER").await), ("0.00".into(), "35.00".into()));

    let reversed = gw
        .settlement()
        .reverse(auth(pb::ReverseRequest { original_request_id: "orig".into() }, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pb::SettlementStatus::try_from(reversed.status), Ok(pb::SettlementStatus::Reversed));
    assert_eq!((gw.balance_of("P1").await, gw.balance_of("MOTHER").await), ("30.00".into(), "50.00".into()));
    // Reversing twice is harmless; the original cannot be replayed; a refund finds nothing left.
    gw.settlement().reverse(auth(pb::ReverseRequest { original_request_id: "orig".into() }, &key)).await.unwrap();
    assert_eq!(gw.balance_of("P1").await, "30.00");
    assert_refused(
        gw.settle(&key, settle_request("orig", "P1", "45.00")).await,
        Code::FailedPrecondition,
        "ORIGINAL_REVERSED",
    );
    let refund =
        pb::RefundRequest { request_id: "after".into(), setl_id: reversed.setl_id.clone(), amount: String::new() };
    assert_refused(gw.settlement().refund(auth(refund, &key)).await, Code::FailedPrecondition, "REFUND_EXCEEDS_PAID");

    // A reversal that arrives before its original leaves a tombstone.
    let tomb = gw
        .settlement()
        .reverse(auth(pb::ReverseRequest { original_request_id: "late".into() }, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pb::SettlementStatus::try_from(tomb.status), Ok(pb::SettlementStatus::Reversed));
    assert_eq!(tomb.amount, "0.00");
    assert_refused(
        gw.settle(&key, settle_request("late", "P1", "10.00")).await,
        Code::FailedPrecondition,
        "ORIGINAL_REVERSED",
    );
    assert_eq!(gw.balance_of("P1").await, "30.00", "the late original took nothing");
    gw.assert_books_balance().await;
}

async fn institutions_see_and_refund_only_their_own_settlements(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let mine = gw.hospital().await;
    let theirs = gw.institution("H002", pb::InstitutionKind::Hospital).await;
    gw.employee("P1", "100.00").await;
    let paid = gw.settle(&mine, settle_request("m1", "P1", "10.00")).await.unwrap();
    let get = |id: &str| pb::GetSettlementRequest { key: Some(pb::get_settlement_request::Key::SetlId(id.into())) };
    assert_eq!(gw.settlement().get_settlement(auth(get(&paid.setl_id), &mine)).await.unwrap().into_inner(), paid);
    assert_refused(
        gw.settlement().get_settlement(auth(get(&paid.setl_id), &theirs)).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let refund = pb::RefundRequest { request_id: "x".into(), setl_id: paid.setl_id.clone(), amount: String::new() };
    assert_refused(gw.settlement().refund(auth(refund, &theirs)).await, Code::NotFound, "NOT_FOUND");
    let by_request = pb::GetSettlementRequest { key: Some(pb::get_settlement_request::Key::RequestId("m1".into())) };
    assert_refused(gw.settlement().get_settlement(auth(by_request, &theirs)).await, Code::NotFound, "NOT_FOUND");
    assert_eq!(gw.balance_of("P1").await, "90.00");
}

async fn family_rules_status_relations_frozen_accounts_and_self_only(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "10.00").await;
    gw.employee("SPOUSE", "100.00").await;
    gw.employee("BROTHER", "100.00").await;
    gw.person("KID", BEIJING, pb::PersonCategory::Resident, "0").await;
    gw.family("SPOUSE", "P1", pb::Relation::Spouse).await;
    gw.family("P1", "KID", pb::Relation::Child).await;

    // Beijing allows spouse, parents and children only (000 §8).
    let sibling = pb::RegisterFamilyMemberRequest {
        owner_psn_no: "BROTHER".into(),
        member_psn_no: "P1".into(),
        relation: pb::Relation::Sibling as i32,
    };
    assert_refused(
        gw.account().register_family_member(auth(sibling, OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "FAMILY_RELATION_NOT_ALLOWED",
    );
    // Family members must be insured in the same region.
    gw.person("HUNAN1", HUNAN, pb::PersonCategory::Employee, "5.00").await;
    let far = pb::RegisterFamilyMemberRequest {
        owner_psn_no: "HUNAN1".into(),
        member_psn_no: "P1".into(),
        relation: pb::Relation::Spouse as i32,
    };
    assert_refused(
        gw.account().register_family_member(auth(far, OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "FAMILY_RELATION_NOT_ALLOWED",
    );
    let twice = pb::RegisterFamilyMemberRequest {
        owner_psn_no: "SPOUSE".into(),
        member_psn_no: "P1".into(),
        relation: pb::Relation::Spouse as i32,
    };
    assert_refused(
        gw.account().register_family_member(auth(twice, OPERATOR_KEY)).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );

    // A resident child without an account draws on the parent's.
    let kid = gw.settle(&key, settle_request("k1", "KID", "4.00")).await.unwrap();
    assert_eq!(debits(&kid), vec![("P1".into(), "4.00".into(), true)]);
    assert_eq!((kid.acct_pay.as_str(), kid.acct_mulaid_pay.as_str(), kid.balc.as_str()), ("0.00", "4.00", "0.00"));

    // self_only: no family draw.
    let own = pb::SettleRequest { self_only: true, ..settle_request("s1", "P1", "20.00") };
    let own = gw.settle(&key, own).await.unwrap();
    assert_eq!(
        (own.acct_pay.as_str(), own.acct_mulaid_pay.as_str(), own.psn_cash_pay.as_str()),
        ("6.00", "0.00", "14.00")
    );

    // A frozen family account is skipped; a frozen own account refuses.
    gw.admin()
        .freeze_account(auth(
            pb::FreezeAccountRequest { psn_no: "SPOUSE".into(), reason: "audit".into() },
            OPERATOR_KEY,
        ))
        .await
        .unwrap();
    gw.credit("P1", "5.00").await;
    let skip = gw.settle(&key, settle_request("s2", "P1", "20.00")).await.unwrap();
    assert_eq!(
        (skip.acct_pay.as_str(), skip.acct_mulaid_pay.as_str(), skip.psn_cash_pay.as_str()),
        ("5.00", "0.00", "15.00")
    );
    gw.admin()
        .unfreeze_account(auth(pb::UnfreezeAccountRequest { psn_no: "SPOUSE".into() }, OPERATOR_KEY))
        .await
        .unwrap();
    gw.admin()
        .freeze_account(auth(pb::FreezeAccountRequest { psn_no: "P1".into(), reason: "audit".into() }, OPERATOR_KEY))
        .await
        .unwrap();
    assert_refused(
        gw.settle(&key, settle_request("s3", "P1", "1.00")).await,
        Code::FailedPrecondition,
        "ACCOUNT_FROZEN",
    );
    gw.admin().unfreeze_account(auth(pb::UnfreezeAccountRequest { psn_no: "P1".into() }, OPERATOR_KEY)).await.unwrap();

    // A REMOVED person keeps their own account but no longer draws on family (000 §14).
    let removed = pb::UpsertPersonRequest {
        psn_no: "P1".into(),
        name: "P1".into(),
        birth_date: "1980-01-01".into(),
        region: BEIJING.into(),
        category: pb::PersonCategory::Employee as i32,
        status: pb::InsuranceStatus::Removed as i32,
    };
    gw.admin().upsert_person(auth(removed, OPERATOR_KEY)).await.unwrap();
    gw.credit("P1", "3.00").await;
    let after = gw.settle(&key, settle_request("s4", "P1", "10.00")).await.unwrap();
    assert_eq!(
        (after.acct_pay.as_str(), after.acct_mulaid_pay.as_str(), after.psn_cash_pay.as_str()),
        ("3.00", "0.00", "7.00")
    );

    // Revoked: the spouse's account is no longer usable.
    let revoke = pb::RevokeFamilyMemberRequest { owner_psn_no: "SPOUSE".into(), member_psn_no: "P1".into() };
    gw.account().revoke_family_member(auth(revoke, OPERATOR_KEY)).await.unwrap();
    let family = gw
        .account()
        .list_family(auth(pb::ListFamilyRequest { psn_no: "P1".into() }, OPERATOR_KEY))
        .await
        .unwrap()
        .into_inner();
    let usable: Vec<_> = family.usable_accounts.iter().map(|a| a.owner_psn_no.as_str()).collect();
    assert_eq!(usable, ["P1"]);
    assert_eq!(gw.balance_of("SPOUSE").await, "100.00");
    gw.assert_books_balance().await;
}

async fn premiums_are_full_or_nothing_from_the_own_account_for_registered_family(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "300.00").await;
    gw.employee("SPOUSE", "1000.00").await;
    gw.person("MOM", BEIJING, pb::PersonCategory::Resident, "0").await;
    gw.family("SPOUSE", "P1", pb::Relation::Spouse).await;
    let premium = |id: &str, amount: &str, beneficiary: &str| pb::SettleRequest {
        category: pb::Category::Premium as i32,
        beneficiary_psn_no: beneficiary.into(),
        ..settle_request(id, "P1", amount)
    };
    // Partial mode asked, but a premium is all or nothing and never drawn from family accounts.
    assert_refused(
        gw.settle(&key, premium("pr1", "350.00", "")).await,
        Code::FailedPrecondition,
        "INSUFFICIENT_BALANCE",
    );
    assert_refused(
        gw.settle(&key, premium("pr2", "100.00", "MOM")).await,
        Code::FailedPrecondition,
        "NOT_REGISTERED_FAMILY",
    );
    gw.family("P1", "MOM", pb::Relation::Parent).await;
    let paid = gw.settle(&key, premium("pr3", "100.00", "MOM")).await.unwrap();
    assert_eq!(
        (paid.acct_pay.as_str(), paid.acct_mulaid_pay.as_str(), paid.beneficiary_psn_no.as_str()),
        ("100.00", "0.00", "MOM")
    );
    assert_eq!((gw.balance_of("P1").await, gw.balance_of("SPOUSE").await), ("200.00".into(), "1000.00".into()));
}

async fn pre_settle_plans_without_side_effects(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "50.00").await;
    let plan =
        gw.settlement().pre_settle(auth(card_request("plan", "P1", "80.00", ""), &key)).await.unwrap().into_inner();
    assert_eq!(pb::SettlementStatus::try_from(plan.status), Ok(pb::SettlementStatus::Planned));
    assert!(plan.pin_required);
    assert_eq!((plan.acct_pay.as_str(), plan.psn_cash_pay.as_str(), plan.balc.as_str()), ("50.00", "30.00", "0.00"));
    assert_eq!(gw.balance("P1").await, ("50.00".into(), "50.00".into()));
    // The request id is still free.
    gw.settle(&key, settle_request("plan", "P1", "80.00")).await.unwrap();
}

async fn malformed_input_is_refused_with_the_field_named_and_changes_nothing(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "50.00").await;
    for bad in ["-1.00", "1.234", "1e3", "", " 1.00", "+5", "0", "1000000.01", "1,000"] {
        let status = assert_refused(
            gw.settle(&key, settle_request("bad", "P1", bad)).await,
            Code::InvalidArgument,
            "INVALID_AMOUNT",
        );
        assert!(status.message().starts_with("amount:"), "{bad:?}: {}", status.message());
        let field =
            tonic_types::StatusExt::get_error_details(&status).bad_request().unwrap().field_violations[0].field.clone();
        assert_eq!(field, "amount");
    }
    let no_channel = pb::SettleRequest { channel: 0, ..settle_request("bad", "P1", "1.00") };
    assert!(assert_refused(gw.settle(&key, no_channel).await, Code::InvalidArgument, "INVALID_ARGUMENT")
        .message()
        .starts_with("channel"));
    let no_mode = pb::SettleRequest { mode: 0, ..settle_request("bad", "P1", "1.00") };
    assert!(assert_refused(gw.settle(&key, no_mode).await, Code::InvalidArgument, "INVALID_ARGUMENT")
        .message()
        .starts_with("mode"));
    let long_id = settle_request(&"x".repeat(65), "P1", "1.00");
    assert!(assert_refused(gw.settle(&key, long_id).await, Code::InvalidArgument, "INVALID_ARGUMENT")
        .message()
        .starts_with("request_id"));
    assert_refused(gw.settle(&key, settle_request("u", "NOBODY", "1.00")).await, Code::NotFound, "UNKNOWN_PERSON");
    assert_eq!(gw.balance_of("P1").await, "50.00");
    let adjust = pb::AdjustRequest {
        request_id: "adj".into(),
        psn_no: "P1".into(),
        amount: "60.00".into(),
        direction: pb::AdjustDirection::Debit as i32,
        reason: "correction".into(),
        value_date: String::new(),
    };
    assert_refused(
        gw.admin().adjust(auth(adjust, OPERATOR_KEY)).await,
        Code::FailedPrecondition,
        "INSUFFICIENT_BALANCE",
    );
    let future = pb::AdjustRequest {
        request_id: "adj2".into(),
        psn_no: "P1".into(),
        amount: "1.00".into(),
        direction: pb::AdjustDirection::Credit as i32,
        reason: "correction".into(),
        value_date: "2999-01-01".into(),
    };
    assert_refused(gw.admin().adjust(auth(future, OPERATOR_KEY)).await, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(gw.balance("P1").await, ("50.00".into(), "50.00".into()));
}

async fn callers_need_a_key_with_the_right_role(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let institution = gw.hospital().await;
    gw.employee("P1", "50.00").await;
    let no_key = gw.settlement().settle(tonic::Request::new(settle_request("a", "P1", "1.00"))).await;
    assert_refused(no_key, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_refused(
        gw.settle("yb_not-a-key", settle_request("a", "P1", "1.00")).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    let service = pb::IssueApiKeyRequest { role: pb::Role::Service as i32, label: "public service platform".into() };
    let service = gw.admin().issue_api_key(auth(service, OPERATOR_KEY)).await.unwrap().into_inner().api_key;
    assert_refused(
        gw.settle(&service, settle_request("a", "P1", "1.00")).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let admin_by_institution = pb::FreezeAccountRequest { psn_no: "P1".into(), reason: String::new() };
    assert_refused(
        gw.admin().freeze_account(auth(admin_by_institution, &institution)).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let entries_by_institution = pb::ListEntriesRequest { psn_no: "P1".into(), ..Default::default() };
    assert_refused(
        gw.account().list_entries(auth(entries_by_institution, &institution)).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    // The service platform may manage accounts; an institution may look up a balance.
    gw.account()
        .set_pin(auth(pb::SetPinRequest { psn_no: "P1".into(), new_pin: "284617".into() }, &service))
        .await
        .unwrap();
    let balance = gw
        .account()
        .get_balance(auth(pb::GetBalanceRequest { psn_no: "P1".into() }, &institution))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((balance.balance.as_str(), balance.pin_set), ("50.00", true));
}

async fn entries_show_every_change_with_paging(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "10.00").await;
    gw.employee("SPOUSE", "100.00").await;
    gw.family("P1", "SPOUSE", pb::Relation::Spouse).await;
    let paid = gw.settle(&key, settle_request("e1", "P1", "3.00")).await.unwrap();
    gw.settle(&key, settle_request("e2", "SPOUSE", "102.00")).await.unwrap();
    let refund = pb::RefundRequest { request_id: "e3".into(), setl_id: paid.setl_id.clone(), amount: "1.00".into() };
    gw.settlement().refund(auth(refund, &key)).await.unwrap();

    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let request = pb::ListEntriesRequest {
            psn_no: "P1".into(),
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        };
        let page = gw.account().list_entries(auth(request, OPERATOR_KEY)).await.unwrap().into_inner();
        assert!(page.entries.len() <= 2);
        all.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let seen: Vec<_> = all
        .iter()
        .map(|e| {
            (
                pb::EntryKind::try_from(e.kind).unwrap(),
                e.amount.as_str(),
                e.balance_after.as_str(),
                e.counterparty.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (pb::EntryKind::Refund, "1.00", "6.00", "H001"),
            (pb::EntryKind::FamilySettlement, "-2.00", "5.00", "SPOUSE"),
            (pb::EntryKind::Settlement, "-3.00", "7.00", "H001"),
            (pb::EntryKind::Adjustment, "10.00", "10.00", "OPERATOR"),
        ]
    );
    let today = all[0].value_date.clone();
    let filtered = pb::ListEntriesRequest {
        psn_no: "P1".into(),
        from_date: "2000-01-01".into(),
        to_date: "2000-12-31".into(),
        ..Default::default()
    };
    assert!(gw.account().list_entries(auth(filtered, OPERATOR_KEY)).await.unwrap().into_inner().entries.is_empty());
    let bad = pb::ListEntriesRequest {
        psn_no: "P1".into(),
        from_date: today.clone(),
        to_date: "2000-01-01".into(),
        ..Default::default()
    };
    assert_refused(gw.account().list_entries(auth(bad, OPERATOR_KEY)).await, Code::InvalidArgument, "INVALID_ARGUMENT");
}

async fn settled_money_survives_a_restart_and_the_cache_reloads(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "100.00").await;
    gw.settle(&key, settle_request("r1", "P1", "30.00")).await.unwrap();
    let gw = gw.restart().await;
    assert_eq!(gw.balance("P1").await, ("70.00".into(), "70.00".into()));
    let again = gw.settle(&key, settle_request("r1", "P1", "30.00")).await.unwrap();
    assert_eq!(again.balc, "70.00", "the replay answers as first answered");
    let paid = gw.settle(&key, settle_request("r2", "P1", "80.00")).await.unwrap();
    assert_eq!((paid.acct_pay.as_str(), paid.psn_cash_pay.as_str()), ("70.00", "10.00"));
    gw.assert_books_balance().await;
}

async fn an_overloaded_gateway_refuses_at_once_and_changes_nothing(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    gw.employee("P1", "10.00").await;
    let admission = gw.app.gateway.admission.clone();
    let all = admission.clone().acquire_many_owned(gw.app.gateway.settings.in_flight_max as u32).await.unwrap();
    assert_refused(gw.settle(&key, settle_request("busy", "P1", "1.00")).await, Code::Unavailable, "OVERLOADED");
    assert_eq!(gw.balance_of("P1").await, "10.00");
    drop(all);
    let paid = gw.settle(&key, settle_request("busy", "P1", "1.00")).await.unwrap();
    assert_eq!(paid.balc, "9.00", "the retry of a refused request goes through");
}
