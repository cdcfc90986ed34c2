//! mb-milter: the milter server. See the library for what it does.

use clap::Parser;

/// The Mailborder milter for Postfix (smtpd_milters = inet:127.0.0.1:10032).
#[derive(Parser)]
#[command(name = "mb-milter", version)]
struct Args {
    #[command(flatten)]
    flags: mb_runtime::daemon::Flags,
}

fn main() -> std::process::ExitCode {
    mb_runtime::daemon::main(mb_milter::Milter, mb_runtime::docs::parse::<Args>().flags)
}
