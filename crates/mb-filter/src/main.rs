//! mb-filter: one scanning worker. See the library for what it does.

use clap::Parser;

/// A Mailborder scanning worker (Filter.Scan on mb-filter-N.sock).
#[derive(Parser)]
#[command(name = "mb-filter", version)]
struct Args {
    #[command(flatten)]
    flags: mb_runtime::daemon::Flags,
    /// Worker number: serves mb-filter-N.sock (systemd: mb-filter@N)
    #[arg(long, visible_alias = "worker", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    instance: u32,
}

fn main() -> std::process::ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    let worker = mb_filter::Worker {
        instance: args.instance,
    };
    mb_runtime::daemon::main(worker, args.flags)
}
