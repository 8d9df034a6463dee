//! The command line: `yibao serve` runs the gateway; every other subcommand is a gRPC client for
//! people at a terminal (a HIS engineer trying a settlement, an operator at a window).

mod bench;
mod client;
mod import;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "yibao",
    version,
    about = "Payment gateway for employee medical insurance personal accounts (职工医保个人账户)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (embedded default: SQLite ledger, in-process balances).
    Serve(serve::ServeArgs),
    /// Load benchmark: open-loop settlements, and the baselines (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    #[command(flatten)]
    Client(client::ClientCommand),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(args)),
        Command::Bench(command) => runtime.block_on(bench::run(command)),
        Command::Client(command) => runtime.block_on(client::run(command)),
    }
}
