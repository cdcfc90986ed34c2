//! mb-smtpd: the SMTP server. See the library for what it does.

use clap::Parser;

/// The Mailborder SMTP server (ports 25, 587, 465 and local reinjection).
#[derive(Parser)]
#[command(name = "mb-smtpd", version)]
struct Args {
    #[command(flatten)]
    flags: mb_runtime::daemon::Flags,
}

fn main() -> std::process::ExitCode {
    mb_runtime::daemon::main(mb_smtpd::Smtpd, mb_runtime::docs::parse::<Args>().flags)
}
