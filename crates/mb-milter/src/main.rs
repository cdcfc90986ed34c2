//! mb-milter: the milter server. See the library for what it does.

use std::path::PathBuf;

use clap::Parser;

/// The Mailborder milter for Postfix (smtpd_milters = inet:127.0.0.1:10032).
#[derive(Parser)]
#[command(name = "mb-milter", version)]
struct Args {
    /// Configuration file [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log line format (overrides log.format)
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mb-milter: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(70);
        }
    };
    let code = runtime.block_on(mb_milter::main(mb_milter::Options {
        config: args.config,
        log_format: args.log_format,
    }));
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
