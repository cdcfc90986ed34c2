//! mb-filter: one scanning worker. See the library for what it does.

use std::path::PathBuf;

use clap::Parser;

/// A Mailborder scanning worker (Filter.Scan on mb-filter-N.sock).
#[derive(Parser)]
#[command(name = "mb-filter", version)]
struct Args {
    /// Configuration file [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log line format (overrides log.format)
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Worker number: serves mb-filter-N.sock (systemd: mb-filter@N)
    #[arg(long, visible_alias = "worker", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    instance: u32,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mb-filter: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(70);
        }
    };
    let code = runtime.block_on(mb_filter::main(mb_filter::Options {
        config: args.config,
        log_format: args.log_format,
        instance: args.instance,
    }));
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
