//! `yibao bench`: the load generator and its baselines (see BENCHMARKS.md and scripts/bench.sh).

use crate::loadgen::{self, baseline, LoadOptions, Population, Report};
use crate::pin::PinCost;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Open-loop settlements against a running gateway (sets up its population first). With
    /// --step-to, steps the rate up to find the highest rate that meets --p99-target-ms with no errors.
    Run(RunArgs),
    /// Writes a population as people.csv and families.csv for `yibao admin import` (then run with
    /// --imported): how millions of accounts are set up.
    Population {
        /// Funded accounts (plus a tenth as many family payers).
        #[arg(long, default_value_t = 100_000)]
        accounts: usize,
        #[arg(long, default_value = "BN")]
        prefix: String,
        /// Directory for the two files.
        #[arg(long)]
        dir: PathBuf,
    },
    /// The same load against an in-process no-op Settle: the framework's ceiling.
    Noop(LoadArgs),
    /// argon2id PIN verifications per second.
    Argon2 {
        #[arg(long, default_value_t = 19456)]
        memory_kib: u32,
        #[arg(long, default_value_t = 2)]
        passes: u32,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Offered rate, settlements per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Share of traffic on the hottest 1% of accounts.
    #[arg(long, default_value_t = 0.0)]
    hot_share: f64,
    /// Share paying by card + PIN.
    #[arg(long, default_value_t = 0.0)]
    pin_share: f64,
    /// Share by payers drawing on 1–3 family accounts.
    #[arg(long, default_value_t = 0.0)]
    family_share: f64,
    #[arg(long, default_value = "1.23")]
    amount: String,
    /// A name for the report.
    #[arg(long, default_value = "run")]
    scenario: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Requests in flight at most (beyond it: CLIENT_OVERLOAD errors).
    #[arg(long, default_value_t = 20_000)]
    in_flight_max: usize,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(long, env = "YIBAO_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// An operator key, to set the population up.
    #[arg(long, env = "YIBAO_OPERATOR_KEY", hide_env_values = true)]
    operator_key: String,
    /// Funded accounts in the population.
    #[arg(long, default_value_t = 100_000)]
    accounts: usize,
    /// Person-number prefix of the population; reuse one to skip most set-up work.
    #[arg(long, default_value = "BN")]
    prefix: String,
    /// The population's people, balances and families were loaded with `yibao bench population`
    /// and `yibao admin import`: set up only PINs and the institution.
    #[arg(long)]
    imported: bool,
    /// Scenario (e): after --rate, run again at --rate + --step-by, … up to this rate, stopping at
    /// the first run whose p99 exceeds --p99-target-ms or that has errors.
    #[arg(long)]
    step_to: Option<f64>,
    #[arg(long, default_value_t = 500.0)]
    step_by: f64,
    #[arg(long, default_value_t = 20.0)]
    p99_target_ms: f64,
    /// After the run, check the books of the hottest 1% of accounts: each fell by exactly what
    /// the run's settlements drew from it (requests answered with an error looked up by their
    /// ids), none negative. A failed audit fails the command.
    #[arg(long)]
    audit: bool,
    #[command(flatten)]
    load: LoadArgs,
}

fn options(load: &LoadArgs, server: String, audit: bool) -> LoadOptions {
    LoadOptions {
        server,
        rate: load.rate,
        duration: Duration::from_secs(load.seconds),
        connections: load.connections,
        hot_share: load.hot_share,
        pin_share: load.pin_share,
        family_share: load.family_share,
        amount: load.amount.clone(),
        // Request ids are `<run_id>-<n>`: from any scenario name, only what a request id may hold.
        run_id: format!(
            "{}{}",
            load.scenario
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .take(32)
                .collect::<String>(),
            chrono::Utc::now().format("%H%M%S%3f")
        ),
        in_flight_max: load.in_flight_max,
        audit,
    }
}

fn publish(report: &Report, json: &Option<PathBuf>) -> ExitCode {
    println!("{}", report.summary_line());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report).unwrap_or_default();
        if let Err(error) = std::fs::write(path, text) {
            eprintln!("error: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    match &report.audit {
        Some(audit) if !audit.passed() => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

pub async fn run(command: BenchCommand) -> ExitCode {
    let outcome = match command {
        BenchCommand::Run(args) => {
            let options = options(&args.load, args.server.clone(), args.audit);
            let channel = match loadgen::connect(&args.server, 1).await {
                Ok(mut channels) => channels.remove(0),
                Err(message) => return fail(&message),
            };
            let setup = loadgen::setup(
                channel,
                &args.operator_key,
                &args.prefix,
                args.accounts,
                &options.run_id,
                args.imported,
            );
            let population = match setup.await {
                Ok(population) => population,
                Err(message) => return fail(&message),
            };
            match args.step_to {
                None => loadgen::run(&args.load.scenario, &options, &population)
                    .await
                    .map(|report| publish(&report, &args.load.json)),
                Some(step_to) => step_up(&args, options, &population, step_to).await,
            }
        }
        BenchCommand::Population { accounts, prefix, dir } => loadgen::write_population(&prefix, accounts, &dir)
            .map(|()| {
                println!("wrote {} and {}", dir.join("people.csv").display(), dir.join("families.csv").display());
                ExitCode::SUCCESS
            })
            .map_err(|error| format!("cannot write the population to {}: {error}", dir.display())),
        BenchCommand::Noop(load) => {
            let address = match baseline::spawn_noop_server().await {
                Ok(address) => address,
                Err(message) => return fail(&message),
            };
            let options = options(&load, format!("http://{address}"), false);
            let population = Population {
                institution_key: "noop".into(),
                payers: (0..1000).map(|i| format!("N{i:08}")).collect(),
                family_payers: Vec::new(),
                pin_payers: Vec::new(),
            };
            loadgen::run(&load.scenario, &options, &population).await.map(|report| publish(&report, &load.json))
        }
        BenchCommand::Argon2 { memory_kib, passes, threads, seconds } => {
            let cost = PinCost { memory_kib, passes };
            baseline::argon2_rate(cost, threads, Duration::from_secs(seconds)).await.map(|rate| {
                println!("argon2id m={memory_kib}KiB t={passes} threads={threads}: {rate:.1} verifications/s");
                ExitCode::SUCCESS
            })
        }
    };
    outcome.unwrap_or_else(|message| fail(&message))
}

/// Scenario (e): the highest offered rate whose p99 meets the target with no errors, stepping up.
async fn step_up(
    args: &RunArgs,
    mut options: LoadOptions,
    population: &Population,
    step_to: f64,
) -> Result<ExitCode, String> {
    let mut reports = Vec::new();
    let mut best: Option<f64> = None;
    let mut rate = args.load.rate;
    // Request ids stay unique across the steps.
    let base_run_id = options.run_id.clone();
    while rate <= step_to {
        options.rate = rate;
        options.run_id = format!("{base_run_id}s{rate:.0}");
        let scenario = format!("{}@{rate:.0}", args.load.scenario);
        let report = loadgen::run(&scenario, &options, population).await?;
        println!("{}", report.summary_line());
        let books_ok = report.audit.as_ref().is_none_or(|audit| audit.passed());
        let met = report.errors.is_empty() && report.p99_ms <= args.p99_target_ms && books_ok;
        reports.push(report);
        if !met {
            break;
        }
        best = Some(rate);
        rate += args.step_by.max(1.0);
    }
    match best {
        Some(rate) => println!(
            "{}: highest rate with p99 <= {} ms and no errors: {rate:.0}/s",
            args.load.scenario, args.p99_target_ms
        ),
        None => println!(
            "{}: no rate from {:.0}/s met p99 <= {} ms with no errors",
            args.load.scenario, args.load.rate, args.p99_target_ms
        ),
    }
    if let Some(path) = &args.load.json {
        let text = serde_json::json!({ "scenario": args.load.scenario, "p99_target_ms": args.p99_target_ms,
            "highest_rate_meeting_target": best, "steps": reports });
        std::fs::write(path, serde_json::to_string_pretty(&text).unwrap_or_default())
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    }
    let audit_failed = reports.iter().any(|report| report.audit.as_ref().is_some_and(|audit| !audit.passed()));
    Ok(if audit_failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}
