//! Quarantine digests and the users' portal logins that are not web accounts
//! (migration 0017): one message per recipient listing what was quarantined for it
//! since its last digest, injected into mb-smtpd's queue through its reinjection
//! listener; the links those messages carry (signed, expiring, single-use); the portal
//! sessions of an SMTP AUTH login or a digest's portal link; and the scheduler that
//! sends the digests on `quarantine.digest.schedule`.
//!
//! A link token is `ID.MAC`: `ID` names a row of `digest_links`, `MAC` is an
//! HMAC-SHA-256 (key in `paths.data_dir/digest-link.key`, outside the database) over the
//! row's action, message, recipient and expiry. A token is good only for what it was
//! made for, until it expires, and once: using it sets `used_at` in the same statement
//! that checks it was unset, so two POSTs racing release one message once.
//!
//! Portal sessions live in `web_sessions` beside the web accounts' ones, under an
//! account name no web account can have (it holds a `:`): `smtp:LOGIN` for an SMTP AUTH
//! login, `link:ADDRESS` for a portal link. [`portal_principal`] says who they are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use mb_core::quarantine::Entry;
use mb_core::schedule::Schedule;
use mb_proto::v1::digest_server::{Digest, DigestServer};
use mb_proto::v1::quarantine_server::Quarantine;
use mb_proto::v1::{
    DigestLink, DigestLinkRequest, DigestLinkUsed, DigestSendRequest, DigestSendResponse,
    PortalAuditRequest, PortalAuditResponse, PortalLoginRequest, QuarantineId, WebLoginOutcome,
    WebLoginResponse, WebPrincipal, WebRole,
};
use mb_runtime::control::DaemonInfo;
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::quarantine::wire;
use mb_runtime::uds::{Caller, caller};
use sqlx::Row;
use tonic::{Request, Response, Status};

use crate::db::{AuditLine, Db, DbError};
use crate::quarantine::QuarantineService;
use crate::store::Store;
use crate::users::verify_password;

/// The key file beside the database.
pub const KEY_FILE: &str = "digest-link.key";
/// Link actions.
pub const RELEASE: &str = "release";
pub const PORTAL: &str = "portal";
/// How often the scheduler looks at the clock.
const TICK: Duration = Duration::from_secs(20);
/// The most messages one digest lists (the portal link shows the rest).
const MAX_LISTED: usize = 200;

/// The service, for `lib.rs` to register on the local socket.
pub fn server<G: tonic::service::Interceptor>(
    store: Arc<Store>,
    info: Arc<DaemonInfo>,
    guard: G,
) -> tonic::service::interceptor::InterceptedService<DigestServer<DigestService>, G> {
    tonic::service::interceptor::InterceptedService::new(
        DigestServer::new(DigestService::new(store, info)),
        guard,
    )
}

/// What can go wrong with the link key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or create the digest link key {}: {cause}", path.display())]
    File {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the digest link key {} is not 64 hexadecimal digits: remove it (links already sent stop working) and restart mb-rpcd", path.display())]
    Bad { path: PathBuf },
    #[error("no random numbers for the digest link key")]
    Random,
}

/// A link as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRecord {
    pub id: String,
    pub action: String,
    pub quarantine_id: String,
    pub recipient: String,
    pub expires_at: i64,
    pub used_at: i64,
}

pub struct DigestService {
    store: Arc<Store>,
    info: Arc<DaemonInfo>,
    key: LinkKey,
}

/// The HMAC key, read (or made) at first use.
struct LinkKey {
    path: PathBuf,
    key: Mutex<Option<[u8; 32]>>,
}

impl LinkKey {
    fn get(&self) -> Result<hmac::Key, KeyError> {
        let mut slot = self
            .key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bytes = match *slot {
            Some(k) => k,
            None => {
                let k = load_or_create_key(&self.path)?;
                *slot = Some(k);
                k
            }
        };
        Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
    }
}

impl DigestService {
    pub fn new(store: Arc<Store>, info: Arc<DaemonInfo>) -> DigestService {
        let path = store.effective().path("paths.data_dir").join(KEY_FILE);
        DigestService {
            store,
            info,
            key: LinkKey {
                path,
                key: Mutex::new(None),
            },
        }
    }

    fn db(&self) -> &Db {
        &self.store.db
    }

    /// The link a token stands for, if it is good now (known, untampered, unexpired,
    /// unused).
    async fn valid_link(&self, token: &str) -> Result<LinkRecord, Status> {
        let gone = || {
            Status::not_found(
                "this link is not valid: it may have expired or been used already (open the quarantine portal to see what is still there)",
            )
        };
        let (id, mac) = token.trim().split_once('.').ok_or_else(gone)?;
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(gone());
        }
        let mac = unhex(mac).ok_or_else(gone)?;
        let link = self
            .db()
            .digest_link(id)
            .await
            .map_err(db_status)?
            .ok_or_else(gone)?;
        let key = self.key.get().map_err(key_status)?;
        hmac::verify(&key, signed_text(&link).as_bytes(), &mac).map_err(|_| {
            tracing::warn!(link = %id, "a digest link with a wrong signature was refused");
            gone()
        })?;
        if link.used_at != 0 || link.expires_at <= now() {
            return Err(gone());
        }
        Ok(link)
    }

    /// A new link for `action` on `quarantine_id` to `recipient`, as a token.
    async fn new_link(
        &self,
        action: &str,
        quarantine_id: &str,
        recipient: &str,
        expires_at: i64,
    ) -> Result<String, Status> {
        let link = LinkRecord {
            id: hex(&random::<16>()?),
            action: action.into(),
            quarantine_id: quarantine_id.into(),
            recipient: recipient.into(),
            expires_at,
            used_at: 0,
        };
        let key = self.key.get().map_err(key_status)?;
        let mac = hmac::sign(&key, signed_text(&link).as_bytes());
        self.db()
            .add_digest_link(&link, now())
            .await
            .map_err(db_status)?;
        Ok(format!("{}.{}", link.id, hex(mac.as_ref())))
    }

    /// A session in `web_sessions` for a portal account (`smtp:LOGIN`, `link:ADDRESS`).
    async fn portal_session(
        &self,
        account: &str,
        ip: &str,
    ) -> Result<(String, String, i64), Status> {
        let at = now();
        let lifetime = i64::try_from(
            self.store
                .effective()
                .duration("web.session_lifetime")
                .as_secs(),
        )
        .unwrap_or(i64::MAX)
        .max(60);
        let id = hex(&random::<32>()?);
        let csrf = hex(&random::<32>()?);
        let expires = at.saturating_add(lifetime);
        self.db()
            .create_web_session(&session_digest(&id), account, &csrf, ip, at, expires)
            .await
            .map_err(db_status)?;
        Ok((id, csrf, expires))
    }

    /// Sends the digests: to every recipient with mail quarantined since its last one,
    /// or to `to` only. Returns the recipients served and the messages listed.
    pub async fn send(&self, to: Option<&str>, actor: &str) -> Result<(Vec<String>, u32), Status> {
        let cfg = self.store.effective();
        let mut domains: Vec<String> = cfg
            .list("quarantine.digest.domains")
            .into_iter()
            .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
            .collect();
        if domains.is_empty() {
            domains = cfg
                .list("smtp.domains")
                .into_iter()
                .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
                .collect();
        }
        let to = to.map(|t| t.trim().to_ascii_lowercase());
        let listed = self.db().digest_listed().await.map_err(db_status)?;
        let entries = self.db().all_quarantine().await.map_err(db_status)?;
        let due = pending(&entries, &listed, &domains, to.as_deref());
        let lifetime = i64::try_from(cfg.duration("quarantine.digest.link_lifetime").as_secs())
            .unwrap_or(7 * 86_400);
        let base = base_url(&cfg);
        let hostname = match cfg.text("smtp.hostname") {
            h if h.is_empty() => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
            h => h,
        };
        let hop = format!(
            "{}:{}",
            cfg.text("network.reinject.listen"),
            cfg.port("network.reinject.port")
        );
        let mut sent = Vec::new();
        let mut count = 0u32;
        let mut failures = Vec::new();
        for (recipient, list) in due {
            let expires = now() + lifetime;
            let mut lines = Vec::new();
            for e in list.iter().take(MAX_LISTED) {
                let token = self.new_link(RELEASE, &e.id, &recipient, expires).await?;
                lines.push(Line {
                    entry: e,
                    link: format!("{base}/ui/digest/{token}"),
                });
            }
            let portal = self.new_link(PORTAL, "", &recipient, expires).await?;
            let portal = format!("{base}/ui/digest/{portal}");
            let message = compose(&recipient, &hostname, &lines, list.len(), &portal)
                .map_err(|e| Status::internal(format!("cannot build a digest: {e}")))?;
            let newest = list.iter().map(|e| e.at_unix_ms).max().unwrap_or(0);
            let outcome = mb_smtp::client::reinject(
                &hop,
                &hostname,
                "",
                std::slice::from_ref(&recipient),
                &message,
                Duration::from_secs(60),
            )
            .await;
            match outcome {
                Ok(o) if o.iter().all(|o| o.response.is_positive()) => {
                    self.db()
                        .set_digest_listed(&recipient, newest, now())
                        .await
                        .map_err(db_status)?;
                    tracing::info!(to = %recipient, messages = list.len(), by = %actor, "quarantine digest sent");
                    self.info.counters.add("digests_sent", 1);
                    count += u32::try_from(list.len()).unwrap_or(u32::MAX);
                    sent.push(recipient);
                }
                Ok(o) => {
                    let why = o.first().map(|o| o.response.text()).unwrap_or_default();
                    tracing::warn!(to = %recipient, reply = %why, "the reinjection listener refused a quarantine digest");
                    failures.push(format!("{recipient}: {why}"));
                }
                Err(e) => {
                    tracing::warn!(to = %recipient, cause = %e, "cannot inject a quarantine digest");
                    failures.push(format!("{recipient}: {e}"));
                }
            }
        }
        self.db()
            .audit(&AuditLine {
                key: "quarantine.digest",
                action: "send",
                old: None,
                new: Some(&format!(
                    "{} digests, {count} messages listed{}",
                    sent.len(),
                    if failures.is_empty() {
                        String::new()
                    } else {
                        format!("; failed: {}", failures.join("; "))
                    }
                )),
                uid: None,
                user: actor,
                at: now(),
            })
            .await
            .map_err(db_status)?;
        if sent.is_empty() && !failures.is_empty() {
            return Err(Status::unavailable(format!(
                "no digest could be injected through {hop} (is mb-smtpd running?): {}",
                failures.join("; ")
            )));
        }
        Ok((sent, count))
    }
}

/// One listed message of a digest and its release link.
struct Line<'a> {
    entry: &'a Entry,
    link: String,
}

/// Who a portal session (`smtp:LOGIN`, `link:ADDRESS`) stands for: a user whose
/// addresses are the SMTP account's login (when an address) and address aliases, or the
/// link's recipient. `None` when it stands for nobody any more (the account was
/// removed).
pub async fn portal_principal(db: &Db, account: &str) -> Result<Option<WebPrincipal>, DbError> {
    let principal = |addresses: Vec<String>| WebPrincipal {
        name: account.to_string(),
        role: WebRole::User as i32,
        domains: Vec::new(),
        addresses,
        via: "session".into(),
    };
    if let Some(address) = account.strip_prefix("link:") {
        return Ok(Some(principal(vec![address.to_ascii_lowercase()])));
    }
    let Some(login) = account.strip_prefix("smtp:") else {
        return Ok(None);
    };
    if db.user_hash(login).await?.is_none() {
        return Ok(None);
    }
    let addresses = smtp_addresses(db, login).await?;
    Ok((!addresses.is_empty()).then(|| principal(addresses)))
}

/// An SMTP account's quarantine addresses: its login when it is an address, and its
/// address aliases (`@domain` grants are for sending only).
async fn smtp_addresses(db: &Db, login: &str) -> Result<Vec<String>, DbError> {
    let mut out = Vec::new();
    let l = login.trim().to_ascii_lowercase();
    if l.contains('@') {
        out.push(l);
    }
    for (_, alias, _) in db.aliases(Some(login)).await? {
        let a = alias.to_ascii_lowercase();
        if !a.starts_with('@') && !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// Per recipient (in the digest's domains, or `to`), the entries quarantined for it
/// after the newest one its last digest listed, oldest first.
fn pending<'a>(
    entries: &'a [Entry],
    listed: &BTreeMap<String, i64>,
    domains: &[String],
    to: Option<&str>,
) -> BTreeMap<String, Vec<&'a Entry>> {
    let mut out: BTreeMap<String, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        for r in &e.recipients {
            let r = r.trim().to_ascii_lowercase();
            let wanted = match to {
                Some(t) => r == t,
                None => {
                    domains.is_empty()
                        || r.rsplit_once('@')
                            .is_some_and(|(_, d)| domains.iter().any(|x| x == d))
                }
            };
            if wanted && e.at_unix_ms > listed.get(&r).copied().unwrap_or(0) {
                let list = out.entry(r).or_default();
                if !list.iter().any(|x| x.id == e.id) {
                    list.push(e);
                }
            }
        }
    }
    out
}

/// The web interface's address for links: `web.base_url`, else https://smtp.hostname
/// (with network.https.port unless 443).
fn base_url(cfg: &mb_core::Config) -> String {
    let set = cfg.text("web.base_url");
    if !set.is_empty() {
        return set.trim_end_matches('/').to_string();
    }
    let host = match cfg.text("smtp.hostname") {
        h if h.is_empty() => "localhost".to_string(),
        h => h,
    };
    match cfg.port("network.https.port") {
        443 => format!("https://{host}"),
        p => format!("https://{host}:{p}"),
    }
}

/// The digest message: plain text and HTML, every piece of message data escaped in the
/// HTML part.
fn compose(
    recipient: &str,
    hostname: &str,
    lines: &[Line<'_>],
    total: usize,
    portal: &str,
) -> std::io::Result<Vec<u8>> {
    use std::fmt::Write as _;
    let subject = format!(
        "Quarantine digest: {total} message{} held for {recipient}",
        if total == 1 { "" } else { "s" }
    );
    let mut text = format!(
        "These messages to {recipient} were held in quarantine since your last digest.\n\
         A release link opens a page where you confirm the release; nothing is released\n\
         by opening the link alone. Each link works once.\n\n"
    );
    let mut html = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title></head><body>\
         <p>These messages to {} were held in quarantine since your last digest. A release \
         link opens a page where you confirm the release; each link works once.</p>\
         <table border=\"1\" cellpadding=\"4\" cellspacing=\"0\"><tr><th>Received (UTC)</th>\
         <th>From</th><th>Subject</th><th>Score</th><th>Reason</th><th></th></tr>",
        escape(&subject),
        escape(recipient)
    );
    for l in lines {
        let e = l.entry;
        let when = utc_text(e.at_unix_ms / 1000);
        let from = if e.sender.is_empty() { "<>" } else { &e.sender };
        let _ = write!(
            text,
            "{when}  From: {from}\n  Subject: {}\n  Score: {:.1}  Reason: {}\n  Release: {}\n\n",
            one_line(&e.subject),
            e.score,
            one_line(&e.reason),
            l.link
        );
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td><a href=\"{}\">Release</a></td></tr>",
            escape(&when),
            escape(from),
            escape(&e.subject),
            e.score,
            escape(&e.reason),
            escape(&l.link)
        );
    }
    if total > lines.len() {
        let _ = writeln!(
            text,
            "... and {} more: see the portal.\n",
            total - lines.len()
        );
        let _ = write!(
            html,
            "<tr><td colspan=\"6\">... and {} more: see the portal.</td></tr>",
            total - lines.len()
        );
    }
    let _ = writeln!(
        text,
        "Your quarantine (sign in once with this link): {portal}"
    );
    let _ = write!(
        html,
        "</table><p><a href=\"{}\">Open your quarantine</a> (this link signs you in once).</p></body></html>",
        escape(portal)
    );
    mail_builder::MessageBuilder::new()
        .from((
            "Mailborder quarantine".to_string(),
            format!("postmaster@{hostname}"),
        ))
        .to(recipient.to_string())
        .subject(subject)
        .header(
            "Auto-Submitted",
            mail_builder::headers::text::Text::new("auto-generated"),
        )
        .text_body(text)
        .html_body(html)
        .write_to_vec()
}

/// Text for one line of the plain part: no line breaks smuggled in by a subject.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// HTML escaping of text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// `YYYY-MM-DD HH:MM` in UTC.
fn utc_text(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// Every column that says what a link does, in one text the MAC covers.
fn signed_text(l: &LinkRecord) -> String {
    format!(
        "mailborder-digest-link-v1\n{}\n{}\n{}\n{}\n{}",
        l.id, l.action, l.quarantine_id, l.recipient, l.expires_at
    )
}

/// Runs the digests on `quarantine.digest.schedule` while `quarantine.digest.enabled`.
/// The time of each run is claimed in `digest_runs` before anything is sent, with a
/// compare-and-set, so a restart (or a second mb-rpcd on a shared database) does not
/// send it again; a time missed while mb-rpcd was down is run once at its start.
pub fn spawn_scheduler(store: Arc<Store>, info: Arc<DaemonInfo>, shutdown: Shutdown) {
    let svc = DigestService::new(store.clone(), info);
    tokio::spawn(async move {
        loop {
            if let Err(e) = tick(&svc).await {
                tracing::warn!(cause = %e, "quarantine digest run failed; trying again at the next scheduled time");
            }
            tokio::select! {
                () = shutdown.requested() => break,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    });
}

async fn tick(svc: &DigestService) -> Result<(), Status> {
    let cfg = svc.store.effective();
    if !cfg.bool("quarantine.digest.enabled") || svc.store.cluster_main().is_some() {
        // On a cluster child the main's mb-rpcd sends (the index is the main's).
        return Ok(());
    }
    let Ok(schedule) = cfg.text("quarantine.digest.schedule").parse::<Schedule>() else {
        return Ok(());
    };
    let at = now();
    let due = schedule.last_due(at, local_offset(at));
    let last = svc.db().digest_last_run().await.map_err(db_status)?;
    if due <= last {
        return Ok(());
    }
    if !svc
        .db()
        .claim_digest_run(last, due)
        .await
        .map_err(db_status)?
    {
        return Ok(());
    }
    let (sent, listed) = svc.send(None, "scheduler").await?;
    tracing::info!(digests = sent.len(), listed, schedule = %schedule, "scheduled quarantine digests sent");
    Ok(())
}

/// Seconds the host's local time is ahead of UTC at `at`: from the TZif file of `TZ`
/// (a zone name or path) or `/etc/localtime`; UTC when there is none.
pub fn local_offset(at: i64) -> i64 {
    let path = match std::env::var("TZ") {
        Ok(tz) if !tz.trim_start_matches(':').is_empty() => {
            let tz = tz.trim_start_matches(':');
            if tz.starts_with('/') {
                PathBuf::from(tz)
            } else {
                Path::new("/usr/share/zoneinfo").join(tz)
            }
        }
        _ => PathBuf::from("/etc/localtime"),
    };
    std::fs::read(path)
        .ok()
        .and_then(|b| tzif_offset(&b, at))
        .unwrap_or(0)
}

/// The UTC offset a TZif file (RFC 8536) gives for `at`, from its transition table
/// (version 2+ 64-bit data when present). Beyond the last transition the last type
/// holds, which Debian's full ("fat") zone files make right for years to come.
fn tzif_offset(b: &[u8], at: i64) -> Option<i64> {
    let be32 =
        |o: usize| -> Option<u32> { Some(u32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?)) };
    let counts = |o: usize| -> Option<[usize; 6]> {
        if b.get(o..o + 4)? != b"TZif" {
            return None;
        }
        let mut c = [0usize; 6];
        for (i, slot) in c.iter_mut().enumerate() {
            *slot = usize::try_from(be32(o + 20 + 4 * i)?).ok()?;
        }
        Some(c)
    };
    let [isut, isstd, leap, time, typ, chars] = counts(0)?;
    let v1 = time * 4 + time + typ * 6 + chars + leap * 8 + isstd + isut;
    let (base, width, c) = if b.get(4).copied().unwrap_or(0) >= b'2' {
        let o = 44 + v1;
        (o, 8usize, counts(o)?)
    } else {
        (0, 4usize, [isut, isstd, leap, time, typ, chars])
    };
    let [_, _, _, time, typ, _] = c;
    let times = base + 44;
    let idx = times + time * width;
    let types = idx + time;
    let mut chosen = None;
    for i in 0..time {
        let o = times + i * width;
        let t = if width == 8 {
            i64::from_be_bytes(b.get(o..o + 8)?.try_into().ok()?)
        } else {
            i64::from(i32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?))
        };
        if t > at {
            break;
        }
        chosen = Some(usize::from(*b.get(idx + i)?));
    }
    let ty = chosen.unwrap_or(0);
    if ty >= typ {
        return None;
    }
    let o = types + ty * 6;
    Some(i64::from(i32::from_be_bytes(
        b.get(o..o + 4)?.try_into().ok()?,
    )))
}

#[tonic::async_trait]
impl Digest for DigestService {
    async fn send_now(
        &self,
        req: Request<DigestSendRequest>,
    ) -> Result<Response<DigestSendResponse>, Status> {
        let who = caller(&req).name;
        let r = req.into_inner();
        let actor = if r.actor.is_empty() { who } else { r.actor };
        let to = (!r.to.trim().is_empty()).then_some(r.to.as_str());
        let (recipients, listed) = self.send(to, &actor).await?;
        Ok(Response::new(DigestSendResponse { recipients, listed }))
    }

    async fn peek_link(
        &self,
        req: Request<DigestLinkRequest>,
    ) -> Result<Response<DigestLink>, Status> {
        let link = self.valid_link(&req.get_ref().token).await?;
        let entry = if link.action == RELEASE {
            let e = self
                .db()
                .quarantine_entry(&link.quarantine_id)
                .await
                .map_err(db_status)?
                .ok_or_else(|| {
                    Status::not_found("the message is no longer in the quarantine: it was released or deleted already")
                })?;
            Some(wire::to_wire(e))
        } else {
            None
        };
        Ok(Response::new(DigestLink {
            action: link.action,
            recipient: link.recipient,
            expires_at_unix: link.expires_at,
            entry,
        }))
    }

    async fn use_link(
        &self,
        req: Request<DigestLinkRequest>,
    ) -> Result<Response<DigestLinkUsed>, Status> {
        let r = req.into_inner();
        let link = self.valid_link(&r.token).await?;
        let at = now();
        if !self
            .db()
            .claim_digest_link(&link.id, at)
            .await
            .map_err(db_status)?
        {
            return Err(Status::not_found(
                "this link is not valid: it was used already",
            ));
        }
        let actor = format!("link:{}", link.recipient);
        if link.action == PORTAL {
            let account = format!("link:{}", link.recipient);
            let (session_id, csrf_token, expires_at_unix) =
                self.portal_session(&account, &r.client_ip).await?;
            tracing::info!(to = %link.recipient, client = %r.client_ip, "portal opened with a digest link");
            return Ok(Response::new(DigestLinkUsed {
                action: link.action,
                recipient: link.recipient,
                session_id,
                csrf_token,
                expires_at_unix,
                ..Default::default()
            }));
        }
        let mut ask = Request::new(QuarantineId {
            id: link.quarantine_id.clone(),
            raw: false,
        });
        ask.extensions_mut().insert(Caller {
            uid: None,
            name: actor.clone(),
        });
        let quarantine = QuarantineService {
            store: self.store.clone(),
        };
        match quarantine.release(ask).await {
            Ok(done) => {
                let done = done.into_inner();
                self.db()
                    .audit(&AuditLine {
                        key: &format!("quarantine:{}", link.quarantine_id),
                        action: "release",
                        old: None,
                        new: Some(&format!("by a digest link from {}", r.client_ip)),
                        uid: None,
                        user: &actor,
                        at,
                    })
                    .await
                    .map_err(db_status)?;
                Ok(Response::new(DigestLinkUsed {
                    action: link.action,
                    recipient: link.recipient,
                    quarantine_id: link.quarantine_id,
                    reply: done.reply,
                    ..Default::default()
                }))
            }
            Err(e) => {
                // Not released: the link may be tried again (unless the message is gone).
                if e.code() != tonic::Code::NotFound {
                    self.db()
                        .unclaim_digest_link(&link.id)
                        .await
                        .map_err(db_status)?;
                }
                Err(e)
            }
        }
    }

    async fn portal_login(
        &self,
        req: Request<PortalLoginRequest>,
    ) -> Result<Response<WebLoginResponse>, Status> {
        let r = req.into_inner();
        let login = r.login.trim().to_string();
        let bad = || {
            Response::new(WebLoginResponse {
                outcome: WebLoginOutcome::WebLoginBadCredentials as i32,
                ..Default::default()
            })
        };
        let cfg = self.store.effective();
        // The same stable line as a web account's failure: fail2ban's filter matches it.
        let failed = |user: String, reason: &str| {
            self.info.counters.add("web_login_failed", 1);
            tracing::warn!(
                "web login failed client={} user={} reason=\"{reason}\"",
                loggable(&r.client_ip),
                loggable(&user)
            );
            if crate::portal_login::failed(&cfg, &login) {
                self.info.counters.add("web_lockouts", 1);
            }
        };
        if let Some(wait) = crate::portal_login::locked(&cfg, &login) {
            self.info.counters.add("web_login_failed", 1);
            tracing::warn!(
                "web login failed client={} user={} reason=\"locked\"",
                loggable(&r.client_ip),
                loggable(&format!("portal:{login}"))
            );
            return Ok(Response::new(WebLoginResponse {
                outcome: WebLoginOutcome::WebLoginLockedOut as i32,
                retry_after_seconds: wait,
                ..Default::default()
            }));
        }
        let hash = if login.is_empty() || login.len() > 191 {
            None
        } else {
            self.db().user_hash(&login).await.map_err(db_status)?
        };
        // SMTP accounts first: a login that is one is checked against it alone, so the
        // directory can neither take over nor lock a local account; any other login is
        // the directory's when ldap.url is set (crate::portal_login).
        if hash.is_none() {
            use crate::portal_login::{DirectoryLogin, directory_login, unavailable};
            match directory_login(&cfg, &login, &r.password).await {
                Ok(DirectoryLogin::Off) => {}
                Ok(DirectoryLogin::Refused) => {
                    failed(format!("ldap:{login}"), "bad credentials");
                    return Ok(bad());
                }
                Ok(DirectoryLogin::User { account, user }) => {
                    crate::portal_login::succeeded(&login);
                    if user.addresses.is_empty() {
                        return Err(Status::failed_precondition(format!(
                            "the directory entry {} has no mail address (ldap.address_attributes) to show mail for",
                            user.dn
                        )));
                    }
                    let (session_id, csrf_token, expires_at_unix) =
                        self.portal_session(&account, &r.client_ip).await?;
                    tracing::info!(user = %loggable(&account), client = %loggable(&r.client_ip), "portal login with a directory account");
                    return Ok(Response::new(WebLoginResponse {
                        outcome: WebLoginOutcome::WebLoginOk as i32,
                        session_id,
                        csrf_token,
                        expires_at_unix,
                        principal: Some(crate::portal_login::user_principal(
                            &account,
                            user.addresses,
                        )),
                        ..Default::default()
                    }));
                }
                Err(e) => return Err(unavailable(&e)),
            }
        }
        if !verify_password(r.password, hash).await? {
            failed(format!("smtp:{login}"), "bad credentials");
            return Ok(bad());
        }
        crate::portal_login::succeeded(&login);
        let account = format!("smtp:{login}");
        let Some(principal) = portal_principal(self.db(), &account)
            .await
            .map_err(db_status)?
        else {
            return Err(Status::failed_precondition(format!(
                "the SMTP account {login} has no address to show mail for: its login is not an address and it has no address alias (mb-user alias add)"
            )));
        };
        let (session_id, csrf_token, expires_at_unix) =
            self.portal_session(&account, &r.client_ip).await?;
        tracing::info!(user = %account, client = %loggable(&r.client_ip), "portal login with an SMTP account");
        Ok(Response::new(WebLoginResponse {
            outcome: WebLoginOutcome::WebLoginOk as i32,
            session_id,
            csrf_token,
            expires_at_unix,
            principal: Some(principal),
            ..Default::default()
        }))
    }

    async fn audit(
        &self,
        req: Request<PortalAuditRequest>,
    ) -> Result<Response<PortalAuditResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let user = if r.actor.is_empty() {
            who.name.clone()
        } else {
            r.actor
        };
        self.db()
            .audit(&AuditLine {
                key: &r.key,
                action: &r.action,
                old: None,
                new: Some(&r.detail),
                uid: who.uid,
                user: &user,
                at: now(),
            })
            .await
            .map_err(db_status)?;
        Ok(Response::new(PortalAuditResponse {}))
    }
}

/// Tables `digest_recipients`, `digest_runs` and `digest_links` (migration 0017).
impl Db {
    /// One audit line on its own.
    pub async fn audit(&self, a: &AuditLine<'_>) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        self.write_audit(&mut tx, a).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Per recipient, the newest quarantine time its last digest listed.
    pub async fn digest_listed(&self) -> Result<BTreeMap<String, i64>, DbError> {
        let rows = sqlx::query("SELECT recipient, last_listed_ms FROM digest_recipients")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    pub async fn set_digest_listed(
        &self,
        recipient: &str,
        listed_ms: i64,
        at: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(self.sql(
            "UPDATE digest_recipients SET last_listed_ms = ?, last_sent = ? WHERE recipient = ? AND last_listed_ms <= ?",
        ))
        .bind(listed_ms)
        .bind(at)
        .bind(recipient)
        .bind(listed_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let known =
                sqlx::query(self.sql("SELECT 1 FROM digest_recipients WHERE recipient = ?"))
                    .bind(recipient)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
            if !known {
                sqlx::query(self.sql(
                    "INSERT INTO digest_recipients (recipient, last_listed_ms, last_sent) VALUES (?, ?, ?)",
                ))
                .bind(recipient)
                .bind(listed_ms)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn digest_last_run(&self) -> Result<i64, DbError> {
        let r = sqlx::query("SELECT last_run FROM digest_runs WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => r.try_get(0)?,
            None => 0,
        })
    }

    /// Moves the last run from `last` to `due`; false when another run claimed it first.
    pub async fn claim_digest_run(&self, last: i64, due: i64) -> Result<bool, DbError> {
        let done = sqlx::query(
            self.sql("UPDATE digest_runs SET last_run = ? WHERE id = 1 AND last_run = ?"),
        )
        .bind(due)
        .bind(last)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores a new link and forgets those expired a day ago.
    pub async fn add_digest_link(&self, l: &LinkRecord, at: i64) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(self.sql("DELETE FROM digest_links WHERE expires_at < ?"))
            .bind(at - 86_400)
            .execute(&mut *tx)
            .await?;
        sqlx::query(self.sql(
            "INSERT INTO digest_links (id, action, quarantine_id, recipient, created_at, expires_at, used_at) VALUES (?, ?, ?, ?, ?, ?, 0)",
        ))
        .bind(&l.id)
        .bind(&l.action)
        .bind(&l.quarantine_id)
        .bind(&l.recipient)
        .bind(at)
        .bind(l.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn digest_link(&self, id: &str) -> Result<Option<LinkRecord>, DbError> {
        let r = sqlx::query(self.sql(
            "SELECT id, action, quarantine_id, recipient, expires_at, used_at FROM digest_links WHERE id = ?",
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| {
            Ok(LinkRecord {
                id: r.try_get(0)?,
                action: r.try_get(1)?,
                quarantine_id: r.try_get(2)?,
                recipient: r.try_get(3)?,
                expires_at: r.try_get(4)?,
                used_at: r.try_get(5)?,
            })
        })
        .transpose()
    }

    /// Marks a link used; false when it was used already (the check and the mark are
    /// one statement, so of two racing uses one wins).
    pub async fn claim_digest_link(&self, id: &str, at: i64) -> Result<bool, DbError> {
        let done = sqlx::query(
            self.sql("UPDATE digest_links SET used_at = ? WHERE id = ? AND used_at = 0"),
        )
        .bind(at.max(1))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn unclaim_digest_link(&self, id: &str) -> Result<(), DbError> {
        sqlx::query(self.sql("UPDATE digest_links SET used_at = 0 WHERE id = ?"))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fn db_status(e: DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(e.to_string())
}

fn key_status(e: KeyError) -> Status {
    tracing::error!(cause = %e, "digest link key");
    Status::failed_precondition(e.to_string())
}

// Random bytes, hex and the stored (SHA-256) form of a session id: the same helpers
// web_accounts uses, so a portal session is stored as its own sessions are.
use crate::web_accounts::{digest as session_digest, hex, random, unhex};

/// A value for a log line fail2ban reads: no spaces or quotes to forge fields with.
fn loggable(s: &str) -> String {
    s.chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], KeyError> {
    use crate::web_accounts::{KeyFileProblem, load_or_create_key_file};
    load_or_create_key_file(path, "signs digest links").map_err(|e| match e {
        KeyFileProblem::Io(cause) => KeyError::File {
            path: path.to_path_buf(),
            cause,
        },
        KeyFileProblem::Bad => KeyError::Bad {
            path: path.to_path_buf(),
        },
        KeyFileProblem::Random => KeyError::Random,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, at: i64, to: &[&str]) -> Entry {
        Entry {
            id: id.into(),
            at_unix_ms: at,
            recipients: to.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_recipient_gets_what_is_new_since_its_last_digest() {
        let entries = [
            entry("a", 10, &["Jane@A.test", "bob@b.test"]),
            entry("b", 20, &["jane@a.test"]),
            entry("c", 30, &["zed@c.test"]),
        ];
        let mut listed = BTreeMap::new();
        listed.insert("jane@a.test".to_string(), 10);
        let domains = ["a.test".to_string(), "b.test".to_string()];
        let due = pending(&entries, &listed, &domains, None);
        let ids = |r: &str| due[r].iter().map(|e| e.id.as_str()).collect::<Vec<_>>();
        assert_eq!(
            due.keys().collect::<Vec<_>>(),
            ["bob@b.test", "jane@a.test"]
        );
        assert_eq!(ids("jane@a.test"), ["b"]);
        assert_eq!(ids("bob@b.test"), ["a"]);
        let one = pending(&entries, &BTreeMap::new(), &domains, Some("zed@c.test"));
        assert_eq!(one["zed@c.test"].len(), 1);
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn the_html_part_escapes_message_data() {
        let mut e = entry("q1", 1_796_207_400_000, &["jane@a.test"]);
        e.sender = "\"<script>\"@evil.test".into();
        e.subject = "<img src=http://evil.test/x> & more".into();
        e.reason = "spam".into();
        e.score = 7.25;
        let lines = [Line {
            entry: &e,
            link: "https://gw.test/ui/digest/abc.def".into(),
        }];
        let m = compose(
            "jane@a.test",
            "gw.test",
            &lines,
            1,
            "https://gw.test/ui/digest/p.q",
        )
        .unwrap();
        let parsed = mail_parser::MessageParser::default().parse(&m).unwrap();
        let html = parsed.body_html(0).unwrap();
        assert!(
            !html.contains("<script>") && !html.contains("<img"),
            "{html}"
        );
        assert!(
            html.contains("&lt;img src=http://evil.test/x&gt; &amp; more"),
            "{html}"
        );
        let text = parsed.body_text(0).unwrap();
        assert!(
            text.contains("2026-12-02 10:30") && text.contains("Score: 7.2"),
            "{text}"
        );
        assert!(text.contains("https://gw.test/ui/digest/abc.def"), "{text}");
    }

    #[test]
    fn utc_dates_are_civil() {
        assert_eq!(utc_text(0), "1970-01-01 00:00");
        assert_eq!(utc_text(1_796_207_400), "2026-12-02 10:30");
        assert_eq!(utc_text(951_782_400), "2000-02-29 00:00");
    }

    #[test]
    fn tzif_offsets_are_read_from_the_zone_file() {
        // A file made by hand: version 2, two types (UTC+1 and UTC+2), one transition
        // at t = 1000 to the second.
        fn block(width: usize) -> Vec<u8> {
            let mut b = b"TZif2".to_vec();
            b.extend([0u8; 15]);
            for c in [0u32, 0, 0, 1, 2, 4] {
                b.extend(c.to_be_bytes());
            }
            if width == 8 {
                b.extend(1000i64.to_be_bytes());
            } else {
                b.extend(1000i32.to_be_bytes());
            }
            b.push(1);
            b.extend(3600i32.to_be_bytes());
            b.extend([0, 0]);
            b.extend(7200i32.to_be_bytes());
            b.extend([1, 0]);
            b.extend(b"AB\0\0");
            b
        }
        let mut file = block(4);
        file.extend(block(8));
        assert_eq!(tzif_offset(&file, 999), Some(3600));
        assert_eq!(tzif_offset(&file, 1000), Some(7200));
        assert_eq!(tzif_offset(&file, 5_000_000), Some(7200));
        assert_eq!(tzif_offset(b"nonsense", 0), None);
        if let Ok(utc) = std::fs::read("/usr/share/zoneinfo/UTC") {
            assert_eq!(tzif_offset(&utc, 1_796_207_400), Some(0));
        }
    }
}
