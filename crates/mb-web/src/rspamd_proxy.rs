//! `/rspamd/...`: Rspamd's controller (its web interface and its API: `stat`, `graph`,
//! `history`, `learnspam`, ...) reverse-proxied for administrators, as the product
//! documents describe. The controller is `rspamd.controller_url` (`http://host:port` or
//! `unix:/path`); mb-web adds `rspamd.controller_password` as Rspamd's `Password` header
//! itself, so the password never reaches a browser, and forwards nothing that
//! authenticates the browser to mb-web (cookies, `Authorization`, the CSRF token).
//!
//! What may pass is bounded: the path stays under the controller (no `.` or `..`
//! segment, encoded or not, no empty segment, no backslash), requests and answers have a
//! size limit, and the whole exchange a deadline. Both settings are read per request, so
//! `mb-config set` applies at once.
//!
//! [`send`] is the one way mb-web talks to the controller: the proxy uses it, and so
//! does the quarantine's "learn as spam/ham" (`api::learn`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyperlocal::UnixConnector;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::problem::Problem;
use crate::state::AppState;

/// Where the proxy lives in mb-web's URL space.
pub const PREFIX: &str = "/rspamd/";

/// The largest request body passed on (Rspamd's `learnspam` takes a whole message).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// The largest answer passed back (`history` and `graph` are the big ones).
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// How long one proxied exchange may take, connection and whole answer included.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The routes of this module, for `api::routes()`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(index))
        .routes(routes!(proxy))
}

/// Rspamd's web interface (its `index.html`), through mb-web.
#[utoipa::path(
    get,
    path = "/rspamd/",
    tag = "rspamd",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The controller's answer, passed through"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The controller cannot be reached, or answered too much", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The controller did not answer in time", body = Problem, content_type = "application/problem+json")
    )
)]
async fn index(State(state): State<AppState>, Admin(p): Admin, req: Request) -> Response {
    forward(&state, &p.name, req).await
}

/// Any path of Rspamd's controller, through mb-web with the controller's password added:
/// `GET /rspamd/stat`, `GET /rspamd/graph?type=daily`, `POST /rspamd/learnspam`. The
/// controller's own answers (its errors included) are passed through as they are.
#[utoipa::path(
    method(get, post),
    path = "/rspamd/{*path}",
    tag = "rspamd",
    params(("path" = String, Path, description = "The controller's path, such as `stat`")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The controller's answer, passed through"),
        (status = 400, description = "The path would leave the controller (`..`, `.`, an empty segment, a backslash)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The request body is over 16 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The controller cannot be reached, or answered too much", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The controller did not answer in time", body = Problem, content_type = "application/problem+json")
    )
)]
async fn proxy(State(state): State<AppState>, Admin(p): Admin, req: Request) -> Response {
    forward(&state, &p.name, req).await
}

/// Where the controller listens, from `rspamd.controller_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Controller {
    /// `http://host[:port][/prefix]`: the authority and a path prefix without a trailing
    /// slash.
    Tcp { authority: String, prefix: String },
    /// `unix:/path/to/socket`.
    Unix { socket: PathBuf },
}

impl Controller {
    /// `None` for a URL of another form (the registry's validator refuses those).
    pub fn parse(url: &str) -> Option<Controller> {
        let url = url.trim();
        if let Some(path) = url.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            return path.starts_with('/').then(|| Controller::Unix {
                socket: PathBuf::from(path),
            });
        }
        let rest = url.strip_prefix("http://")?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        format!("http://{authority}{prefix}/")
            .parse::<Uri>()
            .ok()
            .map(|_| Controller::Tcp {
                authority: authority.to_string(),
                prefix: prefix.to_string(),
            })
    }

    /// The controller's URI for `rest` (already checked by [`check_path`]) and the
    /// query. The authority is always the configured one: nothing from the client's
    /// request line can change where the request goes.
    pub fn uri(&self, rest: &str, query: Option<&str>) -> Option<Uri> {
        let path_and_query = match query {
            Some(q) => format!("/{rest}?{q}"),
            None => format!("/{rest}"),
        };
        match self {
            Controller::Tcp { authority, prefix } => {
                format!("http://{authority}{prefix}{path_and_query}")
                    .parse()
                    .ok()
            }
            Controller::Unix { socket } => {
                // hyperlocal keeps only the path of what it is given; a query is added back.
                let uri: Uri = hyperlocal::Uri::new(socket, &format!("/{rest}")).into();
                let mut parts = uri.into_parts();
                parts.path_and_query = path_and_query.parse().ok();
                Uri::from_parts(parts).ok()
            }
        }
    }
}

/// Why a path below `/rspamd/` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has a . or .. segment")]
    DotSegment,
    #[error("the path has an empty segment (//)")]
    EmptySegment,
    #[error("the path has a backslash or a control character")]
    Forbidden,
    #[error("the path has a % not followed by two hex digits")]
    BadEscape,
}

/// Whether `rest`, the raw path after `/rspamd/`, stays within the controller once
/// decoded (by us, by a server, or by Rspamd itself): no `.`/`..` segment, no empty
/// segment but a trailing one, no backslash (a separator on some servers), no control
/// character. Checked on the percent-decoded text, so `%2e%2e` and `%2f` count as
/// what they decode to.
pub fn check_path(rest: &str) -> Result<(), PathError> {
    let decoded = percent_decode(rest)?;
    if decoded.iter().any(|b| *b == b'\\' || b.is_ascii_control()) {
        return Err(PathError::Forbidden);
    }
    let segments: Vec<&[u8]> = decoded.split(|b| *b == b'/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            b"." | b".." => return Err(PathError::DotSegment),
            b"" if i != last || last == 0 && !rest.is_empty() => {
                return Err(PathError::EmptySegment);
            }
            _ => {}
        }
    }
    Ok(())
}

fn percent_decode(text: &str) -> Result<Vec<u8>, PathError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::BadEscape)?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Request headers never passed to the controller: hop-by-hop ones, what authenticates
/// the browser to mb-web, a `Password` of the client's own (ours replaces it), and
/// addresses a client could forge to pass Rspamd's `secure_ip`.
const DROPPED_REQUEST: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "cookie",
    "authorization",
    "password",
    "x-csrf-token",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Answer headers not passed back: hop-by-hop ones, and cookies (the controller has no
/// business setting any on mb-web's origin).
const DROPPED_RESPONSE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "set-cookie",
    "set-cookie2",
];

/// The headers of `from` that may pass, without those `Connection` names.
fn passed(from: &HeaderMap, dropped: &[&str]) -> HeaderMap {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        if !dropped.contains(&n) && !named.iter().any(|c| c == n) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

type ProxyBody = Full<Bytes>;

/// Connection pools to the controller, kept for the process like mb-filter's to the
/// normal worker.
struct Clients {
    tcp: Client<HttpConnector, ProxyBody>,
    unix: Client<UnixConnector, ProxyBody>,
}

fn clients() -> &'static Clients {
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    CLIENTS.get_or_init(|| {
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_max_idle_per_host(4)
                .pool_idle_timeout(Duration::from_secs(20))
                .pool_timer(TokioTimer::new());
            b
        };
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        Clients {
            tcp: builder().build(http),
            unix: builder().build(UnixConnector),
        }
    })
}

/// An error with its causes, `outer: inner: innermost`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// Passes `req` to the controller for the administrator `admin`, or says why not.
async fn forward(state: &AppState, admin: &str, req: Request) -> Response {
    match tokio::time::timeout(TIMEOUT, exchange(state, admin, req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(p)) => p.into_response(),
        Err(_) => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the Rspamd controller did not answer within {}s",
                TIMEOUT.as_secs()
            ),
        )
        .into_response(),
    }
}

async fn exchange(state: &AppState, admin: &str, req: Request) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let rest = parts
        .uri
        .path()
        .strip_prefix(PREFIX)
        .unwrap_or_default()
        .to_string();
    check_path(&rest).map_err(|e| Problem::bad_request(format!("{e}: not passed to Rspamd")))?;
    let body = match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "requests to the Rspamd controller are limited to {} MiB",
                    MAX_REQUEST_BYTES >> 20
                ),
            ));
        }
        Err(e) => return Err(Problem::bad_request(format!("reading the request: {e}"))),
    };
    let method = parts.method.clone();
    let answer = send(
        &state.config(),
        method.clone(),
        &rest,
        parts.uri.query(),
        passed(&parts.headers, DROPPED_REQUEST),
        body,
    )
    .await?;
    tracing::info!(
        admin = %admin,
        method = %method,
        path = %rest,
        status = answer.status.as_u16(),
        "proxied to the Rspamd controller"
    );
    let mut resp = Response::new(AxumBody::from(answer.body));
    *resp.status_mut() = answer.status;
    *resp.headers_mut() = passed(&answer.headers, DROPPED_RESPONSE);
    if method == Method::HEAD {
        *resp.body_mut() = AxumBody::empty();
    }
    Ok(resp)
}

/// One whole answer of the controller.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// The status line's reason phrase when it is not the standard one: Rspamd puts its
    /// own words there (`204 all learn conditions denied ...`, `208 ... already
    /// learned ...`), and a 204 has no body to carry them.
    pub reason: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Where the controller is (`127.0.0.1:11334`, `unix:/path`), for messages.
    pub controller: String,
}

/// Sends one request to the controller `rspamd.controller_url` names, on the pooled
/// connections, with `rspamd.controller_password` added as its `Password` header, and
/// reads the whole answer within [`TIMEOUT`] and [`MAX_RESPONSE_BYTES`]. `rest` is the
/// controller's path without its leading slash, already checked by [`check_path`] (or
/// a fixed one such as `learnspam`); `headers` must not carry anything of the browser's
/// that authenticates it (see [`DROPPED_REQUEST`]). The proxy and the quarantine's
/// learn action (`api::learn`) both go through here.
pub async fn send(
    cfg: &mb_core::Config,
    method: Method,
    rest: &str,
    query: Option<&str>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer, Problem> {
    match tokio::time::timeout(TIMEOUT, send_now(cfg, method, rest, query, headers, body)).await {
        Ok(answer) => answer,
        Err(_) => Err(Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the Rspamd controller did not answer within {}s",
                TIMEOUT.as_secs()
            ),
        )),
    }
}

async fn send_now(
    cfg: &mb_core::Config,
    method: Method,
    rest: &str,
    query: Option<&str>,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<Answer, Problem> {
    let url = cfg.text("rspamd.controller_url");
    let controller = Controller::parse(&url).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_GATEWAY,
            format!("rspamd.controller_url {url:?} is not http://host:port or unix:/path"),
        )
    })?;
    let uri = controller
        .uri(rest, query)
        .ok_or_else(|| Problem::bad_request("the path is not a valid URI"))?;
    let host = match &controller {
        Controller::Tcp { authority, .. } => authority.as_str(),
        Controller::Unix { .. } => "localhost",
    };
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(header::HOST, v);
    }
    let password = cfg.text("rspamd.controller_password");
    if !password.is_empty() {
        let mut v = HeaderValue::from_str(&password)
            .map_err(|_| Problem::internal("rspamd.controller_password is not a header value"))?;
        v.set_sensitive(true);
        headers.insert(HeaderName::from_static("password"), v);
    }
    let mut out = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(body))
        .map_err(|e| Problem::internal(format!("building the request: {e}")))?;
    *out.headers_mut() = headers;

    let sent = match &controller {
        Controller::Tcp { .. } => clients().tcp.request(out).await,
        Controller::Unix { .. } => clients().unix.request(out).await,
    };
    let where_ = match &controller {
        Controller::Tcp { authority, .. } => authority.clone(),
        Controller::Unix { socket } => format!("unix:{}", socket.display()),
    };
    let resp = sent.map_err(|e| {
        let cause = chain(&e);
        tracing::warn!(controller = %where_, %cause, "the Rspamd controller cannot be reached");
        Problem::new(
            StatusCode::BAD_GATEWAY,
            format!("the Rspamd controller at {where_} cannot be reached: {cause}"),
        )
    })?;
    let (rparts, rbody) = resp.into_parts();
    let bytes = match Limited::new(rbody, MAX_RESPONSE_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the Rspamd controller answered more than {} MiB",
                    MAX_RESPONSE_BYTES >> 20
                ),
            ));
        }
        Err(e) => {
            return Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                format!("the Rspamd controller's answer broke off: {}", chain(&*e)),
            ));
        }
    };
    let reason = rparts
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
    // Rspamd never echoes the password; should some error page ever do, it stops here.
    if !password.is_empty()
        && (contains(&bytes, password.as_bytes())
            || reason
                .as_deref()
                .is_some_and(|r| contains(r.as_bytes(), password.as_bytes())))
    {
        tracing::warn!(controller = %where_, path = %rest, "the Rspamd controller's answer contained its password; withheld");
        return Err(Problem::new(
            StatusCode::BAD_GATEWAY,
            "the Rspamd controller's answer was withheld: it contained the controller password",
        ));
    }
    Ok(Answer {
        status: rparts.status,
        reason,
        headers: rparts.headers,
        body: bytes,
        controller: where_,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_would_leave_the_controller_are_refused() {
        for ok in [
            "",
            "stat",
            "graph",
            "plugins/neural/learn",
            "plugins/",
            "a.b/c..d/.e",
            "history%3Fx",
            "%41uth",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("..", PathError::DotSegment),
            ("../etc/passwd", PathError::DotSegment),
            ("stat/../../x", PathError::DotSegment),
            ("./stat", PathError::DotSegment),
            ("%2e%2e/x", PathError::DotSegment),
            ("%2E%2e", PathError::DotSegment),
            ("a%2f..%2fb", PathError::DotSegment),
            ("/etc/passwd", PathError::EmptySegment),
            ("//evil.example/x", PathError::EmptySegment),
            ("a//b", PathError::EmptySegment),
            ("%2fetc", PathError::EmptySegment),
            ("..\\x", PathError::Forbidden),
            ("a%5c..%5cb", PathError::Forbidden),
            ("a%00b", PathError::Forbidden),
            ("a%0d%0aX: y", PathError::Forbidden),
            ("%zz", PathError::BadEscape),
            ("a%2", PathError::BadEscape),
        ] {
            assert_eq!(check_path(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn the_controller_url_fixes_where_requests_go() {
        let tcp = Controller::parse("http://127.0.0.1:11334").unwrap();
        assert_eq!(
            tcp.uri("stat", None).unwrap().to_string(),
            "http://127.0.0.1:11334/stat"
        );
        let prefixed = Controller::parse("http://rspamd.local/ui/").unwrap();
        assert_eq!(
            prefixed
                .uri("graph", Some("type=daily"))
                .unwrap()
                .to_string(),
            "http://rspamd.local/ui/graph?type=daily"
        );
        // An absolute URL in the path is a path on the controller, never another host.
        let abs = tcp.uri("http:/evil.example/x", None).unwrap();
        assert_eq!(abs.authority().unwrap().as_str(), "127.0.0.1:11334");
        let unix = Controller::parse("unix:/run/rspamd/controller.sock").unwrap();
        let u = unix.uri("stat", Some("a=1")).unwrap();
        assert_eq!(
            (u.scheme_str(), u.path(), u.query()),
            (Some("unix"), "/stat", Some("a=1"))
        );
        for bad in [
            "https://x",
            "ftp://x",
            "http://",
            "http://u@h:1",
            "unix:rel.sock",
            "",
        ] {
            assert_eq!(Controller::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_never_pass() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("cookie", "__Host-mb_session=abc"),
            ("authorization", "Bearer k"),
            ("password", "the client's guess"),
            ("x-csrf-token", "t"),
            ("x-forwarded-for", "127.0.0.1"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("accept", "application/json"),
            ("classifier", "bayes"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let out = passed(&h, DROPPED_REQUEST);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept", "classifier"]);
        let mut r = HeaderMap::new();
        r.append(header::SET_COOKIE, HeaderValue::from_static("x=1"));
        r.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let out = passed(&r, DROPPED_RESPONSE);
        assert!(out.get(header::SET_COOKIE).is_none());
        assert_eq!(out[header::CONTENT_TYPE], "application/json");
    }
}
