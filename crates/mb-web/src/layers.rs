//! What every answer goes through, whichever listener it came from: counting, the
//! security headers, the per-address rate limit and the request deadline.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::peer::Peer;
use crate::problem::Problem;
use crate::ratelimit::{Decision, Limiter};
use crate::state::{AppState, Counters};

/// How long a request may take to be answered (response headers; a body may stream on).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The Content-Security-Policy: nothing by default, scripts and styles only from files
/// of this origin (never inline), no framing, forms only to this origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// HSTS for a year, subdomains included: the gateway's name serves HTTPS only.
pub const HSTS: &str = "max-age=31536000; includeSubDomains";

/// Counts requests and their answers by class.
pub async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let c = state.counters();
    Counters::bump(&c.requests);
    let resp = next.run(req).await;
    Counters::bump(match resp.status().as_u16() {
        200..=299 => &c.responses_2xx,
        300..=399 => &c.responses_3xx,
        400..=499 => &c.responses_4xx,
        _ => &c.responses_5xx,
    });
    resp
}

/// The security headers on every answer, errors included.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let secure = match req.extensions().get::<Peer>() {
        Some(Peer::Remote { tls, .. }) => *tls,
        // Behind nginx, which says whether its client came over HTTPS.
        Some(Peer::Local { .. }) => req
            .headers()
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")),
        None => false,
    };
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let cached = h.contains_key(header::CACHE_CONTROL);
    let mut set = |name: HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(header::CONTENT_SECURITY_POLICY, CSP);
    set(header::X_FRAME_OPTIONS, "DENY");
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(header::REFERRER_POLICY, "no-referrer");
    set(
        HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        HeaderName::from_static("cross-origin-resource-policy"),
        "same-origin",
    );
    set(
        HeaderName::from_static("permissions-policy"),
        "camera=(), microphone=(), geolocation=(), payment=()",
    );
    if secure {
        set(header::STRICT_TRANSPORT_SECURITY, HSTS);
    }
    if !cached {
        set(header::CACHE_CONTROL, "no-store");
    }
    resp
}

/// The per-address limit, `network.https.rate_limit`/`rate_burst` as configured now.
pub async fn rate_limit(
    State((state, limiter)): State<(AppState, Arc<Limiter>)>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(ip) = req.extensions().get::<Peer>().and_then(Peer::client_ip) {
        let cfg = state.config();
        let per_minute = u64::try_from(cfg.int("network.https.rate_limit")).unwrap_or(1);
        let burst = u64::try_from(cfg.int("network.https.rate_burst")).unwrap_or(0);
        if let Decision::Limit { retry_after } = limiter.check(ip, per_minute, burst) {
            Counters::bump(&state.counters().rate_limited);
            tracing::info!(client = %ip, path = %req.uri().path(), "rate limited");
            return Problem::too_many_requests(retry_after).into_response();
        }
    }
    next.run(req).await
}

/// Answers 503 when a request takes longer than [`REQUEST_TIMEOUT`].
pub async fn deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => Problem::unavailable(format!(
            "the request took longer than {}s",
            REQUEST_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

/// The largest plain-text error body turned into a problem document.
const PLAIN_ERROR_MAX: usize = 16 * 1024;

/// Errors that axum itself answers in plain text (a body over the limit, JSON that does
/// not parse, a missing header) become problem documents like every other error, with
/// axum's words as the detail.
pub async fn problem_bodies(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let detail = match axum::body::to_bytes(body, PLAIN_ERROR_MAX).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let mut fresh = Problem::new(status, detail).into_response();
    // Headers the error set (Allow on a 405, Retry-After) stay.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fresh.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fresh
}

/// Unknown paths answer a problem document too.
pub async fn not_found(req: Request) -> Problem {
    Problem::not_found(format!("no such resource: {}", req.uri().path()))
}
