//! `GET /api/v1/stats`: the hourly statistics rollups mb-rpcd keeps (`Stats.Query`), as
//! `mb-stats --json` prints them. An administrator sees every message (or one domain's,
//! with `domain`); a domain administrator sees the rollups of their own domains only
//! (mb-rpcd keeps one per domain: the recipients' domains of inbound mail, the sender's
//! of outbound), added up, or one of them with `domain`; a user is refused, as the
//! statistics are about other people's mail.

use axum::Json;
use axum::extract::{Query, State};
use mb_proto::v1::stats_client::StatsClient;
use mb_proto::v1::{StatsCount, StatsQuery, StatsTopEntry};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Signed;
use crate::auth::{Principal, Role};
use crate::problem::Problem;
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stats))
}

/// The range and shape of a report.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// Start: an age or UTC time (30m, 24h, 7d, 2026-11-22 08:00); default 24h
    pub from: Option<String>,
    /// End: an age or UTC time; default now (its hour included)
    pub to: Option<String>,
    /// Bucket size: hour (default) or day (UTC days)
    pub step: Option<String>,
    /// Only this domain's messages (a domain admin: one of theirs)
    pub domain: Option<String>,
    /// Entries per top list (default 10, at most 100)
    pub top: Option<u32>,
}

/// Messages of one direction, stage and verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Count {
    /// inbound or outbound
    pub direction: String,
    /// scanned (the filter's verdict), or rejected, greylisted, deferred (refused by
    /// mb-smtpd before the message was taken)
    pub stage: String,
    /// accept, tag, quarantine, reject, tempfail, discard
    pub verdict: String,
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
    pub viruses: u64,
}

/// One hour or day with messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Bucket {
    /// Unix seconds of its start
    pub start_unix: i64,
    pub counts: Vec<Count>,
}

/// A value of a top list and its messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TopEntry {
    pub value: String,
    pub messages: u64,
}

/// The top lists of the range (each hour keeps its top 100 values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Top {
    pub senders: Vec<TopEntry>,
    pub recipients: Vec<TopEntry>,
    pub clients: Vec<TopEntry>,
    pub sender_domains: Vec<TopEntry>,
}

/// A statistics report, as `mb-stats --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Report {
    /// The range reported, hour-aligned Unix seconds: [from_unix, to_unix)
    pub from_unix: i64,
    pub to_unix: i64,
    pub step: String,
    /// The domains added up; empty for every message
    pub domains: Vec<String>,
    /// Only buckets with messages, in time order
    pub buckets: Vec<Bucket>,
    /// The whole range, per direction, stage and verdict
    pub totals: Vec<Count>,
    pub top: Top,
}

fn count(c: StatsCount) -> Count {
    Count {
        direction: c.direction,
        stage: c.stage,
        verdict: c.verdict,
        messages: c.messages,
        recipients: c.recipients,
        bytes: c.bytes,
        viruses: c.viruses,
    }
}

fn top(v: Vec<StatsTopEntry>) -> Vec<TopEntry> {
    v.into_iter()
        .map(|e| TopEntry {
            value: e.value,
            messages: e.messages,
        })
        .collect()
}

/// The domains `p` gets the statistics of for `asked`: refused for a user, and for a
/// domain admin naming another domain; a domain admin's own domains when none is asked.
pub fn scope(p: &Principal, asked: Option<&str>) -> Result<Vec<String>, Problem> {
    let asked = asked
        .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty());
    match (p.role, asked) {
        (Role::User, _) => Err(Problem::forbidden(format!(
            "{} may not see statistics (administrators and domain administrators only)",
            p.name
        ))),
        (Role::Admin, asked) => Ok(asked.into_iter().collect()),
        (Role::DomainAdmin, Some(d)) => {
            crate::auth::require_domain(p, &d)?;
            Ok(vec![d])
        }
        (Role::DomainAdmin, None) if p.domains.is_empty() => Err(Problem::forbidden(format!(
            "{} administers no domain",
            p.name
        ))),
        (Role::DomainAdmin, None) => Ok(p.domains.clone()),
    }
}

/// Message statistics over a range, per hour or day.
#[utoipa::path(
    get,
    path = "/api/v1/stats",
    tag = "stats",
    params(StatsParams),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The rollups of the range", body = Report),
        (status = 400, description = "A bad range or step", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user, or a domain admin asking for another domain", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-rpcd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn stats(
    Signed(p): Signed,
    State(state): State<AppState>,
    Query(q): Query<StatsParams>,
) -> Result<Json<Report>, Problem> {
    let domains = scope(&p, q.domain.as_deref())?;
    let step = q.step.unwrap_or_else(|| "hour".into());
    if step != "hour" && step != "day" {
        return Err(Problem::bad_request(format!(
            "step must be hour or day, not {step:?}"
        )));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let time = |name: &str, v: &Option<String>, default: i64| -> Result<i64, Problem> {
        match v {
            Some(s) => mb_runtime::cli::parse_time(s, now)
                .map_err(|e| Problem::bad_request(format!("{name}: {e}"))),
            None => Ok(default),
        }
    };
    let from = time("from", &q.from, now - 86_400_000)? / 1000;
    let to = time("to", &q.to, now)? / 1000;
    if from >= to {
        return Err(Problem::bad_request("from must be before to"));
    }
    let query = StatsQuery {
        from_unix: from,
        to_unix: to,
        step: step.clone(),
        domains: domains.clone(),
        top: q.top.unwrap_or(10).clamp(1, 100),
    };
    let r = state
        .call("mb-rpcd", |ch| async move {
            StatsClient::new(ch).query(query).await
        })
        .await?;
    Ok(Json(Report {
        from_unix: r.from_unix,
        to_unix: r.to_unix,
        step,
        domains,
        buckets: r
            .buckets
            .into_iter()
            .map(|b| Bucket {
                start_unix: b.start_unix,
                counts: b.counts.into_iter().map(count).collect(),
            })
            .collect(),
        totals: r.totals.into_iter().map(count).collect(),
        top: Top {
            senders: top(r.top_senders),
            recipients: top(r.top_recipients),
            clients: top(r.top_clients),
            sender_domains: top(r.top_sender_domains),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role, domains: &[&str]) -> Principal {
        Principal {
            name: "p".into(),
            role,
            domains: domains.iter().map(|d| (*d).to_string()).collect(),
            addresses: vec!["p@a.test".into()],
        }
    }

    #[test]
    fn each_role_gets_its_own_scope() {
        let admin = who(Role::Admin, &[]);
        assert_eq!(scope(&admin, None).unwrap(), Vec::<String>::new());
        assert_eq!(scope(&admin, Some("B.test.")).unwrap(), ["b.test"]);
        let da = who(Role::DomainAdmin, &["a.test", "c.test"]);
        assert_eq!(scope(&da, None).unwrap(), ["a.test", "c.test"]);
        assert_eq!(scope(&da, Some("C.TEST")).unwrap(), ["c.test"]);
        assert_eq!(scope(&da, Some("b.test")).unwrap_err().status_code(), 403);
        assert_eq!(
            scope(&who(Role::DomainAdmin, &[]), None)
                .unwrap_err()
                .status_code(),
            403
        );
        assert_eq!(
            scope(&who(Role::User, &[]), None)
                .unwrap_err()
                .status_code(),
            403
        );
    }
}
