//! One delivery attempt to a next hop: a session from the connection cache or a new one
//! (resolve the hop, connect to its addresses in order, implicit TLS or STARTTLS as the
//! TLS policy says, relay AUTH), then one transaction with an outcome per recipient.
//! This module reports what happened; what a failure means is `trouble.rs`'s business.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mb_core::Config;
use mb_core::route::{Hop, NextHop, Protocol};
use mb_smtp::client::{Client, ClientError};
use mb_smtp::conn::Io;

use super::tls::server_name;
use super::trouble::{Attempted, DeliveryError, Lookup, NextStep, Step};
use super::{Delivery, Manager};
use crate::dns::DnsFailure;
use crate::spool::{Envelope, Recipient};

/// A session with a next hop, ready for a transaction.
pub(super) struct Session {
    pub client: Client,
    pub remote: String,
    /// The negotiated TLS version and cipher, empty for plaintext.
    tls: String,
    pub idle_since: tokio::time::Instant,
}

/// How one transaction over a session went.
enum Transacted {
    /// An outcome for every recipient.
    Done(Vec<Attempted>),
    /// The server ended the session before answering MAIL FROM (the remote host and
    /// the cause); the session is gone and nothing of the message was sent.
    Ended(String, String),
}

/// Where to connect.
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Target {
    /// `name[ip]:port` or `unix:/path`, as logs and the queue show the remote.
    fn remote(&self, name: &str) -> String {
        match self {
            Target::Tcp(a) => format!("{name}[{}]:{}", a.ip(), a.port()),
            Target::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

/// Opening a session failed; `remote` is the address tried last (empty when the next
/// hop did not resolve).
struct Failed {
    remote: String,
    error: DeliveryError,
}

/// How much TLS a session must have (Postfix's `smtp_tls_security_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsPolicy {
    /// No STARTTLS (plaintext, or implicit TLS already in place).
    None,
    /// STARTTLS when offered; a failed handshake is retried in plaintext.
    May,
    /// STARTTLS or no delivery.
    Required,
}

/// What opening sessions with one next hop needs, read once from the configuration.
struct Dial<'a> {
    cfg: &'a Config,
    hostname: String,
    /// The relay host, whose `relay.tls*` and `relay.auth.*` settings apply.
    relay: bool,
    lmtp: bool,
    timeout: Duration,
    connect_timeout: Duration,
    /// `relay.tls` towards the relay host, empty elsewhere.
    relay_tls: String,
    /// Verify the certificate (`relay.tls.verify`, relay host only).
    verify: bool,
}

impl<'a> Dial<'a> {
    fn new(cfg: &'a Config, hop: &NextHop, relay: bool) -> Dial<'a> {
        Dial {
            cfg,
            hostname: crate::server::hostname(cfg),
            relay,
            lmtp: hop.protocol == Protocol::Lmtp,
            timeout: cfg.duration("network.smtp.timeout"),
            connect_timeout: cfg.duration("queue.connect_timeout"),
            relay_tls: if relay {
                cfg.text("relay.tls")
            } else {
                String::new()
            },
            verify: relay && cfg.bool("relay.tls.verify"),
        }
    }

    /// TLS from the first byte (`relay.tls = tls`, as on port 465).
    fn implicit_tls(&self) -> bool {
        self.relay_tls == "tls"
    }

    /// The STARTTLS policy: `relay.tls` towards the relay host,
    /// `network.smtp.tls.outbound` elsewhere. Mandatory TLS never falls back; a
    /// `plaintext` retry after a failed opportunistic handshake does not try again.
    fn starttls_policy(&self, plaintext: bool) -> TlsPolicy {
        if self.relay {
            return match self.relay_tls.as_str() {
                "starttls" => TlsPolicy::Required,
                _ => TlsPolicy::None,
            };
        }
        match self.cfg.text("network.smtp.tls.outbound").as_str() {
            "mandatory" => TlsPolicy::Required,
            "opportunistic" if !plaintext => TlsPolicy::May,
            _ => TlsPolicy::None,
        }
    }

    /// The setting that makes TLS mandatory, for the error that says so.
    fn required_by(&self) -> &'static str {
        if self.relay {
            "relay.tls = starttls"
        } else {
            "network.smtp.tls.outbound = mandatory"
        }
    }

    /// The relay AUTH user, empty when none is configured or this is not the relay host.
    fn auth_user(&self) -> String {
        if self.relay {
            self.cfg.text("relay.auth.username")
        } else {
            String::new()
        }
    }
}

impl Manager {
    /// One transaction for `rcpts` through `hop`; one outcome per recipient.
    pub(super) async fn attempt(
        &self,
        d: &Delivery<'_>,
        hop: &NextHop,
        relay: bool,
        guarded: bool,
        rcpts: &[Recipient],
    ) -> Vec<Attempted> {
        let cfg = d.cfg;
        let mut key = super::session_key(cfg, hop, relay);
        if guarded {
            // A session opened for a configured route may reach an address a guarded
            // one must not: they are never shared.
            key.push_str(" guarded");
        }
        let limit = usize::try_from(cfg.int("queue.destination_concurrency")).unwrap_or(20);
        let sem = self.destination(&hop.to_string(), limit);
        let Ok(_permit) = sem.acquire_owned().await else {
            return Vec::new();
        };
        // Cached sessions first; one the server ended while it idled is replaced by
        // the next cached one or a new session (nothing of the message went out on it).
        loop {
            let (session, cached) = match self.cached(&key) {
                Some(s) => (s, true),
                None => match self.open(cfg, hop, relay, guarded).await {
                    Ok(s) => (s, false),
                    Err(f) => return all_failed(rcpts, &f.remote, &f.error),
                },
            };
            match self.transact(session, &key, hop, d, rcpts).await {
                Transacted::Ended(remote, cause) if cached => {
                    tracing::debug!(next_hop = %hop, %remote, "cached session ended: {cause}");
                    self.counters.ended.fetch_add(1, Ordering::Relaxed);
                }
                Transacted::Ended(remote, cause) => {
                    let error = DeliveryError::transaction(ClientError::Ended(cause), &remote);
                    return all_failed(rcpts, &remote, &error);
                }
                Transacted::Done(out) => return out,
            }
        }
    }

    /// Sends the message to `rcpts` over `s` and puts the session back in the cache
    /// unless it broke.
    async fn transact(
        &self,
        mut s: Session,
        key: &str,
        hop: &NextHop,
        d: &Delivery<'_>,
        rcpts: &[Recipient],
    ) -> Transacted {
        let env = d.env;
        let prefix = return_path(hop, env);
        let mut joined = Vec::new();
        let body = match d.message.body(prefix.as_bytes(), &mut joined) {
            Ok(b) => b,
            Err(e) => {
                let error = DeliveryError::Spool(e.to_string());
                self.keep(key, s);
                return Transacted::Done(all_failed(rcpts, "", &error));
            }
        };
        let dsn_passed = s.client.caps.dsn;
        // The next hop must not send success or delay notices to a forged sender either.
        let internet = super::notify::from_internet(d.cfg, env);
        let rcpts: Cow<'_, [Recipient]> = if internet {
            Cow::Owned(
                rcpts
                    .iter()
                    .map(|r| Recipient {
                        notify: super::notify::effective_notify(true, &r.notify),
                        ..r.clone()
                    })
                    .collect(),
            )
        } else {
            Cow::Borrowed(rcpts)
        };
        let ret = if internet { "HDRS" } else { env.ret.as_str() };
        let result = s
            .client
            .send_body(&env.sender, ret, &env.envid, &rcpts, body)
            .await;
        let tls_note = if s.tls.is_empty() {
            String::new()
        } else {
            format!(" (TLS {})", s.tls)
        };
        match result {
            Ok(outcomes) => {
                let out = outcomes
                    .iter()
                    .map(|o| Attempted::reply(&o.response, &tls_note, &s.remote, dsn_passed))
                    .collect();
                self.keep(key, s);
                Transacted::Done(out)
            }
            Err(ClientError::Ended(cause)) => Transacted::Ended(s.remote, cause),
            Err(e) => {
                let remote = s.remote.clone();
                // A refused transaction leaves the session usable; any other error broke it.
                if matches!(e, ClientError::Refused(_)) {
                    self.keep(key, s);
                }
                let error = DeliveryError::transaction(e, &remote);
                Transacted::Done(all_failed(&rcpts, &remote, &error))
            }
        }
    }

    /// Opens a session with the next hop: resolves it, connects to its addresses in
    /// order until one greets, says EHLO, applies the TLS policy and relay AUTH.
    async fn open(
        &self,
        cfg: &Config,
        hop: &NextHop,
        relay: bool,
        guarded: bool,
    ) -> Result<Session, Failed> {
        let targets = self
            .targets(cfg, hop, guarded)
            .await
            .map_err(|error| Failed {
                remote: String::new(),
                error,
            })?;
        let dial = Dial::new(cfg, hop, relay);
        let mut last = Failed {
            remote: String::new(),
            error: DeliveryError::NoAddress,
        };
        for (name, target) in &targets {
            let remote = target.remote(name);
            for plaintext in [false, true] {
                let error = match self
                    .try_target(&dial, name, target, &remote, plaintext)
                    .await
                {
                    Ok(s) => {
                        self.counters.connections.fetch_add(1, Ordering::Relaxed);
                        return Ok(s);
                    }
                    Err(e) => e,
                };
                let step = error.next_step();
                if step == NextStep::GiveUp {
                    return Err(Failed { remote, error });
                }
                let retry = step == NextStep::SameAddressWithoutTls && !plaintext;
                if retry {
                    tracing::info!(next_hop = %hop, "{error}; trying again without TLS");
                } else {
                    tracing::info!(next_hop = %hop, "{error}; trying the next address");
                }
                last = Failed {
                    remote: remote.clone(),
                    error,
                };
                if !retry {
                    break;
                }
            }
        }
        Err(last)
    }

    /// The addresses of a next hop, in the order to try them. For a `guarded` MX hop, as
    /// Postfix does, the MX list ends at the first host that is this gateway (the hosts
    /// after it are less preferred than we are); when that is the first host, the mail
    /// loops back to us and bounces.
    async fn targets(
        &self,
        cfg: &Config,
        hop: &NextHop,
        guarded: bool,
    ) -> Result<Vec<(String, Target)>, DeliveryError> {
        let v6 = cfg.bool("network.ipv6.enabled");
        let addresses = |failure| DeliveryError::Dns {
            lookup: Lookup::Addresses,
            failure,
        };
        match &hop.hop {
            Hop::Unix(p) => Ok(vec![(p.display().to_string(), Target::Unix(p.clone()))]),
            Hop::Host { host, port } => {
                let ips = self.dns.addresses(host, v6).await.map_err(addresses)?;
                Ok(tcp_targets(host, ips, *port).collect())
            }
            Hop::Mx { domain, port } => {
                let hosts = self
                    .dns
                    .mx(domain)
                    .await
                    .map_err(|failure| DeliveryError::Dns {
                        lookup: Lookup::Mx,
                        failure,
                    })?;
                let mut targets = Vec::new();
                let mut last = None;
                let own = if guarded {
                    super::resolve::own_addresses(cfg)
                } else {
                    Vec::new()
                };
                for h in hosts {
                    match self.dns.addresses(&h, v6).await {
                        Ok(ips)
                            if guarded
                                && ips.iter().any(|ip| super::resolve::is_self(*ip, &own)) =>
                        {
                            tracing::info!(next_hop = %hop, mx = %h, "MX host is this gateway: {ips:?}");
                            if targets.is_empty() {
                                return Err(DeliveryError::LoopsBack {
                                    domain: domain.clone(),
                                });
                            }
                            break;
                        }
                        Ok(ips) => targets.extend(tcp_targets(&h, ips, *port)),
                        Err(failure) => last = Some(failure),
                    }
                }
                if targets.is_empty() {
                    // MX hosts that all resolved to no address (no lookup failed) leave
                    // an empty error text, as they always have.
                    let failure = last.unwrap_or(DnsFailure::Transient(String::new()));
                    return Err(addresses(failure));
                }
                Ok(targets)
            }
        }
    }

    /// Opens a session with one address of the next hop.
    async fn try_target(
        &self,
        dial: &Dial<'_>,
        name: &str,
        target: &Target,
        remote: &str,
        plaintext: bool,
    ) -> Result<Session, DeliveryError> {
        let mut io = connect(target, remote, dial.connect_timeout).await?;
        let mut tls = String::new();
        if dial.implicit_tls() {
            (io, tls) = self.implicit_tls(dial, io, name, remote).await?;
        }
        let mut client = greet(dial, io, remote).await?;
        if tls.is_empty()
            && let Some(desc) = self
                .starttls(dial, &mut client, name, remote, plaintext)
                .await?
        {
            tls = desc;
        }
        authenticate(dial, &mut client, remote, &tls).await?;
        Ok(Session {
            client,
            remote: remote.to_string(),
            tls,
            idle_since: tokio::time::Instant::now(),
        })
    }

    /// The TLS handshake of an implicit-TLS session; returns the stream and its
    /// version and cipher.
    async fn implicit_tls(
        &self,
        dial: &Dial<'_>,
        io: Box<dyn Io>,
        name: &str,
        remote: &str,
    ) -> Result<(Box<dyn Io>, String), DeliveryError> {
        let connector = self.tls.get(dial.cfg, dial.verify)?;
        let stream = tokio::time::timeout(dial.timeout, connector.connect(server_name(name), io))
            .await
            .map_err(|_| DeliveryError::Timeout {
                remote: remote.to_string(),
                step: Step::TlsHandshake,
            })?
            .map_err(|e| DeliveryError::TlsHandshake {
                remote: remote.to_string(),
                cause: e.to_string(),
            })?;
        let (_, st) = stream.get_ref();
        let tls = format!(
            "{:?} with cipher {:?}",
            st.protocol_version()
                .map_or(rustls::ProtocolVersion::Unknown(0), |v| v),
            st.negotiated_cipher_suite().map(|c| c.suite())
        );
        Ok((Box::new(stream), tls))
    }

    /// STARTTLS as the policy says: `Some` with the version and cipher when the session
    /// is now encrypted, `None` when it stays in plaintext.
    async fn starttls(
        &self,
        dial: &Dial<'_>,
        client: &mut Client,
        name: &str,
        remote: &str,
        plaintext: bool,
    ) -> Result<Option<String>, DeliveryError> {
        let policy = dial.starttls_policy(plaintext);
        if policy == TlsPolicy::None {
            return Ok(None);
        }
        if !client.caps.starttls {
            if policy == TlsPolicy::Required {
                client.quit().await;
                return Err(DeliveryError::TlsNotOffered {
                    remote: remote.to_string(),
                    setting: dial.required_by(),
                });
            }
            return Ok(None);
        }
        let connector = self.tls.get(dial.cfg, dial.verify)?;
        client
            .starttls(&connector, server_name(name), &dial.hostname)
            .await
            .map(Some)
            .map_err(|e| DeliveryError::StartTls {
                remote: remote.to_string(),
                cause: e.to_string(),
                opportunistic: policy == TlsPolicy::May,
            })
    }
}

/// Every recipient of a transaction failed the same way.
fn all_failed(rcpts: &[Recipient], remote: &str, error: &DeliveryError) -> Vec<Attempted> {
    rcpts
        .iter()
        .map(|_| Attempted::failed(remote, error.clone()))
        .collect()
}

/// What goes before the message: for final delivery (LMTP) the envelope sender becomes
/// Return-Path (RFC 5321 §4.4).
fn return_path(hop: &NextHop, env: &Envelope) -> String {
    if hop.protocol != Protocol::Lmtp {
        return String::new();
    }
    format!("Return-Path: <{}>\r\n", env.sender)
}

fn tcp_targets(host: &str, ips: Vec<IpAddr>, port: u16) -> impl Iterator<Item = (String, Target)> {
    ips.into_iter()
        .map(move |ip| (host.to_string(), Target::Tcp(SocketAddr::new(ip, port))))
}

/// The TCP or Unix connection, within `queue.connect_timeout`.
async fn connect(
    target: &Target,
    remote: &str,
    connect_timeout: Duration,
) -> Result<Box<dyn Io>, DeliveryError> {
    let connected: Result<std::io::Result<Box<dyn Io>>, _> = match target {
        Target::Tcp(a) => tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(a))
            .await
            .map(|r| {
                r.map(|s| {
                    let _ = s.set_nodelay(true);
                    Box::new(s) as Box<dyn Io>
                })
            }),
        Target::Unix(p) => {
            tokio::time::timeout(connect_timeout, tokio::net::UnixStream::connect(p))
                .await
                .map(|r| r.map(|s| Box::new(s) as Box<dyn Io>))
        }
    };
    match connected {
        Ok(Ok(io)) => Ok(io),
        Ok(Err(e)) => Err(DeliveryError::Connect {
            remote: remote.to_string(),
            cause: e.to_string(),
        }),
        Err(_) => Err(DeliveryError::Timeout {
            remote: remote.to_string(),
            step: Step::Connect,
        }),
    }
}

/// The greeting (within `queue.connect_timeout`) and EHLO (LHLO for LMTP).
async fn greet(dial: &Dial<'_>, io: Box<dyn Io>, remote: &str) -> Result<Client, DeliveryError> {
    let mut client = match tokio::time::timeout(
        dial.connect_timeout,
        Client::connect(io, dial.timeout, dial.lmtp),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(DeliveryError::Greeting {
                remote: remote.to_string(),
                cause: e.to_string(),
            });
        }
        Err(_) => {
            return Err(DeliveryError::Timeout {
                remote: remote.to_string(),
                step: Step::Greeting,
            });
        }
    };
    if let Err(e) = client.hello(&dial.hostname).await {
        client.quit().await;
        return Err(DeliveryError::Ehlo {
            remote: remote.to_string(),
            cause: e.to_string(),
        });
    }
    Ok(client)
}

/// Relay AUTH, only over an encrypted session.
async fn authenticate(
    dial: &Dial<'_>,
    client: &mut Client,
    remote: &str,
    tls: &str,
) -> Result<(), DeliveryError> {
    let user = dial.auth_user();
    if user.is_empty() {
        return Ok(());
    }
    if tls.is_empty() {
        client.quit().await;
        return Err(DeliveryError::AuthWithoutTls);
    }
    if let Err(e) = client
        .auth_plain(&user, &dial.cfg.text("relay.auth.password"))
        .await
    {
        client.quit().await;
        return Err(DeliveryError::AuthRefused {
            remote: remote.to_string(),
            user,
            cause: e.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use mb_runtime::follow::Follower;

    use crate::dns::Dns;
    use crate::qmgr::tests::{config, queue_message, sink, wait_for};
    use crate::qmgr::{Clock, Manager};
    use crate::spool::{Queue, RecipientState, Spool};

    #[tokio::test]
    async fn mandatory_tls_never_falls_back_to_plaintext() {
        let (addr, got) = sink(Arc::new(AtomicBool::new(true))).await;
        let dir = tempfile::tempdir().unwrap();
        // The sink listens on loopback, which the domain's own MX may not point at: the
        // transport entry makes it a configured next hop (looked up by MX all the same).
        let cfg = config(
            dir.path(),
            &format!(
                "[relay]\ntransport = \"plain.example=smtp:plain.example:{}\"\n\
                 [network.smtp.tls]\noutbound = \"mandatory\"\n",
                addr.port()
            ),
        );
        let (trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower = Follower::start("mb-smtpd", cfg, shutdown.clone());
        let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
        let spool = Arc::new(spool);
        let dns = Dns::Fixed {
            mx: HashMap::from([(
                "plain.example".into(),
                vec![(10, "mx.plain.example".into())],
            )]),
            hosts: HashMap::from([("mx.plain.example".into(), vec![addr.ip()])]),
        };
        let m = Manager::new(spool.clone(), follower, dns, Clock::new());
        tokio::spawn(m.clone().run(shutdown.clone()));
        let id = queue_message(&spool, m.clock.unix(), &["user@plain.example"]).await;
        wait_for("the deferral", || {
            spool.locate(&id) == Some(Queue::Deferred)
        })
        .await;
        let st = spool.read(&id).unwrap().state;
        assert_eq!(st.recipients[0].state, RecipientState::Deferred);
        assert!(
            st.recipients[0].last_error.contains("TLS is required")
                && st.recipients[0]
                    .last_error
                    .contains("does not offer STARTTLS"),
            "{:?}",
            st.recipients[0]
        );
        assert!(
            got.lock().unwrap().is_empty(),
            "nothing was sent in plaintext"
        );
        trigger.trigger();
    }
}
