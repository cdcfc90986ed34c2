//! The decision for one message: MIME and attachment rules, ClamAV, header sanity, and
//! the score thresholds, turned into a `Verdict`.

use std::fmt::Write as _;

use mail_parser::{HeaderName, Message, MessageParser, MimeHeaders};
use mb_core::policy::{self, Policy};
use mb_core::verdict::{Action, Direction, Refusal, ScanRequest, Symbol, Verdict};
use mb_core::{Config, EnhancedStatus};

use crate::{clamav, rspamd};

/// The reply of a refusal for content: a virus or a blocked attachment.
const CONTENT_REFUSED: (u16, EnhancedStatus) = (554, EnhancedStatus::POLICY_REJECT);
/// A policy, DMARC or the spam score refused it.
const POLICY_REFUSED: (u16, EnhancedStatus) = (550, EnhancedStatus::POLICY_REJECT);
/// A scanner it depends on is down.
const SCANNER_DOWN: (u16, EnhancedStatus) = (451, EnhancedStatus::POLICY_TEMPFAIL);
/// Not a mail message at all (RFC 3463 5.6.0, other media error).
const UNPARSABLE: (u16, EnhancedStatus) = (554, EnhancedStatus::new(5, 6, 0));

/// A refusal with its own reply and one symbol that says why (or none).
fn refuse(
    action: Action,
    (code, status): (u16, EnhancedStatus),
    text: String,
    symbol: Option<Symbol>,
) -> Verdict {
    let mut v = Verdict::refuse(action, code, status, &text);
    v.symbols.extend(symbol);
    v
}

/// A verdict whose reply (if any) is the action's default.
fn decide(action: Action, text: String) -> Verdict {
    Verdict {
        action,
        refusal: Refusal {
            code: None,
            status: None,
            text,
        },
        ..Verdict::default()
    }
}

fn symbol(name: &str, score: f64, detail: impl Into<String>) -> Symbol {
    Symbol {
        name: name.into(),
        score,
        detail: detail.into(),
    }
}

/// What attachments may not be.
pub struct AttachmentRules {
    pub extensions: Vec<String>,
    pub types: Vec<String>,
    /// Decoded bytes; 0 for no limit.
    pub max_size: u64,
}

impl AttachmentRules {
    pub fn from_config(cfg: &Config) -> AttachmentRules {
        AttachmentRules {
            extensions: cfg.list("attachments.blocked_extensions"),
            types: cfg.list("attachments.blocked_types"),
            max_size: cfg.size("attachments.max_size"),
        }
    }

    /// Whether a file name's last extension is blocked (`invoice.pdf.exe` is an `exe`).
    fn name_blocked(&self, name: &str) -> bool {
        let lower = name.trim().trim_end_matches('.').to_ascii_lowercase();
        lower
            .rsplit_once('.')
            .is_some_and(|(_, ext)| self.extensions.iter().any(|b| b.eq_ignore_ascii_case(ext)))
    }
}

/// What the attachment rules found.
#[derive(Debug, Default, PartialEq)]
pub struct AttachmentFindings {
    /// Why the message is refused: one line per offending attachment.
    pub blocked: Vec<String>,
    /// A ZIP archive with encrypted entries (its contents cannot be checked).
    pub encrypted_archive: bool,
}

/// Checks every attachment: its name, declared type and size, the names inside ZIP
/// archives, and attached messages (a few levels deep).
pub fn check_attachments(message: &Message<'_>, rules: &AttachmentRules) -> AttachmentFindings {
    let mut out = AttachmentFindings::default();
    collect_blocked(message, rules, &mut out, 0);
    out
}

fn collect_blocked(
    message: &Message<'_>,
    rules: &AttachmentRules,
    out: &mut AttachmentFindings,
    depth: u32,
) {
    for part in message.attachments() {
        let name = part.attachment_name().unwrap_or("(unnamed)").to_string();
        if rules.name_blocked(&name) {
            out.blocked
                .push(format!("attachment {name:?} is of a blocked type"));
        }
        if let Some(ct) = part.content_type() {
            let mime =
                format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or_default()).to_ascii_lowercase();
            if rules.types.iter().any(|t| t.eq_ignore_ascii_case(&mime)) {
                out.blocked
                    .push(format!("attachment {name:?} has the blocked type {mime}"));
            }
        }
        let data = part.contents();
        if rules.max_size > 0 && data.len() as u64 > rules.max_size {
            out.blocked.push(format!(
                "attachment {name:?} is larger than {} bytes",
                rules.max_size
            ));
        }
        if crate::zip::is_zip(data)
            && let Some(listing) = crate::zip::list(data)
        {
            out.encrypted_archive |= listing.encrypted;
            for inner in listing.names.iter().filter(|n| rules.name_blocked(n)) {
                out.blocked
                    .push(format!("archive {name:?} holds {inner:?}, a blocked type"));
            }
        }
        // An attached message is scanned too (a few levels deep, no further).
        if depth < 4
            && let Some(inner) = part.message()
        {
            collect_blocked(inner, rules, out, depth + 1);
        }
    }
}

/// Header sanity: what a well-formed message has (RFC 5322 §3.6).
pub fn header_symbols(message: &Message<'_>) -> Vec<Symbol> {
    let count = |n: HeaderName<'_>| message.headers().iter().filter(|h| h.name == n).count();
    let mut out = Vec::new();
    match count(HeaderName::From) {
        0 => out.push(symbol("MISSING_FROM", 2.0, "no From field")),
        1 => {}
        n => out.push(symbol("MULTIPLE_FROM", 3.0, format!("{n} From fields"))),
    }
    if count(HeaderName::Date) == 0 {
        out.push(symbol("MISSING_DATE", 1.0, "no Date field"));
    }
    if count(HeaderName::MessageId) == 0 {
        out.push(symbol("MISSING_MID", 0.5, "no Message-ID field"));
    }
    if count(HeaderName::Subject) == 0 {
        out.push(symbol("MISSING_SUBJECT", 0.5, "no Subject field"));
    }
    out
}

/// Scans one message under `cfg`. `auth` checks SPF/DKIM/DMARC for inbound mail;
/// `policies` may block the message, skip its spam scoring (allow) or set its thresholds.
pub async fn scan(
    cfg: &Config,
    req: &ScanRequest,
    raw: &[u8],
    auth: Option<&crate::auth::Auth>,
    policies: &[Policy],
) -> Verdict {
    let mut symbols: Vec<Symbol> = Vec::new();
    let policy = policy::best(
        policies,
        &policy::Subject {
            sender: &req.sender,
            recipients: &req.recipients,
            client_ip: req.client_ip,
        },
    );
    if let Some(p) = policy.filter(|p| p.action == policy::Action::Block) {
        return refuse(
            Action::Reject,
            POLICY_REFUSED,
            format!("Message refused by policy {}", p.name),
            Some(symbol("POLICY_BLOCK", 0.0, p.name.clone())),
        );
    }
    // Allow-listed: no spam scoring; viruses and attachment rules still apply.
    let allow = policy.filter(|p| p.action == policy::Action::Allow);
    let parsed = MessageParser::default().parse(raw);
    let Some(message) = parsed else {
        return refuse(
            Action::Reject,
            UNPARSABLE,
            "Message refused: it cannot be parsed as a mail message".into(),
            None,
        );
    };

    // Attachment rules: a blocked type is refused whatever the score.
    let findings = check_attachments(&message, &AttachmentRules::from_config(cfg));
    if let Some(first) = findings.blocked.first() {
        return refuse(
            Action::Reject,
            CONTENT_REFUSED,
            format!("Message refused: {first}"),
            Some(symbol(
                "BLOCKED_ATTACHMENT",
                0.0,
                findings.blocked.join("; "),
            )),
        );
    }
    if findings.encrypted_archive {
        symbols.push(symbol(
            "ENCRYPTED_ARCHIVE",
            2.0,
            "a ZIP archive with encrypted entries",
        ));
    }

    // Viruses.
    if cfg.bool("clamav.enabled") {
        match clamav::scan(
            &cfg.text("clamav.address"),
            raw,
            cfg.duration("clamav.timeout"),
        )
        .await
        {
            Ok(clamav::Scan::Clean) => {}
            Ok(clamav::Scan::Infected(name)) => {
                let found = symbol("VIRUS", 0.0, name.clone());
                if cfg.text("clamav.virus_action") == "quarantine" {
                    let mut v = decide(Action::Quarantine, format!("virus found ({name})"));
                    v.symbols.push(found);
                    return v;
                }
                return refuse(
                    Action::Reject,
                    CONTENT_REFUSED,
                    format!("Message refused: virus found ({name})"),
                    Some(found),
                );
            }
            Err(e) if cfg.text("clamav.unavailable_action") == "skip" => {
                tracing::warn!(cause = %e, id = %req.queue_id, "ClamAV unavailable; message not scanned for viruses");
                symbols.push(symbol("CLAMAV_UNAVAILABLE", 0.0, e.to_string()));
            }
            Err(e) => {
                tracing::warn!(cause = %e, id = %req.queue_id, "ClamAV unavailable; message tempfailed");
                return refuse(
                    Action::Tempfail,
                    SCANNER_DOWN,
                    "Virus scanner unavailable, try again later".into(),
                    None,
                );
            }
        }
    }

    // Sender authentication, for mail from outside.
    let mut auth_header = None;
    if let (Some(auth), Direction::Inbound, Some(ip)) = (auth, req.direction, req.client_ip) {
        let hostname = crate::hostname(cfg);
        let out = auth
            .check(cfg, &hostname, ip, &req.helo, &req.sender, raw)
            .await;
        if allow.is_none()
            && let Some(reason) = out.dmarc_reject
        {
            return refuse(
                Action::Reject,
                POLICY_REFUSED,
                reason,
                Some(symbol("DMARC_REJECT", 0.0, out.header)),
            );
        }
        if allow.is_none() {
            symbols.extend(out.symbols);
        }
        auth_header = Some(out.header);
    }

    match allow {
        Some(p) => symbols.push(symbol("POLICY_ALLOW", 0.0, p.name.clone())),
        None => {
            // Rspamd's content rules include header sanity, so with Rspamd answering
            // ours would count the same faults twice.
            let mut checked_headers = false;
            if cfg.bool("rspamd.enabled") {
                match rspamd::check(
                    &cfg.text("rspamd.url"),
                    req,
                    raw,
                    cfg.duration("rspamd.timeout"),
                )
                .await
                {
                    Ok(c) => {
                        checked_headers = true;
                        symbols.extend(
                            c.symbols
                                .into_iter()
                                .filter(|s| s.score != 0.0)
                                .map(|s| symbol(&s.name, s.score, s.description)),
                        );
                        symbols.push(symbol(
                            "RSPAMD",
                            0.0,
                            format!("score {:.2}, action {}", c.score, c.action),
                        ));
                    }
                    Err(e) if cfg.text("rspamd.unavailable_action") == "tempfail" => {
                        tracing::warn!(cause = %e, id = %req.queue_id, "Rspamd unavailable; message tempfailed");
                        return refuse(
                            Action::Tempfail,
                            SCANNER_DOWN,
                            "Spam scanner unavailable, try again later".into(),
                            None,
                        );
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, id = %req.queue_id, "Rspamd unavailable; scored without it");
                        symbols.push(symbol("RSPAMD_UNAVAILABLE", 0.0, e.to_string()));
                    }
                }
            }
            if !checked_headers {
                symbols.extend(header_symbols(&message));
            }
        }
    }
    let score = symbols.iter().fold(0.0_f64, |acc, s| acc + s.score);
    let own = policy.filter(|p| p.action == policy::Action::Score);
    let (tag, quarantine, reject) = (
        own.and_then(|p| p.tag)
            .unwrap_or_else(|| cfg.float("spam.threshold.tag")),
        own.and_then(|p| p.quarantine)
            .unwrap_or_else(|| cfg.float("spam.threshold.quarantine")),
        own.and_then(|p| p.reject)
            .unwrap_or_else(|| cfg.float("spam.threshold.reject")),
    );
    let mut listed = String::new();
    // Rules that scored, and the policy that decided (an allow-listing scores nothing).
    for s in symbols
        .iter()
        .filter(|s| s.score != 0.0 || s.name.starts_with("POLICY_"))
    {
        if !listed.is_empty() {
            listed.push(',');
        }
        let _ = write!(listed, "{}({:.1})", s.name, s.score);
    }
    let mut v = if score >= reject {
        refuse(
            Action::Reject,
            POLICY_REFUSED,
            format!("Message refused as spam (score {score:.1})"),
            None,
        )
    } else if score >= quarantine {
        decide(Action::Quarantine, format!("spam score {score:.1}"))
    } else if score >= tag {
        decide(Action::Tag, String::new())
    } else {
        decide(Action::Accept, String::new())
    };
    v.score = score;
    v.symbols = symbols;
    if v.action != Action::Reject {
        let spam = v.action != Action::Accept;
        // Our own verdict headers replace any the message arrived with (forgeries).
        v.remove_headers = vec![
            "X-Spam".into(),
            "X-Spam-Score".into(),
            "X-Spam-Status".into(),
        ];
        if let Some(h) = auth_header {
            // Results claimed by anyone before the border are not ours to trust.
            v.remove_headers.push("Authentication-Results".into());
            v.add_headers.push(("Authentication-Results".into(), h));
        }
        if spam {
            v.add_headers.push(("X-Spam".into(), "Yes".into()));
        }
        v.add_headers
            .push(("X-Spam-Score".into(), format!("{score:.1}")));
        v.add_headers.push((
            "X-Spam-Status".into(),
            format!(
                "{}, score={score:.1} required={tag:.1} tests=[{listed}]",
                if spam { "Yes" } else { "No" }
            ),
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    //! What a case file cannot express; the rules themselves are tested from the cases
    //! under tests/data/filter (see `crate::cases`).

    use super::*;

    const CLEAN: &[u8] = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: hi\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <1@b.example>\r\n\r\nhello\r\n";

    /// The address of a port nobody listens on (bound, then closed) is only known at run
    /// time.
    #[tokio::test]
    async fn an_unreachable_clamd_follows_its_unavailable_action() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let base = format!("[clamav]\nenabled = true\naddress = \"{closed}\"\ntimeout = \"2s\"\n");
        let cfg = |extra: &str| Config::from_toml_str(&format!("{base}{extra}"), "test").unwrap();
        let req = ScanRequest::default();
        let v = scan(&cfg(""), &req, CLEAN, None, &[]).await;
        assert_eq!(
            v,
            Verdict::refuse(
                Action::Tempfail,
                451,
                EnhancedStatus::new(4, 7, 1),
                "Virus scanner unavailable, try again later"
            )
        );
        let v = scan(
            &cfg("unavailable_action = \"skip\"\n"),
            &req,
            CLEAN,
            None,
            &[],
        )
        .await;
        assert_eq!(v.action, Action::Accept);
        let skipped = v
            .symbols
            .iter()
            .find(|s| s.name == "CLAMAV_UNAVAILABLE")
            .expect("a CLAMAV_UNAVAILABLE symbol");
        assert!(
            skipped
                .detail
                .starts_with(&format!("cannot connect to clamd at {closed}: ")),
            "{skipped:?}"
        );
    }
}
