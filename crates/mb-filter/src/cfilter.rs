//! The content filter on `filter.listen:filter.port` (10031) for Postfix sites
//! (`content_filter = smtp:[127.0.0.1]:10031`, or `lmtp:` for per-recipient replies):
//! each message is scanned here and, if it passes, handed to `filter.next_hop` (Postfix's
//! 10025 reinjection service) before Postfix gets its reply, so nothing is queued twice
//! and a failure is a tempfail that Postfix retries, never a loss.
//!
//! Every worker binds the port with SO_REUSEPORT, so the kernel spreads connections over
//! the workers. Only loopback and `smtp.mynetworks` clients are served: the next hop
//! trusts what comes from here. Postfix's XFORWARD (`smtp_send_xforward_command = yes`)
//! supplies the original client's address, name and HELO for the sender checks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mb_core::EnhancedStatus;
use mb_core::verdict::{Direction, ScanRequest};
use mb_runtime::lifecycle::Shutdown;
use mb_scan::reply::Disposition;
use mb_smtp::Reply;
use mb_smtp::conn::{Conn, ReadError};
use mb_smtp::data::DataDecoder;
use mb_smtp::proto::{Command, MAX_COMMAND_LINE, parse_command};
use tokio::net::{TcpListener, TcpSocket};

use crate::FilterService;

/// Connections and messages seen by the content filter.
#[derive(Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub messages: AtomicU64,
    pub reinjected: AtomicU64,
}

/// Binds the listener with SO_REUSEPORT (every worker binds the same address).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts until shutdown; sessions run on their own tasks.
pub async fn serve(
    listener: TcpListener,
    svc: Arc<FilterService>,
    counters: Arc<Counters>,
    shutdown: Shutdown,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.requested() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "content filter accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let (svc, counters) = (svc.clone(), counters.clone());
        tokio::spawn(async move {
            counters.active.fetch_add(1, Ordering::Relaxed);
            let cfg = svc.follower.current();
            let allowed = trusted(peer.ip(), &cfg.nets("smtp.mynetworks"));
            let timeout = cfg.duration("network.smtp.timeout");
            let mut conn = Conn::new(Box::new(stream), timeout);
            if allowed {
                Session::new(&svc, &counters, peer).run(&mut conn).await;
            } else {
                tracing::warn!(client = %peer.ip(), "content filter refused a client outside loopback and smtp.mynetworks");
                let _ = conn
                    .send(&line(
                        554,
                        EnhancedStatus::POLICY_REJECT,
                        "Not a trusted client of this content filter",
                    ))
                    .await;
            }
            conn.shutdown().await;
            counters.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Whether a client may use the content filter: its next hop trusts what comes from
/// here, so only loopback and `smtp.mynetworks`.
pub fn trusted(ip: IpAddr, mynetworks: &[ipnet::IpNet]) -> bool {
    ip.is_loopback() || mynetworks.iter().any(|n| n.contains(&ip))
}

/// What XFORWARD told about the original client.
#[derive(Default, Clone)]
struct Forwarded {
    addr: Option<IpAddr>,
    name: String,
    helo: String,
    ident: String,
}

struct Session<'a> {
    svc: &'a FilterService,
    counters: &'a Counters,
    peer: SocketAddr,
    lmtp: bool,
    xforward: Forwarded,
    sender: Option<String>,
    rcpts: Vec<String>,
}

/// One reply on the wire (the one encoder, `mb_smtp::Reply`).
fn line(code: u16, status: EnhancedStatus, text: &str) -> String {
    Reply::new(code, status, text).to_wire()
}

const NEXT_HOP_FAILED: EnhancedStatus = EnhancedStatus::new(4, 4, 0);

impl<'a> Session<'a> {
    fn new(svc: &'a FilterService, counters: &'a Counters, peer: SocketAddr) -> Self {
        Session {
            svc,
            counters,
            peer,
            lmtp: false,
            xforward: Forwarded::default(),
            sender: None,
            rcpts: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.sender = None;
        self.rcpts.clear();
        self.xforward = Forwarded::default();
    }

    async fn run(&mut self, conn: &mut Conn) {
        let cfg = self.svc.follower.current();
        let host = crate::hostname(&cfg);
        if conn
            .send(&format!("220 {host} ESMTP mb-filter content filter\r\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let raw = match conn.read_line(MAX_COMMAND_LINE).await {
                Ok(l) => l,
                Err(ReadError::TooLong) => {
                    let _ = conn
                        .send(&line(500, EnhancedStatus::SYNTAX_ERROR, "Line too long"))
                        .await;
                    continue;
                }
                Err(ReadError::Timeout) => {
                    let _ = conn.send(&timeout_reply().to_wire()).await;
                    return;
                }
                Err(_) => return,
            };
            let reply = match parse_command(&raw) {
                Ok(greeting @ (Command::Lhlo(_) | Command::Ehlo(_))) => {
                    self.lmtp = matches!(greeting, Command::Lhlo(_));
                    self.reset();
                    let size = cfg.size("smtp.message_size_limit");
                    Reply::bare(
                        250,
                        format!(
                            "{host}\nPIPELINING\nSIZE {size}\n8BITMIME\nENHANCEDSTATUSCODES\n\
                             XFORWARD NAME ADDR PROTO HELO SOURCE IDENT"
                        ),
                    )
                    .to_wire()
                }
                Ok(Command::Xforward(attrs)) => {
                    for (name, value) in attrs {
                        match name.as_str() {
                            "ADDR" => {
                                self.xforward.addr = value.trim_start_matches("IPV6:").parse().ok();
                            }
                            "NAME" => self.xforward.name = value,
                            "HELO" => self.xforward.helo = value,
                            "IDENT" => self.xforward.ident = value,
                            _ => {}
                        }
                    }
                    line(250, EnhancedStatus::OK, "Ok")
                }
                Ok(Command::Quit) => {
                    let _ = conn.send(&line(221, EnhancedStatus::OK, "Bye")).await;
                    return;
                }
                Ok(Command::Data) if self.rcpts.is_empty() => line(
                    503,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: need RCPT command",
                ),
                Ok(Command::Data) => {
                    if conn
                        .send(&Reply::bare(354, "End data with <CR><LF>.<CR><LF>").to_wire())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let limit = cfg.size("smtp.message_size_limit");
                    match read_data(conn, limit).await {
                        Ok(Some(message)) => {
                            let r = self.deliver(&cfg, message).await;
                            self.reset();
                            r
                        }
                        Ok(None) => {
                            let r = self.each(&line(
                                552,
                                EnhancedStatus::TOO_BIG,
                                "Error: message too large",
                            ));
                            self.reset();
                            r
                        }
                        Err(end) => {
                            if let Some(reply) = end {
                                let _ = conn.send(&reply.to_wire()).await;
                            }
                            return;
                        }
                    }
                }
                Ok(Command::Helo(_)) if !self.lmtp => {
                    self.reset();
                    Reply::bare(250, host.clone()).to_wire()
                }
                Ok(Command::Mail(from, _)) => {
                    if self.sender.is_some() {
                        line(
                            503,
                            EnhancedStatus::BAD_SEQUENCE,
                            "Error: nested MAIL command",
                        )
                    } else {
                        self.sender = Some(from.map(|m| m.to_string()).unwrap_or_default());
                        line(250, EnhancedStatus::SENDER_OK, "Ok")
                    }
                }
                Ok(Command::Rcpt(to, _)) => {
                    let max = usize::try_from(cfg.int("smtp.max_recipients")).unwrap_or(100);
                    if self.sender.is_none() {
                        line(
                            503,
                            EnhancedStatus::BAD_SEQUENCE,
                            "Error: need MAIL command",
                        )
                    } else if self.rcpts.len() >= max {
                        line(
                            452,
                            EnhancedStatus::new(4, 5, 3),
                            "Error: too many recipients",
                        )
                    } else {
                        self.rcpts.push(to.to_string());
                        line(250, EnhancedStatus::RECIPIENT_OK, "Ok")
                    }
                }
                Ok(Command::Rset) => {
                    self.reset();
                    line(250, EnhancedStatus::OK, "Ok")
                }
                Ok(Command::Noop) => line(250, EnhancedStatus::OK, "Ok"),
                Ok(_) => line(
                    502,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: command not implemented",
                ),
                Err(e) => e.0.to_wire(),
            };
            if conn.send(&reply).await.is_err() {
                return;
            }
        }
    }

    /// Scans, then reinjects what passes; returns the reply (one per recipient for LMTP).
    async fn deliver(&mut self, cfg: &mb_core::Config, message: Vec<u8>) -> String {
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        let client = self.xforward.addr;
        let queue_id = if mb_runtime::quarantine::valid_id(&self.xforward.ident) {
            self.xforward.ident.clone()
        } else {
            String::new()
        };
        // Postfix tells the original client by XFORWARD; without it the client is unknown,
        // and the sender checks that need it are skipped rather than run against
        // Postfix's address. Postfix does not forward the AUTH account, so the direction
        // here comes from the client's network alone.
        let request = ScanRequest {
            queue_id: queue_id.clone(),
            client_ip: client,
            client_name: if self.xforward.name.is_empty() {
                "unknown".into()
            } else {
                self.xforward.name.clone()
            },
            helo: self.xforward.helo.clone(),
            sender: self.sender.clone().unwrap_or_default(),
            recipients: self.rcpts.clone(),
            auth_user: String::new(),
            tls: String::new(),
            direction: Direction::of(false, client, &cfg.nets("smtp.mynetworks")),
        };
        let Ok(_slot) = self.svc.slots.clone().acquire_owned().await else {
            return self.each(&line(421, EnhancedStatus::new(4, 3, 2), "Shutting down"));
        };
        self.svc.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let v = self.svc.process(cfg, &request, &message).await;
        self.svc.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        match mb_scan::reply::disposition(&v) {
            Disposition::Refuse(reply) => self.each(&reply.to_wire()),
            Disposition::Discard => self.each(&line(250, EnhancedStatus::OK, "Ok: discarded")),
            Disposition::Quarantined(id) => self.each(&line(
                250,
                EnhancedStatus::OK,
                &format!("Ok: quarantined as {id}"),
            )),
            Disposition::Deliver {
                add_headers,
                remove_headers,
            } => {
                let out = mb_core::message::with_headers(&message, add_headers, remove_headers);
                self.reinject(cfg, &out).await
            }
        }
    }

    /// The same line for every recipient (LMTP) or once (SMTP).
    fn each(&self, l: &str) -> String {
        if self.lmtp {
            l.repeat(self.rcpts.len())
        } else {
            l.to_string()
        }
    }

    async fn reinject(&self, cfg: &mb_core::Config, message: &[u8]) -> String {
        let hop = cfg.text("filter.next_hop");
        let result = mb_smtp::client::reinject(
            &hop,
            &crate::hostname(cfg),
            self.sender.as_deref().unwrap_or_default(),
            &self.rcpts,
            message,
            cfg.duration("network.smtp.timeout"),
        )
        .await;
        let outcomes = match result {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(client = %self.peer.ip(), next_hop = %hop, cause = %e, "content filter could not reinject; tempfailing");
                return self.each(&line(
                    451,
                    NEXT_HOP_FAILED,
                    &format!("Error: next hop {hop} failed: {e}"),
                ));
            }
        };
        self.counters.reinjected.fetch_add(1, Ordering::Relaxed);
        if self.lmtp {
            // One answer per recipient, in RCPT order, as the next hop gave it.
            return self
                .rcpts
                .iter()
                .map(|r| match outcomes.iter().find(|o| &o.recipient == r) {
                    Some(o) if o.response.is_positive() => line(250, EnhancedStatus::OK, "Ok"),
                    // The next hop's own words (they start with its enhanced status).
                    Some(o) => Reply::bare(o.response.code, o.response.lines.join(" ")).to_wire(),
                    None => line(451, NEXT_HOP_FAILED, "Error: no answer from the next hop"),
                })
                .collect();
        }
        let accepted = outcomes.iter().filter(|o| o.response.is_positive()).count();
        let failed: Vec<String> = outcomes
            .iter()
            .filter(|o| !o.response.is_positive())
            .map(|o| format!("{}: {}", o.recipient, o.response.text()))
            .collect();
        if failed.is_empty() {
            line(
                250,
                EnhancedStatus::OK,
                &format!("Ok: filtered and delivered to {hop}"),
            )
        } else if outcomes.iter().any(|o| o.response.is_transient()) || accepted > 0 {
            // A single SMTP reply cannot be partial: try again (some recipients may get
            // the message twice; none lose it).
            tracing::warn!(refused = %failed.join("; "), "next hop refused some recipients; tempfailing the message");
            line(
                451,
                NEXT_HOP_FAILED,
                &format!("Error: next hop refused {}", failed.join("; ")),
            )
        } else {
            line(
                554,
                EnhancedStatus::new(5, 0, 0),
                &format!("Error: next hop refused {}", failed.join("; ")),
            )
        }
    }
}

/// The reply that ends an idle connection.
fn timeout_reply() -> Reply {
    Reply::new(421, EnhancedStatus::new(4, 4, 2), "Timeout, closing")
}

/// Reads DATA up to `limit` bytes: `Ok(None)` when larger (the rest is read and dropped),
/// `Err` when the connection must end: with a last reply (timeout, bare CR/LF), or
/// none when it broke.
async fn read_data(conn: &mut Conn, limit: u64) -> Result<Option<Vec<u8>>, Option<Reply>> {
    let mut decoder = DataDecoder::default();
    let mut message = Vec::new();
    let mut scratch = Vec::new();
    let mut too_large = false;
    loop {
        if conn.buffered().is_empty() {
            match conn.fill().await {
                Ok(_) => {}
                Err(ReadError::Timeout) => return Err(Some(timeout_reply())),
                Err(_) => return Err(None),
            }
        }
        let out = if too_large {
            &mut scratch
        } else {
            &mut message
        };
        let (used, done) = decoder.feed(conn.buffered(), out).map_err(|_| {
            Some(Reply::new(
                521,
                EnhancedStatus::SYNTAX_ERROR,
                "Bare CR or LF in DATA, closing",
            ))
        })?;
        conn.consume(used);
        if !too_large && message.len() as u64 > limit {
            too_large = true;
            message = Vec::new();
        }
        scratch.clear();
        if done {
            return Ok((!too_large).then_some(message));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_mynetworks_are_trusted() {
        let nets: Vec<ipnet::IpNet> = vec!["192.0.2.0/24".parse().unwrap()];
        for (ip, ok) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("192.0.2.9", true),
            ("198.51.100.1", false),
            ("2001:db8::1", false),
        ] {
            assert_eq!(trusted(ip.parse().unwrap(), &nets), ok, "{ip}");
        }
        assert!(!trusted("192.0.2.9".parse().unwrap(), &[]));
    }
}
