//! The ledger and the cache below the gRPC layer: batch outcomes, hold deadlines and the sweeper.

mod common;

on_both_backends!(
    the_sweepers_verdict_is_final,
    one_refused_write_never_fails_the_others_in_its_batch,
    a_batch_drawing_one_account_several_times_posts_each_running_balance,
    the_sweeper_commits_holds_the_ledger_has_and_releases_the_others,
    a_debit_adjustment_holds_and_finalizes_like_a_payment,
    reading_the_cache_installs_only_a_newer_ledger_balance,
    reserving_installs_only_a_newer_ledger_balance_first,
    the_lease_index_lists_exactly_the_holds_that_exist,
    a_request_is_claimed_by_one_attempt_at_a_time,
    a_transfer_out_computed_before_an_interest_run_paid_is_declined_not_paid_twice,
    payer_contexts_asked_at_once_each_answer_their_own_payer,
);

use common::*;
use yibao::cache::memory::unix_ms;
use yibao::cache::{Claim, Reserve};
use yibao::domain::{AuthMethod, Category, Channel, Money};
use yibao::gateway::RequestClaim;
use yibao::ledger::{DebitLine, LedgerWrite, NewSettlement, WriteDecline, WriteOutcome};
use yibao::rpc::pb;

fn yuan(text: &str) -> Money {
    Money::parse(text).unwrap()
}

async fn account_of(gw: &TestGateway, psn_no: &str) -> i64 {
    gw.app.gateway.ledger.person(psn_no).await.unwrap().unwrap().account.unwrap().id
}

fn settlement(
    setl_id: &str,
    request_id: &str,
    psn_no: &str,
    account_id: i64,
    amount: &str,
    deadline: Option<u64>,
) -> NewSettlement {
    let at = chrono::Utc::now();
    NewSettlement {
        setl_id: setl_id.into(),
        institution_code: "H001".into(),
        request_id: request_id.into(),
        fingerprint: "f".into(),
        psn_no: psn_no.into(),
        amount: yuan(amount),
        channel: Channel::EVoucher,
        category: Category::Outpatient,
        auth_method: AuthMethod::ChannelExempt,
        mdtrt_id: String::new(),
        beneficiary_psn_no: String::new(),
        debits: vec![DebitLine { account_id, owner_psn_no: psn_no.into(), amount: yuan(amount), family: false }],
        own_account: Some(account_id),
        no_pin_daily_max: None,
        hold_deadline_ms: deadline,
        business_date: yibao::clock::business_date(at),
        at,
    }
}

async fn one_refused_write_never_fails_the_others_in_its_batch(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    gw.hospital().await;
    gw.employee("P1", "10.00").await;
    let account = account_of(&gw, "P1").await;
    let batch = vec![
        LedgerWrite::Settle(settlement("S-a", "a", "P1", account, "6.00", None)),
        LedgerWrite::Settle(settlement("S-b", "b", "P1", account, "6.00", None)), // would go negative
        LedgerWrite::Settle(settlement("S-c", "c", "P1", account, "4.00", None)),
        LedgerWrite::Settle(settlement("S-d", "d", "P1", account, "0.01", Some(1))), // deadline long past
        LedgerWrite::Settle(settlement("S-e", "a", "P1", account, "6.00", None)),    // same request id as a
    ];
    let results = gw.app.gateway.ledger.commit_batch(batch).await.unwrap();
    assert!(matches!(&results[0], Ok(WriteOutcome::Settled { record, .. }) if record.balc == yuan("4.00")));
    assert_eq!(results[1].as_ref().unwrap_err(), &WriteDecline::InsufficientBalance { account_id: account });
    assert!(matches!(&results[2], Ok(WriteOutcome::Settled { record, .. }) if record.balc == Money::ZERO));
    assert_eq!(results[3].as_ref().unwrap_err(), &WriteDecline::HoldExpired);
    assert!(matches!(&results[4], Ok(WriteOutcome::SettlementExists(existing)) if existing.setl_id == "S-a"));
    assert_eq!(gw.app.gateway.ledger.account_balance(account).await.unwrap().unwrap().0, Money::ZERO);
    gw.assert_books_balance().await;
}

/// On PostgreSQL a batch of plain settlements is written set-based (yibao_settle_all); the
/// postings, balances, sequence numbers and receipts must be exactly those of writing the batch
/// write after write, as the embedded ledger does.
async fn a_batch_drawing_one_account_several_times_posts_each_running_balance(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    gw.hospital().await;
    gw.employee("P1", "10.00").await;
    gw.employee("P2", "5.00").await;
    gw.employee("P3", "0.00").await;
    let (p1, p2, p3) = (account_of(&gw, "P1").await, account_of(&gw, "P2").await, account_of(&gw, "P3").await);
    let ledger = &gw.app.gateway.ledger;
    let seq0 = |account| async move { ledger.account_balance(account).await.unwrap().unwrap().1 };
    let (s1, s2) = (seq0(p1).await, seq0(p2).await);
    let debit = |account_id, owner: &str, amount: &str, family| DebitLine {
        account_id,
        owner_psn_no: owner.into(),
        amount: yuan(amount),
        family,
    };
    let a = settlement("S-a", "a", "P1", p1, "3.00", None);
    let mut b = settlement("S-b", "b", "P2", p2, "9.00", None);
    b.debits = vec![debit(p2, "P2", "5.00", false), debit(p1, "P1", "4.00", true)];
    let mut c = settlement("S-c", "c", "P1", p1, "2.50", None);
    c.debits = vec![debit(p1, "P1", "1.00", false)];
    // P3's own account is empty: the whole payment comes from P1, and P3's balance stays 0.00.
    let mut d = settlement("S-d", "d", "P3", p3, "2.00", Some(unix_ms() + 60_000));
    d.debits = vec![debit(p1, "P1", "2.00", true)];
    let batch = [a, b, c, d].into_iter().map(LedgerWrite::Settle).collect();
    let results = ledger.commit_batch(batch).await.unwrap();

    let settled: Vec<_> = results
        .into_iter()
        .map(|result| match result {
            Ok(WriteOutcome::Settled { record, changes }) => (record, changes),
            other => panic!("expected a settlement, got {other:?}"),
        })
        .collect();
    let receipt = |i: usize| {
        let (record, _) = &settled[i];
        (
            record.acct_pay.to_string(),
            record.acct_mulaid_pay.to_string(),
            record.psn_cash_pay.to_string(),
            record.balc.to_string(),
        )
    };
    let moves =
        |i: usize| settled[i].1.iter().map(|c| (c.account_id, c.balance_after.to_string(), c.seq)).collect::<Vec<_>>();
    assert_eq!(receipt(0), ("3.00".into(), "0.00".into(), "0.00".into(), "7.00".into()));
    assert_eq!(moves(0), vec![(p1, "7.00".into(), s1 + 1)]);
    assert_eq!(receipt(1), ("5.00".into(), "4.00".into(), "0.00".into(), "0.00".into()));
    assert_eq!(moves(1), vec![(p2, "0.00".into(), s2 + 1), (p1, "3.00".into(), s1 + 2)]);
    assert_eq!(receipt(2), ("1.00".into(), "0.00".into(), "1.50".into(), "2.00".into()));
    assert_eq!(moves(2), vec![(p1, "2.00".into(), s1 + 3)]);
    assert_eq!(receipt(3), ("0.00".into(), "2.00".into(), "0.00".into(), "0.00".into()));
    assert_eq!(moves(3), vec![(p1, "0.00".into(), s1 + 4)]);

    // The ledger agrees: final balances and sequence numbers, and each posting's balance after it.
    assert_eq!(ledger.account_balance(p1).await.unwrap().unwrap(), (Money::ZERO, s1 + 4));
    assert_eq!(ledger.account_balance(p2).await.unwrap().unwrap(), (Money::ZERO, s2 + 1));
    let entries = gw
        .account()
        .list_entries(auth(pb::ListEntriesRequest { psn_no: "P1".into(), ..Default::default() }, OPERATOR_KEY))
        .await
        .unwrap()
        .into_inner()
        .entries;
    // Newest first.
    let p1_moves: Vec<(String, String)> = entries.iter().map(|e| (e.amount.clone(), e.balance_after.clone())).collect();
    assert_eq!(
        p1_moves,
        vec![
            ("-2.00".into(), "0.00".into()),
            ("-1.00".into(), "2.00".into()),
            ("-4.00".into(), "3.00".into()),
            ("-3.00".into(), "7.00".into()),
            ("10.00".into(), "10.00".into()),
        ]
    );
    gw.assert_books_balance().await;
}

async fn the_sweeper_commits_holds_the_ledger_has_and_releases_the_others(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    gw.hospital().await;
    gw.employee("P1", "10.00").await;
    let account = account_of(&gw, "P1").await;
    let gateway = &gw.app.gateway;
    let (balance, seq) = gateway.ledger.account_balance(account).await.unwrap().unwrap();
    gateway.cache.load(account, balance, seq).await.unwrap();
    // Two holds from a "crashed" gateway: one whose settlement reached the ledger, one not.
    assert_eq!(
        gateway.cache.reserve(account, "S-committed", yuan("3.00"), 0).await.unwrap(),
        Reserve::Held(yuan("3.00"))
    );
    assert_eq!(gateway.cache.reserve(account, "S-lost", yuan("2.00"), 0).await.unwrap(), Reserve::Held(yuan("2.00")));
    let results = gateway
        .ledger
        .commit_batch(vec![LedgerWrite::Settle(settlement("S-committed", "x", "P1", account, "3.00", None))])
        .await
        .unwrap();
    assert!(results[0].is_ok());
    assert_eq!(
        gw.balance("P1").await,
        ("7.00".into(), "2.00".into()),
        "until the sweeper settles it, a committed hold counts twice: understated, never overstated"
    );

    // Within the grace period nothing is touched; after it both holds are settled.
    assert_eq!(yibao::settle::sweeper::sweep_once(gateway, unix_ms()).await, 0);
    let later = unix_ms() + yibao::settle::sweeper::SWEEP_GRACE_MS + 1_000;
    assert_eq!(yibao::settle::sweeper::sweep_once(gateway, later).await, 2);
    let cached = gateway.cache.get(account).await.unwrap().unwrap();
    assert_eq!((cached.balance, cached.held), (yuan("7.00"), Money::ZERO));
    assert_eq!(gw.balance("P1").await, ("7.00".into(), "7.00".into()));
}

async fn a_debit_adjustment_holds_and_finalizes_like_a_payment(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    gw.employee("P1", "10.00").await;
    let debit = |id: &str, amount: &str| pb::AdjustRequest {
        request_id: id.into(),
        psn_no: "P1".into(),
        amount: amount.into(),
        direction: pb::AdjustDirection::Debit as i32,
        reason: "correction of a double credit".into(),
        value_date: String::new(),
    };
    let answer = gw.admin().adjust(auth(debit("d1", "4.00"), OPERATOR_KEY)).await.unwrap().into_inner();
    assert_eq!((answer.amount.as_str(), answer.balance.as_str()), ("-4.00", "6.00"));
    // A replay answers the same; a changed replay is refused.
    assert_eq!(
        gw.admin().adjust(auth(debit("d1", "4.00"), OPERATOR_KEY)).await.unwrap().into_inner().entry_id,
        answer.entry_id
    );
    assert_refused(
        gw.admin().adjust(auth(debit("d1", "5.00"), OPERATOR_KEY)).await,
        tonic::Code::AlreadyExists,
        "REQUEST_ID_REUSED",
    );
    assert_eq!(gw.balance("P1").await, ("6.00".into(), "6.00".into()));
    let account = account_of(&gw, "P1").await;
    assert_eq!(gw.app.gateway.cache.get(account).await.unwrap().unwrap().held, Money::ZERO, "no hold left open");
    gw.assert_books_balance().await;
}

/// Once the sweeper has released a hold as "not committed", the write that took it can never
/// commit; once a write committed, the sweeper's answer is "committed".
async fn the_sweepers_verdict_is_final(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    gw.hospital().await;
    gw.employee("P1", "10.00").await;
    let account = account_of(&gw, "P1").await;
    let ledger = &gw.app.gateway.ledger;
    assert!(!ledger.resolve_hold("S-late").await.unwrap(), "never committed: fenced");
    let late = ledger
        .commit_batch(vec![LedgerWrite::Settle(settlement("S-late", "late", "P1", account, "1.00", None))])
        .await
        .unwrap();
    assert_eq!(late[0].as_ref().unwrap_err(), &WriteDecline::HoldExpired);
    let done = ledger
        .commit_batch(vec![LedgerWrite::Settle(settlement("S-done", "done", "P1", account, "1.00", None))])
        .await
        .unwrap();
    assert!(done[0].is_ok());
    assert!(ledger.resolve_hold("S-done").await.unwrap());
    assert!(ledger.resolve_hold("S-done").await.unwrap(), "the verdict does not change");
    assert_eq!(ledger.account_balance(account).await.unwrap().unwrap().0, yuan("9.00"));
}

/// Planning installs the balance it read from the ledger in the same cache call that reads the
/// cache: a missing account is loaded, an older cached state catches up, a newer one stays, and
/// open holds always count.
async fn reading_the_cache_installs_only_a_newer_ledger_balance(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let cache = &gw.app.gateway.cache;
    let id = 900_001;
    assert_eq!(cache.get(id).await.unwrap(), None);
    let loaded = cache.load_and_get(id, yuan("50.00"), 3).await.unwrap();
    assert_eq!((loaded.balance, loaded.held, loaded.seq), (yuan("50.00"), Money::ZERO, 3));
    assert_eq!(cache.reserve(id, "h1", yuan("20.00"), 60_000).await.unwrap(), Reserve::Held(yuan("20.00")));

    let kept = cache.load_and_get(id, yuan("999.00"), 2).await.unwrap();
    assert_eq!((kept.balance, kept.held, kept.seq, kept.available()), (yuan("50.00"), yuan("20.00"), 3, yuan("30.00")));
    let same = cache.load_and_get(id, yuan("999.00"), 3).await.unwrap();
    assert_eq!((same.balance, same.seq), (yuan("50.00"), 3), "an equal sequence is not newer");

    // A commit the cache never heard of: the newer balance replaces the old one while the hold
    // stays until it is finished, so the money is understated for a moment, never overstated.
    let newer = cache.load_and_get(id, yuan("30.00"), 4).await.unwrap();
    assert_eq!(
        (newer.balance, newer.held, newer.seq, newer.available()),
        (yuan("30.00"), yuan("20.00"), 4, yuan("10.00"))
    );
    assert_eq!(cache.get(id).await.unwrap(), Some(newer));
}

/// A payment not planned against the cache first (a PIN-exempt channel) installs the balance it
/// read from the ledger in the same cache call that holds: a missing account is loaded, an older
/// cached state catches up, a newer one stays, and open holds always count.
async fn reserving_installs_only_a_newer_ledger_balance_first(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let cache = &gw.app.gateway.cache;
    let id = 900_003;
    assert_eq!(cache.get(id).await.unwrap(), None);
    let held = cache.load_and_reserve(id, yuan("10.00"), 5, "h1", yuan("4.00"), 60_000).await.unwrap();
    assert_eq!(held, Reserve::Held(yuan("4.00")), "a missing account is loaded, then held on");

    let older = cache.load_and_reserve(id, yuan("50.00"), 3, "h2", yuan("20.00"), 60_000).await.unwrap();
    assert_eq!(older, Reserve::Held(yuan("6.00")), "an older ledger balance is not installed");
    let equal = cache.load_and_reserve(id, yuan("50.00"), 5, "h3", yuan("1.00"), 60_000).await.unwrap();
    assert_eq!(equal, Reserve::Held(Money::ZERO), "an equal sequence is not newer");
    let cached = cache.get(id).await.unwrap().unwrap();
    assert_eq!((cached.balance, cached.held, cached.seq), (yuan("10.00"), yuan("10.00"), 5));

    // A commit the cache never heard of: the newer balance replaces the old one, and the holds
    // still count against it.
    let newer = cache.load_and_reserve(id, yuan("50.00"), 9, "h4", yuan("100.00"), 60_000).await.unwrap();
    assert_eq!(newer, Reserve::Held(yuan("40.00")));
    let again = cache.load_and_reserve(id, yuan("80.00"), 9, "h4", yuan("100.00"), 60_000).await.unwrap();
    assert_eq!(again, Reserve::Held(yuan("40.00")), "a repeated hold answers what it holds");
    let cached = cache.get(id).await.unwrap().unwrap();
    assert_eq!((cached.balance, cached.held, cached.seq), (yuan("50.00"), yuan("50.00"), 9));
}

/// The sweeper finds holds through the lease index: every hold that exists is in it, and a hold
/// that was finished, or a reservation that held nothing, is not. (On one Redis server the index
/// is written by the reserve and finish scripts themselves.)
async fn the_lease_index_lists_exactly_the_holds_that_exist(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let cache = &gw.app.gateway.cache;
    let id = 900_002;
    let listed = || async {
        let mut holds: Vec<String> = cache
            .expired_holds(unix_ms() + 120_000, 1_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|hold| hold.account_id == id)
            .map(|hold| hold.hold_id)
            .collect();
        holds.sort();
        holds
    };
    assert_eq!(cache.reserve(id, "h0", yuan("1.00"), 60_000).await.unwrap(), Reserve::NotLoaded);
    assert_eq!(listed().await, Vec::<String>::new(), "nothing held on an account not loaded");

    cache.load(id, yuan("5.00"), 1).await.unwrap();
    assert_eq!(cache.reserve(id, "h1", yuan("3.00"), 60_000).await.unwrap(), Reserve::Held(yuan("3.00")));
    assert_eq!(cache.reserve(id, "h2", yuan("4.00"), 60_000).await.unwrap(), Reserve::Held(yuan("2.00")));
    assert_eq!(cache.reserve(id, "h3", yuan("1.00"), 60_000).await.unwrap(), Reserve::Held(Money::ZERO));
    assert_eq!(listed().await, vec!["h1".to_string(), "h2".to_string()], "a reservation of nothing is no hold");
    // A repeated reserve of a hold answers what it holds and leaves it listed.
    assert_eq!(cache.reserve(id, "h1", yuan("3.00"), 60_000).await.unwrap(), Reserve::Held(yuan("3.00")));
    assert_eq!(listed().await, vec!["h1".to_string(), "h2".to_string()]);

    cache.commit_hold(id, "h1", yuan("2.00"), 2).await.unwrap();
    assert_eq!(listed().await, vec!["h2".to_string()]);
    cache.release_hold(id, "h2").await.unwrap();
    assert_eq!(listed().await, Vec::<String>::new());
    let cached = cache.get(id).await.unwrap().unwrap();
    assert_eq!((cached.balance, cached.held, cached.seq), (yuan("2.00"), Money::ZERO, 2));
}

/// A transfer out computes the interest it pays first before its write; an interest run that pays
/// the account a period in between makes that computation stale: the ledger declines the write
/// (nothing applied) instead of paying that period twice.
async fn a_transfer_out_computed_before_an_interest_run_paid_is_declined_not_paid_twice(backend: Backend) {
    use chrono::NaiveDate;
    use yibao::domain::credit::CreditLine;
    use yibao::domain::{SystemAccount, TxnKind};
    use yibao::ledger::{CreditBatch, CreditPosting, LifecycleKind, NewLifecycle};
    let gw = TestGateway::start_with(backend).await;
    gw.employee("P1", "1000.00").await;
    let account = account_of(&gw, "P1").await;
    let ledger = &gw.app.gateway.ledger;
    let day = |text: &str| NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap();
    let now = chrono::Utc::now();
    let transfer = |seen: Option<NaiveDate>| {
        LedgerWrite::Lifecycle(NewLifecycle {
            request_id: "T1".into(),
            fingerprint: "f".into(),
            kind: LifecycleKind::TransferOut,
            psn_no: "P1".into(),
            amount: None,
            interest: Some((day("2025-04-02"), yuan("8.94"))),
            interest_seen: seen,
            open_account: false,
            memo: "to 220000".into(),
            value_date: day("2025-04-03"),
            business_date: day("2025-04-03"),
            at: now,
        })
    };
    // The interest run pays Q1 after the transfer's computation saw no interest paid.
    let q1 = CreditPosting {
        account_id: account,
        psn_no: "P1".into(),
        period: "2025-03-31".into(),
        value_date: day("2025-03-31"),
        line: CreditLine { kind: TxnKind::Interest, amount: yuan("8.75"), counterpart: SystemAccount::InterestExpense },
        interest_seen: Some(String::new()),
    };
    let batch = CreditBatch {
        postings: vec![q1],
        reference: "interest 110000 2025-03-31".into(),
        business_date: day("2025-04-03"),
        at: now,
    };
    assert_eq!(ledger.apply_credits(batch).await.unwrap().applied, vec![true]);
    // An interest run's line computed before that payment (it saw none paid) is not applied either.
    let q2 = |seen: &str| CreditPosting {
        account_id: account,
        psn_no: "P1".into(),
        period: "2025-06-30".into(),
        value_date: day("2025-06-30"),
        line: CreditLine { kind: TxnKind::Interest, amount: yuan("0.50"), counterpart: SystemAccount::InterestExpense },
        interest_seen: Some(seen.into()),
    };
    let batch = |line| CreditBatch {
        postings: vec![line],
        reference: "interest".into(),
        business_date: day("2025-07-01"),
        at: now,
    };
    assert_eq!(ledger.apply_credits(batch(q2(""))).await.unwrap().applied, vec![false]);
    assert_eq!(ledger.account_balance(account).await.unwrap().unwrap().0, yuan("1008.75"));
    let stale = ledger.commit_batch(vec![transfer(None)]).await.unwrap();
    assert_eq!(stale[0].as_ref().unwrap_err(), &WriteDecline::Stale);
    assert_eq!(ledger.account_balance(account).await.unwrap().unwrap().0, yuan("1008.75"));
    // Computed again from the period paid: through.
    let done = ledger.commit_batch(vec![transfer(Some(day("2025-03-31")))]).await.unwrap();
    match &done[0] {
        Ok(WriteOutcome::Lifecycle { record, .. }) => {
            assert_eq!((record.interest, record.amount), (yuan("8.94"), yuan("1017.69")));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(ledger.account_balance(account).await.unwrap().unwrap().0, Money::ZERO);
    gw.assert_books_balance().await;
}

/// The cache's claim per (institution, request id): one holder at a time, only the holder ends
/// it, a claim whose owner vanished runs out, and an ended claim with an answer answers replays.
async fn a_request_is_claimed_by_one_attempt_at_a_time(backend: Backend) {
    // A lease of an hour: a claim left behind would last two, far longer than this test waits.
    let gw = TestGateway::start_adjusted(backend, |config| config.settings.hold_lease_ms = 3_600_000).await;
    let cache = &gw.app.gateway.cache;
    let claim = |code: &'static str, id: &'static str, owner: &'static str, ttl_ms: u64| async move {
        cache.claim_request(code, id, owner, ttl_ms).await.unwrap()
    };
    assert_eq!(claim("H001", "r1", "A", 60_000).await, Claim::Claimed);
    assert_eq!(claim("H001", "r1", "B", 60_000).await, Claim::Busy);
    assert_eq!(claim("H001", "r1", "A", 60_000).await, Claim::Claimed, "its holder asking again keeps it");
    assert_eq!(claim("H001", "r2", "B", 60_000).await, Claim::Claimed, "another request id");
    assert_eq!(claim("H002", "r1", "B", 60_000).await, Claim::Claimed, "another institution");
    assert_eq!(claim("H0", "01:r1", "B", 60_000).await, Claim::Claimed, "no (code, id) pair stands for another");

    cache.end_claim("H001", "r1", "B", None).await.unwrap();
    assert_eq!(claim("H001", "r1", "C", 60_000).await, Claim::Busy, "only the holder ends a claim");
    cache.end_claim("H001", "r1", "A", None).await.unwrap();
    assert_eq!(claim("H001", "r1", "B", 60_000).await, Claim::Claimed, "an ended claim can be taken");
    cache.end_claim("H001", "r1", "B", Some("S-1")).await.unwrap();
    assert_eq!(claim("H001", "r1", "C", 60_000).await, Claim::Answered("S-1".into()));
    // A remembered answer is forgotten only by its own setl_id; then the request can be claimed.
    cache.forget_answer("H001", "r1", "S-0").await.unwrap();
    assert_eq!(claim("H001", "r1", "C", 60_000).await, Claim::Answered("S-1".into()), "another answer stays");
    cache.forget_answer("H001", "r1", "S-1").await.unwrap();
    assert_eq!(claim("H001", "r1", "C", 60_000).await, Claim::Claimed);
    assert_eq!(claim("H001", "r1", "D", 60_000).await, Claim::Busy);
    cache.end_claim("H001", "r1", "C", Some("S-1b")).await.unwrap();
    assert_eq!(claim("H001", "r1", "D", 60_000).await, Claim::Answered("S-1b".into()));

    // An owner that vanished: its claim runs out, and its late end leaves the new holder's alone.
    assert_eq!(claim("H001", "r3", "A", 1).await, Claim::Claimed);
    let mut taken = claim("H001", "r3", "B", 60_000).await;
    for _ in 0..1_000 {
        if taken != Claim::Busy {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        taken = claim("H001", "r3", "B", 60_000).await;
    }
    assert_eq!(taken, Claim::Claimed, "a claim of 1 ms runs out");
    cache.end_claim("H001", "r3", "A", None).await.unwrap();
    assert_eq!(claim("H001", "r3", "C", 60_000).await, Claim::Busy);

    // Braces in a request id (Redis hash tags) change nothing.
    assert_eq!(claim("H001", "}{x}", "A", 60_000).await, Claim::Claimed);
    assert_eq!(claim("H001", "}{x}", "B", 60_000).await, Claim::Busy);
    cache.end_claim("H001", "}{x}", "A", Some("S-2")).await.unwrap();
    assert_eq!(claim("H001", "}{x}", "B", 60_000).await, Claim::Answered("S-2".into()));

    // The gateway's guard: dropped unended (its request's future dropped), it is released in the
    // background; ended with an answer, the next attempt finds the answer.
    let gateway = &gw.app.gateway;
    let Ok(RequestClaim::Attempt(dropped)) = gateway.claim_request("H001", "r4").await else { panic!("claimed") };
    drop(dropped);
    let again = tokio::time::timeout(std::time::Duration::from_secs(600), gateway.claim_request("H001", "r4"))
        .await
        .expect("a dropped claim is released, long before it would run out");
    let Ok(RequestClaim::Attempt(ended)) = again else { panic!("claimed again") };
    ended.end(Some("S-4")).await;
    assert!(matches!(gateway.claim_request("H001", "r4").await, Ok(RequestClaim::Answered(id, _)) if id == "S-4"));
}

/// Payer contexts asked at once are read together (PostgreSQL: one statement for all that queued
/// while a batch was out; SQLite: a lane's trip): each caller gets its own payer's context, with
/// the no-PIN total of the day it asked for (none if it asked for none), and an unknown payer
/// gets none.
async fn payer_contexts_asked_at_once_each_answer_their_own_payer(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    for i in 0..10 {
        gw.employee(&format!("P{i}"), &format!("{}.00", i + 1)).await;
    }
    // P1, P3, P5, P7 and P9 may draw on an owner's account each.
    for i in 0..5 {
        gw.employee(&format!("OWNER{i}"), &format!("{}.50", 100 + i)).await;
        gw.family(&format!("OWNER{i}"), &format!("P{}", 2 * i + 1), pb::Relation::Spouse).await;
    }
    // P3 has a PIN and a no-PIN tier, and paid 2.50 of its 4.00 without the PIN today.
    gw.set_pin("P3", "135790").await;
    let tier = pb::SetNoPinTierRequest { psn_no: "P3".into(), pin: "135790".into(), tier: "T200".into() };
    gw.account().set_no_pin_tier(auth(tier, OPERATOR_KEY)).await.unwrap();
    let key = gw.hospital().await;
    gw.settle(&key, card_request("no-pin-1", "P3", "2.50", "")).await.unwrap();
    let ledger = gw.app.gateway.ledger.clone();
    let today = gw.app.gateway.clock.today();
    let yesterday = today.pred_opt().unwrap();
    // Every eleventh ask is for nobody; a third ask today's no-PIN total, a third yesterday's.
    let asks: Vec<(String, Option<chrono::NaiveDate>)> = (0..300)
        .map(|n| {
            let psn_no = if n % 11 == 10 { format!("NOBODY{n}") } else { format!("P{}", n % 11) };
            (psn_no, [Some(today), None, Some(yesterday)][n % 3])
        })
        .collect();
    let mut reads = tokio::task::JoinSet::new();
    for (n, (psn_no, day)) in asks.iter().cloned().enumerate() {
        let ledger = ledger.clone();
        reads.spawn(async move { (n, ledger.payer_context(&psn_no, day).await.unwrap()) });
    }
    let mut answered = 0;
    while let Some(read) = reads.join_next().await {
        let (n, context) = read.unwrap();
        let (psn_no, day) = &asks[n];
        answered += 1;
        let Some(context) = context else {
            assert!(psn_no.starts_with("NOBODY"), "{psn_no} is known");
            continue;
        };
        assert_eq!(&context.person.psn_no, psn_no);
        let i: usize = psn_no[1..].parse().unwrap();
        let own = context.person.account.as_ref().expect("an own account");
        let balance = if i == 3 { yuan("1.50") } else { yuan(&format!("{}.00", i + 1)) };
        assert_eq!(own.balance, balance, "{psn_no}'s own balance");
        let family: Vec<(String, Money)> =
            context.family.iter().map(|source| (source.owner_psn_no.clone(), source.account.balance)).collect();
        let expected =
            if i % 2 == 1 { vec![(format!("OWNER{}", i / 2), yuan(&format!("{}.50", 100 + i / 2)))] } else { vec![] };
        assert_eq!(family, expected, "{psn_no}'s family sources");
        assert_eq!(context.person.pin_set, i == 3, "{psn_no}'s PIN");
        let used = day.map(|day| if i == 3 && day == today { yuan("2.50") } else { Money::ZERO });
        assert_eq!(context.no_pin_used_today, used, "{psn_no}'s no-PIN total, asked: {day:?}");
    }
    assert_eq!(answered, asks.len());
}

/// PostgreSQL only (SQLite runs one writer at a time, so its fence never overlaps a write): a
/// fence that has to wait for a write of the same hold still in flight, past its `hold_fates`
/// row, reads the fate that write left once it commits. (The fencing statement's own snapshot
/// predates that row; answering "not committed" from it would let the sweeper release a hold the
/// ledger had debited.) The write in flight is an outside transaction that wrote the row and has
/// not committed; the fence is seen waiting on its lock before that transaction commits.
#[test]
fn a_fence_that_waited_for_the_write_in_flight_reads_that_it_committed() {
    run(async {
        let gw = TestGateway::start_with(Backend::Production).await;
        let url = gw.config.ledger_url.clone().expect("production has a ledger URL");
        let (writer, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        writer.batch_execute("BEGIN").await.unwrap();
        writer
            .execute("INSERT INTO hold_fates (hold_id, committed) VALUES ($1, TRUE)", &[&"S-in-flight"])
            .await
            .unwrap();

        let ledger = gw.app.gateway.ledger.clone();
        let fence = tokio::spawn(async move { ledger.resolve_hold("S-in-flight").await });
        let (watcher, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%hold_fates%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(!fence.is_finished(), "the fence ended without waiting for the write: {:?}", fence.await);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        writer.batch_execute("COMMIT").await.unwrap();
        assert!(fence.await.unwrap().unwrap(), "the write committed: the fence must say so");
        assert!(gw.app.gateway.ledger.resolve_hold("S-in-flight").await.unwrap(), "and keeps saying so");
    });
}
