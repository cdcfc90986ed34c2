//! Administration pages for what a gateway knows about its domains and itself: the
//! recipient verification list (as `mb-recipient`, through mb-rpcd's `Recipients`
//! service, as `api::recipients` does for the REST API), the DKIM record to publish and a new
//! signing key (as `mb-dkim`, through `api::dkim`'s handlers) and the cluster's nodes
//! (as `mb-cluster status`, through `api::cluster`). Administrators only; every form
//! is a plain POST with the CSRF field, so the pages work without JavaScript.

use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use maud::html;
use mb_proto::v1::recipients_client::RecipientsClient;
use mb_proto::v1::{ListRecipientsRequest, RecipientPatterns};
use serde::Deserialize;

use super::{AdminUi, Nav, done, failed, percent};
use crate::access::{Admin, Signed};
use crate::api::{acting, cluster as cluster_api, dkim as dkim_api};
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";
const RECIPIENTS: &str = "/ui/recipients";
const DKIM: &str = "/ui/dkim";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(RECIPIENTS, get(recipients_page))
        .route("/ui/recipients/add", post(add_recipients))
        .route("/ui/recipients/delete", post(delete_recipient))
        .route(DKIM, get(dkim_page))
        .route("/ui/dkim/keygen", post(keygen))
        .route("/ui/cluster", get(cluster_page))
}

/// The words of a problem, for a page that shows it in place of its content.
fn words(p: &Problem) -> &str {
    p.detail.as_deref().unwrap_or(&p.title)
}

#[derive(Debug, Deserialize)]
pub struct DomainQuery {
    #[serde(default)]
    pub domain: String,
}

async fn recipients_page(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Query(q): Query<DomainQuery>,
) -> Response {
    let domain = q.domain.trim().to_ascii_lowercase();
    let asked = acting(
        &ui.who,
        ListRecipientsRequest {
            domain: domain.clone(),
            if_not_version: String::new(),
        },
    );
    let list = state
        .call(RPCD, |ch| async move {
            RecipientsClient::new(ch).list(asked).await
        })
        .await;
    let body = html! {
        p.muted {
            "With " code { "smtp.recipient_verification = \"list\"" } ", mail to a listed domain is \
             accepted only for these addresses. A pattern is " code { "user@example.org" } ", "
            code { "*@example.org" } " (catch-all) or a local part with " code { "*" } " and "
            code { "?" } " wildcards, e.g. " code { "sales-*@example.org" } ". A domain without \
             any entry is not checked."
        }
        h2 { "Add" }
        form.edit method="post" action="/ui/recipients/add" {
            (ui.csrf_field())
            label { "Patterns (one per line, or separated by spaces or commas)"
                textarea name="patterns" rows="3" required {} }
            label { "Comment" input type="text" name="comment"; }
            button type="submit" { "Add" }
        }
        h2 { "List" }
        form.edit method="get" action=(RECIPIENTS) {
            label { "Domain" input type="text" name="domain" value=(domain) placeholder="all domains"; }
            button type="submit" { "Show" }
        }
        @match &list {
            Err(p) => p.error { (words(p)) }
            Ok(l) => table {
                thead { tr { th { "Pattern" } th { "Comment" } th { "Added (UTC)" } th {} } }
                tbody {
                    @for e in &l.entries {
                        tr {
                            td { code { (e.pattern) } }
                            td { (e.comment) }
                            td { (super::time(e.created_unix)) }
                            td {
                                form.inline method="post" action="/ui/recipients/delete" {
                                    (ui.csrf_field())
                                    input type="hidden" name="pattern" value=(e.pattern);
                                    input type="hidden" name="domain" value=(domain);
                                    button.danger type="submit" { "Delete" }
                                }
                            }
                        }
                    }
                    @if l.entries.is_empty() { tr { td.muted colspan="4" { "none" } } }
                }
            }
        }
    };
    ui.page("Recipients", Nav::Recipients, body)
}

#[derive(Debug, Deserialize)]
pub struct AddForm {
    #[serde(default)]
    pub patterns: String,
    #[serde(default)]
    pub comment: String,
}

/// Where to go back to: the list of `domain` when one was shown.
fn back_to(domain: &str) -> String {
    let d = domain.trim();
    if d.is_empty() {
        RECIPIENTS.to_string()
    } else {
        format!("{RECIPIENTS}?domain={}", percent(d))
    }
}

async fn add_recipients(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Form(f): Form<AddForm>,
) -> Response {
    let patterns: Vec<String> = f
        .patterns
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if patterns.is_empty() {
        return failed(RECIPIENTS, &Problem::bad_request("no pattern given"));
    }
    let asked = acting(
        &ui.who,
        RecipientPatterns {
            patterns,
            comment: f.comment.trim().to_string(),
        },
    );
    match state
        .call(RPCD, |ch| async move {
            RecipientsClient::new(ch).add(asked).await
        })
        .await
    {
        Ok(r) if r.invalid.is_empty() => done(
            RECIPIENTS,
            format!("{} added, {} already listed", r.added, r.unchanged),
        ),
        Ok(r) => failed(
            RECIPIENTS,
            &Problem::bad_request(format!(
                "{} added, {} already listed; refused: {}",
                r.added,
                r.unchanged,
                r.invalid.join("; ")
            )),
        ),
        Err(p) => failed(RECIPIENTS, &p),
    }
}

#[derive(Debug, Deserialize)]
pub struct DeleteForm {
    #[serde(default)]
    pub pattern: String,
    #[serde(default)]
    pub domain: String,
}

async fn delete_recipient(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Form(f): Form<DeleteForm>,
) -> Response {
    let to = back_to(&f.domain);
    let pattern = f.pattern.trim().to_string();
    let asked = acting(
        &ui.who,
        RecipientPatterns {
            patterns: vec![pattern.clone()],
            comment: String::new(),
        },
    );
    match state
        .call(RPCD, |ch| async move {
            RecipientsClient::new(ch).delete(asked).await
        })
        .await
    {
        Ok(r) if r.removed > 0 => done(&to, format!("{pattern} deleted")),
        Ok(_) => failed(
            &to,
            &Problem::not_found(format!("{pattern} is not in the list")),
        ),
        Err(p) => failed(&to, &p),
    }
}

async fn dkim_page(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Query(q): Query<DomainQuery>,
) -> Response {
    let domain = q.domain.trim().to_ascii_lowercase();
    let record = if domain.is_empty() {
        None
    } else {
        Some(
            dkim_api::record(
                Signed(ui.who.clone()),
                State(state),
                Query(dkim_api::RecordQuery {
                    domain: domain.clone(),
                }),
            )
            .await,
        )
    };
    let body = html! {
        form.edit method="get" action=(DKIM) {
            label { "Signing domain" input type="text" name="domain" value=(domain) required placeholder="example.org"; }
            button type="submit" { "Show the record" }
        }
        @match &record {
            None => {}
            Some(Err(p)) => p.error { (words(p)) }
            Some(Ok(Json(r))) => {
                h2 { "Record to publish" }
                table {
                    tbody {
                        tr { th { "Name" } td { code { (r.name) } } }
                        tr { th { "Type" } td { (r.kind) } }
                        tr { th { "Value" } td { code.record { (r.value) } } }
                        tr { th { "Zone file" } td { pre { (r.zone_line) } } }
                        tr { th { "Selector" } td { (r.selector) } }
                        tr { th { "Key" } td { code { (r.key) } " (" (r.algorithm) ", " (r.bits) " bits)" } }
                        tr { th { "Fingerprint" } td { code { (r.fingerprint) } } }
                        tr { th { "Signing" } td { @if r.signing { "yes" } @else { "no (dkim.sign is off)" } } }
                    }
                }
            }
        }
        h2 { "New key" }
        p.muted {
            "Makes a new RSA key at dkim.key. Replacing a key breaks the signatures of mail \
             already sent once its old record is gone: publish the new record first."
        }
        form.edit method="post" action="/ui/dkim/keygen" {
            (ui.csrf_field())
            label { "Signing domain" input type="text" name="domain" value=(domain) required; }
            label { "Bits"
                select name="bits" {
                    option value="2048" selected { "2048" }
                    option value="3072" { "3072" }
                    option value="4096" { "4096" }
                }
            }
            label { input type="checkbox" name="replace" value="yes"; " Replace the existing key" }
            button.danger type="submit" { "Generate" }
        }
    };
    ui.page("DKIM", Nav::Dkim, body)
}

#[derive(Debug, Deserialize)]
pub struct KeygenForm {
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub bits: String,
    /// The checkbox: present (any value) only when ticked.
    #[serde(default)]
    pub replace: Option<String>,
}

async fn keygen(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Form(f): Form<KeygenForm>,
) -> Response {
    let domain = f.domain.trim().to_ascii_lowercase();
    let to = format!("{DKIM}?domain={}", percent(&domain));
    let bits = match f.bits.trim() {
        "" => None,
        b => match b.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                return failed(&to, &Problem::bad_request(format!("{b} is not a key size")));
            }
        },
    };
    let body = dkim_api::KeygenBody {
        domain,
        bits,
        force: f.replace.is_some(),
    };
    match dkim_api::keygen(Admin(ui.who.clone()), State(state), Json(body)).await {
        Ok(Json(r)) => done(
            &to,
            format!(
                "{} key {} made{}: publish the record below",
                if r.replaced { "replacement" } else { "new" },
                r.fingerprint,
                if r.signing { "" } else { " (dkim.sign is off)" }
            ),
        ),
        Err(p) => failed(&to, &p),
    }
}

async fn cluster_page(AdminUi(ui): AdminUi, State(state): State<AppState>) -> Response {
    let c = cluster_api::cluster(Admin(ui.who.clone()), State(state)).await;
    let body = html! {
        @match &c {
            Err(p) => p.error { (words(p)) }
            Ok(Json(c)) => {
                table {
                    tbody {
                        tr { th { "Clustered" } td { @if c.enabled { "yes" } @else { "no (standalone)" } } }
                        tr { th { "This node" } td { (c.name) @if !c.role.is_empty() { " (" (c.role) ")" } } }
                        @if !c.main.is_empty() { tr { th { "Main" } td { (c.main) } } }
                        tr { th { "State" } td { (c.state) } }
                        tr { th { "Configuration version" } td.num { (c.config_version) } }
                    }
                }
                h2 { "Nodes" }
                table {
                    thead { tr {
                        th { "Name" } th { "Address" } th { "Role" } th { "State" } th.num { "Config" }
                        th.num { "Uptime (s)" } th.num { "Load" } th.num { "Queue" } th { "Last seen (UTC)" } th { "Version" }
                    } }
                    tbody {
                        @for n in &c.nodes {
                            tr {
                                td { (n.name) } td { (n.address) } td { (n.role) } td { (n.state) }
                                td.num { (n.config_version) } td.num { (n.uptime_secs) } td.num { (n.load) }
                                td.num { (n.queue_depth) } td { (super::time(n.last_seen_unix_ms / 1000)) }
                                td { (n.software_version) }
                            }
                        }
                        @if c.nodes.is_empty() { tr { td.muted colspan="10" { "none" } } }
                    }
                }
            }
        }
    };
    ui.page("Cluster", Nav::Cluster, body)
}
