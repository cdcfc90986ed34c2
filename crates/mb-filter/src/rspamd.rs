//! Rspamd's `/checkv2` (the normal worker's HTTP API): the message is POSTed with the
//! envelope in headers (`IP`, `Helo`, `From`, `Rcpt`, `Queue-Id`, `User`); the answer is
//! JSON with the score and every symbol. HTTP/1.1 with `Connection: close`, written here
//! rather than pulling an HTTP client stack for one request shape.

use std::time::Duration;

use mb_core::verdict::ScanRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Why Rspamd gave no usable answer. `NotHttp` and `NoHost` are configuration
/// mistakes; the others mean Rspamd is unavailable for this message. The engine treats
/// them all alike, by `rspamd.unavailable_action`.
#[derive(Debug, thiserror::Error)]
pub enum RspamdError {
    #[error("rspamd.url {url:?} must be http://host:port (Rspamd's normal worker)")]
    NotHttp { url: String },
    #[error("rspamd.url {url:?} has no host")]
    NoHost { url: String },
    #[error("cannot connect to Rspamd at {host}: {source}")]
    Connect {
        host: String,
        source: std::io::Error,
    },
    #[error("Rspamd at {host}: {source}")]
    Io {
        host: String,
        source: std::io::Error,
    },
    #[error("Rspamd at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("Rspamd at {host} answered more than {MAX_REPLY} bytes")]
    TooLarge { host: String },
    #[error("Rspamd's answer has no header end")]
    NoHeaderEnd,
    #[error("Rspamd's answer is not text")]
    NotText,
    #[error("Rspamd's answer has no status: {first_line:?}")]
    NoStatus { first_line: Option<String> },
    #[error("Rspamd answered chunked, which is not expected from /checkv2")]
    Chunked,
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

/// `http://host:port[/prefix]` as (host:port, path prefix).
fn split_url(url: &str) -> Result<(String, String), RspamdError> {
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
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// A header value without line breaks (the envelope is the sender's text).
fn clean(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).collect()
}

/// The request: headers carrying the envelope, then the message.
pub fn request(host: &str, path: &str, req: &ScanRequest, message: &[u8]) -> Vec<u8> {
    let mut out = request_head(host, path, req, message.len());
    out.extend_from_slice(message);
    out
}

/// The request's head for a message of `len` bytes. `check` writes it and then the
/// message from the scan's own buffer, so a large message is not copied for Rspamd.
pub fn request_head(host: &str, path: &str, req: &ScanRequest, len: usize) -> Vec<u8> {
    let mut head = format!("POST {path}/checkv2 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    let mut add = |name: &str, value: &str| {
        if !value.is_empty() {
            head.push_str(&format!("{name}: {}\r\n", clean(value)));
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
    head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    head.into_bytes()
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

/// Splits an HTTP/1.1 answer into status and body (Content-Length or to the end).
fn response(raw: &[u8]) -> Result<(u16, &[u8]), RspamdError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(RspamdError::NoHeaderEnd)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| RspamdError::NotText)?;
    let status: u16 = head
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| RspamdError::NoStatus {
            first_line: head.lines().next().map(str::to_string),
        })?;
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        return Err(RspamdError::Chunked);
    }
    let body = &raw[end + 4..];
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    Ok((status, len.map_or(body, |n| &body[..n.min(body.len())])))
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

/// A connection to Rspamd at `host` (host:port).
async fn connect(host: &str) -> Result<tokio::net::TcpStream, RspamdError> {
    tokio::net::TcpStream::connect(host)
        .await
        .map_err(|source| RspamdError::Connect {
            host: host.to_string(),
            source,
        })
}

/// `GET /ping` -> `pong`: whether Rspamd answers, for mb-status.
pub async fn ping(url: &str, timeout: Duration) -> Result<(), RspamdError> {
    let (host, path) = split_url(url)?;
    within(url, timeout, async {
        let mut s = connect(&host).await?;
        let io = |source| RspamdError::Io {
            host: host.clone(),
            source,
        };
        s.write_all(
            format!("GET {path}/ping HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(io)?;
        let mut raw = Vec::new();
        (&mut s)
            .take(4096)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        let (status, body) = response(&raw)?;
        if status == 200 && body.starts_with(b"pong") {
            Ok(())
        } else {
            Err(RspamdError::Ping {
                host: host.clone(),
                status,
            })
        }
    })
    .await
}

/// Asks the Rspamd at `url` about `message`.
pub async fn check(
    url: &str,
    req: &ScanRequest,
    message: &[u8],
    timeout: Duration,
) -> Result<Check, RspamdError> {
    let (host, path) = split_url(url)?;
    within(url, timeout, async {
        let mut s = connect(&host).await?;
        let io = |source| RspamdError::Io {
            host: host.clone(),
            source,
        };
        s.write_all(&request_head(&host, &path, req, message.len()))
            .await
            .map_err(io)?;
        s.write_all(message).await.map_err(io)?;
        s.flush().await.map_err(io)?;
        let mut raw = Vec::new();
        (&mut s)
            .take(MAX_REPLY as u64 + 1)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        if raw.len() > MAX_REPLY {
            return Err(RspamdError::TooLarge { host: host.clone() });
        }
        let (status, body) = response(&raw)?;
        if status != 200 {
            return Err(RspamdError::Status {
                host: host.clone(),
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            });
        }
        parse(body)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_requests_and_answers() {
        assert_eq!(
            split_url("http://127.0.0.1:11333").unwrap(),
            ("127.0.0.1:11333".into(), String::new())
        );
        assert_eq!(
            split_url("http://rspamd.local/api/").unwrap(),
            ("rspamd.local:80".into(), "/api".into())
        );
        assert!(matches!(
            split_url("https://x:1"),
            Err(RspamdError::NotHttp { .. })
        ));
        assert!(matches!(
            split_url("http:///api"),
            Err(RspamdError::NoHost { .. })
        ));
        let env = ScanRequest {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            helo: "mx.example\r\nX-Evil: 1".into(),
            sender: "a@b.example".into(),
            recipients: vec!["c@d.example".into(), "e@f.example".into()],
            client_name: "unknown".into(),
            ..Default::default()
        };
        let req = String::from_utf8(request("h:1", "", &env, b"body")).unwrap();
        assert!(req.starts_with("POST /checkv2 HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains("Rcpt: c@d.example\r\nRcpt: e@f.example\r\n"),
            "{req}"
        );
        assert!(
            req.contains("Helo: mx.exampleX-Evil: 1\r\n"),
            "no header injection: {req}"
        );
        assert!(!req.contains("Hostname"), "{req}");
        assert!(req.ends_with("Content-Length: 4\r\n\r\nbody"), "{req}");
        let json = r#"{"score":3.4,"action":"no action","symbols":{"A":{"score":0.0},"MISSING_MID":{"score":2.5,"description":"no id"}}}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{json}trailing",
            json.len()
        );
        let answer = answer.as_bytes();
        let (status, body) = response(answer).unwrap();
        assert_eq!(status, 200);
        let c = parse(body).unwrap();
        assert_eq!((c.score, &c.action), (3.4, &RspamdAction::NoAction));
        assert_eq!(c.symbols[0].name, "MISSING_MID");
        assert_eq!(c.symbols[0].description, "no id");
        assert!(matches!(parse(b"{}"), Err(RspamdError::NoScore)));
        assert!(matches!(parse(b"{"), Err(RspamdError::Json(_))));
        let e = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert!(matches!(e, RspamdError::Chunked), "{e:?}");
        let e = response(b"garbage\r\n\r\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Rspamd's answer has no status: Some(\"garbage\")"
        );
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
