//! The TCP listeners: HTTPS (rustls, HTTP/1.1 and HTTP/2 by ALPN) and plain HTTP, which
//! answers with a redirect to HTTPS. Each connection is bounded: at most
//! `network.https.max_connections` open at once (beyond, new ones are closed at once),
//! the TLS handshake and every request's headers within `network.https.timeout`
//! (slowloris), headers of at most [`MAX_HEADER_BYTES`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mb_runtime::lifecycle::Shutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::peer::Peer;
use crate::state::{AppState, Counters};
use crate::tls;

/// The largest request head (request line and headers) accepted; beyond, 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The largest request body the routes read; beyond, 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What a listener does with its connections.
#[derive(Clone)]
pub enum Mode {
    /// HTTPS with the current certificate.
    Https(tls::Current),
    /// Plain HTTP answering 301 to `https://HOST:PORT/...`.
    Redirect { https_port: u16 },
    /// Plain HTTP serving the routes (`network.http.redirect_to_https = false`, for a
    /// TLS-terminating proxy in front).
    Plain,
}

/// Bounds every connection shares.
#[derive(Clone)]
pub struct Limits {
    pub connections: Arc<Semaphore>,
    pub timeout: Duration,
}

/// Accepts connections until shutdown, then lets those open finish their request.
pub async fn serve(
    listener: TcpListener,
    mode: Mode,
    app: Router,
    state: AppState,
    limits: Limits,
    shutdown: Shutdown,
) {
    loop {
        let (stream, addr) = tokio::select! {
            () = shutdown.requested() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, mostly: wait rather than spin.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let c = state.counters();
        let Ok(permit) = limits.connections.clone().try_acquire_owned() else {
            Counters::bump(&c.connections_refused);
            tracing::warn!(client = %addr.ip(), "too many connections: closed (network.https.max_connections)");
            drop(stream);
            continue;
        };
        Counters::bump(&c.connections);
        c.connections_active.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let (mode, app, state, limits, shutdown) = (
            mode.clone(),
            app.clone(),
            state.clone(),
            limits.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            connection(stream, addr, mode, app, &state, &limits, shutdown).await;
            state
                .counters()
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    mode: Mode,
    app: Router,
    state: &AppState,
    limits: &Limits,
    shutdown: Shutdown,
) {
    match mode {
        Mode::Https(current) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(current.get());
            let tls = match tokio::time::timeout(limits.timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    Counters::bump(&state.counters().tls_handshake_failures);
                    tracing::debug!(client = %addr.ip(), cause = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    Counters::bump(&state.counters().tls_handshake_failures);
                    tracing::debug!(client = %addr.ip(), "TLS handshake timed out");
                    return;
                }
            };
            let peer = Peer::Remote { addr, tls: true };
            http(TokioIo::new(tls), routes(app, peer), limits, shutdown).await;
        }
        Mode::Plain => {
            let peer = Peer::Remote { addr, tls: false };
            http(TokioIo::new(stream), routes(app, peer), limits, shutdown).await;
        }
        Mode::Redirect { https_port } => {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                std::future::ready(Ok::<_, Infallible>(redirect(&req, https_port)))
            });
            http(TokioIo::new(stream), svc, limits, shutdown).await;
        }
    }
}

/// The routes for one connection, told who the peer is.
fn routes(
    app: Router,
    peer: Peer,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        app.clone().oneshot(req.map(Body::new))
    })
}

/// Serves HTTP/1.1 and HTTP/2 on one connection until it ends; on shutdown the request
/// in progress is answered and the connection closed.
async fn http<I, S, F>(io: I, svc: S, limits: &Limits, shutdown: Shutdown)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future = F,
        > + Clone
        + Send
        + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .max_headers(64);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .max_concurrent_streams(32)
        .keep_alive_interval(Some(limits.timeout))
        .keep_alive_timeout(limits.timeout);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(cause = %e, "connection ended with an error");
            }
        }
        () = shutdown.requested() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// 301 to the same host and path on HTTPS; 400 without a usable Host.
fn redirect(req: &Request<Incoming>, https_port: u16) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .and_then(host_only);
    let Some(host) = host else {
        return plain(StatusCode::BAD_REQUEST, "a Host header is required\n");
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{path}");
    let Ok(value) = HeaderValue::from_str(&location) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "the request's path cannot be redirected\n",
        );
    };
    let mut resp = plain(StatusCode::MOVED_PERMANENTLY, "");
    resp.headers_mut().insert(header::LOCATION, value);
    resp
}

/// The host of a Host header without its port; `None` unless it is a plain name or IP
/// literal (nothing that could smuggle another URL into Location).
fn host_only(value: &str) -> Option<String> {
    let value = value.trim();
    let host = if let Some(rest) = value.strip_prefix('[') {
        let (inside, _) = rest.split_once(']')?;
        inside.parse::<std::net::Ipv6Addr>().ok()?;
        return Some(format!("[{inside}]"));
    } else {
        value.split(':').next()?
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    ok.then(|| host.to_ascii_lowercase())
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_hosts_are_redirected_to() {
        assert_eq!(
            host_only("Mail.Example.org:80").as_deref(),
            Some("mail.example.org")
        );
        assert_eq!(host_only("192.0.2.1").as_deref(), Some("192.0.2.1"));
        assert_eq!(
            host_only("[2001:db8::1]:80").as_deref(),
            Some("[2001:db8::1]")
        );
        for bad in [
            "",
            "evil.example/x",
            "a b",
            "user@host",
            "[nonsense]",
            "x\\y",
        ] {
            assert_eq!(host_only(bad), None, "{bad:?}");
        }
    }
}
