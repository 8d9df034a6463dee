//! Faults, bounded in time: clients cancelling mid-flight, the gateway killed with SIGKILL, Redis
//! flushed and stopped, PostgreSQL stopped. After each: no balance below zero, every acknowledged
//! settlement in the ledger exactly once, nothing half applied, no hold left open, the cache equal
//! to the ledger, and money conserved (personal balances = credits − debits of settlements the
//! ledger holds).

mod common;

use common::servers;
use common::*;
use std::collections::HashMap;
use std::time::Duration;
use tonic::Code;
use yibao::domain::Money;
use yibao::rpc::pb;

on_both_backends!(cancelled_calls_complete_or_compensate);

const OPENING: &str = "1000.00";

fn yuan(text: &str) -> Money {
    Money::parse(text).unwrap()
}

async fn people(gw: &TestGateway, count: usize) -> Vec<String> {
    let mut psn_nos = Vec::new();
    for i in 0..count {
        let psn_no = format!("F{i:03}");
        gw.employee(&psn_no, OPENING).await;
        psn_nos.push(psn_no);
    }
    // Every second person may also draw on the next one's account, so payments span two accounts.
    for i in (0..count - 1).step_by(2) {
        gw.family(&psn_nos[i + 1], &psn_nos[i], pb::Relation::Spouse).await;
    }
    psn_nos
}

/// What the ledger holds for these request ids, and checks each is applied whole.
async fn settled_in_ledger(gw: &TestGateway, key: &str, request_ids: &[String]) -> HashMap<String, pb::Settlement> {
    let mut found = HashMap::new();
    for request_id in request_ids {
        let get =
            pb::GetSettlementRequest { key: Some(pb::get_settlement_request::Key::RequestId(request_id.clone())) };
        match gw.settlement().get_settlement(auth(get, key)).await {
            Ok(answer) => {
                let s = answer.into_inner();
                let drawn: Money = Money::sum(s.debits.iter().map(|d| yuan(&d.amount)));
                assert_eq!(
                    drawn,
                    yuan(&s.acct_pay).checked_add(yuan(&s.acct_mulaid_pay)).unwrap(),
                    "{request_id} applied whole"
                );
                found.insert(request_id.clone(), s);
            }
            Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        }
    }
    found
}

/// Personal balances sum to the credits less what the ledger's settlements drew.
async fn assert_money_conserved(gw: &TestGateway, people: usize, settled: &HashMap<String, pb::Settlement>) {
    let drawn = Money::sum(settled.values().map(|s| yuan(&s.acct_pay).checked_add(yuan(&s.acct_mulaid_pay)).unwrap()));
    let credited = Money::from_fen(yuan(OPENING).to_fen() * people as i64);
    let trial = gw.app.gateway.ledger.trial_balance().await.unwrap();
    assert_eq!(trial.personal, credited.checked_sub(drawn).unwrap(), "personal balances = credits − debits");
    assert!(!trial.personal.is_negative());
    gw.assert_books_balance().await;
}

/// Hundreds of calls cancelled mid-flight (deadlines of a few ms, and client tasks aborted): each
/// payment completes or compensates; afterwards no hold is open and the cache equals the ledger.
async fn cancelled_calls_complete_or_compensate(backend: Backend) {
    let gw = TestGateway::start_with(backend).await;
    let key = gw.hospital().await;
    let psn_nos = people(&gw, 10).await;
    let mut tasks = Vec::new();
    let mut request_ids = Vec::new();
    for i in 0..300 {
        let request_id = format!("cancel-{i}");
        request_ids.push(request_id.clone());
        let mut request = auth(settle_request(&request_id, &psn_nos[i % psn_nos.len()], "7.31"), &key);
        if i % 2 == 0 {
            request.set_timeout(Duration::from_millis(1 + (i % 5) as u64));
        }
        let client = gw.settlement();
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            client.settle(request).await
        }));
    }
    // Abort every third client task after a moment: its HTTP/2 stream is reset mid-flight.
    tokio::time::sleep(Duration::from_millis(3)).await;
    for (i, task) in tasks.iter().enumerate() {
        if i % 3 == 0 {
            task.abort();
        }
    }
    let mut acknowledged = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if let Ok(Ok(answer)) = task.await {
            assert_eq!(answer.get_ref().request_id, request_ids[i]);
            acknowledged.push(request_ids[i].clone());
        }
    }
    gw.assert_quiet_cache_equals_ledger(&psn_nos).await;
    let settled = settled_in_ledger(&gw, &key, &request_ids).await;
    for request_id in &acknowledged {
        assert!(settled.contains_key(request_id), "acknowledged {request_id} is in the ledger");
    }
    assert_money_conserved(&gw, psn_nos.len(), &settled).await;
}

/// Settles `count` payments concurrently, returning the request ids acknowledged.
async fn load(
    gw: &TestGateway,
    key: &str,
    psn_nos: &[String],
    prefix: &str,
    count: usize,
    amount: &str,
) -> Vec<(String, Result<pb::Settlement, tonic::Status>)> {
    let mut tasks = Vec::new();
    for i in 0..count {
        let request_id = format!("{prefix}-{i}");
        let request = pb::SettleRequest {
            mode: pb::PayMode::FullOnly as i32,
            ..settle_request(&request_id, &psn_nos[i % psn_nos.len()], amount)
        };
        let (client, key) = (gw.settlement(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            (request_id, client.settle(auth(request, &key)).await.map(|r| r.into_inner()))
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// Redis FLUSHALL in the middle of the load, then Redis stopped and started again: no balance
/// below zero, nothing paid twice, balances reload, health follows Redis.
#[test]
fn redis_flushed_and_restarted_under_load() {
    run(async {
        let redis = servers::start_redis();
        let gw = TestGateway::start_adjusted(Backend::Production, |config| {
            config.redis_url = Some(redis.url.clone());
        })
        .await;
        let key = gw.hospital().await;
        let psn_nos = people(&gw, 6).await;
        let flusher = {
            let url = redis.url.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
            })
        };
        // 6 people × 1000.00, payments of 90.00 full-only: at most 11 each from own account plus
        // family draws; 400 payments ask for far more than exists.
        let results = load(&gw, &key, &psn_nos, "flush", 400, "90.00").await;
        flusher.await.unwrap();
        let mut ids = Vec::new();
        for (request_id, result) in &results {
            ids.push(request_id.clone());
            if let Err(status) = result {
                assert!(
                    matches!(reason(status).as_str(), "INSUFFICIENT_BALANCE" | "BACKEND_UNAVAILABLE"),
                    "{status:?}"
                );
            }
        }
        gw.assert_quiet_cache_equals_ledger(&psn_nos).await;
        let settled = settled_in_ledger(&gw, &key, &ids).await;
        for (request_id, result) in &results {
            if let Ok(answer) = result {
                assert_eq!(settled[request_id].setl_id, answer.setl_id, "acknowledged once, as answered");
            }
        }
        assert_money_conserved(&gw, psn_nos.len(), &settled).await;

        // Redis stops: health turns NOT_SERVING and payments fail closed; it comes back by itself.
        let mut admin = redis::Client::open(redis.url.as_str()).unwrap().get_connection().unwrap();
        let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").arg("NOSAVE").query(&mut admin);
        wait_health(&gw, tonic_health::pb::health_check_response::ServingStatus::NotServing).await;
        let refused = gw.settle(&key, settle_request("while-down", &psn_nos[0], "1.00")).await;
        assert_refused(refused, Code::Unavailable, "BACKEND_UNAVAILABLE");
        let _again = servers::start_redis_on(redis.port);
        wait_health(&gw, tonic_health::pb::health_check_response::ServingStatus::Serving).await;
        gw.credit(&psn_nos[0], "5.00").await;
        let paid = gw.settle(&key, settle_request("after-restart", &psn_nos[0], "1.00")).await.unwrap();
        assert_eq!(paid.acct_pay, "1.00", "balances reloaded from the ledger after the restart");
    });
}

/// PostgreSQL stopped during load: callers get UNAVAILABLE / BACKEND_UNAVAILABLE, health turns
/// NOT_SERVING, nothing acknowledged is lost, and service resumes by itself.
#[test]
fn postgres_stopped_under_load() {
    run(async {
        let postgres = servers::start_postgres();
        let url = postgres.admin_url.clone();
        let gw = TestGateway::start_adjusted(Backend::Production, |config| {
            config.ledger_url = Some(url);
            config.settings.hold_lease_ms = 3_000;
            config.settings.commit_timeout_ms = 1_500;
        })
        .await;
        let key = gw.hospital().await;
        let psn_nos = people(&gw, 6).await;
        let stopper = tokio::task::spawn_blocking({
            let postgres_stop = postgres.clone();
            move || {
                std::thread::sleep(Duration::from_millis(40));
                postgres_stop.stop();
            }
        });
        let results = load(&gw, &key, &psn_nos, "pgdown", 300, "3.00").await;
        stopper.await.unwrap();
        for (_, result) in &results {
            if let Err(status) = result {
                assert_eq!(
                    (status.code(), reason(status).as_str()),
                    (Code::Unavailable, "BACKEND_UNAVAILABLE"),
                    "{status:?}"
                );
            }
        }
        wait_health(&gw, tonic_health::pb::health_check_response::ServingStatus::NotServing).await;
        assert_refused(
            gw.settle(&key, settle_request("down", &psn_nos[0], "1.00")).await,
            Code::Unavailable,
            "BACKEND_UNAVAILABLE",
        );

        postgres.restart();
        wait_health(&gw, tonic_health::pb::health_check_response::ServingStatus::Serving).await;
        let ids: Vec<String> = results.iter().map(|(id, _)| id.clone()).collect();
        let settled = settled_in_ledger(&gw, &key, &ids).await;
        for (request_id, result) in &results {
            if let Ok(answer) = result {
                assert_eq!(settled[request_id].setl_id, answer.setl_id, "acknowledged {request_id} survived");
            }
        }
        gw.assert_quiet_cache_equals_ledger(&psn_nos).await;
        assert_money_conserved(&gw, psn_nos.len(), &settled).await;
        let paid = gw.settle(&key, settle_request("after", &psn_nos[0], "1.00")).await.unwrap();
        assert_eq!(paid.acct_pay, "1.00");
    });
}

async fn wait_health(gw: &TestGateway, wanted: tonic_health::pb::health_check_response::ServingStatus) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(gw.channel.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1);
        if status == wanted as i32 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "health never became {wanted:?} (is {status})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gateway process killed with SIGKILL while hundreds of settlements are in flight, then a new
/// gateway on the same PostgreSQL and Redis: every acknowledged settlement is in the ledger exactly
/// once, every other one is whole or absent, no hold stays open, the cache equals the ledger.
#[test]
fn gateway_killed_with_sigkill_under_load() {
    run(async {
        let short_lease = |config: &mut yibao::config::Config| {
            config.settings.hold_lease_ms = 3_000;
            config.settings.commit_timeout_ms = 1_500;
        };
        let mut setup = TestGateway::start_adjusted(Backend::Production, short_lease).await;
        let key = setup.hospital().await;
        let psn_nos = people(&setup, 8).await;
        let config = setup.config.clone();
        setup.stop().await;
        drop(setup);

        let dir = tempfile::tempdir().unwrap();
        let config_file = dir.path().join("yibao.toml");
        std::fs::write(
            &config_file,
            format!(
                "redis_prefix = \"{}\"\nhold_lease_ms = 3000\ncommit_timeout_ms = 1500\npin_cost = {{ memory_kib = 256, passes = 1 }}\n",
                config.redis_prefix
            ),
        )
        .unwrap();
        let port = servers::free_port();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_yibao"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir.path())
            .arg("--config")
            .arg(&config_file)
            .args([
                "--ledger-url",
                config.ledger_url.as_deref().unwrap(),
                "--redis-url",
                config.redis_url.as_deref().unwrap(),
            ])
            .env("YIBAO_OPERATOR_KEY", OPERATOR_KEY)
            .env("YIBAO_PIN_PEPPER", "test-pepper")
            .env("YIBAO_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let channel = loop {
            match tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await {
                Ok(channel) => break channel,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };

        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..400 {
            let request_id = format!("kill-{i}");
            let request = settle_request(&request_id, &psn_nos[i % psn_nos.len()], "4.37");
            let mut client = pb::settlement_service_client::SettlementServiceClient::new(channel.clone());
            let (key, acked) = (key.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                let result = client.settle(auth(request, &key)).await.map(|r| r.into_inner());
                if result.is_ok() {
                    acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                (request_id, result)
            }));
        }
        // Kill it mid-load: after the first acknowledgements, with hundreds still in flight.
        let waited = std::time::Instant::now();
        while acked.load(std::sync::atomic::Ordering::SeqCst) < 60 && waited.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let killed = std::process::Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        child.wait().unwrap();
        let mut acknowledged = Vec::new();
        let mut ids = Vec::new();
        for task in tasks {
            let (request_id, result) = task.await.unwrap();
            ids.push(request_id.clone());
            if let Ok(answer) = result {
                acknowledged.push((request_id, answer.setl_id));
            }
        }

        // A new gateway on the same ledger and Redis: its sweeper settles the dead one's holds.
        let gw = TestGateway::start_with_config(Backend::Production, config).await;
        gw.assert_quiet_cache_equals_ledger(&psn_nos).await;
        let settled = settled_in_ledger(&gw, &key, &ids).await;
        for (request_id, setl_id) in &acknowledged {
            assert_eq!(&settled[request_id].setl_id, setl_id, "acknowledged {request_id} is in the ledger as answered");
        }
        assert_money_conserved(&gw, psn_nos.len(), &settled).await;
        eprintln!(
            "SIGKILL test: {} acknowledged, {} in the ledger, of {}",
            acknowledged.len(),
            settled.len(),
            ids.len()
        );
    });
}

/// The daily no-PIN total and the wrong-PIN count live in the ledger, so a Redis flush forgets
/// neither.
#[test]
fn no_pin_total_and_wrong_pin_count_survive_a_redis_flush() {
    run(async {
        let redis = servers::start_redis();
        let gw =
            TestGateway::start_adjusted(Backend::Production, |config| config.redis_url = Some(redis.url.clone())).await;
        let key = gw.hospital().await;
        gw.employee("P1", "2000.00").await;
        gw.set_pin("P1", "284617").await;
        let tier = pb::SetNoPinTierRequest { psn_no: "P1".into(), pin: "284617".into(), tier: "T200".into() };
        gw.account().set_no_pin_tier(auth(tier, OPERATOR_KEY)).await.unwrap();
        for i in 0..3 {
            gw.settle(&key, card_request(&format!("np{i}"), "P1", "150.00", "")).await.unwrap();
        }
        for i in 0..4 {
            let wrong = gw.settle(&key, card_request(&format!("wrong{i}"), "P1", "1.00", "999111")).await;
            assert_refused(wrong, Code::PermissionDenied, "PIN_INCORRECT");
        }

        let client = redis::Client::open(redis.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();

        // 450.00 of 500.00 used today: 100.00 more needs the PIN, 50.00 does not.
        assert_refused(
            gw.settle(&key, card_request("np3", "P1", "100.00", "")).await,
            Code::FailedPrecondition,
            "PIN_REQUIRED",
        );
        gw.settle(&key, card_request("np4", "P1", "50.00", "")).await.unwrap();
        // Four wrong PINs before the flush: the fifth locks.
        let fifth = assert_refused(
            gw.settle(&key, card_request("wrong4", "P1", "1.00", "999111")).await,
            Code::PermissionDenied,
            "PIN_INCORRECT",
        );
        assert_eq!(fifth.metadata().get("attempts-left").unwrap(), "0");
        assert_refused(
            gw.settle(&key, card_request("right", "P1", "1.00", "284617")).await,
            Code::PermissionDenied,
            "PIN_LOCKED",
        );
        assert_eq!(gw.balance("P1").await, ("1500.00".into(), "1500.00".into()));
    });
}
