//! `/api/v1/recipients`: the valid recipients of recipient verification in `list` mode
//! (`smtp.recipient_verification`), what `mb-recipient` does (list, add, del, import)
//! through the same `Recipients` RPCs of mb-rpcd, with the same pattern rules
//! (`mb_core::recipients::Pattern`) and words.
//!
//! An administrator manages every pattern; a domain admin those of its domains; a user
//! none. A request that names another domain's pattern is refused whole with 403 before
//! mb-rpcd is asked anything, so the answer is the same whether that pattern is listed
//! or not. Changes are made for `web:NAME` (`super::acting`), the name mb-rpcd's log of
//! each change gives, as for the other areas.

use std::collections::BTreeSet;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use mb_core::recipients::{self as lists, Pattern, normalise};
use mb_proto::v1::recipients_client::RecipientsClient;
use mb_proto::v1::{
    ImportRecipientsRequest, ListRecipientsRequest, RecipientEntry, RecipientPatterns,
    RecipientsChanged,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::acting;
use crate::access::Signed;
use crate::auth::{Principal, Role, require_domain};
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";

/// The largest import body: about 300,000 typical addresses. The other routes keep the
/// server's 1 MiB (`server::MAX_BODY_BYTES`); beyond this, 413.
pub const MAX_IMPORT_BYTES: usize = 8 << 20;

/// Most patterns one import may carry: mb-rpcd's limit for one request
/// (`mb_rpcd::recipients::MAX_PATTERNS`), so what the API accepts mb-rpcd accepts.
pub const MAX_IMPORT_PATTERNS: usize = 100_000;

/// Patterns sent to mb-rpcd in one request, as mb-recipient sends an import, and at most
/// this many bytes of them (mb-rpcd reads messages of up to 4 MiB).
const CHUNK: usize = 20_000;
const CHUNK_BYTES: usize = 1 << 20;

/// Largest answer read from mb-rpcd: the whole list of a large directory (as the CLI).
const MAX_ANSWER: usize = 256 << 20;

/// A list page's default and largest size.
const DEFAULT_LIMIT: u32 = 1000;
const MAX_LIMIT: u32 = 100_000;

/// Refused lines named in one problem's detail; the rest are counted.
const SHOWN_ERRORS: usize = 20;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, add))
        .routes(routes!(remove_many))
        .routes(routes!(remove))
        .merge(
            OpenApiRouter::new()
                .routes(routes!(import))
                .layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)),
        )
}

/// A listed pattern, as `mb-recipient --json list` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Recipient {
    /// Lowercase: `user@example.org`, `*@example.org` or `sales-*@example.org`.
    pub pattern: String,
    pub comment: String,
    pub created_unix: i64,
}

/// A page of the list, sorted by pattern.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RecipientList {
    pub entries: Vec<Recipient>,
    /// Patterns of the domains asked for that the caller may see, before `search`.
    pub total: u64,
    /// Of those, the patterns matching `search`, whatever `limit` and `offset`: the
    /// pages end where `offset + entries` reaches it.
    pub matched: u64,
}

/// The filters and page of a list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this domain's patterns (as `mb-recipient list --domain`)
    pub domain: Option<String>,
    /// Only patterns or comments containing this text (ignoring case)
    pub search: Option<String>,
    /// At most this many (default 1000, at most 100000)
    pub limit: Option<u32>,
    /// Skip this many of the matching patterns (for paging; default 0)
    pub offset: Option<u32>,
}

/// Patterns to add or remove, as `mb-recipient add|del` takes them.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PatternsBody {
    /// `user@example.org`, `*@example.org` (or Postfix's `@example.org`), `sales-*@example.org`.
    pub patterns: Vec<String>,
    /// Stored with each added pattern.
    #[serde(default)]
    pub comment: String,
}

/// What an add or delete did, as `mb-recipient --json add|del` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Changed {
    pub added: u32,
    pub removed: u32,
    /// Already listed (add) or not listed (delete).
    pub unchanged: u32,
    /// Patterns refused, each with the reason; the others were applied.
    pub invalid: Vec<String>,
}

/// An import's options, as `mb-recipient import`'s.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// Make the list exactly the body's patterns (for a domain admin: the list of its
    /// domains); new ones are added before old ones are removed. Refused, with nothing
    /// changed, when a line is invalid.
    #[serde(default)]
    pub replace: bool,
    /// Stored with each added pattern
    #[serde(default)]
    pub comment: String,
}

/// A refused line of an import.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LineError {
    /// The line of a text body, or the position (from 1) in a JSON array.
    pub line: u32,
    pub pattern: String,
    /// mb-recipient's words for it.
    pub error: String,
}

/// What an import did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImportReport {
    pub added: u32,
    pub removed: u32,
    /// Already listed.
    pub unchanged: u32,
    /// Lines refused (not applied); the others were.
    pub invalid: Vec<LineError>,
}

/// 403 for a user: recipients are an administrator's or a domain admin's.
fn may_manage(p: &Principal) -> Result<(), Problem> {
    if p.role == Role::User {
        return Err(Problem::forbidden(format!(
            "{} may not manage valid recipients",
            p.name
        )));
    }
    Ok(())
}

/// The domain of a stored pattern.
fn domain_of(pattern: &str) -> &str {
    pattern.rsplit_once('@').map_or("", |(_, d)| d)
}

/// The patterns of numbered lines split into the valid ones and the refused ones, or a
/// 403 naming the first line outside a domain admin's domains: such a request is
/// refused whole, so nothing of it is applied and nothing is asked of mb-rpcd.
fn check(
    p: &Principal,
    lines: &[(u32, String)],
    numbered: bool,
) -> Result<(Vec<Pattern>, Vec<LineError>), Problem> {
    let mut ok = Vec::with_capacity(lines.len());
    let mut invalid = Vec::new();
    for (n, text) in lines {
        match Pattern::parse(text) {
            Ok(pat) => {
                if let Err(mut refused) = require_domain(p, &pat.domain) {
                    let words = refused.detail.take().unwrap_or_default();
                    let at = if numbered {
                        format!("line {n}: ")
                    } else {
                        String::new()
                    };
                    refused.detail = Some(format!("{at}{words}; nothing was applied"));
                    return Err(refused);
                }
                ok.push(pat);
            }
            Err(e) => invalid.push(LineError {
                line: *n,
                pattern: text.clone(),
                error: e.to_string(),
            }),
        }
    }
    Ok((ok, invalid))
}

/// The words of refused lines, the first [`SHOWN_ERRORS`] of them.
fn refused_words(invalid: &[LineError], numbered: bool) -> String {
    let mut words: Vec<String> = invalid
        .iter()
        .take(SHOWN_ERRORS)
        .map(|e| {
            if numbered {
                format!("line {}: {}", e.line, e.error)
            } else {
                e.error.clone()
            }
        })
        .collect();
    if invalid.len() > SHOWN_ERRORS {
        words.push(format!("and {} more", invalid.len() - SHOWN_ERRORS));
    }
    words.join("; ")
}

/// The patterns of `domain` (every domain when `None`), as stored.
async fn listed(
    state: &AppState,
    p: &Principal,
    domain: Option<String>,
) -> Result<Vec<RecipientEntry>, Problem> {
    let asked = acting(
        p,
        ListRecipientsRequest {
            domain: domain.unwrap_or_default(),
            if_not_version: String::new(),
        },
    );
    Ok(state
        .call(RPCD, |ch| async move {
            RecipientsClient::new(ch)
                .max_decoding_message_size(MAX_ANSWER)
                .list(asked)
                .await
        })
        .await?
        .entries)
}

/// The domains a caller's whole list spans: every one (`None`) for an administrator,
/// its own for a domain admin.
fn scope(p: &Principal) -> Vec<Option<String>> {
    match p.role {
        Role::Admin => vec![None],
        _ => p.domains.iter().cloned().map(Some).collect(),
    }
}

/// Which of mb-rpcd's changes, the one the matching mb-recipient command makes (so
/// mb-rpcd's log says "added", "imported" or "removed" as it does for the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Import,
    Delete,
}

/// Applies `op` to patterns through mb-rpcd, in chunks mb-rpcd reads.
async fn apply(
    state: &AppState,
    p: &Principal,
    patterns: &[String],
    comment: &str,
    op: Op,
) -> Result<RecipientsChanged, Problem> {
    let mut total = RecipientsChanged::default();
    let mut start = 0;
    while start < patterns.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < patterns.len() && end - start < CHUNK && bytes < CHUNK_BYTES {
            bytes += patterns[end].len() + 4;
            end += 1;
        }
        let chunk = patterns[start..end].to_vec();
        start = end;
        let comment = comment.to_string();
        let who = p.clone();
        let c = state
            .call(RPCD, |ch| async move {
                let mut client = RecipientsClient::new(ch);
                let asked = RecipientPatterns {
                    patterns: chunk,
                    comment,
                };
                match op {
                    Op::Add => client.add(acting(&who, asked)).await,
                    Op::Delete => client.delete(acting(&who, asked)).await,
                    Op::Import => {
                        let asked = ImportRecipientsRequest {
                            patterns: asked.patterns,
                            replace: false,
                            comment: asked.comment,
                        };
                        client.import(acting(&who, asked)).await
                    }
                }
            })
            .await?;
        total.added += c.added;
        total.removed += c.removed;
        total.unchanged += c.unchanged;
        total.invalid.extend(c.invalid);
    }
    Ok(total)
}

/// The valid recipients the caller may manage (`mb-recipient list`), a page at a time.
#[utoipa::path(
    get,
    path = "/api/v1/recipients",
    tag = "recipients",
    params(ListQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The matching patterns (a domain admin: those of its domains)", body = RecipientList),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user, or another domain", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-rpcd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
async fn list(
    Signed(p): Signed,
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<RecipientList>, Problem> {
    may_manage(&p)?;
    let domain = q
        .domain
        .as_deref()
        .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty());
    let domains = match domain {
        Some(d) => {
            require_domain(&p, &d)?;
            vec![Some(d)]
        }
        None => scope(&p),
    };
    let mut all = Vec::new();
    for d in domains {
        all.extend(listed(&state, &p, d).await?);
    }
    // Again by domain: a second line of defence should a listing ever be wider.
    all.retain(|e| p.sees_domain(domain_of(&e.pattern)));
    all.sort_by(|a, b| a.pattern.cmp(&b.pattern));
    let total = all.len();
    let needle = q
        .search
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty());
    let matched: Vec<RecipientEntry> = all
        .into_iter()
        .filter(|e| {
            needle
                .as_deref()
                .is_none_or(|n| e.pattern.contains(n) || e.comment.to_lowercase().contains(n))
        })
        .collect();
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT) as usize;
    let offset = q.offset.unwrap_or(0) as usize;
    Ok(Json(RecipientList {
        total: total as u64,
        matched: matched.len() as u64,
        entries: matched
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|e| Recipient {
                pattern: e.pattern,
                comment: e.comment,
                created_unix: e.created_unix,
            })
            .collect(),
    }))
}

/// Checks `patterns` of an add or a delete, applies the valid ones, and reports.
async fn change(
    p: Principal,
    state: AppState,
    body: PatternsBody,
    op: Op,
) -> Result<Json<Changed>, Problem> {
    may_manage(&p)?;
    let lines: Vec<(u32, String)> = body
        .patterns
        .iter()
        .zip(1u32..)
        .map(|(t, n)| (n, normalise(t)))
        .collect();
    if lines.is_empty() {
        return Err(Problem::bad_request("no pattern given"));
    }
    let (ok, invalid) = check(&p, &lines, false)?;
    if ok.is_empty() {
        return Err(Problem::bad_request(format!(
            "{} pattern(s) refused: {}",
            invalid.len(),
            refused_words(&invalid, false)
        )));
    }
    let texts: Vec<String> = ok.iter().map(Pattern::to_string).collect();
    let c = apply(&state, &p, &texts, body.comment.trim(), op).await?;
    Ok(Json(Changed {
        added: c.added,
        removed: c.removed,
        unchanged: c.unchanged,
        invalid: invalid
            .into_iter()
            .map(|e| e.error)
            .chain(c.invalid)
            .collect(),
    }))
}

/// Adds patterns (`mb-recipient add`): addresses, wildcards and catch-alls.
#[utoipa::path(
    post,
    path = "/api/v1/recipients",
    tag = "recipients",
    request_body = PatternsBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Added; `invalid` lists the patterns refused, the others were applied", body = Changed),
        (status = 400, description = "No pattern, or every pattern refused", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user, a pattern of another domain (nothing applied), or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A cluster child: recipients are changed on the main", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without patterns", body = Problem, content_type = "application/problem+json")
    )
)]
async fn add(
    Signed(p): Signed,
    State(state): State<AppState>,
    Json(body): Json<PatternsBody>,
) -> Result<Json<Changed>, Problem> {
    change(p, state, body, Op::Add).await
}

/// Removes patterns (`mb-recipient del`); those not listed count as unchanged.
#[utoipa::path(
    post,
    path = "/api/v1/recipients/delete",
    tag = "recipients",
    request_body = PatternsBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Removed; `unchanged` counts those not listed", body = Changed),
        (status = 400, description = "No pattern, or every pattern refused", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user, a pattern of another domain (nothing applied), or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A cluster child: recipients are changed on the main", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without patterns", body = Problem, content_type = "application/problem+json")
    )
)]
async fn remove_many(
    Signed(p): Signed,
    State(state): State<AppState>,
    Json(body): Json<PatternsBody>,
) -> Result<Json<Changed>, Problem> {
    change(p, state, body, Op::Delete).await
}

/// Removes one pattern (`mb-recipient del PATTERN`).
#[utoipa::path(
    delete,
    path = "/api/v1/recipients/{pattern}",
    tag = "recipients",
    params(("pattern" = String, Path, description = "The pattern as listed (`*` and `@` may be sent as they are)")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Not a pattern", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user, another domain's pattern (listed or not), or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not listed", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A cluster child: recipients are changed on the main", body = Problem, content_type = "application/problem+json")
    )
)]
async fn remove(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(pattern): Path<String>,
) -> Result<StatusCode, Problem> {
    may_manage(&p)?;
    let pat =
        Pattern::parse(&normalise(&pattern)).map_err(|e| Problem::bad_request(e.to_string()))?;
    require_domain(&p, &pat.domain)?;
    let c = apply(&state, &p, &[pat.to_string()], "", Op::Delete).await?;
    if c.removed == 0 {
        return Err(Problem::not_found(format!("{pat} is not in the list")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The numbered patterns of an import body: a JSON array of strings, or text with one
/// pattern a line (an mb-recipient import file).
fn import_lines(headers: &HeaderMap, body: &[u8]) -> Result<Vec<(u32, String)>, Problem> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" => {
            let list: Vec<String> = serde_json::from_slice(body).map_err(|e| {
                Problem::bad_request(format!("the body is not a JSON array of patterns: {e}"))
            })?;
            Ok(list
                .iter()
                .zip(1u32..)
                .map(|(t, n)| (n, normalise(t)))
                .collect())
        }
        "text/plain" | "" => {
            let text = std::str::from_utf8(body)
                .map_err(|e| Problem::bad_request(format!("the body is not UTF-8 text: {e}")))?;
            Ok(lists::import_lines(text))
        }
        other => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "cannot import {other}: send a JSON array of patterns (application/json) or one pattern a line (text/plain)"
            ),
        )),
    }
}

/// Imports many patterns (`mb-recipient import`): a JSON array, or an import file's text
/// (one pattern a line, `#` comments, Postfix maps as they are). Valid lines are
/// applied and refused ones reported by line; with `replace`, the list (a domain
/// admin's: of its domains) becomes exactly the body's patterns.
#[utoipa::path(
    post,
    path = "/api/v1/recipients/import",
    tag = "recipients",
    params(ImportQuery),
    request_body(
        description = "At most 8 MiB and 100000 patterns",
        content((Vec<String> = "application/json"), (String = "text/plain"))
    ),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Imported; `invalid` lists the lines refused, the others were applied", body = ImportReport),
        (status = 400, description = "A body that does not parse, no pattern, too many, every line refused, or a replace with refused lines (nothing changed)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user, a line of another domain (nothing applied), or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A cluster child: recipients are changed on the main", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "A body over 8 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Neither JSON nor text", body = Problem, content_type = "application/problem+json")
    )
)]
async fn import(
    Signed(p): Signed,
    State(state): State<AppState>,
    Query(q): Query<ImportQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ImportReport>, Problem> {
    may_manage(&p)?;
    let lines = import_lines(&headers, &body)?;
    if lines.is_empty() {
        return Err(Problem::bad_request("no pattern in the body"));
    }
    if lines.len() > MAX_IMPORT_PATTERNS {
        return Err(Problem::bad_request(format!(
            "{} patterns in one request; at most {MAX_IMPORT_PATTERNS} (split the file)",
            lines.len()
        )));
    }
    let (ok, invalid) = check(&p, &lines, true)?;
    if q.replace && !invalid.is_empty() {
        // A replace with refused lines would silently drop those users (mb-rpcd's rule).
        return Err(Problem::bad_request(format!(
            "{} invalid pattern(s), nothing replaced: {}",
            invalid.len(),
            refused_words(&invalid, true)
        )));
    }
    if ok.is_empty() {
        return Err(Problem::bad_request(format!(
            "{} pattern(s) refused: {}",
            invalid.len(),
            refused_words(&invalid, true)
        )));
    }
    let wanted: BTreeSet<String> = ok.iter().map(Pattern::to_string).collect();
    let texts: Vec<String> = wanted.iter().cloned().collect();
    let c = apply(&state, &p, &texts, q.comment.trim(), Op::Import).await?;
    let mut removed = 0;
    if q.replace {
        // As mb-recipient does: what the body does not name goes once everything it
        // names is in, so no listed user is refused meanwhile; only within the
        // caller's domains.
        let mut gone = Vec::new();
        for d in scope(&p) {
            gone.extend(
                listed(&state, &p, d)
                    .await?
                    .into_iter()
                    .map(|e| e.pattern)
                    .filter(|t| !wanted.contains(t) && p.sees_domain(domain_of(t))),
            );
        }
        removed = apply(&state, &p, &gone, "", Op::Delete).await?.removed;
    }
    Ok(Json(ImportReport {
        added: c.added,
        removed,
        unchanged: c.unchanged,
        invalid: invalid
            .into_iter()
            .chain(c.invalid.into_iter().map(|error| LineError {
                line: 0,
                pattern: String::new(),
                error,
            }))
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role, domains: &[&str]) -> Principal {
        Principal {
            name: "dora".into(),
            role,
            domains: domains.iter().map(|s| s.to_string()).collect(),
            addresses: Vec::new(),
        }
    }

    /// The same reading as mb-recipient's import (its own unit test's file), with the
    /// line numbers the report gives.
    #[test]
    fn import_text_is_read_as_mb_recipient_reads_a_file() {
        let text = "# HR\n\nalice@example.org OK\n  bob@example.org\t# desk\n@lab.example.org OK\n";
        assert_eq!(
            lists::import_lines(text),
            [
                (3, "alice@example.org".to_string()),
                (4, "bob@example.org".to_string()),
                (5, "*@lab.example.org".to_string())
            ]
        );
    }

    #[test]
    fn a_domain_admin_is_refused_whole_for_another_domain_and_invalid_lines_are_numbered() {
        let dora = who(Role::DomainAdmin, &["a.test"]);
        let lines = [
            (1, "x@a.test".to_string()),
            (2, "no-at-sign".to_string()),
            (3, "*@A.test".to_string()),
        ];
        let (ok, invalid) = check(&dora, &lines, true).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(invalid.len(), 1);
        assert_eq!(invalid[0].line, 2);
        assert!(invalid[0].error.contains("has no @"), "{:?}", invalid[0]);
        let mixed = [(1, "x@a.test".to_string()), (2, "y@b.test".to_string())];
        let refused = check(&dora, &mixed, true).unwrap_err();
        assert_eq!(refused.status, 403);
        assert!(
            refused
                .detail
                .as_deref()
                .unwrap()
                .starts_with("line 2: dora may not act on the domain b.test"),
            "{refused}"
        );
        // An administrator may name any domain; a user may manage none.
        assert!(check(&who(Role::Admin, &[]), &mixed, true).is_ok());
        assert_eq!(may_manage(&who(Role::User, &[])).unwrap_err().status, 403);
    }

    #[test]
    fn many_refused_lines_are_counted_past_the_first_twenty() {
        let invalid: Vec<LineError> = (1..=25)
            .map(|n| LineError {
                line: n,
                pattern: "x".into(),
                error: "bad".into(),
            })
            .collect();
        let words = refused_words(&invalid, true);
        assert!(words.starts_with("line 1: bad; line 2: bad"), "{words}");
        assert!(words.ends_with("and 5 more"), "{words}");
    }
}
