//! `yibao serve`.

use crate::app;
use crate::clock::SystemClock;
use crate::config::{Config, Overrides};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "YIBAO_LISTEN")]
    listen: Option<String>,
    /// Where the SQLite ledger (ledger.db) and the generated PIN pepper live.
    #[arg(long, env = "YIBAO_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A TOML config file (see deploy/yibao.example.toml).
    #[arg(long, env = "YIBAO_CONFIG")]
    config: Option<PathBuf>,
    /// The production ledger, `postgres://user@host:port/db` (default: SQLite in --data-dir).
    #[arg(long, env = "YIBAO_LEDGER_URL", hide_env_values = true)]
    ledger_url: Option<String>,
    /// The production balance cache, `redis://host:port/db`; comma-separated URLs for a cluster
    /// (default: balances in process).
    #[arg(long, env = "YIBAO_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// A directory of region policy files (default: the built-in config/policy/*.toml).
    #[arg(long, env = "YIBAO_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// Seed demo people, a family and an institution, and print a first client command.
    #[arg(long)]
    demo: bool,
}

pub async fn run(args: ServeArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("YIBAO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        config: args.config,
        policy_dir: args.policy_dir,
        ledger_url: args.ledger_url,
        redis_url: args.redis_url,
    };
    let mut config = match Config::load(&overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let mut demo_operator_key = None;
    if args.demo && config.operator_key.is_none() {
        let key = crate::admin::new_api_key();
        config.operator_key = Some(key.clone());
        demo_operator_key = Some(key);
    }
    if config.operator_key.is_none() {
        tracing::warn!("no operator key: set YIBAO_OPERATOR_KEY (or operator_key_file) to administer the gateway");
    }
    let app = match app::build(&config, Arc::new(SystemClock)).await {
        Ok(app) => app,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot listen on {}: {error}", config.listen);
            return ExitCode::from(2);
        }
    };
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let ledger = config
        .ledger_url
        .as_deref()
        .map(crate::config::redact_url)
        .unwrap_or_else(|| format!("SQLite in {}", config.data_dir.display()));
    let balances = config.redis_url.as_deref().map(crate::config::redact_url).unwrap_or_else(|| "in process".into());
    tracing::info!(%address, %ledger, %balances, "yibao gateway listening");
    if args.demo {
        match crate::demo::seed(&app.gateway).await {
            Ok(institution_key) => print_demo(&address, &institution_key, demo_operator_key.as_deref()),
            Err(failure) => {
                eprintln!("error: demo seeding failed: {failure}");
                return ExitCode::FAILURE;
            }
        }
    }
    let gateway = app.gateway.clone();
    let result = app::serve(app, listener, shutdown_signal()).await;
    // In-flight calls are done; every acknowledged write was committed (synchronous=FULL). What
    // they left behind (request claims to end, unknown commits to find out) gets a moment more.
    let left = gateway.background.drain(std::time::Duration::from_secs(10)).await;
    if left > 0 {
        tracing::warn!(left, "stopping with work after answers unfinished; claims run out, the sweeper settles holds");
    }
    drop(gateway);
    match result {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn print_demo(address: &str, institution_key: &str, operator_key: Option<&str>) {
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "yibao".into());
    let server = format!("http://{address}");
    println!();
    println!("Demo data is ready (region 110000 Beijing): D1001 pays; spouse D1002 and father D1003 share their accounts with D1001.");
    println!("Institution {} key: {institution_key}", crate::demo::INSTITUTION_CODE);
    if let Some(key) = operator_key {
        println!("Operator key (this run only; set YIBAO_OPERATOR_KEY to keep one): {key}");
    }
    println!();
    println!("Try a settlement of 200.00 by e-voucher (D1001 holds 120.00, the rest comes from the spouse):");
    println!("  {exe} settle --server {server} --key {institution_key} --psn-no D1001 --amount 200.00 --channel e-voucher --category outpatient --ec-token demo");
    println!("Then look at the balance:");
    println!("  {exe} balance --server {server} --key {institution_key} --psn-no D1001");
    println!();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: no new calls; finishing those in flight");
}
