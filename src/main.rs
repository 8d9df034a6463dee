//! The `yibao` binary: `yibao serve` runs the gateway; the other subcommands are its client.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    yibao::cli::main()
}
