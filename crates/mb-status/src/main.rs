//! mb-status: is every daemon of this node up, and can they reach the database and Redis?
//!
//! Each daemon is asked on its own socket, so the answer still comes when mb-rpcd is down.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mb_proto::v1::{ComponentStatus, DaemonStatus, ServingState, StatusResponse};
use serde_json::{Value as Json, json};

const AFTER_HELP: &str = "\
Exit status: 0 every enabled daemon is healthy (and the database and Redis, when
configured, are reachable), 1 something is down or degraded, 2 usage error.";

/// Show the health of the Mailborder daemons on this node.
#[derive(Parser)]
#[command(name = "mb-status", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the status as JSON
    #[arg(long)]
    json: bool,
    /// Also print every counter of every daemon, sorted by name
    #[arg(short, long)]
    verbose: bool,
    /// Seconds to wait for each daemon
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    timeout: u64,
}

/// One line of the report.
struct Row {
    name: String,
    enabled: bool,
    probe: DaemonStatus,
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    let cfg = mb_runtime::load_config_for_tool("mb-status", args.config.as_deref());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mb-status: {e}");
            return ExitCode::from(70);
        }
    };
    let timeout = Duration::from_secs(args.timeout);
    let (rows, components, cluster) = runtime.block_on(async {
        let expected = mb_runtime::probe::expected_daemons(&cfg);
        let probes = mb_runtime::probe::probe_all(&cfg, timeout).await;
        let rows: Vec<Row> = expected
            .into_iter()
            .zip(probes)
            .map(|(e, probe)| Row {
                name: e.name,
                enabled: e.enabled,
                probe,
            })
            .collect();
        // The database is reached through mb-rpcd, which owns it; Redis directly.
        let rpcd = rows
            .iter()
            .find(|r| r.name == "mb-rpcd")
            .and_then(|r| r.probe.status.clone());
        let mut components: Vec<ComponentStatus> = match &rpcd {
            Some(s) => s
                .components
                .iter()
                .filter(|c| c.name == "database")
                .cloned()
                .collect(),
            None => vec![ComponentStatus {
                name: "database".into(),
                state: "unknown".into(),
                address: mb_core::config::redact_url(&cfg.database_url()),
                detail: "mb-rpcd is down; it is the daemon that reaches the database".into(),
                latency_micros: 0,
            }],
        };
        components.push(mb_runtime::probe::redis_ping(&cfg.text("redis.url"), timeout).await);
        // The scanners, as the first serving filter worker reaches them.
        let worker = rows
            .iter()
            .filter(|r| r.name.starts_with("mb-filter@"))
            .find_map(|r| r.probe.status.clone());
        for scanner in ["clamav", "rspamd"] {
            let enabled = cfg.bool(&format!("{scanner}.enabled"));
            let seen = worker
                .as_ref()
                .and_then(|w| w.components.iter().find(|c| c.name == scanner).cloned());
            components.push(match seen {
                Some(c) => c,
                None => ComponentStatus {
                    name: scanner.into(),
                    state: if enabled { "unknown" } else { "disabled" }.into(),
                    address: String::new(),
                    detail: if enabled {
                        "no mb-filter worker is up to check it".into()
                    } else {
                        String::new()
                    },
                    latency_micros: 0,
                },
            });
        }
        let cluster = cluster_status(&cfg, timeout).await;
        (rows, components, cluster)
    });

    let healthy = rows.iter().all(|r| !r.enabled || serving(&r.probe))
        && components
            .iter()
            .all(|c| c.state == "ok" || c.state == "disabled")
        && cluster
            .as_ref()
            .is_none_or(|c| c.nodes.iter().all(|n| n.state == "online"));
    if args.json {
        let daemons: Vec<Json> = rows.iter().map(row_json).collect();
        let comps: Vec<Json> = components
            .iter()
            .map(|c| {
                json!({"name": c.name, "state": c.state, "address": c.address, "detail": c.detail,
                       "latency_ms": c.latency_micros as f64 / 1000.0})
            })
            .collect();
        let cluster = cluster.as_ref().map(|c| {
            json!({"role": c.role, "name": c.name, "main": c.main, "state": c.state,
                   "config_version": c.config_version,
                   "nodes": c.nodes.iter().map(mb_runtime::cli::node_json).collect::<Vec<_>>()})
        });
        let out = json!({"healthy": healthy, "daemons": daemons, "components": comps, "cluster": cluster});
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        print_table(&rows, &components, args.verbose);
        if let Some(c) = &cluster {
            println!();
            println!(
                "cluster: {} {} (main {}), configuration version {}: {}",
                c.role, c.name, c.main, c.config_version, c.state
            );
            print!("{}", mb_runtime::cli::node_table(&c.nodes, now_ms()));
        }
    }
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn serving(p: &DaemonStatus) -> bool {
    p.reachable
        && p.status
            .as_ref()
            .is_some_and(|s| s.state == ServingState::Serving as i32)
}

fn state_word(r: &Row) -> &'static str {
    match &r.probe.status {
        None if r.enabled => "down",
        None => "stopped",
        Some(s) => match ServingState::try_from(s.state) {
            Ok(ServingState::Serving) => "running",
            Ok(ServingState::Degraded) => "degraded",
            Ok(ServingState::Draining) => "draining",
            _ => "not-serving",
        },
    }
}

fn row_json(r: &Row) -> Json {
    let s: Option<&StatusResponse> = r.probe.status.as_ref();
    json!({
        "name": r.name,
        "enabled": r.enabled,
        "state": state_word(r),
        "socket": r.probe.socket,
        "pid": s.map(|s| s.pid),
        "uptime_seconds": s.map(|s| s.uptime_seconds),
        "version": s.map(|s| s.version.clone()),
        "listening": s.map(|s| s.listening.clone()).unwrap_or_default(),
        "counters": s.map(|s| s.counters.clone()).unwrap_or_default(),
        "config_generation": s.map(|s| s.config_generation),
        "error": (!r.probe.error.is_empty()).then(|| r.probe.error.clone()),
    })
}

fn print_table(rows: &[Row], components: &[ComponentStatus], verbose: bool) {
    println!(
        "{:<14} {:<11} {:>7} {:>9} {:<26} FIGURES",
        "DAEMON", "STATE", "PID", "UPTIME", "LISTENING"
    );
    for r in rows {
        let state = state_word(r);
        match &r.probe.status {
            Some(s) => println!(
                "{:<14} {:<11} {:>7} {:>9} {:<26} {}",
                r.name,
                state,
                s.pid,
                mb_runtime::cli::age(s.uptime_seconds),
                if s.listening.is_empty() {
                    "-".to_string()
                } else {
                    s.listening.join(" ")
                },
                figures(&r.name, s)
            ),
            None => println!(
                "{:<14} {:<11} {:>7} {:>9} {:<26} {}",
                r.name,
                state,
                "-",
                "-",
                "-",
                mb_runtime::cli::printable(&r.probe.error)
            ),
        }
    }
    if verbose {
        for r in rows {
            let Some(s) = &r.probe.status else { continue };
            println!();
            println!(
                "{} (version {}, pid {}): {}",
                r.name, s.version, s.pid, s.detail
            );
            let sorted: std::collections::BTreeMap<_, _> = s.counters.iter().collect();
            for (k, v) in sorted {
                println!("  {k:<32} {v}");
            }
        }
    }
    println!();
    for c in components {
        let latency = if c.state == "ok" {
            format!(" ({:.1} ms)", c.latency_micros as f64 / 1000.0)
        } else {
            String::new()
        };
        let detail = if c.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", c.detail)
        };
        let address = if c.address.is_empty() {
            String::new()
        } else {
            format!(" {}", c.address)
        };
        println!("{:<14} {}{address}{latency}{detail}", c.name, c.state);
    }
}

/// The two or three figures that matter for a daemon, in words; the rest is behind
/// `--verbose`.
fn figures(name: &str, s: &StatusResponse) -> String {
    let n = |key: &str| s.counters.get(key).copied().unwrap_or(0);
    let per_minute = |key: &str| {
        let minutes = (s.uptime_seconds.max(1) as f64) / 60.0;
        n(key) as f64 / minutes
    };
    let program = name.split('@').next().unwrap_or(name);
    match program {
        "mb-smtpd" => {
            let queued = n("queue_incoming") + n("queue_deferred");
            let oldest = if queued > 0 {
                format!(
                    " (oldest {})",
                    mb_runtime::cli::age(n("queue_oldest_age_seconds"))
                )
            } else {
                String::new()
            };
            format!(
                "sessions {}, queue {queued}{oldest}, held {}, delivered {}, bounced {}",
                n("connections_active"),
                n("queue_hold"),
                n("delivered"),
                n("bounced")
            )
        }
        "mb-filter" => format!(
            "scans {:.1}/min, in flight {}, rejected {}, quarantined {}, tempfailed {}",
            per_minute("scanned"),
            n("in_flight"),
            n("rejected"),
            n("quarantined"),
            n("tempfailed")
        ),
        "mb-milter" => format!(
            "sessions {}, messages {:.1}/min, rejected {}, tempfailed {}, unscanned {}",
            n("active"),
            per_minute("messages"),
            n("rejected"),
            n("tempfailed"),
            n("unscanned")
        ),
        "mb-web" => format!(
            "requests {:.1}/min, connections {}, 5xx {}, rate limited {}",
            per_minute("requests"),
            n("connections_active"),
            n("responses_5xx"),
            n("rate_limited")
        ),
        "mb-cluster" if s.counters.contains_key("nodes") => format!(
            "nodes {}, configuration version {}",
            n("nodes"),
            n("config_version")
        ),
        _ => mb_runtime::cli::printable(&s.detail).into_owned(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0))
}

/// The cluster as this node's mb-cluster sees it; `None` when mb-cluster does not run
/// here or the node is in no cluster.
async fn cluster_status(
    cfg: &mb_core::Config,
    timeout: Duration,
) -> Option<mb_proto::v1::ClusterStatusResponse> {
    let socket = cfg.socket("mb-cluster");
    if !socket.exists() {
        return None;
    }
    let ask = async {
        let ch = mb_runtime::uds::connect(&socket, "mb-cluster").await.ok()?;
        mb_proto::v1::cluster_client::ClusterClient::new(ch)
            .status(mb_proto::v1::ClusterStatusRequest {})
            .await
            .ok()
    };
    let r = tokio::time::timeout(timeout, ask).await.ok()??.into_inner();
    (r.enabled && !r.role.is_empty()).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(uptime: u64, counters: &[(&str, u64)]) -> StatusResponse {
        StatusResponse {
            uptime_seconds: uptime,
            counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            detail: "hub \u{1b}[31m".into(),
            ..Default::default()
        }
    }

    #[test]
    fn each_daemon_shows_the_figures_that_matter() {
        let smtpd = status(
            600,
            &[
                ("connections_active", 3),
                ("queue_incoming", 1),
                ("queue_deferred", 4),
                ("queue_oldest_age_seconds", 125),
                ("queue_hold", 2),
                ("delivered", 90),
                ("bounced", 1),
                ("mail", 7),
            ],
        );
        assert_eq!(
            figures("mb-smtpd", &smtpd),
            "sessions 3, queue 5 (oldest 2m5s), held 2, delivered 90, bounced 1"
        );
        let filter = status(120, &[("scanned", 30), ("in_flight", 2), ("rejected", 4)]);
        assert_eq!(
            figures("mb-filter@2", &filter),
            "scans 15.0/min, in flight 2, rejected 4, quarantined 0, tempfailed 0"
        );
        let web = status(
            60,
            &[
                ("requests", 30),
                ("connections_active", 2),
                ("rate_limited", 5),
            ],
        );
        assert_eq!(
            figures("mb-web", &web),
            "requests 30.0/min, connections 2, 5xx 0, rate limited 5"
        );
        // A daemon without figures of its own shows its detail, made printable.
        assert_eq!(figures("mb-rpcd", &status(5, &[])), "hub \\x1b[31m");
    }
}
