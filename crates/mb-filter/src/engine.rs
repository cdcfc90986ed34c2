//! The decision for one message, as a pipeline of steps (policy, parse, attachments,
//! antivirus, sender authentication, content scoring, thresholds, headers) that ends in a
//! `Verdict`.

use std::fmt::Write as _;
use std::ops::ControlFlow;

use mail_parser::{HeaderName, Message, MessageParser};
use mb_core::policy::{self, Policy};
use mb_core::verdict::{Action, Direction, Refusal, ScanRequest, Symbol, Verdict};
use mb_core::{Config, EnhancedStatus};

use crate::attachments::{AttachmentRules, check_attachments};
use crate::{clamav, rspamd};

/// The reply of a refusal for content: a virus or a blocked attachment.
const CONTENT_REFUSED: (u16, EnhancedStatus) = (554, EnhancedStatus::POLICY_REJECT);
/// A policy, DMARC or the spam score refused it.
const POLICY_REFUSED: (u16, EnhancedStatus) = (550, EnhancedStatus::POLICY_REJECT);
/// A scanner it depends on is down.
const SCANNER_DOWN: (u16, EnhancedStatus) = (451, EnhancedStatus::POLICY_TEMPFAIL);
/// Not a mail message at all (RFC 3463 5.6.0, other media error).
const UNPARSABLE: (u16, EnhancedStatus) = (554, EnhancedStatus::BAD_CONTENT);

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

/// Header sanity: what a well-formed message has (RFC 5322 §3.6).
pub fn header_symbols(message: &Message<'_>) -> Vec<Symbol> {
    let count = |n: HeaderName<'_>| message.headers().iter().filter(|h| h.name == n).count();
    let mut out = Vec::new();
    match count(HeaderName::From) {
        0 => out.push(symbol("MISSING_FROM", 2.0, "no From field")),
        // An empty From, or one without an address, names no author either: scored as
        // a missing one, so `From:` alone cannot halve what an anonymous message scores.
        1 if no_author(message).is_some() => out.push(symbol(
            "MISSING_FROM",
            2.0,
            "no address with a domain in From",
        )),
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
        match_policy(cfg, req, policies)?;
        let message = parse(raw)?;
        let mut ctx = Context {
            cfg,
            req,
            raw,
            policies,
            allowed: None,
            sender_authenticated: None,
            symbols: Vec::new(),
            auth_symbols: Vec::new(),
            auth_header: None,
            rspamd: None,
            dmarc_quarantine: None,
        };
        let archive_quarantine = attachments(&mut ctx, &message)?;
        antivirus(&mut ctx).await?;
        sender_authentication(&mut ctx, &message, auth).await?;
        let thresholds = apply_policy(&mut ctx)?;
        content_scoring(&mut ctx, &message).await?;
        let mut verdict = thresholds.judge(ctx.symbols);
        let subject = rspamd_action(&mut verdict, ctx.rspamd, cfg, &message);
        dmarc_quarantine(&mut verdict, ctx.dmarc_quarantine);
        // The same rule for an archive under attachments.*_action = "quarantine": what
        // would be delivered is quarantined instead.
        dmarc_quarantine(&mut verdict, archive_quarantine);
        verdict_headers(&mut verdict, ctx.auth_header, thresholds.tag);
        rewrite_subject(&mut verdict, subject);
        Step::<Verdict>::Continue(verdict)
    };
    let mut verdict = match steps.await {
        ControlFlow::Break(verdict) | ControlFlow::Continue(verdict) => verdict,
    };
    // Here rather than in a step, so that no early end (a virus quarantined, or any
    // step added later) can pass a message on with the sender's forgeries.
    remove_forged(&mut verdict);
    verdict
}

/// Puts the removal of every field in `mb_core::message::FORGEABLE` (the sender's
/// Authentication-Results and X-Spam fields) first in the verdict's removals, for a
/// message that is delivered or kept: a quarantined one is stored as the verdict edits
/// it, so a release carries no forgery either. A refused message goes nowhere. Our own
/// fields are added on top by `verdict_headers`, and with_headers and the milter remove
/// only fields the message arrived with.
fn remove_forged(v: &mut Verdict) {
    use mb_core::message::FORGEABLE;
    if !matches!(v.action, Action::Accept | Action::Tag | Action::Quarantine) {
        return;
    }
    let others = std::mem::take(&mut v.remove_headers)
        .into_iter()
        .filter(|r| !FORGEABLE.iter().any(|f| f.eq_ignore_ascii_case(r)));
    v.remove_headers = FORGEABLE
        .iter()
        .map(|f| f.to_string())
        .chain(others)
        .collect();
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
    policies: &'a [Policy],
    /// The allow policy every recipient shares, once `apply_policy` has decided it
    /// applies: no spam scoring, though viruses, attachment rules and DMARC still apply.
    allowed: Option<&'a Policy>,
    /// How the envelope sender is authenticated, when it is (see `sender_authentication`).
    sender_authenticated: Option<String>,
    /// Every rule that fired, in the order the steps ran; the score is their sum.
    symbols: Vec<Symbol>,
    /// Sender authentication's scoring symbols, held until `apply_policy` knows whether
    /// the message is allow-listed (an allow-listed one does not score them).
    auth_symbols: Vec<Symbol>,
    /// Our Authentication-Results, when sender authentication ran.
    auth_header: Option<String>,
    /// Rspamd's action and proposed Subject, when it answered.
    rspamd: Option<(rspamd::RspamdAction, Option<String>)>,
    /// Why the author domain's DMARC policy quarantines the message, when it does.
    dmarc_quarantine: Option<String>,
}

fn policy_subject<'a>(req: &'a ScanRequest, cfg: &'a Config) -> policy::Subject<'a> {
    // Address patterns match `user+tag@` as `user@` when the full address does not match.
    let delimiter = match cfg.get("smtp.recipient_delimiter") {
        mb_core::Value::Text(d) => d.as_str(),
        _ => "",
    };
    policy::Subject {
        sender: &req.sender,
        recipients: &req.recipients,
        client_ip: req.client_ip,
        delimiter,
    }
}

fn policy_block(p: &Policy) -> Verdict {
    refuse(
        Action::Reject,
        POLICY_REFUSED,
        format!("Message refused by policy {}", p.name),
        Some(symbol("POLICY_BLOCK", 0.0, p.name.clone())),
    )
}

/// Policy, before any content is read: a message for which any recipient's policy
/// blocks is refused. Evaluated as if the sender were authenticated, a block found here
/// stands whatever authentication finds (an unauthenticated sender only loses allows);
/// a block hidden behind an allow that turns out not to apply is found by
/// `apply_policy`.
fn match_policy(cfg: &Config, req: &ScanRequest, policies: &[Policy]) -> Step {
    match policy::outcome(policies, &policy_subject(req, cfg), true).blocked() {
        Some(p) => ControlFlow::Break(policy_block(p)),
        None => ControlFlow::Continue(()),
    }
}

/// Policy, once the sender is known to be authenticated or not: the strictest outcome
/// among the recipients' policies (block > score > allow). A sender-based allow for an
/// unauthenticated sender is ignored with `POLICY_ALLOW_UNAUTHENTICATED`; an allow that
/// applies to every recipient skips the scoring of sender authentication and content
/// (which runs before this step only so that an allow can be checked against it: virus,
/// attachment and DMARC verdicts have already been applied). The thresholds are the
/// lowest among the scoring recipients' policies (the global ones for a recipient
/// without a policy).
fn apply_policy(ctx: &mut Context<'_>) -> Step<Thresholds> {
    let req = ctx.req;
    let outcome = policy::outcome(
        ctx.policies,
        &policy_subject(req, ctx.cfg),
        ctx.sender_authenticated.is_some(),
    );
    if let Some(p) = outcome.blocked() {
        return ControlFlow::Break(policy_block(p));
    }
    for p in outcome.ignored() {
        ctx.symbols.push(symbol(
            "POLICY_ALLOW_UNAUTHENTICATED",
            0.0,
            format!(
                "{}: sender {} is not authenticated (no SPF pass for its domain, no aligned DKIM pass)",
                p.name, req.sender
            ),
        ));
    }
    ctx.allowed = outcome.allowed();
    if ctx.allowed.is_none() {
        ctx.symbols.append(&mut ctx.auth_symbols);
    }
    ControlFlow::Continue(Thresholds::new(ctx.cfg, &outcome.scoring()))
}

/// Parse: what cannot be parsed as a mail message is refused, and so is what mb-smtpd
/// refuses while it reads DATA (`unsendable`), with its words: behind Postfix (content
/// filter, milter) the same message would otherwise be delivered, and the three ways a
/// site deploys the gateway would judge one message differently.
fn parse(raw: &[u8]) -> Step<Message<'_>> {
    if let Some(text) = unsendable(raw) {
        return ControlFlow::Break(refuse(Action::Reject, UNPARSABLE, text.into(), None));
    }
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

/// What RFC 5321 and 5322 forbid in a message and mb-smtpd's DATA phase refuses, in the
/// order it checks: a NUL byte (no mail software handles one alike; it truncates strings
/// in C programs, so checkers and clients would see different messages), then a line
/// longer than 998 characters (1000 with its CRLF, `mb_smtp::proto::MAX_TEXT_LINE`).
fn unsendable(raw: &[u8]) -> Option<&'static str> {
    if raw.contains(&0) {
        return Some("Error: message contains a NUL byte");
    }
    raw.split_inclusive(|b| *b == b'\n')
        .any(|line| line.len() > mb_smtp::proto::MAX_TEXT_LINE)
        .then_some("Error: message has a line longer than 998 characters")
}

/// Attachments: a blocked file name on any part, or a blocked type or size of an
/// attachment (or a blocked name inside an archive, nested ones included) is refused
/// whatever the score; so is an archive that cannot be checked (encrypted members, a
/// format that cannot be listed, past the limits) under `attachments.*_action = "reject"`.
/// Under `"quarantine"` the step goes on and hands back why the message is quarantined
/// in the end (antivirus still runs: a virus refuses it). Otherwise archives and disguised
/// file names (bidi controls, invisible characters) only score, and a refusal lists them
/// too.
fn attachments(ctx: &mut Context<'_>, message: &Message<'_>) -> Step<Option<String>> {
    let rules = AttachmentRules::from_config(ctx.cfg);
    // Archives are expanded here (up to `attachments.archive_max_size`): CPU work that
    // must not hold an async worker. A message without attachments has only its parts'
    // names to look at, and handing the worker's other tasks to another thread (a
    // wake-up and a switch per message) would cost more than the check itself.
    let check = || check_attachments(message, &rules).judge(&rules);
    let judged = if message.attachments.is_empty() {
        check()
    } else {
        crate::cpu_bound(check)
    };
    if let Some((text, why)) = judged.refusal {
        let mut v = refuse(Action::Reject, CONTENT_REFUSED, text, Some(why));
        v.score = judged.symbols.iter().map(|s| s.score).sum();
        v.symbols.extend(judged.symbols);
        return ControlFlow::Break(v);
    }
    ctx.symbols.extend(judged.symbols);
    ControlFlow::Continue(judged.quarantine)
}

/// Antivirus (when `clamav.enabled`): a virus is rejected or quarantined
/// (`clamav.virus_action`); clamd down tempfails the message, or under
/// `clamav.unavailable_action = "skip"` lets it on with a symbol. A message larger than
/// `clamav.max_size`, or than clamd's own StreamMaxLength, follows
/// `clamav.oversize_action`; it never passes without a symbol saying so.
async fn antivirus(ctx: &mut Context<'_>) -> Step {
    let cfg = ctx.cfg;
    if !cfg.bool("clamav.enabled") {
        return ControlFlow::Continue(());
    }
    let address = cfg.text("clamav.address");
    let timeout = cfg.duration("clamav.timeout");
    let max_size = usize::try_from(cfg.size("clamav.max_size")).unwrap_or(usize::MAX);
    let oversize = Oversize::from_config(cfg);
    let size = ctx.raw.len();
    if size > max_size && oversize != Oversize::ScanHead {
        tracing::warn!(id = %ctx.req.queue_id, size, max_size, action = ?oversize, "message larger than clamav.max_size; clamav.oversize_action decides");
        return oversized(
            ctx,
            oversize,
            format!(
                "the message ({size} bytes) is larger than the virus scanner's limit ({max_size} bytes)"
            ),
        );
    }
    let mut head = size.min(max_size);
    let mut halvings = 0;
    loop {
        match clamav::scan(&address, &ctx.raw[..head], timeout).await {
            Ok(clamav::Scan::Clean) => {
                if head < size {
                    let limit = if halvings == 0 {
                        "clamav.max_size"
                    } else {
                        "clamd's StreamMaxLength"
                    };
                    ctx.symbols.push(symbol(
                        "CLAMAV_PARTIAL",
                        0.1,
                        format!("first {head} of {size} bytes scanned ({limit})"),
                    ));
                }
                return ControlFlow::Continue(());
            }
            Ok(clamav::Scan::Infected(name)) => return infected(cfg, name),
            Ok(clamav::Scan::SizeLimitExceeded) => {
                tracing::warn!(id = %ctx.req.queue_id, sent = head, "clamd refused the stream as longer than its StreamMaxLength; set clamav.max_size to clamd's StreamMaxLength or less");
                if oversize == Oversize::ScanHead && halvings < HEAD_HALVINGS && head > 1 {
                    head /= 2;
                    halvings += 1;
                    continue;
                }
                return oversized(
                    ctx,
                    oversize,
                    format!(
                        "clamd refused {head} bytes of the message ({size} bytes) as larger than its limit"
                    ),
                );
            }
            Err(e) if cfg.text("clamav.unavailable_action") == "skip" => {
                tracing::warn!(cause = %e, id = %ctx.req.queue_id, "ClamAV unavailable; message not scanned for viruses");
                ctx.symbols
                    .push(symbol("CLAMAV_UNAVAILABLE", 0.0, e.to_string()));
                return ControlFlow::Continue(());
            }
            Err(e) => {
                tracing::warn!(cause = %e, id = %ctx.req.queue_id, "ClamAV unavailable; message tempfailed");
                return ControlFlow::Break(refuse(
                    Action::Tempfail,
                    SCANNER_DOWN,
                    "Virus scanner unavailable, try again later".into(),
                    None,
                ));
            }
        }
    }
}

/// A message refused for its size under `clamav.oversize_action = "reject"`: RFC 3463
/// 5.3.4 (message too big for system) rather than 554 5.7.1, because nothing was found
/// wrong with the content and a sender told "too big" knows what to change.
const TOO_BIG_TO_SCAN: (u16, EnhancedStatus) = (552, EnhancedStatus::TOO_BIG);

/// How often a head clamd refused is halved and sent again under `scan-head`: down to
/// an eighth, so a clamav.max_size above clamd's limit still scans the start of the
/// message instead of leaving it unscanned.
const HEAD_HALVINGS: u32 = 3;

/// `clamav.oversize_action`: what happens to a message larger than the scanner takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Oversize {
    /// Scan the first `clamav.max_size` bytes and add `CLAMAV_PARTIAL`.
    ScanHead,
    Tempfail,
    Reject,
    /// Pass it unscanned with `CLAMAV_UNSCANNED`.
    Accept,
}

impl Oversize {
    fn from_config(cfg: &Config) -> Oversize {
        match cfg.text("clamav.oversize_action").as_str() {
            "tempfail" => Oversize::Tempfail,
            "reject" => Oversize::Reject,
            "accept" => Oversize::Accept,
            _ => Oversize::ScanHead,
        }
    }
}

/// A virus: rejected, or quarantined under `clamav.virus_action = "quarantine"`.
fn infected(cfg: &Config, name: String) -> Step {
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

/// A message the scanner cannot take whole, by `action`; `why` says which limit. A
/// `scan-head` that clamd refused even at an eighth passes as unscanned: never silently,
/// and never tempfailed by default.
fn oversized(ctx: &mut Context<'_>, action: Oversize, why: String) -> Step {
    match action {
        Oversize::Tempfail => {
            tracing::warn!(id = %ctx.req.queue_id, why, "message too large for ClamAV tempfailed (clamav.oversize_action = tempfail)");
            ControlFlow::Break(refuse(
                Action::Tempfail,
                SCANNER_DOWN,
                format!("Message not scanned for viruses: {why}, try again later"),
                Some(symbol("CLAMAV_OVERSIZE", 0.0, why)),
            ))
        }
        Oversize::Reject => ControlFlow::Break(refuse(
            Action::Reject,
            TOO_BIG_TO_SCAN,
            format!("Message refused: {why}"),
            Some(symbol("CLAMAV_OVERSIZE", 0.0, why)),
        )),
        Oversize::Accept | Oversize::ScanHead => {
            tracing::warn!(id = %ctx.req.queue_id, why, "message too large for ClamAV passed unscanned");
            ctx.symbols.push(symbol("CLAMAV_UNSCANNED", 1.0, why));
            ControlFlow::Continue(())
        }
    }
}

/// Sender authentication (inbound mail): a message without an author (no From field, or
/// no address with a domain in it) scores NO_FROM, as DMARC has nothing to check; from a
/// known address, when `auth` is given, SPF/DKIM/DMARC/ARC and blocklist symbols, and our
/// Authentication-Results. A DMARC reject policy refuses the message, a quarantine policy
/// quarantines it whatever it scores (see `dmarc_quarantine`), allow policy or not; the
/// scoring symbols wait for `apply_policy`, as does whether the envelope sender is
/// authenticated (`Context::sender_authenticated`), which decides sender-based allows.
/// Outbound mail comes from our own networks or users, so its sender counts as
/// authenticated.
async fn sender_authentication(
    ctx: &mut Context<'_>,
    message: &Message<'_>,
    auth: Option<&crate::auth::Auth>,
) -> Step {
    let req = ctx.req;
    if req.direction != Direction::Inbound {
        ctx.sender_authenticated = Some("outbound: our own network or user".into());
        return ControlFlow::Continue(());
    }
    // With Rspamd answering, our header sanity (MISSING_FROM) does not run: without this
    // such mail could score nothing at all.
    if let Some(why) = no_author(message) {
        ctx.auth_symbols.push(symbol("NO_FROM", 3.0, why));
    }
    let (Some(auth), Some(ip)) = (auth, req.client_ip) else {
        return ControlFlow::Continue(());
    };
    let hostname = crate::hostname(ctx.cfg);
    let out = auth
        .check(ctx.cfg, &hostname, ip, &req.helo, &req.sender, ctx.raw)
        .await;
    // An allow policy never lifts the author domain's reject: it matched the envelope,
    // while DMARC says the From field is forged.
    if let Some(reason) = out.dmarc_reject {
        return ControlFlow::Break(refuse(
            Action::Reject,
            POLICY_REFUSED,
            reason,
            Some(symbol("DMARC_REJECT", 0.0, out.header)),
        ));
    }
    ctx.sender_authenticated = out.sender_authenticated(&req.sender).map(str::to_string);
    ctx.auth_symbols.extend(out.symbols);
    ctx.dmarc_quarantine = out.dmarc_quarantine;
    ctx.auth_header = Some(out.header);
    ControlFlow::Continue(())
}

/// Why a message has no author DMARC could check, if it has none.
fn no_author(message: &Message<'_>) -> Option<&'static str> {
    if !message.headers().iter().any(|h| h.name == HeaderName::From) {
        return Some("no From field");
    }
    let has_domain = message.from().is_some_and(|from| {
        from.iter().any(|a| {
            a.address()
                .and_then(|a| a.rsplit_once('@'))
                .is_some_and(|(_, d)| !d.trim_end_matches('.').is_empty())
        })
    });
    (!has_domain).then_some("no address with a domain in From")
}

/// A failing DMARC quarantine policy (enforced): a message the score would deliver is
/// quarantined instead, as the author domain asks; one the score already quarantines or
/// refuses stays so.
fn dmarc_quarantine(v: &mut Verdict, reason: Option<String>) {
    if let Some(reason) = reason
        && matches!(v.action, Action::Accept | Action::Tag)
    {
        v.action = Action::Quarantine;
        v.refusal = Refusal {
            code: None,
            status: None,
            text: reason,
        };
    }
}

/// Content scoring: an allow-listed message scores nothing (`POLICY_ALLOW`); any other
/// is scored by Rspamd (when `rspamd.enabled`), or by our header sanity when Rspamd is
/// off or did not answer.
async fn content_scoring(ctx: &mut Context<'_>, message: &Message<'_>) -> Step {
    if let Some(p) = ctx.allowed {
        let detail = match &ctx.sender_authenticated {
            Some(how) if p.needs_authentication(&policy_subject(ctx.req, ctx.cfg)) => {
                format!("{} ({how})", p.name)
            }
            _ => p.name.clone(),
        };
        ctx.symbols.push(symbol("POLICY_ALLOW", 0.0, detail));
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

/// Rspamd: its scoring symbols and a summary, and its action for `rspamd_action`;
/// whether it answered. Down, it tempfails the message under
/// `rspamd.unavailable_action = "tempfail"`, else adds a symbol.
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
            ctx.rspamd = Some((c.action, c.subject));
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

/// The reply of Rspamd's greylist and soft reject actions.
const RSPAMD_DEFERRED: (u16, EnhancedStatus) = (451, EnhancedStatus::POLICY_TEMPFAIL);

/// Rspamd's action, applied to the verdict of our thresholds (whose score already
/// includes Rspamd's): the stricter of the two wins, in the order accept < tag <
/// quarantine < tempfail < reject. A deferral outranks a quarantine so that Rspamd's
/// greylisting keeps working for high scores (the retry is then quarantined). Returns
/// the Subject to write when Rspamd asked for its rewriting.
fn rspamd_action(
    v: &mut Verdict,
    rspamd: Option<(rspamd::RspamdAction, Option<String>)>,
    cfg: &Config,
    message: &Message<'_>,
) -> Option<String> {
    use rspamd::RspamdAction as R;
    let (action, proposed) = rspamd?;
    let score = v.score;
    let theirs = match &action {
        R::NoAction | R::Other(_) => return None,
        R::AddHeader | R::RewriteSubject => decide(Action::Tag, String::new()),
        // Never dropped on a scanner's word: a discard is kept where it can be looked at.
        R::Quarantine | R::Discard => decide(
            Action::Quarantine,
            format!("Rspamd's action {action} (score {score:.1})"),
        ),
        R::Greylist | R::SoftReject => refuse(
            Action::Tempfail,
            RSPAMD_DEFERRED,
            format!("Message deferred by Rspamd ({action}), try again later"),
            None,
        ),
        R::Reject => refuse(
            Action::Reject,
            POLICY_REFUSED,
            format!("Message refused as spam by Rspamd (score {score:.1})"),
            None,
        ),
    };
    if severity(theirs.action) > severity(v.action) {
        v.action = theirs.action;
        v.refusal = theirs.refusal;
    }
    (action == R::RewriteSubject).then(|| match proposed {
        Some(subject) => header_text(&subject),
        None => tagged_subject(&cfg.text("spam.subject_tag"), message),
    })
}

/// How strict an outcome is, for choosing between ours and Rspamd's.
fn severity(action: Action) -> u8 {
    match action {
        Action::Accept => 0,
        Action::Tag => 1,
        Action::Quarantine | Action::Discard => 2,
        Action::Tempfail => 3,
        Action::Reject => 4,
    }
}

/// The message's Subject as it was written (encoded words kept, folds undone) behind
/// `tag`; just `tag` for a message without one.
fn tagged_subject(tag: &str, message: &Message<'_>) -> String {
    let original = message
        .header_raw(HeaderName::Subject)
        .map(|raw| raw.replace("\r\n", "").replace('\n', ""))
        .unwrap_or_default();
    let original = original.trim();
    let tag = tag.trim();
    match (tag.is_empty(), original.is_empty()) {
        (_, true) => tag.to_string(),
        (true, false) => original.to_string(),
        (false, false) => format!("{tag} {original}"),
    }
}

/// A header value from Rspamd's text: control characters dropped (it cannot start a
/// field of its own), and RFC 2047 encoded (UTF-8, Q) when it is not ASCII. Rspamd 3.4
/// sends encoded words already; the text may still be raw UTF-8 from other versions.
fn header_text(text: &str) -> String {
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    let text = text.trim();
    if text.is_ascii() {
        return text.to_string();
    }
    // Encoded words of at most 75 characters (RFC 2047 2), split between characters.
    let mut words = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        let mut buf = [0; 4];
        let mut encoded = String::new();
        for b in c.encode_utf8(&mut buf).bytes() {
            match b {
                b' ' => encoded.push('_'),
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'!' | b'*' | b'+' | b'-' | b'/' => {
                    encoded.push(char::from(b));
                }
                _ => {
                    let _ = write!(encoded, "={b:02X}");
                }
            }
        }
        if "=?UTF-8?Q?".len() + word.len() + encoded.len() + "?=".len() > 75 {
            words.push(format!("=?UTF-8?Q?{word}?="));
            word.clear();
        }
        word.push_str(&encoded);
    }
    words.push(format!("=?UTF-8?Q?{word}?="));
    words.join(" ")
}

/// Rspamd's rewrite subject, as a header change of the verdict (the Subject removed and
/// the new one added), so that every mode applies it the way it applies our other
/// headers. Not for a refused message.
fn rewrite_subject(v: &mut Verdict, subject: Option<String>) {
    let Some(subject) = subject else { return };
    if matches!(v.action, Action::Reject | Action::Tempfail) {
        return;
    }
    v.remove_headers.push("Subject".into());
    v.add_headers.push(("Subject".into(), subject));
}

/// The spam score thresholds: a matching score policy's own, else `spam.threshold.*`;
/// with several recipients, the lowest of each among their policies (the strictest).
struct Thresholds {
    tag: f64,
    quarantine: f64,
    reject: f64,
}

impl Thresholds {
    fn new(cfg: &Config, scoring: &[Option<&Policy>]) -> Thresholds {
        let lowest = |own: fn(&Policy) -> Option<f64>, key: &str| {
            let global = cfg.float(key);
            let each = scoring.iter().map(|p| {
                p.filter(|p| p.action == policy::Action::Score)
                    .and_then(own)
                    .unwrap_or(global)
            });
            each.reduce(f64::min).unwrap_or(global)
        };
        Thresholds {
            tag: lowest(|p| p.tag, "spam.threshold.tag"),
            quarantine: lowest(|p| p.quarantine, "spam.threshold.quarantine"),
            reject: lowest(|p| p.reject, "spam.threshold.reject"),
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
/// fields and, when sender authentication ran, our Authentication-Results are added.
/// The copies the message arrived with are removed by `remove_forged`, on every path.
fn verdict_headers(v: &mut Verdict, auth_header: Option<String>, tag: f64) {
    if matches!(v.action, Action::Reject | Action::Tempfail) {
        return;
    }
    let spam = v.action != Action::Accept;
    let score = v.score;
    if let Some(h) = auth_header {
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

    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn what_mb_smtpd_refuses_while_reading_data_is_refused_with_its_words() {
        assert_eq!(
            unsendable(b"Subject: x\r\n\r\na\0b\r\n"),
            Some("Error: message contains a NUL byte")
        );
        // 998 characters and the CRLF are allowed; one more is not.
        let at_limit = format!("Subject: {}\r\n\r\nx\r\n", "y".repeat(989));
        assert_eq!(unsendable(at_limit.as_bytes()), None);
        let over = format!("Subject: x\r\n\r\n{}\r\n", "y".repeat(999));
        assert_eq!(
            unsendable(over.as_bytes()),
            Some("Error: message has a line longer than 998 characters")
        );
        let ControlFlow::Break(v) = parse(over.as_bytes()) else {
            panic!("parsed a message with a line over 998 characters");
        };
        assert_eq!(
            (v.action, v.refusal.code, v.refusal.status),
            (Action::Reject, Some(554), Some(EnhancedStatus::BAD_CONTENT))
        );
    }

    #[test]
    fn a_from_field_without_an_address_is_a_missing_author() {
        let names = |raw: &str| -> Vec<String> {
            let m = MessageParser::default().parse(raw.as_bytes()).unwrap();
            header_symbols(&m).into_iter().map(|s| s.name).collect()
        };
        let rest = "To: b@c.example\r\nSubject: s\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
                    Message-ID: <m@c.example>\r\n\r\nbody\r\n";
        assert_eq!(names(&format!("From:\r\n{rest}")), ["MISSING_FROM"]);
        assert_eq!(names(&format!("From: nobody\r\n{rest}")), ["MISSING_FROM"]);
        assert_eq!(names(rest), ["MISSING_FROM"]);
        assert!(names(&format!("From: a@c.example\r\n{rest}")).is_empty());
    }

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
                EnhancedStatus::POLICY_TEMPFAIL,
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

    /// A fake Rspamd on loopback answering every request with `body` (the real one takes
    /// half a minute to start; tests/e2e/filter.rs drives it).
    async fn fake_rspamd(body: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut chunk = [0; 4096];
                // The whole request (headers and Content-Length bytes), then the answer.
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    request.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&request);
                    let complete = text.split_once("\r\n\r\n").is_some_and(|(head, rest)| {
                        // Field names are case-insensitive (hyper writes them lowercase).
                        head.lines()
                            .filter_map(|l| l.split_once(": "))
                            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                            .map(|(_, n)| n)
                            .and_then(|n| n.parse::<usize>().ok())
                            .is_some_and(|n| rest.len() >= n)
                    });
                    if n == 0 || complete {
                        break;
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        url
    }

    /// The verdict for `message` when Rspamd answers `action` (with `subject`, when
    /// given) and symbols worth `score`, under `extra` configuration.
    async fn with_rspamd(
        action: &str,
        subject: Option<&str>,
        score: f64,
        extra: &str,
        message: &[u8],
    ) -> Verdict {
        let subject = subject.map_or(String::new(), |s| format!(r#""subject":"{s}","#));
        let body = format!(
            r#"{{"is_skipped":false,"score":{score},"required_score":15.0,"action":"{action}",{subject}"messages":{{"smtp_message":"forced"}},"symbols":{{"TEST_SCORE":{{"name":"TEST_SCORE","score":{score},"metric_score":{score}}}}},"message-id":"1@b.example"}}"#
        );
        let url = fake_rspamd(body).await;
        let cfg = Config::from_toml_str(
            &format!("[rspamd]\nenabled = true\nurl = \"{url}\"\ntimeout = \"5s\"\n{extra}"),
            "test",
        )
        .unwrap();
        scan(&cfg, &ScanRequest::default(), message, None, &[]).await
    }

    /// The Subject a verdict writes, if it rewrites it.
    fn new_subject(v: &Verdict) -> Option<&str> {
        let added = v.add_headers.iter().find(|(n, _)| n == "Subject");
        assert_eq!(
            added.is_some(),
            v.remove_headers.iter().any(|n| n == "Subject"),
            "a new Subject replaces the old: {v:?}"
        );
        added.map(|(_, s)| s.as_str())
    }

    #[tokio::test]
    async fn rspamds_action_is_honoured() {
        let refusal = |v: &Verdict| (v.action, v.refusal.code, v.refusal.status);
        let v = with_rspamd("no action", None, 1.0, "", CLEAN).await;
        assert_eq!((v.action, new_subject(&v)), (Action::Accept, None), "{v:?}");
        for deferral in ["greylist", "soft reject"] {
            let v = with_rspamd(deferral, None, 1.0, "", CLEAN).await;
            assert_eq!(
                refusal(&v),
                (
                    Action::Tempfail,
                    Some(451),
                    Some(EnhancedStatus::POLICY_TEMPFAIL)
                ),
                "{v:?}"
            );
            assert_eq!(
                v.refusal.text,
                format!("Message deferred by Rspamd ({deferral}), try again later")
            );
            assert!(v.add_headers.is_empty(), "{v:?}");
        }
        let v = with_rspamd("reject", None, 1.0, "", CLEAN).await;
        assert_eq!(
            refusal(&v),
            (
                Action::Reject,
                Some(550),
                Some(EnhancedStatus::POLICY_REJECT)
            ),
            "{v:?}"
        );
        assert_eq!(
            v.refusal.text,
            "Message refused as spam by Rspamd (score 1.0)"
        );
        let v = with_rspamd("add header", None, 1.0, "", CLEAN).await;
        assert_eq!((v.action, new_subject(&v)), (Action::Tag, None), "{v:?}");
        assert!(
            v.add_headers.contains(&("X-Spam".into(), "Yes".into())),
            "{v:?}"
        );
        // Rspamd's own Subject when it proposes one, else ours behind spam.subject_tag.
        let v = with_rspamd("rewrite subject", Some("*** SPAM *** hi"), 1.0, "", CLEAN).await;
        assert_eq!(v.action, Action::Tag, "{v:?}");
        assert_eq!(new_subject(&v), Some("*** SPAM *** hi"));
        let v = with_rspamd("rewrite subject", None, 1.0, "", CLEAN).await;
        assert_eq!(new_subject(&v), Some("[SPAM] hi"));
        let folded = b"From: a@b.example\r\nSubject: =?UTF-8?Q?gr=C3=BC=C3=9Fe?=\r\n and more\r\n\r\nhello\r\n";
        let v = with_rspamd(
            "rewrite subject",
            None,
            1.0,
            "[spam]\nsubject_tag = \"{Spam?}\"\n",
            folded,
        )
        .await;
        assert_eq!(
            new_subject(&v),
            Some("{Spam?} =?UTF-8?Q?gr=C3=BC=C3=9Fe?= and more")
        );
        let v = with_rspamd("quarantine", None, 1.0, "", CLEAN).await;
        assert_eq!(v.action, Action::Quarantine, "{v:?}");
        let v = with_rspamd("discard", None, 1.0, "", CLEAN).await;
        assert_eq!(v.action, Action::Quarantine, "never dropped: {v:?}");
        let v = with_rspamd("some custom action", None, 1.0, "", CLEAN).await;
        assert_eq!(v.action, Action::Accept, "{v:?}");
    }

    /// Rspamd's score joins ours and our thresholds still apply: the stricter outcome
    /// wins.
    #[tokio::test]
    async fn the_stricter_of_rspamds_action_and_our_thresholds_wins() {
        // Above our quarantine threshold (6.0): a mere tag from Rspamd is not enough.
        let v = with_rspamd("add header", None, 7.0, "", CLEAN).await;
        assert_eq!((v.action, v.score), (Action::Quarantine, 7.0), "{v:?}");
        // A quarantined message keeps the rewritten Subject for its release.
        let v = with_rspamd("rewrite subject", None, 7.0, "", CLEAN).await;
        assert_eq!(v.action, Action::Quarantine, "{v:?}");
        assert_eq!(new_subject(&v), Some("[SPAM] hi"));
        // Above our reject threshold (20.0): a greylist does not let it through later.
        let v = with_rspamd("greylist", None, 25.0, "", CLEAN).await;
        assert_eq!(
            (v.action, v.refusal.code),
            (Action::Reject, Some(550)),
            "{v:?}"
        );
        assert_eq!(v.refusal.text, "Message refused as spam (score 25.0)");
        // A deferral outranks our quarantine, so greylisting still works for high scores.
        let v = with_rspamd("soft reject", None, 7.0, "", CLEAN).await;
        assert_eq!(
            (v.action, v.refusal.code),
            (Action::Tempfail, Some(451)),
            "{v:?}"
        );
        // Rspamd's reject whatever we scored.
        let v = with_rspamd("reject", None, -5.0, "", CLEAN).await;
        assert_eq!(v.action, Action::Reject, "{v:?}");
    }

    #[test]
    fn rspamds_subject_becomes_a_header_value() {
        assert_eq!(
            header_text(" ***SPAM*** hi\r\nBcc: x@y "),
            "***SPAM*** hiBcc: x@y"
        );
        assert_eq!(header_text("Hello wörld"), "=?UTF-8?Q?Hello_w=C3=B6rld?=");
        let long = header_text(&"é".repeat(40));
        assert!(long.split(' ').count() > 1, "{long}");
        assert!(
            long.split(' ')
                .all(|w| w.len() <= 75 && w.starts_with("=?UTF-8?Q?")),
            "{long}"
        );
    }

    /// A clamd stand-in on loopback that keeps clamd's rule for StreamMaxLength (a chunk
    /// that would take the stream past `limit` is answered "size limit exceeded" at once
    /// and the connection closed, the rest unread) and finds any stream holding "VIRUS".
    /// Returns its address and, per stream, the bytes offered and whether it refused them.
    async fn fake_clamd(limit: usize) -> (String, Arc<Mutex<Vec<(usize, bool)>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let streams = Arc::new(Mutex::new(Vec::new()));
        let seen = streams.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut command = [0u8; 10];
                s.read_exact(&mut command).await.unwrap();
                assert_eq!(&command, b"zINSTREAM\0");
                let mut got = Vec::new();
                let reply: &[u8] = loop {
                    let mut len = [0u8; 4];
                    s.read_exact(&mut len).await.unwrap();
                    let n = u32::from_be_bytes(len) as usize;
                    if n == 0 {
                        seen.lock().unwrap().push((got.len(), false));
                        break if got.windows(5).any(|w| w == b"VIRUS") {
                            b"stream: Fake.Virus FOUND\0"
                        } else {
                            b"stream: OK\0"
                        };
                    }
                    if got.len() + n > limit {
                        seen.lock().unwrap().push((got.len() + n, true));
                        break b"INSTREAM size limit exceeded. ERROR\0";
                    }
                    let mut chunk = vec![0u8; n];
                    s.read_exact(&mut chunk).await.unwrap();
                    got.extend(chunk);
                };
                let _ = s.write_all(reply).await;
            }
        });
        (address, streams)
    }

    /// CLEAN with a body that makes the message `size` bytes long, "VIRUS" starting at
    /// byte `virus_at` if given.
    fn message_of(size: usize, virus_at: Option<usize>) -> Vec<u8> {
        let mut m = CLEAN.to_vec();
        // Lines of 80 characters: one longer than 998 would be refused before any scan.
        let fill =
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        while m.len() < size {
            let n = fill.len().min(size - m.len());
            m.extend_from_slice(&fill[..n]);
        }
        m.truncate(size);
        if let Some(at) = virus_at {
            m[at..at + 5].copy_from_slice(b"VIRUS");
        }
        m
    }

    /// Scans `message` with a fake clamd whose StreamMaxLength is `clamd_limit`, under
    /// the `[clamav]` settings `extra`; returns the verdict and the streams clamd saw.
    async fn check(
        clamd_limit: usize,
        extra: &str,
        message: &[u8],
    ) -> (Verdict, Vec<(usize, bool)>) {
        let (address, streams) = fake_clamd(clamd_limit).await;
        let cfg = Config::from_toml_str(
            &format!(
                "[clamav]\nenabled = true\naddress = \"{address}\"\ntimeout = \"5s\"\n{extra}"
            ),
            "test",
        )
        .unwrap();
        let v = scan(&cfg, &ScanRequest::default(), message, None, &[]).await;
        let seen = streams.lock().unwrap().clone();
        (v, seen)
    }

    fn detail<'v>(v: &'v Verdict, name: &str) -> Option<&'v str> {
        v.symbols
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.detail.as_str())
    }

    #[tokio::test]
    async fn scan_head_streams_exactly_max_size_bytes() {
        const MAX: &str = "max_size = \"4K\"\n";
        // Larger than clamav.max_size: exactly 4096 bytes go to clamd, and a symbol says so.
        let (v, seen) = check(usize::MAX, MAX, &message_of(10_000, None)).await;
        assert_eq!(seen, [(4096, false)]);
        assert_eq!(v.action, Action::Accept);
        assert_eq!(
            detail(&v, "CLAMAV_PARTIAL"),
            Some("first 4096 of 10000 bytes scanned (clamav.max_size)")
        );
        assert!(
            v.add_headers
                .iter()
                .any(|(n, h)| n == "X-Spam-Status" && h.contains("CLAMAV_PARTIAL(0.1)"))
        );
        // A virus in the head is found; one after the cut is not sent at all.
        let (v, _) = check(usize::MAX, MAX, &message_of(10_000, Some(4091))).await;
        assert_eq!(v.action, Action::Reject);
        assert_eq!(v.refusal.code, Some(554));
        let (v, seen) = check(usize::MAX, MAX, &message_of(10_000, Some(4092))).await;
        assert_eq!(seen, [(4096, false)]);
        assert_eq!(v.action, Action::Accept);
        // At or under the limit the whole message goes, without a symbol.
        let (v, seen) = check(usize::MAX, MAX, &message_of(4096, None)).await;
        assert_eq!(seen, [(4096, false)]);
        assert_eq!(detail(&v, "CLAMAV_PARTIAL"), None);
        // More than one INSTREAM chunk (64 KiB) is cut at the exact byte too.
        let (_, seen) = check(
            usize::MAX,
            "max_size = \"100001\"\n",
            &message_of(300_000, None),
        )
        .await;
        assert_eq!(seen, [(100_001, false)]);
    }

    #[tokio::test]
    async fn a_message_over_max_size_follows_oversize_action() {
        let message = message_of(10_000, None);
        let too_big =
            "the message (10000 bytes) is larger than the virus scanner's limit (4096 bytes)";
        let (v, seen) = check(
            usize::MAX,
            "max_size = \"4K\"\noversize_action = \"tempfail\"\n",
            &message,
        )
        .await;
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(v.action, Action::Tempfail);
        assert_eq!(
            (v.refusal.code, v.refusal.status),
            (Some(451), Some(EnhancedStatus::POLICY_TEMPFAIL))
        );
        assert_eq!(
            v.refusal.text,
            format!("Message not scanned for viruses: {too_big}, try again later")
        );
        let (v, seen) = check(
            usize::MAX,
            "max_size = \"4K\"\noversize_action = \"reject\"\n",
            &message,
        )
        .await;
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(
            v,
            Verdict {
                symbols: vec![symbol("CLAMAV_OVERSIZE", 0.0, too_big)],
                ..Verdict::refuse(
                    Action::Reject,
                    552,
                    EnhancedStatus::TOO_BIG,
                    &format!("Message refused: {too_big}")
                )
            }
        );
        let (v, seen) = check(
            usize::MAX,
            "max_size = \"4K\"\noversize_action = \"accept\"\n",
            &message,
        )
        .await;
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(v.action, Action::Accept);
        assert_eq!(detail(&v, "CLAMAV_UNSCANNED"), Some(too_big));
    }

    /// clamd's own limit below clamav.max_size: its refusal is the message's size, not
    /// clamd being down.
    #[tokio::test]
    async fn clamds_size_limit_follows_oversize_action() {
        let message = message_of(10_000, Some(100));
        // scan-head halves the head until clamd takes it, and finds the virus.
        let (v, seen) = check(3000, "", &message).await;
        assert_eq!(seen, [(10_000, true), (5000, true), (2500, false)]);
        assert_eq!(v.action, Action::Reject);
        assert_eq!(v.refusal.code, Some(554));
        let (v, _) = check(3000, "", &message_of(10_000, None)).await;
        assert_eq!(
            detail(&v, "CLAMAV_PARTIAL"),
            Some("first 2500 of 10000 bytes scanned (clamd's StreamMaxLength)")
        );
        // Refused even at an eighth: passed on, never silently.
        let (v, seen) = check(1000, "", &message).await;
        assert_eq!(
            seen,
            [(10_000, true), (5000, true), (2500, true), (1250, true)]
        );
        assert_eq!(v.action, Action::Accept);
        assert_eq!(
            detail(&v, "CLAMAV_UNSCANNED"),
            Some("clamd refused 1250 bytes of the message (10000 bytes) as larger than its limit")
        );
        let refused =
            "clamd refused 10000 bytes of the message (10000 bytes) as larger than its limit";
        for (action, code) in [
            ("tempfail", Some(451)),
            ("reject", Some(552)),
            ("accept", None),
        ] {
            let (v, seen) =
                check(3000, &format!("oversize_action = \"{action}\"\n"), &message).await;
            assert_eq!(seen, [(10_000, true)], "{action}");
            assert_eq!(v.refusal.code, code, "{action}");
            let name = if code.is_some() {
                "CLAMAV_OVERSIZE"
            } else {
                "CLAMAV_UNSCANNED"
            };
            assert_eq!(detail(&v, name), Some(refused), "{action}: {v:?}");
        }
    }

    /// The sender's forgeries go on every path that keeps the message, the virus
    /// quarantine (an early end of the scan) included, so a release does not bring them
    /// back; a refused message is not edited.
    #[tokio::test]
    async fn forged_fields_are_removed_on_every_path_that_keeps_the_message() {
        use mb_core::message::FORGEABLE;
        let forged =
            b"Authentication-Results : gw.served.test; dkim=pass; spf=pass; dmarc=pass\r\n\
                       X-Spam-Flag: NO\r\nFrom: a@b.example\r\nSubject: hi\r\n\r\nVIRUS\r\n";
        let (v, _) = check(usize::MAX, "virus_action = \"quarantine\"\n", forged).await;
        assert_eq!(v.action, Action::Quarantine, "{v:?}");
        assert_eq!(v.remove_headers, FORGEABLE);
        let stored = mb_core::message::with_headers(forged, &v.add_headers, &v.remove_headers);
        assert_eq!(
            String::from_utf8_lossy(&stored),
            "From: a@b.example\r\nSubject: hi\r\n\r\nVIRUS\r\n"
        );
        let (v, _) = check(usize::MAX, "", forged).await;
        assert_eq!(v.action, Action::Reject, "{v:?}");
        assert!(v.remove_headers.is_empty(), "{v:?}");
        // Removals of the verdict's own (a rewritten Subject) come after, once each.
        let mut v = decide(Action::Tag, String::new());
        v.remove_headers = vec!["Subject".into(), "x-spam".into()];
        remove_forged(&mut v);
        assert_eq!(v.remove_headers[..FORGEABLE.len()], *FORGEABLE);
        assert_eq!(v.remove_headers[FORGEABLE.len()..], ["Subject"]);
    }
}
