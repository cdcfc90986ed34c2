//! mb-queue: the mail queue, as `postqueue -p` and `postsuper` show and change Postfix's.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use mb_proto::v1::queue_client::QueueClient;
use mb_proto::v1::{
    DeleteQueueRequest, FlushQueueRequest, ListQueueRequest, QueueEntry, QueueIdRequest,
    ShowQueueRequest,
};
use mb_runtime::cli::{self, Failure};
use serde_json::{Value as Json, json};

const AFTER_HELP: &str = "\
Queues: incoming (accepted, waiting for delivery), deferred (delivery failed for now),
hold (kept, not delivered until released).

Exit status: 0 success, 1 refused (no such message), 2 usage error, 69 mb-smtpd could
not be reached, 77 permission denied.";

/// Show and manage the mail queue of mb-smtpd.
#[derive(Parser)]
#[command(name = "mb-queue", version, after_help = AFTER_HELP)]
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
    /// List queued messages: id, size, age, sender, recipients with their state
    List {
        /// Only this queue: incoming, deferred or hold
        #[arg(long)]
        queue: Option<String>,
    },
    /// Envelope and headers of one message
    Show { id: String },
    /// Keep a message without delivering it
    Hold { id: String },
    /// Let a held message be delivered again
    Release { id: String },
    /// Try deferred messages now: all of them, or one
    Flush { id: Option<String> },
    /// Start a message over: undelivered recipients are queued again with fresh retry counters
    Requeue { id: String },
    /// Delete a message, or every message of a queue
    Delete {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        deferred: bool,
        #[arg(long, conflicts_with = "id")]
        hold: bool,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-queue", run(args))
}

fn grpc(e: tonic::Status) -> Failure {
    cli::grpc("mb-smtpd", &e)
}

fn age(arrival: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(arrival).unwrap_or(0));
    let secs = at.elapsed().map_or(0, |d| d.as_secs());
    mb_core::value::format_duration(Duration::from_secs(secs))
}

fn entry_json(e: &QueueEntry) -> Json {
    let rcpts: Vec<Json> = e
        .recipients
        .iter()
        .map(|r| json!({"address": r.address, "state": r.state, "last_error": r.last_error, "remote": r.remote}))
        .collect();
    json!({"id": e.id, "queue": e.queue, "size": e.size, "arrival": e.arrival_unix, "sender": e.sender,
           "recipients": rcpts, "client_ip": e.client_ip, "protocol": e.protocol,
           "attempts": e.attempts, "next_attempt": e.next_attempt_unix})
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-queue", args.config.as_deref());
    let channel = mb_runtime::uds::connect(&cfg.socket("mb-smtpd"), "mb-smtpd").await?;
    let mut queue = QueueClient::new(channel);
    match args.command {
        Command::List { queue: which } => {
            let entries = queue
                .list(ListQueueRequest {
                    queue: which.unwrap_or_default(),
                })
                .await
                .map_err(grpc)?
                .into_inner()
                .entries;
            if args.json {
                let items: Vec<Json> = entries.iter().map(entry_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).unwrap_or_default()
                );
            } else if entries.is_empty() {
                mb_runtime::say!("Mail queue is empty");
            } else {
                mb_runtime::say!(
                    "{:<26} {:>9} {:>6} {:<9} SENDER / RECIPIENTS",
                    "ID",
                    "SIZE",
                    "AGE",
                    "QUEUE"
                );
                for e in &entries {
                    let sender = if e.sender.is_empty() { "<>" } else { &e.sender };
                    mb_runtime::say!(
                        "{:<26} {:>9} {:>6} {:<9} {sender}",
                        e.id,
                        e.size,
                        age(e.arrival_unix),
                        e.queue
                    );
                    for r in &e.recipients {
                        let err = if r.last_error.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", r.last_error)
                        };
                        mb_runtime::say!("{:54}-> {} ({}{err})", "", r.address, r.state);
                    }
                }
                let bytes: u64 = entries.iter().map(|e| e.size).sum();
                mb_runtime::say!(
                    "-- {} KiB in {} message(s)",
                    bytes.div_ceil(1024),
                    entries.len()
                );
            }
        }
        Command::Show { id } => {
            let r = queue
                .show(ShowQueueRequest { id })
                .await
                .map_err(grpc)?
                .into_inner();
            let e = r.entry.unwrap_or_default();
            if args.json {
                let mut v = entry_json(&e);
                v["headers"] = json!(r.headers);
                v["helo"] = json!(r.helo);
                v["tls"] = json!(r.tls);
                v["auth_user"] = json!(r.auth_user);
                v["history"] = json!(r.history);
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                mb_runtime::say!(
                    "id: {}\nqueue: {}\nsize: {}\nage: {}",
                    e.id,
                    e.queue,
                    e.size,
                    age(e.arrival_unix)
                );
                mb_runtime::say!(
                    "client: {} helo={} protocol={}",
                    e.client_ip,
                    r.helo,
                    e.protocol
                );
                if !r.tls.is_empty() {
                    mb_runtime::say!("tls: {}", r.tls);
                }
                if !r.auth_user.is_empty() {
                    mb_runtime::say!("auth: {}", r.auth_user);
                }
                mb_runtime::say!("sender: <{}>", e.sender);
                for rc in &e.recipients {
                    let err = if rc.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", rc.last_error)
                    };
                    mb_runtime::say!("recipient: <{}> {}{err}", rc.address, rc.state);
                }
                if e.attempts > 0 {
                    mb_runtime::say!("attempts: {}", e.attempts);
                }
                for h in &r.history {
                    mb_runtime::say!("history: {h}");
                }
                print!(
                    "\n{}",
                    mb_runtime::cli::printable(&r.headers.replace("\r\n", "\n"))
                );
            }
        }
        Command::Hold { id } => {
            let e = queue
                .hold(QueueIdRequest { id })
                .await
                .map_err(grpc)?
                .into_inner();
            mb_runtime::cli::changed(
                args.json,
                &serde_json::json!({"id": e.id, "queue": "hold"}),
                format_args!("{}: placed on hold", e.id),
            );
        }
        Command::Release { id } => {
            let e = queue
                .release(QueueIdRequest { id })
                .await
                .map_err(grpc)?
                .into_inner();
            mb_runtime::cli::changed(
                args.json,
                &serde_json::json!({"id": e.id, "released": true}),
                format_args!("{}: released from hold", e.id),
            );
        }
        Command::Flush { id } => {
            let n = queue
                .flush(FlushQueueRequest {
                    id: id.unwrap_or_default(),
                })
                .await
                .map_err(grpc)?
                .into_inner()
                .flushed;
            mb_runtime::cli::changed(
                args.json,
                &serde_json::json!({"flushed": n}),
                format_args!("{n} deferred message(s) scheduled for delivery now"),
            );
        }
        Command::Requeue { id } => {
            let e = queue
                .requeue(QueueIdRequest { id })
                .await
                .map_err(grpc)?
                .into_inner();
            mb_runtime::cli::changed(
                args.json,
                &serde_json::json!({"id": e.id, "requeued": true}),
                format_args!("{}: requeued", e.id),
            );
        }
        Command::Delete {
            id,
            deferred,
            hold,
            all,
        } => {
            let which = match (id.is_some(), deferred, hold, all) {
                (true, ..) => String::new(),
                (_, true, _, _) => "deferred".into(),
                (_, _, true, _) => "hold".into(),
                (_, _, _, true) => "all".into(),
                _ => {
                    return Err(Failure(
                        2,
                        anyhow!("name a message, or use --deferred, --hold or --all"),
                    ));
                }
            };
            let n = queue
                .delete(DeleteQueueRequest {
                    id: id.unwrap_or_default(),
                    queue: which,
                })
                .await
                .map_err(grpc)?
                .into_inner()
                .deleted;
            mb_runtime::cli::changed(
                args.json,
                &serde_json::json!({"deleted": n}),
                format_args!("deleted {n} message(s)"),
            );
        }
    }
    Ok(())
}
