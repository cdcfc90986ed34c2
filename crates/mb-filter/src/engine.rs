//! The decision for one message: MIME and attachment rules, ClamAV, header sanity, and
//! the score thresholds, turned into a `ScanVerdict`.

use std::fmt::Write as _;

use mail_parser::{HeaderName, Message, MessageParser, MimeHeaders};
use mb_core::Config;
use mb_core::policy::{self, Action, Policy};
use mb_proto::v1::{ScanEnvelope, ScanHeader, ScanSymbol, ScanVerdict};

use crate::{clamav, rspamd};

/// A rule that fired and what it adds to the score.
#[derive(Debug, Clone, PartialEq)]
pub struct Symbol {
    pub name: std::borrow::Cow<'static, str>,
    pub score: f64,
    pub detail: String,
}

fn verdict(action: &str, code: u32, status: &str, text: String) -> ScanVerdict {
    ScanVerdict {
        action: action.into(),
        smtp_code: code,
        smtp_status: status.into(),
        smtp_text: text,
        ..Default::default()
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
        0 => out.push(Symbol {
            name: "MISSING_FROM".into(),
            score: 2.0,
            detail: "no From field".into(),
        }),
        1 => {}
        n => out.push(Symbol {
            name: "MULTIPLE_FROM".into(),
            score: 3.0,
            detail: format!("{n} From fields"),
        }),
    }
    if count(HeaderName::Date) == 0 {
        out.push(Symbol {
            name: "MISSING_DATE".into(),
            score: 1.0,
            detail: "no Date field".into(),
        });
    }
    if count(HeaderName::MessageId) == 0 {
        out.push(Symbol {
            name: "MISSING_MID".into(),
            score: 0.5,
            detail: "no Message-ID field".into(),
        });
    }
    if count(HeaderName::Subject) == 0 {
        out.push(Symbol {
            name: "MISSING_SUBJECT".into(),
            score: 0.5,
            detail: "no Subject field".into(),
        });
    }
    out
}

/// Scans one message under `cfg`. `auth` checks SPF/DKIM/DMARC for inbound mail;
/// `policies` may block the message, skip its spam scoring (allow) or set its thresholds.
pub async fn scan(
    cfg: &Config,
    env: &ScanEnvelope,
    raw: &[u8],
    auth: Option<&crate::auth::Auth>,
    policies: &[Policy],
) -> ScanVerdict {
    let mut symbols: Vec<Symbol> = Vec::new();
    let policy = policy::best(
        policies,
        &policy::Subject {
            sender: &env.sender,
            recipients: &env.recipients,
            client_ip: env.client_ip.parse().ok(),
        },
    );
    if let Some(p) = policy.filter(|p| p.action == Action::Block) {
        let mut v = verdict(
            "reject",
            550,
            "5.7.1",
            format!("Message refused by policy {}", p.name),
        );
        v.symbols.push(ScanSymbol {
            name: "POLICY_BLOCK".into(),
            score: 0.0,
            detail: p.name.clone(),
        });
        return v;
    }
    // Allow-listed: no spam scoring; viruses and attachment rules still apply.
    let allow = policy.filter(|p| p.action == Action::Allow);
    let parsed = MessageParser::default().parse(raw);
    let Some(message) = parsed else {
        return verdict(
            "reject",
            554,
            "5.6.0",
            "Message refused: it cannot be parsed as a mail message".into(),
        );
    };

    // Attachment rules: a blocked type is refused whatever the score.
    let findings = check_attachments(&message, &AttachmentRules::from_config(cfg));
    if let Some(first) = findings.blocked.first() {
        let mut v = verdict("reject", 554, "5.7.1", format!("Message refused: {first}"));
        v.symbols.push(ScanSymbol {
            name: "BLOCKED_ATTACHMENT".into(),
            score: 0.0,
            detail: findings.blocked.join("; "),
        });
        return v;
    }
    if findings.encrypted_archive {
        symbols.push(Symbol {
            name: "ENCRYPTED_ARCHIVE".into(),
            score: 2.0,
            detail: "a ZIP archive with encrypted entries".into(),
        });
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
                let mut v = if cfg.text("clamav.virus_action") == "quarantine" {
                    verdict("quarantine", 0, "", format!("virus found ({name})"))
                } else {
                    verdict(
                        "reject",
                        554,
                        "5.7.1",
                        format!("Message refused: virus found ({name})"),
                    )
                };
                v.symbols.push(ScanSymbol {
                    name: "VIRUS".into(),
                    score: 0.0,
                    detail: name,
                });
                return v;
            }
            Err(e) if cfg.text("clamav.unavailable_action") == "skip" => {
                tracing::warn!(cause = %e, id = %env.queue_id, "ClamAV unavailable; message not scanned for viruses");
                symbols.push(Symbol {
                    name: "CLAMAV_UNAVAILABLE".into(),
                    score: 0.0,
                    detail: e,
                });
            }
            Err(e) => {
                tracing::warn!(cause = %e, id = %env.queue_id, "ClamAV unavailable; message tempfailed");
                return verdict(
                    "tempfail",
                    451,
                    "4.7.1",
                    "Virus scanner unavailable, try again later".into(),
                );
            }
        }
    }

    // Sender authentication, for mail from outside.
    let mut auth_header = None;
    if let (Some(auth), "inbound", Ok(ip)) = (
        auth,
        env.direction.as_str(),
        env.client_ip.parse::<std::net::IpAddr>(),
    ) {
        let hostname = crate::hostname(cfg);
        let out = auth
            .check(cfg, &hostname, ip, &env.helo, &env.sender, raw)
            .await;
        if allow.is_none()
            && let Some(reason) = out.dmarc_reject
        {
            let mut v = verdict("reject", 550, "5.7.1", reason);
            v.symbols.push(ScanSymbol {
                name: "DMARC_REJECT".into(),
                score: 0.0,
                detail: out.header,
            });
            return v;
        }
        if allow.is_none() {
            symbols.extend(out.symbols);
        }
        auth_header = Some(out.header);
    }

    match allow {
        Some(p) => symbols.push(Symbol {
            name: "POLICY_ALLOW".into(),
            score: 0.0,
            detail: p.name.clone(),
        }),
        None => {
            // Rspamd's content rules include header sanity, so with Rspamd answering
            // ours would count the same faults twice.
            let mut checked_headers = false;
            if cfg.bool("rspamd.enabled") {
                match rspamd::check(
                    &cfg.text("rspamd.url"),
                    env,
                    raw,
                    cfg.duration("rspamd.timeout"),
                )
                .await
                {
                    Ok(c) => {
                        checked_headers = true;
                        symbols.extend(c.symbols.into_iter().filter(|s| s.score != 0.0).map(|s| {
                            Symbol {
                                name: s.name.into(),
                                score: s.score,
                                detail: s.description,
                            }
                        }));
                        symbols.push(Symbol {
                            name: "RSPAMD".into(),
                            score: 0.0,
                            detail: format!("score {:.2}, action {}", c.score, c.action),
                        });
                    }
                    Err(e) if cfg.text("rspamd.unavailable_action") == "tempfail" => {
                        tracing::warn!(cause = %e, id = %env.queue_id, "Rspamd unavailable; message tempfailed");
                        return verdict(
                            "tempfail",
                            451,
                            "4.7.1",
                            "Spam scanner unavailable, try again later".into(),
                        );
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, id = %env.queue_id, "Rspamd unavailable; scored without it");
                        symbols.push(Symbol {
                            name: "RSPAMD_UNAVAILABLE".into(),
                            score: 0.0,
                            detail: e,
                        });
                    }
                }
            }
            if !checked_headers {
                symbols.extend(header_symbols(&message));
            }
        }
    }
    let score = symbols.iter().fold(0.0_f64, |acc, s| acc + s.score);
    let own = policy.filter(|p| p.action == Action::Score);
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
        verdict(
            "reject",
            550,
            "5.7.1",
            format!("Message refused as spam (score {score:.1})"),
        )
    } else if score >= quarantine {
        verdict("quarantine", 0, "", format!("spam score {score:.1}"))
    } else if score >= tag {
        verdict("tag", 0, "", String::new())
    } else {
        verdict("accept", 0, "", String::new())
    };
    v.score = score;
    v.symbols = symbols
        .iter()
        .map(|s| ScanSymbol {
            name: s.name.to_string(),
            score: s.score,
            detail: s.detail.clone(),
        })
        .collect();
    if v.action != "reject" {
        let spam = v.action != "accept";
        // Our own verdict headers replace any the message arrived with (forgeries).
        v.remove_headers = vec![
            "X-Spam".into(),
            "X-Spam-Score".into(),
            "X-Spam-Status".into(),
        ];
        if let Some(h) = auth_header {
            // Results claimed by anyone before the border are not ours to trust.
            v.remove_headers.push("Authentication-Results".into());
            v.add_headers.push(ScanHeader {
                name: "Authentication-Results".into(),
                value: h,
            });
        }
        if spam {
            v.add_headers.push(ScanHeader {
                name: "X-Spam".into(),
                value: "Yes".into(),
            });
        }
        v.add_headers.push(ScanHeader {
            name: "X-Spam-Score".into(),
            value: format!("{score:.1}"),
        });
        v.add_headers.push(ScanHeader {
            name: "X-Spam-Status".into(),
            value: format!(
                "{}, score={score:.1} required={tag:.1} tests=[{listed}]",
                if spam { "Yes" } else { "No" }
            ),
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::from_toml_str(extra, "test").unwrap()
    }

    fn env() -> ScanEnvelope {
        ScanEnvelope {
            queue_id: "Q1".into(),
            ..Default::default()
        }
    }

    const CLEAN: &[u8] = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: hi\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <1@b.example>\r\n\r\nhello\r\n";

    fn with_attachment(name: &str) -> Vec<u8> {
        format!(
            "From: a@b.example\r\nSubject: files\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <2@b.example>\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
             --b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
             --b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b1--\r\n"
        )
        .into_bytes()
    }

    fn attachment(name: &str, mime: &str, data: &[u8]) -> Vec<u8> {
        format!(
            "From: a@b.example\r\nSubject: files\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <3@b.example>\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
             --b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
             --b1\r\nContent-Type: {mime}\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--b1--\r\n",
            mb_core::message::base64_encode(data)
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn archives_types_and_sizes_are_checked() {
        let zip = crate::zip::tests::archive(&[("a/readme.txt", false), ("a/setup.scr", false)]);
        let v = scan(
            &cfg(""),
            &env(),
            &attachment("files.zip", "application/zip", &zip),
            None,
            &[],
        )
        .await;
        assert_eq!(v.action, "reject");
        assert!(
            v.smtp_text.contains("\"files.zip\" holds \"a/setup.scr\""),
            "{}",
            v.smtp_text
        );
        let safe = crate::zip::tests::archive(&[("a/readme.txt", true)]);
        let v = scan(
            &cfg(""),
            &env(),
            &attachment("files.zip", "application/zip", &safe),
            None,
            &[],
        )
        .await;
        assert_eq!(v.action, "accept", "{v:?}");
        assert!(
            v.symbols.iter().any(|s| s.name == "ENCRYPTED_ARCHIVE"),
            "{v:?}"
        );
        let v = scan(
            &cfg(""),
            &env(),
            &attachment("tool", "application/x-msdownload", b"MZ"),
            None,
            &[],
        )
        .await;
        assert!(
            v.smtp_text
                .contains("blocked type application/x-msdownload"),
            "{}",
            v.smtp_text
        );
        let big = vec![b'a'; 5000];
        let v = scan(
            &cfg("[attachments]\nmax_size = 4096\n"),
            &env(),
            &attachment("big.txt", "text/plain", &big),
            None,
            &[],
        )
        .await;
        assert!(
            v.smtp_text.contains("larger than 4096 bytes"),
            "{}",
            v.smtp_text
        );
        let v = scan(
            &cfg(""),
            &env(),
            &attachment("big.txt", "text/plain", &big),
            None,
            &[],
        )
        .await;
        assert_eq!(v.action, "accept");
    }

    #[tokio::test]
    async fn clean_mail_is_accepted_with_status_headers() {
        let v = scan(&cfg(""), &env(), CLEAN, None, &[]).await;
        assert_eq!(v.action, "accept");
        assert_eq!(v.score, 0.0);
        let status = v
            .add_headers
            .iter()
            .find(|h| h.name == "X-Spam-Status")
            .unwrap();
        assert!(
            status.value.starts_with("No, score=0.0 required=4.0"),
            "{status:?}"
        );
        assert!(v.remove_headers.contains(&"X-Spam".to_string()));
    }

    #[tokio::test]
    async fn blocked_extensions_are_refused_even_doubled_and_nested() {
        for name in ["invoice.pdf.exe", "RUN.BAT", "script.js."] {
            let v = scan(&cfg(""), &env(), &with_attachment(name), None, &[]).await;
            assert_eq!((v.action.as_str(), v.smtp_code), ("reject", 554), "{name}");
            assert!(
                v.smtp_text.contains(name.trim_end_matches('.')),
                "{}",
                v.smtp_text
            );
        }
        let v = scan(&cfg(""), &env(), &with_attachment("report.pdf"), None, &[]).await;
        assert_eq!(v.action, "accept");
        // Inside an attached message.
        let inner = String::from_utf8(with_attachment("payload.scr")).unwrap();
        let outer = format!(
            "From: a@b.example\r\nSubject: fwd\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"o\"\r\n\r\n\
             --o\r\nContent-Type: text/plain\r\n\r\nfwd\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n{inner}\r\n--o--\r\n"
        );
        let v = scan(&cfg(""), &env(), outer.as_bytes(), None, &[]).await;
        assert_eq!(v.action, "reject", "{v:?}");
        // The list is configurable.
        let v = scan(
            &cfg("[attachments]\nblocked_extensions = \"pdf\"\n"),
            &env(),
            &with_attachment("report.pdf"),
            None,
            &[],
        )
        .await;
        assert_eq!(v.action, "reject");
    }

    #[tokio::test]
    async fn scores_tag_quarantine_and_reject_by_threshold() {
        // No From, no Date, no Message-ID, no Subject: 4.0 = the tag threshold.
        let v = scan(
            &cfg(""),
            &env(),
            b"To: x@y.example\r\n\r\nbody\r\n",
            None,
            &[],
        )
        .await;
        assert_eq!(v.action, "tag");
        assert!((v.score - 4.0).abs() < 1e-9);
        assert!(
            v.add_headers
                .iter()
                .any(|h| h.name == "X-Spam" && h.value == "Yes")
        );
        let status = &v
            .add_headers
            .iter()
            .find(|h| h.name == "X-Spam-Status")
            .unwrap()
            .value;
        assert!(
            status.contains("MISSING_FROM(2.0)") && status.contains("MISSING_DATE(1.0)"),
            "{status}"
        );
        let v = scan(
            &cfg("[spam.threshold]\ntag = 1.0\nquarantine = 2.0\nreject = 3.0\n"),
            &env(),
            b"To: x@y.example\r\n\r\nbody\r\n",
            None,
            &[],
        )
        .await;
        assert_eq!(
            (v.action.as_str(), v.smtp_code, v.smtp_status.as_str()),
            ("reject", 550, "5.7.1")
        );
        // Between the quarantine and reject thresholds: quarantined, with the headers the
        // stored copy carries.
        let v = scan(
            &cfg("[spam.threshold]\ntag = 1.0\nquarantine = 3.0\nreject = 5.0\n"),
            &env(),
            b"To: x@y.example\r\n\r\nbody\r\n",
            None,
            &[],
        )
        .await;
        assert_eq!(
            (v.action.as_str(), v.smtp_text.as_str()),
            ("quarantine", "spam score 4.0")
        );
        assert!(
            v.add_headers
                .iter()
                .any(|h| h.name == "X-Spam" && h.value == "Yes")
        );
    }

    #[tokio::test]
    async fn policies_block_allow_and_set_thresholds() {
        let p = |name: &str, object, pattern: &str, action, tag| Policy {
            id: 1,
            name: name.into(),
            priority: 10,
            object,
            pattern: pattern.into(),
            direction: policy::Direction::From,
            action,
            tag,
            quarantine: None,
            reject: None,
        };
        let spammy = b"To: x@y.example\r\n\r\nbody\r\n"; // 4.0: tagged by default
        let mut e = env();
        e.sender = "news@partner.example".into();
        let blocked = [p(
            "no-partner",
            policy::Object::Domain,
            "partner.example",
            Action::Block,
            None,
        )];
        let v = scan(&cfg(""), &e, CLEAN, None, &blocked).await;
        assert_eq!(
            (v.action.as_str(), v.smtp_code, v.smtp_text.as_str()),
            ("reject", 550, "Message refused by policy no-partner")
        );
        let allowed = [p(
            "partner",
            policy::Object::Address,
            "*@partner.example",
            Action::Allow,
            None,
        )];
        let v = scan(&cfg(""), &e, spammy, None, &allowed).await;
        assert_eq!((v.action.as_str(), v.score), ("accept", 0.0), "{v:?}");
        assert_eq!(v.symbols[0].name, "POLICY_ALLOW");
        // Allowed, but a blocked attachment is still refused.
        let v = scan(&cfg(""), &e, &with_attachment("x.exe"), None, &allowed).await;
        assert_eq!(v.action, "reject");
        let strict = [p(
            "strict",
            policy::Object::Domain,
            "partner.example",
            Action::Score,
            Some(10.0),
        )];
        let v = scan(&cfg(""), &e, spammy, None, &strict).await;
        assert_eq!(
            v.action, "accept",
            "the policy's tag threshold (10) applies: {v:?}"
        );
        // Another sender gets the global thresholds.
        let v = scan(&cfg(""), &env(), spammy, None, &strict).await;
        assert_eq!(v.action, "tag");
    }

    #[tokio::test]
    async fn an_unreachable_clamd_follows_its_unavailable_action() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let base = format!("[clamav]\nenabled = true\naddress = \"{closed}\"\ntimeout = \"2s\"\n");
        let v = scan(&cfg(&base), &env(), CLEAN, None, &[]).await;
        assert_eq!((v.action.as_str(), v.smtp_code), ("tempfail", 451));
        let v = scan(
            &cfg(&format!("{base}unavailable_action = \"skip\"\n")),
            &env(),
            CLEAN,
            None,
            &[],
        )
        .await;
        assert_eq!(v.action, "accept");
        assert!(v.symbols.iter().any(|s| s.name == "CLAMAV_UNAVAILABLE"));
    }
}
