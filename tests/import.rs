//! `yibao admin import`, the real binary, against a running gateway's ledger on both backend pairs:
//! rows judged one by one (a bad row reported by line, nothing of it applied), opening balances and
//! family links usable over gRPC at once, and a re-run that applies nothing twice.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};
use tonic::Code;
use yibao::rpc::pb;

const PEOPLE: &str = "\
psn_no,name,birth_date,region,category,status,opening_balance
IM0001,王芳,1961-04-02,110000,EMPLOYEE,ACTIVE,500.00
IM0002,李强,1990-07-15,110000,employee,,
IM0003,张伟,1950-01-20,110000,RETIREE,ACTIVE,12.30
IM0004,赵敏,1990-13-01,110000,EMPLOYEE,ACTIVE,1.00
IM0005,陈静,1985-03-03,110000,RESIDENT,ACTIVE,5.00
IM0001,王芳,1961-04-02,110000,EMPLOYEE,ACTIVE,600.00
IM0006,刘洋,1985-03-03,110000
IM0007,孙丽,1985-03-03,999999,EMPLOYEE,ACTIVE,1.00
IMEXIST1,name of IMEXIST1,1980-01-01,110000,EMPLOYEE,ACTIVE,
IMEXIST2,Renamed Two,1980-01-01,110000,EMPLOYEE,ACTIVE,
IM0008,周杰,1988-08-08,110000,EMPLOYEE,ACTIVE,1e3
IM0009,吴刚,1970-05-05,430000,FLEXIBLE,ACTIVE,
IM0010,郑爽,1972-06-06,430000,EMPLOYEE,ACTIVE,
";

const FAMILIES: &str = "\
owner_psn_no,member_psn_no,relation
IM0001,IM0002,SPOUSE
IM0003,IM0002,PARENT
IM0001,IMNOBODY,CHILD
IM0002,IM0001,SIBLING
IM0001,IM0001,SPOUSE
IM0010,IM0002,CHILD
IM0009,IM0002,CHILD
IMEXIST1,IM0002,cousin
";

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the CSV");
    path
}

/// Runs `yibao admin import` on the gateway's ledger.
fn import(gateway: &TestGateway, files: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_yibao"));
    command.args(["admin", "import", "--chunk-rows", "4"]);
    for (flag, path) in files {
        command.arg(flag).arg(path);
    }
    match &gateway.config.ledger_url {
        Some(url) => command.args(["--ledger-url", url]),
        None => command.arg("--data-dir").arg(gateway.data_dir()),
    };
    command.env_remove("YIBAO_CONFIG").env_remove("YIBAO_LEDGER_URL").env_remove("YIBAO_DATA_DIR");
    command.output().expect("the yibao binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn import_people_and_families(backend: Backend) {
    let gateway = TestGateway::start_with(backend).await;
    let hospital = gateway.hospital().await;
    // Two people the gateway already knows: one the file repeats exactly, one it names differently.
    gateway.employee("IMEXIST1", "10.00").await;
    gateway.employee("IMEXIST2", "0").await;
    let dir = tempfile::tempdir().unwrap();
    let people = write(dir.path(), "people.csv", PEOPLE);
    let families = write(dir.path(), "families.csv", FAMILIES);

    let first = import(&gateway, &[("--people", &people), ("--families", &families)]);
    let (stdout, stderr) = (text(&first.stdout), text(&first.stderr));
    assert_eq!(first.status.code(), Some(1), "rows were refused: exit 1\n{stdout}\n{stderr}");
    assert!(stdout.contains("people.csv: 5 imported, 1 already there, 7 refused (13 rows"), "{stdout}");
    assert!(stdout.contains("families.csv: 2 imported, 0 already there, 6 refused (8 rows"), "{stdout}");
    for expected in [
        "people.csv:5: birth_date: \"1990-13-01\" is not a date YYYY-MM-DD",
        "people.csv:6: opening_balance: RESIDENT has no personal account in region 110000",
        "people.csv:7: an opening balance of 500.00 was imported before; this row says 600.00",
        "people.csv:8: 4 field(s); the header has 7",
        "people.csv:9: region: 999999 has no policy file loaded",
        "people.csv:11: this person already exists with other details",
        "people.csv:12: opening_balance: \"1e3\"",
        "families.csv:4: unknown member_psn_no IMNOBODY",
        "families.csv:5: relation SIBLING is not allowed for family use in region 110000",
        "families.csv:6: member_psn_no: must differ from owner_psn_no",
        "families.csv:7: family members must be insured in the owner's region",
        "families.csv:8: the owner has no personal account to share",
        "families.csv:9: relation: \"cousin\" is not one of",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }

    // What was applied is there over gRPC at once; what was refused is not there at all.
    assert_eq!(gateway.balance_of("IM0001").await, "500.00");
    assert_eq!(gateway.balance_of("IM0002").await, "0.00");
    assert_eq!(gateway.balance_of("IM0003").await, "12.30");
    assert_eq!(gateway.balance_of("IMEXIST1").await, "10.00");
    for refused in ["IM0004", "IM0005", "IM0006", "IM0007", "IM0008"] {
        let status = gateway
            .account()
            .get_balance(auth(pb::GetBalanceRequest { psn_no: refused.into() }, OPERATOR_KEY))
            .await
            .unwrap_err();
        assert_refused::<()>(Err(status), Code::NotFound, "UNKNOWN_PERSON");
    }
    let hunan = gateway
        .account()
        .get_balance(auth(pb::GetBalanceRequest { psn_no: "IM0009".into() }, OPERATOR_KEY))
        .await
        .expect("IM0009 imported")
        .into_inner();
    assert_eq!(hunan.account_status, pb::AccountStatus::None as i32, "Hunan opens no account for FLEXIBLE");

    // The imported links work in file order: IM0002 (own account empty) draws IM0001 then IM0003.
    let paid = gateway.settle(&hospital, settle_request("imp-1", "IM0002", "600.00")).await.expect("settles");
    assert_eq!(
        (paid.acct_pay.as_str(), paid.acct_mulaid_pay.as_str(), paid.psn_cash_pay.as_str()),
        ("0.00", "512.30", "87.70")
    );
    assert_eq!(
        debits(&paid),
        vec![("IM0001".to_string(), "500.00".to_string(), true), ("IM0003".to_string(), "12.30".to_string(), true)]
    );
    let entries = gateway
        .account()
        .list_entries(auth(pb::ListEntriesRequest { psn_no: "IM0001".into(), ..Default::default() }, OPERATOR_KEY))
        .await
        .unwrap()
        .into_inner()
        .entries;
    let kinds: Vec<(i32, String)> = entries.iter().map(|e| (e.kind, e.amount.clone())).collect();
    assert_eq!(
        kinds,
        vec![
            (pb::EntryKind::FamilySettlement as i32, "-500.00".to_string()),
            (pb::EntryKind::OpeningBalance as i32, "500.00".to_string())
        ]
    );

    // A re-run applies nothing twice: the spent balances stay spent.
    let again = import(&gateway, &[("--people", &people), ("--families", &families)]);
    let stdout = text(&again.stdout);
    assert_eq!(again.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("people.csv: 0 imported, 6 already there, 7 refused"), "{stdout}");
    assert!(stdout.contains("families.csv: 0 imported, 2 already there, 6 refused"), "{stdout}");
    assert_eq!(gateway.balance_of("IM0001").await, "0.00");
    assert_eq!(gateway.balance_of("IM0003").await, "0.00");

    // The same person with another opening balance is refused on a later run, not merged.
    let changed = write(
        dir.path(),
        "changed.csv",
        "psn_no,name,birth_date,region,category,status,opening_balance\nIM0001,王芳,1961-04-02,110000,EMPLOYEE,ACTIVE,900.00\n",
    );
    let refused = import(&gateway, &[("--people", &changed)]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr)
            .contains("changed.csv:2: an opening balance of 500.00 was imported before; this row says 900.00"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(gateway.balance_of("IM0001").await, "0.00");
    gateway.assert_books_balance().await;
}

async fn import_refuses_a_wrong_header(backend: Backend) {
    let gateway = TestGateway::start_with(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let people = write(
        dir.path(),
        "people.csv",
        "psn_no,name,birth_date,region,category,status,balance\nIM1,A,1980-01-01,110000,EMPLOYEE,,1\n",
    );
    let output = import(&gateway, &[("--people", &people)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("unknown column \"balance\""), "{}", text(&output.stderr));
    let status = gateway
        .account()
        .get_balance(auth(pb::GetBalanceRequest { psn_no: "IM1".into() }, OPERATOR_KEY))
        .await
        .unwrap_err();
    assert_refused::<()>(Err(status), Code::NotFound, "UNKNOWN_PERSON");
}

/// Excel writes CRLF; blank lines happen. Line numbers must still be the editor's. A repeat of a
/// refused row is refused too, and a link revoked since is not brought back by a re-run.
async fn import_crlf_repeats_and_revoked_links(backend: Backend) {
    let gateway = TestGateway::start_with(backend).await;
    gateway.employee("IMC9", "0").await;
    let dir = tempfile::tempdir().unwrap();
    let people = write(
        dir.path(),
        "people.csv",
        "psn_no,name,birth_date,region,category,status,opening_balance\r\n\
         IMC1,甲,1980-01-01,110000,EMPLOYEE,ACTIVE,1.00\r\n\
         \r\n\
         IMC2,乙,1980-1-1,110000,EMPLOYEE,ACTIVE,\r\n\
         IMC9,Other Name,1980-01-01,110000,EMPLOYEE,ACTIVE,\r\n\
         IMC9,Other Name,1980-01-01,110000,EMPLOYEE,ACTIVE,\r\n",
    );
    let output = import(&gateway, &[("--people", &people)]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(stdout.contains("people.csv: 1 imported, 0 already there, 3 refused (4 rows"), "{stdout}\n{stderr}");
    assert!(stderr.contains("people.csv:4: birth_date: \"1980-1-1\" is not a date YYYY-MM-DD"), "{stderr}");
    assert!(stderr.contains("people.csv:5: this person already exists with other details"), "{stderr}");
    assert!(stderr.contains("people.csv:6: same as line 5, refused: this person already exists"), "{stderr}");
    assert_eq!(gateway.balance_of("IMC1").await, "1.00");

    let families = write(dir.path(), "families.csv", "owner_psn_no,member_psn_no,relation\r\nIMC1,IMC9,SPOUSE\r\n");
    let first = import(&gateway, &[("--families", &families)]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    assert!(text(&first.stdout).contains("families.csv: 1 imported, 0 already there, 0 refused"));
    let revoke = pb::RevokeFamilyMemberRequest { owner_psn_no: "IMC1".into(), member_psn_no: "IMC9".into() };
    gateway.account().revoke_family_member(auth(revoke, OPERATOR_KEY)).await.expect("revoked");
    let again = import(&gateway, &[("--families", &families)]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("families.csv:2: this link was registered before and revoked since"),
        "{}",
        text(&again.stderr)
    );
    let family = gateway
        .account()
        .list_family(auth(pb::ListFamilyRequest { psn_no: "IMC9".into() }, OPERATOR_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(!family.usable_accounts.iter().any(|usable| usable.owner_psn_no == "IMC1"), "{family:?}");
}

on_both_backends!(import_people_and_families, import_refuses_a_wrong_header, import_crlf_repeats_and_revoked_links);
