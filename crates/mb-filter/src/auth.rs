//! Sender authentication with mail-auth: SPF (RFC 7208) for the MAIL FROM and HELO
//! identities, DKIM (RFC 6376) signatures, DMARC (RFC 7489) alignment and policy, all
//! through a hickory resolver on `network.dns.servers`; the results become one
//! `Authentication-Results` field (RFC 8601) and scoring symbols.

use std::net::IpAddr;

use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::net::NetError;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, IprevResult,
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
        let Some(message) = AuthenticatedMessage::parse(raw) else {
            return Outcome {
                header: format!("{hostname}; none"),
                symbols: Vec::new(),
                dmarc_reject: None,
            };
        };
        let spf = self
            .0
            .verify_spf(SpfParameters::verify(ip, helo, hostname, sender))
            .await;
        let dkim = self.0.verify_dkim(&message).await;
        // ARC (RFC 8617): the chain of earlier authentication results, e.g. a mailing list
        // that broke the signature but sealed what it saw.
        let arc = self.0.verify_arc(&message).await;
        let mail_from_domain = sender.rsplit_once('@').map_or(helo, |(_, d)| d);
        let dmarc = self
            .0
            .verify_dmarc(DmarcParameters::new(
                &message,
                &dkim,
                mail_from_domain,
                &spf,
            ))
            .await;
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
        match spf.result() {
            SpfResult::Pass => add("SPF_PASS", -0.5, spf.domain().to_string()),
            SpfResult::Fail => add("SPF_FAIL", 3.0, spf.domain().to_string()),
            SpfResult::SoftFail => add("SPF_SOFTFAIL", 1.0, spf.domain().to_string()),
            _ => {}
        }
        for d in &dkim {
            match d.result() {
                DkimResult::Pass => add("DKIM_PASS", -0.5, String::new()),
                DkimResult::Fail(e) | DkimResult::PermError(e) => {
                    add("DKIM_FAIL", 2.0, e.to_string())
                }
                _ => {}
            }
        }
        match arc.result() {
            DkimResult::Pass => add("ARC_PASS", -0.2, String::new()),
            DkimResult::Fail(e) | DkimResult::PermError(e) => add("ARC_FAIL", 1.0, e.to_string()),
            _ => {}
        }
        let passed = matches!(dmarc.spf_result(), DmarcResult::Pass)
            || matches!(dmarc.dkim_result(), DmarcResult::Pass);
        match iprev.result() {
            IprevResult::Pass => {}
            IprevResult::Fail(e) | IprevResult::PermError(e) => {
                add("IPREV_FAIL", 1.0, e.to_string())
            }
            _ => {}
        }
        // DMARC fails when the domain publishes a policy and neither SPF nor DKIM passed
        // aligned; a DNS error is no verdict.
        let temp = matches!(dmarc.spf_result(), DmarcResult::TempError(_))
            || matches!(dmarc.dkim_result(), DmarcResult::TempError(_));
        let failed = !passed && !temp && !matches!(dmarc.policy(), Policy::Unspecified);
        let mut dmarc_reject = None;
        if failed {
            match dmarc.policy() {
                Policy::Reject if cfg.bool("dmarc.enforce") => {
                    dmarc_reject = Some(format!(
                        "Message refused: DMARC policy of {} says reject",
                        dmarc.domain()
                    ));
                }
                Policy::Quarantine if cfg.bool("dmarc.enforce") => {
                    add("DMARC_QUARANTINE", 6.0, dmarc.domain().to_string())
                }
                _ => add("DMARC_FAIL", 3.5, dmarc.domain().to_string()),
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
