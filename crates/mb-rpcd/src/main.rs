//! mb-rpcd: the control daemon. See the library for what it does.

use clap::Parser;

/// The Mailborder control daemon: configuration store, message log and status hub.
#[derive(Parser)]
#[command(name = "mb-rpcd", version)]
struct Args {
    #[command(flatten)]
    flags: mb_runtime::daemon::Flags,
    /// Check the configuration and the database, then exit
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    let hub = mb_rpcd::Hub { check: args.check };
    mb_runtime::daemon::main(hub, args.flags)
}
