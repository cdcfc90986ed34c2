//! SPF (RFC 7208) evaluated by the book: the record parsed strictly (any syntax error
//! anywhere is permerror), macro expansion (section 7), the mechanisms and modifiers of
//! section 5 and 6, the limits of section 4.6.4 (10 DNS-querying terms, 2 void lookups,
//! 10 MX and PTR names) and the explanation. mail-auth's own evaluator is lenient where
//! the RFC is strict (it passed `ip4:…/33` and `exists` on an IPv6-only name, answered
//! neutral for syntax errors) and it checks HELO before MAIL FROM; this one agrees with
//! all of the openspf RFC 7208 test suite (`suite.rs`). Its lookups go through the
//! hickory resolver its caller holds (the filter's sender checks, mb-smtpd's greylisting
//! at RCPT); its result is a mail-auth `SpfOutput`, so in the filter DMARC and
//! Authentication-Results see the same verdict. A library of its own because two
//! daemons use it and no daemon crate depends on another.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::time::Duration;

use mail_auth::hickory_resolver::TokioResolver;
use mail_auth::hickory_resolver::proto::rr::{Name, RData, RecordType};
pub use mail_auth::{SpfOutput, SpfResult};

#[cfg(test)]
mod suite;

/// Section 4.6.4: terms that query DNS (include, a, mx, ptr, exists, redirect).
const MAX_DNS_TERMS: u32 = 10;
/// Section 4.6.4: lookups answering NXDOMAIN or no records.
const MAX_VOID_LOOKUPS: u32 = 2;
/// Section 4.6.4: MX names per `mx` term, PTR names per `ptr` term or `%{p}`.
const MAX_NAMES: usize = 10;
/// Section 4.6.4 recommends at least 20 seconds for the whole evaluation.
const DEADLINE: Duration = Duration::from_secs(20);

/// What SPF is asked about one SMTP transaction.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The SMTP client's address.
    pub ip: IpAddr,
    /// The HELO/EHLO argument.
    pub helo: &'a str,
    /// The MAIL FROM address, empty for the null sender.
    pub sender: &'a str,
    /// This host's name (`%{r}` in explanations).
    pub receiver: &'a str,
}

/// The SPF result for the transaction: the MAIL FROM identity's, or the HELO identity's
/// for the null sender (RFC 7208 2.4). The HELO is not checked first for a MAIL FROM
/// (2.3 allows it, but a HELO failure would then stand for the MAIL FROM result DMARC
/// needs).
pub async fn verify(resolver: &TokioResolver, request: &Request<'_>) -> SpfOutput {
    verify_within(resolver, request, DEADLINE).await
}

/// [`verify`] with a shorter overall deadline, for a caller that holds an SMTP command
/// open (greylisting's exemption at RCPT): past `deadline` the result is temperror.
pub async fn verify_within(
    resolver: &TokioResolver,
    request: &Request<'_>,
    deadline: Duration,
) -> SpfOutput {
    // An IPv4 client seen through an IPv4-mapped IPv6 address is an IPv4 client: ip6
    // mechanisms (even `ip6:::/0`) never match it, ip4 mechanisms do.
    let ip = request.ip.to_canonical();
    // The null sender is checked as postmaster@HELO; a sender without `@` is taken as a
    // domain, and an empty local part is "postmaster" (section 4.3).
    let (local, domain) = if request.sender.is_empty() {
        ("postmaster", request.helo)
    } else {
        request
            .sender
            .rsplit_once('@')
            .unwrap_or(("", request.sender))
    };
    let local = if local.is_empty() {
        "postmaster"
    } else {
        local
    };
    let mut eval = Evaluation {
        resolver,
        ip,
        local: local.to_string(),
        sender_domain: domain.to_string(),
        helo: request.helo.to_string(),
        receiver: request.receiver.to_string(),
        terms: 0,
        voids: 0,
        includes: 0,
    };
    let domain = domain.to_string();
    let output = SpfOutput::new(domain.trim_end_matches('.').to_ascii_lowercase());
    match tokio::time::timeout(deadline, eval.check_host(domain)).await {
        Ok(Ok(Checked {
            result,
            explanation,
        })) => {
            let output = output.with_result(result);
            match explanation {
                Some(e) => output.with_explanation(e),
                None => output,
            }
        }
        Ok(Err(Abort::Temp)) | Err(_) => output.with_result(SpfResult::TempError),
        Ok(Err(Abort::Perm)) => output.with_result(SpfResult::PermError),
    }
}

/// What ends an evaluation early: temperror and permerror propagate out of includes and
/// redirects unchanged.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Abort {
    Temp,
    Perm,
}

type Eval<T> = Result<T, Abort>;

/// A finished check_host(): pass, fail, softfail, neutral or none.
struct Checked {
    result: SpfResult,
    explanation: Option<String>,
}

struct Evaluation<'r> {
    resolver: &'r TokioResolver,
    ip: IpAddr,
    local: String,
    sender_domain: String,
    helo: String,
    receiver: String,
    terms: u32,
    voids: u32,
    /// How deep inside include mechanisms the evaluation is: an included record's
    /// explanation is never used (section 6.2), so it is not looked up.
    includes: u32,
}

impl Evaluation<'_> {
    /// check_host() of section 4 for `domain`; boxed for the recursion of include and
    /// redirect.
    fn check_host(
        &mut self,
        domain: String,
    ) -> Pin<Box<dyn Future<Output = Eval<Checked>> + Send + '_>> {
        Box::pin(async move {
            let none = Checked {
                result: SpfResult::None,
                explanation: None,
            };
            let domain = domain.trim_end_matches('.').to_string();
            if !valid_domain(&domain) {
                return Ok(none);
            }
            let Some(text) = self.record(&domain).await? else {
                return Ok(none);
            };
            let record = parse_record(&text).map_err(|_| Abort::Perm)?;
            for directive in &record.directives {
                if self.matches(&directive.mechanism, &domain).await? {
                    let explanation = match (directive.qualifier, &record.exp) {
                        (SpfResult::Fail, Some(exp)) if self.includes == 0 => {
                            self.explain(exp, &domain).await
                        }
                        _ => None,
                    };
                    return Ok(Checked {
                        result: directive.qualifier,
                        explanation,
                    });
                }
            }
            if let Some(redirect) = &record.redirect {
                self.count_term()?;
                let target = self.expand_domain(redirect, &domain).await?;
                let checked = self.check_host(target).await?;
                // A redirect to a domain without a record is an error of this record
                // (section 6.1).
                if checked.result == SpfResult::None {
                    return Err(Abort::Perm);
                }
                return Ok(checked);
            }
            Ok(Checked {
                result: SpfResult::Neutral,
                explanation: None,
            })
        })
    }

    /// The one SPF record of `domain` (sections 4.4 and 4.5), none when it has none.
    async fn record(&mut self, domain: &str) -> Eval<Option<Vec<u8>>> {
        let records = match self.lookup(domain, RecordType::TXT).await {
            Ok(records) => records,
            Err(Lookup::Void) => return Ok(None),
            Err(Lookup::Temp) => return Err(Abort::Temp),
        };
        let mut spf = records.into_iter().filter_map(|r| match r {
            RData::TXT(txt) => {
                let text: Vec<u8> = txt
                    .txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect();
                let version = text
                    .get(..6)
                    .is_some_and(|v| v.eq_ignore_ascii_case(b"v=spf1"));
                (version && matches!(text.get(6), None | Some(b' '))).then_some(text)
            }
            _ => None,
        });
        let first = spf.next();
        if spf.next().is_some() {
            return Err(Abort::Perm);
        }
        Ok(first)
    }

    async fn matches(&mut self, mechanism: &Mechanism, domain: &str) -> Eval<bool> {
        match mechanism {
            Mechanism::All => Ok(true),
            Mechanism::Ip4(net, len) => Ok(match self.ip {
                IpAddr::V4(ip) => in_net4(ip, *net, *len),
                IpAddr::V6(_) => false,
            }),
            Mechanism::Ip6(net, len) => Ok(match self.ip {
                IpAddr::V6(ip) => in_net6(ip, *net, *len),
                IpAddr::V4(_) => false,
            }),
            Mechanism::Include(spec) => {
                self.count_term()?;
                let target = self.expand_domain(spec, domain).await?;
                self.includes += 1;
                let checked = self.check_host(target).await;
                self.includes -= 1;
                match checked?.result {
                    SpfResult::Pass => Ok(true),
                    SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Ok(false),
                    // An include of a domain without a record is an error (5.2).
                    _ => Err(Abort::Perm),
                }
            }
            Mechanism::A(spec, cidr) => {
                self.count_term()?;
                let target = self.target(spec.as_ref(), domain).await?;
                let addrs = self.addresses(&target, true).await?;
                Ok(addrs.iter().any(|a| self.in_cidr(*a, cidr)))
            }
            Mechanism::Mx(spec, cidr) => {
                self.count_term()?;
                let target = self.target(spec.as_ref(), domain).await?;
                let mut hosts: Vec<(u16, Name)> = match self.lookup(&target, RecordType::MX).await {
                    Ok(records) => records
                        .into_iter()
                        .filter_map(|r| match r {
                            RData::MX(mx) => Some((mx.preference, mx.exchange)),
                            _ => None,
                        })
                        .collect(),
                    Err(Lookup::Void) => {
                        self.count_void()?;
                        Vec::new()
                    }
                    Err(Lookup::Temp) => return Err(Abort::Temp),
                };
                if hosts.len() > MAX_NAMES {
                    return Err(Abort::Perm);
                }
                hosts.sort_by_key(|(preference, _)| *preference);
                for (_, host) in hosts {
                    let host = text_of(&host);
                    let addrs = self.addresses(&host, false).await?;
                    if addrs.iter().any(|a| self.in_cidr(*a, cidr)) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Ptr(spec) => {
                self.count_term()?;
                let target = self
                    .target(spec.as_ref(), domain)
                    .await?
                    .to_ascii_lowercase();
                let validated = self.validated_names(Some(&target)).await;
                Ok(!validated.is_empty())
            }
            Mechanism::Exists(spec) => {
                self.count_term()?;
                let target = self.expand_domain(spec, domain).await?;
                // Always an A lookup, whatever the client's address family (5.7).
                match self.lookup(&target, RecordType::A).await {
                    Ok(records) => Ok(records.iter().any(|r| matches!(r, RData::A(_)))),
                    Err(Lookup::Void) => {
                        self.count_void()?;
                        Ok(false)
                    }
                    Err(Lookup::Temp) => Err(Abort::Temp),
                }
            }
        }
    }

    /// The domain a/mx/ptr look at: their domain-spec expanded, or the current domain.
    async fn target(&mut self, spec: Option<&MacroString>, domain: &str) -> Eval<String> {
        match spec {
            Some(spec) => self.expand_domain(spec, domain).await,
            None => Ok(domain.to_string()),
        }
    }

    /// The addresses of `name` of the client's family. A void answer counts towards the
    /// void lookup limit when `void_counts` (the name a term names, not each MX host).
    async fn addresses(&mut self, name: &str, void_counts: bool) -> Eval<Vec<IpAddr>> {
        let rtype = match self.ip {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::AAAA,
        };
        match self.lookup(name, rtype).await {
            Ok(records) => Ok(records
                .into_iter()
                .filter_map(|r| match r {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect()),
            Err(Lookup::Void) => {
                if void_counts {
                    self.count_void()?;
                }
                Ok(Vec::new())
            }
            Err(Lookup::Temp) => Err(Abort::Temp),
        }
    }

    fn in_cidr(&self, addr: IpAddr, cidr: &Cidr) -> bool {
        match (self.ip, addr) {
            (IpAddr::V4(ip), IpAddr::V4(net)) => in_net4(ip, net, cidr.v4),
            (IpAddr::V6(ip), IpAddr::V6(net)) => in_net6(ip, net, cidr.v6),
            _ => false,
        }
    }

    /// The client's validated domain names (section 5.5): names from its PTR records (the
    /// first 10) whose addresses include the client's. With `under`, only names equal to
    /// or below it. DNS errors here never fail the evaluation: a name that cannot be
    /// checked is skipped.
    async fn validated_names(&mut self, under: Option<&str>) -> Vec<String> {
        let reverse = reverse_name(self.ip);
        let names: Vec<String> = match self.lookup(&reverse, RecordType::PTR).await {
            Ok(records) => records
                .into_iter()
                .filter_map(|r| match r {
                    RData::PTR(p) => Some(text_of(&p.0).to_ascii_lowercase()),
                    _ => None,
                })
                .take(MAX_NAMES)
                .collect(),
            Err(_) => return Vec::new(),
        };
        let mut validated = Vec::new();
        for name in names {
            if let Some(under) = under
                && !(name == under || name.ends_with(&format!(".{under}")))
            {
                continue;
            }
            let rtype = match self.ip {
                IpAddr::V4(_) => RecordType::A,
                IpAddr::V6(_) => RecordType::AAAA,
            };
            let Ok(records) = self.lookup(&name, rtype).await else {
                continue;
            };
            let confirmed = records.iter().any(|r| match r {
                RData::A(a) => IpAddr::V4(a.0) == self.ip,
                RData::AAAA(a) => IpAddr::V6(a.0) == self.ip,
                _ => false,
            });
            if confirmed {
                validated.push(name);
            }
        }
        validated
    }

    fn count_term(&mut self) -> Eval<()> {
        self.terms += 1;
        if self.terms > MAX_DNS_TERMS {
            return Err(Abort::Perm);
        }
        Ok(())
    }

    fn count_void(&mut self) -> Eval<()> {
        self.voids += 1;
        if self.voids > MAX_VOID_LOOKUPS {
            return Err(Abort::Perm);
        }
        Ok(())
    }

    /// The explanation for a fail (section 6.2): the TXT record at the expanded
    /// domain-spec, macro-expanded. Anything wrong gives no explanation, never another
    /// result, and these lookups count towards no limit.
    async fn explain(&mut self, exp: &MacroString, domain: &str) -> Option<String> {
        let target = self.expand_domain(exp, domain).await.ok()?;
        let records = self.lookup(&target, RecordType::TXT).await.ok()?;
        let mut texts = records.into_iter().filter_map(|r| match r {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect::<Vec<u8>>(),
            ),
            _ => None,
        });
        let text = texts.next()?;
        if texts.next().is_some() {
            return None;
        }
        let text = String::from_utf8(text).ok()?;
        let macros = parse_macro_string(&text, true).ok()?;
        let expanded = self.expand(&macros, domain, true).await.ok()?;
        // Only printable ASCII goes into a reply or a header.
        Some(
            expanded
                .chars()
                .filter(|c| c.is_ascii() && !c.is_ascii_control())
                .collect(),
        )
    }

    /// A domain-spec expanded into a name to look up, shortened from the left to 253
    /// characters (section 7.3).
    async fn expand_domain(&mut self, spec: &MacroString, domain: &str) -> Eval<String> {
        let mut name = self.expand(spec, domain, false).await?;
        while name.trim_end_matches('.').len() > 253 {
            match name.split_once('.') {
                Some((_, rest)) => name = rest.to_string(),
                None => break,
            }
        }
        Ok(name)
    }

    async fn expand(&mut self, spec: &MacroString, domain: &str, exp: bool) -> Eval<String> {
        let mut out = String::new();
        for token in &spec.0 {
            let Token::Macro(m) = token else {
                if let Token::Literal(text) = token {
                    out.push_str(text);
                }
                continue;
            };
            let value = match m.letter {
                's' => format!("{}@{}", self.local, self.sender_domain),
                'l' => self.local.clone(),
                'o' => self.sender_domain.clone(),
                'd' => domain.to_string(),
                'i' => match self.ip {
                    IpAddr::V4(ip) => ip.to_string(),
                    IpAddr::V6(ip) => nibbles(ip).join("."),
                },
                'p' => {
                    let names = self.validated_names(None).await;
                    let lower = domain.to_ascii_lowercase();
                    names
                        .iter()
                        .find(|n| **n == lower || n.ends_with(&format!(".{lower}")))
                        .or(names.first())
                        .cloned()
                        .unwrap_or_else(|| "unknown".into())
                }
                'v' => match self.ip {
                    IpAddr::V4(_) => "in-addr".into(),
                    IpAddr::V6(_) => "ip6".into(),
                },
                'h' => self.helo.clone(),
                'c' if exp => self.ip.to_string(),
                'r' if exp => {
                    if self.receiver.is_empty() {
                        "unknown".into()
                    } else {
                        self.receiver.clone()
                    }
                }
                't' if exp => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    .to_string(),
                // c, r and t outside an explanation (section 7.2).
                _ => return Err(Abort::Perm),
            };
            let mut parts: Vec<&str> = value.split(|c| m.delimiters.contains(c)).collect();
            if m.reverse {
                parts.reverse();
            }
            if let Some(keep) = m.digits
                && keep < parts.len()
            {
                parts.drain(..parts.len() - keep);
            }
            let joined = parts.join(".");
            if m.escape {
                out.push_str(&url_escape(&joined));
            } else {
                out.push_str(&joined);
            }
        }
        Ok(out)
    }

    /// The records of one type at `name`. A name that cannot be a DNS name (an empty or
    /// over-long label) has no records.
    async fn lookup(&self, name: &str, rtype: RecordType) -> Result<Vec<RData>, Lookup> {
        let Some(name) = dns_name(name) else {
            return Err(Lookup::Void);
        };
        match self.resolver.lookup(name, rtype).await {
            Ok(lookup) => {
                let records: Vec<RData> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .map(|r| r.data.clone())
                    .collect();
                if records.is_empty() {
                    Err(Lookup::Void)
                } else {
                    Ok(records)
                }
            }
            Err(e) if e.is_no_records_found() => Err(Lookup::Void),
            Err(_) => Err(Lookup::Temp),
        }
    }
}

/// Why a lookup found nothing: NXDOMAIN or no records (a void lookup), or an error
/// (timeout, SERVFAIL, ...).
enum Lookup {
    Void,
    Temp,
}

/// Section 4.3: a domain check_host() can look at: 1 to 253 characters, labels of 1 to
/// 63 characters, at least two of them, and not an address literal.
fn valid_domain(domain: &str) -> bool {
    if domain.is_empty() || domain.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| (1..=63).contains(&l.len()))
        && domain
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'[' && b != b']')
}

fn dns_name(text: &str) -> Option<Name> {
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() || text.split('.').any(|l| l.is_empty() || l.len() > 63) {
        return None;
    }
    let mut name = Name::from_labels(text.split('.').map(str::as_bytes)).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// A name from DNS as text, its labels taken as they are: `to_ascii` would escape
/// characters such as `:` and `/`, which SPF names may hold.
fn text_of(name: &Name) -> String {
    name.iter()
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(".")
}

fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut n = nibbles(v6);
            n.reverse();
            format!("{}.ip6.arpa", n.join("."))
        }
    }
}

/// The 32 hex digits of an IPv6 address, most significant first.
fn nibbles(ip: Ipv6Addr) -> Vec<String> {
    ip.octets()
        .iter()
        .flat_map(|b| [b >> 4, b & 0xf])
        .map(|n| format!("{n:x}"))
        .collect()
}

fn in_net4(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_net6(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// Uppercase macro letters URL-escape their value (section 7.3): all but RFC 3986's
/// unreserved characters.
fn url_escape(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// The record's syntax (section 12's ABNF).

#[derive(Debug, PartialEq)]
struct Record {
    directives: Vec<Directive>,
    redirect: Option<MacroString>,
    exp: Option<MacroString>,
}

#[derive(Debug, PartialEq)]
struct Directive {
    qualifier: SpfResult,
    mechanism: Mechanism,
}

#[derive(Debug, PartialEq)]
enum Mechanism {
    All,
    Include(MacroString),
    A(Option<MacroString>, Cidr),
    Mx(Option<MacroString>, Cidr),
    Ptr(Option<MacroString>),
    Ip4(Ipv4Addr, u8),
    Ip6(Ipv6Addr, u8),
    Exists(MacroString),
}

#[derive(Debug, PartialEq, Clone, Copy)]
struct Cidr {
    v4: u8,
    v6: u8,
}

#[derive(Debug, PartialEq, Clone)]
struct MacroString(Vec<Token>);

#[derive(Debug, PartialEq, Clone)]
enum Token {
    Literal(String),
    Macro(Macro),
}

#[derive(Debug, PartialEq, Clone)]
struct Macro {
    /// Lowercase.
    letter: char,
    /// An uppercase letter: the value is URL-escaped.
    escape: bool,
    digits: Option<usize>,
    reverse: bool,
    delimiters: String,
}

/// A record that is not valid SPF: permerror.
#[derive(Debug, PartialEq)]
struct SyntaxError;

fn parse_record(text: &[u8]) -> Result<Record, SyntaxError> {
    // Only printable ASCII and spaces (section 3.1, 4.6.1): a control character or a
    // byte over 127 is not a separator, it is an error.
    if !text.iter().all(|b| *b == b' ' || b.is_ascii_graphic()) {
        return Err(SyntaxError);
    }
    let text = std::str::from_utf8(text).map_err(|_| SyntaxError)?;
    let mut terms = text.split(' ').filter(|t| !t.is_empty());
    match terms.next() {
        Some(v) if v.eq_ignore_ascii_case("v=spf1") => {}
        _ => return Err(SyntaxError),
    }
    let mut record = Record {
        directives: Vec::new(),
        redirect: None,
        exp: None,
    };
    for term in terms {
        if let Some((name, value)) = modifier(term) {
            match name.to_ascii_lowercase().as_str() {
                "redirect" => {
                    if record.redirect.replace(domain_spec(value)?).is_some() {
                        return Err(SyntaxError);
                    }
                }
                "exp" => {
                    if record.exp.replace(domain_spec(value)?).is_some() {
                        return Err(SyntaxError);
                    }
                }
                // Unknown modifiers are ignored, but must be well-formed (6).
                _ => {
                    parse_macro_string(value, true)?;
                }
            }
            continue;
        }
        record.directives.push(directive(term)?);
    }
    Ok(record)
}

/// `name=value` when `term` is a modifier: name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." ).
fn modifier(term: &str) -> Option<(&str, &str)> {
    let (name, value) = term.split_once('=')?;
    let mut chars = name.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    .then_some((name, value))
}

fn directive(term: &str) -> Result<Directive, SyntaxError> {
    let (qualifier, rest) = match term.as_bytes().first() {
        Some(b'+') => (SpfResult::Pass, &term[1..]),
        Some(b'-') => (SpfResult::Fail, &term[1..]),
        Some(b'~') => (SpfResult::SoftFail, &term[1..]),
        Some(b'?') => (SpfResult::Neutral, &term[1..]),
        _ => (SpfResult::Pass, term),
    };
    let end = rest.find([':', '/']).unwrap_or(rest.len());
    let (name, args) = rest.split_at(end);
    let mechanism = match name.to_ascii_lowercase().as_str() {
        "all" if args.is_empty() => Mechanism::All,
        "include" => Mechanism::Include(required_spec(args)?),
        "exists" => Mechanism::Exists(required_spec(args)?),
        "a" => {
            let (spec, cidr) = spec_and_cidr(args)?;
            Mechanism::A(spec, cidr)
        }
        "mx" => {
            let (spec, cidr) = spec_and_cidr(args)?;
            Mechanism::Mx(spec, cidr)
        }
        "ptr" => match args {
            "" => Mechanism::Ptr(None),
            _ => Mechanism::Ptr(Some(required_spec(args)?)),
        },
        "ip4" => {
            let net = args.strip_prefix(':').ok_or(SyntaxError)?;
            let (addr, len) = match net.split_once('/') {
                Some((addr, len)) => (addr, cidr_length(len, 32)?),
                None => (net, 32),
            };
            Mechanism::Ip4(addr.parse().map_err(|_| SyntaxError)?, len)
        }
        "ip6" => {
            let net = args.strip_prefix(':').ok_or(SyntaxError)?;
            let (addr, len) = match net.split_once('/') {
                Some((addr, len)) => (addr, cidr_length(len, 128)?),
                None => (net, 128),
            };
            Mechanism::Ip6(addr.parse().map_err(|_| SyntaxError)?, len)
        }
        _ => return Err(SyntaxError),
    };
    Ok(Directive {
        qualifier,
        mechanism,
    })
}

/// `:domain-spec` (include, exists, ptr with an argument).
fn required_spec(args: &str) -> Result<MacroString, SyntaxError> {
    domain_spec(args.strip_prefix(':').ok_or(SyntaxError)?)
}

/// a and mx: `[ ":" domain-spec ] [ dual-cidr-length ]`.
fn spec_and_cidr(args: &str) -> Result<(Option<MacroString>, Cidr), SyntaxError> {
    let (spec, cidr) = match args.strip_prefix(':') {
        Some(rest) => {
            // A domain-spec may hold any visible character, `/` included
            // (`a:foo:bar/baz.example.com`): the cidr is only a trailing `/N`, `//N` or
            // `/N//M`.
            let at = cidr_start(rest);
            (Some(domain_spec(&rest[..at])?), &rest[at..])
        }
        None => (None, args),
    };
    let mut out = Cidr { v4: 32, v6: 128 };
    // dual-cidr-length = [ "/" ip4-cidr-length ] [ "//" ip6-cidr-length ]
    let (v4, v6) = match cidr.strip_prefix("//") {
        Some(v6) => (None, Some(v6)),
        None => match cidr.strip_prefix('/') {
            Some(rest) => match rest.split_once("//") {
                Some((v4, v6)) => (Some(v4), Some(v6)),
                None => (Some(rest), None),
            },
            None if cidr.is_empty() => (None, None),
            None => return Err(SyntaxError),
        },
    };
    if let Some(v4) = v4 {
        out.v4 = cidr_length(v4, 32)?;
    }
    if let Some(v6) = v6 {
        out.v6 = cidr_length(v6, 128)?;
    }
    Ok((spec, out))
}

/// Where a trailing dual-cidr-length starts in `text` (its length when there is none).
fn cidr_start(text: &str) -> usize {
    let digits = |end: usize| {
        text[..end]
            .bytes()
            .rev()
            .take_while(u8::is_ascii_digit)
            .count()
    };
    let mut end = text.len();
    let n = digits(end);
    if n > 0 && text[..end - n].ends_with("//") {
        end -= n + 2;
    }
    let n = digits(end);
    if n > 0 && text[..end - n].ends_with('/') && !text[..end - n].ends_with("//") {
        end -= n + 1;
    }
    end
}

/// A prefix length: "0" or digits without a leading zero, at most `max`.
fn cidr_length(text: &str, max: u8) -> Result<u8, SyntaxError> {
    let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (text.len() > 1 && text.starts_with('0')) || text.len() > 3 {
        return Err(SyntaxError);
    }
    let len: u8 = text.parse().map_err(|_| SyntaxError)?;
    if len > max {
        return Err(SyntaxError);
    }
    Ok(len)
}

/// domain-spec = macro-string domain-end; domain-end = ( "." toplabel [ "." ] ) /
/// macro-expand.
fn domain_spec(text: &str) -> Result<MacroString, SyntaxError> {
    if text.is_empty() {
        return Err(SyntaxError);
    }
    let macros = parse_macro_string(text, false)?;
    match macros.0.last() {
        Some(Token::Macro(_)) => {}
        Some(Token::Literal(last)) => {
            let end = last.strip_suffix('.').unwrap_or(last);
            let (_, top) = end.rsplit_once('.').ok_or(SyntaxError)?;
            if !toplabel(top) {
                return Err(SyntaxError);
            }
        }
        None => return Err(SyntaxError),
    }
    Ok(macros)
}

/// toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum ).
fn toplabel(label: &str) -> bool {
    let b = label.as_bytes();
    if b.is_empty() || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') {
        return false;
    }
    if !b.contains(&b'-') {
        return b.iter().any(u8::is_ascii_alphabetic);
    }
    b[0].is_ascii_alphanumeric() && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A macro-string (section 7.1). `%%`, `%_` and `%-` become literals; c, r and t are
/// allowed only in `explanation` text.
fn parse_macro_string(text: &str, explanation: bool) -> Result<MacroString, SyntaxError> {
    let mut tokens = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    // A literal pushed by a macro-expand (%%, %_, %-) ends the domain-end check's
    // literal run too: track it as its own token.
    let flush = |literal: &mut String, tokens: &mut Vec<Token>| {
        if !literal.is_empty() {
            tokens.push(Token::Literal(std::mem::take(literal)));
        }
    };
    while let Some(c) = chars.next() {
        if c != '%' {
            // Any visible character but `%`; a space only in explanations.
            if !(c.is_ascii_graphic() || (explanation && c == ' ')) {
                return Err(SyntaxError);
            }
            literal.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => literal.push('%'),
            Some('_') => literal.push(' '),
            Some('-') => literal.push_str("%20"),
            Some('{') => {
                let mut body = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => body.push(c),
                        None => return Err(SyntaxError),
                    }
                }
                let mut body = body.chars();
                let letter = body.next().ok_or(SyntaxError)?;
                let lower = letter.to_ascii_lowercase();
                if !"slodiphcrtv".contains(lower) || !letter.is_ascii_alphabetic() {
                    return Err(SyntaxError);
                }
                if !explanation && "crt".contains(lower) {
                    return Err(SyntaxError);
                }
                let rest: String = body.collect();
                let digits_end = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                let (digits, rest) = rest.split_at(digits_end);
                let digits = match digits {
                    "" => None,
                    d => {
                        let n: usize = d.parse().unwrap_or(usize::MAX);
                        if n == 0 {
                            return Err(SyntaxError);
                        }
                        Some(n)
                    }
                };
                let (reverse, delimiters) = match rest.strip_prefix(['r', 'R']) {
                    Some(d) => (true, d),
                    None => (false, rest),
                };
                if !delimiters.chars().all(|c| ".-+,/_=".contains(c)) {
                    return Err(SyntaxError);
                }
                flush(&mut literal, &mut tokens);
                tokens.push(Token::Macro(Macro {
                    letter: lower,
                    escape: letter.is_ascii_uppercase(),
                    digits,
                    reverse,
                    delimiters: if delimiters.is_empty() {
                        ".".into()
                    } else {
                        delimiters.into()
                    },
                }));
            }
            _ => return Err(SyntaxError),
        }
    }
    flush(&mut literal, &mut tokens);
    Ok(MacroString(tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_parsed_strictly() {
        for (record, valid) in [
            ("v=spf1 -all", true),
            ("v=spf1 a  mx -all ", true),
            ("V=SPF1 A:example.com/24//64 ~ALL", true),
            ("v=spf1 ip4:192.0.2.0/33", false),
            ("v=spf1 ip4:192.0.2.0/024", false),
            ("v=spf1 ip4:1.2.3", false),
            ("v=spf1 ip6:::/129", false),
            ("v=spf1 a:example.com\rptr", false),
            ("v=spf1 a:museum", false),
            ("v=spf1 a:example.123", false),
            ("v=spf1 a:example.1-2", true),
            ("v=spf1 a:%{d}", true),
            ("v=spf1 a:%{c}.example.com", false),
            ("v=spf1 exists:%{l0}.example.com", false),
            ("v=spf1 include", false),
            ("v=spf1 a:foo:bar/baz.example.com", true),
            ("v=spf1 a:foo:bar/baz.example.com/24//64", true),
            ("v=spf1 a:example.com//64", true),
            ("v=spf1 a:example.com/", false),
            ("v=spf1 a/24/64", false),
            ("v=spf1 ptr/0", false),
            ("v=spf1 all:x", false),
            (
                "v=spf1 redirect=a.example.com redirect=b.example.com",
                false,
            ),
            ("v=spf1 moo.cow-far_out=man:dog/cat ~all", true),
            ("v=spf1 foo=%z", false),
            ("v=spf1 -redirect=a.example.com", false),
        ] {
            assert_eq!(parse_record(record.as_bytes()).is_ok(), valid, "{record}");
        }
    }

    #[test]
    fn prefixes_match_their_family_only() {
        let v4 = |s: &str| s.parse::<Ipv4Addr>().expect("v4");
        assert!(in_net4(v4("192.0.2.200"), v4("192.0.2.0"), 24));
        assert!(!in_net4(v4("192.0.3.1"), v4("192.0.2.0"), 24));
        assert!(in_net4(v4("1.2.3.4"), v4("0.0.0.0"), 0));
        let v6 = |s: &str| s.parse::<Ipv6Addr>().expect("v6");
        assert!(in_net6(v6("2001:db8::1"), v6("2001:db8::"), 32));
        assert!(!in_net6(v6("2001:db9::1"), v6("2001:db8::"), 32));
        assert!(in_net6(v6("::1"), v6("::"), 0));
    }

    #[test]
    fn url_escaping_keeps_unreserved_characters() {
        assert_eq!(url_escape("a b/c~d.e"), "a%20b%2Fc~d.e");
    }
}
