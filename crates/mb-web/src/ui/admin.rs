//! Administration pages: banned and trusted addresses (as `mb-ban`), web accounts (as
//! `mb-web account`), policies (as `mb-policy`) and SMTP accounts (as `mb-user`): each
//! a list with a form to add and a button to remove, through the same handlers as the
//! REST API (`api::access`, `auth`, `api::policies`, `api::smtp_accounts`).

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use maud::html;
use serde::Deserialize;

use super::{AdminUi, Nav, Staff, done, failed};
use crate::access::{Admin, Signed};
use crate::api::access::{self, BanBody, TrustBody};
use crate::api::policies::{self as policies_api, PolicyBody};
use crate::api::smtp_accounts::{self as smtp_api, AccountBody as SmtpAccountBody};
use crate::auth::{self, AccountBody, Role};
use crate::problem::Problem;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui/access", get(access_page))
        .route("/ui/access/ban", post(ban))
        .route("/ui/access/trust", post(trust))
        .route("/ui/access/{kind}/remove", post(remove))
        .route("/ui/accounts", get(accounts).post(create_account))
        .route("/ui/accounts/{name}/delete", post(delete_account))
        .merge(more_routes())
}

const ACCESS: &str = "/ui/access";
const ACCOUNTS: &str = "/ui/accounts";

async fn access_page(AdminUi(ui): AdminUi, State(state): State<AppState>) -> Response {
    let bans = access::list_bans(Admin(ui.who.clone()), State(state.clone())).await;
    let trusts = access::list_trusts(Admin(ui.who.clone()), State(state)).await;
    let table = |kind: &str, list: &Result<Json<Vec<access::Entry>>, Problem>| {
        html! {
            @match list {
                Err(p) => p.error { (p.detail.as_deref().unwrap_or(&p.title)) }
                Ok(l) => table {
                    thead { tr { th { "Address or network" } th.num { "Time left (s)" } th { "Reason" } th { "Added by" } th { "Since (UTC)" } th {} } }
                    tbody {
                        @for e in &l.0 {
                            tr {
                                td { code { (e.ip) } }
                                td.num { (e.seconds_left) }
                                td { (e.reason) }
                                td { (e.added_by) }
                                td { (super::time(e.created_at)) }
                                td {
                                    form.inline method="post" action={ "/ui/access/" (kind) "/remove" } {
                                        (ui.csrf_field())
                                        input type="hidden" name="ip" value=(e.ip);
                                        button.danger type="submit" { "Remove" }
                                    }
                                }
                            }
                        }
                        @if l.0.is_empty() { tr { td.muted colspan="6" { "none" } } }
                    }
                }
            }
        }
    };
    let body = html! {
        h2 { "Banned" }
        form.edit method="post" action="/ui/access/ban" {
            (ui.csrf_field())
            label { "Address or network" input type="text" name="ip" required placeholder="192.0.2.7 or 192.0.2.0/24"; }
            label { "For" input type="text" name="for" value="1h"; }
            label { "Reason" input type="text" name="reason"; }
            button.danger type="submit" { "Ban" }
        }
        (table("ban", &bans))
        h2 { "Trusted" }
        form.edit method="post" action="/ui/access/trust" {
            (ui.csrf_field())
            label { "Address or network" input type="text" name="ip" required; }
            label { "For" input type="text" name="for" value="1d"; }
            button type="submit" { "Trust" }
        }
        (table("trust", &trusts))
    };
    ui.page("Bans & trusts", Nav::Access, body)
}

#[derive(Debug, Deserialize)]
pub struct AccessForm {
    #[serde(default)]
    pub ip: String,
    #[serde(default, rename = "for")]
    pub duration: String,
    #[serde(default)]
    pub reason: String,
}

fn opt(s: String) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

async fn ban(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Form(f): Form<AccessForm>,
) -> Response {
    let body = BanBody {
        ip: f.ip.trim().to_string(),
        duration: opt(f.duration),
        reason: opt(f.reason),
    };
    match access::ban(Admin(ui.who.clone()), State(state), Json(body)).await {
        Ok((_, e)) => done(
            ACCESS,
            format!("{} banned for {}s", e.0.ip, e.0.seconds_left),
        ),
        Err(p) => failed(ACCESS, &p),
    }
}

async fn trust(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Form(f): Form<AccessForm>,
) -> Response {
    let body = TrustBody {
        ip: f.ip.trim().to_string(),
        duration: opt(f.duration),
    };
    match access::trust(Admin(ui.who.clone()), State(state), Json(body)).await {
        Ok((_, e)) => done(
            ACCESS,
            format!("{} trusted for {}s", e.0.ip, e.0.seconds_left),
        ),
        Err(p) => failed(ACCESS, &p),
    }
}

async fn remove(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Path(kind): Path<String>,
    Form(f): Form<AccessForm>,
) -> Response {
    let who = Admin(ui.who.clone());
    let r = match kind.as_str() {
        "ban" => access::unban(who, State(state), Path(f.ip.clone())).await,
        "trust" => access::untrust(who, State(state), Path(f.ip.clone())).await,
        _ => Err(Problem::not_found(format!("no access list {kind}"))),
    };
    match r {
        Ok(_) => done(ACCESS, format!("{} removed from the {kind} list", f.ip)),
        Err(p) => failed(ACCESS, &p),
    }
}

/// Web accounts: every one for an admin, its domains' users for a domain admin (as
/// `GET /api/v1/accounts`).
async fn accounts(Staff(ui): Staff, State(state): State<AppState>) -> Response {
    let list = match auth::list_accounts(State(state), Signed(ui.who.clone())).await {
        Ok(l) => l.0,
        Err(p) => return ui.problem(&p),
    };
    let admin = ui.who.role == Role::Admin;
    let body = html! {
        table {
            thead { tr { th { "Name" } th { "Role" } th { "Domains / addresses" } th { "TOTP" } th { "Last login (UTC)" } th { "Created by" } th {} } }
            tbody {
                @for a in &list {
                    tr {
                        td { (a.name) }
                        td { (a.role.as_str()) }
                        td.wrap { (a.domains.join(", ")) (a.addresses.join(", ")) @if !a.smtp_user.is_empty() { " (SMTP " (a.smtp_user) ")" } }
                        td { (if a.totp_enrolled { "yes" } else { "no" }) }
                        td { (super::time(a.last_login)) }
                        td { (a.created_by) }
                        td {
                            @if a.name != ui.who.name {
                                form.inline method="post" action={ "/ui/accounts/" (super::percent(&a.name)) "/delete" } {
                                    (ui.csrf_field())
                                    button.danger type="submit" { "Delete" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "New account" }
        form.edit method="post" action=(ACCOUNTS) {
            (ui.csrf_field())
            label { "Name" input type="text" name="name" required; }
            label { "Password" input type="password" name="password" required autocomplete="new-password"; }
            label { "Role" select name="role" {
                @if admin {
                    option value="admin" { "admin" }
                    option value="domain-admin" { "domain-admin" }
                }
                option value="user" selected { "user" }
            } }
            @if admin { label { "Domains (domain admin)" input type="text" name="domains" placeholder="example.org, example.net"; } }
            label { "Addresses (user)" input type="text" name="addresses" placeholder="jane@example.org"; }
            button type="submit" { "Create" }
        }
    };
    ui.page("Web accounts", Nav::WebAccounts, body)
}

#[derive(Debug, Deserialize)]
pub struct AccountForm {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub domains: String,
    #[serde(default)]
    pub addresses: String,
}

fn list_of(s: &str) -> Vec<String> {
    s.split([',', ' '])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

async fn create_account(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Form(f): Form<AccountForm>,
) -> Response {
    let role = match f.role.as_str() {
        "admin" => Role::Admin,
        "domain-admin" => Role::DomainAdmin,
        _ => Role::User,
    };
    let body = AccountBody {
        name: f.name.trim().to_string(),
        password: f.password,
        role,
        domains: list_of(&f.domains),
        addresses: list_of(&f.addresses),
        smtp_user: String::new(),
        totp: false,
    };
    match auth::create_account(State(state), Signed(ui.who.clone()), Json(body)).await {
        Ok((_, a)) => done(
            ACCOUNTS,
            format!(
                "account {} created ({})",
                a.0.account.name,
                a.0.account.role.as_str()
            ),
        ),
        Err(p) => failed(ACCOUNTS, &p),
    }
}

async fn delete_account(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Response {
    match auth::delete_account(State(state), Signed(ui.who.clone()), Path(name.clone())).await {
        Ok(_) => done(ACCOUNTS, format!("account {name} deleted")),
        Err(p) => failed(ACCOUNTS, &p),
    }
}

const POLICIES: &str = "/ui/policies";
const SMTP_ACCOUNTS: &str = "/ui/smtp-accounts";

/// The policies page's and SMTP accounts page's routes.
pub fn more_routes() -> Router<AppState> {
    Router::new()
        .route(POLICIES, get(policies).post(add_policy))
        .route("/ui/policies/{id}/delete", post(delete_policy))
        .route(SMTP_ACCOUNTS, get(smtp_accounts).post(add_smtp_account))
        .route("/ui/smtp-accounts/{name}/delete", post(delete_smtp_account))
}

fn threshold(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_default()
}

/// Allow, block and score policies (as `mb-policy`): administrators change them.
async fn policies(AdminUi(ui): AdminUi, State(state): State<AppState>) -> Response {
    let list = match policies_api::list(Signed(ui.who.clone()), State(state)).await {
        Ok(l) => l.0,
        Err(p) => return ui.problem(&p),
    };
    let body = html! {
        table {
            thead { tr { th.num { "Priority" } th { "Name" } th { "Action" } th { "Object" } th { "Pattern" } th { "Direction" } th { "Tag / quarantine / reject" } th { "Comment" } th {} } }
            tbody {
                @for x in &list {
                    tr {
                        td.num { (x.priority) }
                        td { (x.name) }
                        td { (x.action) @if x.unauthenticated { " (unauthenticated too)" } }
                        td { (x.object) }
                        td { code { (x.pattern) } }
                        td { (x.direction) }
                        td { (threshold(x.tag)) " / " (threshold(x.quarantine)) " / " (threshold(x.reject)) }
                        td { (x.comment) }
                        td {
                            form.inline method="post" action={ "/ui/policies/" (x.id) "/delete" } {
                                (ui.csrf_field())
                                button.danger type="submit" { "Delete" }
                            }
                        }
                    }
                }
                @if list.is_empty() { tr { td.muted colspan="9" { "no policies" } } }
            }
        }
        h2 { "New policy" }
        form.edit method="post" action=(POLICIES) {
            (ui.csrf_field())
            label { "Name" input type="text" name="name" required; }
            label { "Action" select name="action" {
                option value="allow" { "allow" } option value="block" { "block" } option value="score" { "score" }
            } }
            label { "Pattern" input type="text" name="pattern" placeholder="*@partner.example, example.org, 192.0.2.0/24"; }
            label { "Direction" select name="direction" {
                option value="from" { "from" } option value="to" { "to" } option value="from-or-to" { "from-or-to" }
            } }
            label { "Priority" input type="number" name="priority" value="50"; }
            label { "Tag" input type="text" name="tag" size="5"; }
            label { "Quarantine" input type="text" name="quarantine" size="5"; }
            label { "Reject" input type="text" name="reject" size="5"; }
            label { "Comment" input type="text" name="comment"; }
            button type="submit" { "Add" }
        }
    };
    ui.page("Policies", Nav::Policies, body)
}

#[derive(Debug, Deserialize)]
pub struct PolicyForm {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub pattern: String,
    #[serde(default)]
    pub direction: String,
    #[serde(default)]
    pub priority: String,
    #[serde(default)]
    pub tag: String,
    #[serde(default)]
    pub quarantine: String,
    #[serde(default)]
    pub reject: String,
    #[serde(default)]
    pub comment: String,
}

/// A form's number, or a problem naming the field.
fn number<T: std::str::FromStr>(field: &str, text: &str) -> Result<Option<T>, Problem> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    t.parse()
        .map(Some)
        .map_err(|_| Problem::bad_request(format!("{field}: {t:?} is not a number")))
}

async fn add_policy(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Form(f): Form<PolicyForm>,
) -> Response {
    let body = (|| {
        Ok::<_, Problem>(PolicyBody {
            name: f.name.trim().to_string(),
            action: f.action.clone(),
            pattern: f.pattern.trim().to_string(),
            direction: opt(f.direction.clone()),
            object: None,
            priority: number("priority", &f.priority)?.unwrap_or(50),
            tag: number("tag", &f.tag)?,
            quarantine: number("quarantine", &f.quarantine)?,
            reject: number("reject", &f.reject)?,
            unauthenticated: false,
            comment: f.comment.trim().to_string(),
        })
    })();
    let body = match body {
        Ok(b) => b,
        Err(p) => return failed(POLICIES, &p),
    };
    match policies_api::add(Admin(ui.who.clone()), State(state), Json(body)).await {
        Ok((_, v)) => done(POLICIES, format!("policy {} added", v.0.name)),
        Err(p) => failed(POLICIES, &p),
    }
}

async fn delete_policy(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    match policies_api::delete(Admin(ui.who.clone()), State(state), Path(id.clone())).await {
        Ok(_) => done(POLICIES, format!("policy {id} deleted")),
        Err(p) => failed(POLICIES, &p),
    }
}

/// SMTP AUTH accounts (as `mb-user`; a domain admin's of its domains).
async fn smtp_accounts(Staff(ui): Staff, State(state): State<AppState>) -> Response {
    let list = match smtp_api::list(Signed(ui.who.clone()), State(state)).await {
        Ok(l) => l.0,
        Err(p) => return ui.problem(&p),
    };
    let body = html! {
        table {
            thead { tr { th { "Login" } th { "Created (UTC)" } th { "Changed (UTC)" } th {} } }
            tbody {
                @for a in &list {
                    tr {
                        td { (a.name) }
                        td { (super::time(a.created_at)) }
                        td { (super::time(a.updated_at)) }
                        td {
                            form.inline method="post" action={ "/ui/smtp-accounts/" (super::percent(&a.name)) "/delete" } {
                                (ui.csrf_field())
                                button.danger type="submit" { "Delete" }
                            }
                        }
                    }
                }
                @if list.is_empty() { tr { td.muted colspan="4" { "no accounts" } } }
            }
        }
        h2 { "New SMTP account" }
        form.edit method="post" action=(SMTP_ACCOUNTS) {
            (ui.csrf_field())
            label { "Login" input type="text" name="name" required placeholder="jane@example.org"; }
            label { "Password" input type="password" name="password" required autocomplete="new-password"; }
            button type="submit" { "Create" }
        }
    };
    ui.page("SMTP accounts", Nav::SmtpAccounts, body)
}

#[derive(Debug, Deserialize)]
pub struct SmtpAccountForm {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub password: String,
}

async fn add_smtp_account(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Form(f): Form<SmtpAccountForm>,
) -> Response {
    let body = SmtpAccountBody {
        name: f.name.trim().to_string(),
        password: f.password,
    };
    match smtp_api::add(Signed(ui.who.clone()), State(state), Json(body)).await {
        Ok((_, a)) => done(SMTP_ACCOUNTS, format!("SMTP account {} created", a.0.name)),
        Err(p) => failed(SMTP_ACCOUNTS, &p),
    }
}

async fn delete_smtp_account(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Response {
    match smtp_api::remove(Signed(ui.who.clone()), State(state), Path(name.clone())).await {
        Ok(_) => done(SMTP_ACCOUNTS, format!("SMTP account {name} deleted")),
        Err(p) => failed(SMTP_ACCOUNTS, &p),
    }
}
