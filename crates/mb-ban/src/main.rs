//! mb-ban: the banned and trusted client addresses of the protection modes
//! (`network.protection.mode`), like `fail2ban-client` for the gateway's own bans.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use mb_proto::v1::access_client::AccessClient;
use mb_proto::v1::{AccessEntry, ListAccessRequest, RemoveAccessRequest};
use mb_runtime::cli::{self, Failure};

const AFTER_HELP: &str = "\
mb-smtpd bans sources that connect faster than network.protection.autoban.rate, and in
protected mode trusts an address for a day after a successful AUTH. Changes made here
reach mb-smtpd within a few seconds.

An entry is an address (192.0.2.7) or a network (192.0.2.0/24, 2001:db8::/64; at most a
/8 or a /16) that covers every address inside it. An IPv6 client is its whole network of
network.smtp.ipv6_prefix bits (default /64): banning one IPv6 address bans that network.

Exit status: 0 success, 1 refused (bad address or duration, no such entry), 2 usage
error, 69 mb-rpcd could not be reached, 77 permission denied.";

/// List, add and remove banned and trusted client addresses.
#[derive(Parser)]
#[command(name = "mb-ban", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file, for paths.run_dir [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print data as JSON
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show banned and trusted addresses with the time left
    List,
    /// Ban an address or a network (192.0.2.0/24, 2001:db8::/64) from every mail port
    Add {
        /// Address or network
        ip: String,
        /// How long, e.g. 1h, 2d
        #[arg(long = "for", default_value = "1h")]
        duration: String,
        #[arg(long, default_value = "banned by an administrator")]
        reason: String,
    },
    /// Lift a ban (of an address or a network, as listed)
    Del { ip: String },
    /// Trust an address or a network (protected mode opens submission to it)
    Trust {
        ip: String,
        #[arg(long = "for", default_value = "1d")]
        duration: String,
    },
    /// Stop trusting an address
    Untrust { ip: String },
}

fn grpc(e: tonic::Status) -> Failure {
    cli::grpc("mb-rpcd", &e)
}

fn seconds(text: &str) -> Result<u64, Failure> {
    mb_core::value::parse_duration(text)
        .map(|d| d.as_secs())
        .map_err(|e| Failure(1, anyhow!("--for: {e}")))
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-ban", run(args))
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-ban", args.config.as_deref());
    let channel = mb_runtime::uds::connect(&cfg.socket("mb-rpcd"), "mb-rpcd")
        .await
        .map_err(|e| {
            let code = if matches!(e, mb_runtime::uds::ConnectError::Denied { .. }) {
                77
            } else {
                69
            };
            Failure(code, e.into())
        })?;
    let mut access = AccessClient::new(channel);
    let add = |ip: String, kind: &str, secs: u64, reason: String| AccessEntry {
        ip,
        kind: kind.into(),
        seconds: secs,
        reason,
        ..Default::default()
    };
    match args.command {
        Command::List => {
            let entries = access
                .list(ListAccessRequest::default())
                .await
                .map_err(grpc)?
                .into_inner()
                .entries;
            if args.json {
                let items: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({"ip": e.ip, "kind": e.kind, "seconds_left": e.seconds,
                                           "reason": e.reason, "added_by": e.added_by, "created_at": e.created_at_unix})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).unwrap_or_default()
                );
            } else {
                for e in entries {
                    let left =
                        mb_core::value::format_duration(std::time::Duration::from_secs(e.seconds));
                    println!(
                        "{:<6} {:<40} {:>8} left  {} ({})",
                        e.kind, e.ip, left, e.reason, e.added_by
                    );
                }
            }
        }
        Command::Add {
            ip,
            duration,
            reason,
        } => {
            let e = access
                .add(add(ip, "ban", seconds(&duration)?, reason))
                .await
                .map_err(grpc)?
                .into_inner();
            mb_runtime::cli::changed(
                args.json,
                &serde_json::json!({"ip": e.ip, "kind": "ban", "seconds": e.seconds, "reason": e.reason}),
                format_args!("banned {} for {duration}", e.ip),
            );
        }
        Command::Trust { ip, duration } => {
            let e = access
                .add(add(
                    ip,
                    "trust",
                    seconds(&duration)?,
                    "trusted by an administrator".into(),
                ))
                .await
                .map_err(grpc)?
                .into_inner();
            mb_runtime::cli::changed(
                args.json,
                &serde_json::json!({"ip": e.ip, "kind": "trust", "seconds": e.seconds}),
                format_args!("trusted {} for {duration}", e.ip),
            );
        }
        Command::Del { ip } => remove(&mut access, ip, "ban", args.json).await?,
        Command::Untrust { ip } => remove(&mut access, ip, "trust", args.json).await?,
    }
    Ok(())
}

async fn remove(
    access: &mut AccessClient<tonic::transport::Channel>,
    ip: String,
    kind: &str,
    json: bool,
) -> Result<(), Failure> {
    let removed = access
        .remove(RemoveAccessRequest {
            ip: ip.clone(),
            kind: kind.into(),
        })
        .await
        .map_err(grpc)?
        .into_inner()
        .removed;
    if !removed {
        return Err(Failure(
            1,
            anyhow!("{ip} is not in the {kind} list; see `mb-ban list`"),
        ));
    }
    mb_runtime::cli::changed(
        json,
        &serde_json::json!({"ip": ip, "kind": kind, "removed": true}),
        format_args!("removed {ip} from the {kind} list"),
    );
    Ok(())
}
