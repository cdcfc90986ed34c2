//! `POST /api/v1/quarantine/{id}/learn`: teaches Rspamd's Bayes classifier from a
//! quarantined message, as spam or as ham. mb-web fetches the message as stored (from
//! mb-rpcd's `Quarantine.Show`) and posts it to the controller's `/learnspam` or
//! `/learnham` through `rspamd_proxy::send`, which adds the controller password.
//!
//! Who may: administrators, and domain admins for a message whose every recipient is in
//! their domains (the check release and delete make); a `user` never (403). A message
//! the caller may not see is a 404, as everywhere in the quarantine.
//!
//! When: only when Rspamd is configured ([`available`]); otherwise 409 with words that
//! say which setting to make. Rspamd's own refusals ("already learned", no Bayes
//! backend to learn into) come back as a 409 with Rspamd's words, a controller that
//! refuses the password or fails as a 502; none is a 500. A learn is written to the
//! audit trail (`mb-config history`) like the quarantine pages' actions; the pages call
//! [`learn_message`] and write their own line.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use mb_core::{Config, Source};
use mb_proto::v1::PortalAuditRequest;
use mb_proto::v1::digest_client::DigestClient;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Signed;
use crate::auth::{Principal, Role};
use crate::problem::Problem;
use crate::rspamd_proxy::{self, Answer};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(learn))
}

/// What a message is taught as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Spam,
    Ham,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Spam => "spam",
            Class::Ham => "ham",
        }
    }

    /// The controller's command.
    fn command(self) -> &'static str {
        match self {
            Class::Spam => "learnspam",
            Class::Ham => "learnham",
        }
    }
}

/// The request: `{"as": "spam"}` or `{"as": "ham"}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct LearnBody {
    #[serde(rename = "as")]
    pub class: Class,
}

/// What a learn did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Learned {
    pub id: String,
    #[serde(rename = "as")]
    pub class: Class,
    /// In words, e.g. "Rspamd learned 0190... as spam".
    pub detail: String,
}

/// Whether learning is offered: Rspamd is configured when the filter uses it
/// (`rspamd.enabled`) or its controller was set on purpose (`rspamd.controller_url` in
/// the file or with mb-config). The URL's default alone is not enough: a gateway without
/// Rspamd has that default too.
pub fn available(cfg: &Config) -> bool {
    cfg.bool("rspamd.enabled")
        || cfg
            .entry("rspamd.controller_url")
            .is_some_and(|e| e.source != Source::Default)
}

/// Teaches Rspamd message `id` as `class` for `p`, after the checks of release and
/// delete; not audited (the callers write their line).
pub async fn learn_message(
    state: &AppState,
    p: &Principal,
    id: &str,
    class: Class,
) -> Result<Learned, Problem> {
    if p.role == Role::User {
        return Err(Problem::forbidden(format!(
            "{} may not teach Rspamd: learning from the quarantine is for administrators and domain admins",
            p.name
        )));
    }
    let cfg = state.config();
    if !available(&cfg) {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "Rspamd is not configured, so there is nothing to learn into: set rspamd.controller_url \
             (and rspamd.controller_password) to Rspamd's controller, or enable rspamd.enabled",
        ));
    }
    // The same check as release and delete: visible, and every recipient the caller's.
    super::quarantine::check_act(state, p, id).await?;
    let message = super::quarantine::fetch(state, p, id, true).await?.message;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/rfc822"),
    );
    let answer = rspamd_proxy::send(
        &cfg,
        Method::POST,
        class.command(),
        None,
        headers,
        message.into(),
    )
    .await?;
    let outcome = judge(id, class, &answer);
    tracing::info!(
        by = %p.name,
        id,
        class = class.as_str(),
        controller = %answer.controller,
        status = answer.status.as_u16(),
        learned = outcome.is_ok(),
        "quarantined message given to Rspamd to learn"
    );
    outcome
}

/// Rspamd's answer to a learn, as ours.
fn judge(id: &str, class: Class, a: &Answer) -> Result<Learned, Problem> {
    let words = rspamd_words(a);
    let at = &a.controller;
    match a.status.as_u16() {
        200 if serde_json::from_slice::<serde_json::Value>(&a.body)
            .is_ok_and(|v| v["success"] == true) =>
        {
            Ok(Learned {
                id: id.to_string(),
                class,
                detail: format!("Rspamd learned {id} as {}", class.as_str()),
            })
        }
        208 => Err(Problem::new(
            StatusCode::CONFLICT,
            format!("Rspamd has already learned this message: {words}"),
        )),
        204 => Err(Problem::new(
            StatusCode::CONFLICT,
            format!(
                "Rspamd did not learn the message: {words} (Rspamd learns only into a Bayes \
                 classifier with a working backend, normally Redis in its classifier-bayes.conf, \
                 and not a message it already classifies that way)"
            ),
        )),
        401 | 403 => Err(Problem::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "the Rspamd controller at {at} refused mb-web's password (rspamd.controller_password): {words}"
            ),
        )),
        400..=499 => Err(Problem::new(
            StatusCode::CONFLICT,
            format!("Rspamd refused to learn the message: {words}"),
        )),
        s => Err(Problem::new(
            StatusCode::BAD_GATEWAY,
            format!("the Rspamd controller at {at} could not learn the message ({s}): {words}"),
        )),
    }
}

/// What Rspamd said: its JSON `error`, its reason phrase, or its text, in that order.
fn rspamd_words(a: &Answer) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&a.body)
        && let Some(e) = v["error"].as_str()
    {
        return e.to_string();
    }
    if let Some(r) = a.reason.as_deref().filter(|r| !r.trim().is_empty()) {
        return r.to_string();
    }
    let text = String::from_utf8_lossy(&a.body);
    let text = text.trim();
    if text.is_empty() {
        return a.status.canonical_reason().unwrap_or("no answer").into();
    }
    let mut cut = text.len().min(300);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_string()
}

/// Teaches Rspamd's Bayes classifier the message as spam or as ham. Administrators, and
/// domain admins for messages to their domains only; written to the audit trail.
#[utoipa::path(
    post,
    path = "/api/v1/quarantine/{id}/learn",
    tag = "quarantine",
    params(("id" = String, Path, description = "The quarantine id")),
    request_body = LearnBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Rspamd learned the message", body = Learned),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user, or another domain's recipient is among the message's", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message (or not the caller's)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Rspamd is not configured, or refused to learn (already learned, no Bayes backend), in its words", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The controller cannot be reached, refused the password or failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-rpcd is not running or not serving", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The controller did not answer in time", body = Problem, content_type = "application/problem+json")
    )
)]
async fn learn(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<LearnBody>,
) -> Result<Json<Learned>, Problem> {
    let learned = learn_message(&state, &p, &id, body.class).await?;
    let ask = PortalAuditRequest {
        key: format!("quarantine:{id}"),
        action: format!("learn-{}", body.class.as_str()),
        detail: learned.detail.clone(),
        actor: format!("web:{}", p.name),
    };
    // The learn happened: a failed audit line is logged, not turned into an error.
    if let Err(e) = state
        .call("mb-rpcd", |ch| async move {
            DigestClient::new(ch).audit(ask).await
        })
        .await
    {
        tracing::warn!(cause = %e.detail.as_deref().unwrap_or(&e.title), id, "cannot write the audit line of a learn");
    }
    Ok(Json(learned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, reason: Option<&str>, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            reason: reason.map(String::from),
            headers: HeaderMap::new(),
            body: bytes::Bytes::from(body.to_string()),
            controller: "127.0.0.1:11334".into(),
        }
    }

    #[test]
    fn rspamds_answers_become_ours_in_its_words() {
        let ok = judge("q1", Class::Spam, &answer(200, None, r#"{"success":true}"#)).unwrap();
        assert_eq!(ok.detail, "Rspamd learned q1 as spam");
        // Rspamd 3.4's answers, as a real controller gives them.
        let cases = [
            (
                answer(
                    208,
                    Some("<undef> has been already learned as spam, ignore it"),
                    r#"{"error":"<undef> has been already learned as spam, ignore it"}"#,
                ),
                409,
                "already learned as spam",
            ),
            (
                answer(
                    204,
                    Some("all learn conditions denied learning spam in default classifier"),
                    "",
                ),
                409,
                "all learn conditions denied",
            ),
            (
                answer(403, None, r#"{"error":"Unauthorized"}"#),
                502,
                "rspamd.controller_password",
            ),
            (
                answer(500, None, r#"{"error":"cannot connect to redis"}"#),
                502,
                "cannot connect to redis",
            ),
            (answer(200, None, r#"{"success":false}"#), 502, "success"),
            (answer(400, None, "no message"), 409, "no message"),
        ];
        for (a, status, words) in cases {
            let p = judge("q1", Class::Ham, &a).unwrap_err();
            assert_eq!(p.status, status, "{a:?}: {p:?}");
            let detail = p.detail.unwrap();
            assert!(detail.contains(words), "{a:?}: {detail}");
        }
    }

    #[test]
    fn learning_is_offered_once_rspamd_is_configured() {
        let off = Config::default();
        assert!(!available(&off), "the default controller URL alone");
        let (on, errors) = Config::from_toml_str_lenient(
            "[rspamd]\ncontroller_url = \"http://127.0.0.1:11334\"\n",
            "t",
        );
        assert!(errors.is_empty());
        assert!(
            available(&on),
            "the URL set in the file, even to its default"
        );
        let (on, _) = Config::from_toml_str_lenient("[rspamd]\nenabled = true\n", "t");
        assert!(available(&on));
    }

    #[test]
    fn the_request_names_the_class() {
        let b: LearnBody = serde_json::from_str(r#"{"as":"ham"}"#).unwrap();
        assert_eq!(b.class, Class::Ham);
        assert!(serde_json::from_str::<LearnBody>(r#"{"as":"eggs"}"#).is_err());
        assert_eq!(Class::Spam.command(), "learnspam");
    }
}
