//! `cargo xtask bench --log-search`: how fast mb-log finds things in a message log of a
//! million events, on each of the three database engines.
//!
//! Each engine gets a private server (SQLite needs none) and an mb-rpcd that migrates it;
//! the events are generated inside the database with one INSERT ... SELECT (a realistic
//! spread: 30 days, 5,000 senders, 3,000 recipients, 62,500 client addresses, one subject
//! in a thousand says "Invoice"), the search tables of migration 0014 are filled from them
//! as mb-rpcd fills them when it stores an event (each generated event has one
//! recipient, so the recipient table is one row per event), the planner statistics are
//! refreshed, and each search is timed as an administrator runs it: the `mb-log` command,
//! start to exit, best of three.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mb_testkit::{Gateway, MariaDb, Postgres, require};

/// Events in the generated log.
pub(crate) const EVENTS: u64 = 1_000_000;

/// The searches, as mb-log arguments.
const SEARCHES: &[(&str, &[&str])] = &[
    ("subject", &["--subject", "invoice", "--since", "31d"]),
    // One event in a million, and a text in every event (found newest first up to the
    // limit): the two ends of a subject search.
    (
        "subject, one",
        &["--subject", "invoice 777000", "--since", "31d"],
    ),
    (
        "subject, all",
        &["--subject", "weekly report", "--since", "31d"],
    ),
    (
        "client address",
        &["--client", "10.3.4.1", "--since", "31d"],
    ),
    ("Message-ID", &["--message-id", "<777777@bench.example>"]),
    ("queue id", &["--id", "Q777777"]),
    ("recipient", &["--to", "r42@served.test", "--since", "31d"]),
    ("sender", &["--from", "s42@example.org", "--since", "31d"]),
    ("last hour", &["--since", "1h"]),
];

/// The INSERT ... SELECT body shared by the engines: `{n}` is the row number, `{cat}`
/// the engine's string concatenation of its arguments.
pub(crate) fn columns(n: &str, cat: fn(&[&str]) -> String, div: &str, now_ms: u64) -> String {
    let text = |s: &str| format!("'{s}'");
    let step = 30 * 86_400_000 / EVENTS;
    [
        cat(&[&text("bench-"), n]),
        text("node1"),
        text("mb-smtpd"),
        format!("{now_ms} - {n} * {step}"),
        cat(&[&text("Q"), n]),
        cat(&[n, &text("@bench.example")]),
        cat(&[
            &text("10."),
            &format!("({n} % 250)"),
            &text("."),
            &format!("(({n} {div} 250) % 250)"),
            &text(".1"),
        ]),
        text("mx.sender.example"),
        text("mx.sender.example"),
        cat(&[&text("s"), &format!("({n} % 5000)"), &text("@example.org")]),
        cat(&[&text("r"), &format!("({n} % 3000)"), &text("@served.test")]),
        "4096".into(),
        text("scanned"),
        text("accept"),
        "1.5".into(),
        text("SPF_PASS"),
        text(""),
        format!(
            "CASE WHEN {n} % 1000 = 0 THEN {} ELSE {} END",
            cat(&[&text("Your Invoice "), n]),
            cat(&[&text("Weekly report "), n])
        ),
    ]
    .join(", ")
}

pub(crate) const INSERT: &str = "INSERT INTO message_events (event_id, node, daemon, at_ms, queue_id, message_id, \
     client_ip, client_name, helo, sender, recipients, size, stage, verdict, score, symbols, detail, subject) ";

/// Fills the recipient table from the generated events, each of which has one recipient.
pub(crate) const RECIPIENTS: &str = "INSERT INTO message_event_recipients (event_row, recipient) SELECT id, recipients FROM message_events;";

/// Fills MariaDB's subject chunks as migration 0014 does (16 events a chunk).
const CHUNKS: &str = "SET SESSION group_concat_max_len = 16777216; \
     INSERT INTO message_event_subject_chunks (chunk, body) \
     SELECT id DIV 16, GROUP_CONCAT(LOWER(COALESCE(subject, '')) ORDER BY id SEPARATOR '\\n') \
     FROM message_events GROUP BY id DIV 16;";

pub(crate) fn sql_cat(parts: &[&str]) -> String {
    format!("({})", parts.join(" || "))
}

fn mysql_cat(parts: &[&str]) -> String {
    format!("CONCAT({})", parts.join(", "))
}

/// Runs the whole measurement and prints one table.
pub fn bench() -> Result<()> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    let mut rows = Vec::new();
    for engine in ["sqlite", "mariadb", "postgresql"] {
        eprintln!("log search: {engine}, generating {EVENTS} events ...");
        let mariadb = (engine == "mariadb").then(MariaDb::start).transpose()?;
        let postgres = (engine == "postgresql").then(Postgres::start).transpose()?;
        let url_line = match (&mariadb, &postgres) {
            (Some(m), _) => format!("[database]\nurl = \"{}\"\n", m.url()),
            (_, Some(p)) => format!("[database]\nurl = \"{}\"\n", p.url()),
            _ => String::new(),
        };
        let mut gw = Gateway::new(&format!(
            "[smtp]\nenabled = false\n[filter]\nenabled = false\n[log]\nretention_days = 0\n{url_line}"
        ));
        gw.start()?;
        let started = Instant::now();
        match (&mariadb, &postgres) {
            (Some(m), _) => {
                let sql = format!(
                    "{INSERT} SELECT {} FROM seq_1_to_{EVENTS}; {RECIPIENTS} {CHUNKS} \
                     ANALYZE TABLE message_events, message_event_recipients, message_event_subject_chunks;",
                    columns("seq", mysql_cat, "DIV", now_ms)
                );
                let url = m.url();
                let port = url.rsplit(':').next().unwrap_or("").trim_end_matches("/mb");
                sql_client(Command::new(require("mariadb", "mariadb-client")).args([
                    "-h",
                    "127.0.0.1",
                    "-P",
                    port,
                    "-u",
                    "mb",
                    "-pmb-secret-pw",
                    "mb",
                    "-e",
                    &sql,
                ]))?;
            }
            (_, Some(p)) => {
                let sql = format!(
                    "{INSERT} SELECT {} FROM generate_series(1::bigint, {EVENTS}) AS i; {RECIPIENTS} \
                     ANALYZE message_events; ANALYZE message_event_recipients;",
                    columns("i", sql_cat, "/", now_ms)
                );
                sql_client(Command::new(require("psql", "postgresql-client")).args([
                    &p.url(),
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    &sql,
                ]))?;
            }
            _ => {
                let sql = format!(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {EVENTS}) \
                     {INSERT} SELECT {} FROM n; {RECIPIENTS} ANALYZE;",
                    columns("i", sql_cat, "/", now_ms)
                );
                let db = gw.path("data/mailborder.db");
                sql_client(
                    Command::new(require("sqlite3", "sqlite3"))
                        .arg(&db)
                        .arg(format!("PRAGMA busy_timeout = 30000; {sql}")),
                )?;
            }
        }
        eprintln!(
            "log search: {engine}, {EVENTS} events in {:.0}s; searching",
            started.elapsed().as_secs_f64()
        );
        for (what, args) in SEARCHES {
            let mut best = Duration::MAX;
            let mut found = 0;
            for _ in 0..3 {
                let mut all = vec!["--json", "--limit", "1000"];
                all.extend_from_slice(args);
                let t = Instant::now();
                let out = gw.tool("mb-log", &all);
                let took = t.elapsed();
                if !out.status.success() {
                    bail!(
                        "mb-log {args:?} on {engine} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| format!("mb-log {args:?} printed no JSON"))?;
                found = v.as_array().map_or(0, Vec::len);
                best = best.min(took);
            }
            rows.push((engine, *what, found, best));
        }
        drop(gw);
    }
    println!("\nmb-log over {EVENTS} events (wall time of the command, best of 3):");
    println!(
        "{:<12} {:<16} {:>7} {:>9}",
        "ENGINE", "SEARCH", "FOUND", "TIME"
    );
    for (engine, what, found, took) in rows {
        println!(
            "{engine:<12} {what:<16} {found:>7} {:>7.0}ms",
            took.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

pub(crate) fn sql_client(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
