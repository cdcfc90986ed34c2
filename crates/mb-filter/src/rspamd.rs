//! Rspamd's `/checkv2` (the normal worker's HTTP API): the message is POSTed with the
//! envelope in headers (`IP`, `Helo`, `From`, `Rcpt`, `Queue-Id`, `User`); the answer is
//! JSON with the score and every symbol. Over hyper-util's pooled HTTP/1.1 client, so
//! connections are kept alive between messages, to `http://host:port` or to a Unix
//! socket (`unix:/run/rspamd/normal.sock`, through hyperlocal).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::http::HeaderValue;
use hyper::{Request, Response, StatusCode, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyperlocal::UnixConnector;
use mb_core::verdict::ScanRequest;
use tokio_stream::wrappers::ReceiverStream;

/// The error of hyper-util's client.
type ClientError = hyper_util::client::legacy::Error;

/// Largest answer read from Rspamd.
const MAX_REPLY: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct RspamdSymbol {
    pub name: String,
    pub score: f64,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub score: f64,
    pub action: RspamdAction,
    /// The rewritten Subject Rspamd proposes with `rewrite subject` (its
    /// `actions.subject` template applied), when it sends one.
    pub subject: Option<String>,
    pub symbols: Vec<RspamdSymbol>,
}

/// The `action` of a `/checkv2` answer: what Rspamd would have its MTA do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RspamdAction {
    NoAction,
    /// Rspamd's greylist threshold: defer, the sender retries.
    Greylist,
    /// Defer for another reason (rate limits, a forced `soft reject`).
    SoftReject,
    /// Deliver, marked as spam, with its Subject rewritten.
    RewriteSubject,
    /// Deliver, marked as spam in the headers.
    AddHeader,
    Reject,
    /// Rspamd 3's `quarantine` action.
    Quarantine,
    /// Rspamd 3's `discard` action (accept and drop).
    Discard,
    /// A custom action of the local Rspamd configuration; it has no meaning here.
    Other(String),
}

impl RspamdAction {
    /// Rspamd's own name of an action (missing means none).
    pub fn parse(name: &str) -> RspamdAction {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "no action" => RspamdAction::NoAction,
            "greylist" => RspamdAction::Greylist,
            "soft reject" => RspamdAction::SoftReject,
            "rewrite subject" => RspamdAction::RewriteSubject,
            "add header" => RspamdAction::AddHeader,
            "reject" => RspamdAction::Reject,
            "quarantine" => RspamdAction::Quarantine,
            "discard" => RspamdAction::Discard,
            _ => RspamdAction::Other(name.to_string()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            RspamdAction::NoAction => "no action",
            RspamdAction::Greylist => "greylist",
            RspamdAction::SoftReject => "soft reject",
            RspamdAction::RewriteSubject => "rewrite subject",
            RspamdAction::AddHeader => "add header",
            RspamdAction::Reject => "reject",
            RspamdAction::Quarantine => "quarantine",
            RspamdAction::Discard => "discard",
            RspamdAction::Other(name) => name,
        }
    }
}

impl std::fmt::Display for RspamdAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why Rspamd gave no usable answer. `NotHttp`, `NoHost` and `RelativeSocket` are
/// configuration mistakes; the others mean Rspamd is unavailable for this message. The
/// engine treats them all alike, by `rspamd.unavailable_action`.
#[derive(Debug, thiserror::Error)]
pub enum RspamdError {
    #[error(
        "rspamd.url {url:?} must be http://host:port (Rspamd's normal worker) or unix:/path/to/socket"
    )]
    NotHttp { url: String },
    #[error("rspamd.url {url:?} has no host")]
    NoHost { url: String },
    #[error("rspamd.url {url:?} names a socket by a relative path; write unix:/absolute/path")]
    RelativeSocket { url: String },
    /// `cause` is the whole chain of the client's error, which alone says only
    /// "client error (Connect)".
    #[error("cannot connect to Rspamd at {host}: {cause}")]
    Connect { host: String, cause: String },
    #[error("Rspamd at {host}: {cause}")]
    Http { host: String, cause: String },
    #[error("Rspamd at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("Rspamd at {host} answered more than {MAX_REPLY} bytes")]
    TooLarge { host: String },
    #[error("Rspamd at {host} answered HTTP {status} to /ping")]
    Ping { host: String, status: u16 },
    /// A refusal, with the start of its body.
    #[error("Rspamd at {host} answered HTTP {status}: {body}")]
    Status {
        host: String,
        status: u16,
        body: String,
    },
    #[error("Rspamd answered with bad JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("Rspamd's answer has no score")]
    NoScore,
}

/// Where Rspamd's normal worker listens, from `rspamd.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `http://host[:port][/prefix]`: the authority as written and the path prefix
    /// (no trailing slash) that `/checkv2` and `/ping` go under.
    Tcp { authority: String, prefix: String },
    /// `unix:/path/to/socket` (Rspamd's `bind_socket = "/run/rspamd/normal.sock"`).
    Unix { socket: PathBuf },
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, RspamdError> {
        let url = url.trim();
        if let Some(path) = url.strip_prefix("unix:") {
            // `unix:///run/x.sock` is the form some tools write; it is the same path.
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(RspamdError::RelativeSocket { url: url.into() });
            }
            return Ok(Endpoint::Unix {
                socket: PathBuf::from(path),
            });
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| RspamdError::NotHttp { url: url.into() })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(RspamdError::NoHost { url: url.into() });
        }
        // hyper must accept it as a URI; a malformed host is the configuration's fault.
        if format!("http://{authority}{path}/checkv2")
            .parse::<Uri>()
            .is_err()
        {
            return Err(RspamdError::NotHttp { url: url.into() });
        }
        Ok(Endpoint::Tcp {
            authority: authority.to_string(),
            prefix: path.to_string(),
        })
    }

    /// The URI of `path` (`/checkv2`, `/ping`) at this endpoint.
    fn uri(&self, path: &str) -> Uri {
        match self {
            Endpoint::Tcp { authority, prefix } => format!("http://{authority}{prefix}{path}")
                .parse()
                // `parse` checked this very shape.
                .unwrap_or_else(|_| Uri::from_static("http://invalid./")),
            Endpoint::Unix { socket } => hyperlocal::Uri::new(socket, path).into(),
        }
    }

    /// How errors name the endpoint.
    fn host(&self) -> String {
        match self {
            Endpoint::Tcp { authority, .. } => authority.clone(),
            Endpoint::Unix { socket } => format!("unix:{}", socket.display()),
        }
    }
}

/// A request body: the message, fed in pieces from the scan's own buffer, or nothing.
type Body = BoxBody<Bytes, Infallible>;

/// Idle connections kept per Rspamd endpoint. Each filter worker scans at most a few
/// messages at once; more idle connections than that would only hold Rspamd's sockets.
const POOL_IDLE_PER_HOST: usize = 16;

/// How long an idle connection is kept. Rspamd closes a keep-alive connection after
/// its worker `timeout` (60 s by default); dropping ours well before avoids sending a
/// message on a connection Rspamd is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The pieces the message is sent in: it is never copied whole for Rspamd.
const CHUNK: usize = 64 * 1024;

/// The process's connection pools to Rspamd, over TCP and over Unix sockets: every scan
/// of every session shares them, so a busy worker keeps a few connections open instead
/// of connecting for each message. One per process because hyper's pool lives with its
/// client and scans have no other shared state to hold it.
struct Clients {
    tcp: Client<HttpConnector, Body>,
    unix: Client<UnixConnector, Body>,
}

fn clients() -> &'static Clients {
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    CLIENTS.get_or_init(|| {
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_max_idle_per_host(POOL_IDLE_PER_HOST)
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new());
            b
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Clients {
            tcp: builder().build(http),
            unix: builder().build(UnixConnector),
        }
    })
}

impl Clients {
    async fn send(
        &self,
        endpoint: &Endpoint,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ClientError> {
        match endpoint {
            Endpoint::Tcp { .. } => self.tcp.request(req).await,
            Endpoint::Unix { .. } => self.unix.request(req).await,
        }
    }
}

/// The client's error in our words: a connection refused, or anything after it.
fn failed(endpoint: &Endpoint, e: &ClientError) -> RspamdError {
    let host = endpoint.host();
    let cause = chain(e);
    if e.is_connect() {
        RspamdError::Connect { host, cause }
    } else {
        RspamdError::Http { host, cause }
    }
}

/// Whether a request failed because the kept-alive connection it went out on was
/// closed under it (hyper saw the connection end before any answer).
fn stale(e: &ClientError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(|h| h.is_incomplete_message() || h.is_canceled())
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

/// A header value without line breaks (the envelope is the sender's text).
fn clean(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).collect()
}

/// The request's head for a message of `len` bytes: the envelope in Rspamd's headers.
/// The body is added by the caller.
pub fn request_head(
    endpoint: &Endpoint,
    req: &ScanRequest,
    len: usize,
) -> hyper::http::request::Builder {
    let mut b = Request::post(endpoint.uri("/checkv2"));
    if matches!(endpoint, Endpoint::Unix { .. }) {
        // hyperlocal's URI carries the socket path as a hex "host"; Rspamd needs none.
        b = b.header(header::HOST, "localhost");
    }
    let mut add = |name: &str, value: &str| {
        let value = clean(value);
        if value.is_empty() {
            return;
        }
        if let Ok(v) = HeaderValue::from_str(&value) {
            b = std::mem::take(&mut b).header(name, v);
        }
    };
    if let Some(ip) = req.client_ip {
        add("IP", &ip.to_string());
    }
    add("Helo", &req.helo);
    if req.client_name != "unknown" {
        add("Hostname", &req.client_name);
    }
    add("From", &req.sender);
    for r in &req.recipients {
        add("Rcpt", r);
    }
    add("Queue-Id", &req.queue_id);
    add("User", &req.auth_user);
    b.header(header::CONTENT_LENGTH, len)
}

/// The JSON body of a 200 answer.
pub fn parse(body: &[u8]) -> Result<Check, RspamdError> {
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let score = v
        .get("score")
        .and_then(serde_json::Value::as_f64)
        .ok_or(RspamdError::NoScore)?;
    let mut symbols: Vec<RspamdSymbol> = v
        .get("symbols")
        .and_then(|s| s.as_object())
        .map(|m| {
            m.iter()
                .map(|(name, s)| RspamdSymbol {
                    name: name.clone(),
                    score: s
                        .get("score")
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0),
                    description: s
                        .get("description")
                        .and_then(|d| d.as_str())
                        .unwrap_or_default()
                        .to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    symbols.sort_by(|a, b| {
        b.score
            .abs()
            .total_cmp(&a.score.abs())
            .then(a.name.cmp(&b.name))
    });
    Ok(Check {
        score,
        action: RspamdAction::parse(v.get("action").and_then(|a| a.as_str()).unwrap_or_default()),
        subject: v
            .get("subject")
            .and_then(|s| s.as_str())
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string),
        symbols,
    })
}

/// `work` within `timeout`, or the error that says Rspamd did not answer in time.
async fn within<T>(
    url: &str,
    timeout: Duration,
    work: impl Future<Output = Result<T, RspamdError>>,
) -> Result<T, RspamdError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| RspamdError::Timeout {
            url: url.to_string(),
            timeout,
        })?
}

/// The status and at most `limit` bytes of an answer's body.
async fn read(
    endpoint: &Endpoint,
    resp: Response<Incoming>,
    limit: usize,
) -> Result<(StatusCode, Bytes), RspamdError> {
    let status = resp.status();
    match Limited::new(resp.into_body(), limit).collect().await {
        Ok(body) => Ok((status, body.to_bytes())),
        Err(e) if e.is::<LengthLimitError>() => Err(RspamdError::TooLarge {
            host: endpoint.host(),
        }),
        Err(e) => Err(RspamdError::Http {
            host: endpoint.host(),
            cause: chain(&*e),
        }),
    }
}

/// `GET /ping` -> `pong`: whether Rspamd answers, for mb-status.
pub async fn ping(url: &str, timeout: Duration) -> Result<(), RspamdError> {
    let endpoint = Endpoint::parse(url)?;
    within(url, timeout, async {
        let mut b = Request::get(endpoint.uri("/ping"));
        if matches!(endpoint, Endpoint::Unix { .. }) {
            b = b.header(header::HOST, "localhost");
        }
        let req = b
            .body(Empty::new().boxed())
            .map_err(|e| RspamdError::Http {
                host: endpoint.host(),
                cause: e.to_string(),
            })?;
        let resp = clients()
            .send(&endpoint, req)
            .await
            .map_err(|e| failed(&endpoint, &e))?;
        let (status, body) = read(&endpoint, resp, 4096).await?;
        if status == StatusCode::OK && body.starts_with(b"pong") {
            Ok(())
        } else {
            Err(RspamdError::Ping {
                host: endpoint.host(),
                status: status.as_u16(),
            })
        }
    })
    .await
}

/// Asks the Rspamd at `url` about `message`, on a pooled connection when one is idle.
pub async fn check(
    url: &str,
    req: &ScanRequest,
    message: &[u8],
    timeout: Duration,
) -> Result<Check, RspamdError> {
    let endpoint = Endpoint::parse(url)?;
    within(url, timeout, async {
        let resp = match post(&endpoint, req, message).await? {
            Ok(resp) => resp,
            // A pooled connection Rspamd closed as we picked it. Asking again on a fresh
            // connection is safe: a check changes nothing in Rspamd.
            Err(e) if stale(&e) => {
                tracing::debug!(cause = %chain(&e), "Rspamd closed a kept-alive connection; asking again");
                post(&endpoint, req, message)
                    .await?
                    .map_err(|e| failed(&endpoint, &e))?
            }
            Err(e) => return Err(failed(&endpoint, &e)),
        };
        let (status, body) = read(&endpoint, resp, MAX_REPLY).await?;
        if status != StatusCode::OK {
            return Err(RspamdError::Status {
                host: endpoint.host(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            });
        }
        parse(&body)
    })
    .await
}

/// Sends the message to `/checkv2`: the head, then the message in [`CHUNK`]s from the
/// caller's buffer while hyper writes them, until the answer's head arrives.
async fn post(
    endpoint: &Endpoint,
    req: &ScanRequest,
    message: &[u8],
) -> Result<Result<Response<Incoming>, ClientError>, RspamdError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
    let request = request_head(endpoint, req, message.len())
        .body(body)
        .map_err(|e| RspamdError::Http {
            host: endpoint.host(),
            cause: e.to_string(),
        })?;
    let send = clients().send(endpoint, request);
    let feed = async move {
        for piece in message.chunks(CHUNK) {
            // A closed channel: hyper dropped the body (the request failed or was
            // answered early); the answer says which.
            if tx
                .send(Ok(Frame::data(Bytes::copy_from_slice(piece))))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    tokio::pin!(send, feed);
    let mut fed = false;
    loop {
        tokio::select! {
            resp = &mut send => return Ok(resp),
            () = &mut feed, if !fed => fed = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_tcp_or_unix_endpoints() {
        let tcp = |authority: &str, prefix: &str| Endpoint::Tcp {
            authority: authority.into(),
            prefix: prefix.into(),
        };
        let check = |url: &str, expected: Endpoint| {
            assert_eq!(Endpoint::parse(url).unwrap(), expected, "{url}");
        };
        check("http://127.0.0.1:11333", tcp("127.0.0.1:11333", ""));
        check("http://rspamd.local/api/", tcp("rspamd.local", "/api"));
        check("http://[::1]:11333/", tcp("[::1]:11333", ""));
        check(
            "unix:/run/rspamd/normal.sock",
            Endpoint::Unix {
                socket: "/run/rspamd/normal.sock".into(),
            },
        );
        check(
            " unix:///run/rspamd/normal.sock",
            Endpoint::Unix {
                socket: "/run/rspamd/normal.sock".into(),
            },
        );
        let refused = |url: &str| Endpoint::parse(url).unwrap_err();
        assert!(matches!(
            refused("https://x:1"),
            RspamdError::NotHttp { .. }
        ));
        assert!(matches!(
            refused("127.0.0.1:11333"),
            RspamdError::NotHttp { .. }
        ));
        assert!(matches!(
            refused("http://a b:1"),
            RspamdError::NotHttp { .. }
        ));
        assert!(matches!(refused("http:///api"), RspamdError::NoHost { .. }));
        assert!(matches!(
            refused("unix:run/normal.sock"),
            RspamdError::RelativeSocket { .. }
        ));
        // The URIs requests go to: the prefix kept, the socket hidden in hyperlocal's host.
        let api = Endpoint::parse("http://rspamd.local:8080/api").unwrap();
        assert_eq!(
            api.uri("/checkv2").to_string(),
            "http://rspamd.local:8080/api/checkv2"
        );
        let unix = Endpoint::parse("unix:/run/r.sock").unwrap();
        assert_eq!(unix.uri("/ping").scheme_str(), Some("unix"));
        assert_eq!(unix.uri("/ping").path(), "/ping");
        assert_eq!(unix.host(), "unix:/run/r.sock");
    }

    #[test]
    fn the_envelope_goes_in_headers_without_injection() {
        let env = ScanRequest {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            helo: "mx.example\r\nX-Evil: 1".into(),
            sender: "a@b.example".into(),
            recipients: vec!["c@d.example".into(), "e@f.example".into()],
            client_name: "unknown".into(),
            ..Default::default()
        };
        let endpoint = Endpoint::parse("http://h:1").unwrap();
        let req = request_head(&endpoint, &env, 4).body(()).unwrap();
        assert_eq!(req.method(), hyper::Method::POST);
        assert_eq!(req.uri().path(), "/checkv2");
        let h = req.headers();
        let rcpt: Vec<_> = h
            .get_all("rcpt")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(rcpt, ["c@d.example", "e@f.example"]);
        assert_eq!(h["helo"], "mx.exampleX-Evil: 1", "no header injection");
        assert!(h.get("x-evil").is_none());
        assert_eq!(h["ip"], "192.0.2.1");
        assert!(
            h.get("hostname").is_none(),
            "an unknown client name is not sent"
        );
        assert!(h.get("user").is_none(), "empty values are not sent");
        assert_eq!(h[header::CONTENT_LENGTH], "4");
        let unix = Endpoint::parse("unix:/run/r.sock").unwrap();
        let req = request_head(&unix, &env, 0).body(()).unwrap();
        assert_eq!(req.headers()[header::HOST], "localhost");
    }

    #[test]
    fn answers_parse_or_fail_with_their_reason() {
        let json = r#"{"score":3.4,"action":"no action","symbols":{"A":{"score":0.0},"MISSING_MID":{"score":2.5,"description":"no id"}}}"#;
        let c = parse(json.as_bytes()).unwrap();
        assert_eq!((c.score, &c.action), (3.4, &RspamdAction::NoAction));
        assert_eq!(c.symbols[0].name, "MISSING_MID");
        assert_eq!(c.symbols[0].description, "no id");
        assert!(matches!(parse(b"{}"), Err(RspamdError::NoScore)));
        assert!(matches!(parse(b"{"), Err(RspamdError::Json(_))));
    }

    /// A one-connection HTTP peer on a Unix socket: answers each request on it with
    /// `answers` in turn (raw HTTP), then closes. Returns the requests it read.
    async fn peer(
        socket: std::path::PathBuf,
        answers: Vec<Vec<u8>>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let (mut s, _) = listener.accept().await.unwrap();
            for answer in answers {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                // Up to the head's end and the body its Content-Length announces.
                loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return seen;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            seen.push(text);
                            break;
                        }
                    }
                }
                s.write_all(&answer).await.unwrap();
            }
            seen
        })
    }

    fn http(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn checks_share_a_kept_alive_connection_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("normal.sock");
        let json = r#"{"score":1.5,"action":"add header","symbols":{}}"#;
        // One connection only: a second check that connected afresh would find no peer.
        let seen = peer(
            socket.clone(),
            vec![
                http("200 OK", json),
                http("200 OK", json),
                http("200 OK", "pong"),
            ],
        )
        .await;
        let url = format!("unix:{}", socket.display());
        let message = vec![b'x'; 200_000];
        let env = ScanRequest {
            sender: "a@b.example".into(),
            ..Default::default()
        };
        for _ in 0..2 {
            let c = check(&url, &env, &message, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!((c.score, c.action), (1.5, RspamdAction::AddHeader));
        }
        ping(&url, Duration::from_secs(5)).await.unwrap();
        let seen = seen.await.unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[0].starts_with("POST /checkv2 HTTP/1.1\r\n"),
            "{}",
            &seen[0][..100]
        );
        assert!(
            seen[0].contains("from: a@b.example\r\n"),
            "{}",
            &seen[0][..300]
        );
        assert!(
            seen[0].ends_with(&"x".repeat(1000)),
            "the whole message is sent"
        );
        assert!(seen[2].starts_with("GET /ping HTTP/1.1\r\n"), "{}", seen[2]);
    }

    #[tokio::test]
    async fn refusals_silence_garbage_and_floods_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let env = ScanRequest::default();
        let t = Duration::from_secs(5);
        let at = |name: &str| {
            let socket = dir.path().join(name);
            (format!("unix:{}", socket.display()), socket)
        };

        // Nobody listening.
        let (url, _) = at("absent.sock");
        let e = check(&url, &env, b"m", t).await.unwrap_err();
        assert!(matches!(e, RspamdError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains("absent.sock"), "{e}");
        let e = check("http://127.0.0.1:1", &env, b"m", t)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("refused"), "the cause is told: {e}");

        // A refusal keeps the start of its body.
        let (url, socket) = at("refuses.sock");
        let _peer = peer(
            socket,
            vec![http("500 Internal Server Error", "no rules loaded")],
        )
        .await;
        let e = check(&url, &env, b"m", t).await.unwrap_err();
        assert!(
            matches!(&e, RspamdError::Status { status: 500, body, .. } if body == "no rules loaded"),
            "{e:?}"
        );

        // Not HTTP at all.
        let (url, socket) = at("garbage.sock");
        let _peer = peer(socket, vec![b"SPAMD/1.1 0 EX_OK\r\n\r\n".to_vec()]).await;
        let e = check(&url, &env, b"m", t).await.unwrap_err();
        assert!(matches!(e, RspamdError::Http { .. }), "{e:?}");

        // More than MAX_REPLY.
        let (url, socket) = at("flood.sock");
        let big = format!("{{\"score\":1,\"pad\":\"{}\"}}", "a".repeat(MAX_REPLY));
        let _peer = peer(socket, vec![http("200 OK", &big)]).await;
        let e = check(&url, &env, b"m", t).await.unwrap_err();
        assert!(matches!(e, RspamdError::TooLarge { .. }), "{e:?}");

        // Silence: the timeout, named as such.
        let (url, socket) = at("silent.sock");
        let _listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let e = check(&url, &env, b"m", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, RspamdError::Timeout { .. }), "{e:?}");

        // A ping answered with something else than pong.
        let (url, socket) = at("notpong.sock");
        let _peer = peer(socket, vec![http("200 OK", "hello")]).await;
        let e = ping(&url, t).await.unwrap_err();
        assert!(matches!(e, RspamdError::Ping { status: 200, .. }), "{e:?}");

        // A configuration mistake is told before anything is tried.
        let e = check("unix:normal.sock", &env, b"m", t).await.unwrap_err();
        assert!(e.to_string().contains("unix:/absolute/path"), "{e}");
    }

    /// Answers as Rspamd 3.4 sends them (a forced action, trimmed of urls and timing).
    #[test]
    fn every_action_is_parsed() {
        let check = |action: &str, subject: Option<&str>, expected: RspamdAction| {
            let field = subject.map_or(String::new(), |s| format!(r#""subject":"{s}","#));
            let body = format!(
                r#"{{"is_skipped":false,"score":7.5,"required_score":15.0,"action":"{action}",{field}"messages":{{"smtp_message":"forced"}},"symbols":{{"MISSING_MID":{{"name":"MISSING_MID","score":2.5,"metric_score":2.5,"description":"Message id is missing"}}}},"message-id":"undef","milter":{{"remove_headers":{{"X-Spam":0}}}}}}"#
            );
            let c = parse(body.as_bytes()).unwrap_or_else(|e| panic!("{action}: {e}"));
            assert_eq!(c.action, expected, "{body}");
            assert_eq!(c.action.to_string(), action, "the name round-trips");
            assert_eq!(c.score, 7.5);
            assert_eq!(c.subject.as_deref(), subject);
        };
        check("no action", None, RspamdAction::NoAction);
        check("greylist", None, RspamdAction::Greylist);
        check("soft reject", None, RspamdAction::SoftReject);
        check(
            "rewrite subject",
            Some("=?UTF-8?Q?=2A=2A=2A_SPAM_=2A=2A=2A_Hello_w=C3=B6?= =?UTF-8?Q?rld?="),
            RspamdAction::RewriteSubject,
        );
        check("rewrite subject", None, RspamdAction::RewriteSubject);
        check("add header", None, RspamdAction::AddHeader);
        check("reject", None, RspamdAction::Reject);
        check("quarantine", None, RspamdAction::Quarantine);
        check("discard", None, RspamdAction::Discard);
        check("custom", None, RspamdAction::Other("custom".into()));
        // No action at all is none; an empty proposed Subject is no proposal.
        let c = parse(br#"{"score":1.0,"subject":" "}"#).unwrap();
        assert_eq!((c.action, c.subject), (RspamdAction::NoAction, None));
    }
}
