//! Sender authentication: SPF (RFC 7208) for the MAIL FROM identity (HELO for the null
//! sender) by `crate::spf`, and with mail-auth DKIM (RFC 6376) signatures, DMARC (RFC
//! 7489) alignment and policy, all through a hickory resolver on `network.dns.servers`;
//! the results become one `Authentication-Results` field (RFC 8601) and scoring symbols.

use std::net::IpAddr;

use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::net::NetError;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcOutput, DmarcResult, IprevResult,
    MessageAuthenticator, SpfResult,
};
use mb_core::Config;
use mb_core::verdict::Symbol;

/// What the checks found.
pub struct Outcome {
    /// The value of the Authentication-Results field (without the field name).
    pub header: String,
    pub symbols: Vec<Symbol>,
    /// Set when DMARC fails for a domain whose policy is reject (and it is enforced).
    pub dmarc_reject: Option<String>,
    /// Set when DMARC fails for a domain whose policy is quarantine (and it is
    /// enforced): the message is quarantined whatever else it scores.
    pub dmarc_quarantine: Option<String>,
    /// The domains the message is authenticated for: the envelope sender's when SPF
    /// passed for it, and a From domain with an aligned DKIM pass that DMARC did not
    /// overrule.
    pub authenticated: Vec<Authenticated>,
}

/// A domain the message is authenticated for, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// Lowercase, without a trailing dot.
    pub domain: String,
    /// For example "SPF pass for partner.test".
    pub how: String,
}

impl Outcome {
    /// How the envelope `sender` is authenticated, if it is: SPF passed for its domain,
    /// or DKIM passed aligned with a From domain that is (relaxed-)aligned with it. A
    /// From domain unrelated to the envelope sender authenticates nothing about the
    /// sender a policy matched.
    pub fn sender_authenticated(&self, sender: &str) -> Option<&str> {
        let domain = domain_of(sender)?;
        self.authenticated
            .iter()
            .find(|a| aligned(&a.domain, &domain))
            .map(|a| a.how.as_str())
    }
}

/// Why the checks cannot start: the worker does not start either.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read /etc/resolv.conf: {0}")]
    SystemConf(NetError),
    #[error("cannot start the DNS resolver: {0}")]
    Resolver(NetError),
}

pub struct Auth(MessageAuthenticator);

impl Auth {
    pub fn from_config(cfg: &Config) -> Result<Auth, AuthError> {
        let (servers, opts) = mb_runtime::resolver_settings(cfg);
        let config = match servers {
            Some(c) => c,
            None => {
                mail_auth::hickory_resolver::system_conf::read_system_conf()
                    .map_err(AuthError::SystemConf)?
                    .0
            }
        };
        MessageAuthenticator::new(config, opts)
            .map(Auth)
            .map_err(AuthError::Resolver)
    }

    /// SPF, DKIM and DMARC for one message from `ip` that said `helo`.
    pub async fn check(
        &self,
        cfg: &Config,
        hostname: &str,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        raw: &[u8],
    ) -> Outcome {
        let Some(mut message) = AuthenticatedMessage::parse(raw) else {
            return Outcome {
                header: format!("{hostname}; none"),
                symbols: Vec::new(),
                dmarc_reject: None,
                dmarc_quarantine: None,
                authenticated: Vec::new(),
            };
        };
        let from_domains = author_domains(&message.from);
        let max = usize::try_from(cfg.int("dkim.verify_max_signatures"))
            .unwrap_or(1)
            .max(1);
        let signed = limit_signatures(&mut message, max, &from_domains);
        // SPF by RFC 7208 (crate::spf), not mail-auth's lenient evaluator; its result
        // is the SpfOutput DMARC and Authentication-Results below are given.
        let request = crate::spf::Request {
            ip,
            helo,
            sender,
            receiver: hostname,
        };
        let spf = crate::spf::verify(self.0.resolver(), &request).await;
        let dkim = self.0.verify_dkim(&message).await;
        // ARC (RFC 8617): the chain of earlier authentication results, e.g. a mailing list
        // that broke the signature but sealed what it saw.
        let arc = self.0.verify_arc(&message).await;
        let mail_from_domain = sender.rsplit_once('@').map_or(helo, |(_, d)| d);
        let dmarc = if from_domains.len() > 1 {
            // mail-auth exempts a From naming several domains from DMARC (RFC 7489
            // 6.6.1 allows that), which would let a spoof of a p=reject domain through
            // by naming a second, harmless one. 6.6.1 also allows the stricter reading
            // taken here: check each author domain on its own (a copy of the message
            // whose From is that domain's first address) and apply the strictest
            // policy among those that fail.
            let mut outputs = Vec::with_capacity(from_domains.len());
            for domain in &from_domains {
                let mut single = message.clone();
                single
                    .from
                    .retain(|a| domain_of(a).as_deref() == Some(domain.as_str()));
                single.from.truncate(1);
                let params = DmarcParameters::new(&single, &dkim, mail_from_domain, &spf);
                outputs.push(self.0.verify_dmarc(params).await);
            }
            strictest(outputs)
        } else {
            self.0
                .verify_dmarc(DmarcParameters::new(
                    &message,
                    &dkim,
                    mail_from_domain,
                    &spf,
                ))
                .await
        };
        // Reverse DNS confirmed by the forward lookup (iprev, RFC 8601 §3).
        let iprev = self.0.verify_iprev(ip).await;
        let header = AuthenticationResults::new(hostname)
            .with_dkim_results(&dkim, message.from())
            .with_spf_mailfrom_result(&spf, ip, sender, helo)
            .with_dmarc_result(&dmarc)
            .with_iprev_result(&iprev, ip)
            .with_arc_result(&arc, ip)
            .to_string();
        let mut symbols = Vec::new();
        let mut add = |name: &'static str, score: f64, detail: String| {
            symbols.push(Symbol {
                name: name.into(),
                score,
                detail,
            })
        };
        // DMARC fails when the author domain publishes a record and neither SPF nor DKIM
        // passed aligned; no record (mail-auth reports policy none then, too) is no
        // verdict, and neither is a DNS error.
        let temp = matches!(dmarc.spf_result(), DmarcResult::TempError(_))
            || matches!(dmarc.dkim_result(), DmarcResult::TempError(_));
        let passed = matches!(dmarc.spf_result(), DmarcResult::Pass)
            || matches!(dmarc.dkim_result(), DmarcResult::Pass);
        let failed = dmarc.dmarc_record().is_some() && !passed && !temp;
        match spf.result() {
            // A pass for an envelope domain DMARC found unaligned (the attacker's own)
            // does not offset the failure.
            SpfResult::Pass if failed => add(
                "SPF_PASS",
                0.0,
                format!("{}, not aligned with From", spf.domain()),
            ),
            SpfResult::Pass => add("SPF_PASS", -0.5, spf.domain().to_string()),
            SpfResult::Fail => add("SPF_FAIL", 3.0, spf.domain().to_string()),
            SpfResult::SoftFail => add("SPF_SOFTFAIL", 1.0, spf.domain().to_string()),
            _ => {}
        }
        if signed > max {
            add(
                "DKIM_TOO_MANY",
                1.0,
                format!("{signed} signatures, {max} verified"),
            );
        }
        // A verified signature is worth something once, and only when its domain is
        // the author's: anyone can sign with a domain of their own, as often as they
        // like. The first aligned pass earns the bonus; without one, the first other
        // pass earns a smaller one, and nothing when DMARC failed.
        let mut aligned_pass = None;
        let mut other_pass = None;
        for d in &dkim {
            match d.result() {
                DkimResult::Pass => {
                    let domain = d.signature().map(|s| s.d.to_ascii_lowercase());
                    let domain = domain.unwrap_or_default();
                    if from_domains.iter().any(|f| aligned(&domain, f)) {
                        aligned_pass.get_or_insert(domain);
                    } else {
                        other_pass.get_or_insert(domain);
                    }
                }
                DkimResult::Fail(e) | DkimResult::PermError(e) => {
                    add("DKIM_FAIL", 2.0, e.to_string())
                }
                _ => {}
            }
        }
        let mut authenticated = Vec::new();
        if matches!(spf.result(), SpfResult::Pass)
            && let Some(d) = domain_of(sender)
            && spf.domain().trim_end_matches('.').eq_ignore_ascii_case(&d)
        {
            authenticated.push(Authenticated {
                how: format!("SPF pass for {d}"),
                domain: d,
            });
        }
        if let Some(d) = &aligned_pass
            && !failed
        {
            for f in from_domains.iter().filter(|f| aligned(d, f)) {
                authenticated.push(Authenticated {
                    domain: f.clone(),
                    how: format!("DKIM pass d={d} aligned with From {f}"),
                });
            }
        }
        match (aligned_pass, other_pass) {
            // DMARC's own alignment (its record's adkim=, its organisational domain)
            // disagreed with ours: DMARC decides.
            (Some(d), _) | (None, Some(d)) if failed => add(
                "DKIM_PASS_UNALIGNED",
                0.0,
                format!("d={d}, does not offset the DMARC failure"),
            ),
            (Some(d), _) => add("DKIM_PASS", -0.5, format!("d={d}")),
            (None, Some(d)) => add("DKIM_PASS_UNALIGNED", -0.1, format!("d={d}")),
            (None, None) => {}
        }
        match arc.result() {
            DkimResult::Pass => add("ARC_PASS", -0.2, String::new()),
            DkimResult::Fail(e) | DkimResult::PermError(e) => add("ARC_FAIL", 1.0, e.to_string()),
            _ => {}
        }
        match iprev.result() {
            IprevResult::Pass => {}
            IprevResult::Fail(e) | IprevResult::PermError(e) => {
                add("IPREV_FAIL", 1.0, e.to_string())
            }
            _ => {}
        }
        let mut dmarc_reject = None;
        let mut dmarc_quarantine = None;
        let enforce = cfg.bool("dmarc.enforce");
        if failed {
            let domain = dmarc.domain().to_string();
            match dmarc.policy() {
                Policy::Reject if enforce => {
                    dmarc_reject = Some(format!(
                        "Message refused: DMARC policy of {domain} says reject"
                    ));
                }
                Policy::Quarantine if enforce => {
                    dmarc_quarantine = Some(format!("DMARC policy of {domain} says quarantine"));
                    add("DMARC_QUARANTINE", 6.0, domain);
                }
                Policy::Reject | Policy::Quarantine => add("DMARC_FAIL", 3.5, domain),
                // p=none asks for reports, not for action: a token score, as Rspamd
                // gives a failure under p=none (0.1).
                Policy::None | Policy::Unspecified => add("DMARC_POLICY_NONE", 0.1, domain),
            }
        } else if passed {
            add("DMARC_PASS", -0.5, dmarc.domain().to_string());
        }
        // DNS blocklists: the client address, then the sender's and the From domains.
        let mut domains: Vec<String> = Vec::new();
        for d in [
            sender.rsplit_once('@').map(|(_, d)| d),
            message.from().rsplit_once('@').map(|(_, d)| d),
        ]
        .into_iter()
        .flatten()
        {
            let d = d.trim_end_matches('>').to_ascii_lowercase();
            if !d.is_empty() && !domains.contains(&d) {
                domains.push(d);
            }
        }
        symbols.extend(self.blocklists(cfg, ip, &domains).await);
        Outcome {
            header,
            symbols,
            dmarc_reject,
            dmarc_quarantine,
            authenticated,
        }
    }

    /// `RBL_IP` / `RBL_DOMAIN` for every configured list that lists the client address
    /// or one of the domains (an A answer in 127.0.0.0/8; 127.255.255.x are the lists'
    /// own error codes and are ignored).
    pub async fn blocklists(&self, cfg: &Config, ip: IpAddr, domains: &[String]) -> Vec<Symbol> {
        let weighted =
            |key: &str| mb_core::registry::weighted_lists(&cfg.list(key)).unwrap_or_default();
        let reversed = match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
            }
            IpAddr::V6(v6) => v6
                .octets()
                .iter()
                .rev()
                .flat_map(|b| [b & 0xf, b >> 4])
                .map(|n| format!("{n:x}"))
                .collect::<Vec<_>>()
                .join("."),
        };
        let mut out = Vec::new();
        for (zone, weight) in weighted("spam.rbl.ip") {
            if self.listed(&format!("{reversed}.{zone}.")).await {
                out.push(Symbol {
                    name: "RBL_IP".into(),
                    score: weight,
                    detail: format!("{ip} in {zone}"),
                });
            }
        }
        for (zone, weight) in weighted("spam.rbl.domain") {
            for d in domains {
                if self.listed(&format!("{d}.{zone}.")).await {
                    out.push(Symbol {
                        name: "RBL_DOMAIN".into(),
                        score: weight,
                        detail: format!("{d} in {zone}"),
                    });
                }
            }
        }
        out
    }

    async fn listed(&self, name: &str) -> bool {
        use mail_auth::hickory_resolver::proto::rr::RData;
        match self.0.resolver().ipv4_lookup(name).await {
            Ok(l) => l.answers().iter().any(|r| match &r.data {
                RData::A(a) => {
                    let o = a.0.octets();
                    o[0] == 127 && !(o[1] == 255 && o[2] == 255)
                }
                _ => false,
            }),
            Err(_) => false,
        }
    }
}

/// The distinct domains of the From addresses, lowercase, in order.
fn author_domains(from: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in from.iter().filter_map(|a| domain_of(a)) {
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// The domain of an address, lowercase and without a trailing dot; none when it has no
/// `@` or nothing after it.
fn domain_of(address: &str) -> Option<String> {
    let (_, d) = address.rsplit_once('@')?;
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    (!d.is_empty()).then_some(d)
}

/// Relaxed alignment without a public suffix list: the signing domain is the author
/// domain, or one is a subdomain of the other. A signer can only publish keys for names
/// it controls, so this misaligns only when the author domain is itself a public suffix
/// whose subdomains belong to others (rare as an author domain); where the author domain
/// publishes DMARC, DMARC's own alignment (its organisational domain, its adkim=) decides
/// in the end, as a DMARC failure cancels the bonus.
fn aligned(signer: &str, author: &str) -> bool {
    let under = |child: &str, parent: &str| {
        child
            .strip_suffix(parent)
            .is_some_and(|rest| rest.ends_with('.'))
    };
    !signer.is_empty() && (signer == author || under(signer, author) || under(author, signer))
}

/// Keeps at most `max` DKIM signatures for verification and returns how many the message
/// carried. Each costs DNS lookups and a public-key operation, and an attacker can add
/// any number; mail-auth has no limit of its own, but verifies exactly the parsed
/// `dkim_headers`, so the excess is dropped there. Signatures aligned with From are kept
/// first (so signatures stacked on top of an honest one cannot push it out), then the
/// others in the order they appear. (Parsing has already hashed the body, once per
/// distinct canonicalization, algorithm and length among the signatures: that cost is
/// mail-auth's and is not limited here.)
fn limit_signatures(message: &mut AuthenticatedMessage<'_>, max: usize, from: &[String]) -> usize {
    // Malformed signatures are counted too: they are fields the sender added.
    let signed = message
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"DKIM-Signature"))
        .count();
    if message.dkim_headers.len() > max {
        message.dkim_headers.sort_by_key(|h| {
            let d = h.header.d.to_ascii_lowercase();
            !from.iter().any(|f| aligned(&d, f))
        });
        message.dkim_headers.truncate(max);
    }
    signed
}

/// Of several author domains' DMARC results, the one to apply: the failure with the
/// strictest policy, else the first.
fn strictest(outputs: Vec<DmarcOutput>) -> DmarcOutput {
    let rank = |o: &DmarcOutput| {
        let failed = o.dmarc_record().is_some()
            && !matches!(
                o.spf_result(),
                DmarcResult::Pass | DmarcResult::TempError(_)
            )
            && !matches!(
                o.dkim_result(),
                DmarcResult::Pass | DmarcResult::TempError(_)
            );
        match (failed, o.policy()) {
            (false, _) => 0,
            (true, Policy::None | Policy::Unspecified) => 1,
            (true, Policy::Quarantine) => 2,
            (true, Policy::Reject) => 3,
        }
    };
    let mut best: Option<(u8, DmarcOutput)> = None;
    for o in outputs {
        let r = rank(&o);
        if best.as_ref().is_none_or(|(b, _)| r > *b) {
            best = Some((r, o));
        }
    }
    best.map(|(_, o)| o).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_relaxed_on_label_boundaries() {
        for (signer, author, want) in [
            ("example.test", "example.test", true),
            ("mail.example.test", "example.test", true),
            ("example.test", "news.example.test", true),
            ("badexample.test", "example.test", false),
            ("attacker.test", "example.test", false),
            ("", "example.test", false),
        ] {
            assert_eq!(aligned(signer, author), want, "{signer} for {author}");
        }
    }

    /// The header fields of a case's message before its first non-DKIM field, and the
    /// rest, with CRLF line endings.
    fn signed_case(name: &str) -> (String, String) {
        let path = format!(
            "{}/../../tests/data/filter/{name}.case",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("the case file");
        let (_, message) = text.split_once("--- message ---\n").expect("a message");
        let message = message.replace('\n', "\r\n");
        let at = message.find("\r\nFrom: ").expect("a From field") + 2;
        (message[..at].to_string(), message[at..].to_string())
    }

    #[test]
    fn at_most_the_limit_of_signatures_is_verified_aligned_first() {
        let (attacker, _) = signed_case("dns-dmarc-reject-stacked-signatures");
        let (own, rest) = signed_case("dns-dkim-aligned-pass");
        // 30 of the attacker's signatures stacked on top of the author's own two.
        let raw = format!("{attacker}{own}{rest}");
        let mut message = AuthenticatedMessage::parse(raw.as_bytes()).expect("parses");
        assert_eq!(message.dkim_headers.len(), 32);
        let from = author_domains(&message.from);
        assert_eq!(from, ["signed.test"]);
        assert_eq!(limit_signatures(&mut message, 5, &from), 32);
        let kept: Vec<&str> = message
            .dkim_headers
            .iter()
            .map(|h| h.header.d.as_str())
            .collect();
        assert_eq!(
            kept,
            [
                "signed.test",
                "signed.test",
                "attacker.test",
                "attacker.test",
                "attacker.test"
            ]
        );
        // Under the limit nothing is dropped.
        let mut message = AuthenticatedMessage::parse(raw.as_bytes()).expect("parses");
        assert_eq!(limit_signatures(&mut message, 50, &from), 32);
        assert_eq!(message.dkim_headers.len(), 32);
    }

    #[test]
    fn the_envelope_sender_is_authenticated_only_by_its_own_domain() {
        let out = Outcome {
            header: String::new(),
            symbols: Vec::new(),
            dmarc_reject: None,
            dmarc_quarantine: None,
            authenticated: vec![Authenticated {
                domain: "partner.test".into(),
                how: "DKIM pass d=partner.test aligned with From partner.test".into(),
            }],
        };
        for (sender, want) in [
            ("news@partner.test", true),
            ("news@Mail.Partner.test.", true),
            ("ceo@attacker.test", false),
            ("ceo@notpartner.test", false),
            ("", false),
        ] {
            assert_eq!(out.sender_authenticated(sender).is_some(), want, "{sender}");
        }
    }

    #[test]
    fn author_domains_are_distinct_and_lowercase() {
        let from = [
            "a@Example.test".to_string(),
            "b@example.test".into(),
            "c@other.test.".into(),
            "nobody".into(),
        ];
        assert_eq!(author_domains(&from), ["example.test", "other.test"]);
    }
}
