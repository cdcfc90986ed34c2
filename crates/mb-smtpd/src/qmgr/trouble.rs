//! The failure policy, in one place (as Postfix keeps it in `smtp_trouble.c`): every way
//! a delivery attempt can fail is a `DeliveryError` variant, and this module alone
//! decides what each one means: the text recorded for the recipient and sent in a
//! bounce, whether it is permanent (the recipient bounces) or transient (it waits in
//! the deferred queue), and whether the connection loop tries the next address.
//!
//! Per recipient, an attempt ends as Stalwart's `Status`: accepted (`Accepted`), or
//! failed with an error that says whether it is final. Scheduling the next attempt is
//! the manager's business.

use std::time::Duration;

use mb_smtp::client::ClientError;
use mb_smtp::reply::Response;

use crate::dns::DnsFailure;
use crate::spool::RecipientState;

/// Why a delivery attempt failed, for one recipient or every recipient of a transaction.
/// Its text (`Display`) starts with the reply code and enhanced status it is reported
/// with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// No next hop for the recipient's domain.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// DNS gave no usable answer for the next hop.
    #[error("{}", dns_text(*.lookup, .failure))]
    Dns { lookup: Lookup, failure: DnsFailure },
    /// The next hop resolved to no address at all.
    #[error("451 4.4.1 no address to connect to")]
    NoAddress,
    /// The TCP or Unix connection was refused or failed.
    #[error("451 4.4.1 connect to {remote}: {cause}")]
    Connect { remote: String, cause: String },
    /// A step of opening the session took too long.
    #[error("{}", timeout_text(.remote, *.step))]
    Timeout { remote: String, step: Step },
    /// The server's greeting was a refusal, or unreadable.
    #[error("451 4.4.2 {remote} greeting: {cause}")]
    Greeting { remote: String, cause: String },
    /// EHLO (and HELO) failed.
    #[error("451 4.4.2 {remote} refused EHLO: {cause}")]
    Ehlo { remote: String, cause: String },
    /// The TLS handshake of an implicit-TLS session (`relay.tls = tls`) failed.
    #[error("451 4.7.5 TLS handshake with {remote} failed: {cause}")]
    TlsHandshake { remote: String, cause: String },
    /// STARTTLS was offered but failed. When TLS was only opportunistic, the same
    /// address is tried again in plaintext.
    #[error("451 4.7.5 STARTTLS with {remote} failed: {cause}")]
    StartTls {
        remote: String,
        cause: String,
        opportunistic: bool,
    },
    /// TLS is mandatory (`setting` says which setting makes it so) but not offered.
    #[error("451 4.7.4 TLS is required ({setting}) but {remote} does not offer STARTTLS")]
    TlsNotOffered {
        remote: String,
        setting: &'static str,
    },
    /// The TLS client configuration cannot be built: no other address would do better.
    #[error(transparent)]
    TlsConfig(#[from] TlsConfigError),
    /// Relay AUTH is configured but the session is not encrypted: the password is never
    /// sent in the clear.
    #[error(
        "451 4.7.0 relay.auth.username is set but the session with the relay host is not encrypted: set relay.tls to starttls or tls"
    )]
    AuthWithoutTls,
    /// The relay host refused the configured credentials.
    #[error("451 4.7.0 {remote} refused AUTH for {user}: {cause}")]
    AuthRefused {
        remote: String,
        user: String,
        cause: String,
    },
    /// The next hop answered a recipient, or the whole transaction, with an error reply.
    /// `text` is the reply as recorded, with where it came from.
    #[error("{text}")]
    Refused { code: u16, text: String },
    /// The session broke during the transaction (I/O error, timeout, protocol error).
    #[error("451 4.4.2 {remote} lost the session: {cause}")]
    SessionLost { remote: String, cause: String },
    /// The queued message could not be read for the transaction (a large one is
    /// streamed, not held in memory): a local problem, tried again later.
    #[error("451 4.3.0 cannot read the queued message: {0}")]
    Spool(String),
    /// The domain's MX (the route nobody configured) points at this gateway: loopback,
    /// an unspecified address, or one of its own addresses. Postfix's wording.
    #[error("554 5.4.6 mail for {domain} loops back to myself")]
    LoopsBack { domain: String },
    /// Still not delivered when `queue.lifetime` ran out.
    #[error(
        "550 5.4.7 message expired after {} in the queue; last error: {last_error}",
        mb_core::value::format_duration(*.after)
    )]
    Expired { after: Duration, last_error: String },
}

/// Why a recipient has no next hop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// One of the gateway's own domains, with neither a relay host nor a transport
    /// entry: its MX is this gateway, so delivering there would loop.
    #[error(
        "451 4.3.5 no route for {domain}: it is one of smtp.domains, so set relay.host (or a relay.transport entry) to the internal mail server; its MX is this gateway"
    )]
    ServedDomain { domain: String },
}

/// Why the TLS client configuration cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsConfigError {
    /// `network.tls.versions` is not usable with the crypto provider.
    #[error("451 4.7.5 TLS configuration: {0}")]
    Versions(String),
    #[error("451 4.7.5 cannot read relay.tls.ca_file {ca}: {cause}")]
    CaFile { ca: String, cause: String },
    #[error("451 4.7.5 no certificate authority in relay.tls.ca_file {ca}")]
    NoAuthority { ca: String },
}

/// Which name a failed DNS lookup was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The recipient domain's MX records: a final answer (NXDOMAIN, null MX) is final.
    Mx,
    /// The addresses of a configured host (relay host, transport entry) or of the MX
    /// hosts. A misconfigured relay host or transport must not bounce mail, and a
    /// domain's MX hosts may come back: the recipients wait.
    Addresses,
}

/// The steps of opening a session that have their own time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    TlsHandshake,
    Greeting,
}

/// What the connection loop does after an address failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Try the next address or MX host.
    NextAddress,
    /// Opportunistic TLS failed: the same address again without TLS.
    SameAddressWithoutTls,
    /// A configuration problem: no other address would do better.
    GiveUp,
}

impl DeliveryError {
    /// Whether the recipient bounces now; otherwise it waits for the next attempt.
    pub fn is_permanent(&self) -> bool {
        match self {
            DeliveryError::Dns { lookup, failure } => {
                *lookup == Lookup::Mx && matches!(failure, DnsFailure::Permanent(_))
            }
            DeliveryError::Refused { code, .. } => !(400..500).contains(code),
            DeliveryError::Expired { .. } | DeliveryError::LoopsBack { .. } => true,
            DeliveryError::Route(_)
            | DeliveryError::NoAddress
            | DeliveryError::Connect { .. }
            | DeliveryError::Timeout { .. }
            | DeliveryError::Greeting { .. }
            | DeliveryError::Ehlo { .. }
            | DeliveryError::TlsHandshake { .. }
            | DeliveryError::StartTls { .. }
            | DeliveryError::TlsNotOffered { .. }
            | DeliveryError::TlsConfig(_)
            | DeliveryError::AuthWithoutTls
            | DeliveryError::AuthRefused { .. }
            | DeliveryError::SessionLost { .. }
            | DeliveryError::Spool(_) => false,
        }
    }

    /// The recipient state this error leaves a recipient in.
    pub fn state(&self) -> RecipientState {
        if self.is_permanent() {
            RecipientState::Bounced
        } else {
            RecipientState::Deferred
        }
    }

    /// After this error while opening a session with one address, what to try next.
    pub fn next_step(&self) -> NextStep {
        match self {
            DeliveryError::TlsConfig(_)
            | DeliveryError::AuthWithoutTls
            | DeliveryError::AuthRefused { .. }
            | DeliveryError::LoopsBack { .. } => NextStep::GiveUp,
            DeliveryError::StartTls {
                opportunistic: true,
                ..
            } => NextStep::SameAddressWithoutTls,
            _ => NextStep::NextAddress,
        }
    }

    /// The whole transaction failed: refused at MAIL FROM (the session stays usable),
    /// or the session broke.
    pub fn transaction(e: ClientError, remote: &str) -> DeliveryError {
        match e {
            ClientError::Refused(r) => DeliveryError::Refused {
                code: r.code,
                text: format!("{} (in reply to MAIL FROM)", r.text()),
            },
            e => DeliveryError::SessionLost {
                remote: remote.to_string(),
                cause: e.to_string(),
            },
        }
    }
}

/// A recipient the next hop took: its reply (with the TLS note) and whether the DSN
/// parameters went along, so the next hop reports success itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub reply: String,
    pub dsn_passed: bool,
}

/// What one attempt did for one recipient. `remote` is the host that answered last, as
/// `name[ip]:port`, or empty when none was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted {
    pub remote: String,
    pub result: Result<Accepted, DeliveryError>,
}

impl Attempted {
    /// Every recipient of a transaction failed the same way.
    pub fn failed(remote: &str, error: DeliveryError) -> Attempted {
        Attempted {
            remote: remote.to_string(),
            result: Err(error),
        }
    }

    /// A recipient's own final reply: positive, or an error reply.
    pub fn reply(response: &Response, tls_note: &str, remote: &str, dsn_passed: bool) -> Self {
        let text = format!("{}{tls_note}", response.text());
        let result = if response.is_positive() {
            Ok(Accepted {
                reply: text,
                dsn_passed,
            })
        } else {
            Err(DeliveryError::Refused {
                code: response.code,
                text,
            })
        };
        Attempted {
            remote: remote.to_string(),
            result,
        }
    }

    /// The state the recipient is left in.
    pub fn state(&self) -> RecipientState {
        match &self.result {
            Ok(_) => RecipientState::Delivered,
            Err(e) => e.state(),
        }
    }

    /// The reply or the error, for logs and the history.
    pub fn text(&self) -> String {
        match &self.result {
            Ok(a) => a.reply.clone(),
            Err(e) => e.to_string(),
        }
    }

    /// The recipient's "last error": empty once delivered.
    pub fn last_error(&self) -> String {
        match &self.result {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    /// Whether the next hop took the DSN parameters for a delivered recipient.
    pub fn dsn_passed(&self) -> bool {
        self.result.as_ref().is_ok_and(|a| a.dsn_passed)
    }
}

fn dns_text(lookup: Lookup, failure: &DnsFailure) -> String {
    let (DnsFailure::Permanent(t) | DnsFailure::Transient(t)) = failure;
    match lookup {
        Lookup::Mx => t.clone(),
        // Waiting, so the reply says so: a 550 5.x.x answer is reported as 451 4.x.x.
        Lookup::Addresses => t.replacen("550 5.", "451 4.", 1),
    }
}

fn timeout_text(remote: &str, step: Step) -> String {
    match step {
        Step::Connect => format!("451 4.4.1 connect to {remote}: timed out"),
        Step::TlsHandshake => format!("451 4.7.5 TLS handshake with {remote} timed out"),
        Step::Greeting => format!("451 4.4.2 {remote} did not greet in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RecipientState::{Bounced, Deferred};

    fn check(error: DeliveryError, state: RecipientState, text: &str, next: NextStep) {
        assert_eq!(error.state(), state, "{error:?}");
        assert_eq!(error.to_string(), text);
        assert_eq!(error.next_step(), next, "{error:?}");
    }

    fn remote() -> String {
        "mx.example[192.0.2.1]:25".into()
    }

    #[test]
    fn each_failure_becomes_a_recipient_state_with_its_text() {
        use NextStep::{GiveUp, NextAddress, SameAddressWithoutTls};
        let perm = |t: &str| DnsFailure::Permanent(t.into());
        let temp = |t: &str| DnsFailure::Transient(t.into());
        let table = [
            (
                RouteError::ServedDomain {
                    domain: "served.example".into(),
                }
                .into(),
                Deferred,
                "451 4.3.5 no route for served.example: it is one of smtp.domains, so set relay.host (or a relay.transport entry) to the internal mail server; its MX is this gateway",
                NextAddress,
            ),
            (
                DeliveryError::Dns {
                    lookup: Lookup::Mx,
                    failure: perm("550 5.1.2 domain x.example does not exist (DNS NXDOMAIN)"),
                },
                Bounced,
                "550 5.1.2 domain x.example does not exist (DNS NXDOMAIN)",
                NextAddress,
            ),
            (
                DeliveryError::Dns {
                    lookup: Lookup::Mx,
                    failure: temp("451 4.4.3 DNS MX lookup of x.example failed: timeout"),
                },
                Deferred,
                "451 4.4.3 DNS MX lookup of x.example failed: timeout",
                NextAddress,
            ),
            (
                DeliveryError::Dns {
                    lookup: Lookup::Addresses,
                    failure: perm("550 5.1.2 host relay.example not found"),
                },
                Deferred,
                "451 4.1.2 host relay.example not found",
                NextAddress,
            ),
            (
                DeliveryError::NoAddress,
                Deferred,
                "451 4.4.1 no address to connect to",
                NextAddress,
            ),
            (
                DeliveryError::Connect {
                    remote: remote(),
                    cause: "Connection refused (os error 111)".into(),
                },
                Deferred,
                "451 4.4.1 connect to mx.example[192.0.2.1]:25: Connection refused (os error 111)",
                NextAddress,
            ),
            (
                DeliveryError::Timeout {
                    remote: remote(),
                    step: Step::Connect,
                },
                Deferred,
                "451 4.4.1 connect to mx.example[192.0.2.1]:25: timed out",
                NextAddress,
            ),
            (
                DeliveryError::Timeout {
                    remote: remote(),
                    step: Step::TlsHandshake,
                },
                Deferred,
                "451 4.7.5 TLS handshake with mx.example[192.0.2.1]:25 timed out",
                NextAddress,
            ),
            (
                DeliveryError::Timeout {
                    remote: remote(),
                    step: Step::Greeting,
                },
                Deferred,
                "451 4.4.2 mx.example[192.0.2.1]:25 did not greet in time",
                NextAddress,
            ),
            (
                DeliveryError::StartTls {
                    remote: remote(),
                    cause: "bad certificate".into(),
                    opportunistic: true,
                },
                Deferred,
                "451 4.7.5 STARTTLS with mx.example[192.0.2.1]:25 failed: bad certificate",
                SameAddressWithoutTls,
            ),
            (
                DeliveryError::StartTls {
                    remote: remote(),
                    cause: "bad certificate".into(),
                    opportunistic: false,
                },
                Deferred,
                "451 4.7.5 STARTTLS with mx.example[192.0.2.1]:25 failed: bad certificate",
                NextAddress,
            ),
            (
                DeliveryError::TlsNotOffered {
                    remote: remote(),
                    setting: "network.smtp.tls.outbound = mandatory",
                },
                Deferred,
                "451 4.7.4 TLS is required (network.smtp.tls.outbound = mandatory) but mx.example[192.0.2.1]:25 does not offer STARTTLS",
                NextAddress,
            ),
            (
                TlsConfigError::NoAuthority {
                    ca: "/etc/ca.pem".into(),
                }
                .into(),
                Deferred,
                "451 4.7.5 no certificate authority in relay.tls.ca_file /etc/ca.pem",
                GiveUp,
            ),
            (
                DeliveryError::AuthWithoutTls,
                Deferred,
                "451 4.7.0 relay.auth.username is set but the session with the relay host is not encrypted: set relay.tls to starttls or tls",
                GiveUp,
            ),
            (
                DeliveryError::Refused {
                    code: 452,
                    text: "452 4.2.2 mailbox full".into(),
                },
                Deferred,
                "452 4.2.2 mailbox full",
                NextAddress,
            ),
            (
                DeliveryError::Refused {
                    code: 550,
                    text: "550 5.1.1 no such user".into(),
                },
                Bounced,
                "550 5.1.1 no such user",
                NextAddress,
            ),
            (
                DeliveryError::SessionLost {
                    remote: remote(),
                    cause: "the server did not answer in time".into(),
                },
                Deferred,
                "451 4.4.2 mx.example[192.0.2.1]:25 lost the session: the server did not answer in time",
                NextAddress,
            ),
            (
                DeliveryError::Expired {
                    after: Duration::from_secs(5 * 86400),
                    last_error: "451 4.2.0 try later".into(),
                },
                Bounced,
                "550 5.4.7 message expired after 5d in the queue; last error: 451 4.2.0 try later",
                NextAddress,
            ),
        ];
        for (error, state, text, next) in table {
            check(error, state, text, next);
        }
    }

    #[test]
    fn replies_settle_recipients_by_their_class() {
        let reply = |code, line: &str| Response {
            code,
            lines: vec![line.into()],
        };
        let ok = Attempted::reply(&reply(250, "2.1.5 ok"), " (TLS x)", &remote(), true);
        assert_eq!(ok.state(), RecipientState::Delivered);
        assert_eq!(ok.text(), "250 2.1.5 ok (TLS x)");
        assert_eq!(ok.last_error(), "");
        assert!(ok.dsn_passed());
        let later = Attempted::reply(&reply(451, "4.2.0 later"), "", &remote(), true);
        assert_eq!(
            (later.state(), later.last_error().as_str()),
            (Deferred, "451 4.2.0 later")
        );
        assert!(
            !later.dsn_passed(),
            "only a delivered recipient passed DSN on"
        );
        let no = Attempted::reply(&reply(550, "5.1.1 no"), "", &remote(), false);
        assert_eq!(
            (no.state(), no.remote.as_str()),
            (Bounced, "mx.example[192.0.2.1]:25")
        );

        // The whole transaction: a refused MAIL FROM by its class, a broken session waits.
        let mail = DeliveryError::transaction(
            ClientError::Refused(reply(554, "5.7.1 sender refused")),
            &remote(),
        );
        assert_eq!(
            mail.to_string(),
            "554 5.7.1 sender refused (in reply to MAIL FROM)"
        );
        assert_eq!(mail.state(), Bounced);
        let lost = DeliveryError::transaction(ClientError::Timeout, &remote());
        assert_eq!(lost.state(), Deferred);
        assert!(
            lost.to_string()
                .starts_with("451 4.4.2 mx.example[192.0.2.1]:25 lost the session")
        );
    }
}
