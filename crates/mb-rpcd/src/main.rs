//! mb-rpcd: the control daemon. See the library for what it does.

use std::path::PathBuf;

use clap::Parser;

/// The Mailborder control daemon: configuration store, message log and status hub.
#[derive(Parser)]
#[command(name = "mb-rpcd", version)]
struct Args {
    /// Configuration file [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log line format (overrides log.format)
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Check the configuration and the database, then exit
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mb-rpcd: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(70);
        }
    };
    let code = runtime.block_on(mb_rpcd::main(mb_rpcd::Options {
        config: args.config,
        log_format: args.log_format,
        check: args.check,
    }));
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
