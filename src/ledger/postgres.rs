//! The production ledger on PostgreSQL (tokio-postgres + deadpool-postgres).
//!
//! A batch of money-moving writes is one call of the `yibao_commit` procedure (schema/postgres.sql):
//! one round trip and one durable commit (`synchronous_commit = on`) for the whole batch, each
//! write in its own subtransaction. Reads are prepared statements on pooled connections. Every
//! call has a deadline; a failure to reach the database is `LedgerUnavailable`.

use super::*;
use crate::domain::credit::{Period, Subject};
use crate::domain::family::Party;
use crate::domain::policy::InterestRate;
use crate::domain::{
    AccountStatus, AuthMethod, CardStatus, Category, Channel, InstitutionKind, InsuranceStatus, Money, PersonCategory,
    Relation, Role, SettlementStatus, TxnKind,
};
use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{NoTls, Row};

const SCHEMA: &str = include_str!("schema/postgres.sql");
/// Connections in the pool at most.
const POOL_SIZE_MAX: usize = 16;
/// Every database call must finish within this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct PostgresLedger {
    pool: Pool,
    /// Payer-context reads, to the task that reads them together (see `ContextReader`).
    contexts: tokio::sync::mpsc::UnboundedSender<ContextRead>,
}

/// A payer-context read waiting for its batch: the payer, the day whose no-PIN total is asked,
/// and where the answer goes (a caller that gave up has dropped the other end).
type ContextRead = (String, Option<NaiveDate>, tokio::sync::oneshot::Sender<LedgerResult<Option<PayerContext>>>);

/// Batches of payer-context reads out at once, each on a connection of its own.
const CONTEXT_BATCHES_OUT: usize = 2;
/// Payer contexts read by one statement at most.
const CONTEXT_BATCH_MAX: usize = 128;

fn unavailable(error: impl std::fmt::Display) -> LedgerUnavailable {
    LedgerUnavailable(error.to_string())
}

fn corrupt(what: &str) -> LedgerUnavailable {
    LedgerUnavailable(format!("unexpected ledger data: {what}"))
}

async fn deadline<T, E: std::fmt::Display>(work: impl Future<Output = Result<T, E>>) -> LedgerResult<T> {
    match tokio::time::timeout(CALL_TIMEOUT, work).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(LedgerUnavailable("the database did not answer in time".into())),
    }
}

impl PostgresLedger {
    /// Connects, and creates or migrates the schema (serialised across gateways by an advisory lock).
    pub async fn connect(url: &str) -> Result<PostgresLedger, LedgerUnavailable> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| unavailable(format!("ledger URL: {e}")))?;
        // Durability is not negotiable: a commit returns only once it is on disk.
        // Generic plans for our prepared statements: every one is a lookup by key or a procedure
        // call, and re-planning each execution (the default for some) cost a tenth of the CPU.
        // No JIT: it compiled a batch query's plan for 290 ms to run it for 10.
        config.options("-c synchronous_commit=on -c plan_cache_mode=force_generic_plan -c jit=off");
        config.connect_timeout(Duration::from_secs(5));
        config.application_name("yibao-gateway");
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE_MAX)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(unavailable)?;
        let (contexts, reads) = tokio::sync::mpsc::unbounded_channel();
        // The reader ends when the last clone of the ledger (and with it the sender) is dropped.
        tokio::spawn(ContextReader::new(pool.clone()).run(reads));
        let ledger = PostgresLedger { pool, contexts };
        ledger.migrate().await?;
        Ok(ledger)
    }

    async fn migrate(&self) -> LedgerResult<()> {
        let mut client = deadline(self.pool.get()).await?;
        let tx = deadline(client.transaction()).await?;
        deadline(tx.batch_execute(
            "SELECT pg_advisory_xact_lock(7305911);
             CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)",
        ))
        .await?;
        deadline(tx.batch_execute(SCHEMA)).await?;
        let now = Utc::now();
        for account in crate::domain::SystemAccount::ALL {
            deadline(tx.execute(
                "INSERT INTO accounts (system_code, status, opened_at) VALUES ($1, 'OPEN', $2) ON CONFLICT (system_code) DO NOTHING",
                &[&account.name(), &now],
            ))
            .await?;
        }
        deadline(tx.execute("INSERT INTO schema_migrations VALUES (1, now()) ON CONFLICT DO NOTHING", &[])).await?;
        deadline(tx.commit()).await?;
        Ok(())
    }

    async fn client(&self) -> LedgerResult<deadpool_postgres::Object> {
        deadline(self.pool.get()).await
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> LedgerResult<Option<Row>> {
        let client = self.client().await?;
        let statement = deadline(client.prepare_cached(sql)).await?;
        deadline(client.query_opt(&statement, params)).await
    }

    async fn query(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> LedgerResult<Vec<Row>> {
        let client = self.client().await?;
        let statement = deadline(client.prepare_cached(sql)).await?;
        deadline(client.query(&statement, params)).await
    }

    async fn execute(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> LedgerResult<u64> {
        let client = self.client().await?;
        let statement = deadline(client.prepare_cached(sql)).await?;
        deadline(client.execute(&statement, params)).await
    }
}

// ---- row and JSON conversions --------------------------------------------------------------

fn money(value: Decimal) -> LedgerResult<Money> {
    Money::from_ledger(value).ok_or_else(|| corrupt("amount with more than two decimals"))
}

fn parse<T>(text: &str, parse: fn(&str) -> Option<T>) -> LedgerResult<T> {
    parse(text).ok_or_else(|| corrupt(text))
}

fn opt_parse<T>(text: Option<String>, parser: fn(&str) -> Option<T>) -> LedgerResult<Option<T>> {
    text.map(|t| parse(&t, parser)).transpose()
}

const PERSON_SELECT: &str = "SELECT p.psn_no, p.name, p.birth_date, p.region, p.category, p.status, p.card_status,
        p.no_pin_tier, k.phc IS NOT NULL AS pin_set, k.locked_until, a.account_id, a.status AS account_status,
        a.balance, a.seq
     FROM persons p LEFT JOIN accounts a ON a.psn_no = p.psn_no LEFT JOIN pins k ON k.psn_no = p.psn_no
     WHERE p.psn_no = $1";

fn person_from_row(row: &Row) -> LedgerResult<PersonRecord> {
    let account_id: Option<i64> = row.get(10);
    let account = match account_id {
        Some(id) => Some(AccountRecord {
            id,
            status: parse(row.get(11), AccountStatus::parse)?,
            balance: money(row.get(12))?,
            seq: row.get(13),
        }),
        None => None,
    };
    Ok(PersonRecord {
        psn_no: row.get(0),
        name: row.get(1),
        birth_date: row.get(2),
        region: row.get(3),
        category: parse(row.get(4), PersonCategory::parse)?,
        status: parse(row.get(5), InsuranceStatus::parse)?,
        card_status: parse(row.get(6), CardStatus::parse)?,
        no_pin_tier: row.get(7),
        pin_set: row.get(8),
        pin_locked_until: row.get(9),
        account,
    })
}

fn j_str(value: &Value, key: &str) -> LedgerResult<String> {
    value.get(key).and_then(Value::as_str).map(str::to_string).ok_or_else(|| corrupt(key))
}

fn j_opt_str(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_string)
}

fn j_money(value: &Value, key: &str) -> LedgerResult<Money> {
    Money::from_ledger_text(&j_str(value, key)?).ok_or_else(|| corrupt(key))
}

fn j_i64(value: &Value, key: &str) -> LedgerResult<i64> {
    value.get(key).and_then(Value::as_i64).ok_or_else(|| corrupt(key))
}

fn j_bool(value: &Value, key: &str) -> LedgerResult<bool> {
    value.get(key).and_then(Value::as_bool).ok_or_else(|| corrupt(key))
}

fn j_time(value: &Value, key: &str) -> LedgerResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(j_i64(value, key)?).ok_or_else(|| corrupt(key))
}

fn j_items<'a>(value: &'a Value, key: &str) -> LedgerResult<&'a Vec<Value>> {
    value.get(key).and_then(Value::as_array).ok_or_else(|| corrupt(key))
}

fn settlement_from_json(value: &Value) -> LedgerResult<SettlementRecord> {
    let debits = j_items(value, "debits")?
        .iter()
        .map(|d| {
            Ok(DebitRecord {
                account_id: j_i64(d, "account_id")?,
                owner_psn_no: j_str(d, "owner_psn_no")?,
                amount: j_money(d, "amount")?,
                refunded: j_money(d, "refunded")?,
                family: j_bool(d, "family")?,
            })
        })
        .collect::<LedgerResult<Vec<_>>>()?;
    Ok(SettlementRecord {
        setl_id: j_str(value, "setl_id")?,
        institution_code: j_str(value, "institution_code")?,
        request_id: j_str(value, "request_id")?,
        fingerprint: j_str(value, "fingerprint")?,
        psn_no: j_str(value, "psn_no")?,
        status: parse(&j_str(value, "status")?, SettlementStatus::parse)?,
        amount: j_money(value, "amount")?,
        acct_pay: j_money(value, "acct_pay")?,
        acct_mulaid_pay: j_money(value, "mulaid")?,
        psn_cash_pay: j_money(value, "cash")?,
        balc: j_money(value, "balc")?,
        refunded: j_money(value, "refunded")?,
        channel: opt_parse(j_opt_str(value, "channel"), Channel::parse)?,
        category: opt_parse(j_opt_str(value, "category"), Category::parse)?,
        auth_method: opt_parse(j_opt_str(value, "auth_method"), AuthMethod::parse)?,
        mdtrt_id: j_str(value, "mdtrt_id")?,
        beneficiary_psn_no: j_str(value, "beneficiary_psn_no")?,
        settled_at: j_time(value, "settled_at_us")?,
        debits,
        tombstone: j_bool(value, "tombstone")?,
    })
}

fn refund_from_json(value: &Value) -> LedgerResult<RefundRecord> {
    let credits = j_items(value, "credits")?
        .iter()
        .map(|c| {
            Ok(DebitLine {
                account_id: j_i64(c, "account_id")?,
                owner_psn_no: j_str(c, "owner_psn_no")?,
                amount: j_money(c, "amount")?,
                family: j_bool(c, "family")?,
            })
        })
        .collect::<LedgerResult<Vec<_>>>()?;
    Ok(RefundRecord {
        refund_id: j_str(value, "refund_id")?,
        institution_code: j_str(value, "institution_code")?,
        request_id: j_str(value, "request_id")?,
        fingerprint: j_str(value, "fingerprint")?,
        setl_id: j_str(value, "setl_id")?,
        amount: j_money(value, "amount")?,
        credits,
        settlement_status: parse(&j_str(value, "status_after")?, SettlementStatus::parse)?,
        refunded_total: j_money(value, "refunded_total")?,
        refundable: j_money(value, "refundable_after")?,
        at: j_time(value, "at_us")?,
    })
}

fn adjustment_from_json(value: &Value) -> LedgerResult<AdjustmentRecord> {
    Ok(AdjustmentRecord {
        request_id: j_str(value, "request_id")?,
        fingerprint: j_str(value, "fingerprint")?,
        psn_no: j_str(value, "psn_no")?,
        entry_id: j_i64(value, "entry_id")?,
        delta: j_money(value, "delta")?,
        balance_after: j_money(value, "balance_after")?,
        at: j_time(value, "at_us")?,
    })
}

fn lifecycle_from_json(value: &Value) -> LedgerResult<LifecycleRecord> {
    Ok(LifecycleRecord {
        request_id: j_str(value, "request_id")?,
        fingerprint: j_str(value, "fingerprint")?,
        kind: parse(&j_str(value, "kind")?, LifecycleKind::parse)?,
        psn_no: j_str(value, "psn_no")?,
        amount: j_money(value, "amount")?,
        interest: j_money(value, "interest")?,
        account_status: parse(&j_str(value, "status_after")?, AccountStatus::parse)?,
        at: j_time(value, "at_us")?,
    })
}

fn changes_from_json(value: &Value) -> LedgerResult<Vec<BalanceChange>> {
    j_items(value, "changes")?
        .iter()
        .map(|c| {
            Ok(BalanceChange {
                account_id: j_i64(c, "account_id")?,
                balance_after: j_money(c, "balance_after")?,
                seq: j_i64(c, "seq")?,
            })
        })
        .collect()
}

fn outcome_from_json(write: &LedgerWrite, value: &Value) -> LedgerResult<WriteResult> {
    if let (LedgerWrite::Settle(new), Some("settled")) = (write, value.get("outcome").and_then(Value::as_str)) {
        let record = new.settled_record(j_money(value, "balc")?);
        return Ok(Ok(WriteOutcome::Settled { record, changes: changes_from_json(value)? }));
    }
    outcome_from_answer(value)
}

fn outcome_from_answer(value: &Value) -> LedgerResult<WriteResult> {
    if let Some(decline) = value.get("decline").and_then(Value::as_str) {
        let account_id = value.get("account_id").and_then(Value::as_i64).unwrap_or(0);
        return Ok(Err(match decline {
            "ORIGINAL_REVERSED" => WriteDecline::OriginalReversed,
            "NOT_FOUND" => WriteDecline::NotFound,
            "REFUND_EXCEEDS_PAID" => WriteDecline::RefundExceedsPaid { refundable: j_money(value, "refundable")? },
            "INSUFFICIENT_BALANCE" => WriteDecline::InsufficientBalance { account_id },
            "ACCOUNT_NOT_OPEN" => WriteDecline::AccountNotOpen {
                account_id,
                status: j_opt_str(value, "status")
                    .and_then(|s| AccountStatus::parse(&s))
                    .unwrap_or(AccountStatus::Closed),
            },
            "NO_PIN_DAILY_EXCEEDED" => WriteDecline::NoPinDailyExceeded { used: j_money(value, "used")? },
            "REQUEST_ID_REUSED" => WriteDecline::RequestIdReused,
            "NO_ACCOUNT" => WriteDecline::NoAccount,
            "STALE" => WriteDecline::Stale,
            // A deadlock or a race with another gateway: nothing applied; the caller may retry.
            "HOLD_EXPIRED" | "RETRY" => WriteDecline::HoldExpired,
            other => return Err(corrupt(other)),
        }));
    }
    let record = value.get("record").ok_or_else(|| corrupt("record"))?;
    Ok(Ok(match value.get("outcome").and_then(Value::as_str) {
        Some("settled") => {
            WriteOutcome::Settled { record: settlement_from_json(record)?, changes: changes_from_json(value)? }
        }
        Some("settlement_exists") => WriteOutcome::SettlementExists(settlement_from_json(record)?),
        Some("refunded") => {
            WriteOutcome::Refunded { record: refund_from_json(record)?, changes: changes_from_json(value)? }
        }
        Some("refund_exists") => WriteOutcome::RefundExists(refund_from_json(record)?),
        Some("reversed") => {
            WriteOutcome::Reversed { record: settlement_from_json(record)?, changes: changes_from_json(value)? }
        }
        Some("adjusted") => {
            WriteOutcome::Adjusted { record: adjustment_from_json(record)?, changes: changes_from_json(value)? }
        }
        Some("adjustment_exists") => WriteOutcome::AdjustmentExists(adjustment_from_json(record)?),
        Some("lifecycle") => {
            WriteOutcome::Lifecycle { record: lifecycle_from_json(record)?, changes: changes_from_json(value)? }
        }
        Some("lifecycle_exists") => WriteOutcome::LifecycleExists(lifecycle_from_json(record)?),
        _ => return Err(corrupt("outcome")),
    }))
}

fn write_to_json(write: &LedgerWrite) -> Value {
    let day = |d: NaiveDate| d.format("%Y-%m-%d").to_string();
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    match write {
        LedgerWrite::Settle(s) => json!({
            "kind": "settle", "setl_id": s.setl_id, "institution_code": s.institution_code, "request_id": s.request_id,
            "fingerprint": s.fingerprint, "psn_no": s.psn_no, "amount": s.amount.to_string(), "channel": s.channel.name(),
            "category": s.category.name(), "auth_method": s.auth_method.name(), "mdtrt_id": s.mdtrt_id,
            "beneficiary_psn_no": s.beneficiary_psn_no,
            "debits": s.debits.iter().map(|d| json!({
                "account_id": d.account_id, "owner_psn_no": d.owner_psn_no, "amount": d.amount.to_string(), "family": d.family,
            })).collect::<Vec<_>>(),
            "own_account": s.own_account, "no_pin_daily_max": s.no_pin_daily_max.map(|m| m.to_string()),
            "hold_deadline_ms": s.hold_deadline_ms, "business_date": day(s.business_date), "at": at(s.at),
        }),
        LedgerWrite::Refund(r) => json!({
            "kind": "refund", "refund_id": r.refund_id, "institution_code": r.institution_code, "request_id": r.request_id,
            "fingerprint": r.fingerprint, "setl_id": r.setl_id, "amount": r.amount.map(|m| m.to_string()),
            "business_date": day(r.business_date), "at": at(r.at),
        }),
        LedgerWrite::Reverse(r) => json!({
            "kind": "reverse", "institution_code": r.institution_code, "original_request_id": r.original_request_id,
            "tombstone_setl_id": r.tombstone_setl_id, "business_date": day(r.business_date), "at": at(r.at),
        }),
        LedgerWrite::Adjust(a) => json!({
            "kind": "adjust", "request_id": a.request_id, "hold_id": a.hold_id, "hold_deadline_ms": a.hold_deadline_ms,
            "fingerprint": a.fingerprint, "psn_no": a.psn_no, "account_id": a.account_id, "delta": a.delta.to_string(),
            "reason": a.reason, "value_date": day(a.value_date), "business_date": day(a.business_date), "at": at(a.at),
        }),
        LedgerWrite::Lifecycle(l) => json!({
            "kind": "lifecycle", "lifecycle": l.kind.name(), "request_id": l.request_id, "fingerprint": l.fingerprint,
            "psn_no": l.psn_no, "amount": l.amount.map(|m| m.to_string()), "open_account": l.open_account,
            "interest_through": l.interest.map(|(through, _)| day(through)),
            "interest": l.interest.map(|(_, amount)| amount.to_string()), "memo": l.memo,
            "interest_seen": l.interest_seen.map(day), "value_date": day(l.value_date),
            "business_date": day(l.business_date), "at": at(l.at),
        }),
    }
}

fn family_source(row: &Row) -> LedgerResult<FamilySource> {
    Ok(FamilySource {
        owner_psn_no: row.get(0),
        relation: parse(row.get(1), Relation::parse)?,
        effective_from: row.get(2),
        account: AccountRecord {
            id: row.get(3),
            status: parse(row.get(4), AccountStatus::parse)?,
            balance: money(row.get(5))?,
            seq: row.get(6),
        },
    })
}

/// A member's usable family sources, one row each in deduction order: the rule lives once, in
/// `yibao_family_sources` (schema/postgres.sql), which every payment's context reads too.
const USABLE_SOURCES: &str = "SELECT u.owner, u.relation, u.effective, u.account, u.status, u.balance, u.seq
     FROM (SELECT yibao_family_sources($1) AS f OFFSET 0) s,
          unnest((s.f).owners, (s.f).relations, (s.f).effective, (s.f).accounts, (s.f).statuses, (s.f).balances,
                 (s.f).seqs) WITH ORDINALITY AS u(owner, relation, effective, account, status, balance, seq, position)
     ORDER BY u.position";

/// Payer contexts, read together: for each payer of `$1` (with the day of `$2` whose no-PIN total
/// is asked, or NULL), the payer, their PIN state, that day's no-PIN spending and their usable
/// family sources (as parallel arrays, in deduction order), in one row; the last column is the
/// payer's position in `$1` (from 1), and an unknown payer has no row. Columns 0..=13 are those of
/// PERSON_SELECT. The family sources are read by `yibao_family_sources` (schema/postgres.sql) only
/// for a payer with a live link, and the no-PIN total by `yibao_no_pin_used` only when asked for,
/// so an e-voucher payment by a payer without family reads persons, accounts, pins and one index
/// of family_links. The lateral subqueries keep every lookup by key whatever the batch's size, and
/// `OFFSET 0` keeps the family subquery whole, so the function runs once, not once per column
/// taken from its result.
const PAYER_CONTEXTS: &str = "SELECT c.*, q.i
     FROM unnest($1::text[], $2::date[]) WITH ORDINALITY AS q(psn_no, day, i)
     CROSS JOIN LATERAL (
        SELECT p.psn_no, p.name, p.birth_date, p.region, p.category, p.status, p.card_status,
            p.no_pin_tier, k.phc IS NOT NULL AS pin_set, k.locked_until, a.account_id, a.status AS account_status,
            a.balance, a.seq,
            CASE WHEN q.day IS NOT NULL THEN yibao_no_pin_used(p.psn_no, q.day) END AS no_pin_used,
            (ff.f).owners, (ff.f).relations, (ff.f).effective, (ff.f).accounts, (ff.f).statuses, (ff.f).balances,
            (ff.f).seqs
         FROM persons p LEFT JOIN accounts a ON a.psn_no = p.psn_no LEFT JOIN pins k ON k.psn_no = p.psn_no
         LEFT JOIN LATERAL (
            SELECT CASE WHEN EXISTS (SELECT 1 FROM family_links l WHERE l.member_psn_no = p.psn_no AND l.revoked_at IS NULL)
                        THEN yibao_family_sources(p.psn_no) END AS f
            OFFSET 0) ff ON TRUE
         WHERE p.psn_no = q.psn_no
         OFFSET 0) c";

/// A payer's context from a row of PAYER_CONTEXTS.
fn payer_context_from_row(row: &Row) -> LedgerResult<PayerContext> {
    let owners: Vec<String> = row.get::<_, Option<Vec<String>>>(15).unwrap_or_default();
    let relations: Vec<String> = row.get::<_, Option<Vec<String>>>(16).unwrap_or_default();
    let effective: Vec<NaiveDate> = row.get::<_, Option<Vec<NaiveDate>>>(17).unwrap_or_default();
    let accounts: Vec<i64> = row.get::<_, Option<Vec<i64>>>(18).unwrap_or_default();
    let statuses: Vec<String> = row.get::<_, Option<Vec<String>>>(19).unwrap_or_default();
    let balances: Vec<Decimal> = row.get::<_, Option<Vec<Decimal>>>(20).unwrap_or_default();
    let seqs: Vec<i64> = row.get::<_, Option<Vec<i64>>>(21).unwrap_or_default();
    let count = owners.len();
    if [relations.len(), effective.len(), accounts.len(), statuses.len(), balances.len(), seqs.len()]
        .iter()
        .any(|&len| len != count)
    {
        return Err(corrupt("family sources"));
    }
    let family = (0..count)
        .map(|i| {
            Ok(FamilySource {
                owner_psn_no: owners[i].clone(),
                relation: parse(&relations[i], Relation::parse)?,
                effective_from: effective[i],
                account: AccountRecord {
                    id: accounts[i],
                    status: parse(&statuses[i], AccountStatus::parse)?,
                    balance: money(balances[i])?,
                    seq: seqs[i],
                },
            })
        })
        .collect::<LedgerResult<Vec<_>>>()?;
    Ok(PayerContext {
        person: person_from_row(row)?,
        family,
        no_pin_used_today: row.get::<_, Option<Decimal>>(14).map(money).transpose()?,
    })
}

/// Reads payer contexts together, the read side of group commit: every payment asks for one, and
/// a statement's fixed cost (the round trip, waking the server, setting up and locking a plan of
/// four tables) is most of a single lookup's. While `CONTEXT_BATCHES_OUT` batches are out, new
/// reads queue; the next batch takes all that queued, one statement for all of them. An idle
/// reader sends a lone read at once, so batching adds no wait at low load.
struct ContextReader {
    pool: Pool,
    /// The connections the batches go out on, one per batch out (a closed one is replaced).
    connections: Arc<[tokio::sync::Mutex<Option<deadpool_postgres::Object>>]>,
}

impl ContextReader {
    fn new(pool: Pool) -> ContextReader {
        ContextReader { pool, connections: (0..CONTEXT_BATCHES_OUT).map(|_| tokio::sync::Mutex::new(None)).collect() }
    }

    async fn run(self, mut reads: tokio::sync::mpsc::UnboundedReceiver<ContextRead>) {
        let this = Arc::new(self);
        let out = Arc::new(tokio::sync::Semaphore::new(CONTEXT_BATCHES_OUT));
        loop {
            let Ok(permit) = out.clone().acquire_owned().await else { return };
            let mut batch = Vec::new();
            if reads.recv_many(&mut batch, CONTEXT_BATCH_MAX).await == 0 {
                return; // every sender is gone: the ledger was dropped
            }
            let this = this.clone();
            tokio::spawn(async move {
                this.read(batch).await;
                drop(permit);
            });
        }
    }

    /// One statement for the batch; each read gets its own answer, or the batch's failure.
    async fn read(&self, mut batch: Vec<ContextRead>) {
        batch.retain(|(_, _, reply)| !reply.is_closed()); // callers that gave up are not read for
        if batch.is_empty() {
            return;
        }
        let mut answers: Vec<LedgerResult<Option<PayerContext>>> = (0..batch.len()).map(|_| Ok(None)).collect();
        let failure = match self.query(&batch).await {
            Ok(rows) => {
                let mut misplaced = false;
                for row in rows {
                    let position: i64 = row.get(row.len() - 1); // the last column
                    match usize::try_from(position - 1).ok().and_then(|i| answers.get_mut(i)) {
                        Some(answer) => *answer = payer_context_from_row(&row).map(Some),
                        None => misplaced = true,
                    }
                }
                misplaced.then(|| corrupt("payer context position"))
            }
            Err(error) => Some(error),
        };
        if let Some(failure) = failure {
            answers.iter_mut().for_each(|answer| *answer = Err(failure.clone()));
        }
        for ((_, _, reply), answer) in batch.into_iter().zip(answers) {
            let _ = reply.send(answer); // a caller that gave up no longer listens
        }
    }

    async fn query(&self, batch: &[ContextRead]) -> LedgerResult<Vec<Row>> {
        let payers: Vec<&str> = batch.iter().map(|(psn_no, _, _)| psn_no.as_str()).collect();
        let days: Vec<Option<NaiveDate>> = batch.iter().map(|(_, day, _)| *day).collect();
        // A connection no other batch is using (there are as many as batches out).
        let mut slot = None;
        for connection in self.connections.iter() {
            if let Ok(guard) = connection.try_lock() {
                slot = Some(guard);
                break;
            }
        }
        let mut slot = match slot {
            Some(slot) => slot,
            None => self.connections[0].lock().await,
        };
        if slot.as_ref().is_none_or(|client| client.is_closed()) {
            *slot = Some(deadline(self.pool.get()).await?);
        }
        let client = slot.as_ref().expect("just filled");
        let rows = match deadline(client.prepare_cached(PAYER_CONTEXTS)).await {
            Ok(statement) => deadline(client.query(&statement, &[&payers, &days])).await,
            Err(error) => Err(error),
        };
        if rows.is_err() {
            // A statement that ran out of time may still run on the server, and a connection
            // may be half open: the next batch takes a fresh one (this one is closed, not pooled).
            if let Some(client) = slot.take() {
                drop(deadpool_postgres::Object::take(client));
            }
        }
        rows
    }
}

fn family_link(row: &Row, revoked: bool) -> LedgerResult<FamilyLinkRecord> {
    Ok(FamilyLinkRecord {
        owner_psn_no: row.get(0),
        member_psn_no: row.get(1),
        relation: parse(row.get(2), Relation::parse)?,
        effective_from: row.get(3),
        registered_at: row.get(4),
        revoked,
    })
}

#[async_trait]
impl Ledger for PostgresLedger {
    async fn commit_batch(&self, writes: Vec<LedgerWrite>) -> LedgerResult<Vec<WriteResult>> {
        let count = writes.len();
        let payload = Value::Array(writes.iter().map(write_to_json).collect());
        let now_ms = crate::cache::memory::unix_ms() as i64;
        let client = self.client().await?;
        let statement = deadline(client.prepare_cached("SELECT yibao_commit($1::jsonb, $2)")).await?;
        // One statement in autocommit: the whole batch commits (durably) or nothing does.
        let row = deadline(client.query_one(&statement, &[&payload, &now_ms])).await?;
        let results: Value = row.get(0);
        let results = results.as_array().ok_or_else(|| corrupt("batch results"))?;
        if results.len() != count {
            return Err(corrupt("one outcome per write"));
        }
        writes.iter().zip(results).map(|(write, value)| outcome_from_json(write, value)).collect()
    }

    async fn ping(&self) -> LedgerResult<()> {
        self.query_opt("SELECT 1", &[]).await.map(|_| ())
    }

    async fn person(&self, psn_no: &str) -> LedgerResult<Option<PersonRecord>> {
        self.query_opt(PERSON_SELECT, &[&psn_no]).await?.as_ref().map(person_from_row).transpose()
    }

    async fn payer_context(&self, psn_no: &str, no_pin_day: Option<NaiveDate>) -> LedgerResult<Option<PayerContext>> {
        // Every payment asks this: read together with the others asked meanwhile (ContextReader).
        let (reply, answer) = tokio::sync::oneshot::channel();
        let stopped = || LedgerUnavailable("the payer-context reader stopped".into());
        self.contexts.send((psn_no.to_string(), no_pin_day, reply)).map_err(|_| stopped())?;
        // Within a call's time, like every database call (batches queued ahead may be slow).
        match tokio::time::timeout(CALL_TIMEOUT, answer).await {
            Ok(answer) => answer.map_err(|_| stopped())?,
            Err(_) => Err(LedgerUnavailable("the database did not answer in time".into())),
        }
    }

    async fn account_balance(&self, account_id: AccountId) -> LedgerResult<Option<(Money, i64)>> {
        let row = self.query_opt("SELECT balance, seq FROM accounts WHERE account_id = $1", &[&account_id]).await?;
        row.map(|row| Ok((money(row.get(0))?, row.get(1)))).transpose()
    }

    async fn settlement(&self, key: SettlementKey) -> LedgerResult<Option<SettlementRecord>> {
        let row = match &key {
            SettlementKey::SetlId(setl_id) => self.query_opt("SELECT yibao_settlement_json($1)", &[setl_id]).await?,
            SettlementKey::Request { institution_code, request_id } => {
                self.query_opt(
                    "SELECT yibao_settlement_json(setl_id) FROM settlements WHERE institution_code = $1 AND request_id = $2",
                    &[institution_code, request_id],
                )
                .await?
            }
        };
        match row.and_then(|row| row.get::<_, Option<Value>>(0)) {
            Some(value) => settlement_from_json(&value).map(Some),
            None => Ok(None),
        }
    }

    async fn refund_by_request(&self, institution_code: &str, request_id: &str) -> LedgerResult<Option<RefundRecord>> {
        let row = self
            .query_opt(
                "SELECT yibao_refund_json(refund_id) FROM refunds WHERE institution_code = $1 AND request_id = $2",
                &[&institution_code, &request_id],
            )
            .await?;
        match row.and_then(|row| row.get::<_, Option<Value>>(0)) {
            Some(value) => refund_from_json(&value).map(Some),
            None => Ok(None),
        }
    }

    async fn resolve_hold(&self, hold_id: &str) -> LedgerResult<bool> {
        let mut client = self.client().await?;
        let tx = deadline(client.transaction()).await?;
        // The fence waits for a write of this hold still in flight, but gives up before the
        // call's deadline: a statement left running would keep its pooled connection busy.
        deadline(tx.batch_execute("SET LOCAL lock_timeout = '5s'")).await?;
        // Fence the hold unless its write claimed it, then read whichever fate won.
        let fence = deadline(tx.prepare_cached(
            "WITH fenced AS (INSERT INTO hold_fates (hold_id, committed) VALUES ($1, FALSE)
                             ON CONFLICT (hold_id) DO NOTHING RETURNING committed)
             SELECT committed FROM fenced UNION ALL SELECT committed FROM hold_fates WHERE hold_id = $1",
        ))
        .await?;
        let mut fate = deadline(tx.query_opt(&fence, &[&hold_id])).await?.map(|row| row.get::<_, bool>(0));
        if fate.is_none() {
            // The fence waited for a write of this hold, which then committed: that row is newer
            // than the statement's snapshot, so a statement of its own reads it.
            let read = deadline(tx.prepare_cached("SELECT committed FROM hold_fates WHERE hold_id = $1")).await?;
            fate = deadline(tx.query_opt(&read, &[&hold_id])).await?.map(|row| row.get::<_, bool>(0));
        }
        deadline(tx.commit()).await?;
        fate.ok_or_else(|| LedgerUnavailable(format!("hold {hold_id} has no fate after fencing")))
    }

    async fn entries(&self, query: EntryQuery) -> LedgerResult<Vec<EntryRecord>> {
        let limit = query.limit as i64;
        let rows = self
            .query(
                "SELECT p.posting_id, t.kind, p.family_use, p.amount, p.balance_after, t.at, t.value_date, p.setl_id,
                        p.counterparty, t.memo
                 FROM postings p JOIN txns t ON t.txn_id = p.txn_id
                 WHERE p.account_id = $1 AND ($2::date IS NULL OR p.business_date >= $2)
                   AND ($3::date IS NULL OR p.business_date <= $3) AND ($4::bigint IS NULL OR p.posting_id < $4)
                 ORDER BY p.posting_id DESC LIMIT $5",
                &[&query.account_id, &query.from, &query.to, &query.before_entry, &limit],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(EntryRecord {
                    entry_id: row.get(0),
                    kind: parse(row.get(1), TxnKind::parse)?,
                    family_use: row.get(2),
                    amount: money(row.get(3))?,
                    balance_after: money(row.get(4))?,
                    at: row.get(5),
                    value_date: row.get(6),
                    setl_id: row.get(7),
                    counterparty: row.get(8),
                    memo: row.get(9),
                })
            })
            .collect()
    }

    async fn family(&self, psn_no: &str, _today: NaiveDate) -> LedgerResult<FamilyView> {
        let members = self
            .query(
                "SELECT owner_psn_no, member_psn_no, relation, effective_from, registered_at FROM family_links
                 WHERE owner_psn_no = $1 AND revoked_at IS NULL ORDER BY link_id",
                &[&psn_no],
            )
            .await?
            .iter()
            .map(|row| family_link(row, false))
            .collect::<LedgerResult<Vec<_>>>()?;
        let usable = self
            .query(USABLE_SOURCES, &[&psn_no])
            .await?
            .iter()
            .map(|row| {
                let source = family_source(row)?;
                Ok(UsableRecord {
                    owner_psn_no: source.owner_psn_no,
                    relation: source.relation,
                    effective_from: source.effective_from,
                    account_status: source.account.status,
                })
            })
            .collect::<LedgerResult<Vec<_>>>()?;
        Ok(FamilyView { members, usable })
    }

    async fn principal(&self, key_hash: &str) -> LedgerResult<Option<Principal>> {
        let row = self
            .query_opt(
                "SELECT k.key_id, k.role, i.code, i.name, i.kind, i.region FROM api_keys k
                 LEFT JOIN institutions i ON i.code = k.institution_code WHERE k.key_hash = $1",
                &[&key_hash],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let code: Option<String> = row.get(2);
        let institution = match code {
            Some(code) => Some(InstitutionRecord {
                code,
                name: row.get(3),
                kind: parse(row.get(4), InstitutionKind::parse)?,
                region: row.get(5),
            }),
            None => None,
        };
        Ok(Some(Principal { key_id: row.get(0), role: parse(row.get(1), Role::parse)?, institution }))
    }

    async fn institution(&self, code: &str) -> LedgerResult<Option<InstitutionRecord>> {
        let row = self.query_opt("SELECT code, name, kind, region FROM institutions WHERE code = $1", &[&code]).await?;
        row.map(|row| {
            Ok(InstitutionRecord {
                code: row.get(0),
                name: row.get(1),
                kind: parse(row.get(2), InstitutionKind::parse)?,
                region: row.get(3),
            })
        })
        .transpose()
    }

    async fn trial_balance(&self) -> LedgerResult<TrialBalance> {
        let row = self
            .query_opt(
                "SELECT COALESCE(SUM(balance) FILTER (WHERE psn_no IS NOT NULL), 0),
                        COALESCE(SUM(balance) FILTER (WHERE system_code IS NOT NULL), 0),
                        (SELECT COUNT(*) FROM (SELECT txn_id FROM postings GROUP BY txn_id HAVING SUM(amount) <> 0) u),
                        (SELECT COUNT(*) FROM accounts a WHERE a.balance <>
                            (SELECT COALESCE(SUM(amount), 0) FROM postings p WHERE p.account_id = a.account_id))
                 FROM accounts",
                &[],
            )
            .await?
            .ok_or_else(|| corrupt("trial balance"))?;
        Ok(TrialBalance {
            personal: money(row.get(0))?,
            system: money(row.get(1))?,
            unbalanced_txns: row.get(2),
            drifted_accounts: row.get(3),
        })
    }

    async fn upsert_person(
        &self,
        person: PersonUpsert,
        open_account: bool,
        at: DateTime<Utc>,
    ) -> LedgerResult<PersonRecord> {
        let mut client = self.client().await?;
        let tx = deadline(client.transaction()).await?;
        deadline(tx.execute(
            "INSERT INTO persons (psn_no, name, birth_date, region, category, status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
             ON CONFLICT (psn_no) DO UPDATE SET name = excluded.name, birth_date = excluded.birth_date,
                 region = excluded.region, category = excluded.category, status = excluded.status,
                 updated_at = excluded.updated_at",
            &[
                &person.psn_no,
                &person.name,
                &person.birth_date,
                &person.region,
                &person.category.name(),
                &person.status.name(),
                &at,
            ],
        ))
        .await?;
        if open_account {
            deadline(tx.execute(
                "INSERT INTO accounts (psn_no, status, opened_at) VALUES ($1, 'OPEN', $2) ON CONFLICT (psn_no) DO NOTHING",
                &[&person.psn_no, &at],
            ))
            .await?;
        }
        let row = deadline(tx.query_one(PERSON_SELECT, &[&person.psn_no])).await?;
        let record = person_from_row(&row)?;
        deadline(tx.commit()).await?;
        Ok(record)
    }

    async fn register_institution(
        &self,
        institution: InstitutionRecord,
        key: NewApiKey,
    ) -> LedgerResult<Result<(), AlreadyExists>> {
        let mut client = self.client().await?;
        let tx = deadline(client.transaction()).await?;
        let inserted = deadline(tx.execute(
            "INSERT INTO institutions (code, name, kind, region, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (code) DO NOTHING",
            &[&institution.code, &institution.name, &institution.kind.name(), &institution.region, &key.at],
        ))
        .await?;
        if inserted == 0 {
            return Ok(Err(AlreadyExists));
        }
        deadline(tx.execute(
            INSERT_KEY,
            &[&key.key_hash, &key.key_id, &key.role.name(), &key.institution_code, &key.label, &key.at],
        ))
        .await?;
        deadline(tx.commit()).await?;
        Ok(Ok(()))
    }

    async fn insert_api_key(&self, key: NewApiKey) -> LedgerResult<()> {
        self.execute(
            INSERT_KEY,
            &[&key.key_hash, &key.key_id, &key.role.name(), &key.institution_code, &key.label, &key.at],
        )
        .await?;
        Ok(())
    }

    async fn store_pin(&self, psn_no: &str, phc: &str, only_if_unset: bool) -> LedgerResult<bool> {
        let now = Utc::now();
        let changed = if only_if_unset {
            self.execute(
                "INSERT INTO pins (psn_no, phc, failed_count, updated_at) VALUES ($1, $2, 0, $3) ON CONFLICT (psn_no) DO NOTHING",
                &[&psn_no, &phc, &now],
            )
            .await?
        } else {
            self.execute(
                "INSERT INTO pins (psn_no, phc, failed_count, updated_at) VALUES ($1, $2, 0, $3)
                 ON CONFLICT (psn_no) DO UPDATE SET phc = excluded.phc, failed_count = 0, locked_until = NULL,
                     updated_at = excluded.updated_at",
                &[&psn_no, &phc, &now],
            )
            .await?
        };
        Ok(changed == 1)
    }

    async fn pin_attempt_begin(
        &self,
        psn_no: &str,
        today: NaiveDate,
        lockout_failures: u32,
    ) -> LedgerResult<PinAttempt> {
        // One statement, atomic across gateways: a lock that ran out starts a fresh count. If the
        // state changes between it and the follow-up read (a reset), try once more.
        for _ in 0..2 {
            let row = self
                .query_opt(
                    "WITH current AS (SELECT failed_count, locked_until FROM pins WHERE psn_no = $1 FOR UPDATE),
                 decided AS (
                     SELECT CASE WHEN locked_until IS NOT NULL AND $2 < locked_until THEN NULL
                                 WHEN locked_until IS NOT NULL THEN 1 ELSE failed_count + 1 END AS failures,
                            locked_until FROM current)
                 UPDATE pins SET failed_count = d.failures,
                     locked_until = CASE WHEN d.failures >= $3 THEN $2 + 1 ELSE NULL END, updated_at = now()
                 FROM decided d WHERE pins.psn_no = $1 AND d.failures IS NOT NULL
                 RETURNING pins.failed_count, pins.phc",
                    &[&psn_no, &today, &(lockout_failures as i32)],
                )
                .await?;
            if let Some(row) = row {
                return Ok(PinAttempt::Proceed { failures: row.get::<_, i32>(0) as u32, phc: StoredPin(row.get(1)) });
            }
            let state = self.query_opt("SELECT locked_until FROM pins WHERE psn_no = $1", &[&psn_no]).await?;
            match state.map(|row| row.get::<_, Option<NaiveDate>>(0)) {
                None => return Ok(PinAttempt::NotSet),
                Some(Some(until)) if today < until => return Ok(PinAttempt::Locked { until }),
                Some(_) => continue,
            }
        }
        Err(LedgerUnavailable("the PIN state kept changing; retry".into()))
    }

    async fn pin_attempt_succeeded(&self, psn_no: &str) -> LedgerResult<()> {
        self.execute("UPDATE pins SET failed_count = 0, locked_until = NULL WHERE psn_no = $1", &[&psn_no]).await?;
        Ok(())
    }

    async fn set_card_status(&self, psn_no: &str, status: CardStatus) -> LedgerResult<()> {
        self.execute("UPDATE persons SET card_status = $1 WHERE psn_no = $2", &[&status.name(), &psn_no]).await?;
        Ok(())
    }

    async fn set_no_pin_tier(&self, psn_no: &str, tier: Option<&str>) -> LedgerResult<()> {
        self.execute("UPDATE persons SET no_pin_tier = $1 WHERE psn_no = $2", &[&tier, &psn_no]).await?;
        Ok(())
    }

    async fn set_account_status(&self, psn_no: &str, status: AccountStatus) -> LedgerResult<()> {
        // A closed account stays closed (freezing must not race a transfer out into reopening it).
        self.execute(
            "UPDATE accounts SET status = $1 WHERE psn_no = $2 AND status <> 'CLOSED'",
            &[&status.name(), &psn_no],
        )
        .await?;
        Ok(())
    }

    async fn register_family(&self, link: NewFamilyLink) -> LedgerResult<Result<FamilyLinkRecord, AlreadyExists>> {
        let mut client = self.client().await?;
        let tx = deadline(client.transaction()).await?;
        let inserted = deadline(tx.execute(
            "INSERT INTO family_links (owner_psn_no, member_psn_no, relation, effective_from, registered_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner_psn_no, member_psn_no) WHERE revoked_at IS NULL DO NOTHING",
            &[&link.owner_psn_no, &link.member_psn_no, &link.relation.name(), &link.effective_from, &link.at],
        ))
        .await?;
        if inserted == 0 {
            return Ok(Err(AlreadyExists));
        }
        // Default order: order of registration (DESIGN §1 Paying 1).
        deadline(tx.execute(
            "INSERT INTO family_order (member_psn_no, owner_psn_no, position)
             VALUES ($1, $2, (SELECT COALESCE(MAX(position), 0) + 1 FROM family_order WHERE member_psn_no = $1))
             ON CONFLICT (member_psn_no, owner_psn_no) DO UPDATE SET position = excluded.position",
            &[&link.member_psn_no, &link.owner_psn_no],
        ))
        .await?;
        deadline(tx.commit()).await?;
        Ok(Ok(link.into()))
    }

    async fn revoke_family(
        &self,
        owner: &str,
        member: &str,
        at: DateTime<Utc>,
    ) -> LedgerResult<Option<FamilyLinkRecord>> {
        let mut client = self.client().await?;
        let tx = deadline(client.transaction()).await?;
        let row = deadline(tx.query_opt(
            "UPDATE family_links SET revoked_at = $1 WHERE owner_psn_no = $2 AND member_psn_no = $3 AND revoked_at IS NULL
             RETURNING owner_psn_no, member_psn_no, relation, effective_from, registered_at",
            &[&at, &owner, &member],
        ))
        .await?;
        deadline(
            tx.execute("DELETE FROM family_order WHERE member_psn_no = $1 AND owner_psn_no = $2", &[&member, &owner]),
        )
        .await?;
        deadline(tx.commit()).await?;
        row.map(|row| family_link(&row, true)).transpose()
    }

    async fn set_deduction_order(&self, member: &str, owners: &[String]) -> LedgerResult<bool> {
        let mut client = self.client().await?;
        let tx = deadline(client.transaction()).await?;
        let rows =
            deadline(tx.query("SELECT owner_psn_no FROM family_order WHERE member_psn_no = $1 FOR UPDATE", &[&member]))
                .await?;
        let current: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        if !same_owners(&current, owners) {
            return Ok(false);
        }
        for (position, owner) in owners.iter().enumerate() {
            deadline(tx.execute(
                "UPDATE family_order SET position = $1 WHERE member_psn_no = $2 AND owner_psn_no = $3",
                &[&(position as i32 + 1), &member, owner],
            ))
            .await?;
        }
        deadline(tx.commit()).await?;
        Ok(true)
    }

    async fn credit_candidates(
        &self,
        region: &str,
        period: Period,
        after: &str,
        limit: usize,
    ) -> LedgerResult<Vec<CreditCandidate>> {
        let rows = self
            .query(
                // Written so the generic plan walks persons by (region, psn_no) and probes each
                // person's account, credit and contributions by key: a join or EXISTS here became a
                // merge join over every account and a hashed scan of every credit, per chunk.
                "SELECT p.psn_no, p.birth_date, p.category, p.status, a.account_id, a.status, a.opened_at,
                        (SELECT TRUE FROM credits c WHERE c.account_id = a.account_id AND c.period = $2
                                AND c.kind = 'MONTHLY_CREDIT' LIMIT 1) IS NOT NULL,
                        (SELECT string_agg(k.period || ',' || (k.base * 100)::BIGINT || ',' || k.paid::INT || ','
                                           || k.category, ';')
                           FROM contributions k
                          WHERE k.psn_no = p.psn_no AND k.period <= $2 AND (k.paid OR k.period = $2)
                            AND NOT EXISTS (SELECT 1 FROM credits c WHERE c.account_id = a.account_id
                                            AND c.period = k.period AND c.kind = 'MONTHLY_CREDIT'))
                   FROM persons p
                   JOIN LATERAL (SELECT account_id, status, opened_at FROM accounts WHERE psn_no = p.psn_no LIMIT 1) a
                     ON TRUE
                  WHERE p.region = $1 AND p.psn_no > $3
                  ORDER BY p.psn_no LIMIT $4",
                &[&region, &period.to_string(), &after, &(limit as i64)],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let text: Option<String> = row.get(8);
                Ok(CreditCandidate {
                    psn_no: row.get(0),
                    account_id: row.get(4),
                    subject: Subject {
                        birth_date: row.get(1),
                        category: parse(row.get(2), PersonCategory::parse)?,
                        status: parse(row.get(3), InsuranceStatus::parse)?,
                        account_status: parse(row.get(5), AccountStatus::parse)?,
                        account_opened: crate::clock::business_date(row.get(6)),
                    },
                    period_done: row.get(7),
                    contributions: parse_contributions(text.as_deref().unwrap_or(""))
                        .ok_or_else(|| corrupt("contributions"))?,
                })
            })
            .collect()
    }

    async fn interest_candidates(
        &self,
        region: &str,
        start: NaiveDate,
        end: NaiveDate,
        after: &str,
        limit: usize,
        only: Option<&str>,
    ) -> LedgerResult<Vec<InterestCandidate>> {
        let rows = self
            .query(
                "SELECT p.psn_no, a.account_id, a.status,
                        (SELECT MAX(c.period) FROM credits c WHERE c.account_id = a.account_id AND c.kind = 'INTEREST'),
                        (SELECT string_agg(d::TEXT || ',' || s::TEXT, ';') FROM (
                            SELECT GREATEST(t.value_date, $2) AS d, (SUM(po.amount) * 100)::BIGINT AS s
                              FROM postings po JOIN txns t ON t.txn_id = po.txn_id
                             WHERE po.account_id = a.account_id AND t.value_date <= $3 GROUP BY 1) x)
                   FROM persons p
                   JOIN LATERAL (SELECT account_id, status FROM accounts WHERE psn_no = p.psn_no LIMIT 1) a ON TRUE
                  WHERE ($6::TEXT IS NULL AND p.region = $1 AND p.psn_no > $4) OR p.psn_no = $6
                  ORDER BY p.psn_no LIMIT $5",
                &[&region, &start, &end, &after, &(limit as i64), &only],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let settled: Option<String> = row.get(3);
                let text: Option<String> = row.get(4);
                Ok(InterestCandidate {
                    psn_no: row.get(0),
                    account_id: row.get(1),
                    account_status: parse(row.get(2), AccountStatus::parse)?,
                    settled_through: settled
                        .map(|d| NaiveDate::parse_from_str(&d, "%Y-%m-%d").map_err(|_| corrupt("interest period")))
                        .transpose()?,
                    amounts: parse_amounts(text.as_deref().unwrap_or("")).ok_or_else(|| corrupt("interest amounts"))?,
                })
            })
            .collect()
    }

    async fn apply_credits(&self, batch: CreditBatch) -> LedgerResult<CreditsApplied> {
        let count = batch.postings.len();
        let lines = Value::Array(
            batch
                .postings
                .iter()
                .map(|p| {
                    json!({
                        "account_id": p.account_id,
                        "period": p.period,
                        "value_date": p.value_date.to_string(),
                        "kind": p.line.kind.name(),
                        "delta": p.line.delta().to_string(),
                        "counterpart": p.line.counterpart.name(),
                        "seen": p.interest_seen,
                    })
                })
                .collect(),
        );
        let client = self.client().await?;
        let statement = deadline(client.prepare_cached("SELECT yibao_credit($1::jsonb, $2, $3, $4)")).await?;
        let row =
            import_deadline(client.query_one(&statement, &[&lines, &batch.reference, &batch.business_date, &batch.at]))
                .await?;
        let answer: Value = row.get(0);
        let applied: Vec<bool> = answer["applied"]
            .as_array()
            .ok_or_else(|| corrupt("credit answer"))?
            .iter()
            .map(|v| v.as_bool().ok_or_else(|| corrupt("credit answer")))
            .collect::<LedgerResult<_>>()?;
        if applied.len() != count {
            return Err(corrupt("one verdict per credit line"));
        }
        let (accounts, balances, seqs) = (&answer["accounts"], &answer["balances"], &answer["seqs"]);
        let accounts = accounts.as_array().ok_or_else(|| corrupt("credit answer"))?;
        let mut changes = Vec::with_capacity(accounts.len());
        for (i, account) in accounts.iter().enumerate() {
            changes.push(BalanceChange {
                account_id: account.as_i64().ok_or_else(|| corrupt("credit answer"))?,
                balance_after: balances[i]
                    .as_str()
                    .and_then(Money::from_ledger_text)
                    .ok_or_else(|| corrupt("credit answer"))?,
                seq: seqs[i].as_i64().ok_or_else(|| corrupt("credit answer"))?,
            });
        }
        Ok(CreditsApplied { applied, changes: last_changes(changes) })
    }

    async fn lifecycle(&self, request_id: &str) -> LedgerResult<Option<LifecycleRecord>> {
        let row = self.query_opt("SELECT yibao_lifecycle_json($1)", &[&request_id]).await?;
        let value: Option<Value> = row.and_then(|row| row.get(0));
        value.map(|value| lifecycle_from_json(&value)).transpose()
    }

    async fn interest_rates(&self, region: &str) -> LedgerResult<Vec<InterestRate>> {
        let rows = self
            .query(
                "SELECT effective_from, annual_rate_percent FROM interest_rates WHERE region = $1 ORDER BY effective_from",
                &[&region],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| InterestRate {
                effective_from: row.get(0),
                annual_rate_percent: row.get::<_, Decimal>(1).normalize(),
            })
            .collect())
    }

    async fn insert_interest_rate(
        &self,
        region: &str,
        rate: InterestRate,
        at: DateTime<Utc>,
    ) -> LedgerResult<Result<(), InterestRate>> {
        let row = self
            .query_opt(
                "WITH ins AS (INSERT INTO interest_rates (region, effective_from, annual_rate_percent, entered_at)
                              VALUES ($1, $2, $3, $4) ON CONFLICT (region, effective_from) DO NOTHING RETURNING 1)
                 SELECT EXISTS (SELECT 1 FROM ins),
                        (SELECT annual_rate_percent FROM interest_rates WHERE region = $1 AND effective_from = $2)",
                &[&region, &rate.effective_from, &rate.annual_rate_percent, &at],
            )
            .await?
            .ok_or_else(|| corrupt("interest rate answer"))?;
        if row.get::<_, bool>(0) {
            return Ok(Ok(()));
        }
        // Taken by a concurrent call this statement's snapshot cannot see: read it now.
        let stored: Decimal = match row.get::<_, Option<Decimal>>(1) {
            Some(stored) => stored,
            None => self
                .query_opt(
                    "SELECT annual_rate_percent FROM interest_rates WHERE region = $1 AND effective_from = $2",
                    &[&region, &rate.effective_from],
                )
                .await?
                .ok_or_else(|| corrupt("interest rate"))?
                .get(0),
        };
        Ok(Err(InterestRate { effective_from: rate.effective_from, annual_rate_percent: stored.normalize() }))
    }

    async fn import_people(&self, chunk: ImportChunk<PersonImport>) -> LedgerResult<Vec<ImportVerdict>> {
        self.import_people_chunk(chunk).await
    }

    async fn import_contributions(&self, chunk: ImportChunk<ContributionImport>) -> LedgerResult<Vec<ImportVerdict>> {
        let psn_nos: Vec<&str> = chunk.rows.iter().map(|r| r.psn_no.as_str()).collect();
        let periods: Vec<String> = chunk.rows.iter().map(|r| r.period.to_string()).collect();
        let bases: Vec<Decimal> = chunk.rows.iter().map(|r| r.base.as_decimal()).collect();
        let paid: Vec<bool> = chunk.rows.iter().map(|r| r.paid).collect();
        let categories: Vec<Option<&str>> = chunk.rows.iter().map(|r| r.category.map(|c| c.name())).collect();
        let client = self.client().await?;
        // One statement: judged against what is recorded, then recorded (rows of a chunk have
        // distinct keys: the reader refuses repeats).
        let statement = deadline(client.prepare_cached(
            "WITH r AS (SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::NUMERIC[], $4::BOOLEAN[], $6::TEXT[])
                                 WITH ORDINALITY AS r(psn_no, period, base, paid, given, ord)),
                  judged AS (SELECT r.psn_no, r.period, r.base, r.paid, r.ord,
                                    CASE WHEN p.psn_no IS NOT NULL THEN COALESCE(r.given, k.category, p.category) END
                                        AS category,
                                    k.base = r.base AND k.paid = r.paid
                                        AND k.category = COALESCE(r.given, k.category, p.category) AS same
                               FROM r LEFT JOIN persons p ON p.psn_no = r.psn_no
                               LEFT JOIN contributions k ON k.psn_no = r.psn_no AND k.period = r.period),
                  recorded AS (INSERT INTO contributions (psn_no, period, base, paid, category, recorded_at)
                               SELECT psn_no, period, base, paid, category, $5 FROM judged
                                WHERE category IS NOT NULL AND same IS NOT TRUE
                               ON CONFLICT (psn_no, period) DO UPDATE SET base = excluded.base, paid = excluded.paid,
                                   category = excluded.category, recorded_at = excluded.recorded_at
                               RETURNING 1)
             SELECT category IS NOT NULL, COALESCE(same, FALSE), (SELECT COUNT(*) FROM recorded) FROM judged ORDER BY ord",
        ))
        .await?;
        let rows =
            import_deadline(client.query(&statement, &[&psn_nos, &periods, &bases, &paid, &chunk.at, &categories]))
                .await?;
        if rows.len() != chunk.rows.len() {
            return Err(corrupt("one verdict per contribution row"));
        }
        Ok(rows
            .iter()
            .zip(&chunk.rows)
            .map(|(row, import)| match (row.get::<_, bool>(0), row.get::<_, bool>(1)) {
                (false, _) => ImportVerdict::Refused(format!("unknown psn_no {}", import.psn_no)),
                (true, true) => ImportVerdict::AlreadyThere,
                (true, false) => ImportVerdict::Applied,
            })
            .collect())
    }

    async fn import_finished(&self) -> LedgerResult<()> {
        let client = self.client().await?;
        import_deadline(
            client.batch_execute("ANALYZE persons, accounts, postings, family_links, family_order, imported_openings"),
        )
        .await
    }

    async fn import_families(
        &self,
        chunk: ImportChunk<FamilyImport>,
        check: FamilyCheck,
    ) -> LedgerResult<Vec<ImportVerdict>> {
        self.import_families_chunk(chunk, check).await
    }
}

const INSERT_KEY: &str =
    "INSERT INTO api_keys (key_hash, key_id, role, institution_code, label, created_at) VALUES ($1, $2, $3, $4, $5, $6)";

// ---- bulk import ---------------------------------------------------------------------------------

/// An import chunk is far larger than a settlement batch: give each of its statements longer.
const IMPORT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

async fn import_deadline<T>(work: impl Future<Output = Result<T, tokio_postgres::Error>>) -> LedgerResult<T> {
    match tokio::time::timeout(IMPORT_CALL_TIMEOUT, work).await {
        // The server's own message: an operator running an import needs more than "db error".
        Ok(result) => result.map_err(|error| match error.as_db_error() {
            Some(db) => unavailable(format!("{error}: {}", db.message())),
            None => unavailable(error),
        }),
        Err(_) => Err(LedgerUnavailable("the database did not answer in time".into())),
    }
}

fn party_from_row(row: &Row, offset: usize) -> LedgerResult<Option<Party>> {
    let region: Option<String> = row.get(offset);
    let Some(region) = region else { return Ok(None) };
    Ok(Some(Party {
        region,
        status: parse(row.get(offset + 1), InsuranceStatus::parse)?,
        account_status: opt_parse(row.get(offset + 2), AccountStatus::parse)?,
    }))
}

impl PostgresLedger {
    async fn import_people_chunk(&self, chunk: ImportChunk<PersonImport>) -> LedgerResult<Vec<ImportVerdict>> {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::Type;
        let mut client = self.client().await?;
        let tx = import_deadline(client.transaction()).await?;
        // Holds off concurrent UpsertPerson calls (not settlements) for the chunk, so "new" stays new
        // between the look-up and the insert.
        import_deadline(tx.batch_execute(
            "LOCK TABLE persons IN SHARE ROW EXCLUSIVE MODE;
             CREATE TEMP TABLE import_people (line BIGINT NOT NULL, psn_no TEXT NOT NULL, name TEXT NOT NULL,
                 birth_date DATE NOT NULL, region TEXT NOT NULL, category TEXT NOT NULL, status TEXT NOT NULL,
                 open_account BOOLEAN NOT NULL, opening NUMERIC(18,2) NOT NULL) ON COMMIT DROP",
        ))
        .await?;
        let sink = import_deadline(tx.copy_in("COPY import_people FROM STDIN BINARY")).await?;
        let types = [
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::DATE,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::BOOL,
            Type::NUMERIC,
        ];
        let writer = BinaryCopyInWriter::new(sink, &types);
        tokio::pin!(writer);
        for row in &chunk.rows {
            let p = &row.person;
            let line = row.line as i64;
            let opening = row.opening.as_decimal();
            import_deadline(writer.as_mut().write(&[
                &line,
                &p.psn_no,
                &p.name,
                &p.birth_date,
                &p.region,
                &p.category.name(),
                &p.status.name(),
                &row.open_account,
                &opening,
            ]))
            .await?;
        }
        import_deadline(writer.finish()).await?;

        let mut verdicts: HashMap<i64, ImportVerdict> = HashMap::new();
        let existing = import_deadline(tx.query(
            "SELECT i.line, p.name, p.birth_date, p.region, p.category, p.status, o.amount
             FROM import_people i JOIN persons p ON p.psn_no = i.psn_no
             LEFT JOIN imported_openings o ON o.psn_no = i.psn_no",
            &[],
        ))
        .await?;
        let by_line: HashMap<i64, &PersonImport> = chunk.rows.iter().map(|row| (row.line as i64, row)).collect();
        for found in &existing {
            let line: i64 = found.get(0);
            let row = by_line.get(&line).ok_or_else(|| corrupt("import line"))?;
            let held = ExistingImport {
                person: PersonUpsert {
                    psn_no: row.person.psn_no.clone(),
                    name: found.get(1),
                    birth_date: found.get(2),
                    region: found.get(3),
                    category: parse(found.get(4), PersonCategory::parse)?,
                    status: parse(found.get(5), InsuranceStatus::parse)?,
                },
                imported_opening: found.get::<_, Option<Decimal>>(6).map(money).transpose()?,
            };
            verdicts.insert(line, held.verdict(row));
        }
        let taken: Vec<i64> = verdicts.keys().copied().collect();
        import_deadline(tx.execute("DELETE FROM import_people WHERE line = ANY($1)", &[&taken])).await?;
        import_deadline(tx.execute(
            "INSERT INTO persons (psn_no, name, birth_date, region, category, status, created_at, updated_at)
             SELECT psn_no, name, birth_date, region, category, status, $1, $1 FROM import_people",
            &[&chunk.at],
        ))
        .await?;
        import_deadline(tx.execute(
            "INSERT INTO accounts (psn_no, status, balance, seq, opened_at)
             SELECT psn_no, 'OPEN', opening, CASE WHEN opening > 0 THEN 1 ELSE 0 END, $1
             FROM import_people WHERE open_account",
            &[&chunk.at],
        ))
        .await?;
        let total: Decimal = import_deadline(
            tx.query_one("SELECT COALESCE(SUM(opening), 0) FROM import_people WHERE open_account", &[]),
        )
        .await?
        .get(0);
        let mut txn_id: Option<i64> = None;
        if total > Decimal::ZERO {
            let txn: i64 = import_deadline(tx.query_one(
                "INSERT INTO txns (kind, ref, at, business_date, value_date, memo)
                 VALUES ('OPENING_BALANCE', $1, $2, $3, $3, 'bulk import') RETURNING txn_id",
                &[&chunk.reference, &chunk.at, &chunk.business_date],
            ))
            .await?
            .get(0);
            // A new account's first posting: its balance was written with the account (seq 1).
            import_deadline(tx.execute(
                "INSERT INTO postings (txn_id, account_id, amount, balance_after, seq, counterparty, business_date)
                 SELECT $1, a.account_id, i.opening, i.opening, 1, 'MIGRATION', $2
                 FROM import_people i JOIN accounts a ON a.psn_no = i.psn_no WHERE i.open_account AND i.opening > 0",
                &[&txn, &chunk.business_date],
            ))
            .await?;
            import_deadline(tx.execute(
                "SELECT yibao_post($1, yibao_system('MIGRATION_CLEARING'), $2, FALSE, '', 'bulk import', $3)",
                &[&txn, &(-total), &chunk.business_date],
            ))
            .await?;
            import_deadline(tx.execute("SELECT yibao_close($1)", &[&txn])).await?;
            txn_id = Some(txn);
        }
        import_deadline(tx.execute(
            "INSERT INTO imported_openings (psn_no, amount, txn_id, imported_at)
             SELECT psn_no, opening, CASE WHEN opening > 0 THEN $1::BIGINT END, $2 FROM import_people WHERE open_account",
            &[&txn_id, &chunk.at],
        ))
        .await?;
        import_deadline(tx.commit()).await?;
        Ok(chunk.rows.iter().map(|row| verdicts.remove(&(row.line as i64)).unwrap_or(ImportVerdict::Applied)).collect())
    }

    async fn import_families_chunk(
        &self,
        chunk: ImportChunk<FamilyImport>,
        check: FamilyCheck,
    ) -> LedgerResult<Vec<ImportVerdict>> {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::Type;
        let mut client = self.client().await?;
        let tx = import_deadline(client.transaction()).await?;
        // Holds off concurrent registrations and revocations for the chunk (settlements only read).
        import_deadline(tx.batch_execute(
            "LOCK TABLE family_links IN SHARE ROW EXCLUSIVE MODE;
             CREATE TEMP TABLE import_families (line BIGINT NOT NULL, owner_psn_no TEXT NOT NULL,
                 member_psn_no TEXT NOT NULL, relation TEXT NOT NULL, effective_from DATE) ON COMMIT DROP",
        ))
        .await?;
        let sink = import_deadline(
            tx.copy_in("COPY import_families (line, owner_psn_no, member_psn_no, relation) FROM STDIN BINARY"),
        )
        .await?;
        let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT, Type::TEXT, Type::TEXT]);
        tokio::pin!(writer);
        for row in &chunk.rows {
            let line = row.line as i64;
            import_deadline(writer.as_mut().write(&[
                &line,
                &row.owner_psn_no,
                &row.member_psn_no,
                &row.relation.name(),
            ]))
            .await?;
        }
        import_deadline(writer.finish()).await?;
        let facts = import_deadline(tx.query(
            "SELECT f.line, o.region, o.status, oa.status, m.region, m.status, ma.status, l.relation,
                    EXISTS (SELECT 1 FROM family_links r WHERE r.owner_psn_no = f.owner_psn_no
                            AND r.member_psn_no = f.member_psn_no AND r.revoked_at IS NOT NULL)
             FROM import_families f
             LEFT JOIN persons o ON o.psn_no = f.owner_psn_no LEFT JOIN accounts oa ON oa.psn_no = f.owner_psn_no
             LEFT JOIN persons m ON m.psn_no = f.member_psn_no LEFT JOIN accounts ma ON ma.psn_no = f.member_psn_no
             LEFT JOIN family_links l ON l.owner_psn_no = f.owner_psn_no AND l.member_psn_no = f.member_psn_no
                                     AND l.revoked_at IS NULL",
            &[],
        ))
        .await?;
        let by_line: HashMap<i64, &FamilyImport> = chunk.rows.iter().map(|row| (row.line as i64, row)).collect();
        let mut verdicts: HashMap<i64, ImportVerdict> = HashMap::new();
        let (mut lines, mut dates) = (Vec::new(), Vec::new());
        for found in &facts {
            let line: i64 = found.get(0);
            let row = by_line.get(&line).ok_or_else(|| corrupt("import line"))?;
            let facts = FamilyFacts {
                owner: party_from_row(found, 1)?,
                member: party_from_row(found, 4)?,
                active_relation: opt_parse(found.get(7), Relation::parse)?,
                revoked_before: found.get(8),
            };
            match facts.judge(row, &check) {
                Ok(effective_from) => {
                    lines.push(line);
                    dates.push(effective_from);
                }
                Err(verdict) => {
                    verdicts.insert(line, verdict);
                }
            }
        }
        import_deadline(tx.execute(
            "UPDATE import_families f SET effective_from = d.effective_from
             FROM UNNEST($1::BIGINT[], $2::DATE[]) AS d(line, effective_from) WHERE f.line = d.line",
            &[&lines, &dates],
        ))
        .await?;
        import_deadline(tx.execute(
            "INSERT INTO family_links (owner_psn_no, member_psn_no, relation, effective_from, registered_at)
             SELECT owner_psn_no, member_psn_no, relation, effective_from, $1 FROM import_families
             WHERE effective_from IS NOT NULL ORDER BY line",
            &[&chunk.at],
        ))
        .await?;
        // Appended to each member's order, in file order, after the owners already there.
        import_deadline(tx.execute(
            "INSERT INTO family_order (member_psn_no, owner_psn_no, position)
             SELECT f.member_psn_no, f.owner_psn_no,
                    COALESCE((SELECT MAX(o.position) FROM family_order o WHERE o.member_psn_no = f.member_psn_no), 0)
                    + ROW_NUMBER() OVER (PARTITION BY f.member_psn_no ORDER BY f.line)
             FROM import_families f WHERE f.effective_from IS NOT NULL
             ON CONFLICT (member_psn_no, owner_psn_no) DO UPDATE SET position = excluded.position",
            &[],
        ))
        .await?;
        import_deadline(tx.commit()).await?;
        Ok(chunk.rows.iter().map(|row| verdicts.remove(&(row.line as i64)).unwrap_or(ImportVerdict::Applied)).collect())
    }
}
