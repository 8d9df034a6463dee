//! The embedded ledger: one SQLite file in WAL mode with `synchronous=FULL`, so a commit is on disk
//! before it returns. One writer connection (SQLite has one writer anyway) and a few reader
//! connections; every call runs on tokio's blocking pool, never on the async workers.

use super::*;
use crate::domain::credit::{Period, Subject};
use crate::domain::family::Party;
use crate::domain::policy::InterestRate;
use crate::domain::{
    AccountStatus, AuthMethod, CardStatus, Category, Channel, InstitutionKind, InsuranceStatus, Money, PersonCategory,
    Relation, Role, SettlementStatus, SystemAccount, TxnKind,
};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, Transaction, TransactionBehavior};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SCHEMA: &str = include_str!("schema/sqlite.sql");
/// Reader connections kept open; more concurrent reads wait for one.
const READERS_MAX: usize = 4;

#[derive(Clone)]
pub struct SqliteLedger {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The payer-context lane: started by the first payment on its runtime, and again should
    /// that runtime have ended (its task, and the queue's receiver, end with it).
    contexts: Mutex<Option<tokio::sync::mpsc::Sender<ContextJob>>>,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    /// Bounds open reader connections.
    reader_permits: tokio::sync::Semaphore,
    /// System account ids, created at open.
    system: HashMap<SystemAccount, AccountId>,
}

type Sql<T> = rusqlite::Result<T>;

fn unavailable(error: impl std::fmt::Display) -> LedgerUnavailable {
    LedgerUnavailable(error.to_string())
}

fn open_connection(path: &Path) -> Sql<Connection> {
    configure(Connection::open(path)?)
}

/// A connection to a ledger file that must exist already (never creates an empty one).
fn open_existing(path: &Path) -> Sql<Connection> {
    use rusqlite::OpenFlags;
    configure(Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )?)
}

fn configure(conn: Connection) -> Sql<Connection> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Plans do not depend on bound values. Without this, a statement whose plan SQLite thinks a
    // value could change (an `=` filter on a parameter) is marked to re-prepare when its bindings
    // change, and the statement cache clears the bindings of every statement it takes back: every
    // cached payer-context query was compiled again on every payment (a third of the gateway's CPU).
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // Each write of a batch runs in a savepoint, whose journal of the pages it changes is a
    // temporary file by default: keep it in memory. Pages are read through a memory map rather
    // than a read call each, and each connection keeps 32 MiB of pages.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "mmap_size", 1i64 << 30)?;
    conn.pragma_update(None, "cache_size", -32768)?;
    Ok(conn)
}

impl SqliteLedger {
    /// Opens (creating if needed) the ledger file and applies the schema.
    pub fn open(path: &Path) -> Result<SqliteLedger, LedgerUnavailable> {
        let conn = open_connection(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        // The writer checkpoints every 64 MiB of log rather than every 4 MiB, and the
        // checkpointer thread (`spawn_checkpointer`) copies pages in between, so that the
        // writer's checkpoint finds little left to do. (A checkpointing thread alone, the writer
        // never checkpointing, did worse: checkpoints running while batches commit never leave
        // the log fully copied when the next batch begins, so the log never starts over and
        // grows without end. The writer's own checkpoint runs between batches, so it can.)
        conn.pragma_update(None, "wal_autocheckpoint", 16384).map_err(unavailable)?;
        let mut system = HashMap::new();
        let now = ts(Utc::now());
        for account in SystemAccount::ALL {
            conn.execute(
                "INSERT OR IGNORE INTO accounts (system_code, status, opened_at) VALUES (?1, 'OPEN', ?2)",
                params![account.name(), now],
            )
            .map_err(unavailable)?;
            let id: AccountId = conn
                .query_row("SELECT account_id FROM accounts WHERE system_code = ?1", [account.name()], |r| r.get(0))
                .map_err(unavailable)?;
            system.insert(*account, id);
        }
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            contexts: Mutex::new(None),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            reader_permits: tokio::sync::Semaphore::new(READERS_MAX),
            system,
        });
        spawn_checkpointer(Arc::downgrade(&inner));
        Ok(SqliteLedger { inner })
    }

    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection, &HashMap<SystemAccount, AccountId>) -> Sql<T> + Send + 'static,
    ) -> LedgerResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut conn, &inner.system)
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Sql<T> + Send + 'static,
    ) -> LedgerResult<T> {
        let _permit = self.inner.reader_permits.acquire().await.map_err(unavailable)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&inner.path)?,
            };
            let result = work(&conn);
            inner.readers.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            result
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }
}

/// A payer-context read waiting for the lane, and where its answer goes.
type ContextJob = (String, Option<NaiveDate>, tokio::sync::oneshot::Sender<LedgerResult<Option<PayerContext>>>);

/// Payer contexts read at most this many to one trip to the blocking pool.
const CONTEXT_BATCH_MAX: usize = 64;

/// Every payment reads its payer's context first. One trip to the blocking pool per read (a
/// thread woken, then the async worker woken) cost more than the read itself, so the reads
/// queued while a trip is out go together on the next, on a connection of the lane's own — the
/// read side of the group commit.
async fn context_lane(path: PathBuf, mut jobs: tokio::sync::mpsc::Receiver<ContextJob>) {
    let mut conn: Option<Connection> = None;
    let mut batch: Vec<ContextJob> = Vec::with_capacity(CONTEXT_BATCH_MAX);
    while jobs.recv_many(&mut batch, CONTEXT_BATCH_MAX).await > 0 {
        let work = std::mem::take(&mut batch);
        let path = path.clone();
        let taken = conn.take();
        let trip = tokio::task::spawn_blocking(move || {
            let conn = match taken {
                Some(conn) => conn,
                None => match open_connection(&path) {
                    Ok(conn) => conn,
                    Err(error) => {
                        for (_, _, reply) in work {
                            let _ = reply.send(Err(unavailable(&error)));
                        }
                        return None;
                    }
                },
            };
            for (psn_no, no_pin_day, reply) in work {
                // A caller that gave up has dropped its receiver; the answer is dropped.
                let _ = reply.send(payer_context_sync(&conn, &psn_no, no_pin_day).map_err(unavailable));
            }
            Some(conn)
        });
        conn = trip.await.ok().flatten();
    }
}

/// How often the checkpointer copies the log into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Copies committed pages from the log into the database file, on a thread and a connection of
/// its own, every `CHECKPOINT_EVERY`, without ever blocking the writer (a passive checkpoint). The
/// writer's own checkpoint at 64 MiB of log is still what lets the log start over, but by then it
/// finds nearly everything copied and synced, so a commit no longer waits for a whole checkpoint:
/// that wait (the database file's fsync after 64 MiB of log, 20-30 ms here) was what made the
/// embedded ledger's p99. The thread ends within one period of the ledger being dropped.
fn spawn_checkpointer(inner: std::sync::Weak<Inner>) {
    const PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(1);
    let spawned = std::thread::Builder::new().name("sqlite-checkpoint".into()).spawn(move || {
        let mut conn: Option<Connection> = None;
        // After a failure the thread waits longer each time (up to a second) and says so once.
        let mut pause = CHECKPOINT_EVERY;
        loop {
            std::thread::sleep(pause);
            let Some(inner) = inner.upgrade() else { return };
            let outcome = match conn.take() {
                Some(open) => Ok(open),
                None => open_existing(&inner.path),
            }
            .and_then(|open| {
                // A busy checkpoint (the writer's own running) answers a row, not an error.
                open.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
                Ok(open)
            });
            drop(inner);
            match outcome {
                Ok(open) => {
                    conn = Some(open);
                    pause = CHECKPOINT_EVERY;
                }
                Err(error) => {
                    if pause == CHECKPOINT_EVERY {
                        tracing::warn!(%error, "checkpoint failed; the writer checkpoints alone until one succeeds");
                    }
                    pause = (pause * 2).min(PAUSE_MAX);
                }
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no checkpointer thread: the writer checkpoints alone");
    }
}

fn payer_context_sync(conn: &Connection, psn_no: &str, no_pin_day: Option<NaiveDate>) -> Sql<Option<PayerContext>> {
    let Some(person) = load_person(conn, psn_no)? else {
        return Ok(None);
    };
    Ok(Some(PayerContext {
        family: usable_sources(conn, psn_no)?,
        no_pin_used_today: no_pin_day.map(|day| no_pin_used(conn, psn_no, day)).transpose()?,
        person,
    }))
}

// ---- conversions -----------------------------------------------------------------------------

fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn date(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

fn bad_column(index: usize, text: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        index,
        rusqlite::types::Type::Text,
        format!("unexpected value {text:?}").into(),
    )
}

fn col_ts(row: &Row, index: usize) -> Sql<DateTime<Utc>> {
    let text: String = row.get(index)?;
    DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc)).map_err(|_| bad_column(index, &text))
}

fn col_date(row: &Row, index: usize) -> Sql<NaiveDate> {
    let text: String = row.get(index)?;
    NaiveDate::parse_from_str(&text, "%Y-%m-%d").map_err(|_| bad_column(index, &text))
}

fn col_opt_date(row: &Row, index: usize) -> Sql<Option<NaiveDate>> {
    let text: Option<String> = row.get(index)?;
    text.map(|t| NaiveDate::parse_from_str(&t, "%Y-%m-%d").map_err(|_| bad_column(index, &t))).transpose()
}

fn col_money(row: &Row, index: usize) -> Sql<Money> {
    Ok(Money::from_fen(row.get(index)?))
}

fn col_enum<T>(row: &Row, index: usize, parse: fn(&str) -> Option<T>) -> Sql<T> {
    let text: String = row.get(index)?;
    parse(&text).ok_or_else(|| bad_column(index, &text))
}

fn col_opt_enum<T>(row: &Row, index: usize, parse: fn(&str) -> Option<T>) -> Sql<Option<T>> {
    let text: Option<String> = row.get(index)?;
    text.map(|t| parse(&t).ok_or_else(|| bad_column(index, &t))).transpose()
}

/// True when a write's hold deadline has passed (the ledger machine's clock).
fn deadline_passed(deadline_ms: Option<u64>) -> bool {
    deadline_ms.is_some_and(|deadline| crate::cache::memory::unix_ms() > deadline)
}

fn is_constraint(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::ConstraintViolation)
}

// ---- reads shared by the read and write paths -------------------------------------------------

const PERSON_SELECT: &str = "SELECT p.psn_no, p.name, p.birth_date, p.region, p.category, p.status, p.card_status,
        p.no_pin_tier, k.phc IS NOT NULL, k.locked_until, a.account_id, a.status, a.balance_fen, a.seq
     FROM persons p LEFT JOIN accounts a ON a.psn_no = p.psn_no LEFT JOIN pins k ON k.psn_no = p.psn_no
     WHERE p.psn_no = ?1";

fn person_from_row(row: &Row) -> Sql<PersonRecord> {
    let account_id: Option<AccountId> = row.get(10)?;
    let account = match account_id {
        Some(id) => Some(AccountRecord {
            id,
            status: col_enum(row, 11, AccountStatus::parse)?,
            balance: col_money(row, 12)?,
            seq: row.get(13)?,
        }),
        None => None,
    };
    Ok(PersonRecord {
        psn_no: row.get(0)?,
        name: row.get(1)?,
        birth_date: col_date(row, 2)?,
        region: row.get(3)?,
        category: col_enum(row, 4, PersonCategory::parse)?,
        status: col_enum(row, 5, InsuranceStatus::parse)?,
        card_status: col_enum(row, 6, CardStatus::parse)?,
        no_pin_tier: row.get(7)?,
        pin_set: row.get(8)?,
        pin_locked_until: col_opt_date(row, 9)?,
        account,
    })
}

fn load_person(conn: &Connection, psn_no: &str) -> Sql<Option<PersonRecord>> {
    conn.prepare_cached(PERSON_SELECT)?.query_row([psn_no], person_from_row).optional()
}

const SETTLEMENT_SELECT: &str = "SELECT setl_id, institution_code, request_id, fingerprint, psn_no, status,
        amount_fen, acct_pay_fen, mulaid_fen, cash_fen, balc_fen, refunded_fen, channel, category, auth_method,
        mdtrt_id, beneficiary_psn_no, settled_at, tombstone FROM settlements";

fn load_settlement(conn: &Connection, key: &SettlementKey) -> Sql<Option<SettlementRecord>> {
    let row_to_record = |row: &Row| -> Sql<SettlementRecord> {
        Ok(SettlementRecord {
            setl_id: row.get(0)?,
            institution_code: row.get(1)?,
            request_id: row.get(2)?,
            fingerprint: row.get(3)?,
            psn_no: row.get(4)?,
            status: col_enum(row, 5, SettlementStatus::parse)?,
            amount: col_money(row, 6)?,
            acct_pay: col_money(row, 7)?,
            acct_mulaid_pay: col_money(row, 8)?,
            psn_cash_pay: col_money(row, 9)?,
            balc: col_money(row, 10)?,
            refunded: col_money(row, 11)?,
            channel: col_opt_enum(row, 12, Channel::parse)?,
            category: col_opt_enum(row, 13, Category::parse)?,
            auth_method: col_opt_enum(row, 14, AuthMethod::parse)?,
            mdtrt_id: row.get(15)?,
            beneficiary_psn_no: row.get(16)?,
            settled_at: col_ts(row, 17)?,
            debits: Vec::new(),
            tombstone: row.get(18)?,
        })
    };
    let record = match key {
        SettlementKey::SetlId(setl_id) => conn
            .prepare_cached(&format!("{SETTLEMENT_SELECT} WHERE setl_id = ?1"))?
            .query_row([setl_id], row_to_record)
            .optional()?,
        SettlementKey::Request { institution_code, request_id } => conn
            .prepare_cached(&format!("{SETTLEMENT_SELECT} WHERE institution_code = ?1 AND request_id = ?2"))?
            .query_row([institution_code, request_id], row_to_record)
            .optional()?,
    };
    let Some(mut record) = record else {
        return Ok(None);
    };
    let mut statement = conn.prepare_cached(
        "SELECT account_id, owner_psn_no, amount_fen, refunded_fen, family FROM settlement_debits
         WHERE setl_id = ?1 ORDER BY position",
    )?;
    record.debits = statement
        .query_map([&record.setl_id], |row| {
            Ok(DebitRecord {
                account_id: row.get(0)?,
                owner_psn_no: row.get(1)?,
                amount: col_money(row, 2)?,
                refunded: col_money(row, 3)?,
                family: row.get(4)?,
            })
        })?
        .collect::<Sql<Vec<_>>>()?;
    Ok(Some(record))
}

fn load_refund(conn: &Connection, institution_code: &str, request_id: &str) -> Sql<Option<RefundRecord>> {
    let record = conn
        .prepare_cached(
            "SELECT refund_id, institution_code, request_id, fingerprint, setl_id, amount_fen, status_after,
                    refunded_total_fen, refundable_after_fen, at
             FROM refunds WHERE institution_code = ?1 AND request_id = ?2",
        )?
        .query_row([institution_code, request_id], |row| {
            Ok(RefundRecord {
                refund_id: row.get(0)?,
                institution_code: row.get(1)?,
                request_id: row.get(2)?,
                fingerprint: row.get(3)?,
                setl_id: row.get(4)?,
                amount: col_money(row, 5)?,
                credits: Vec::new(),
                settlement_status: col_enum(row, 6, SettlementStatus::parse)?,
                refunded_total: col_money(row, 7)?,
                refundable: col_money(row, 8)?,
                at: col_ts(row, 9)?,
            })
        })
        .optional()?;
    let Some(mut record) = record else {
        return Ok(None);
    };
    record.credits = conn
        .prepare_cached(
            "SELECT account_id, owner_psn_no, amount_fen, family FROM refund_credits WHERE refund_id = ?1 ORDER BY position",
        )?
        .query_map([&record.refund_id], |row| {
            Ok(DebitLine { account_id: row.get(0)?, owner_psn_no: row.get(1)?, amount: col_money(row, 2)?, family: row.get(3)? })
        })?
        .collect::<Sql<Vec<_>>>()?;
    Ok(Some(record))
}

fn load_lifecycle(conn: &Connection, request_id: &str) -> Sql<Option<LifecycleRecord>> {
    conn.prepare_cached(
        "SELECT request_id, fingerprint, kind, psn_no, amount_fen, interest_fen, status_after, at
           FROM lifecycle_ops WHERE request_id = ?1",
    )?
    .query_row([request_id], |row| {
        Ok(LifecycleRecord {
            request_id: row.get(0)?,
            fingerprint: row.get(1)?,
            kind: col_enum(row, 2, LifecycleKind::parse)?,
            psn_no: row.get(3)?,
            amount: col_money(row, 4)?,
            interest: col_money(row, 5)?,
            account_status: col_enum(row, 6, AccountStatus::parse)?,
            at: col_ts(row, 7)?,
        })
    })
    .optional()
}

fn load_adjustment(conn: &Connection, request_id: &str) -> Sql<Option<AdjustmentRecord>> {
    conn.prepare_cached(
        "SELECT request_id, fingerprint, psn_no, posting_id, delta_fen, balance_after_fen, at FROM adjustments WHERE request_id = ?1",
    )?
    .query_row([request_id], |row| {
        Ok(AdjustmentRecord {
            request_id: row.get(0)?,
            fingerprint: row.get(1)?,
            psn_no: row.get(2)?,
            entry_id: row.get(3)?,
            delta: col_money(row, 4)?,
            balance_after: col_money(row, 5)?,
            at: col_ts(row, 6)?,
        })
    })
    .optional()
}

fn no_pin_used(conn: &Connection, psn_no: &str, day: NaiveDate) -> Sql<Money> {
    let fen: i64 = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(acct_pay_fen + mulaid_fen), 0) FROM settlements
             WHERE psn_no = ?1 AND business_date = ?2 AND auth_method = 'NO_PIN_LIMIT' AND status <> 'REVERSED'",
        )?
        .query_row(params![psn_no, date(day)], |row| row.get(0))?;
    Ok(Money::from_fen(fen))
}

/// Active links where `member` is the member, in the member's deduction order.
fn usable_sources(conn: &Connection, member: &str) -> Sql<Vec<FamilySource>> {
    conn.prepare_cached(
        "SELECT l.owner_psn_no, l.relation, l.effective_from, a.account_id, a.status, a.balance_fen, a.seq
         FROM family_links l
         JOIN family_order o ON o.member_psn_no = l.member_psn_no AND o.owner_psn_no = l.owner_psn_no
         JOIN accounts a ON a.psn_no = l.owner_psn_no
         JOIN persons op ON op.psn_no = l.owner_psn_no AND op.status NOT IN ('REMOVED', 'TERMINATED')
         WHERE l.member_psn_no = ?1 AND l.revoked_at IS NULL
         ORDER BY o.position, l.link_id",
    )?
    .query_map([member], |row| {
        Ok(FamilySource {
            owner_psn_no: row.get(0)?,
            relation: col_enum(row, 1, Relation::parse)?,
            effective_from: col_date(row, 2)?,
            account: AccountRecord {
                id: row.get(3)?,
                status: col_enum(row, 4, AccountStatus::parse)?,
                balance: col_money(row, 5)?,
                seq: row.get(6)?,
            },
        })
    })?
    .collect()
}

// ---- the write path -----------------------------------------------------------------------------

/// One write inside the batch transaction. `Ok(Err(_))` is a decline: the caller rolls back to the
/// write's savepoint. `Err(_)` is a database failure that fails the whole batch.
type Applied = Sql<Result<WriteOutcome, WriteDecline>>;

/// Balance changes and credit lines (last-drawn first) of a refund or reversal.
type CreditedBack = (Vec<BalanceChange>, Vec<DebitLine>);

struct Posting<'a> {
    account_id: AccountId,
    delta: Money,
    family_use: bool,
    setl_id: &'a str,
    counterparty: &'a str,
}

struct Writer<'t, 'c> {
    tx: &'t Transaction<'c>,
    system: &'t HashMap<SystemAccount, AccountId>,
}

impl Writer<'_, '_> {
    fn new_txn(
        &self,
        kind: TxnKind,
        reference: &str,
        business_date: NaiveDate,
        value_date: NaiveDate,
        at: DateTime<Utc>,
        memo: &str,
    ) -> Sql<i64> {
        self.tx
            .prepare_cached(
                "INSERT INTO txns (kind, ref, at, business_date, value_date, memo) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![kind.name(), reference, ts(at), date(business_date), date(value_date), memo])?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Applies one posting: moves the account's balance (the CHECK refuses a negative personal
    /// balance; a debit needs an OPEN account, and a CLOSED one takes nothing) and appends the
    /// posting row.
    fn post(
        &self,
        txn_id: i64,
        business_date: NaiveDate,
        posting: &Posting,
    ) -> Sql<Result<(BalanceChange, i64), WriteDecline>> {
        let updated = self
            .tx
            .prepare_cached(
                "UPDATE accounts SET balance_fen = balance_fen + ?1, seq = seq + 1
                 WHERE account_id = ?2
                   AND (system_code IS NOT NULL OR (status <> 'CLOSED' AND (?1 >= 0 OR status = 'OPEN')))
                 RETURNING balance_fen, seq",
            )?
            .query_row(params![posting.delta.to_fen(), posting.account_id], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
            })
            .optional();
        let (balance_fen, seq) = match updated {
            Ok(Some(row)) => row,
            Ok(None) => {
                let status: String = self.tx.query_row(
                    "SELECT status FROM accounts WHERE account_id = ?1",
                    [posting.account_id],
                    |row| row.get(0),
                )?;
                let status = AccountStatus::parse(&status).unwrap_or(AccountStatus::Closed);
                return Ok(Err(WriteDecline::AccountNotOpen { account_id: posting.account_id, status }));
            }
            Err(error) if is_constraint(&error) => {
                return Ok(Err(WriteDecline::InsufficientBalance { account_id: posting.account_id }))
            }
            Err(error) => return Err(error),
        };
        self.tx
            .prepare_cached(
                "INSERT INTO postings (txn_id, account_id, amount_fen, balance_after_fen, seq, family_use, setl_id,
                                       counterparty, business_date)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                txn_id,
                posting.account_id,
                posting.delta.to_fen(),
                balance_fen,
                seq,
                posting.family_use,
                posting.setl_id,
                posting.counterparty,
                date(business_date)
            ])?;
        let posting_id = self.tx.last_insert_rowid();
        Ok(Ok((
            BalanceChange { account_id: posting.account_id, balance_after: Money::from_fen(balance_fen), seq },
            posting_id,
        )))
    }

    /// A personal posting (`mine`) against a system account, which takes the opposite amount with
    /// `psn_no` as its counterparty, and the transaction closed: every two-sided write.
    fn post_against(
        &self,
        txn_id: i64,
        business_date: NaiveDate,
        mine: &Posting,
        counterpart: SystemAccount,
        psn_no: &str,
    ) -> Sql<Result<(BalanceChange, i64), WriteDecline>> {
        let done = match self.post(txn_id, business_date, mine)? {
            Ok(done) => done,
            Err(decline) => return Ok(Err(decline)),
        };
        let other = self.system_posting(counterpart, mine.delta.negated(), "", psn_no);
        if let Err(decline) = self.post(txn_id, business_date, &other)? {
            return Ok(Err(decline));
        }
        self.close_txn(txn_id)?;
        Ok(Ok(done))
    }

    /// Records that the write holding `hold_id` commits; false when it was fenced first (by the
    /// sweeper, or by the gateway finding out a timed-out commit).
    fn claim_hold(&self, hold_id: &str) -> Sql<bool> {
        let inserted = self
            .tx
            .prepare_cached(
                "INSERT INTO hold_fates (hold_id, committed) VALUES (?1, 1) ON CONFLICT (hold_id) DO NOTHING",
            )?
            .execute([hold_id])?;
        Ok(inserted == 1)
    }

    fn close_txn(&self, txn_id: i64) -> Sql<()> {
        self.tx.prepare_cached("INSERT INTO txn_closed (txn_id) VALUES (?1)")?.execute([txn_id])?;
        Ok(())
    }

    fn system_posting<'a>(
        &self,
        account: SystemAccount,
        delta: Money,
        setl_id: &'a str,
        counterparty: &'a str,
    ) -> Posting<'a> {
        Posting { account_id: self.system[&account], delta, family_use: false, setl_id, counterparty }
    }

    fn settle(&self, new: NewSettlement) -> Applied {
        let key = SettlementKey::Request {
            institution_code: new.institution_code.clone(),
            request_id: new.request_id.clone(),
        };
        if let Some(existing) = load_settlement(self.tx, &key)? {
            if existing.tombstone {
                return Ok(Err(WriteDecline::OriginalReversed));
            }
            return Ok(Ok(WriteOutcome::SettlementExists(existing)));
        }
        if load_refund(self.tx, &new.institution_code, &new.request_id)?.is_some() {
            return Ok(Err(WriteDecline::RequestIdReused));
        }
        if deadline_passed(new.hold_deadline_ms) || !self.claim_hold(&new.setl_id)? {
            return Ok(Err(WriteDecline::HoldExpired));
        }
        let drawn = Money::sum(new.debits.iter().map(|d| d.amount));
        if let Some(daily_max) = new.no_pin_daily_max {
            let used = no_pin_used(self.tx, &new.psn_no, new.business_date)?;
            if used.checked_add(drawn).is_none_or(|total| total > daily_max) {
                return Ok(Err(WriteDecline::NoPinDailyExceeded { used }));
            }
        }
        let txn_id =
            self.new_txn(TxnKind::Settlement, &new.setl_id, new.business_date, new.business_date, new.at, "")?;
        let mut changes = Vec::with_capacity(new.debits.len());
        for debit in &new.debits {
            assert!(!debit.amount.is_zero() && !debit.amount.is_negative(), "debit lines are positive");
            let counterparty = if debit.family { &new.psn_no } else { &new.institution_code };
            let posting = Posting {
                account_id: debit.account_id,
                delta: debit.amount.negated(),
                family_use: debit.family,
                setl_id: &new.setl_id,
                counterparty,
            };
            match self.post(txn_id, new.business_date, &posting)? {
                Ok((change, _)) => changes.push(change),
                Err(decline) => return Ok(Err(decline)),
            }
        }
        if !drawn.is_zero() {
            let payable =
                self.system_posting(SystemAccount::InstitutionPayable, drawn, &new.setl_id, &new.institution_code);
            if let Err(decline) = self.post(txn_id, new.business_date, &payable)? {
                return Ok(Err(decline));
            }
        }
        self.close_txn(txn_id)?;
        let acct_pay = Money::sum(new.debits.iter().filter(|d| !d.family).map(|d| d.amount));
        let mulaid = drawn.checked_sub(acct_pay).expect("family part within drawn");
        let cash = new.amount.checked_sub(drawn).expect("drawn within amount");
        assert!(!cash.is_negative(), "a settlement never draws more than its amount");
        let balc = match new.own_account {
            Some(own) => match changes.iter().find(|c| c.account_id == own) {
                Some(change) => change.balance_after,
                None => Money::from_fen(self.tx.query_row(
                    "SELECT balance_fen FROM accounts WHERE account_id = ?1",
                    [own],
                    |row| row.get(0),
                )?),
            },
            None => Money::ZERO,
        };
        self.tx
            .prepare_cached(
                "INSERT INTO settlements (setl_id, institution_code, request_id, fingerprint, psn_no, status, amount_fen,
                     acct_pay_fen, mulaid_fen, cash_fen, balc_fen, channel, category, auth_method, mdtrt_id,
                     beneficiary_psn_no, business_date, settled_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'SETTLED', ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )?
            .execute(params![
                new.setl_id,
                new.institution_code,
                new.request_id,
                new.fingerprint,
                new.psn_no,
                new.amount.to_fen(),
                acct_pay.to_fen(),
                mulaid.to_fen(),
                cash.to_fen(),
                balc.to_fen(),
                new.channel.name(),
                new.category.name(),
                new.auth_method.name(),
                new.mdtrt_id,
                new.beneficiary_psn_no,
                date(new.business_date),
                ts(new.at)
            ])?;
        let mut insert_debit = self.tx.prepare_cached(
            "INSERT INTO settlement_debits (setl_id, position, account_id, owner_psn_no, amount_fen, family)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for (position, debit) in new.debits.iter().enumerate() {
            insert_debit.execute(params![
                new.setl_id,
                position as i64,
                debit.account_id,
                debit.owner_psn_no,
                debit.amount.to_fen(),
                debit.family
            ])?;
        }
        Ok(Ok(WriteOutcome::Settled { record: new.settled_record(balc), changes }))
    }

    /// Credits back `amounts[i]` to debit `i` of the settlement and takes the total from the
    /// institution payable. Returns the balance changes and the credit lines, last-drawn first.
    fn credit_back(
        &self,
        txn_id: i64,
        settlement: &SettlementRecord,
        amounts: &[Money],
        business_date: NaiveDate,
    ) -> Sql<Result<CreditedBack, WriteDecline>> {
        let mut changes = Vec::new();
        let mut lines = Vec::new();
        for (position, (debit, amount)) in settlement.debits.iter().zip(amounts).enumerate().rev() {
            if amount.is_zero() {
                continue;
            }
            let counterparty = if debit.family { &settlement.psn_no } else { &settlement.institution_code };
            let posting = Posting {
                account_id: debit.account_id,
                delta: *amount,
                family_use: debit.family,
                setl_id: &settlement.setl_id,
                counterparty,
            };
            match self.post(txn_id, business_date, &posting)? {
                Ok((change, _)) => changes.push(change),
                Err(decline) => return Ok(Err(decline)),
            }
            self.tx
                .prepare_cached(
                    "UPDATE settlement_debits SET refunded_fen = refunded_fen + ?1 WHERE setl_id = ?2 AND position = ?3",
                )?
                .execute(params![amount.to_fen(), settlement.setl_id, position as i64])?;
            lines.push(DebitLine {
                account_id: debit.account_id,
                owner_psn_no: debit.owner_psn_no.clone(),
                amount: *amount,
                family: debit.family,
            });
        }
        let total = Money::sum(amounts.iter().copied());
        let payable = self.system_posting(
            SystemAccount::InstitutionPayable,
            total.negated(),
            &settlement.setl_id,
            &settlement.institution_code,
        );
        if let Err(decline) = self.post(txn_id, business_date, &payable)? {
            return Ok(Err(decline));
        }
        self.close_txn(txn_id)?;
        Ok(Ok((changes, lines)))
    }

    fn refund(&self, new: NewRefund) -> Applied {
        if let Some(existing) = load_refund(self.tx, &new.institution_code, &new.request_id)? {
            return Ok(Ok(WriteOutcome::RefundExists(existing)));
        }
        let key = SettlementKey::Request {
            institution_code: new.institution_code.clone(),
            request_id: new.request_id.clone(),
        };
        if load_settlement(self.tx, &key)?.is_some() {
            return Ok(Err(WriteDecline::RequestIdReused));
        }
        let settlement = match load_settlement(self.tx, &SettlementKey::SetlId(new.setl_id.clone()))? {
            Some(s) if s.institution_code == new.institution_code && !s.tombstone => s,
            _ => return Ok(Err(WriteDecline::NotFound)),
        };
        let refundable = settlement.refundable();
        let amount = new.amount.unwrap_or(refundable);
        if amount.is_zero() || amount > refundable {
            return Ok(Err(WriteDecline::RefundExceedsPaid { refundable }));
        }
        // Last-drawn account first (000 §10: back the way it came).
        let mut left = amount;
        let mut amounts = vec![Money::ZERO; settlement.debits.len()];
        for (i, debit) in settlement.debits.iter().enumerate().rev() {
            let give = left.min(debit.amount.saturating_sub(debit.refunded));
            amounts[i] = give;
            left = left.checked_sub(give).expect("give <= left");
        }
        assert!(left.is_zero(), "refundable covers the refund");
        let txn_id =
            self.new_txn(TxnKind::Refund, &new.refund_id, new.business_date, new.business_date, new.at, &new.setl_id)?;
        let (changes, credits) = match self.credit_back(txn_id, &settlement, &amounts, new.business_date)? {
            Ok(done) => done,
            Err(decline) => return Ok(Err(decline)),
        };
        let refunded_total = settlement.refunded.checked_add(amount).expect("within paid");
        let status = if refunded_total == settlement.paid() {
            SettlementStatus::Refunded
        } else {
            SettlementStatus::PartiallyRefunded
        };
        self.tx
            .prepare_cached("UPDATE settlements SET refunded_fen = ?1, status = ?2 WHERE setl_id = ?3")?
            .execute(params![refunded_total.to_fen(), status.name(), settlement.setl_id])?;
        let refundable_after = settlement.paid().saturating_sub(refunded_total);
        self.tx
            .prepare_cached(
                "INSERT INTO refunds (refund_id, institution_code, request_id, fingerprint, setl_id, amount_fen,
                     status_after, refunded_total_fen, refundable_after_fen, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                new.refund_id,
                new.institution_code,
                new.request_id,
                new.fingerprint,
                new.setl_id,
                amount.to_fen(),
                status.name(),
                refunded_total.to_fen(),
                refundable_after.to_fen(),
                ts(new.at)
            ])?;
        let mut insert_credit = self.tx.prepare_cached(
            "INSERT INTO refund_credits (refund_id, position, account_id, owner_psn_no, amount_fen, family)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for (position, line) in credits.iter().enumerate() {
            insert_credit.execute(params![
                new.refund_id,
                position as i64,
                line.account_id,
                line.owner_psn_no,
                line.amount.to_fen(),
                line.family
            ])?;
        }
        let record = RefundRecord {
            refund_id: new.refund_id,
            institution_code: new.institution_code,
            request_id: new.request_id,
            fingerprint: new.fingerprint,
            setl_id: new.setl_id,
            amount,
            credits,
            settlement_status: status,
            refunded_total,
            refundable: refundable_after,
            at: new.at,
        };
        Ok(Ok(WriteOutcome::Refunded { record, changes }))
    }

    fn reverse(&self, command: ReverseCommand) -> Applied {
        let key = SettlementKey::Request {
            institution_code: command.institution_code.clone(),
            request_id: command.original_request_id.clone(),
        };
        let Some(settlement) = load_settlement(self.tx, &key)? else {
            if load_refund(self.tx, &command.institution_code, &command.original_request_id)?.is_some() {
                return Ok(Err(WriteDecline::RequestIdReused));
            }
            // Never seen: keep a tombstone so that a late original is refused.
            self.tx
                .prepare_cached(
                    "INSERT INTO settlements (setl_id, institution_code, request_id, fingerprint, psn_no, status,
                         amount_fen, acct_pay_fen, mulaid_fen, cash_fen, balc_fen, business_date, settled_at, tombstone)
                     VALUES (?1, ?2, ?3, '', '', 'REVERSED', 0, 0, 0, 0, 0, ?4, ?5, 1)",
                )?
                .execute(params![
                    command.tombstone_setl_id,
                    command.institution_code,
                    command.original_request_id,
                    date(command.business_date),
                    ts(command.at)
                ])?;
            let record = load_settlement(self.tx, &key)?.expect("just inserted");
            return Ok(Ok(WriteOutcome::Reversed { record, changes: Vec::new() }));
        };
        if settlement.status == SettlementStatus::Reversed {
            return Ok(Ok(WriteOutcome::Reversed { record: settlement, changes: Vec::new() }));
        }
        let amounts: Vec<Money> = settlement.debits.iter().map(|d| d.amount.saturating_sub(d.refunded)).collect();
        let mut changes = Vec::new();
        if amounts.iter().any(|a| !a.is_zero()) {
            let txn_id = self.new_txn(
                TxnKind::Reversal,
                &settlement.setl_id,
                command.business_date,
                command.business_date,
                command.at,
                "",
            )?;
            match self.credit_back(txn_id, &settlement, &amounts, command.business_date)? {
                Ok((done, _)) => changes = done,
                Err(decline) => return Ok(Err(decline)),
            }
        }
        self.tx
            .prepare_cached("UPDATE settlements SET status = 'REVERSED', refunded_fen = acct_pay_fen + mulaid_fen WHERE setl_id = ?1")?
            .execute([&settlement.setl_id])?;
        let record = load_settlement(self.tx, &key)?.expect("exists");
        Ok(Ok(WriteOutcome::Reversed { record, changes }))
    }

    fn adjust(&self, new: NewAdjustment) -> Applied {
        if let Some(existing) = load_adjustment(self.tx, &new.request_id)? {
            return Ok(Ok(WriteOutcome::AdjustmentExists(existing)));
        }
        if deadline_passed(new.hold_deadline_ms) || !self.claim_hold(&new.hold_id)? {
            return Ok(Err(WriteDecline::HoldExpired));
        }
        let txn_id =
            self.new_txn(TxnKind::Adjustment, &new.request_id, new.business_date, new.value_date, new.at, &new.reason)?;
        let personal = Posting {
            account_id: new.account_id,
            delta: new.delta,
            family_use: false,
            setl_id: "",
            counterparty: "OPERATOR",
        };
        let (change, posting_id) = match self.post_against(
            txn_id,
            new.business_date,
            &personal,
            SystemAccount::ManualAdjustment,
            &new.psn_no,
        )? {
            Ok(done) => done,
            Err(decline) => return Ok(Err(decline)),
        };
        self.tx
            .prepare_cached(
                "INSERT INTO adjustments (request_id, hold_id, fingerprint, psn_no, posting_id, delta_fen, balance_after_fen, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                new.request_id,
                new.hold_id,
                new.fingerprint,
                new.psn_no,
                posting_id,
                new.delta.to_fen(),
                change.balance_after.to_fen(),
                ts(new.at)
            ])?;
        let record = AdjustmentRecord {
            request_id: new.request_id,
            fingerprint: new.fingerprint,
            psn_no: new.psn_no,
            entry_id: posting_id,
            delta: new.delta,
            balance_after: change.balance_after,
            at: new.at,
        };
        Ok(Ok(WriteOutcome::Adjusted { record, changes: vec![change] }))
    }

    /// A transfer out or liquidation (interest first, then the whole balance out, the account
    /// closed), or a transfer in (the account opened or reopened if need be).
    fn lifecycle(&self, new: NewLifecycle) -> Applied {
        if let Some(existing) = load_lifecycle(self.tx, &new.request_id)? {
            return Ok(Ok(WriteOutcome::LifecycleExists(existing)));
        }
        let account = self
            .tx
            .prepare_cached("SELECT account_id, status FROM accounts WHERE psn_no = ?1")?
            .query_row([&new.psn_no], |row| Ok((row.get::<_, AccountId>(0)?, col_enum(row, 1, AccountStatus::parse)?)))
            .optional()?;
        let incoming = new.kind == LifecycleKind::TransferIn;
        let account_id = match account {
            None if incoming && new.open_account => {
                self.tx
                    .prepare_cached("INSERT INTO accounts (psn_no, status, opened_at) VALUES (?1, 'OPEN', ?2)")?
                    .execute(params![new.psn_no, ts(new.at)])?;
                self.tx.last_insert_rowid()
            }
            None => return Ok(Err(WriteDecline::NoAccount)),
            Some((id, AccountStatus::Closed)) if incoming => {
                // Opened again: months before it were credited where the person was.
                self.tx
                    .prepare_cached("UPDATE accounts SET status = 'OPEN', opened_at = ?2 WHERE account_id = ?1")?
                    .execute(params![id, ts(new.at)])?;
                id
            }
            Some((id, status)) if !incoming && status != AccountStatus::Open => {
                return Ok(Err(WriteDecline::AccountNotOpen { account_id: id, status }))
            }
            Some((id, _)) => id,
        };
        if !incoming {
            let seen: Option<String> = self.tx.query_row(
                "SELECT MAX(period) FROM credits WHERE account_id = ?1 AND kind = 'INTEREST'",
                [account_id],
                |row| row.get(0),
            )?;
            if seen != new.interest_seen.map(date) {
                return Ok(Err(WriteDecline::Stale));
            }
        }
        let mut changes = Vec::new();
        let mut interest = Money::ZERO;
        if let Some((through, amount)) = new.interest.filter(|(_, amount)| !amount.is_zero()) {
            let period = through.to_string();
            let paid_before = self
                .tx
                .prepare_cached("SELECT 1 FROM credits WHERE account_id = ?1 AND period = ?2 AND kind = 'INTEREST'")?
                .exists(params![account_id, period])?;
            if !paid_before {
                let txn_id =
                    self.new_txn(TxnKind::Interest, &new.request_id, new.business_date, through, new.at, &period)?;
                let mine = Posting {
                    account_id,
                    delta: amount,
                    family_use: false,
                    setl_id: "",
                    counterparty: SystemAccount::InterestExpense.name(),
                };
                match self.post_against(
                    txn_id,
                    new.business_date,
                    &mine,
                    SystemAccount::InterestExpense,
                    &new.psn_no,
                )? {
                    Ok((change, _)) => changes.push(change),
                    Err(decline) => return Ok(Err(decline)),
                }
                self.tx
                    .prepare_cached(
                        "INSERT INTO credits (account_id, period, kind, amount_fen, txn_id) VALUES (?1, ?2, 'INTEREST', ?3, ?4)",
                    )?
                    .execute(params![account_id, period, amount.to_fen(), txn_id])?;
                interest = amount;
            }
        }
        let amount = match new.amount {
            Some(amount) if incoming => amount,
            _ => self
                .tx
                .prepare_cached("SELECT balance_fen FROM accounts WHERE account_id = ?1")?
                .query_row([account_id], |row| col_money(row, 0))?,
        };
        if !amount.is_zero() {
            let (kind, counterpart) = new.kind.txn();
            let delta = if incoming { amount } else { amount.negated() };
            let txn_id = self.new_txn(kind, &new.request_id, new.business_date, new.value_date, new.at, &new.memo)?;
            let mine = Posting { account_id, delta, family_use: false, setl_id: "", counterparty: counterpart.name() };
            match self.post_against(txn_id, new.business_date, &mine, counterpart, &new.psn_no)? {
                Ok((change, _)) => changes.push(change),
                Err(decline) => return Ok(Err(decline)),
            }
        }
        let status = if incoming { AccountStatus::Open } else { AccountStatus::Closed };
        if !incoming {
            self.tx
                .prepare_cached("UPDATE accounts SET status = 'CLOSED' WHERE account_id = ?1")?
                .execute([account_id])?;
        }
        self.tx
            .prepare_cached(
                "INSERT INTO lifecycle_ops (request_id, fingerprint, kind, psn_no, amount_fen, interest_fen, status_after, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                new.request_id,
                new.fingerprint,
                new.kind.name(),
                new.psn_no,
                amount.to_fen(),
                interest.to_fen(),
                status.name(),
                ts(new.at)
            ])?;
        let record = LifecycleRecord {
            request_id: new.request_id,
            fingerprint: new.fingerprint,
            kind: new.kind,
            psn_no: new.psn_no,
            amount,
            interest,
            account_status: status,
            at: new.at,
        };
        Ok(Ok(WriteOutcome::Lifecycle { record, changes: last_changes(changes) }))
    }

    fn apply(&self, write: LedgerWrite) -> Applied {
        match write {
            LedgerWrite::Lifecycle(new) => self.lifecycle(new),
            LedgerWrite::Settle(new) => self.settle(new),
            LedgerWrite::Refund(new) => self.refund(new),
            LedgerWrite::Reverse(command) => self.reverse(command),
            LedgerWrite::Adjust(new) => self.adjust(new),
        }
    }
}

fn commit_batch_sync(
    conn: &mut Connection,
    system: &HashMap<SystemAccount, AccountId>,
    writes: Vec<LedgerWrite>,
) -> Sql<Vec<WriteResult>> {
    // Writes rarely decline, and a savepoint per write journals every page each write touches:
    // a batch first runs without them. At the first decline or refused constraint the whole
    // transaction rolls back and the batch runs again with a savepoint per write, so a declined
    // write never leaves anything behind either way.
    if writes.len() > 1 {
        if let Some(results) = commit_batch_unless_declined(conn, system, writes.clone())? {
            return Ok(results);
        }
    }
    commit_batch_with_savepoints(conn, system, writes)
}

/// The batch in one transaction, committed only if every write succeeds (`None` otherwise,
/// with nothing written).
fn commit_batch_unless_declined(
    conn: &mut Connection,
    system: &HashMap<SystemAccount, AccountId>,
    writes: Vec<LedgerWrite>,
) -> Sql<Option<Vec<WriteResult>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(writes.len());
    {
        let writer = Writer { tx: &tx, system };
        for write in writes {
            match writer.apply(write) {
                Ok(Ok(outcome)) => results.push(Ok(outcome)),
                // Dropping `tx` rolls the whole batch back.
                Ok(Err(_)) => return Ok(None),
                Err(error) if is_constraint(&error) => return Ok(None),
                Err(error) => return Err(error),
            }
        }
    }
    tx.commit()?;
    Ok(Some(results))
}

fn commit_batch_with_savepoints(
    conn: &mut Connection,
    system: &HashMap<SystemAccount, AccountId>,
    writes: Vec<LedgerWrite>,
) -> Sql<Vec<WriteResult>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(writes.len());
    {
        let writer = Writer { tx: &tx, system };
        for write in writes {
            tx.execute_batch("SAVEPOINT one_write")?;
            let result = match writer.apply(write) {
                Ok(result) => result,
                // A constraint the code did not foresee (a CHECK on refunds, a unique key): this
                // write is refused, the others go on.
                Err(error) if is_constraint(&error) => {
                    tracing::warn!(%error, "ledger constraint refused a write");
                    Err(WriteDecline::RequestIdReused)
                }
                Err(error) => return Err(error),
            };
            if result.is_err() {
                tx.execute_batch("ROLLBACK TO one_write")?;
            }
            tx.execute_batch("RELEASE one_write")?;
            results.push(result);
        }
    }
    tx.commit()?;
    Ok(results)
}

#[async_trait]
impl Ledger for SqliteLedger {
    async fn commit_batch(&self, writes: Vec<LedgerWrite>) -> LedgerResult<Vec<WriteResult>> {
        self.write(move |conn, system| commit_batch_sync(conn, system, writes)).await
    }

    async fn ping(&self) -> LedgerResult<()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn person(&self, psn_no: &str) -> LedgerResult<Option<PersonRecord>> {
        let psn_no = psn_no.to_string();
        self.read(move |conn| load_person(conn, &psn_no)).await
    }

    async fn payer_context(&self, psn_no: &str, no_pin_day: Option<NaiveDate>) -> LedgerResult<Option<PayerContext>> {
        let lane = {
            let mut slot = self.inner.contexts.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref().filter(|queue| !queue.is_closed()) {
                Some(queue) => queue.clone(),
                None => {
                    let (queue, jobs) = tokio::sync::mpsc::channel(4096);
                    tokio::spawn(context_lane(self.inner.path.clone(), jobs));
                    slot.insert(queue).clone()
                }
            }
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        lane.send((psn_no.to_string(), no_pin_day, reply)).await.map_err(|_| unavailable("the read lane stopped"))?;
        answer.await.map_err(|_| unavailable("the read lane stopped"))?
    }

    async fn account_balance(&self, account_id: AccountId) -> LedgerResult<Option<(Money, i64)>> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT balance_fen, seq FROM accounts WHERE account_id = ?1")?
                .query_row([account_id], |row| Ok((col_money(row, 0)?, row.get(1)?)))
                .optional()
        })
        .await
    }

    async fn settlement(&self, key: SettlementKey) -> LedgerResult<Option<SettlementRecord>> {
        self.read(move |conn| load_settlement(conn, &key)).await
    }

    async fn refund_by_request(&self, institution_code: &str, request_id: &str) -> LedgerResult<Option<RefundRecord>> {
        let (code, id) = (institution_code.to_string(), request_id.to_string());
        self.read(move |conn| load_refund(conn, &code, &id)).await
    }

    async fn resolve_hold(&self, hold_id: &str) -> LedgerResult<bool> {
        let hold_id = hold_id.to_string();
        self.write(move |conn, _| {
            conn.execute(
                "INSERT INTO hold_fates (hold_id, committed) VALUES (?1, 0) ON CONFLICT (hold_id) DO NOTHING",
                [&hold_id],
            )?;
            conn.query_row("SELECT committed FROM hold_fates WHERE hold_id = ?1", [&hold_id], |row| row.get(0))
        })
        .await
    }

    async fn entries(&self, query: EntryQuery) -> LedgerResult<Vec<EntryRecord>> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT p.posting_id, t.kind, p.family_use, p.amount_fen, p.balance_after_fen, t.at, t.value_date,
                        p.setl_id, p.counterparty, t.memo
                 FROM postings p JOIN txns t ON t.txn_id = p.txn_id
                 WHERE p.account_id = ?1 AND (?2 IS NULL OR p.business_date >= ?2)
                   AND (?3 IS NULL OR p.business_date <= ?3) AND (?4 IS NULL OR p.posting_id < ?4)
                 ORDER BY p.posting_id DESC LIMIT ?5",
            )?
            .query_map(
                params![
                    query.account_id,
                    query.from.map(date),
                    query.to.map(date),
                    query.before_entry,
                    query.limit as i64
                ],
                |row| {
                    Ok(EntryRecord {
                        entry_id: row.get(0)?,
                        kind: col_enum(row, 1, TxnKind::parse)?,
                        family_use: row.get(2)?,
                        amount: col_money(row, 3)?,
                        balance_after: col_money(row, 4)?,
                        at: col_ts(row, 5)?,
                        value_date: col_date(row, 6)?,
                        setl_id: row.get(7)?,
                        counterparty: row.get(8)?,
                        memo: row.get(9)?,
                    })
                },
            )?
            .collect()
        })
        .await
    }

    async fn family(&self, psn_no: &str, _today: NaiveDate) -> LedgerResult<FamilyView> {
        let psn_no = psn_no.to_string();
        self.read(move |conn| {
            let members = conn
                .prepare_cached(
                    "SELECT owner_psn_no, member_psn_no, relation, effective_from, registered_at FROM family_links
                     WHERE owner_psn_no = ?1 AND revoked_at IS NULL ORDER BY link_id",
                )?
                .query_map([&psn_no], |row| {
                    Ok(FamilyLinkRecord {
                        owner_psn_no: row.get(0)?,
                        member_psn_no: row.get(1)?,
                        relation: col_enum(row, 2, Relation::parse)?,
                        effective_from: col_date(row, 3)?,
                        registered_at: col_ts(row, 4)?,
                        revoked: false,
                    })
                })?
                .collect::<Sql<Vec<_>>>()?;
            let usable = usable_sources(conn, &psn_no)?
                .into_iter()
                .map(|source| UsableRecord {
                    owner_psn_no: source.owner_psn_no,
                    relation: source.relation,
                    effective_from: source.effective_from,
                    account_status: source.account.status,
                })
                .collect();
            Ok(FamilyView { members, usable })
        })
        .await
    }

    async fn principal(&self, key_hash: &str) -> LedgerResult<Option<Principal>> {
        let key_hash = key_hash.to_string();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT k.key_id, k.role, i.code, i.name, i.kind, i.region FROM api_keys k
                 LEFT JOIN institutions i ON i.code = k.institution_code WHERE k.key_hash = ?1",
            )?
            .query_row([key_hash], |row| {
                let code: Option<String> = row.get(2)?;
                let institution = match code {
                    Some(code) => Some(InstitutionRecord {
                        code,
                        name: row.get(3)?,
                        kind: col_enum(row, 4, InstitutionKind::parse)?,
                        region: row.get(5)?,
                    }),
                    None => None,
                };
                Ok(Principal { key_id: row.get(0)?, role: col_enum(row, 1, Role::parse)?, institution })
            })
            .optional()
        })
        .await
    }

    async fn institution(&self, code: &str) -> LedgerResult<Option<InstitutionRecord>> {
        let code = code.to_string();
        self.read(move |conn| {
            conn.prepare_cached("SELECT code, name, kind, region FROM institutions WHERE code = ?1")?
                .query_row([code], |row| {
                    Ok(InstitutionRecord {
                        code: row.get(0)?,
                        name: row.get(1)?,
                        kind: col_enum(row, 2, InstitutionKind::parse)?,
                        region: row.get(3)?,
                    })
                })
                .optional()
        })
        .await
    }

    async fn trial_balance(&self) -> LedgerResult<TrialBalance> {
        self.read(|conn| {
            let (personal, system): (i64, i64) = conn.query_row(
                "SELECT COALESCE(SUM(CASE WHEN psn_no IS NOT NULL THEN balance_fen END), 0),
                        COALESCE(SUM(CASE WHEN system_code IS NOT NULL THEN balance_fen END), 0) FROM accounts",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            let unbalanced_txns: i64 = conn.query_row(
                "SELECT COUNT(*) FROM (SELECT txn_id FROM postings GROUP BY txn_id HAVING SUM(amount_fen) <> 0)",
                [],
                |row| row.get(0),
            )?;
            let drifted_accounts: i64 = conn.query_row(
                "SELECT COUNT(*) FROM accounts a
                 WHERE a.balance_fen <> (SELECT COALESCE(SUM(amount_fen), 0) FROM postings p WHERE p.account_id = a.account_id)",
                [],
                |row| row.get(0),
            )?;
            Ok(TrialBalance { personal: Money::from_fen(personal), system: Money::from_fen(system), unbalanced_txns, drifted_accounts })
        })
        .await
    }

    async fn upsert_person(
        &self,
        person: PersonUpsert,
        open_account: bool,
        at: DateTime<Utc>,
    ) -> LedgerResult<PersonRecord> {
        self.write(move |conn, _| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO persons (psn_no, name, birth_date, region, category, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
                 ON CONFLICT (psn_no) DO UPDATE SET name = excluded.name, birth_date = excluded.birth_date,
                     region = excluded.region, category = excluded.category, status = excluded.status,
                     updated_at = excluded.updated_at",
                params![
                    person.psn_no,
                    person.name,
                    date(person.birth_date),
                    person.region,
                    person.category.name(),
                    person.status.name(),
                    ts(at)
                ],
            )?;
            if open_account {
                tx.execute(
                    "INSERT OR IGNORE INTO accounts (psn_no, status, opened_at) VALUES (?1, 'OPEN', ?2)",
                    params![person.psn_no, ts(at)],
                )?;
            }
            let record = load_person(&tx, &person.psn_no)?.expect("just written");
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    async fn register_institution(
        &self,
        institution: InstitutionRecord,
        key: NewApiKey,
    ) -> LedgerResult<Result<(), AlreadyExists>> {
        self.write(move |conn, _| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO institutions (code, name, kind, region, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![institution.code, institution.name, institution.kind.name(), institution.region, ts(key.at)],
            )?;
            if inserted == 0 {
                return Ok(Err(AlreadyExists));
            }
            insert_key(&tx, &key)?;
            tx.commit()?;
            Ok(Ok(()))
        })
        .await
    }

    async fn insert_api_key(&self, key: NewApiKey) -> LedgerResult<()> {
        self.write(move |conn, _| insert_key(conn, &key)).await
    }

    async fn store_pin(&self, psn_no: &str, phc: &str, only_if_unset: bool) -> LedgerResult<bool> {
        let (psn_no, phc) = (psn_no.to_string(), phc.to_string());
        self.write(move |conn, _| {
            let now = ts(Utc::now());
            let changed = if only_if_unset {
                conn.execute(
                    "INSERT OR IGNORE INTO pins (psn_no, phc, failed_count, updated_at) VALUES (?1, ?2, 0, ?3)",
                    params![psn_no, phc, now],
                )?
            } else {
                conn.execute(
                    "INSERT INTO pins (psn_no, phc, failed_count, updated_at) VALUES (?1, ?2, 0, ?3)
                     ON CONFLICT (psn_no) DO UPDATE SET phc = excluded.phc, failed_count = 0, locked_until = NULL,
                         updated_at = excluded.updated_at",
                    params![psn_no, phc, now],
                )?
            };
            Ok(changed == 1)
        })
        .await
    }

    async fn pin_attempt_begin(
        &self,
        psn_no: &str,
        today: NaiveDate,
        lockout_failures: u32,
    ) -> LedgerResult<PinAttempt> {
        let psn_no = psn_no.to_string();
        self.write(move |conn, _| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let state = tx
                .query_row("SELECT failed_count, locked_until, phc FROM pins WHERE psn_no = ?1", [&psn_no], |row| {
                    Ok((row.get::<_, u32>(0)?, col_opt_date(row, 1)?, row.get::<_, String>(2)?))
                })
                .optional()?;
            let Some((mut failures, locked_until, phc)) = state else { return Ok(PinAttempt::NotSet) };
            match locked_until {
                Some(until) if today < until => return Ok(PinAttempt::Locked { until }),
                Some(_) => failures = 0, // the lock ran out: a new day, a fresh count
                None => {}
            }
            failures += 1;
            let lock = (failures >= lockout_failures).then(|| today.succ_opt().expect("date in range"));
            tx.execute(
                "UPDATE pins SET failed_count = ?1, locked_until = ?2, updated_at = ?3 WHERE psn_no = ?4",
                params![failures, lock.map(date), ts(Utc::now()), psn_no],
            )?;
            tx.commit()?;
            Ok(PinAttempt::Proceed { failures, phc: StoredPin(phc) })
        })
        .await
    }

    async fn pin_attempt_succeeded(&self, psn_no: &str) -> LedgerResult<()> {
        let psn_no = psn_no.to_string();
        self.write(move |conn, _| {
            conn.execute("UPDATE pins SET failed_count = 0, locked_until = NULL WHERE psn_no = ?1", [psn_no])?;
            Ok(())
        })
        .await
    }

    async fn set_card_status(&self, psn_no: &str, status: CardStatus) -> LedgerResult<()> {
        let psn_no = psn_no.to_string();
        self.write(move |conn, _| {
            conn.execute("UPDATE persons SET card_status = ?1 WHERE psn_no = ?2", params![status.name(), psn_no])?;
            Ok(())
        })
        .await
    }

    async fn set_no_pin_tier(&self, psn_no: &str, tier: Option<&str>) -> LedgerResult<()> {
        let (psn_no, tier) = (psn_no.to_string(), tier.map(str::to_string));
        self.write(move |conn, _| {
            conn.execute("UPDATE persons SET no_pin_tier = ?1 WHERE psn_no = ?2", params![tier, psn_no])?;
            Ok(())
        })
        .await
    }

    async fn set_account_status(&self, psn_no: &str, status: AccountStatus) -> LedgerResult<()> {
        let psn_no = psn_no.to_string();
        self.write(move |conn, _| {
            // A closed account stays closed (freezing must not race a transfer out into reopening it).
            conn.execute(
                "UPDATE accounts SET status = ?1 WHERE psn_no = ?2 AND status <> 'CLOSED'",
                params![status.name(), psn_no],
            )?;
            Ok(())
        })
        .await
    }

    async fn register_family(&self, link: NewFamilyLink) -> LedgerResult<Result<FamilyLinkRecord, AlreadyExists>> {
        self.write(move |conn, _| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exists = tx
                .query_row(
                    "SELECT 1 FROM family_links WHERE owner_psn_no = ?1 AND member_psn_no = ?2 AND revoked_at IS NULL",
                    [&link.owner_psn_no, &link.member_psn_no],
                    |_| Ok(()),
                )
                .optional()?;
            if exists.is_some() {
                return Ok(Err(AlreadyExists));
            }
            tx.execute(
                "INSERT INTO family_links (owner_psn_no, member_psn_no, relation, effective_from, registered_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    link.owner_psn_no,
                    link.member_psn_no,
                    link.relation.name(),
                    date(link.effective_from),
                    ts(link.at)
                ],
            )?;
            tx.execute(FAMILY_ORDER_APPEND, params![link.member_psn_no, link.owner_psn_no])?;
            tx.commit()?;
            Ok(Ok(link.into()))
        })
        .await
    }

    async fn revoke_family(
        &self,
        owner: &str,
        member: &str,
        at: DateTime<Utc>,
    ) -> LedgerResult<Option<FamilyLinkRecord>> {
        let (owner, member) = (owner.to_string(), member.to_string());
        self.write(move |conn, _| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let revoked = tx
                .query_row(
                    "UPDATE family_links SET revoked_at = ?1
                     WHERE owner_psn_no = ?2 AND member_psn_no = ?3 AND revoked_at IS NULL
                     RETURNING owner_psn_no, member_psn_no, relation, effective_from, registered_at",
                    params![ts(at), owner, member],
                    |row| {
                        Ok(FamilyLinkRecord {
                            owner_psn_no: row.get(0)?,
                            member_psn_no: row.get(1)?,
                            relation: col_enum(row, 2, Relation::parse)?,
                            effective_from: col_date(row, 3)?,
                            registered_at: col_ts(row, 4)?,
                            revoked: true,
                        })
                    },
                )
                .optional()?;
            tx.execute(
                "DELETE FROM family_order WHERE member_psn_no = ?1 AND owner_psn_no = ?2",
                params![member, owner],
            )?;
            tx.commit()?;
            Ok(revoked)
        })
        .await
    }

    async fn set_deduction_order(&self, member: &str, owners: &[String]) -> LedgerResult<bool> {
        let (member, owners) = (member.to_string(), owners.to_vec());
        self.write(move |conn, _| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let current: Vec<String> = tx
                .prepare("SELECT owner_psn_no FROM family_order WHERE member_psn_no = ?1")?
                .query_map([&member], |row| row.get(0))?
                .collect::<Sql<_>>()?;
            if !same_owners(&current, &owners) {
                return Ok(false);
            }
            for (position, owner) in owners.iter().enumerate() {
                tx.execute(
                    "UPDATE family_order SET position = ?1 WHERE member_psn_no = ?2 AND owner_psn_no = ?3",
                    params![position as i64 + 1, member, owner],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn credit_candidates(
        &self,
        region: &str,
        period: Period,
        after: &str,
        limit: usize,
    ) -> LedgerResult<Vec<CreditCandidate>> {
        let (region, after, period) = (region.to_string(), after.to_string(), period.to_string());
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT p.psn_no, p.birth_date, p.category, p.status, a.account_id, a.status, a.opened_at,
                        EXISTS (SELECT 1 FROM credits c WHERE c.account_id = a.account_id AND c.period = ?2
                                AND c.kind = 'MONTHLY_CREDIT'),
                        (SELECT group_concat(k.period || ',' || k.base_fen || ',' || k.paid || ',' || k.category, ';')
                           FROM contributions k
                          WHERE k.psn_no = p.psn_no AND k.period <= ?2 AND (k.paid = 1 OR k.period = ?2)
                            AND NOT EXISTS (SELECT 1 FROM credits c WHERE c.account_id = a.account_id
                                            AND c.period = k.period AND c.kind = 'MONTHLY_CREDIT'))
                   FROM persons p JOIN accounts a ON a.psn_no = p.psn_no
                  WHERE p.region = ?1 AND p.psn_no > ?3
                  ORDER BY p.psn_no LIMIT ?4",
            )?;
            let rows = statement.query_map(params![region, period, after, limit as i64], |row| {
                let text: Option<String> = row.get(8)?;
                let text = text.unwrap_or_default();
                Ok(CreditCandidate {
                    psn_no: row.get(0)?,
                    subject: Subject {
                        birth_date: col_date(row, 1)?,
                        category: col_enum(row, 2, PersonCategory::parse)?,
                        status: col_enum(row, 3, InsuranceStatus::parse)?,
                        account_status: col_enum(row, 5, AccountStatus::parse)?,
                        account_opened: crate::clock::business_date(col_ts(row, 6)?),
                    },
                    account_id: row.get(4)?,
                    period_done: row.get(7)?,
                    contributions: parse_contributions(&text).ok_or_else(|| bad_column(8, &text))?,
                })
            })?;
            rows.collect()
        })
        .await
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
        let (region, after, only) = (region.to_string(), after.to_string(), only.map(str::to_string));
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT p.psn_no, a.account_id, a.status,
                        (SELECT MAX(c.period) FROM credits c WHERE c.account_id = a.account_id AND c.kind = 'INTEREST'),
                        (SELECT group_concat(d || ',' || s, ';') FROM (
                            SELECT MAX(t.value_date, ?2) AS d, SUM(po.amount_fen) AS s
                              FROM postings po JOIN txns t ON t.txn_id = po.txn_id
                             WHERE po.account_id = a.account_id AND t.value_date <= ?3 GROUP BY 1))
                   FROM persons p JOIN accounts a ON a.psn_no = p.psn_no
                  WHERE CASE WHEN ?6 IS NULL THEN p.region = ?1 AND p.psn_no > ?4 ELSE p.psn_no = ?6 END
                  ORDER BY p.psn_no LIMIT ?5",
            )?;
            let rows =
                statement.query_map(params![region, date(start), date(end), after, limit as i64, only], |row| {
                    let text: Option<String> = row.get(4)?;
                    let text = text.unwrap_or_default();
                    Ok(InterestCandidate {
                        psn_no: row.get(0)?,
                        account_id: row.get(1)?,
                        account_status: col_enum(row, 2, AccountStatus::parse)?,
                        settled_through: col_opt_date(row, 3)?,
                        amounts: parse_amounts(&text).ok_or_else(|| bad_column(4, &text))?,
                    })
                })?;
            rows.collect()
        })
        .await
    }

    async fn apply_credits(&self, batch: CreditBatch) -> LedgerResult<CreditsApplied> {
        self.write(move |conn, system| apply_credits_sync(conn, system, batch)).await
    }

    async fn lifecycle(&self, request_id: &str) -> LedgerResult<Option<LifecycleRecord>> {
        let request_id = request_id.to_string();
        self.read(move |conn| load_lifecycle(conn, &request_id)).await
    }

    async fn interest_rates(&self, region: &str) -> LedgerResult<Vec<InterestRate>> {
        let region = region.to_string();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT effective_from, annual_rate_percent FROM interest_rates WHERE region = ?1 ORDER BY effective_from",
            )?;
            let rows = statement.query_map([region], |row| {
                let text: String = row.get(1)?;
                Ok(InterestRate {
                    effective_from: col_date(row, 0)?,
                    annual_rate_percent: text.parse().map_err(|_| bad_column(1, &text))?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn insert_interest_rate(
        &self,
        region: &str,
        rate: InterestRate,
        at: DateTime<Utc>,
    ) -> LedgerResult<Result<(), InterestRate>> {
        let region = region.to_string();
        self.write(move |conn, _| {
            let inserted = conn.execute(
                "INSERT INTO interest_rates (region, effective_from, annual_rate_percent, entered_at)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (region, effective_from) DO NOTHING",
                params![region, date(rate.effective_from), rate.annual_rate_percent.normalize().to_string(), ts(at)],
            )?;
            if inserted == 1 {
                return Ok(Ok(()));
            }
            let text: String = conn.query_row(
                "SELECT annual_rate_percent FROM interest_rates WHERE region = ?1 AND effective_from = ?2",
                params![region, date(rate.effective_from)],
                |row| row.get(0),
            )?;
            let stored = text.parse().map_err(|_| bad_column(0, &text))?;
            Ok(Err(InterestRate { effective_from: rate.effective_from, annual_rate_percent: stored }))
        })
        .await
    }

    async fn import_people(&self, chunk: ImportChunk<PersonImport>) -> LedgerResult<Vec<ImportVerdict>> {
        self.write(move |conn, system| import_people_sync(conn, system, chunk)).await
    }

    async fn import_contributions(&self, chunk: ImportChunk<ContributionImport>) -> LedgerResult<Vec<ImportVerdict>> {
        self.write(move |conn, _| import_contributions_sync(conn, chunk)).await
    }

    async fn import_finished(&self) -> LedgerResult<()> {
        self.write(|conn, _| conn.execute_batch("PRAGMA optimize")).await
    }

    async fn import_families(
        &self,
        chunk: ImportChunk<FamilyImport>,
        check: FamilyCheck,
    ) -> LedgerResult<Vec<ImportVerdict>> {
        self.write(move |conn, _| import_families_sync(conn, chunk, check)).await
    }
}

fn insert_key(conn: &Connection, key: &NewApiKey) -> Sql<()> {
    conn.execute(
        "INSERT INTO api_keys (key_hash, key_id, role, institution_code, label, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![key.key_hash, key.key_id, key.role.name(), key.institution_code, key.label, ts(key.at)],
    )?;
    Ok(())
}

// ---- money coming in -----------------------------------------------------------------------------

/// One crediting batch in one transaction (see [`Ledger::apply_credits`]).
fn apply_credits_sync(
    conn: &mut Connection,
    system: &HashMap<SystemAccount, AccountId>,
    batch: CreditBatch,
) -> Sql<CreditsApplied> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let business_date = date(batch.business_date);
    let at = ts(batch.at);
    let mut applied = Vec::with_capacity(batch.postings.len());
    let mut changes = Vec::new();
    // (period, kind, counterpart) → (txn, total of the personal deltas)
    let mut groups: Vec<((&str, TxnKind, SystemAccount), i64, i64)> = Vec::new();
    {
        let mut done =
            tx.prepare_cached("SELECT 1 FROM credits WHERE account_id = ?1 AND period = ?2 AND kind = ?3")?;
        let mut last_interest =
            tx.prepare_cached("SELECT MAX(period) FROM credits WHERE account_id = ?1 AND kind = 'INTEREST'")?;
        let mut update = tx.prepare_cached(
            "UPDATE accounts SET balance_fen = balance_fen + ?1, seq = seq + 1
              WHERE account_id = ?2 AND status <> 'CLOSED' AND balance_fen + ?1 >= 0
             RETURNING balance_fen, seq",
        )?;
        let mut new_txn = tx.prepare_cached(
            "INSERT INTO txns (kind, ref, at, business_date, value_date, memo) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut credit = tx.prepare_cached(
            "INSERT INTO credits (account_id, period, kind, amount_fen, txn_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut posting = tx.prepare_cached(
            "INSERT INTO postings (txn_id, account_id, amount_fen, balance_after_fen, seq, counterparty, business_date)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for line in &batch.postings {
            let period = line.period.as_str();
            let kind = line.line.kind;
            if done.exists(params![line.account_id, period, kind.name()])? {
                applied.push(false);
                continue;
            }
            if let Some(seen) = &line.interest_seen {
                let last: Option<String> = last_interest.query_row([line.account_id], |row| row.get(0))?;
                if last.unwrap_or_default() != *seen {
                    applied.push(false);
                    continue;
                }
            }
            let delta = line.line.delta().to_fen();
            let Some((balance, seq)) = update
                .query_row(params![delta, line.account_id], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))
                .optional()?
            else {
                applied.push(false);
                continue;
            };
            let key = (period, kind, line.line.counterpart);
            let txn_id = match groups.iter_mut().find(|group| group.0 == key) {
                Some(group) => {
                    group.2 += delta;
                    group.1
                }
                None => {
                    new_txn.execute(params![
                        kind.name(),
                        batch.reference,
                        at,
                        business_date,
                        date(line.value_date),
                        period
                    ])?;
                    let txn_id = tx.last_insert_rowid();
                    groups.push((key, txn_id, delta));
                    txn_id
                }
            };
            credit.execute(params![line.account_id, period, kind.name(), line.line.amount.to_fen(), txn_id])?;
            posting.execute(params![
                txn_id,
                line.account_id,
                delta,
                balance,
                seq,
                line.line.counterpart.name(),
                business_date
            ])?;
            applied.push(true);
            changes.push(BalanceChange { account_id: line.account_id, balance_after: Money::from_fen(balance), seq });
        }
    }
    {
        let writer = Writer { tx: &tx, system };
        for ((_, _, counterpart), txn_id, total) in &groups {
            let other = writer.system_posting(*counterpart, Money::from_fen(-total), "", &batch.reference);
            if writer.post(*txn_id, batch.business_date, &other)?.is_err() {
                return Err(rusqlite::Error::InvalidQuery);
            }
            writer.close_txn(*txn_id)?;
        }
    }
    tx.commit()?;
    Ok(CreditsApplied { applied, changes: last_changes(changes) })
}

// ---- bulk import ---------------------------------------------------------------------------------

fn import_contributions_sync(conn: &mut Connection, chunk: ImportChunk<ContributionImport>) -> Sql<Vec<ImportVerdict>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut verdicts = Vec::with_capacity(chunk.rows.len());
    {
        let mut person = tx.prepare_cached("SELECT category FROM persons WHERE psn_no = ?1")?;
        let mut recorded =
            tx.prepare_cached("SELECT base_fen, paid, category FROM contributions WHERE psn_no = ?1 AND period = ?2")?;
        let mut upsert = tx.prepare_cached(
            "INSERT INTO contributions (psn_no, period, base_fen, paid, category, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (psn_no, period) DO UPDATE SET base_fen = excluded.base_fen, paid = excluded.paid,
                 category = excluded.category, recorded_at = excluded.recorded_at",
        )?;
        let at = ts(chunk.at);
        for row in &chunk.rows {
            let Some(now) = person.query_row([&row.psn_no], |r| r.get::<_, String>(0)).optional()? else {
                verdicts.push(ImportVerdict::Refused(format!("unknown psn_no {}", row.psn_no)));
                continue;
            };
            let period = row.period.to_string();
            let before = recorded
                .query_row(params![row.psn_no, period], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, bool>(1)?, r.get::<_, String>(2)?))
                })
                .optional()?;
            // Given; else as recorded for the month before; else the person's now.
            let category = match (row.category, &before) {
                (Some(given), _) => given.name().to_string(),
                (None, Some((_, _, recorded))) => recorded.clone(),
                (None, None) => now,
            };
            if before == Some((row.base.to_fen(), row.paid, category.clone())) {
                verdicts.push(ImportVerdict::AlreadyThere);
                continue;
            }
            upsert.execute(params![row.psn_no, period, row.base.to_fen(), row.paid, category, at])?;
            verdicts.push(ImportVerdict::Applied);
        }
    }
    tx.commit()?;
    Ok(verdicts)
}

fn import_people_sync(
    conn: &mut Connection,
    system: &HashMap<SystemAccount, AccountId>,
    chunk: ImportChunk<PersonImport>,
) -> Sql<Vec<ImportVerdict>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut verdicts = Vec::with_capacity(chunk.rows.len());
    {
        let writer = Writer { tx: &tx, system };
        let (business_date, at) = (chunk.business_date, ts(chunk.at));
        let mut opening_txn: Option<i64> = None;
        let mut total = Money::ZERO;
        for row in &chunk.rows {
            let held = tx
                .prepare_cached(
                    "SELECT p.name, p.birth_date, p.region, p.category, p.status, o.amount_fen
                     FROM persons p LEFT JOIN imported_openings o ON o.psn_no = p.psn_no WHERE p.psn_no = ?1",
                )?
                .query_row([&row.person.psn_no], |found| {
                    Ok(ExistingImport {
                        person: PersonUpsert {
                            psn_no: row.person.psn_no.clone(),
                            name: found.get(0)?,
                            birth_date: col_date(found, 1)?,
                            region: found.get(2)?,
                            category: col_enum(found, 3, PersonCategory::parse)?,
                            status: col_enum(found, 4, InsuranceStatus::parse)?,
                        },
                        imported_opening: found.get::<_, Option<i64>>(5)?.map(Money::from_fen),
                    })
                })
                .optional()?;
            if let Some(held) = held {
                verdicts.push(held.verdict(row));
                continue;
            }
            let p = &row.person;
            tx.prepare_cached(
                "INSERT INTO persons (psn_no, name, birth_date, region, category, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            )?
            .execute(params![
                p.psn_no,
                p.name,
                date(p.birth_date),
                p.region,
                p.category.name(),
                p.status.name(),
                at
            ])?;
            if row.open_account {
                tx.prepare_cached("INSERT INTO accounts (psn_no, status, opened_at) VALUES (?1, 'OPEN', ?2)")?
                    .execute(params![p.psn_no, at])?;
                let account_id = tx.last_insert_rowid();
                let mut txn_id = None;
                if !row.opening.is_zero() {
                    let txn = match opening_txn {
                        Some(txn) => txn,
                        None => writer.new_txn(
                            TxnKind::OpeningBalance,
                            &chunk.reference,
                            business_date,
                            business_date,
                            chunk.at,
                            "bulk import",
                        )?,
                    };
                    opening_txn = Some(txn);
                    let credit = Posting {
                        account_id,
                        delta: row.opening,
                        family_use: false,
                        setl_id: "",
                        counterparty: "MIGRATION",
                    };
                    let credited = writer.post(txn, business_date, &credit)?;
                    assert!(credited.is_ok(), "a credit to a new open account is never declined");
                    total = total.checked_add(row.opening).expect("a chunk's openings fit in Money");
                    txn_id = Some(txn);
                }
                tx.prepare_cached(
                    "INSERT INTO imported_openings (psn_no, amount_fen, txn_id, imported_at) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![p.psn_no, row.opening.to_fen(), txn_id, at])?;
            }
            verdicts.push(ImportVerdict::Applied);
        }
        if let Some(txn) = opening_txn {
            let clearing = writer.system_posting(SystemAccount::MigrationClearing, total.negated(), "", "bulk import");
            let debited = writer.post(txn, business_date, &clearing)?;
            assert!(debited.is_ok(), "a system account is never declined");
            writer.close_txn(txn)?;
        }
    }
    tx.commit()?;
    Ok(verdicts)
}

fn party(conn: &Connection, psn_no: &str) -> Sql<Option<Party>> {
    conn.prepare_cached(
        "SELECT p.region, p.status, a.status FROM persons p LEFT JOIN accounts a ON a.psn_no = p.psn_no
         WHERE p.psn_no = ?1",
    )?
    .query_row([psn_no], |row| {
        Ok(Party {
            region: row.get(0)?,
            status: col_enum(row, 1, InsuranceStatus::parse)?,
            account_status: col_opt_enum(row, 2, AccountStatus::parse)?,
        })
    })
    .optional()
}

fn import_families_sync(
    conn: &mut Connection,
    chunk: ImportChunk<FamilyImport>,
    check: FamilyCheck,
) -> Sql<Vec<ImportVerdict>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut verdicts = Vec::with_capacity(chunk.rows.len());
    for row in &chunk.rows {
        let facts = FamilyFacts {
            owner: party(&tx, &row.owner_psn_no)?,
            member: party(&tx, &row.member_psn_no)?,
            active_relation: tx
                .prepare_cached(
                    "SELECT relation FROM family_links WHERE owner_psn_no = ?1 AND member_psn_no = ?2 AND revoked_at IS NULL",
                )?
                .query_row([&row.owner_psn_no, &row.member_psn_no], |found| col_enum(found, 0, Relation::parse))
                .optional()?,
            revoked_before: tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM family_links WHERE owner_psn_no = ?1 AND member_psn_no = ?2
                                    AND revoked_at IS NOT NULL)",
                )?
                .query_row([&row.owner_psn_no, &row.member_psn_no], |found| found.get(0))?,
        };
        let effective_from = match facts.judge(row, &check) {
            Ok(effective_from) => effective_from,
            Err(verdict) => {
                verdicts.push(verdict);
                continue;
            }
        };
        tx.prepare_cached(
            "INSERT INTO family_links (owner_psn_no, member_psn_no, relation, effective_from, registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            row.owner_psn_no,
            row.member_psn_no,
            row.relation.name(),
            date(effective_from),
            ts(chunk.at)
        ])?;
        tx.prepare_cached(FAMILY_ORDER_APPEND)?.execute(params![row.member_psn_no, row.owner_psn_no])?;
        verdicts.push(ImportVerdict::Applied);
    }
    tx.commit()?;
    Ok(verdicts)
}

/// A new link goes last in the member's deduction order (DESIGN §1 Paying 1: order of registration).
const FAMILY_ORDER_APPEND: &str = "INSERT OR REPLACE INTO family_order (member_psn_no, owner_psn_no, position)
     VALUES (?1, ?2, (SELECT COALESCE(MAX(position), 0) + 1 FROM family_order WHERE member_psn_no = ?1))";
