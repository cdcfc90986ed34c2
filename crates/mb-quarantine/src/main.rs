//! mb-quarantine: the messages the filter held back, as `pmgqm` or MailScanner's
//! quarantine tools show them: list, show, release to the original recipients, delete,
//! and purge by the retention limits.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use mb_proto::v1::quarantine_client::QuarantineClient;
use mb_proto::v1::{ListQuarantineRequest, PurgeQuarantineRequest, QuarantineEntry, QuarantineId};
use mb_runtime::cli::{self, Failure};
use serde_json::{Value as Json, json};

const AFTER_HELP: &str = "\
Messages are quarantined by mb-filter when their spam score reaches
spam.threshold.quarantine (or a virus is found and clamav.virus_action = quarantine).
They are kept under paths.spool_dir/quarantine for quarantine.retention_days, within
quarantine.max_size_mb and quarantine.max_messages. A released message is reinjected
through filter.next_hop (the unfiltered port 10025) to its original recipients.

Exit status: 0 success, 1 refused (no such message, the next hop refused it), 2 usage
error, 69 mb-rpcd could not be reached, 77 permission denied.";

/// List, inspect, release and delete quarantined messages.
#[derive(Parser)]
#[command(name = "mb-quarantine", version, after_help = AFTER_HELP)]
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
    /// Quarantined messages, newest first: id, time, score, sender, recipients, subject, reason
    List {
        /// Only from this sender address
        #[arg(long)]
        from: Option<String>,
        /// Only to this recipient address
        #[arg(long)]
        to: Option<String>,
        /// Only since this age or UTC time (2h, 7d, 2026-11-22 08:00)
        #[arg(long)]
        since: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// The entry and the message's header section
    Show {
        id: String,
        /// Print the whole message as stored, nothing else
        #[arg(long)]
        raw: bool,
    },
    /// Deliver a message to its original recipients, without filtering it again
    Release { ids: Vec<String> },
    /// Remove messages from the quarantine
    Delete { ids: Vec<String> },
    /// Apply the retention limits now (they are also applied every 5 minutes)
    Purge {
        /// Also remove everything older than this many days
        #[arg(long, value_name = "DAYS")]
        older_than: Option<u32>,
    },
    /// Send the quarantine digests now (quarantine.digest.* says when they go out by
    /// themselves): to every recipient with mail quarantined since its last digest
    Digest {
        /// Send now (required: digests are otherwise sent on quarantine.digest.schedule)
        #[arg(long)]
        now: bool,
        /// Only to this recipient address
        #[arg(long, value_name = "ADDRESS")]
        to: Option<String>,
    },
}

fn grpc(e: tonic::Status) -> Failure {
    cli::grpc("mb-rpcd", &e)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn when(ms: i64) -> String {
    mb_runtime::logging::timestamp(
        UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
    )
}

fn entry_json(e: &QuarantineEntry) -> Json {
    json!({
        "id": e.id, "node": e.node, "time": when(e.at_unix_ms), "at_unix_ms": e.at_unix_ms,
        "queue_id": e.queue_id, "client_ip": e.client_ip, "sender": e.sender,
        "recipients": e.recipients, "subject": e.subject, "reason": e.reason,
        "score": e.score, "symbols": e.symbols, "size": e.size, "path": e.path,
    })
}

fn sender(s: &str) -> &str {
    if s.is_empty() { "<>" } else { s }
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-quarantine", run(args))
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-quarantine", args.config.as_deref());
    let channel = cli::rpcd(&cfg).await?;
    let mut q = QuarantineClient::new(channel.clone());
    match args.command {
        Command::List {
            from,
            to,
            since,
            limit,
        } => {
            let since_unix_ms = match since {
                Some(s) => cli::parse_time(&s, now_ms())
                    .map_err(|e| Failure(2, anyhow!("--since: {e}")))?,
                None => 0,
            };
            let r = q
                .list(ListQuarantineRequest {
                    sender: from.unwrap_or_default(),
                    recipient: to.unwrap_or_default(),
                    since_unix_ms,
                    limit,
                    ..Default::default()
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if args.json {
                let items: Vec<Json> = r.entries.iter().map(entry_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"entries": items, "total": r.total, "total_bytes": r.total_bytes})
                    )
                    .unwrap_or_default()
                );
                return Ok(());
            }
            for e in &r.entries {
                mb_runtime::say!(
                    "{:<24} {} {:>6.1} {:>8}  {} -> {}",
                    e.id,
                    when(e.at_unix_ms),
                    e.score,
                    e.size,
                    sender(&e.sender),
                    e.recipients.join(", ")
                );
                mb_runtime::say!("    {:?}: {}", e.subject, e.reason);
            }
            mb_runtime::say!(
                "-- {} shown; {} messages, {} KiB in the quarantine",
                r.entries.len(),
                r.total,
                r.total_bytes.div_ceil(1024)
            );
        }
        Command::Show { id, raw } => {
            let r = q
                .show(QuarantineId { id, raw })
                .await
                .map_err(grpc)?
                .into_inner();
            let e = r.entry.unwrap_or_default();
            if raw {
                let mut out = std::io::stdout().lock();
                out.write_all(&r.message)
                    .and_then(|()| out.flush())
                    .map_err(|err| Failure(1, anyhow!("cannot write: {err}")))?;
            } else if args.json {
                let mut v = entry_json(&e);
                v["headers"] = Json::String(r.headers);
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                mb_runtime::say!("id:         {}", e.id);
                mb_runtime::say!("time:       {}", when(e.at_unix_ms));
                mb_runtime::say!("node:       {}", e.node);
                mb_runtime::say!("queue id:   {}", e.queue_id);
                mb_runtime::say!("client:     {}", e.client_ip);
                mb_runtime::say!("sender:     {}", sender(&e.sender));
                mb_runtime::say!("recipients: {}", e.recipients.join(", "));
                mb_runtime::say!("subject:    {}", e.subject);
                mb_runtime::say!("reason:     {}", e.reason);
                mb_runtime::say!("score:      {:.1}  {}", e.score, e.symbols.join(" "));
                mb_runtime::say!("size:       {}", e.size);
                println!();
                print!(
                    "{}",
                    mb_runtime::cli::printable(&r.headers.replace("\r\n", "\n"))
                );
            }
        }
        Command::Release { ids } => {
            if ids.is_empty() {
                return Err(Failure(
                    2,
                    anyhow!("name the message(s) to release (mb-quarantine list shows ids)"),
                ));
            }
            let mut out = Vec::new();
            for id in ids {
                let r = q
                    .release(QuarantineId {
                        id: id.clone(),
                        raw: false,
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                if !args.json {
                    mb_runtime::say!(
                        "{id}: released to {} ({})",
                        r.recipients.join(", "),
                        r.reply
                    );
                }
                out.push(json!({"id": id, "recipients": r.recipients, "reply": r.reply}));
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            }
        }
        Command::Delete { ids } => {
            if ids.is_empty() {
                return Err(Failure(
                    2,
                    anyhow!("name the message(s) to delete (mb-quarantine list shows ids)"),
                ));
            }
            let mut deleted = Vec::new();
            for id in ids {
                q.delete(QuarantineId {
                    id: id.clone(),
                    raw: false,
                })
                .await
                .map_err(grpc)?;
                if !args.json {
                    mb_runtime::say!("{id}: deleted");
                }
                deleted.push(id);
            }
            if args.json {
                println!("{}", serde_json::json!({ "deleted": deleted }));
            }
        }
        Command::Purge { older_than } => {
            let r = q
                .purge(PurgeQuarantineRequest {
                    older_than_days: older_than.unwrap_or(0),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if args.json {
                mb_runtime::say!(
                    "{}",
                    json!({"removed": r.removed, "remaining": r.remaining, "remaining_bytes": r.remaining_bytes})
                );
            } else {
                mb_runtime::say!(
                    "removed {}; {} messages, {} KiB remain",
                    r.removed,
                    r.remaining,
                    r.remaining_bytes.div_ceil(1024)
                );
            }
        }
        Command::Digest { now, to } => {
            if !now {
                return Err(Failure(
                    2,
                    anyhow!(
                        "say --now to send the digests at once (they otherwise go out on quarantine.digest.schedule)"
                    ),
                ));
            }
            let r = mb_proto::v1::digest_client::DigestClient::new(channel)
                .send_now(mb_proto::v1::DigestSendRequest {
                    to: to.unwrap_or_default(),
                    actor: String::new(),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if args.json {
                mb_runtime::say!(
                    "{}",
                    json!({"recipients": r.recipients, "listed": r.listed})
                );
            } else if r.recipients.is_empty() {
                mb_runtime::say!("no digest to send: nothing was quarantined since the last ones");
            } else {
                mb_runtime::say!(
                    "sent {} digests listing {} messages: {}",
                    r.recipients.len(),
                    r.listed,
                    r.recipients.join(", ")
                );
            }
        }
    }
    Ok(())
}
