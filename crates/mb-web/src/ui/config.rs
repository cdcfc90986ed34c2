//! The configuration (administrators): every key grouped by section with its value,
//! source, type, default, range, whether a change applies live or needs a restart, and
//! its description; a key's page edits it (checked by the registry's parser first, as
//! `POST /api/v1/config/{key}/validate`, then stored as `PUT /api/v1/config/{key}`),
//! resets it, and shows its changes; the whole change history on its own page.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Json};
use maud::{Markup, html};
use serde::Deserialize;

use super::{AdminUi, Nav, Ui, done, failed};
use crate::access::Admin;
use crate::api::config::{
    self as api, ConfigValue, HistoryEntry, HistoryQuery, ListQuery, ValueBody,
};
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui/config", get(list))
        .route("/ui/config/history", get(history))
        .route("/ui/config/key/{key}", get(edit).post(save))
        .route("/ui/config/key/{key}/reset", post(reset))
}

/// The section of a key: everything before its last dot.
pub fn section(key: &str) -> &str {
    key.rsplit_once('.').map_or(key, |(s, _)| s)
}

fn key_page(key: &str) -> String {
    format!("/ui/config/key/{}", super::percent(key))
}

#[derive(Debug, Default, Deserialize)]
pub struct Filter {
    /// Only keys containing this text.
    #[serde(default)]
    pub q: String,
}

async fn list(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Response {
    let all = match api::list(
        Admin(ui.who.clone()),
        State(state),
        Query(ListQuery {
            prefix: String::new(),
        }),
    )
    .await
    {
        Ok(l) => l.0,
        Err(p) => return ui.problem(&p),
    };
    let needle = f.q.trim().to_ascii_lowercase();
    let mut sections: BTreeMap<&str, Vec<&ConfigValue>> = BTreeMap::new();
    for v in &all.values {
        if needle.is_empty()
            || v.key.contains(&needle)
            || v.description.to_ascii_lowercase().contains(&needle)
        {
            sections.entry(section(&v.key)).or_default().push(v);
        }
    }
    let body = html! {
        form.search method="get" action="/ui/config" {
            label { "Find a key" input type="text" name="q" value=(f.q) placeholder="smtp, tls, quarantine"; }
            button type="submit" { "Filter" }
            a href="/ui/config/history" { "Change history" }
        }
        p.muted { "Configuration generation " (all.generation) ". Sections: "
            @for s in sections.keys() { a href={ "#s-" (s) } { (s) } " " }
        }
        @for (s, keys) in &sections {
            h2 id={ "s-" (s) } { (s) }
            table.config {
                thead { tr { th { "Key" } th { "Value" } th { "Source" } th { "Type" } th { "Default" } th { "Range" } th { "Applies" } th { "Description" } } }
                tbody {
                    @for v in keys {
                        tr {
                            td { a href=(key_page(&v.key)) { code { (v.key) } } }
                            td.wrap { code { (v.value) } }
                            td { (v.source) }
                            td { (v.kind) }
                            td.wrap { code { (v.default) } }
                            td.wrap { (v.range) }
                            td { @if v.apply == "restart" { span.restart { "restart" } } @else { "live" } }
                            td.small { (v.description) }
                        }
                    }
                }
            }
        }
    };
    ui.page("Configuration", Nav::Config, body)
}

fn history_table(entries: &[HistoryEntry]) -> Markup {
    html! {
        table.history {
            thead { tr { th { "When (UTC)" } th { "Who" } th { "Key" } th { "Action" } th { "Old" } th { "New" } } }
            tbody {
                @for h in entries {
                    tr {
                        td { (super::time(h.at)) }
                        td { (h.user) }
                        td { a href=(key_page(&h.key)) { code { (h.key) } } }
                        td { (h.action) }
                        td.wrap { code { (h.old) } }
                        td.wrap { code { (h.new) } }
                    }
                }
                @if entries.is_empty() { tr { td.muted colspan="6" { "no changes" } } }
            }
        }
    }
}

async fn history(AdminUi(ui): AdminUi, State(state): State<AppState>) -> Response {
    match api::history(
        Admin(ui.who.clone()),
        State(state),
        Query(HistoryQuery {
            key: String::new(),
            limit: Some(200),
        }),
    )
    .await
    {
        Ok(h) => ui.page("Configuration history", Nav::Config, history_table(&h.0)),
        Err(p) => ui.problem(&p),
    }
}

/// The key's page, with `entered` and `error` when a value was refused.
async fn key_view(
    ui: &Ui,
    state: &AppState,
    key: &str,
    entered: Option<&str>,
    error: Option<&str>,
) -> Response {
    let v = match api::get(
        Admin(ui.who.clone()),
        State(state.clone()),
        Path(key.to_string()),
    )
    .await
    {
        Ok(v) => v.0,
        Err(p) => return ui.problem(&p),
    };
    let changes = api::history(
        Admin(ui.who.clone()),
        State(state.clone()),
        Query(HistoryQuery {
            key: key.to_string(),
            limit: Some(20),
        }),
    )
    .await
    .map(|h| h.0)
    .unwrap_or_default();
    let shown = entered.unwrap_or(if v.secret { "" } else { &v.value });
    let body = html! {
        dl.meta {
            dt { "Value" } dd { code.value { (v.value) } }
            dt { "Source" } dd { (v.source) }
            dt { "Type" } dd { (v.kind) }
            dt { "Default" } dd { code { (v.default) } }
            dt { "Range" } dd { (v.range) }
            dt { "Applies" } dd { @if v.apply == "restart" { span.restart { "after a restart of " (v.daemons.join(", ")) } } @else { "live (the daemons follow the change)" } }
            dt { "Read by" } dd { (v.daemons.join(", ")) }
            dt { "Description" } dd { (v.description) }
        }
        @if let Some(e) = error {
            p.flash.error role="alert" id="config-error" { (e) }
        }
        form.edit method="post" action=(key_page(&v.key)) {
            (ui.csrf_field())
            label { "New value" input type=(if v.secret { "password" } else { "text" }) name="value" value=(shown) size="50"; }
            button type="submit" { "Save" }
        }
        @if v.source == "database" {
            form.inline method="post" action={ (key_page(&v.key)) "/reset" } {
                (ui.csrf_field())
                button.plain type="submit" { "Remove the stored value (back to the file or default)" }
            }
        }
        h2 { "Changes of this key" }
        (history_table(&changes))
        p { a href={ "/ui/config#s-" (section(&v.key)) } { "All keys of " (section(&v.key)) } }
    };
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    ui.page_with(status, &v.key, Nav::Config, body)
}

async fn edit(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Response {
    key_view(&ui, &state, &key, None, None).await
}

#[derive(Debug, Deserialize)]
pub struct ValueForm {
    #[serde(default)]
    pub value: String,
}

/// Checks the value with the registry's parser; a refused one shows the form again
/// with the parser's words, a good one is stored and the page says whether a restart
/// is needed.
async fn save(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Path(key): Path<String>,
    Form(f): Form<ValueForm>,
) -> Response {
    let checked = api::validate(
        Admin(ui.who.clone()),
        Path(key.clone()),
        Json(ValueBody {
            value: f.value.clone(),
        }),
    )
    .await;
    match checked {
        Err(p) => return ui.problem(&p),
        Ok(v) if !v.0.valid => {
            let why = v.0.error.unwrap_or_else(|| "refused".into());
            return key_view(&ui, &state, &key, Some(&f.value), Some(&why)).await;
        }
        Ok(_) => {}
    }
    let page = key_page(&key);
    match api::set(
        Admin(ui.who.clone()),
        State(state.clone()),
        Path(key.clone()),
        Json(ValueBody { value: f.value }),
    )
    .await
    {
        Ok(r) => {
            let r = r.0;
            let mut text = format!("{} = {} saved", r.key, r.value);
            if r.restart_required {
                text.push_str(&format!(
                    "; restart needed: restart {} for it to take effect",
                    r.restart.join(", ")
                ));
            } else {
                text.push_str("; the daemons apply it live");
            }
            for w in &r.warnings {
                text.push_str(&format!("; warning: {w}"));
            }
            done(&page, text)
        }
        // Refused by mb-rpcd after all (a file-only key, a cluster-wide key on a child
        // node, a check across keys): the form again with its words.
        Err(p) if p.status == 400 || p.status == 409 => {
            key_view(
                &ui,
                &state,
                &key,
                None,
                Some(p.detail.as_deref().unwrap_or(&p.title)),
            )
            .await
        }
        Err(p) => failed(&page, &p),
    }
}

async fn reset(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Response {
    let page = key_page(&key);
    match api::unset(Admin(ui.who.clone()), State(state), Path(key)).await {
        Ok(r) => {
            let r = r.0;
            let mut text = format!("{} is {} again (from the {})", r.key, r.value, r.source);
            if r.restart_required {
                text.push_str("; restart needed for it to take effect");
            }
            done(&page, text)
        }
        Err(p) => failed(&page, &p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_grouped_by_what_precedes_their_last_dot() {
        assert_eq!(section("network.smtp.port"), "network.smtp");
        assert_eq!(section("network.smtp.tls.inbound"), "network.smtp.tls");
        assert_eq!(section("single"), "single");
    }
}
