//! The gateway as a service: health, reflection, the ledger's own guarantees, and the `yibao`
//! binary run as a newcomer runs it.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn health_reports_serving() {
    run(async {
        let gw = TestGateway::start().await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(gw.channel.clone());
        // The probe runs every second; the first pass happens at start.
        let mut status = 0;
        for _ in 0..50 {
            let request = tonic_health::pb::HealthCheckRequest { service: "yibao.v1.SettlementService".into() };
            if let Ok(answer) = health.check(request).await {
                status = answer.into_inner().status;
                if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    });
}

#[test]
fn reflection_lists_the_services_in_v1_and_v1alpha() {
    run(async {
        let gw = TestGateway::start().await;
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
            server_reflection_response::MessageResponse, ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new(gw.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
        let answer = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else { panic!("{answer:?}") };
        let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).filter(|n| n.starts_with("yibao")).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "yibao.v1.AccountService",
                "yibao.v1.AdminService",
                "yibao.v1.ReconciliationService",
                "yibao.v1.SettlementService"
            ]
        );

        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient as AlphaClient,
            server_reflection_request::MessageRequest as AlphaRequest,
            server_reflection_response::MessageResponse as AlphaResponse, ServerReflectionRequest as AlphaMessage,
        };
        let mut alpha = AlphaClient::new(gw.channel.clone());
        let request = AlphaMessage {
            host: String::new(),
            message_request: Some(AlphaRequest::FileContainingSymbol("yibao.v1.SettlementService".into())),
        };
        let mut stream = alpha.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
        let answer = stream.message().await.unwrap().unwrap();
        assert!(
            matches!(answer.message_response, Some(AlphaResponse::FileDescriptorResponse(ref files)) if !files.file_descriptor_proto.is_empty())
        );
    });
}

/// The ledger enforces its invariants itself, whatever the code above it does.
#[test]
fn the_ledger_refuses_negative_balances_edits_and_unbalanced_transactions() {
    run(async {
        let gw = TestGateway::start().await;
        let key = gw.hospital().await;
        gw.employee("P1", "10.00").await;
        gw.settle(&key, settle_request("r", "P1", "4.00")).await.unwrap();
        let db = rusqlite::Connection::open(gw_db_path(&gw)).unwrap();
        let negative = db.execute("UPDATE accounts SET balance_fen = -1 WHERE psn_no = 'P1'", []);
        assert!(negative.unwrap_err().to_string().contains("CHECK"));
        let edit = db.execute("UPDATE postings SET amount_fen = 0", []);
        assert!(edit.unwrap_err().to_string().contains("append-only"));
        let delete = db.execute("DELETE FROM txns", []);
        assert!(delete.unwrap_err().to_string().contains("append-only"));
        db.execute(
            "INSERT INTO txns (kind, ref, at, business_date, value_date) VALUES ('ADJUSTMENT', 'x', 't', 'd', 'd')",
            [],
        )
        .unwrap();
        let txn = db.last_insert_rowid();
        db.execute(
            "INSERT INTO postings (txn_id, account_id, amount_fen, balance_after_fen, seq, business_date) VALUES (?1, 1, 5, 5, 1, 'd')",
            [txn],
        )
        .unwrap();
        let unbalanced = db.execute("INSERT INTO txn_closed (txn_id) VALUES (?1)", [txn]);
        assert!(unbalanced.unwrap_err().to_string().contains("unbalanced"));
        let duplicate = db.execute(
            "INSERT INTO settlements (setl_id, institution_code, request_id, fingerprint, psn_no, status, amount_fen, acct_pay_fen,
                 mulaid_fen, cash_fen, balc_fen, business_date, settled_at) VALUES ('S-x', 'H001', 'r', '', 'P1', 'SETTLED', 0, 0, 0, 0, 0, 'd', 't')",
            [],
        );
        assert!(duplicate.unwrap_err().to_string().contains("UNIQUE"), "idempotency keys are unique in the ledger");
    });
}

fn gw_db_path(gw: &TestGateway) -> std::path::PathBuf {
    gw.data_dir().join("ledger.db")
}

/// `yibao serve --demo` prints a client command that works as printed, and SIGTERM stops it
/// cleanly with exit status 0.
#[test]
fn the_demo_prints_a_command_that_works_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_yibao");
    let mut server = Command::new(exe)
        .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("YIBAO_OPERATOR_KEY")
        .env("YIBAO_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let mut commands = Vec::new();
    while commands.len() < 2 {
        let line = lines.next().expect("demo output").unwrap();
        if line.trim_start().starts_with(exe) {
            commands.push(line.trim().to_string());
        }
    }
    let settle = Command::new("sh").arg("-c").arg(&commands[0]).output().unwrap();
    let printed = String::from_utf8_lossy(&settle.stdout);
    assert!(settle.status.success(), "{printed} {}", String::from_utf8_lossy(&settle.stderr));
    assert!(printed.contains("SETTLED"), "{printed}");
    assert!(printed.contains("acct_pay            120.00"), "{printed}");
    assert!(printed.contains("acct_mulaid_pay      80.00"), "{printed}");
    let balance = Command::new("sh").arg("-c").arg(&commands[1]).output().unwrap();
    assert!(String::from_utf8_lossy(&balance.stdout).contains("D1001  balance 0.00  available 0.00"));

    let terminated = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(terminated.success());
    let status = server.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The PostgreSQL ledger enforces the same invariants itself.
#[test]
fn the_postgres_ledger_refuses_negative_balances_edits_and_duplicate_keys() {
    run(async {
        let gw = TestGateway::start_with(Backend::Production).await;
        let key = gw.hospital().await;
        gw.employee("P1", "10.00").await;
        gw.settle(&key, settle_request("r", "P1", "4.00")).await.unwrap();
        let url = gw.config.ledger_url.clone().unwrap();
        let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let error = |result: Result<u64, tokio_postgres::Error>| {
            result.unwrap_err().as_db_error().unwrap().message().to_string()
        };
        let negative = db.execute("UPDATE accounts SET balance = -0.01 WHERE psn_no = 'P1'", &[]).await;
        assert!(negative.unwrap_err().as_db_error().unwrap().constraint() == Some("personal_balance_not_negative"));
        assert!(error(db.execute("UPDATE postings SET amount = 0", &[]).await).contains("append-only"));
        assert!(error(db.execute("DELETE FROM txns", &[]).await).contains("append-only"));
        let duplicate = db
            .execute(
                "INSERT INTO settlements (setl_id, institution_code, request_id, fingerprint, psn_no, status, amount, acct_pay,
                     mulaid, cash, balc, business_date, settled_at) VALUES ('S-x', 'H001', 'r', '', 'P1', 'SETTLED', 0, 0, 0, 0, 0,
                     current_date, now())",
                &[],
            )
            .await;
        assert_eq!(duplicate.unwrap_err().as_db_error().unwrap().constraint(), Some("settlements_idempotency"));
        let over_refund = db.execute("UPDATE settlements SET refunded = 4.01 WHERE request_id = 'r'", &[]).await;
        assert_eq!(over_refund.unwrap_err().as_db_error().unwrap().constraint(), Some("refunds_within_paid"));
        let amount_type: String = db
            .query_one("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'accounts'::regclass AND attname = 'balance'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(amount_type, "numeric(18,2)");
    });
}

/// `yibao bench run --audit` against a real gateway: a short open-loop run, half its traffic on the
/// hottest 1% of accounts and a fifth by family payers, balances to the fen (checked here against
/// the balances read independently), and the check fails when an account moves by anything the
/// run did not pay, and finds a payment answered with an error by looking it up.
async fn a_bench_run_audits_the_books_of_its_hot_accounts(backend: Backend) {
    use yibao::domain::Money;
    use yibao::loadgen::{self, audit, LoadOptions};
    let gw = TestGateway::start_with(backend).await;
    let population = loadgen::setup(gw.channel.clone(), OPERATOR_KEY, "AU", 200, "audit1", false).await.unwrap();
    let hot = population.hot_payers();
    assert_eq!(hot, &population.payers[..2], "the hottest 1% of 200 funded accounts");
    let options = LoadOptions {
        server: gw.server.clone(),
        rate: 100.0,
        duration: std::time::Duration::from_secs(2),
        connections: 2,
        hot_share: 0.5,
        pin_share: 0.0,
        family_share: 0.2,
        amount: "1.23".into(),
        run_id: "audit1".into(),
        in_flight_max: 1000,
        audit: true,
    };
    let report = loadgen::run("audit", &options, &population).await.unwrap();
    assert_eq!((report.ok, report.errors.len()), (200, 0), "{}", report.summary_line());
    let audit = report.audit.expect("audited");
    assert!(audit.passed(), "{}", audit.summary());
    assert_eq!((audit.accounts, audit.mismatched, audit.negative, audit.holds_open), (2, 0, 0, 0));
    let mut fell = Money::ZERO;
    for psn_no in hot {
        let balance = Money::parse(&gw.balance_of(psn_no).await).unwrap();
        fell = fell.checked_add(Money::parse("100000.00").unwrap().checked_sub(balance).unwrap()).unwrap();
    }
    assert_eq!(audit.drawn, fell.to_string(), "the audit's total is what the hot accounts fell by");
    // Every payer here pays 1.23 from one funded account (its own, or its first family source).
    assert!(audit.settlements > 0);
    assert_eq!(audit.drawn, Money::from_fen(123 * audit.settlements as i64).to_string());

    // An operator's credit of 0.01 to the second hot account is not the run's: it mismatches. A
    // payment on the first, answered with an error as far as the run knows, is found by its request
    // id; a request the gateway never saw is found to have paid nothing.
    let key = &population.institution_key;
    let books = audit::Books::open(&gw.channel, key, &population).await.unwrap();
    gw.credit(&hot[1], "0.01").await;
    let paid = gw.settle(key, settle_request("audit1-late", &hot[0], "2.50")).await.expect("settles");
    let mut drawn = audit::Drawn::default();
    books.record(&mut drawn, &hot[0], "audit1-late", None);
    books.record(&mut drawn, &hot[0], "audit1-never-sent", None);
    let audit = books.close(&gw.channel, key, drawn).await.unwrap();
    assert!(!audit.passed());
    assert_eq!((audit.mismatched, audit.settled_despite_error, audit.unresolved), (1, 1, 0));
    assert_eq!((audit.settlements, audit.drawn.as_str()), (1, "2.50"));
    let after = Money::parse(&gw.balance_of(&hot[1]).await).unwrap();
    let was = after.checked_sub(Money::parse("0.01").unwrap()).unwrap();
    assert_eq!(audit.examples, vec![format!("{}: before {was}, drawn 0.00, after {after}", hot[1])]);
    assert_eq!(gw.balance_of(&hot[0]).await, paid.balc);
}

on_both_backends!(a_bench_run_audits_the_books_of_its_hot_accounts);
