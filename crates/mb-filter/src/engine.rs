//! The decision for one message, as a pipeline of steps (policy, parse, attachments,
//! antivirus, sender authentication, content scoring, thresholds, headers) that ends in a
//! `Verdict`.

use std::fmt::Write as _;
use std::ops::ControlFlow;

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
///
/// The steps run in this order; each one ends the scan with a verdict or adds to the
/// context the later ones read.
pub async fn scan(
    cfg: &Config,
    req: &ScanRequest,
    raw: &[u8],
    auth: Option<&crate::auth::Auth>,
    policies: &[Policy],
) -> Verdict {
    let steps = async {
        let policy = match_policy(req, policies)?;
        let message = parse(raw)?;
        let mut ctx = Context {
            cfg,
            req,
            raw,
            policy,
            symbols: Vec::new(),
            auth_header: None,
        };
        attachments(&mut ctx, &message)?;
        antivirus(&mut ctx).await?;
        sender_authentication(&mut ctx, auth).await?;
        content_scoring(&mut ctx, &message).await?;
        let thresholds = Thresholds::new(cfg, policy);
        let mut verdict = thresholds.judge(ctx.symbols);
        verdict_headers(&mut verdict, ctx.auth_header, thresholds.tag);
        Step::<Verdict>::Continue(verdict)
    };
    match steps.await {
        ControlFlow::Break(verdict) | ControlFlow::Continue(verdict) => verdict,
    }
}

/// What a step decided: `Break` ends the scan with that verdict, `Continue` hands the
/// message to the next step.
type Step<T = ()> = ControlFlow<Verdict, T>;

/// One message on its way through the steps: what they read, and what the steps so far
/// added for the thresholds and the headers.
struct Context<'a> {
    cfg: &'a Config,
    req: &'a ScanRequest,
    raw: &'a [u8],
    /// The policy that matched the envelope, if any (never a blocking one: that ended
    /// the scan).
    policy: Option<&'a Policy>,
    /// Every rule that fired, in the order the steps ran; the score is their sum.
    symbols: Vec<Symbol>,
    /// Our Authentication-Results, when sender authentication ran.
    auth_header: Option<String>,
}

impl<'a> Context<'a> {
    /// The allow-listing policy that matched: no spam scoring, though viruses and
    /// attachment rules still apply.
    fn allowed(&self) -> Option<&'a Policy> {
        self.policy.filter(|p| p.action == policy::Action::Allow)
    }
}

/// Policy: a blocking policy refuses the message; any other that matched goes on, to
/// allow-list it or set its thresholds.
fn match_policy<'p>(req: &ScanRequest, policies: &'p [Policy]) -> Step<Option<&'p Policy>> {
    let policy = policy::best(
        policies,
        &policy::Subject {
            sender: &req.sender,
            recipients: &req.recipients,
            client_ip: req.client_ip,
        },
    );
    if let Some(p) = policy.filter(|p| p.action == policy::Action::Block) {
        return ControlFlow::Break(refuse(
            Action::Reject,
            POLICY_REFUSED,
            format!("Message refused by policy {}", p.name),
            Some(symbol("POLICY_BLOCK", 0.0, p.name.clone())),
        ));
    }
    ControlFlow::Continue(policy)
}

/// Parse: what cannot be parsed as a mail message is refused.
fn parse(raw: &[u8]) -> Step<Message<'_>> {
    match MessageParser::default().parse(raw) {
        Some(message) => ControlFlow::Continue(message),
        None => ControlFlow::Break(refuse(
            Action::Reject,
            UNPARSABLE,
            "Message refused: it cannot be parsed as a mail message".into(),
            None,
        )),
    }
}

/// Attachments: a blocked name, type or size (or a blocked name inside a ZIP archive) is
/// refused whatever the score; an encrypted archive only scores.
fn attachments(ctx: &mut Context<'_>, message: &Message<'_>) -> Step {
    let findings = check_attachments(message, &AttachmentRules::from_config(ctx.cfg));
    if let Some(first) = findings.blocked.first() {
        return ControlFlow::Break(refuse(
            Action::Reject,
            CONTENT_REFUSED,
            format!("Message refused: {first}"),
            Some(symbol(
                "BLOCKED_ATTACHMENT",
                0.0,
                findings.blocked.join("; "),
            )),
        ));
    }
    if findings.encrypted_archive {
        ctx.symbols.push(symbol(
            "ENCRYPTED_ARCHIVE",
            2.0,
            "a ZIP archive with encrypted entries",
        ));
    }
    ControlFlow::Continue(())
}

/// Antivirus (when `clamav.enabled`): a virus is rejected or quarantined
/// (`clamav.virus_action`); clamd down tempfails the message, or under
/// `clamav.unavailable_action = "skip"` lets it on with a symbol.
async fn antivirus(ctx: &mut Context<'_>) -> Step {
    let cfg = ctx.cfg;
    if !cfg.bool("clamav.enabled") {
        return ControlFlow::Continue(());
    }
    let address = cfg.text("clamav.address");
    match clamav::scan(&address, ctx.raw, cfg.duration("clamav.timeout")).await {
        Ok(clamav::Scan::Clean) => ControlFlow::Continue(()),
        Ok(clamav::Scan::Infected(name)) => {
            let found = symbol("VIRUS", 0.0, name.clone());
            if cfg.text("clamav.virus_action") == "quarantine" {
                let mut v = decide(Action::Quarantine, format!("virus found ({name})"));
                v.symbols.push(found);
                return ControlFlow::Break(v);
            }
            ControlFlow::Break(refuse(
                Action::Reject,
                CONTENT_REFUSED,
                format!("Message refused: virus found ({name})"),
                Some(found),
            ))
        }
        Err(e) if cfg.text("clamav.unavailable_action") == "skip" => {
            tracing::warn!(cause = %e, id = %ctx.req.queue_id, "ClamAV unavailable; message not scanned for viruses");
            ctx.symbols
                .push(symbol("CLAMAV_UNAVAILABLE", 0.0, e.to_string()));
            ControlFlow::Continue(())
        }
        Err(e) => {
            tracing::warn!(cause = %e, id = %ctx.req.queue_id, "ClamAV unavailable; message tempfailed");
            ControlFlow::Break(refuse(
                Action::Tempfail,
                SCANNER_DOWN,
                "Virus scanner unavailable, try again later".into(),
                None,
            ))
        }
    }
}

/// Sender authentication (inbound mail from a known address, when `auth` is given):
/// SPF/DKIM/DMARC/ARC and blocklist symbols, and our Authentication-Results. A DMARC
/// reject policy refuses the message; an allow-listed one neither scores nor is refused.
async fn sender_authentication(ctx: &mut Context<'_>, auth: Option<&crate::auth::Auth>) -> Step {
    let req = ctx.req;
    let (Some(auth), Direction::Inbound, Some(ip)) = (auth, req.direction, req.client_ip) else {
        return ControlFlow::Continue(());
    };
    let hostname = crate::hostname(ctx.cfg);
    let out = auth
        .check(ctx.cfg, &hostname, ip, &req.helo, &req.sender, ctx.raw)
        .await;
    let allowed = ctx.allowed().is_some();
    if !allowed && let Some(reason) = out.dmarc_reject {
        return ControlFlow::Break(refuse(
            Action::Reject,
            POLICY_REFUSED,
            reason,
            Some(symbol("DMARC_REJECT", 0.0, out.header)),
        ));
    }
    if !allowed {
        ctx.symbols.extend(out.symbols);
    }
    ctx.auth_header = Some(out.header);
    ControlFlow::Continue(())
}

/// Content scoring: an allow-listed message scores nothing (`POLICY_ALLOW`); any other
/// is scored by Rspamd (when `rspamd.enabled`), or by our header sanity when Rspamd is
/// off or did not answer.
async fn content_scoring(ctx: &mut Context<'_>, message: &Message<'_>) -> Step {
    if let Some(p) = ctx.allowed() {
        ctx.symbols
            .push(symbol("POLICY_ALLOW", 0.0, p.name.clone()));
        return ControlFlow::Continue(());
    }
    // Rspamd's content rules include header sanity, so with Rspamd answering ours would
    // count the same faults twice.
    let answered = ctx.cfg.bool("rspamd.enabled") && rspamd_scoring(ctx).await?;
    if !answered {
        ctx.symbols.extend(header_symbols(message));
    }
    ControlFlow::Continue(())
}

/// Rspamd: its scoring symbols and a summary; whether it answered. Down, it tempfails the
/// message under `rspamd.unavailable_action = "tempfail"`, else adds a symbol.
async fn rspamd_scoring(ctx: &mut Context<'_>) -> Step<bool> {
    let cfg = ctx.cfg;
    let url = cfg.text("rspamd.url");
    match rspamd::check(&url, ctx.req, ctx.raw, cfg.duration("rspamd.timeout")).await {
        Ok(c) => {
            ctx.symbols.extend(
                c.symbols
                    .into_iter()
                    .filter(|s| s.score != 0.0)
                    .map(|s| symbol(&s.name, s.score, s.description)),
            );
            ctx.symbols.push(symbol(
                "RSPAMD",
                0.0,
                format!("score {:.2}, action {}", c.score, c.action),
            ));
            ControlFlow::Continue(true)
        }
        Err(e) if cfg.text("rspamd.unavailable_action") == "tempfail" => {
            tracing::warn!(cause = %e, id = %ctx.req.queue_id, "Rspamd unavailable; message tempfailed");
            ControlFlow::Break(refuse(
                Action::Tempfail,
                SCANNER_DOWN,
                "Spam scanner unavailable, try again later".into(),
                None,
            ))
        }
        Err(e) => {
            tracing::warn!(cause = %e, id = %ctx.req.queue_id, "Rspamd unavailable; scored without it");
            ctx.symbols
                .push(symbol("RSPAMD_UNAVAILABLE", 0.0, e.to_string()));
            ControlFlow::Continue(false)
        }
    }
}

/// The spam score thresholds: a matching score policy's own, else `spam.threshold.*`.
struct Thresholds {
    tag: f64,
    quarantine: f64,
    reject: f64,
}

impl Thresholds {
    fn new(cfg: &Config, policy: Option<&Policy>) -> Thresholds {
        let own = policy.filter(|p| p.action == policy::Action::Score);
        Thresholds {
            tag: own
                .and_then(|p| p.tag)
                .unwrap_or_else(|| cfg.float("spam.threshold.tag")),
            quarantine: own
                .and_then(|p| p.quarantine)
                .unwrap_or_else(|| cfg.float("spam.threshold.quarantine")),
            reject: own
                .and_then(|p| p.reject)
                .unwrap_or_else(|| cfg.float("spam.threshold.reject")),
        }
    }

    /// Thresholds: the sum of the symbols' scores decides reject, quarantine, tag or
    /// accept.
    fn judge(&self, symbols: Vec<Symbol>) -> Verdict {
        let score = symbols.iter().fold(0.0_f64, |acc, s| acc + s.score);
        let mut v = if score >= self.reject {
            refuse(
                Action::Reject,
                POLICY_REFUSED,
                format!("Message refused as spam (score {score:.1})"),
                None,
            )
        } else if score >= self.quarantine {
            decide(Action::Quarantine, format!("spam score {score:.1}"))
        } else if score >= self.tag {
            decide(Action::Tag, String::new())
        } else {
            decide(Action::Accept, String::new())
        };
        v.score = score;
        v.symbols = symbols;
        v
    }
}

/// Headers (for a message that is delivered or quarantined, not rejected): our X-Spam
/// fields and Authentication-Results are added, and the copies the message arrived with
/// removed.
fn verdict_headers(v: &mut Verdict, auth_header: Option<String>, tag: f64) {
    if v.action == Action::Reject {
        return;
    }
    let spam = v.action != Action::Accept;
    let score = v.score;
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
    let listed = tests_listed(&v.symbols);
    v.add_headers.push((
        "X-Spam-Status".into(),
        format!(
            "{}, score={score:.1} required={tag:.1} tests=[{listed}]",
            if spam { "Yes" } else { "No" }
        ),
    ));
}

/// The `tests=` list of X-Spam-Status: the rules that scored, and the policy that
/// decided (an allow-listing scores nothing).
fn tests_listed(symbols: &[Symbol]) -> String {
    let mut listed = String::new();
    for s in symbols
        .iter()
        .filter(|s| s.score != 0.0 || s.name.starts_with("POLICY_"))
    {
        if !listed.is_empty() {
            listed.push(',');
        }
        let _ = write!(listed, "{}({:.1})", s.name, s.score);
    }
    listed
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
