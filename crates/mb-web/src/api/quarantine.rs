//! `/api/v1/quarantine`: what `mb-quarantine` does (list, show, raw, release, delete),
//! through the same `Quarantine` RPCs of mb-rpcd, scoped to the caller: an admin sees
//! every message, a domain admin those with a recipient in its domains, a user those
//! with one of its addresses among the recipients. A message the caller may not see is
//! answered exactly as a message that does not exist (404, mb-rpcd's words), so the API
//! does not tell whether it is there.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use mb_proto::v1::quarantine_client::QuarantineClient;
use mb_proto::v1::{ListQuarantineRequest, QuarantineEntry, QuarantineId, ShowQuarantineResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Signed;
use crate::auth::{Principal, Role, require_address};
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show, delete))
        .routes(routes!(raw))
        .routes(routes!(release))
}

/// The filters of `mb-quarantine list`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only from this sender address
    pub from: Option<String>,
    /// Only to this recipient address
    pub to: Option<String>,
    /// Only since this age or UTC time (2h, 7d, 2026-11-22 08:00)
    pub since: Option<String>,
    /// At most this many (default 1000)
    pub limit: Option<u32>,
    /// Skip this many of the matching messages, newest first (for paging; default 0)
    pub offset: Option<u32>,
}

/// One quarantined message, as `mb-quarantine list --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Entry {
    pub id: String,
    pub node: String,
    pub at_unix_ms: i64,
    pub queue_id: String,
    pub client_ip: String,
    /// Empty for the null sender.
    pub sender: String,
    /// The recipients the caller may see (all of them for an admin).
    pub recipients: Vec<String>,
    pub subject: String,
    pub reason: String,
    pub score: f64,
    pub symbols: Vec<String>,
    pub size: u64,
}

/// A list of quarantined messages, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct List {
    pub entries: Vec<Entry>,
    /// Messages in the quarantine the caller may see (all of it for an admin).
    pub total: u64,
    pub total_bytes: u64,
    /// Of those, the messages matching the filters, whatever `limit` and `offset`: the
    /// pages end where `offset + entries` reaches it.
    pub matched: u64,
    pub matched_bytes: u64,
}

/// One message: its entry, header section, text and attachment names. HTML is never
/// given as HTML: `text` is the text part, or the HTML part turned into plain text.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Message {
    #[serde(flatten)]
    pub entry: Entry,
    pub headers: String,
    pub text: String,
    pub attachments: Vec<String>,
}

/// What a release did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Released {
    pub id: String,
    pub recipients: Vec<String>,
    /// The next hop's reply, e.g. "250 2.0.0 Ok: queued as ...".
    pub reply: String,
}

/// What a delete did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub deleted: String,
}

/// mb-rpcd's answer for an id it does not have, used as well for one the caller may not
/// see.
fn no_such(id: &str) -> Problem {
    Problem::grpc(
        RPCD,
        &tonic::Status::not_found(format!(
            "no message {id} in the quarantine (mb-quarantine list shows what is there)"
        )),
    )
}

/// Whether `p` may see a message to `recipients`: one of them is its own.
pub fn visible(p: &Principal, recipients: &[String]) -> bool {
    p.role == Role::Admin || recipients.iter().any(|r| p.sees_address(r))
}

pub(crate) fn view(p: &Principal, e: QuarantineEntry) -> Entry {
    let recipients = if p.role == Role::Admin {
        e.recipients
    } else {
        e.recipients
            .into_iter()
            .filter(|r| p.sees_address(r))
            .collect()
    };
    Entry {
        id: e.id,
        node: e.node,
        at_unix_ms: e.at_unix_ms,
        queue_id: e.queue_id,
        client_ip: e.client_ip,
        sender: e.sender,
        recipients,
        subject: e.subject,
        reason: e.reason,
        score: e.score,
        symbols: e.symbols,
        size: e.size,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Quarantined messages the caller may see, newest first (`mb-quarantine list`).
#[utoipa::path(
    get,
    path = "/api/v1/quarantine",
    tag = "quarantine",
    params(ListQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The matching messages", body = List),
        (status = 400, description = "A bad filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-rpcd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list(
    Signed(p): Signed,
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<List>, Problem> {
    let since_unix_ms = match &q.since {
        Some(s) => mb_runtime::cli::parse_time(s, now_ms())
            .map_err(|e| Problem::bad_request(format!("since: {e}")))?,
        None => 0,
    };
    let (domains, addresses) = super::scope_of(&p);
    let req = ListQuarantineRequest {
        sender: q.from.unwrap_or_default(),
        recipient: q.to.unwrap_or_default(),
        since_unix_ms,
        limit: q.limit.unwrap_or(1000),
        offset: q.offset.unwrap_or(0),
        // mb-rpcd restricts the query itself: the page and the totals are the caller's.
        scoped: p.role != Role::Admin,
        domains,
        addresses,
    };
    let r = state
        .call(RPCD, |ch| async move {
            QuarantineClient::new(ch).list(req).await
        })
        .await?;
    Ok(Json(List {
        // `visible` again: a second line of defence should mb-rpcd ever scope less.
        entries: r
            .entries
            .into_iter()
            .filter(|e| visible(&p, &e.recipients))
            .map(|e| view(&p, e))
            .collect(),
        total: r.total,
        total_bytes: r.total_bytes,
        matched: r.matched,
        matched_bytes: r.matched_bytes,
    }))
}

/// The index entry of message `id` if the caller may see it. Read from the index
/// alone (`ShowEntry`), so the visibility check comes before anything touches the
/// message's file: a caller of another domain gets the same 404 whether the file is
/// there, missing or unreadable, never a 502 that says the id exists.
pub(crate) async fn visible_entry(
    state: &AppState,
    p: &Principal,
    id: &str,
) -> Result<QuarantineEntry, Problem> {
    let ask = QuarantineId {
        id: id.to_string(),
        raw: false,
    };
    let e = state
        .call(RPCD, |ch| async move {
            QuarantineClient::new(ch).show_entry(ask).await
        })
        .await?;
    if !visible(p, &e.recipients) {
        return Err(no_such(id));
    }
    Ok(e)
}

/// The message `id` if the caller may see it, with its bytes when `raw`.
pub(crate) async fn fetch(
    state: &AppState,
    p: &Principal,
    id: &str,
    raw: bool,
) -> Result<ShowQuarantineResponse, Problem> {
    visible_entry(state, p, id).await?;
    let ask = QuarantineId {
        id: id.to_string(),
        raw,
    };
    let r = state
        .call(RPCD, |ch| async move {
            QuarantineClient::new(ch).show(ask).await
        })
        .await?;
    let recipients = r
        .entry
        .as_ref()
        .map(|e| e.recipients.as_slice())
        .unwrap_or(&[]);
    if !visible(p, recipients) {
        return Err(no_such(id));
    }
    Ok(r)
}

/// A change to a message is allowed when the caller may act on every recipient's mail:
/// a domain admin does not release mail to another domain's recipients.
pub(crate) async fn check_act(state: &AppState, p: &Principal, id: &str) -> Result<(), Problem> {
    let e = visible_entry(state, p, id).await?;
    for rcpt in e.recipients {
        require_address(p, &rcpt)?;
    }
    Ok(())
}

/// The entry, header section, text and attachment names of a message (`mb-quarantine show`).
#[utoipa::path(
    get,
    path = "/api/v1/quarantine/{id}",
    tag = "quarantine",
    params(("id" = String, Path, description = "The quarantine id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The message", body = Message),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message (or not the caller's)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-rpcd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
async fn show(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Message>, Problem> {
    let r = fetch(&state, &p, &id, true).await?;
    let (text, attachments) = body_of(&r.message);
    Ok(Json(Message {
        entry: view(&p, r.entry.unwrap_or_default()),
        headers: r.headers,
        text,
        attachments,
    }))
}

/// The text a reader sees and the attachments' names, from the message as stored.
pub fn body_of(message: &[u8]) -> (String, Vec<String>) {
    use mail_parser::MimeHeaders;
    let Some(m) = mail_parser::MessageParser::default().parse(message) else {
        return (String::new(), Vec::new());
    };
    // body_text turns an HTML-only message into text: HTML is never passed on.
    let text = m.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
    let attachments = m
        .attachments()
        .map(|a| a.attachment_name().unwrap_or("(unnamed)").to_string())
        .collect();
    (text, attachments)
}

/// The whole message as stored, as a download (`mb-quarantine show --raw`).
#[utoipa::path(
    get,
    path = "/api/v1/quarantine/{id}/raw",
    tag = "quarantine",
    params(("id" = String, Path, description = "The quarantine id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The message, as an attachment", content_type = "message/rfc822"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message (or not the caller's)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-rpcd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
async fn raw(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let r = fetch(&state, &p, &id, true).await?;
    let mut resp = r.message.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/rfc822"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The id passed mb-rpcd's check (letters, digits, dashes), so it is a safe file name.
    let name: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}.eml\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Delivers a message to its original recipients, unfiltered, and removes it
/// (`mb-quarantine release`).
#[utoipa::path(
    post,
    path = "/api/v1/quarantine/{id}/release",
    tag = "quarantine",
    params(("id" = String, Path, description = "The quarantine id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Released", body = Released),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Another domain's recipient is among the message's", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message (or not the caller's)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The next hop refused or could not be reached; the message stays", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn release(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Released>, Problem> {
    check_act(&state, &p, &id).await?;
    let who = p.clone();
    let ask = QuarantineId {
        id: id.clone(),
        raw: false,
    };
    let r = state
        .call(RPCD, |ch| async move {
            QuarantineClient::new(ch)
                .release(super::acting(&who, ask))
                .await
        })
        .await?;
    Ok(Json(Released {
        id,
        recipients: r.recipients,
        reply: r.reply,
    }))
}

/// Removes a message from the quarantine (`mb-quarantine delete`).
#[utoipa::path(
    delete,
    path = "/api/v1/quarantine/{id}",
    tag = "quarantine",
    params(("id" = String, Path, description = "The quarantine id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Another domain's recipient is among the message's", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message (or not the caller's)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-rpcd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn delete(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, Problem> {
    check_act(&state, &p, &id).await?;
    let who = p.clone();
    let ask = QuarantineId {
        id: id.clone(),
        raw: false,
    };
    state
        .call(RPCD, |ch| async move {
            QuarantineClient::new(ch)
                .delete(super::acting(&who, ask))
                .await
        })
        .await?;
    Ok(Json(Deleted { deleted: id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role, domains: &[&str], addresses: &[&str]) -> Principal {
        Principal {
            name: "t".into(),
            role,
            domains: domains.iter().map(|s| s.to_string()).collect(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn each_role_sees_its_recipients_only() {
        let to = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let dora = who(Role::DomainAdmin, &["a.test"], &[]);
        let jane = who(Role::User, &[], &["jane@a.test"]);
        assert!(visible(&who(Role::Admin, &[], &[]), &to(&["x@b.test"])));
        assert!(visible(&dora, &to(&["X@A.test"])));
        assert!(!visible(&dora, &to(&["x@b.test"])));
        assert!(!visible(&jane, &to(&["bob@a.test"])));
        assert!(visible(&jane, &to(&["bob@a.test", "jane@a.test"])));
        // A message to two domains shows the domain admin only its own recipient.
        let e = QuarantineEntry {
            recipients: to(&["x@a.test", "y@b.test"]),
            ..Default::default()
        };
        assert_eq!(view(&dora, e).recipients, ["x@a.test"]);
    }

    #[test]
    fn html_is_given_as_text_and_attachments_by_name() {
        let msg = b"From: a@b.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n\
            Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n\
            Content-Type: text/html\r\n\r\n<p>hello <script>alert(1)</script>world</p>\r\n--XX\r\n\
            Content-Type: application/pdf; name=\"bill.pdf\"\r\n\
            Content-Disposition: attachment; filename=\"bill.pdf\"\r\n\r\nJVBERi0=\r\n--XX--\r\n";
        let (text, attachments) = body_of(msg);
        assert!(text.contains("hello") && text.contains("world"), "{text}");
        assert!(!text.contains('<'), "{text}");
        assert_eq!(attachments, ["bill.pdf"]);
    }
}
