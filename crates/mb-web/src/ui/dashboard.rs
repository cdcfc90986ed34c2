//! The dashboard: the node's daemons, components and cluster (administrators), queue
//! and quarantine sizes, and the mail of the last day or week: messages by verdict as an
//! SVG chart (plotters), viruses, the top senders and sender domains.
//!
//! The figures come from mb-rpcd's hourly statistics rollups (`api::stats::stats`, so a
//! domain admin's are of its domains only). When those cannot be had (an mb-rpcd
//! without them), the message log search (`api::log::search`, scoped the same way) is
//! counted instead: up to [`EVENT_LIMIT`] scan events of the period, per hour.

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::get;
use maud::html;
use plotters::prelude::*;
use serde::Deserialize;

use super::{Nav, Staff};
use crate::access::{Admin, Signed};
use crate::api::log::{Event, LogQuery};
use crate::auth::Role;
use crate::problem::Problem;
use crate::state::AppState;

/// The most scan events a chart counts.
pub const EVENT_LIMIT: u32 = 50_000;
/// The verdicts drawn, each in its colour.
const SERIES: &[(&str, RGBColor)] = &[
    ("accept", RGBColor(29, 122, 58)),
    ("tag", RGBColor(201, 138, 0)),
    ("quarantine", RGBColor(143, 63, 191)),
    ("reject", RGBColor(179, 38, 30)),
    ("tempfail", RGBColor(93, 104, 117)),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui/", get(dashboard))
        .route("/ui/chart/verdicts.svg", get(chart))
}

/// The period shown.
#[derive(Debug, Default, Deserialize)]
pub struct Period {
    /// `day` (default) or `week`.
    pub range: Option<String>,
}

impl Period {
    fn hours(&self) -> i64 {
        if self.range.as_deref() == Some("week") {
            7 * 24
        } else {
            24
        }
    }

    fn name(&self) -> &'static str {
        if self.hours() > 24 { "week" } else { "day" }
    }
}

/// The scan events of the period that the principal may see.
async fn scans(state: &AppState, ui: &super::Ui, hours: i64) -> Result<Vec<Event>, Problem> {
    let q = LogQuery {
        since: Some(format!("{hours}h")),
        stage: Some("scanned".into()),
        limit: Some(EVENT_LIMIT),
        ..Default::default()
    };
    let axum::Json(events) =
        crate::api::log::search(Signed(ui.who.clone()), State(state.clone()), Query(q)).await?;
    Ok(events)
}

/// Counts per verdict per hour, oldest hour first.
fn per_hour(events: &[Event], now_ms: i64, hours: i64) -> BTreeMap<&'static str, Vec<u64>> {
    let mut out = empty(hours);
    for e in events {
        let age_h = (now_ms - e.at_unix_ms).div_euclid(3_600_000);
        if !(0..hours).contains(&age_h) {
            continue;
        }
        let slot = usize::try_from(hours - 1 - age_h).unwrap_or(0);
        if let Some((name, _)) = SERIES.iter().find(|(v, _)| *v == e.verdict)
            && let Some(series) = out.get_mut(name)
        {
            series[slot] += 1;
        }
    }
    out
}

/// The `n` most frequent values, most frequent first (ties by name).
fn top<'a>(values: impl Iterator<Item = &'a str>, n: usize) -> Vec<(String, u64)> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for v in values.filter(|v| !v.is_empty()) {
        *counts.entry(v).or_default() += 1;
    }
    let mut list: Vec<(String, u64)> = counts
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    list.truncate(n);
    list
}

fn is_virus(e: &Event) -> bool {
    e.symbols.iter().any(|s| s.starts_with("VIRUS"))
}

/// What the dashboard shows of the period's mail.
pub struct Figures {
    /// Messages per verdict per hour, oldest hour first.
    pub per_hour: BTreeMap<&'static str, Vec<u64>>,
    pub scanned: u64,
    pub viruses: u64,
    pub top_senders: Vec<(String, u64)>,
    pub top_domains: Vec<(String, u64)>,
    /// The viruses by name (the message log has them; the rollups count only).
    pub virus_names: Option<Vec<(String, u64)>>,
    /// `statistics rollups` or `message log`.
    pub source: &'static str,
}

impl Figures {
    fn verdict(&self, v: &str) -> u64 {
        self.per_hour.get(v).map_or(0, |s| s.iter().sum())
    }
}

fn entries(list: Vec<crate::api::stats::TopEntry>) -> Vec<(String, u64)> {
    list.into_iter().map(|e| (e.value, e.messages)).collect()
}

/// From the rollups: scanned messages (either direction) by verdict per hour.
fn from_rollups(r: crate::api::stats::Report, now_ms: i64, hours: i64) -> Figures {
    let mut per_hour = empty(hours);
    let this_hour = now_ms.div_euclid(3_600_000);
    let (mut scanned, mut viruses) = (0, 0);
    for b in &r.buckets {
        let age_h = this_hour - b.start_unix.div_euclid(3600);
        for c in b.counts.iter().filter(|c| c.stage == "scanned") {
            scanned += c.messages;
            viruses += c.viruses;
            if (0..hours).contains(&age_h)
                && let Some(series) = per_hour.get_mut(c.verdict.as_str())
            {
                series[usize::try_from(hours - 1 - age_h).unwrap_or(0)] += c.messages;
            }
        }
    }
    Figures {
        per_hour,
        scanned,
        viruses,
        top_senders: entries(r.top.senders),
        top_domains: entries(r.top.sender_domains),
        virus_names: None,
        source: "statistics rollups",
    }
}

/// From the message log's scan events.
fn from_events(events: &[Event], now_ms: i64, hours: i64) -> Figures {
    Figures {
        per_hour: per_hour(events, now_ms, hours),
        scanned: events.len() as u64,
        viruses: events.iter().filter(|e| is_virus(e)).count() as u64,
        top_senders: top(events.iter().map(|e| e.sender.as_str()), 10),
        top_domains: top(
            events
                .iter()
                .map(|e| e.sender.rsplit_once('@').map_or("", |(_, d)| d)),
            10,
        ),
        virus_names: Some(top(
            events.iter().flat_map(|e| {
                e.symbols
                    .iter()
                    .filter(|s| s.starts_with("VIRUS"))
                    .map(String::as_str)
            }),
            10,
        )),
        source: "message log",
    }
}

/// The period's figures: the rollups, or the message log when they cannot be had.
async fn figures(state: &AppState, ui: &super::Ui, hours: i64) -> Result<Figures, Problem> {
    let asked = crate::api::stats::StatsParams {
        from: Some(format!("{hours}h")),
        step: Some("hour".into()),
        top: Some(10),
        ..Default::default()
    };
    let now = now_ms();
    match crate::api::stats::stats(Signed(ui.who.clone()), State(state.clone()), Query(asked)).await
    {
        Ok(r) => Ok(from_rollups(r.0, now, hours)),
        Err(p) => {
            tracing::debug!(cause = ?p.detail, "no statistics rollups: counting the message log");
            Ok(from_events(&scans(state, ui, hours).await?, now, hours))
        }
    }
}

fn empty(hours: i64) -> BTreeMap<&'static str, Vec<u64>> {
    SERIES
        .iter()
        .map(|(v, _)| (*v, vec![0; usize::try_from(hours).unwrap_or(24)]))
        .collect()
}

fn now_ms() -> i64 {
    crate::auth::now() * 1000
}

async fn dashboard(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Query(period): Query<Period>,
) -> Response {
    let admin = ui.who.role == Role::Admin;
    let status = if admin {
        Some(crate::api::status::gather(&state).await.view())
    } else {
        None
    };
    let queue = if admin {
        crate::api::queue::list(
            Admin(ui.who.clone()),
            State(state.clone()),
            Query(crate::api::queue::Which::default()),
        )
        .await
        .ok()
        .map(|j| j.0)
    } else {
        None
    };
    let quarantine = if admin {
        crate::metrics::quarantine_size(&state).await
    } else {
        None
    };
    let events = figures(&state, &ui, period.hours()).await;
    let body = html! {
        p.muted {
            "Period: "
            @for (name, label) in [("day", "last 24 hours"), ("week", "last 7 days")] {
                @if period.name() == name { strong { (label) } } @else { a href={ "/ui/?range=" (name) } { (label) } }
                " "
            }
        }
        div.cards {
            @if let Some(q) = &queue {
                @for which in ["incoming", "deferred", "hold"] {
                    div.card {
                        div.muted { "Queue: " (which) }
                        div.big { (q.iter().filter(|e| e.queue == which).count()) }
                    }
                }
            }
            @if let Some((messages, bytes)) = quarantine {
                div.card { div.muted { "Quarantine" } div.big { (messages) } div.small { (super::size(bytes)) } }
            }
            @if let Ok(ev) = &events {
                div.card { div.muted { "Scanned (" (period.name()) ")" } div.big { (ev.scanned) } }
                div.card { div.muted { "Viruses (" (period.name()) ")" } div.big { (ev.viruses) } }
                @for (verdict, _) in SERIES {
                    div.card { div.muted { (verdict) } div.big { (ev.verdict(verdict)) } }
                }
            }
        }
        @match &events {
            Ok(ev) => {
                h2 { "Messages by verdict" }
                div.charts {
                    img src={ "/ui/chart/verdicts.svg?range=" (period.name()) } width="760" height="300" alt="Messages by verdict per hour";
                }
                div.cards {
                    div {
                        h2 { "Top senders" }
                        (top_table("Sender", &ev.top_senders))
                    }
                    div {
                        h2 { "Top sender domains" }
                        (top_table("Domain", &ev.top_domains))
                    }
                    @if let Some(names) = &ev.virus_names {
                        div {
                            h2 { "Viruses" }
                            (top_table("Symbol", names))
                        }
                    }
                }
                p.muted.small { "From the " (ev.source) "." }
            }
            Err(p) => p.error { "No statistics: " (p.detail.as_deref().unwrap_or(&p.title)) }
        }
        @if let Some(s) = &status {
            h2 { "Daemons" }
            table {
                thead { tr { th { "Daemon" } th { "State" } th { "PID" } th.num { "Uptime (s)" } th { "Listening" } th { "Version" } } }
                tbody {
                    @for d in &s.daemons {
                        tr {
                            td { (d.name) }
                            td { span class={ "state-" (d.state) } { (d.state) } @if let Some(e) = &d.error { div.small { (e) } } }
                            td { (d.pid.map(|p| p.to_string()).unwrap_or_default()) }
                            td.num { (d.uptime_seconds.map(|u| u.to_string()).unwrap_or_default()) }
                            td { (d.listening.join(" ")) }
                            td { (d.version.clone().unwrap_or_default()) }
                        }
                    }
                }
            }
            h2 { "Components" }
            table {
                thead { tr { th { "Component" } th { "State" } th { "Address" } th { "Detail" } th.num { "Latency (ms)" } } }
                tbody {
                    @for c in &s.components {
                        tr {
                            td { (c.name) }
                            td { span class={ "state-" (c.state) } { (c.state) } }
                            td { (c.address) }
                            td { (c.detail) }
                            td.num { (format!("{:.1}", c.latency_ms)) }
                        }
                    }
                }
            }
            @if let Some(c) = &s.cluster {
                h2 { "Cluster" }
                p { "This node: " (c.name) " (" (c.role) "), " (c.state) ", configuration version " (c.config_version) }
                table {
                    thead { tr { th { "Node" } th { "Role" } th { "State" } th { "Address" } th.num { "Queue" } th.num { "Load" } th { "Last seen" } } }
                    tbody {
                        @for n in &c.nodes {
                            tr {
                                td { (n.name) } td { (n.role) }
                                td { span class={ "state-" (n.state.replace(' ', "-")) } { (n.state) } }
                                td { (n.address) } td.num { (n.queue_depth) } td.num { (format!("{:.2}", n.load)) }
                                td { (super::time(n.last_seen_unix_ms / 1000)) }
                            }
                        }
                    }
                }
            }
            p.muted { "Healthy: " (if s.healthy { "yes" } else { "no" }) }
        }
    };
    ui.page("Dashboard", Nav::Dashboard, body)
}

fn top_table(what: &str, rows: &[(String, u64)]) -> maud::Markup {
    html! {
        table {
            thead { tr { th { (what) } th.num { "Messages" } } }
            tbody {
                @for (name, n) in rows { tr { td.wrap { (name) } td.num { (n) } } }
                @if rows.is_empty() { tr { td.muted colspan="2" { "none" } } }
            }
        }
    }
}

/// The messages-by-verdict chart as SVG.
async fn chart(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Query(period): Query<Period>,
) -> Response {
    let hours = period.hours();
    let figures = match figures(&state, &ui, hours).await {
        Ok(f) => f,
        Err(p) => return ui.problem(&p),
    };
    let svg = match draw(&figures.per_hour, hours) {
        Ok(svg) => svg,
        Err(e) => return ui.problem(&Problem::internal(e.to_string())),
    };
    let mut resp = Response::new(Body::from(svg));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    resp
}

/// What plotters said when a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing the chart: {0}")]
pub struct ChartError(String);

/// Draws one line per verdict; hours on the x axis (0 = the oldest hour).
fn draw(counts: &BTreeMap<&'static str, Vec<u64>>, hours: i64) -> Result<String, ChartError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| ChartError(e.to_string()))?;
        let max = counts
            .values()
            .flat_map(|v| v.iter().copied())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(40)
            .build_cartesian_2d(0i64..hours, 0u64..max + max / 10 + 1)
            .map_err(|e| ChartError(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("hours ago")
            .x_label_formatter(&|h| (hours - h).to_string())
            .draw()
            .map_err(|e| ChartError(e.to_string()))?;
        for (verdict, colour) in SERIES {
            let Some(series) = counts.get(verdict) else {
                continue;
            };
            let points = series
                .iter()
                .enumerate()
                .map(|(i, n)| (i64::try_from(i).unwrap_or(0), *n));
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|e| ChartError(e.to_string()))?
                .label(*verdict)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], *colour));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| ChartError(e.to_string()))?;
        root.present().map_err(|e| ChartError(e.to_string()))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(verdict: &str, ago_ms: i64, sender: &str) -> Event {
        Event {
            at_unix_ms: 10_000_000_000 - ago_ms,
            node: String::new(),
            daemon: String::new(),
            queue_id: String::new(),
            message_id: String::new(),
            client_ip: String::new(),
            helo: String::new(),
            sender: sender.into(),
            recipients: Vec::new(),
            subject: String::new(),
            size: 0,
            stage: "scanned".into(),
            verdict: verdict.into(),
            score: 0.0,
            symbols: Vec::new(),
            detail: String::new(),
        }
    }

    #[test]
    fn events_are_counted_per_hour_and_verdict() {
        let now = 10_000_000_000;
        let evs = [
            event("accept", 10, "a@x.test"),
            event("accept", 3_600_000 + 5, "a@x.test"),
            event("reject", 10, "b@y.test"),
            // Older than the period: not counted.
            event("accept", 25 * 3_600_000, "a@x.test"),
        ];
        let c = per_hour(&evs, now, 24);
        assert_eq!(c["accept"][23], 1);
        assert_eq!(c["accept"][22], 1);
        assert_eq!(c["accept"].iter().sum::<u64>(), 2);
        assert_eq!(c["reject"][23], 1);
        assert_eq!(
            top(evs.iter().map(|e| e.sender.as_str()), 1),
            [("a@x.test".to_string(), 3)]
        );
        let f = from_events(&evs, now, 24);
        assert_eq!((f.scanned, f.verdict("accept"), f.viruses), (4, 2, 0));
        let svg = draw(&c, 24).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
        assert!(svg.contains("quarantine"), "the legend names the verdicts");
    }

    #[test]
    fn rollups_are_counted_per_hour_and_verdict() {
        use crate::api::stats::{Bucket, Count, Report, Top};
        let now = 10_000 * 3_600_000 + 120_000;
        let count = |stage: &str, verdict: &str, messages, viruses| Count {
            direction: "inbound".into(),
            stage: stage.into(),
            verdict: verdict.into(),
            messages,
            recipients: messages,
            bytes: 0,
            viruses,
        };
        let r = Report {
            from_unix: 0,
            to_unix: 0,
            step: "hour".into(),
            domains: Vec::new(),
            buckets: vec![
                Bucket {
                    start_unix: 10_000 * 3600,
                    counts: vec![
                        count("scanned", "accept", 3, 0),
                        count("rejected", "reject", 9, 0),
                    ],
                },
                Bucket {
                    start_unix: 9_998 * 3600,
                    counts: vec![count("scanned", "quarantine", 2, 1)],
                },
            ],
            totals: Vec::new(),
            top: Top {
                senders: Vec::new(),
                recipients: Vec::new(),
                clients: Vec::new(),
                sender_domains: Vec::new(),
            },
        };
        let f = from_rollups(r, now, 24);
        assert_eq!(f.per_hour["accept"][23], 3);
        assert_eq!(f.per_hour["quarantine"][21], 2);
        // Refusals before the message was taken are not scans.
        assert_eq!(f.per_hour["reject"].iter().sum::<u64>(), 0);
        assert_eq!((f.scanned, f.viruses), (5, 1));
    }
}
