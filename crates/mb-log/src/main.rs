//! mb-log: search the message log (every message received, scanned, delivered, deferred
//! or bounced, as recorded by the daemons in mb-rpcd's database), like `pmg-log-tracker`
//! or grepping Postfix's maillog by queue id.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use clap::Parser;
use mb_proto::v1::EventQuery;
use mb_proto::v1::events_client::EventsClient;
use mb_runtime::cli::{self, Failure};
use serde_json::json;

const AFTER_HELP: &str = "\
Stages: received, scanned (verdict: accept, tag, quarantine, reject, tempfail, discard),
delivered, deferred, bounced; rejected (refused in the SMTP session, before DATA).

Examples:
  mb-log --since 1h                     the last hour
  mb-log --verdict reject --since 1d    what the filter refused today
  mb-log --to alice@example.org         everything for one recipient
  mb-log --id 18B2C0FFEE01A             one message's history
  mb-log --subject invoice --since 7d   subjects containing invoice, any case
  mb-log --client 192.0.2.7             what one client sent
  mb-log --message-id '<x@example.org>' one message by its Message-ID

Exit status: 0 success (also when nothing matched), 2 usage error, 69 mb-rpcd could not
be reached, 77 permission denied.";

/// Search the message log.
#[derive(Parser)]
#[command(name = "mb-log", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file, for paths.run_dir [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print data as JSON
    #[arg(long)]
    json: bool,
    /// Only messages from this sender address
    #[arg(long)]
    from: Option<String>,
    /// Only messages to this recipient address
    #[arg(long)]
    to: Option<String>,
    /// Only since this age or UTC time (30m, 2h, 7d, 2026-11-22 08:00) [default: 1d]
    #[arg(long)]
    since: Option<String>,
    /// Only before this age or UTC time
    #[arg(long)]
    until: Option<String>,
    /// Only scans with this verdict: accept, tag, quarantine, reject, tempfail, discard
    #[arg(long)]
    verdict: Option<String>,
    /// Only events at this stage: received, scanned, delivered, deferred, bounced, rejected
    #[arg(long)]
    stage: Option<String>,
    /// Only this queue id
    #[arg(long)]
    id: Option<String>,
    /// Only messages whose subject contains this text (ignoring case)
    #[arg(long)]
    subject: Option<String>,
    /// Only messages from this client address
    #[arg(long, value_name = "IP")]
    client: Option<std::net::IpAddr>,
    /// Only the message with this Message-ID (with or without its angle brackets)
    #[arg(long, value_name = "ID")]
    message_id: Option<String>,
    /// At most this many events (the newest when more match)
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

fn when(ms: i64) -> String {
    mb_runtime::logging::timestamp(
        UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
    )
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-log", run(args))
}

async fn run(args: Args) -> Result<(), Failure> {
    const VERDICTS: &[&str] = &[
        "accept",
        "tag",
        "quarantine",
        "reject",
        "tempfail",
        "discard",
    ];
    if let Some(v) = &args.verdict
        && !VERDICTS.contains(&v.as_str())
    {
        return Err(Failure(
            2,
            anyhow!("--verdict must be one of {}", VERDICTS.join(", ")),
        ));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let time = |flag: &str, v: &Option<String>, default: i64| -> Result<i64, Failure> {
        match v {
            Some(s) => cli::parse_time(s, now).map_err(|e| Failure(2, anyhow!("--{flag}: {e}"))),
            None => Ok(default),
        }
    };
    // A message named by its identity is searched for over the whole log.
    let named = args.id.is_some() || args.message_id.is_some();
    let since = if named && args.since.is_none() {
        0
    } else {
        time("since", &args.since, now - 86_400_000)?
    };
    let until = time("until", &args.until, 0)?;
    let cfg = mb_runtime::load_config_for_tool("mb-log", args.config.as_deref());
    let mut events = EventsClient::new(cli::rpcd(&cfg).await?);
    let mut found = events
        .query(EventQuery {
            queue_id: args.id.unwrap_or_default(),
            sender: args.from.unwrap_or_default(),
            recipient: args.to.unwrap_or_default(),
            since_unix_ms: since,
            until_unix_ms: until,
            verdict: args.verdict.unwrap_or_default(),
            stage: args.stage.unwrap_or_default(),
            limit: args.limit,
            newest_first: true,
            subject: args.subject.unwrap_or_default(),
            client_ip: args.client.map(|ip| ip.to_string()).unwrap_or_default(),
            message_id: args.message_id.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(|e| cli::grpc("mb-rpcd", &e))?
        .into_inner()
        .events;
    // Asked newest first (so the limit keeps the newest), shown in time order.
    found.reverse();
    if args.json {
        let items: Vec<serde_json::Value> = found
            .iter()
            .map(|e| {
                json!({
                    "time": when(e.at_unix_ms), "at_unix_ms": e.at_unix_ms, "node": e.node,
                    "daemon": e.daemon, "queue_id": e.queue_id, "message_id": e.message_id,
                    "client_ip": e.client_ip, "helo": e.helo, "sender": e.sender,
                    "recipients": e.recipients, "subject": e.subject, "size": e.size,
                    "stage": e.stage, "verdict": e.verdict, "score": e.score,
                    "symbols": e.symbols, "detail": e.detail,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&items).unwrap_or_default()
        );
        return Ok(());
    }
    for e in &found {
        let mut line = format!(
            "{} {} {:<10} from=<{}> to=<{}>",
            when(e.at_unix_ms),
            e.queue_id,
            e.stage,
            e.sender,
            e.recipients.join(">,<")
        );
        if !e.client_ip.is_empty() {
            line.push_str(&format!(" client={}", e.client_ip));
        }
        if !e.verdict.is_empty() {
            line.push_str(&format!(" verdict={} score={:.1}", e.verdict, e.score));
        }
        if !e.subject.is_empty() {
            line.push_str(&format!(" subject={:?}", e.subject));
        }
        if !e.symbols.is_empty() {
            line.push_str(&format!(" symbols={}", e.symbols.join(",")));
        }
        if !e.detail.is_empty() {
            line.push_str(&format!(" ({})", e.detail));
        }
        mb_runtime::say!("{line}");
    }
    if found.is_empty() && !args.json {
        eprintln!("mb-log: no events matched");
    }
    Ok(())
}
