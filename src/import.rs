//! Bulk import (`yibao admin import`): people, their opening balances and family links from CSV,
//! straight into the ledger. This is how a region moves onto the gateway from a legacy system
//! (Hunan's move from bank-card accounts to bookkept accounts, seed 003), and how the load
//! benchmark sets up millions of accounts.
//!
//! Every row is judged on its own. A bad row is reported with its line number and nothing of it is
//! applied; the good rows around it are. A reader thread parses and validates the file while the
//! ledger writes the previous chunk (one transaction per chunk; COPY on PostgreSQL). Re-running a
//! file applies nothing twice: a person already there with the same details and the same imported
//! opening balance, or a link already registered, counts as already there; a person whose details
//! differ is refused, never overwritten (that is `AdminService.UpsertPerson`'s job).
//!
//! The balance cache needs nothing: an imported account is new, so no cache holds it yet, and
//! caches load accounts from the ledger when they first meet them.
//!
//! People files: `psn_no,name,birth_date,region,category,status,opening_balance` (a header row, any
//! column order; `status` empty = ACTIVE, `opening_balance` empty = 0.00). Family files:
//! `owner_psn_no,member_psn_no,relation` — the member may draw on the owner's account.
//! Contribution files (`yibao admin contributions import`): `psn_no,period,base,paid[,category]` — a
//! month's contribution base, whether it was paid in full, and what the person was that month
//! (column absent or empty: as recorded for that month before, else what the person is now), which
//! the next crediting run credits.

use crate::domain::credit::Period;
use crate::domain::family::link_refusal;
use crate::domain::policy::Policies;
use crate::domain::{is_psn_no, is_region_code, InsuranceStatus, Money, PersonCategory, Relation};
use crate::ledger::{
    ContributionImport, FamilyCheck, FamilyImport, ImportChunk, ImportVerdict, Ledger, LedgerUnavailable, PersonImport,
    PersonUpsert,
};
use chrono::{DateTime, NaiveDate, Utc};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows per ledger transaction unless told otherwise.
pub const CHUNK_ROWS_DEFAULT: usize = 20_000;
/// Chunks parsed ahead of the ledger: bounds the reader's memory.
const CHUNKS_AHEAD_MAX: usize = 2;
/// Rows per ledger transaction at most, whatever `--chunk-rows` says.
pub const CHUNK_ROWS_MAX: usize = 1_000_000;
/// Rows in a row that are not UTF-8, before any good one, that stop the import.
const NOT_UTF8_ROWS_MAX: u64 = 100;
/// Longest name accepted, in characters.
const NAME_CHARS_MAX: usize = 100;

pub const PEOPLE_COLUMNS: &[&str] =
    &["psn_no", "name", "birth_date", "region", "category", "status", "opening_balance"];
pub const FAMILY_COLUMNS: &[&str] = &["owner_psn_no", "member_psn_no", "relation"];
pub const CONTRIBUTION_COLUMNS: &[&str] = &["psn_no", "period", "base", "paid", "category"];

/// Which kind of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    People,
    Families,
    Contributions,
}

/// A problem with the whole file (it cannot be read, its header is wrong) or with the ledger: the
/// import stops. Chunks committed before it stay committed, and a re-run picks up the rest.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Ledger(#[from] LedgerUnavailable),
}

/// A row that was refused, with its line in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub line: u64,
    pub message: String,
}

/// Where an import stands; sent after every chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub applied: u64,
    pub already_there: u64,
    pub refused: u64,
    /// Bytes of the file read so far, and its size: the progress bar.
    pub bytes_read: u64,
    pub bytes_total: u64,
}

impl Tally {
    pub fn rows(&self) -> u64 {
        self.applied + self.already_there + self.refused
    }

    fn count(&mut self, verdict: &ImportVerdict) {
        match verdict {
            ImportVerdict::Applied => self.applied += 1,
            ImportVerdict::AlreadyThere => self.already_there += 1,
            ImportVerdict::Refused(_) => self.refused += 1,
        }
    }
}

/// What the import reports as it goes: refused rows, and the tally after each chunk.
pub trait Observer: Send {
    fn refused(&mut self, refusal: &Refusal);
    fn progress(&mut self, tally: &Tally);
}

/// The import's inputs besides the file.
pub struct Importer {
    pub ledger: Arc<dyn Ledger>,
    pub policies: Arc<Policies>,
    pub today: NaiveDate,
    pub now: DateTime<Utc>,
    pub chunk_rows: usize,
}

/// One chunk as the reader thread hands it over: rows valid on their own, and rows already refused.
struct Parsed<T> {
    rows: Vec<T>,
    refused: Vec<Refusal>,
    /// Rows whose key (a person, an owner and member pair) an earlier row of the chunk has.
    repeats: Vec<Repeat>,
    bytes_read: u64,
}

/// A row repeating an earlier row's key in the same chunk. (Across chunks the ledger judges it.)
struct Repeat {
    line: u64,
    first_line: u64,
    /// Same content as the first: counted as already there; otherwise refused.
    same: bool,
}

impl Importer {
    pub async fn import(&self, kind: FileKind, path: &Path, observer: &mut dyn Observer) -> Result<Tally, ImportError> {
        let tally = match kind {
            FileKind::People => self.import_people(path, observer).await?,
            FileKind::Families => self.import_families(path, observer).await?,
            FileKind::Contributions => self.import_contributions(path, observer).await?,
        };
        self.ledger.import_finished().await?;
        Ok(tally)
    }

    async fn import_people(&self, path: &Path, observer: &mut dyn Observer) -> Result<Tally, ImportError> {
        let policies = self.policies.clone();
        let today = self.today;
        let chunks = read_chunks(
            path.to_path_buf(),
            PEOPLE_COLUMNS,
            &[],
            self.chunk_rows,
            move |line, fields| person_row(line, fields, &policies, today),
            |row: &PersonImport| row.person.psn_no.clone(),
            |a, b| a.person == b.person && a.opening == b.opening,
        )?;
        self.apply(path, observer, chunks, |chunk| self.ledger.import_people(chunk)).await
    }

    /// Hands each parsed chunk's valid rows to `write` (one ledger transaction) and reports.
    async fn apply<T: Lined, F>(
        &self,
        path: &Path,
        observer: &mut dyn Observer,
        (mut chunks, bytes_total, reader): Chunks<T>,
        write: impl Fn(ImportChunk<T>) -> F,
    ) -> Result<Tally, ImportError>
    where
        F: std::future::Future<Output = Result<Vec<ImportVerdict>, LedgerUnavailable>>,
    {
        let mut tally = Tally { bytes_total, ..Tally::default() };
        while let Some(mut parsed) = chunks.recv().await {
            let reference = chunk_reference(path, &parsed.rows);
            let lines: Vec<u64> = parsed.rows.iter().map(Lined::line).collect();
            let rows = std::mem::take(&mut parsed.rows);
            let chunk = ImportChunk { rows, at: self.now, business_date: self.today, reference };
            // A chunk of refused rows only still reports; it need not lock anything.
            let verdicts = if chunk.rows.is_empty() { Vec::new() } else { write(chunk).await? };
            report(&mut tally, observer, &lines, verdicts, parsed);
        }
        finish(reader, path).await?;
        Ok(tally)
    }

    async fn import_contributions(&self, path: &Path, observer: &mut dyn Observer) -> Result<Tally, ImportError> {
        let today = self.today;
        let chunks = read_chunks(
            path.to_path_buf(),
            CONTRIBUTION_COLUMNS,
            &["category"],
            self.chunk_rows,
            move |line, fields| contribution_row(line, fields, today),
            |row: &ContributionImport| format!("{}/{}", row.psn_no, row.period),
            |a, b| a.base == b.base && a.paid == b.paid && a.category == b.category,
        )?;
        self.apply(path, observer, chunks, |chunk| self.ledger.import_contributions(chunk)).await
    }

    async fn import_families(&self, path: &Path, observer: &mut dyn Observer) -> Result<Tally, ImportError> {
        let chunks = read_chunks(
            path.to_path_buf(),
            FAMILY_COLUMNS,
            &[],
            self.chunk_rows,
            family_row,
            |row: &FamilyImport| format!("{}/{}", row.owner_psn_no, row.member_psn_no),
            |a, b| a.relation == b.relation,
        )?;
        let (policies, today) = (self.policies.clone(), self.today);
        let check: FamilyCheck = Arc::new(move |row, facts| {
            let owner = facts.owner.as_ref().ok_or_else(|| format!("unknown owner_psn_no {}", row.owner_psn_no))?;
            let member = facts.member.as_ref().ok_or_else(|| format!("unknown member_psn_no {}", row.member_psn_no))?;
            let policy = policies
                .region(&owner.region)
                .ok_or_else(|| format!("the owner's region {} has no policy file loaded", owner.region))?;
            match link_refusal(owner, member, row.relation, policy) {
                Some(refusal) => Err(refusal.message(row.relation, &policy.region)),
                None => Ok(today.max(policy.family_start_date)),
            }
        });
        self.apply(path, observer, chunks, |chunk| self.ledger.import_families(chunk, check.clone())).await
    }
}

/// Line numbers of a row, for the chunk's reference in the ledger.
trait Lined {
    fn line(&self) -> u64;
}
impl Lined for PersonImport {
    fn line(&self) -> u64 {
        self.line
    }
}
impl Lined for ContributionImport {
    fn line(&self) -> u64 {
        self.line
    }
}
impl Lined for FamilyImport {
    fn line(&self) -> u64 {
        self.line
    }
}

fn chunk_reference<T: Lined>(path: &Path, rows: &[T]) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let first = rows.first().map(Lined::line).unwrap_or(0);
    let last = rows.last().map(Lined::line).unwrap_or(0);
    format!("import:{name}:{first}-{last}")
}

/// Counts a committed chunk's verdicts and reports its refusals in line order.
fn report<T>(
    tally: &mut Tally,
    observer: &mut dyn Observer,
    lines: &[u64],
    verdicts: Vec<ImportVerdict>,
    parsed: Parsed<T>,
) {
    assert_eq!(lines.len(), verdicts.len(), "one verdict per row");
    let mut refused = parsed.refused;
    tally.refused += refused.len() as u64;
    for verdict in &verdicts {
        tally.count(verdict);
    }
    let verdict_of: HashMap<u64, ImportVerdict> = lines.iter().copied().zip(verdicts).collect();
    for repeat in parsed.repeats {
        let message = match verdict_of.get(&repeat.first_line) {
            _ if !repeat.same => format!("repeats the key of line {} with other content", repeat.first_line),
            Some(ImportVerdict::Refused(message)) => format!("same as line {}, refused: {message}", repeat.first_line),
            _ => {
                tally.already_there += 1;
                continue;
            }
        };
        tally.refused += 1;
        refused.push(Refusal { line: repeat.line, message });
    }
    for (line, verdict) in verdict_of {
        if let ImportVerdict::Refused(message) = verdict {
            refused.push(Refusal { line, message });
        }
    }
    refused.sort_by_key(|r| r.line);
    for refusal in &refused {
        observer.refused(refusal);
    }
    tally.bytes_read = parsed.bytes_read;
    observer.progress(tally);
}

type ReaderHandle = tokio::task::JoinHandle<Result<(), String>>;
/// What [`read_chunks`] starts: the chunks as they are parsed, the file's size, the reader.
type Chunks<T> = (tokio::sync::mpsc::Receiver<Parsed<T>>, u64, ReaderHandle);

/// The reader's own failure (the file could not be read to the end), once its channel closed.
async fn finish(reader: ReaderHandle, path: &Path) -> Result<(), ImportError> {
    let file_error = |message: String| ImportError::File { path: path.display().to_string(), message };
    match reader.await {
        Ok(result) => result.map_err(file_error),
        Err(error) => Err(file_error(error.to_string())),
    }
}

/// Starts the reader thread: parses `path` (its header must hold `columns`, those in `optional` may
/// be left out, and nothing else), validates each
/// row with `parse`, and hands over chunks of `chunk_rows`. Also returns the file's size.
fn read_chunks<T: Send + 'static>(
    path: PathBuf,
    columns: &'static [&'static str],
    optional: &'static [&'static str],
    chunk_rows: usize,
    parse: impl Fn(u64, &HashMap<&str, &str>) -> Result<T, String> + Send + 'static,
    key: impl Fn(&T) -> String + Send + 'static,
    same: impl Fn(&T, &T) -> bool + Send + 'static,
) -> Result<Chunks<T>, ImportError> {
    let file_error = |message: String| ImportError::File { path: path.display().to_string(), message };
    let file = std::fs::File::open(&path).map_err(|e| file_error(e.to_string()))?;
    let bytes_total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).trim(csv::Trim::All).from_reader(file);
    let header: Vec<String> =
        reader.headers().map_err(|e| file_error(format!("header: {e}")))?.iter().map(str::to_string).collect();
    if header.iter().all(String::is_empty) {
        return Err(file_error(format!(
            "the file is empty; the first line must name the columns {}",
            columns.join(",")
        )));
    }
    for (index, name) in header.iter().enumerate() {
        if header[..index].contains(name) {
            return Err(file_error(format!("column {name:?} appears twice in the header")));
        }
        if !columns.contains(&name.as_str()) {
            return Err(file_error(format!("unknown column {name:?}; the columns are {}", columns.join(","))));
        }
    }
    for column in columns.iter().filter(|column| !optional.contains(column)) {
        if !header.iter().any(|name| name == column) {
            return Err(file_error(format!("missing column {column:?}; the columns are {}", columns.join(","))));
        }
    }
    let chunk_rows = chunk_rows.clamp(1, CHUNK_ROWS_MAX);
    let mut lines = LineCounter::open(&path).map_err(|e| file_error(e.to_string()))?;
    let (sender, receiver) = tokio::sync::mpsc::channel(CHUNKS_AHEAD_MAX);
    let handle = tokio::task::spawn_blocking(move || {
        let mut record = csv::StringRecord::new();
        let mut accepted: u64 = 0;
        let mut not_utf8: u64 = 0;
        let fresh =
            || Parsed { rows: Vec::with_capacity(chunk_rows), refused: Vec::new(), repeats: Vec::new(), bytes_read: 0 };
        let mut parsed = fresh();
        // Key → (index in the chunk, line) of the first row with it.
        let mut seen: HashMap<String, (usize, u64)> = HashMap::new();
        loop {
            let read = reader.read_record(&mut record);
            let start = match &read {
                Ok(_) => record.position().map(|p| p.byte()),
                Err(error) => error.position().map(|p| p.byte()),
            };
            let line = lines.line_at(start.unwrap_or(0)).map_err(|e| format!("cannot read the file: {e}"))?;
            match read {
                Ok(false) => break,
                Ok(true) if record.len() != header.len() => parsed.refused.push(Refusal {
                    line,
                    message: format!("{} field(s); the header has {}", record.len(), header.len()),
                }),
                Ok(true) => {
                    accepted += 1;
                    let fields: HashMap<&str, &str> = header.iter().map(String::as_str).zip(record.iter()).collect();
                    match parse(line, &fields) {
                        Ok(row) => {
                            let row_key = key(&row);
                            match seen.get(&row_key) {
                                Some(&(index, first_line)) => {
                                    let same = same(&parsed.rows[index], &row);
                                    parsed.repeats.push(Repeat { line, first_line, same });
                                }
                                None => {
                                    seen.insert(row_key, (parsed.rows.len(), line));
                                    parsed.rows.push(row);
                                }
                            }
                        }
                        Err(message) => parsed.refused.push(Refusal { line, message }),
                    }
                }
                Err(error) => {
                    if matches!(error.kind(), csv::ErrorKind::Io(_)) {
                        return Err(format!("line {line}: {error}"));
                    }
                    if matches!(error.kind(), csv::ErrorKind::Utf8 { .. }) {
                        not_utf8 += 1;
                        // A legacy export in GBK fails on every row: say so once instead.
                        if accepted == 0 && not_utf8 >= NOT_UTF8_ROWS_MAX {
                            return Err(format!(
                                "the first {not_utf8} rows are not UTF-8; convert the file first (for GBK: iconv -f GBK -t UTF-8)"
                            ));
                        }
                    }
                    parsed.refused.push(Refusal { line, message: format!("not readable as CSV: {error}") });
                }
            }
            if parsed.rows.len() + parsed.refused.len() >= chunk_rows {
                parsed.bytes_read = reader.position().byte();
                seen.clear();
                if sender.blocking_send(std::mem::replace(&mut parsed, fresh())).is_err() {
                    return Ok(());
                }
            }
        }
        parsed.bytes_read = reader.position().byte();
        let _ = sender.blocking_send(parsed);
        Ok(())
    });
    Ok((receiver, bytes_total, handle))
}

/// Line numbers as an editor shows them (a line ends at `\n`, `\r\n` or a lone `\r`), for the byte
/// offset where the csv reader says a record begins. The csv crate's own line count is off by one
/// for CRLF files (Excel's exports) and after blank lines, because it records a position before it
/// skips the previous line's terminator; so this reads the file a second time, forward only.
struct LineCounter {
    reader: std::io::BufReader<std::fs::File>,
    offset: u64,
    line: u64,
    after_cr: bool,
}

impl LineCounter {
    fn open(path: &Path) -> std::io::Result<LineCounter> {
        let reader = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path)?);
        Ok(LineCounter { reader, offset: 0, line: 1, after_cr: false })
    }

    /// The line on which the record csv places at `byte` really starts: skips the terminators and
    /// blank lines between `byte` and the record's first character. Offsets only grow.
    fn line_at(&mut self, byte: u64) -> std::io::Result<u64> {
        use std::io::BufRead;
        loop {
            let buffer = self.reader.fill_buf()?;
            if buffer.is_empty() {
                return Ok(self.line);
            }
            let mut used = 0;
            for &b in buffer {
                if self.offset >= byte && b != b'\n' && b != b'\r' {
                    break;
                }
                match b {
                    b'\n' if self.after_cr => self.after_cr = false,
                    b'\n' => self.line += 1,
                    b'\r' => {
                        self.line += 1;
                        self.after_cr = true;
                    }
                    _ => self.after_cr = false,
                }
                self.offset += 1;
                used += 1;
            }
            let done = used < buffer.len();
            self.reader.consume(used);
            if done {
                return Ok(self.line);
            }
        }
    }
}

// ---- one row ---------------------------------------------------------------------------------------

fn field<'a>(fields: &HashMap<&str, &'a str>, name: &str) -> &'a str {
    fields.get(name).copied().unwrap_or("")
}

fn checked_psn_no(fields: &HashMap<&str, &str>, name: &str) -> Result<String, String> {
    let value = field(fields, name);
    if !is_psn_no(value) {
        return Err(format!("{name}: {value:?} is not a person number (1–30 letters and digits)"));
    }
    Ok(value.to_string())
}

/// Enum values as the API names them, in any case: `employee`, `EMPLOYEE`.
fn named<T>(
    fields: &HashMap<&str, &str>,
    name: &str,
    parse: fn(&str) -> Option<T>,
    choices: &[&str],
) -> Result<T, String> {
    let value = field(fields, name);
    parse(&value.to_ascii_uppercase()).ok_or_else(|| format!("{name}: {value:?} is not one of {}", choices.join(", ")))
}

/// A person row, checked against the file and policy alone (the ledger judges the rest).
fn person_row(
    line: u64,
    fields: &HashMap<&str, &str>,
    policies: &Policies,
    today: NaiveDate,
) -> Result<PersonImport, String> {
    let psn_no = checked_psn_no(fields, "psn_no")?;
    let name = field(fields, "name");
    if name.is_empty() || name.chars().count() > NAME_CHARS_MAX || name.chars().any(char::is_control) {
        return Err(format!("name: must be 1–{NAME_CHARS_MAX} characters without control characters"));
    }
    let birth_text = field(fields, "birth_date");
    let birth_date = NaiveDate::parse_from_str(birth_text, "%Y-%m-%d")
        .ok()
        .filter(|_| birth_text.len() == 10)
        .ok_or_else(|| format!("birth_date: {birth_text:?} is not a date YYYY-MM-DD"))?;
    if birth_date > today {
        return Err(format!("birth_date: {birth_date} is in the future"));
    }
    let region = field(fields, "region");
    if !is_region_code(region) {
        return Err(format!("region: {region:?} is not a 6-digit region code"));
    }
    let policy = policies.region(region).ok_or_else(|| format!("region: {region} has no policy file loaded"))?;
    let categories: Vec<&str> = PersonCategory::ALL.iter().map(|c| c.name()).collect();
    let category = named(fields, "category", PersonCategory::parse, &categories)?;
    let statuses: Vec<&str> = InsuranceStatus::ALL.iter().map(|s| s.name()).collect();
    let status = match field(fields, "status") {
        "" => InsuranceStatus::Active,
        _ => named(fields, "status", InsuranceStatus::parse, &statuses)?,
    };
    let opening = match field(fields, "opening_balance") {
        "" => Money::ZERO,
        text => Money::parse(text).map_err(|e| format!("opening_balance: {text:?} {e}"))?,
    };
    let open_account = policy.has_account(category);
    if !open_account && !opening.is_zero() {
        return Err(format!(
            "opening_balance: {category} has no personal account in region {region}; {opening} has nowhere to go"
        ));
    }
    let person =
        PersonUpsert { psn_no, name: name.to_string(), birth_date, region: region.to_string(), category, status };
    Ok(PersonImport { line, person, open_account, opening })
}

fn family_row(line: u64, fields: &HashMap<&str, &str>) -> Result<FamilyImport, String> {
    let owner_psn_no = checked_psn_no(fields, "owner_psn_no")?;
    let member_psn_no = checked_psn_no(fields, "member_psn_no")?;
    if owner_psn_no == member_psn_no {
        return Err("member_psn_no: must differ from owner_psn_no".into());
    }
    let choices: Vec<&str> = Relation::ALL.iter().map(|r| r.name()).collect();
    let relation = named(fields, "relation", Relation::parse, &choices)?;
    Ok(FamilyImport { line, owner_psn_no, member_psn_no, relation })
}

/// A contribution row: a month that has begun, a base (0 allowed for a month not paid), whether the
/// month was paid in full (`true`/`false`, `1`/`0`, `yes`/`no`) and the person's category that
/// month (empty: as now).
fn contribution_row(line: u64, fields: &HashMap<&str, &str>, today: NaiveDate) -> Result<ContributionImport, String> {
    let psn_no = checked_psn_no(fields, "psn_no")?;
    let text = field(fields, "period");
    let period = Period::parse(text).ok_or_else(|| format!("period: {text:?} is not a month YYYY-MM"))?;
    if period > Period::of(today) {
        return Err(format!("period: {period} is in the future"));
    }
    let text = field(fields, "base");
    let base = Money::parse(text).map_err(|e| format!("base: {text:?} {e}"))?;
    let paid = match field(fields, "paid").to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => true,
        "false" | "0" | "no" => false,
        other => return Err(format!("paid: {other:?} is not true or false")),
    };
    let category = match field(fields, "category") {
        "" => None,
        _ => {
            let categories: Vec<&str> = PersonCategory::ALL.iter().map(|c| c.name()).collect();
            Some(named(fields, "category", PersonCategory::parse, &categories)?)
        }
    };
    Ok(ContributionImport { line, psn_no, period, base, paid, category })
}
