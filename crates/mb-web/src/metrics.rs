//! `GET /metrics`: the node in the Prometheus/OpenMetrics text format, built at each
//! scrape from every daemon's `Control.Status` (the same probes as `mb-status`), the
//! queue sizes mb-smtpd reports and the quarantine's size from mb-rpcd.
//!
//! Who may scrape: an administrator, that is root or mb-web's own user on the socket, or
//! a client with an admin API key (`Authorization: Bearer`, Prometheus's
//! `authorization.credentials`). The figures say how much mail the site handles and
//! which daemons are down, which is not for everyone who can reach port 443.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use mb_proto::v1::ListQuarantineRequest;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::api::status::{self, Snapshot, serving};
use crate::problem::Problem;
use crate::state::AppState;

/// OpenMetrics, for a scraper that asks for it in `Accept`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format (0.0.4), served otherwise: what `promtool check metrics`
/// and older scrapers read.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// The node's metrics in the Prometheus text format (OpenMetrics when asked for).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Prometheus text format 0.0.4, or OpenMetrics 1.0 when the Accept header asks for application/openmetrics-text", body = String, content_type = "text/plain"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json")
    )
)]
async fn metrics(
    _admin: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let snap = status::gather(&state).await;
    let quarantine = quarantine_size(&state).await;
    let text = render(&snap, quarantine).map_err(|e| Problem::internal(e.to_string()))?;
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let (text, kind) = if openmetrics {
        (text, OPENMETRICS)
    } else {
        (prometheus_text(&text), PROMETHEUS_TEXT)
    };
    let mut resp = text.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    Ok(resp)
}

/// OpenMetrics text as the Prometheus text format: a counter's HELP and TYPE name its
/// `_total` samples, and the UNIT and EOF lines (unknown there) go; the unit stays in
/// the metric's name.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Messages and bytes in the quarantine, when mb-rpcd answers.
pub(crate) async fn quarantine_size(state: &AppState) -> Option<(u64, u64)> {
    let r = state
        .call("mb-rpcd", |ch| async move {
            mb_proto::v1::quarantine_client::QuarantineClient::new(ch)
                .list(ListQuarantineRequest {
                    limit: 1,
                    ..Default::default()
                })
                .await
        })
        .await
        .ok()?;
    Some((r.total, r.total_bytes))
}

/// The exposition text of a snapshot.
pub fn render(snap: &Snapshot, quarantine: Option<(u64, u64)>) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("mailborder");

    let up = Family::<Labels, Gauge>::default();
    let started = Family::<Labels, Gauge>::default();
    for (enabled, d) in &snap.daemons {
        if !enabled && !d.reachable {
            continue;
        }
        let labels = vec![("daemon".to_string(), d.name.clone())];
        up.get_or_create(&labels).set(i64::from(serving(d)));
        if let Some(s) = &d.status {
            started.get_or_create(&labels).set(s.started_at_unix);
        }
    }
    reg.register(
        "up",
        "Whether the daemon answers on its socket and serves (1) or not (0)",
        up,
    );
    reg.register_with_unit(
        "daemon_start_time",
        "When the daemon started, in seconds since the Unix epoch",
        Unit::Seconds,
        started,
    );

    let component_up = Family::<Labels, Gauge>::default();
    let latency = Family::<Labels, FloatGauge>::default();
    for c in &snap.components {
        if c.state == "disabled" {
            continue;
        }
        let labels = vec![("component".to_string(), c.name.clone())];
        component_up
            .get_or_create(&labels)
            .set(i64::from(c.state == "ok"));
        if c.state == "ok" {
            latency
                .get_or_create(&labels)
                .set(c.latency_micros as f64 / 1e6);
        }
    }
    reg.register(
        "component_up",
        "Whether a dependency answers (database and Redis as mb-rpcd reaches them, scanners as a filter worker does)",
        component_up,
    );
    reg.register_with_unit(
        "component_latency",
        "How long the last check of a dependency took",
        Unit::Seconds,
        latency,
    );

    // Queue sizes, as mb-smtpd counts its spool.
    if let Some(s) = snap.status_of("mb-smtpd") {
        let queue = Family::<Labels, Gauge>::default();
        for q in ["incoming", "deferred", "hold"] {
            if let Some(n) = s.counters.get(&format!("queue_{q}")) {
                queue
                    .get_or_create(&vec![("queue".to_string(), q.to_string())])
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
        reg.register(
            "queue_messages",
            "Messages in mb-smtpd's queue, by queue",
            queue,
        );
        if let Some(age) = s.counters.get("queue_oldest_age_seconds") {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(*age).unwrap_or(i64::MAX));
            reg.register_with_unit(
                "queue_oldest_age",
                "Age of the oldest message waiting in the incoming or deferred queue",
                Unit::Seconds,
                g,
            );
        }
    }
    if let Some((messages, bytes)) = quarantine {
        let m = Gauge::<i64>::default();
        m.set(i64::try_from(messages).unwrap_or(i64::MAX));
        reg.register("quarantine_messages", "Messages in the quarantine", m);
        let b = Gauge::<i64>::default();
        b.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        reg.register_with_unit(
            "quarantine_size",
            "Size of the quarantined messages",
            Unit::Bytes,
            b,
        );
    }
    if let Some(c) = &snap.cluster {
        let online = Family::<Labels, Gauge>::default();
        for n in &c.nodes {
            online
                .get_or_create(&vec![("node".to_string(), n.name.clone())])
                .set(i64::from(n.state == "online"));
        }
        reg.register(
            "cluster_node_online",
            "Whether a cluster node is online",
            online,
        );
    }

    // Every other counter each daemon reports, one family per program and name, labelled
    // by daemon (the filter workers share theirs).
    let mut counters: BTreeMap<(String, String), Vec<(String, u64)>> = BTreeMap::new();
    for (_, d) in &snap.daemons {
        let Some(s) = &d.status else { continue };
        let program = d.name.split('@').next().unwrap_or(&d.name);
        let short = program.trim_start_matches("mb-").replace('-', "_");
        for (name, v) in &s.counters {
            if program == "mb-smtpd" && (name.starts_with("queue_")) {
                continue; // above, as mailborder_queue_*
            }
            counters
                .entry((short.clone(), name.clone()))
                .or_default()
                .push((d.name.clone(), *v));
        }
    }
    for ((program, name), values) in counters {
        let Some(name) = metric_name(&name) else {
            continue;
        };
        let help = format!("{} (mb-{program}'s Control.Status counter)", name.help);
        let full = format!("{program}_{}", name.stem);
        let labels = |daemon: &str| vec![("daemon".to_string(), daemon.to_string())];
        match name.kind {
            Kind::Counter => {
                let f = Family::<Labels, Counter>::default();
                for (daemon, v) in values {
                    f.get_or_create(&labels(&daemon)).inc_by(v);
                }
                reg.register(full, help, f);
            }
            Kind::Gauge => {
                let f = Family::<Labels, Gauge>::default();
                for (daemon, v) in values {
                    f.get_or_create(&labels(&daemon))
                        .set(i64::try_from(v).unwrap_or(i64::MAX));
                }
                reg.register(full, help, f);
            }
            Kind::Seconds(divisor) => {
                let f = Family::<Labels, FloatGauge>::default();
                for (daemon, v) in values {
                    f.get_or_create(&labels(&daemon)).set(v as f64 / divisor);
                }
                reg.register_with_unit(full, help, Unit::Seconds, f);
            }
        }
    }
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

enum Kind {
    /// Only ever grows: exposed as `NAME_total`.
    Counter,
    /// Goes up and down (sessions open, messages in flight, sizes).
    Gauge,
    /// A duration in microseconds (1e6) or milliseconds (1e3), exposed in seconds.
    Seconds(f64),
}

struct Name {
    stem: String,
    kind: Kind,
    help: String,
}

/// What a daemon's counter is, by its name: durations are converted to seconds (the
/// base unit Prometheus asks for), levels are gauges, everything else counts events.
fn metric_name(name: &str) -> Option<Name> {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() || clean.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    for (suffix, divisor) in [("_micros", 1e6), ("_ms", 1e3), ("_millis", 1e3)] {
        if let Some(stem) = clean.strip_suffix(suffix) {
            return Some(Name {
                stem: stem.to_string(),
                kind: Kind::Seconds(divisor),
                help: name.replace('_', " "),
            });
        }
    }
    const LEVELS: &[&str] = &[
        "active",
        "in_flight",
        "inflight",
        "_now",
        "nodes",
        "version",
        "listed",
        "open",
        "pending",
        "size",
        "_age",
        "workers",
        "generation",
    ];
    let gauge = LEVELS.iter().any(|l| clean.contains(l));
    let stem = clean.strip_suffix("_total").unwrap_or(&clean).to_string();
    Some(Name {
        stem,
        kind: if gauge { Kind::Gauge } else { Kind::Counter },
        help: name.replace('_', " "),
    })
}

#[cfg(test)]
mod tests {
    use mb_proto::v1::{ComponentStatus, DaemonStatus, ServingState, StatusResponse};

    use super::*;

    fn daemon(name: &str, counters: &[(&str, u64)]) -> (bool, DaemonStatus) {
        (
            true,
            DaemonStatus {
                name: name.into(),
                reachable: true,
                status: Some(StatusResponse {
                    state: ServingState::Serving as i32,
                    started_at_unix: 1_700_000_000,
                    counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
    }

    #[test]
    fn counters_become_typed_families_with_units() {
        let snap = Snapshot {
            daemons: vec![
                daemon(
                    "mb-smtpd",
                    &[
                        ("delivered", 5),
                        ("connections_active", 2),
                        ("queue_deferred", 3),
                    ],
                ),
                daemon(
                    "mb-filter@1",
                    &[("scanned", 4), ("scan_latency_avg_micros", 1500)],
                ),
                daemon("mb-filter@2", &[("scanned", 6)]),
                (
                    true,
                    DaemonStatus {
                        name: "mb-milter".into(),
                        error: "mb-milter is not running".into(),
                        ..Default::default()
                    },
                ),
            ],
            components: vec![ComponentStatus {
                name: "database".into(),
                state: "ok".into(),
                latency_micros: 250,
                ..Default::default()
            }],
            cluster: None,
        };
        let text = render(&snap, Some((7, 4096))).unwrap();
        for line in [
            "mailborder_up{daemon=\"mb-smtpd\"} 1",
            "mailborder_up{daemon=\"mb-milter\"} 0",
            "# TYPE mailborder_smtpd_delivered counter",
            "mailborder_smtpd_delivered_total{daemon=\"mb-smtpd\"} 5",
            "# TYPE mailborder_smtpd_connections_active gauge",
            "mailborder_filter_scanned_total{daemon=\"mb-filter@1\"} 4",
            "mailborder_filter_scanned_total{daemon=\"mb-filter@2\"} 6",
            "# UNIT mailborder_filter_scan_latency_avg_seconds seconds",
            "mailborder_filter_scan_latency_avg_seconds{daemon=\"mb-filter@1\"} 0.0015",
            "mailborder_queue_messages{queue=\"deferred\"} 3",
            "mailborder_quarantine_messages 7",
            "mailborder_quarantine_size_bytes 4096",
            "mailborder_component_up{component=\"database\"} 1",
            "# HELP mailborder_smtpd_delivered delivered (mb-smtpd's Control.Status counter).",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("smtpd_queue_deferred"), "{text}");
        // The Prometheus text format names a counter's family by its samples.
        let prom = prometheus_text(&text);
        assert!(
            prom.contains("# TYPE mailborder_smtpd_delivered_total counter\n"),
            "{prom}"
        );
        assert!(
            prom.contains("# HELP mailborder_smtpd_delivered_total delivered"),
            "{prom}"
        );
        assert!(
            prom.contains("# TYPE mailborder_smtpd_connections_active gauge\n"),
            "{prom}"
        );
        assert!(
            !prom.contains("# UNIT") && !prom.contains("# EOF"),
            "{prom}"
        );
    }
}
