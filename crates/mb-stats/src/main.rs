//! mb-stats: the message statistics mb-rpcd keeps per hour (messages by direction, stage
//! and verdict, recipients, bytes, viruses, and the top senders, recipients, client
//! addresses and sender domains), printed as a table or as JSON (the shape of
//! mb-web's `GET /api/v1/stats`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use clap::Parser;
use mb_proto::v1::stats_client::StatsClient;
use mb_proto::v1::{StatsCount, StatsQuery, StatsReport, StatsTopEntry};
use mb_runtime::cli::{self, Failure};
use serde_json::json;

const AFTER_HELP: &str = "\
What is counted: each message the filter decided on (stage scanned, with its verdict:
accept, tag, quarantine, reject, tempfail, discard) and each refusal by mb-smtpd before
it took a message (stage rejected, greylisted or deferred). Inbound or outbound as the
gateway saw it. Kept per hour for stats.retention_days (default 400).

Examples:
  mb-stats                              the last 24 hours, per hour
  mb-stats --since 30d --step day       the last 30 days, per day
  mb-stats --since 7d --domain example.org --top 20
  mb-stats --since '2026-11-01 00:00' --until '2026-12-01 00:00' --step day --json

Exit status: 0 success (also when nothing was counted), 2 usage error, 69 mb-rpcd could
not be reached, 77 permission denied.";

/// Print message statistics.
#[derive(Parser)]
#[command(name = "mb-stats", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file, for paths.run_dir [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print data as JSON
    #[arg(long)]
    json: bool,
    /// Since this age or UTC time (30m, 24h, 7d, 2026-11-22 08:00) [default: 24h]
    #[arg(long)]
    since: Option<String>,
    /// Until this age or UTC time [default: now, its hour included]
    #[arg(long)]
    until: Option<String>,
    /// One row per hour or per (UTC) day
    #[arg(long, default_value = "hour", value_parser = ["hour", "day"])]
    step: String,
    /// Only this domain's messages (recipients' domain for inbound, sender's for outbound); repeat to add several up
    #[arg(long, value_name = "DOMAIN")]
    domain: Vec<String>,
    /// Entries in each top list (at most 100)
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    top: u32,
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-stats", run(args))
}

fn when(secs: i64) -> String {
    mb_runtime::logging::timestamp(
        UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
    )
}

fn count_json(c: &StatsCount) -> serde_json::Value {
    json!({
        "direction": c.direction, "stage": c.stage, "verdict": c.verdict,
        "messages": c.messages, "recipients": c.recipients, "bytes": c.bytes,
        "viruses": c.viruses,
    })
}

fn top_json(v: &[StatsTopEntry]) -> serde_json::Value {
    v.iter()
        .map(|e| json!({"value": e.value, "messages": e.messages}))
        .collect()
}

/// The report as mb-web's `/api/v1/stats` gives it.
fn report_json(r: &StatsReport, step: &str, domains: &[String]) -> serde_json::Value {
    json!({
        "from_unix": r.from_unix,
        "to_unix": r.to_unix,
        "step": step,
        "domains": domains,
        "buckets": r.buckets.iter().map(|b| json!({
            "start_unix": b.start_unix,
            "counts": b.counts.iter().map(count_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "totals": r.totals.iter().map(count_json).collect::<Vec<_>>(),
        "top": {
            "senders": top_json(&r.top_senders),
            "recipients": top_json(&r.top_recipients),
            "clients": top_json(&r.top_clients),
            "sender_domains": top_json(&r.top_sender_domains),
        },
    })
}

/// Messages of a set of rows by the columns of the table.
#[derive(Default)]
struct Line {
    inbound: u64,
    outbound: u64,
    accepted: u64,
    tagged: u64,
    quarantined: u64,
    rejected: u64,
    tempfailed: u64,
    refused_smtp: u64,
    viruses: u64,
    bytes: u64,
}

fn line(counts: &[StatsCount]) -> Line {
    let mut l = Line::default();
    for c in counts {
        if c.direction == "outbound" {
            l.outbound += c.messages;
        } else {
            l.inbound += c.messages;
        }
        if c.stage == "scanned" {
            match c.verdict.as_str() {
                "accept" => l.accepted += c.messages,
                "tag" => l.tagged += c.messages,
                "quarantine" => l.quarantined += c.messages,
                "tempfail" => l.tempfailed += c.messages,
                _ => l.rejected += c.messages,
            }
        } else {
            l.refused_smtp += c.messages;
        }
        l.viruses += c.viruses;
        l.bytes = l.bytes.saturating_add(c.bytes);
    }
    l
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The table: one row per bucket, a total row, then the top lists.
fn table(r: &StatsReport) -> String {
    let mut out = format!(
        "{:<19} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6} {:>10}\n",
        "START (UTC)",
        "INBOUND",
        "OUTBOUND",
        "ACCEPTED",
        "TAGGED",
        "QUAR",
        "REJECT",
        "TEMPF",
        "SMTP",
        "VIRUS",
        "BYTES"
    );
    let row = |out: &mut String, label: &str, l: &Line| {
        out.push_str(&format!(
            "{label:<19} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6} {:>10}\n",
            l.inbound,
            l.outbound,
            l.accepted,
            l.tagged,
            l.quarantined,
            l.rejected,
            l.tempfailed,
            l.refused_smtp,
            l.viruses,
            bytes(l.bytes)
        ));
    };
    for b in &r.buckets {
        row(&mut out, &when(b.start_unix), &line(&b.counts));
    }
    row(&mut out, "TOTAL", &line(&r.totals));
    for (title, list) in [
        ("Top senders", &r.top_senders),
        ("Top recipients", &r.top_recipients),
        ("Top client addresses", &r.top_clients),
        ("Top sender domains", &r.top_sender_domains),
    ] {
        if list.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{title}:\n"));
        for e in list {
            out.push_str(&format!(
                "{:>8}  {}\n",
                e.messages,
                cli::printable(&e.value)
            ));
        }
    }
    out
}

async fn run(args: Args) -> Result<(), Failure> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let time = |flag: &str, v: &Option<String>, default: i64| -> Result<i64, Failure> {
        match v {
            Some(s) => cli::parse_time(s, now).map_err(|e| Failure(2, anyhow!("--{flag}: {e}"))),
            None => Ok(default),
        }
    };
    let since = time("since", &args.since, now - 86_400_000)? / 1000;
    let until = time("until", &args.until, now)? / 1000;
    if since >= until {
        return Err(Failure(2, anyhow!("--since must be before --until")));
    }
    let domains: Vec<String> = args
        .domain
        .iter()
        .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let cfg = mb_runtime::load_config_for_tool("mb-stats", args.config.as_deref());
    let mut stats = StatsClient::new(cli::rpcd(&cfg).await?);
    let report = stats
        .query(StatsQuery {
            from_unix: since,
            to_unix: until,
            step: args.step.clone(),
            domains: domains.clone(),
            top: args.top,
        })
        .await
        .map_err(|e| cli::grpc("mb-rpcd", &e))?
        .into_inner();
    if args.json {
        mb_runtime::say!(
            "{}",
            serde_json::to_string_pretty(&report_json(&report, &args.step, &domains))
                .unwrap_or_default()
        );
        return Ok(());
    }
    mb_runtime::say!("{}", table(&report).trim_end());
    if report.buckets.is_empty() {
        eprintln!("mb-stats: no messages counted in this range");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_sorts_rows_into_columns() {
        let c = |direction: &str, stage: &str, verdict: &str, messages, viruses| StatsCount {
            direction: direction.into(),
            stage: stage.into(),
            verdict: verdict.into(),
            messages,
            recipients: messages,
            bytes: 2048 * messages,
            viruses,
        };
        let counts = vec![
            c("inbound", "scanned", "accept", 5, 0),
            c("inbound", "scanned", "reject", 2, 1),
            c("outbound", "scanned", "tag", 1, 0),
            c("inbound", "rejected", "reject", 3, 0),
        ];
        let l = line(&counts);
        assert_eq!((l.inbound, l.outbound), (10, 1));
        assert_eq!(
            (l.accepted, l.tagged, l.rejected, l.refused_smtp),
            (5, 1, 2, 3)
        );
        assert_eq!(l.viruses, 1);
        assert_eq!(bytes(l.bytes), "22.0 KiB");
        let t = table(&StatsReport {
            totals: counts,
            top_senders: vec![StatsTopEntry {
                value: "a@b.test".into(),
                messages: 4,
            }],
            ..StatsReport::default()
        });
        assert!(t.contains("TOTAL"), "{t}");
        assert!(t.contains("Top senders:\n       4  a@b.test"), "{t}");
    }
}
