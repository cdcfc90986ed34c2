//! mb-web: the HTTPS face of the gateway (the daemon), and the `account`/`key` tools
//! that manage web logins through its socket. See the library for what it does.

use clap::Parser;

/// The Mailborder web daemon: REST API, /metrics and /health on HTTPS and on mb-web.sock.
/// With a subcommand, a tool for web accounts and API keys.
#[derive(Parser)]
#[command(name = "mb-web", version)]
struct Args {
    #[command(flatten)]
    flags: mb_runtime::daemon::Flags,
    #[command(subcommand)]
    tool: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    #[command(flatten)]
    Tool(mb_web::accounts_cli::Tool),
    /// Write the configuration without the secrets mb-web does not read (run by
    /// mb-web.service as root before each start; mb-web reads only the copy)
    #[command(after_help = mb_web::export::EXIT_STATUS)]
    ConfigExport(mb_web::export::ExportArgs),
}

fn main() -> std::process::ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    match args.tool {
        Some(Command::Tool(tool)) => mb_web::accounts_cli::run(tool, args.flags.config.as_deref()),
        Some(Command::ConfigExport(a)) => mb_web::export::run(&a, args.flags.config.as_deref()),
        None => mb_runtime::daemon::main(mb_web::Web, args.flags),
    }
}
