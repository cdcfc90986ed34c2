//! Policies: who is allowed, blocked or scored differently, as the product models them.
//!
//! A policy names an object (an address with `*`/`?` wildcards, a domain, a CIDR network
//! of client addresses, or the default), a direction (the sender, the recipients, or
//! either), a priority and an action. For a message, the matching policy with the lowest
//! priority wins; on a tie the more specific object wins (address > network > domain >
//! default), then the older policy.
//!
//! Two rules keep an allow from being abused. A sender-based allow (an address or domain
//! matched as the sender) applies only when the sender is authenticated, since the
//! envelope sender is whatever the client says, unless the policy is explicitly
//! `unauthenticated`. And a message with several recipients gets the strictest of their
//! policies' outcomes (block > score > allow; no policy scores with the global
//! thresholds), so an allow for one recipient never exempts the others.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Why a policy (or one of its words) was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("object {0:?} is not one of address, network, domain, default")]
    Object(String),
    #[error("direction {0:?} is not one of from, to, from-or-to")]
    Direction(String),
    #[error("action {0:?} is not one of allow, block, score")]
    Action(String),
    /// Empty, or longer than 100 bytes.
    #[error("a policy needs a name of at most 100 characters")]
    Name { name: String },
    /// Longer than 320 bytes, or with white space or control characters.
    #[error("pattern {pattern:?} is too long or has spaces")]
    Pattern { pattern: String },
    #[error("address pattern {pattern:?} has no @ (for example *@example.org or ceo@example.org)")]
    AddressPattern { pattern: String },
    #[error(
        "domain pattern {pattern:?} is not a domain (for example example.org or *.example.org)"
    )]
    DomainPattern { pattern: String },
    #[error("network {pattern:?} is not an address or CIDR network (for example 192.0.2.0/24)")]
    NetworkPattern { pattern: String },
    /// A network policy whose direction is not `from`.
    #[error("a network policy matches the client address: its direction is from")]
    NetworkDirection { direction: Direction },
    #[error("the default object takes no pattern")]
    DefaultPattern { pattern: String },
    #[error("{which} threshold {value} is out of range")]
    Threshold { which: &'static str, value: f64 },
    /// Thresholds on a policy whose action is not `score`.
    #[error("thresholds belong to a policy whose action is score")]
    ThresholdsWithoutScore { action: Action },
    /// `unauthenticated` on anything but an allow on the sender, where it means nothing.
    #[error(
        "unauthenticated belongs to an allow policy on a sender address or domain (--from or --from-or-to)"
    )]
    UnauthenticatedWithoutSenderAllow,
    /// A recipient scope that is not one address.
    #[error(
        "recipient {recipient:?} is not one address (a policy can be scoped to one recipient, such as jane@example.org)"
    )]
    RecipientScope { recipient: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Object {
    Address,
    Network,
    Domain,
    Default,
}

impl Object {
    pub fn parse(s: &str) -> Result<Object, PolicyError> {
        match s {
            "address" => Ok(Object::Address),
            "network" => Ok(Object::Network),
            "domain" => Ok(Object::Domain),
            "default" => Ok(Object::Default),
            _ => Err(PolicyError::Object(s.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Object::Address => "address",
            Object::Network => "network",
            Object::Domain => "domain",
            Object::Default => "default",
        }
    }

    /// Higher is more specific (wins a priority tie).
    fn specificity(self) -> u8 {
        match self {
            Object::Address => 3,
            Object::Network => 2,
            Object::Domain => 1,
            Object::Default => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    From,
    To,
    FromOrTo,
}

impl Direction {
    pub fn parse(s: &str) -> Result<Direction, PolicyError> {
        match s.to_ascii_lowercase().as_str() {
            "from" => Ok(Direction::From),
            "to" => Ok(Direction::To),
            "from-or-to" => Ok(Direction::FromOrTo),
            _ => Err(PolicyError::Direction(s.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::From => "from",
            Direction::To => "to",
            Direction::FromOrTo => "from-or-to",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Skip spam scoring (viruses, attachment rules and DMARC reject still apply).
    Allow,
    /// Refuse the message.
    Block,
    /// Score with this policy's thresholds.
    Score,
}

impl Action {
    pub fn parse(s: &str) -> Result<Action, PolicyError> {
        match s {
            "allow" => Ok(Action::Allow),
            "block" => Ok(Action::Block),
            "score" => Ok(Action::Score),
            _ => Err(PolicyError::Action(s.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
            Action::Score => "score",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub id: i64,
    pub name: String,
    pub priority: i32,
    pub object: Object,
    /// `*@example.org`, `example.org`, `*.example.org`, `192.0.2.0/24`; empty for default.
    pub pattern: String,
    pub direction: Direction,
    pub action: Action,
    pub tag: Option<f64>,
    pub quarantine: Option<f64>,
    pub reject: Option<f64>,
    /// A sender-based allow applies even when the sender is not authenticated (the
    /// behaviour before 0008; an explicit choice). Absent in a cache written before it:
    /// false, authenticated-only.
    #[serde(default)]
    pub unauthenticated: bool,
    /// Only for this recipient (lowercase address; empty: every recipient): a user's own
    /// sender allow or block. It matches only when every recipient it is judged for is
    /// this one, so it never decides for another recipient of the same message.
    #[serde(default)]
    pub recipient: String,
}

/// What a message is matched on.
pub struct Subject<'a> {
    /// Empty for the null sender.
    pub sender: &'a str,
    pub recipients: &'a [String],
    pub client_ip: Option<IpAddr>,
    /// `smtp.recipient_delimiter`: an address pattern that does not match `user+tag@`
    /// is tried again on `user@` (empty: no extensions).
    pub delimiter: &'a str,
}

/// `*` any run of characters, `?` one character; ASCII case-insensitive.
pub(crate) fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p].eq_ignore_ascii_case(&text[t])) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// `example.org` is that domain; `*.example.org` its subdomains (not itself).
fn domain_matches(pattern: &str, domain: &str) -> bool {
    if domain.is_empty() {
        return false;
    }
    match pattern.strip_prefix("*.") {
        Some(parent) => domain
            .to_ascii_lowercase()
            .strip_suffix(&parent.to_ascii_lowercase())
            .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
        None => pattern.eq_ignore_ascii_case(domain),
    }
}

impl Policy {
    /// Refuses a pattern that cannot match what its object says.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let p = &self.pattern;
        let pattern = || p.clone();
        if self.name.is_empty() || self.name.len() > 100 {
            return Err(PolicyError::Name {
                name: self.name.clone(),
            });
        }
        if p.len() > 320 || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PolicyError::Pattern { pattern: pattern() });
        }
        let r = &self.recipient;
        if !r.is_empty()
            && (r.len() > 320
                || r.matches('@').count() != 1
                || r.starts_with('@')
                || r.ends_with('@')
                || r.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '?'))
        {
            return Err(PolicyError::RecipientScope {
                recipient: r.clone(),
            });
        }
        match self.object {
            Object::Address if !p.contains('@') => {
                Err(PolicyError::AddressPattern { pattern: pattern() })
            }
            Object::Domain if p.is_empty() || p.contains('@') || p.contains('/') => {
                Err(PolicyError::DomainPattern { pattern: pattern() })
            }
            Object::Network if p.parse::<IpNet>().is_err() && p.parse::<IpAddr>().is_err() => {
                Err(PolicyError::NetworkPattern { pattern: pattern() })
            }
            Object::Network if self.direction != Direction::From => {
                Err(PolicyError::NetworkDirection {
                    direction: self.direction,
                })
            }
            Object::Default if !p.is_empty() => {
                Err(PolicyError::DefaultPattern { pattern: pattern() })
            }
            _ => Ok(()),
        }?;
        for (which, v) in [
            ("tag", self.tag),
            ("quarantine", self.quarantine),
            ("reject", self.reject),
        ] {
            if let Some(value) = v
                && !(-1000.0..=1000.0).contains(&value)
            {
                return Err(PolicyError::Threshold { which, value });
            }
        }
        if self.action != Action::Score
            && (self.tag.is_some() || self.quarantine.is_some() || self.reject.is_some())
        {
            return Err(PolicyError::ThresholdsWithoutScore {
                action: self.action,
            });
        }
        if self.unauthenticated
            && !(self.action == Action::Allow
                && matches!(self.object, Object::Address | Object::Domain)
                && self.direction != Direction::To)
        {
            return Err(PolicyError::UnauthenticatedWithoutSenderAllow);
        }
        Ok(())
    }

    fn matches_address(&self, address: &str, delimiter: &str) -> bool {
        match self.object {
            Object::Address => {
                glob(self.pattern.as_bytes(), address.as_bytes())
                    || crate::recipients::strip_address_extension(address, delimiter)
                        .is_some_and(|base| glob(self.pattern.as_bytes(), base.as_bytes()))
            }
            Object::Domain => domain_matches(&self.pattern, domain_of(address)),
            _ => false,
        }
    }

    /// What matched, without allocating (the filter asks this for every policy of
    /// every message).
    fn hit<'s>(&self, s: &Subject<'s>) -> Option<Hit<'s>> {
        if !self.recipient.is_empty()
            && (s.recipients.is_empty()
                || !s
                    .recipients
                    .iter()
                    .all(|r| r.trim().eq_ignore_ascii_case(&self.recipient)))
        {
            return None;
        }
        match self.object {
            Object::Default => return Some(Hit::Default),
            Object::Network => {
                let ip = s.client_ip?;
                let hit = match self.pattern.parse::<IpNet>() {
                    Ok(net) => net.contains(&ip),
                    Err(_) => self.pattern.parse::<IpAddr>().is_ok_and(|a| a == ip),
                };
                return hit.then_some(Hit::Client(ip));
            }
            _ => {}
        }
        if matches!(self.direction, Direction::From | Direction::FromOrTo)
            && self.matches_address(s.sender, s.delimiter)
        {
            return Some(Hit::Sender(s.sender));
        }
        if matches!(self.direction, Direction::To | Direction::FromOrTo)
            && let Some(r) = s
                .recipients
                .iter()
                .find(|r| self.matches_address(r, s.delimiter))
        {
            return Some(Hit::Recipient(r));
        }
        None
    }

    /// Why this policy matches the message, or `None`.
    pub fn matches(&self, s: &Subject<'_>) -> Option<String> {
        Some(match self.hit(s)? {
            Hit::Default => "the default policy matches every message".into(),
            Hit::Client(ip) => format!("client {ip} is in {}", self.pattern),
            Hit::Sender(a) => format!("sender {a} matches {}", self.pattern),
            Hit::Recipient(a) => format!("recipient {a} matches {}", self.pattern),
        })
    }
}

impl Policy {
    /// Whether this policy is an allow that matches `s` only through its sender (an
    /// address anyone can write into MAIL FROM) and so applies only when the sender is
    /// authenticated. A match on a recipient or the client network needs nothing more.
    pub fn needs_authentication(&self, s: &Subject<'_>) -> bool {
        self.action == Action::Allow
            && !self.unauthenticated
            && matches!(self.hit(s), Some(Hit::Sender(_)))
            && !(self.direction == Direction::FromOrTo
                && s.recipients
                    .iter()
                    .any(|r| self.matches_address(r, s.delimiter)))
    }
}

/// What a policy matched on.
enum Hit<'s> {
    Default,
    Client(IpAddr),
    Sender(&'s str),
    Recipient(&'s str),
}

fn rank(p: &Policy) -> (i32, std::cmp::Reverse<u8>, i64) {
    (p.priority, std::cmp::Reverse(p.object.specificity()), p.id)
}

/// The winning policy for the envelope taken as a whole, whatever the sender's
/// authentication (the milter's early block check). The filter applies `outcome`.
pub fn best<'a>(policies: &'a [Policy], s: &Subject<'_>) -> Option<&'a Policy> {
    policies
        .iter()
        .filter(|p| p.hit(s).is_some())
        .min_by_key(|p| rank(p))
}

/// The policy one recipient gets (or the whole message, when it has no recipients).
#[derive(Debug, Clone)]
pub struct RecipientPolicy<'a> {
    /// Empty for a message without recipients.
    pub recipient: String,
    /// `None`: no policy matched, the global thresholds apply.
    pub policy: Option<&'a Policy>,
    /// Sender-based allows that would have won but were ignored: the sender is not
    /// authenticated.
    pub ignored: Vec<&'a Policy>,
}

/// The policies of a message, recipient by recipient, and what they add up to.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    pub recipients: Vec<RecipientPolicy<'a>>,
}

impl<'a> Outcome<'a> {
    /// The blocking policy, when any recipient's policy blocks (block beats everything).
    pub fn blocked(&self) -> Option<&'a Policy> {
        self.recipients
            .iter()
            .filter_map(|r| r.policy)
            .find(|p| p.action == Action::Block)
    }

    /// The allow policy, only when every recipient's policy allows (and none blocks): an
    /// allow for one recipient never exempts the others.
    pub fn allowed(&self) -> Option<&'a Policy> {
        let mut first = None;
        for r in &self.recipients {
            match r.policy {
                Some(p) if p.action == Action::Allow => {
                    first.get_or_insert(p);
                }
                _ => return None,
            }
        }
        first
    }

    /// For a scored message, each scoring recipient's policy (`None` for the global
    /// thresholds); the message is judged by the lowest of their thresholds.
    pub fn scoring(&self) -> Vec<Option<&'a Policy>> {
        self.recipients
            .iter()
            .map(|r| r.policy)
            .filter(|p| p.is_none_or(|p| p.action == Action::Score))
            .collect()
    }

    /// Every sender-based allow ignored for an unauthenticated sender, once each.
    pub fn ignored(&self) -> Vec<&'a Policy> {
        let mut out: Vec<&Policy> = Vec::new();
        for p in self
            .recipients
            .iter()
            .flat_map(|r| r.ignored.iter().copied())
        {
            if !out.iter().any(|o| o.id == p.id) {
                out.push(p);
            }
        }
        out
    }
}

/// The policy of each recipient of a message; `authenticated` says whether the sender
/// is (SPF pass for its domain, or a DKIM pass aligned with it), and without it
/// sender-based allows are passed over unless they are `unauthenticated`.
pub fn outcome<'a>(policies: &'a [Policy], s: &Subject<'_>, authenticated: bool) -> Outcome<'a> {
    let one = |recipients: &[String], recipient: String| {
        let subject = Subject {
            sender: s.sender,
            recipients,
            client_ip: s.client_ip,
            delimiter: s.delimiter,
        };
        let mut matching: Vec<&Policy> = policies
            .iter()
            .filter(|p| p.hit(&subject).is_some())
            .collect();
        matching.sort_by_key(|p| rank(p));
        let mut ignored = Vec::new();
        let mut policy = None;
        for p in matching {
            if !authenticated && p.needs_authentication(&subject) {
                ignored.push(p);
            } else {
                policy = Some(p);
                break;
            }
        }
        RecipientPolicy {
            recipient,
            policy,
            ignored,
        }
    };
    let recipients = if s.recipients.is_empty() {
        vec![one(&[], String::new())]
    } else {
        s.recipients
            .iter()
            .map(|r| one(std::slice::from_ref(r), r.clone()))
            .collect()
    };
    Outcome { recipients }
}

/// The policy that decides a message whose sender is authenticated (the block, the
/// allow every recipient shares, else the first scoring recipient's policy) and, line by
/// line, how it was chosen: per recipient, what an unauthenticated sender gets instead,
/// and the strictest outcome across the recipients.
pub fn decide<'a>(policies: &'a [Policy], s: &Subject<'_>) -> (Option<&'a Policy>, Vec<String>) {
    let mut why = Vec::new();
    for p in policies {
        match p.matches(s) {
            Some(reason) => {
                why.push(format!(
                    "{} (priority {}, {} {}): matches: {reason}",
                    p.name,
                    p.priority,
                    p.object.as_str(),
                    p.action.as_str()
                ));
            }
            None => why.push(format!(
                "{} (priority {}, {} {} {}): no match",
                p.name,
                p.priority,
                p.object.as_str(),
                p.direction.as_str(),
                if p.pattern.is_empty() {
                    "*"
                } else {
                    &p.pattern
                }
            )),
        }
    }
    let trusted = outcome(policies, s, true);
    let untrusted = outcome(policies, s, false);
    let several = trusted.recipients.len() > 1;
    for (r, u) in trusted.recipients.iter().zip(&untrusted.recipients) {
        let prefix = if several {
            format!("for {}: ", r.recipient)
        } else {
            String::new()
        };
        let subject = Subject {
            sender: s.sender,
            recipients: if r.recipient.is_empty() {
                &[]
            } else {
                std::slice::from_ref(&r.recipient)
            },
            client_ip: s.client_ip,
            delimiter: s.delimiter,
        };
        match r.policy {
            Some(b) => why.push(format!(
                "{prefix}=> {} wins: lowest priority{}, action {}",
                b.name,
                if policies
                    .iter()
                    .filter(|p| p.id != b.id
                        && p.priority == b.priority
                        && p.hit(&subject).is_some())
                    .count()
                    > 0
                {
                    " (tie broken by specificity: address > network > domain > default)"
                } else {
                    ""
                },
                b.action.as_str()
            )),
            None => why.push(format!(
                "{prefix}=> no policy matches: the global thresholds apply"
            )),
        }
        if !u.ignored.is_empty() {
            let instead = match u.policy {
                Some(p) => format!("{} (action {}) applies instead", p.name, p.action.as_str()),
                None => "the message is scored with the global thresholds instead".into(),
            };
            for p in &u.ignored {
                why.push(format!(
                    "{prefix}   {} is a sender allow: it applies only when the sender is authenticated (SPF pass for {}, or a DKIM pass aligned with the From domain); otherwise it is ignored (POLICY_ALLOW_UNAUTHENTICATED) and {instead} (mb-policy add --unauthenticated keeps an allow for any sender)",
                    p.name,
                    domain_of(s.sender)
                ));
            }
        }
    }
    let best = trusted
        .blocked()
        .or_else(|| trusted.allowed())
        .or_else(|| trusted.scoring().into_iter().flatten().next());
    if several {
        why.push(format!(
            "=> the message gets the strictest outcome among its recipients (block > score > allow): {}",
            if let Some(b) = trusted.blocked() {
                format!("blocked by {}", b.name)
            } else if let Some(a) = trusted.allowed() {
                format!("allowed by {} for every recipient", a.name)
            } else {
                "scored, with the lowest thresholds among the scoring recipients' policies".into()
            }
        ));
    }
    (best, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        id: i64,
        priority: i32,
        object: Object,
        pattern: &str,
        direction: Direction,
        action: Action,
    ) -> Policy {
        Policy {
            id,
            name: format!("p{id}"),
            priority,
            object,
            pattern: pattern.into(),
            direction,
            action,
            tag: None,
            quarantine: None,
            reject: None,
            unauthenticated: false,
            recipient: String::new(),
        }
    }

    #[test]
    fn a_recipient_scoped_policy_decides_for_that_recipient_only() {
        let mut allow = policy(
            1,
            10,
            Object::Address,
            "*@partner.test",
            Direction::From,
            Action::Allow,
        );
        allow.recipient = "jane@a.test".into();
        let mut block = policy(
            2,
            10,
            Object::Address,
            "spam@bad.test",
            Direction::From,
            Action::Block,
        );
        block.recipient = "jane@a.test".into();
        let rcpts = ["jane@a.test".to_string(), "bob@a.test".to_string()];
        let s = |sender: &'static str| Subject {
            sender,
            recipients: &rcpts,
            client_ip: None,
            delimiter: "+",
        };
        let ps = [allow, block];
        let o = outcome(&ps, &s("x@partner.test"), true);
        assert_eq!(o.recipients[0].policy.map(|p| p.id), Some(1));
        assert_eq!(o.recipients[1].policy.map(|p| p.id), None);
        assert!(o.allowed().is_none(), "jane's allow must not exempt bob");
        let o = outcome(&ps, &s("spam@bad.test"), true);
        assert_eq!(o.recipients[0].policy.map(|p| p.id), Some(2));
        assert_eq!(o.recipients[1].policy.map(|p| p.id), None);
        // The whole-envelope check (the milter's early block) does not take it for both.
        assert!(best(&ps, &s("spam@bad.test")).is_none());
        let mut bad = ps[0].clone();
        for r in ["*@a.test", "jane", "a b@c.test"] {
            bad.recipient = r.into();
            assert!(bad.validate().is_err(), "{r}");
        }
    }

    #[test]
    fn address_patterns_match_without_the_extension_when_the_full_address_does_not() {
        let ceo = policy(
            1,
            10,
            Object::Address,
            "ceo@example.org",
            Direction::To,
            Action::Block,
        );
        let exact = policy(
            2,
            10,
            Object::Address,
            "ceo+press@example.org",
            Direction::To,
            Action::Allow,
        );
        let hit = |p: &Policy, rcpt: &str, delimiter: &str| {
            let rcpts = vec![rcpt.to_string()];
            p.matches(&Subject {
                sender: "",
                recipients: &rcpts,
                client_ip: None,
                delimiter,
            })
            .is_some()
        };
        assert!(hit(&ceo, "ceo@example.org", "+"));
        assert!(hit(&ceo, "CEO+news@example.org", "+"));
        assert!(hit(&ceo, "ceo-news@example.org", "+-"));
        // Without a delimiter (or another one), the extension is part of the address.
        assert!(!hit(&ceo, "ceo+news@example.org", ""));
        assert!(!hit(&ceo, "ceo+news@example.org", "-"));
        // The full address is tried first: an entry for it still matches it alone.
        assert!(hit(&exact, "ceo+press@example.org", "+"));
        assert!(!hit(&exact, "ceo+other@example.org", "+"));
        assert!(!hit(&exact, "ceo@example.org", "+"));
        // Senders too (Postfix strips extensions in its access lookups).
        let sender = policy(
            3,
            10,
            Object::Address,
            "news@partner.example",
            Direction::From,
            Action::Score,
        );
        let s = Subject {
            sender: "news+list42@partner.example",
            recipients: &[],
            client_ip: None,
            delimiter: "+",
        };
        assert!(sender.matches(&s).is_some());
    }

    #[test]
    fn wildcards_domains_and_networks_match() {
        assert!(glob(b"*@example.org", b"Alice@EXAMPLE.org"));
        assert!(glob(b"a?ice@*.org", b"alice@x.org"));
        assert!(!glob(b"*@example.org", b"alice@example.org.evil"));
        assert!(domain_matches("*.example.org", "mx.Example.org"));
        assert!(!domain_matches("*.example.org", "example.org"));
        assert!(!domain_matches("*.example.org", "badexample.org"));
        let net = policy(
            1,
            10,
            Object::Network,
            "192.0.2.0/24",
            Direction::From,
            Action::Allow,
        );
        let rcpts = vec!["bob@served.test".to_string()];
        let s = |ip: &str| Subject {
            sender: "",
            recipients: &rcpts,
            client_ip: ip.parse().ok(),
            delimiter: "+",
        };
        assert!(net.matches(&s("192.0.2.77")).is_some());
        assert!(net.matches(&s("198.51.100.1")).is_none());
        let to = policy(
            2,
            10,
            Object::Domain,
            "served.test",
            Direction::To,
            Action::Block,
        );
        assert!(
            to.matches(&s("192.0.2.77"))
                .unwrap()
                .contains("recipient bob@served.test")
        );
        let from = policy(
            3,
            10,
            Object::Domain,
            "served.test",
            Direction::From,
            Action::Block,
        );
        assert!(
            from.matches(&s("192.0.2.77")).is_none(),
            "the null sender has no domain"
        );
    }

    #[test]
    fn lowest_priority_wins_then_specificity() {
        let rcpts = vec!["bob@served.test".to_string()];
        let s = Subject {
            sender: "ceo@partner.test",
            recipients: &rcpts,
            client_ip: "192.0.2.7".parse().ok(),
            delimiter: "+",
        };
        let policies = vec![
            policy(
                1,
                100,
                Object::Default,
                "",
                Direction::FromOrTo,
                Action::Score,
            ),
            policy(
                2,
                50,
                Object::Domain,
                "partner.test",
                Direction::From,
                Action::Block,
            ),
            policy(
                3,
                50,
                Object::Address,
                "ceo@partner.test",
                Direction::From,
                Action::Allow,
            ),
            policy(
                4,
                60,
                Object::Network,
                "192.0.2.0/24",
                Direction::From,
                Action::Block,
            ),
        ];
        let (best, why) = decide(&policies, &s);
        assert_eq!(best.map(|p| p.id), Some(3), "{why:#?}");
        assert!(
            why.iter()
                .any(|l| l.starts_with("=> p3 wins") && l.contains("tie broken by specificity")),
            "{why:#?}"
        );
        // The allow is the sender's word: unauthenticated, the block behind it applies.
        assert!(
            why.last()
                .unwrap()
                .contains("p2 (action block) applies instead"),
            "{why:#?}"
        );
        let (best, _) = decide(&policies[..2], &s);
        assert_eq!(best.map(|p| p.id), Some(2));
        let (best, why) = decide(
            &policies[3..],
            &Subject {
                client_ip: None,
                delimiter: "+",
                ..s
            },
        );
        assert!(best.is_none());
        assert!(why.last().unwrap().contains("no policy matches"));
    }

    #[test]
    fn a_sender_allow_needs_an_authenticated_sender() {
        let rcpts = vec!["bob@served.test".to_string()];
        let s = Subject {
            sender: "ceo@partner.test",
            recipients: &rcpts,
            client_ip: "192.0.2.7".parse().ok(),
            delimiter: "+",
        };
        let mut policies = vec![
            policy(
                1,
                10,
                Object::Domain,
                "partner.test",
                Direction::From,
                Action::Allow,
            ),
            policy(
                2,
                20,
                Object::Address,
                "*@partner.test",
                Direction::From,
                Action::Score,
            ),
            policy(
                3,
                30,
                Object::Network,
                "192.0.2.0/24",
                Direction::From,
                Action::Allow,
            ),
            policy(
                4,
                40,
                Object::Domain,
                "served.test",
                Direction::FromOrTo,
                Action::Allow,
            ),
        ];
        let trusted = outcome(&policies, &s, true);
        assert_eq!(trusted.allowed().map(|p| p.id), Some(1));
        assert!(trusted.ignored().is_empty());
        let untrusted = outcome(&policies, &s, false);
        assert_eq!(untrusted.allowed(), None);
        assert_eq!(untrusted.scoring(), [Some(&policies[1])]);
        assert_eq!(
            untrusted.ignored().iter().map(|p| p.id).collect::<Vec<_>>(),
            [1]
        );
        let (_, why) = decide(&policies, &s);
        assert!(
            why.iter().any(|l| l.contains("p1 is a sender allow")
                && l.contains("SPF pass for partner.test")
                && l.contains("p2 (action score) applies instead")),
            "{why:#?}"
        );
        // A network allow, and a from-or-to allow matched by a recipient, are not the
        // sender's word: they need nothing more.
        assert!(!policies[2].needs_authentication(&s));
        assert!(!policies[3].needs_authentication(&s));
        // An explicitly unauthenticated allow keeps the old behaviour.
        policies[0].unauthenticated = true;
        assert_eq!(
            outcome(&policies, &s, false).allowed().map(|p| p.id),
            Some(1)
        );
    }

    #[test]
    fn the_strictest_recipient_decides() {
        let rcpts = vec!["vip@served.test".to_string(), "bob@served.test".to_string()];
        let s = Subject {
            sender: "x@elsewhere.test",
            recipients: &rcpts,
            client_ip: None,
            delimiter: "+",
        };
        let mut policies = vec![
            policy(
                1,
                10,
                Object::Address,
                "vip@served.test",
                Direction::To,
                Action::Allow,
            ),
            policy(
                2,
                10,
                Object::Address,
                "bob@served.test",
                Direction::To,
                Action::Block,
            ),
        ];
        let o = outcome(&policies, &s, true);
        assert_eq!(o.blocked().map(|p| p.id), Some(2));
        assert_eq!(o.allowed(), None);
        let (best, why) = decide(&policies, &s);
        assert_eq!(best.map(|p| p.id), Some(2));
        assert!(why.last().unwrap().contains("blocked by p2"), "{why:#?}");
        // An allow for one and nothing for the other: scored, with the global thresholds.
        policies[1].pattern = "nobody@served.test".into();
        let o = outcome(&policies, &s, true);
        assert_eq!(o.allowed(), None);
        assert_eq!(o.scoring(), [None]);
        // An allow for both: allowed.
        policies[1].pattern = "bob@served.test".into();
        policies[1].action = Action::Allow;
        assert_eq!(
            outcome(&policies, &s, true).allowed().map(|p| p.id),
            Some(1)
        );
    }

    #[test]
    fn nonsense_is_refused() {
        let mut p = policy(
            1,
            1,
            Object::Address,
            "example.org",
            Direction::From,
            Action::Allow,
        );
        assert!(p.validate().unwrap_err().to_string().contains("no @"));
        p.object = Object::Network;
        p.pattern = "10.0.0.0/8".into();
        p.direction = Direction::To;
        assert_eq!(
            p.validate(),
            Err(PolicyError::NetworkDirection {
                direction: Direction::To
            })
        );
        p.direction = Direction::From;
        assert!(p.validate().is_ok());
        p.tag = Some(3.0);
        assert!(p.validate().unwrap_err().to_string().contains("score"));
        p.action = Action::Score;
        p.tag = Some(2000.0);
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "tag threshold 2000 is out of range"
        );
        assert_eq!(
            Object::parse("person").unwrap_err().to_string(),
            "object \"person\" is not one of address, network, domain, default"
        );
    }
}
