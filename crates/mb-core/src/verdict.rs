//! The filter's decision about one message as every daemon sees it: `Verdict` with its
//! `Action`, the enhanced status code it may carry, and the one rule that says whether a
//! message is inbound or outbound. gRPC's `ScanVerdict` is converted to and from this at
//! the edge (`mb_scan::wire`); nothing else reads the wire form.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An RFC 3463 enhanced status code, `class.subject.detail` (e.g. `5.7.1`). Class is
/// 2, 4 or 5; subject and detail have one to three digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedStatus {
    class: u8,
    subject: u16,
    detail: u16,
}

/// Why a text is not an enhanced status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an enhanced status code (class.subject.detail, e.g. 5.7.1)")]
pub struct BadStatus(pub String);

impl EnhancedStatus {
    /// A code known to be valid; checked at compile time where used in a `const`.
    pub const fn new(class: u8, subject: u16, detail: u16) -> EnhancedStatus {
        assert!(
            class == 2 || class == 4 || class == 5,
            "class must be 2, 4 or 5"
        );
        assert!(
            subject < 1000 && detail < 1000,
            "subject and detail have 1-3 digits"
        );
        EnhancedStatus {
            class,
            subject,
            detail,
        }
    }

    pub const OK: EnhancedStatus = EnhancedStatus::new(2, 0, 0);
    /// Delivery not authorized, message refused: the default of a reject.
    pub const POLICY_REJECT: EnhancedStatus = EnhancedStatus::new(5, 7, 1);
    /// The same, for now: the default of a tempfail.
    pub const POLICY_TEMPFAIL: EnhancedStatus = EnhancedStatus::new(4, 7, 1);
    /// Originator address valid (MAIL accepted).
    pub const SENDER_OK: EnhancedStatus = EnhancedStatus::new(2, 1, 0);
    /// Destination address valid (RCPT accepted).
    pub const RECIPIENT_OK: EnhancedStatus = EnhancedStatus::new(2, 1, 5);
    /// Bad destination or sender mailbox address syntax.
    pub const BAD_ADDRESS: EnhancedStatus = EnhancedStatus::new(5, 1, 3);
    /// Other or undefined mail system status, transient: our own trouble.
    pub const SYSTEM_TEMPORARY: EnhancedStatus = EnhancedStatus::new(4, 3, 0);
    /// Message length exceeds administrative limit.
    pub const TOO_BIG: EnhancedStatus = EnhancedStatus::new(5, 3, 4);
    /// Invalid command (out of sequence).
    pub const BAD_SEQUENCE: EnhancedStatus = EnhancedStatus::new(5, 5, 1);
    /// Syntax error.
    pub const SYNTAX_ERROR: EnhancedStatus = EnhancedStatus::new(5, 5, 2);
    /// Invalid command arguments.
    pub const BAD_ARGUMENTS: EnhancedStatus = EnhancedStatus::new(5, 5, 4);
    /// Media not supported (content that cannot be handled).
    pub const BAD_CONTENT: EnhancedStatus = EnhancedStatus::new(5, 6, 0);

    /// The reply class: 2 (success), 4 (transient) or 5 (permanent).
    pub fn class(self) -> u8 {
        self.class
    }

    /// Whether this code may go with a basic reply code (the classes must agree).
    pub fn fits(self, code: u16) -> bool {
        u16::from(self.class) == code / 100
    }
}

impl FromStr for EnhancedStatus {
    type Err = BadStatus;

    fn from_str(s: &str) -> Result<EnhancedStatus, BadStatus> {
        let bad = || BadStatus(s.to_string());
        let mut parts = s.split('.');
        let mut number = |max_len: usize| -> Result<u16, BadStatus> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let class = number(1)?;
        let subject = number(3)?;
        let detail = number(3)?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return Err(bad());
        }
        Ok(EnhancedStatus {
            class: u8::try_from(class).map_err(|_| bad())?,
            subject,
            detail,
        })
    }
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl Serialize for EnhancedStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EnhancedStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<EnhancedStatus, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What happens to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Delivered as it is (with the verdict's header changes).
    #[default]
    Accept,
    /// Delivered, marked as spam in its headers.
    Tag,
    /// Kept in the quarantine (already on disk when the verdict is given); the sender
    /// is told it was accepted.
    Quarantine,
    /// Refused with a 5xx before the gateway takes responsibility.
    Reject,
    /// Refused with a 4xx: the sender tries again later.
    Tempfail,
    /// Accepted and dropped.
    Discard,
}

/// Why a text is not an action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown verdict action {0:?} (accept, tag, quarantine, reject, tempfail or discard)")]
pub struct BadAction(pub String);

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Accept,
        Action::Tag,
        Action::Quarantine,
        Action::Reject,
        Action::Tempfail,
        Action::Discard,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Tag => "tag",
            Action::Quarantine => "quarantine",
            Action::Reject => "reject",
            Action::Tempfail => "tempfail",
            Action::Discard => "discard",
        }
    }

    /// Whether the message goes on to its recipients.
    pub fn delivers(self) -> bool {
        matches!(self, Action::Accept | Action::Tag)
    }
}

impl FromStr for Action {
    type Err = BadAction;

    fn from_str(s: &str) -> Result<Action, BadAction> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| BadAction(s.to_string()))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One scoring rule that fired.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Symbol {
    pub name: String,
    pub score: f64,
    #[serde(default)]
    pub detail: String,
}

/// The reply a verdict asks for, when it chose one; otherwise the action's default
/// applies (reject 550 5.7.1, tempfail 451 4.7.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Refusal {
    pub code: Option<u16>,
    pub status: Option<EnhancedStatus>,
    pub text: String,
}

/// The filter's decision about one message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Verdict {
    pub action: Action,
    /// For reject and tempfail: the reply the filter chose (a virus keeps 554 5.7.1).
    pub refusal: Refusal,
    /// Header fields to add at the top of the message (name, value), in order.
    pub add_headers: Vec<(String, String)>,
    /// Names of fields to remove (every occurrence) before adding ours.
    pub remove_headers: Vec<String>,
    pub score: f64,
    pub symbols: Vec<Symbol>,
    /// Set when the action is quarantine.
    pub quarantine_id: String,
}

impl Verdict {
    pub fn accept() -> Verdict {
        Verdict::default()
    }

    /// A refusal (reject or tempfail) with its own reply.
    pub fn refuse(action: Action, code: u16, status: EnhancedStatus, text: &str) -> Verdict {
        Verdict {
            action,
            refusal: Refusal {
                code: Some(code),
                status: Some(status),
                text: text.to_string(),
            },
            ..Verdict::default()
        }
    }
}

/// What the filter is told about a message besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanRequest {
    /// The caller's queue id (empty when it has none yet).
    pub queue_id: String,
    /// The client that sent it to us; `None` when unknown (content filter without
    /// XFORWARD), and the checks that need it are skipped.
    pub client_ip: Option<IpAddr>,
    pub client_name: String,
    pub helo: String,
    /// Empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    /// The SMTP AUTH account, empty when none.
    pub auth_user: String,
    /// The negotiated TLS, empty for plaintext.
    pub tls: String,
    pub direction: Direction,
}

impl ScanRequest {
    /// What the filter is told about a message mb-smtpd is about to spool: its envelope
    /// (the same `Envelope` the spool keeps), the client as an address, and the
    /// direction.
    pub fn from_envelope(
        env: &crate::Envelope,
        client_ip: Option<IpAddr>,
        direction: Direction,
    ) -> ScanRequest {
        ScanRequest {
            queue_id: env.id.clone(),
            client_ip,
            client_name: env.client_name.clone(),
            helo: env.helo.clone(),
            sender: env.sender.clone(),
            recipients: env.recipients.iter().map(|r| r.address.clone()).collect(),
            auth_user: env.auth_user.clone(),
            tls: env.tls.clone(),
            direction,
        }
    }
}

/// Whether a message leaves the organisation or comes into it. Written once, used by
/// every mode (mb-smtpd, the content filter, the milter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Inbound,
    Outbound,
}

impl Direction {
    /// Outbound when the client authenticated (SMTP AUTH) or connects from
    /// `smtp.mynetworks`; inbound otherwise, and when the client is unknown.
    pub fn of(
        authenticated: bool,
        client: Option<IpAddr>,
        mynetworks: &[ipnet::IpNet],
    ) -> Direction {
        if authenticated || client.is_some_and(|ip| mynetworks.iter().any(|n| n.contains(&ip))) {
            Direction::Outbound
        } else {
            Direction::Inbound
        }
    }

    /// The wire form: anything but "outbound" is inbound, so the stricter checks apply
    /// when in doubt.
    pub fn from_wire(s: &str) -> Direction {
        if s == "outbound" {
            Direction::Outbound
        } else {
            Direction::Inbound
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_status_codes_parse_strictly() {
        for ok in ["2.0.0", "5.7.1", "4.7.1", "5.1.10", "4.999.999"] {
            assert_eq!(ok.parse::<EnhancedStatus>().unwrap().to_string(), ok);
        }
        for bad in [
            "", "5.7", "5.7.1.1", "3.0.0", "55.7.1", "5.7.1000", "5..1", "5.7.a", "5.7.1 ",
            "+5.7.1", "5.7.-1", "\r5.7.1",
        ] {
            assert!(bad.parse::<EnhancedStatus>().is_err(), "{bad:?}");
        }
        let s: EnhancedStatus = "5.7.1".parse().unwrap();
        assert!(s.fits(550) && s.fits(554) && !s.fits(451) && !s.fits(250));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"5.7.1\"");
        assert!(serde_json::from_str::<EnhancedStatus>("\"6.0.0\"").is_err());
    }

    #[test]
    fn actions_round_trip_and_unknown_ones_are_errors() {
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>().unwrap(), a);
        }
        assert!("Reject".parse::<Action>().is_err());
        assert!("".parse::<Action>().is_err());
        assert!(Action::Tag.delivers() && !Action::Quarantine.delivers());
    }

    #[test]
    fn direction_from_auth_and_client_network() {
        let nets: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            Direction::of(false, Some(inside), &nets),
            Direction::Outbound
        );
        assert_eq!(
            Direction::of(true, Some(outside), &nets),
            Direction::Outbound
        );
        assert_eq!(
            Direction::of(false, Some(outside), &nets),
            Direction::Inbound
        );
        assert_eq!(Direction::of(false, None, &nets), Direction::Inbound);
        assert_eq!(Direction::of(true, None, &[]), Direction::Outbound);
    }

    #[test]
    fn a_scan_request_carries_the_spooled_envelope() {
        let env = crate::Envelope {
            id: "0001".into(),
            helo: "mx.sender.example".into(),
            sender: "a@sender.example".into(),
            recipients: vec![
                crate::Recipient::plain("b@served.example"),
                crate::Recipient {
                    address: "c@served.example".into(),
                    notify: "NEVER".into(),
                    orcpt: String::new(),
                },
            ],
            auth_user: "a".into(),
            tls: "TLSv1.3".into(),
            ..crate::Envelope::default()
        };
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let r = ScanRequest::from_envelope(&env, Some(ip), Direction::Outbound);
        assert_eq!(r.queue_id, "0001");
        assert_eq!(r.recipients, ["b@served.example", "c@served.example"]);
        assert_eq!((r.client_ip, r.direction), (Some(ip), Direction::Outbound));
        assert_eq!(
            (r.helo.as_str(), r.auth_user.as_str()),
            ("mx.sender.example", "a")
        );
    }
}
