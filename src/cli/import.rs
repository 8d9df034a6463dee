//! `yibao admin import`: people, opening balances and family links from CSV straight into the ledger
//! (see `crate::import`). Unlike the other admin commands it talks to the ledger, not to a gateway:
//! it takes the same `--data-dir` / `--ledger-url` / `--config` as `yibao serve`.

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Overrides};
use crate::import::{FileKind, ImportError, Importer, Observer, Refusal, Tally, CHUNK_ROWS_DEFAULT};
use clap::{Args, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// People and opening balances: columns psn_no,name,birth_date,region,category,status,opening_balance.
    #[arg(long)]
    people: Option<PathBuf>,
    /// Family links, imported after --people: columns owner_psn_no,member_psn_no,relation (the member
    /// may draw on the owner's account).
    #[arg(long)]
    families: Option<PathBuf>,
    /// Rows per ledger transaction.
    #[arg(long, default_value_t = CHUNK_ROWS_DEFAULT)]
    chunk_rows: usize,
    #[command(flatten)]
    ledger: LedgerArgs,
}

/// `yibao admin contributions …`
#[derive(Debug, Subcommand)]
pub enum ContributionsCommand {
    /// Months' contributions from CSV straight into the ledger: columns psn_no,period,base,paid and
    /// optionally category (period YYYY-MM, paid true/false, category the person's in that month;
    /// absent or empty: as recorded for the month before, else as now). A month recorded before is
    /// replaced (a month paid later, 补缴); the next `yibao admin credit` credits what is paid. Row
    /// by row, re-runnable.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Rows per ledger transaction.
        #[arg(long, default_value_t = CHUNK_ROWS_DEFAULT)]
        chunk_rows: usize,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
}

/// Which ledger an import writes to: the same options as `yibao serve`.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// Where the SQLite ledger (ledger.db) lives, as for `yibao serve`.
    #[arg(long, env = "YIBAO_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A TOML config file, as for `yibao serve`.
    #[arg(long, env = "YIBAO_CONFIG")]
    config: Option<PathBuf>,
    /// The production ledger, `postgres://user@host:port/db` (default: SQLite in --data-dir).
    #[arg(long, env = "YIBAO_LEDGER_URL", hide_env_values = true)]
    ledger_url: Option<String>,
    /// A directory of region policy files (default: the built-in ones).
    #[arg(long, env = "YIBAO_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
}

/// Prints refused rows as `FILE:LINE: why` and a progress bar on stderr.
struct Printer {
    file: String,
    started: Instant,
    last_drawn: Option<Instant>,
    terminal: bool,
}

/// How often the progress is redrawn on a terminal, and written as a line elsewhere.
const REDRAW_INTERVAL: Duration = Duration::from_millis(200);
const LOG_INTERVAL: Duration = Duration::from_secs(10);
const BAR_WIDTH: usize = 30;

impl Printer {
    fn line(&self, tally: &Tally) -> String {
        let fraction =
            if tally.bytes_total == 0 { 1.0 } else { (tally.bytes_read as f64 / tally.bytes_total as f64).min(1.0) };
        let filled = (fraction * BAR_WIDTH as f64).round() as usize;
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{} [{}{}] {:>3.0}% {} rows, {:.0} rows/s, {} refused",
            self.file,
            "#".repeat(filled),
            "-".repeat(BAR_WIDTH - filled),
            fraction * 100.0,
            tally.rows(),
            tally.rows() as f64 / seconds,
            tally.refused
        )
    }
}

impl Observer for Printer {
    fn refused(&mut self, refusal: &Refusal) {
        let clear = if self.terminal && self.last_drawn.is_some() { "\r\x1b[2K" } else { "" };
        eprintln!("{clear}{}:{}: {}", self.file, refusal.line, refusal.message);
        self.last_drawn = None;
    }

    fn progress(&mut self, tally: &Tally) {
        let due = if self.terminal { REDRAW_INTERVAL } else { LOG_INTERVAL };
        if self.last_drawn.is_some_and(|at| at.elapsed() < due) {
            return;
        }
        if self.terminal {
            eprint!("\r\x1b[2K{}", self.line(tally));
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{}", self.line(tally));
        }
        self.last_drawn = Some(Instant::now());
    }
}

pub async fn run(args: ImportArgs) -> ExitCode {
    if args.people.is_none() && args.families.is_none() {
        eprintln!("error: nothing to import: give --people FILE and/or --families FILE");
        return ExitCode::from(2);
    }
    let files = [(FileKind::People, args.people), (FileKind::Families, args.families)];
    import_files(args.ledger, args.chunk_rows, files).await
}

pub async fn run_contributions(command: ContributionsCommand) -> ExitCode {
    let ContributionsCommand::Import { file, chunk_rows, ledger } = command;
    import_files(ledger, chunk_rows, [(FileKind::Contributions, Some(file))]).await
}

async fn import_files<const N: usize>(
    args: LedgerArgs,
    chunk_rows: usize,
    files: [(FileKind, Option<PathBuf>); N],
) -> ExitCode {
    let overrides = Overrides {
        data_dir: args.data_dir,
        config: args.config,
        policy_dir: args.policy_dir,
        ledger_url: args.ledger_url,
        ..Overrides::default()
    };
    let started = async {
        let config = Config::load(&overrides).map_err(|e| e.to_string())?;
        // A mistyped --data-dir must not quietly create an empty ledger and fill it.
        let ledger = match &config.ledger_url {
            Some(url) => crate::config::redact_url(url),
            None => {
                let path = config.data_dir.join("ledger.db");
                if !path.exists() {
                    return Err(format!(
                        "no ledger at {}: give the gateway's --data-dir (or --ledger-url); `yibao serve` creates it",
                        path.display()
                    ));
                }
                path.display().to_string()
            }
        };
        eprintln!("importing into the ledger at {ledger}");
        let policies = crate::app::load_policies(&config).map_err(|e| e.to_string())?;
        let ledger = crate::app::open_ledger(&config).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((policies, ledger))
    };
    let (policies, ledger) = match started.await {
        Ok(opened) => opened,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let clock = SystemClock;
    let importer =
        Importer { ledger, policies: Arc::new(policies), today: clock.today(), now: clock.now(), chunk_rows };
    let mut any_refused = false;
    for (kind, path) in files {
        let Some(path) = path else { continue };
        match import_file(&importer, kind, &path).await {
            Ok(tally) => any_refused |= tally.refused > 0,
            Err(error) => {
                eprintln!("error: {error}");
                eprintln!("rows committed before the error stay committed; re-run the same command to finish");
                return ExitCode::from(2);
            }
        }
    }
    if any_refused {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn import_file(importer: &Importer, kind: FileKind, path: &Path) -> Result<Tally, ImportError> {
    let file = path.display().to_string();
    let terminal = std::io::stderr().is_terminal();
    let mut printer = Printer { file: file.clone(), started: Instant::now(), last_drawn: None, terminal };
    let result = importer.import(kind, path, &mut printer).await;
    if terminal {
        eprint!("\r\x1b[2K");
    }
    let tally = result?;
    let seconds = printer.started.elapsed().as_secs_f64();
    println!(
        "{file}: {} imported, {} already there, {} refused ({} rows in {seconds:.1} s)",
        tally.applied,
        tally.already_there,
        tally.refused,
        tally.rows()
    );
    Ok(tally)
}
