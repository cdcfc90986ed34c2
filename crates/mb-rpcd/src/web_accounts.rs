//! Web accounts for mb-web (migration 0015): logins with Argon2id passwords and TOTP,
//! lockout after repeated failures, sessions and API keys, each change recorded in the
//! configuration audit trail. mb-web decides what a principal may do; this service
//! only keeps and checks the credentials, so that mb-web holds no secret at rest.
//!
//! Secrets at rest: session ids and key secrets are stored as SHA-256 digests (they are
//! 256 random bits, so a fast digest is enough); TOTP secrets are sealed with
//! AES-256-GCM under a key kept in `paths.data_dir/web-totp.key`, outside the database,
//! with the account's name as associated data, so a leaked database alone reveals none
//! of them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use mb_proto::v1::web_accounts_server::{WebAccounts, WebAccountsServer};
use mb_proto::v1::{
    WebAccount, WebAccountCreateRequest, WebAccountCreateResponse, WebAccountDeleteRequest,
    WebAccountDeleteResponse, WebAccountListRequest, WebAccountListResponse, WebApiKey,
    WebAuthenticateRequest, WebAuthenticateResponse, WebKeyCreateRequest, WebKeyCreateResponse,
    WebKeyListRequest, WebKeyListResponse, WebKeyRevokeRequest, WebLoginOutcome, WebLoginRequest,
    WebLoginResponse, WebLogoutRequest, WebLogoutResponse, WebPrincipal, WebRole,
    WebSetPasswordRequest, WebSetRoleRequest, WebTotpRequest, WebTotpResponse, WebTotpSecret,
    web_authenticate_request::Credential,
};
use mb_runtime::control::DaemonInfo;
use mb_runtime::uds::{Caller, caller};
use sqlx::Row;
use sqlx::any::AnyRow;
use tonic::{Request, Response, Status};

use crate::db::{Db, DbError};
use crate::store::Store;
use crate::users::{check_password, hash_password, verify_password};

/// Shortest web password accepted (as for SMTP accounts).
pub const MIN_PASSWORD: usize = crate::users::MIN_PASSWORD;

/// The TOTP parameters every authenticator app assumes: RFC 6238 with HMAC-SHA-1,
/// 30-second steps and 6 digits; one step of clock skew either way is accepted.
pub const TOTP_STEP: i64 = 30;
pub const TOTP_DIGITS: u32 = 6;

/// Prefix of an API key as handed out: `mbk_ID_SECRET`.
pub const KEY_PREFIX: &str = "mbk_";

/// Last-seen and last-used times are written at most this often, so that every API
/// request is not a database write.
const TOUCH_EVERY: i64 = 60;

/// The service, for `lib.rs` to register on the local socket.
pub fn server<G: tonic::service::Interceptor>(
    store: Arc<Store>,
    info: Arc<DaemonInfo>,
    guard: G,
) -> tonic::service::interceptor::InterceptedService<WebAccountsServer<WebAccountsService>, G> {
    let key_file = store
        .effective()
        .path("paths.data_dir")
        .join("web-totp.key");
    tonic::service::interceptor::InterceptedService::new(
        WebAccountsServer::new(WebAccountsService::new(store, info, key_file)),
        guard,
    )
}

/// What a web principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    DomainAdmin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::DomainAdmin => "domain-admin",
            Role::User => "user",
        }
    }

    fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "domain-admin" => Some(Role::DomainAdmin),
            "user" => Some(Role::User),
            _ => None,
        }
    }

    fn from_wire(n: i32) -> Result<Role, Status> {
        match WebRole::try_from(n) {
            Ok(WebRole::Admin) => Ok(Role::Admin),
            Ok(WebRole::DomainAdmin) => Ok(Role::DomainAdmin),
            Ok(WebRole::User) => Ok(Role::User),
            _ => Err(Status::invalid_argument(
                "a role is required: admin, domain-admin or user",
            )),
        }
    }

    fn wire(self) -> i32 {
        match self {
            Role::Admin => WebRole::Admin as i32,
            Role::DomainAdmin => WebRole::DomainAdmin as i32,
            Role::User => WebRole::User as i32,
        }
    }
}

/// A web account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebAccountRecord {
    pub name: String,
    pub password_hash: String,
    pub role: Role,
    pub domains: Vec<String>,
    pub addresses: Vec<String>,
    pub smtp_user: String,
    pub totp_secret: String,
    pub totp_pending: String,
    pub totp_last_step: i64,
    pub failed_count: i64,
    pub failed_since: i64,
    pub locked_until: i64,
    pub created_at: i64,
    pub created_by: String,
    pub updated_at: i64,
    pub last_login: i64,
}

/// An API key as stored (its secret only as a digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub secret_hash: String,
    pub description: String,
    pub role: Role,
    pub domains: Vec<String>,
    pub addresses: Vec<String>,
    pub created_at: i64,
    pub created_by: String,
    pub expires_at: i64,
    pub revoked_at: i64,
    pub last_used: i64,
}

/// A session as stored, found by the digest of its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub account: String,
    pub csrf_token: String,
    pub expires_at: i64,
    pub last_seen: i64,
}

/// An entry of the audit trail `mb-config history` shows: `key` is `web-account:NAME`
/// or `web-key:ID`.
pub struct WebAudit<'a> {
    pub key: String,
    pub action: &'static str,
    pub old: Option<String>,
    pub new: Option<String>,
    pub uid: Option<u32>,
    pub user: &'a str,
    pub at: i64,
}

/// What can go wrong with the TOTP sealing key.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read or create the TOTP key {}: {cause}", path.display())]
    KeyFile {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the TOTP key {} is not 64 hexadecimal digits: restore it from a backup, or remove it and enrol every account's TOTP again (mb-web account totp NAME)", path.display())]
    BadKey { path: PathBuf },
    #[error("a TOTP secret does not open with the key in {}: it was sealed under another key; enrol it again (mb-web account totp NAME)", path.display())]
    Open { path: PathBuf },
    #[error("cannot seal a TOTP secret")]
    Seal,
}

pub struct WebAccountsService {
    store: Arc<Store>,
    info: Arc<DaemonInfo>,
    sealer: Sealer,
}

impl WebAccountsService {
    pub fn new(store: Arc<Store>, info: Arc<DaemonInfo>, key_file: PathBuf) -> Self {
        WebAccountsService {
            store,
            info,
            sealer: Sealer {
                path: key_file,
                key: Mutex::new(None),
            },
        }
    }

    fn db(&self) -> &Db {
        &self.store.db
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

fn seal_status(e: SealError) -> Status {
    tracing::error!(cause = %e, "TOTP secret");
    Status::failed_precondition(e.to_string())
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Who made a change, for the audit trail and the log: the web principal mb-web names,
/// else the socket's caller.
fn actor<'a>(who: &'a Caller, actor: &'a str) -> &'a str {
    if actor.is_empty() { &who.name } else { actor }
}

/// A web account's name: 1 to 191 printable ASCII characters, without quotes,
/// backslashes or `:` (which marks `key:ID` principals), stored lowercase.
pub fn account_name(text: &str) -> Result<String, Status> {
    let name = text.trim().to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 191
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"\\:".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(Status::invalid_argument(format!(
            "invalid account name {text:?}: use 1 to 191 printable characters without spaces, quotes or colons"
        )))
    }
}

/// A domain as stored: lowercase, without a final dot.
pub fn domain_name(text: &str) -> Result<String, Status> {
    let d = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(d)
    } else {
        Err(Status::invalid_argument(format!(
            "invalid domain {text:?}: use a name such as example.org"
        )))
    }
}

/// A whole address (not an `@domain` grant), lowercase.
fn address(text: &str) -> Result<String, Status> {
    let a = crate::users::alias_address(text).map_err(|_| {
        Status::invalid_argument(format!(
            "invalid address {text:?}: use a whole address such as jane@example.org"
        ))
    })?;
    if a.starts_with('@') {
        return Err(Status::invalid_argument(format!(
            "invalid address {text:?}: a user's quarantine is a list of whole addresses, not @domain"
        )));
    }
    Ok(a)
}

/// A role with what it is limited to, checked together: a domain admin needs domains,
/// a user addresses (its own, or an SMTP account's), an admin neither.
struct Scope {
    role: Role,
    domains: Vec<String>,
    addresses: Vec<String>,
    smtp_user: String,
}

fn scope(
    role: i32,
    domains: &[String],
    addresses: &[String],
    smtp_user: &str,
    for_key: bool,
) -> Result<Scope, Status> {
    let role = Role::from_wire(role)?;
    let mut ds = Vec::new();
    for d in domains.iter().filter(|d| !d.trim().is_empty()) {
        let d = domain_name(d)?;
        if !ds.contains(&d) {
            ds.push(d);
        }
    }
    let mut addrs = Vec::new();
    for a in addresses.iter().filter(|a| !a.trim().is_empty()) {
        let a = address(a)?;
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    let smtp_user = smtp_user.trim().to_string();
    match role {
        Role::Admin if !ds.is_empty() || !addrs.is_empty() || !smtp_user.is_empty() => {
            Err(Status::invalid_argument(
                "an admin has every domain: give domains only to a domain-admin and addresses only to a user",
            ))
        }
        Role::DomainAdmin if ds.is_empty() => Err(Status::invalid_argument(
            "a domain-admin needs at least one domain (--domains example.org)",
        )),
        Role::DomainAdmin if !addrs.is_empty() || !smtp_user.is_empty() => {
            Err(Status::invalid_argument(
                "a domain-admin has whole domains: give addresses only to a user",
            ))
        }
        Role::User if !ds.is_empty() => Err(Status::invalid_argument(
            "a user has addresses, not domains: make it a domain-admin for whole domains",
        )),
        Role::User if addrs.is_empty() && smtp_user.is_empty() => {
            Err(Status::invalid_argument(if for_key {
                "a user key needs at least one address (--addresses jane@example.org)"
            } else {
                "a user needs at least one address (--addresses jane@example.org) or an SMTP account (--smtp-user)"
            }))
        }
        _ => Ok(Scope {
            role,
            domains: ds,
            addresses: addrs,
            smtp_user,
        }),
    }
}

fn describe(role: Role, domains: &[String], addresses: &[String], smtp_user: &str) -> String {
    let mut s = format!("role={}", role.as_str());
    if !domains.is_empty() {
        s.push_str(&format!(" domains={}", domains.join(",")));
    }
    if !addresses.is_empty() {
        s.push_str(&format!(" addresses={}", addresses.join(",")));
    }
    if !smtp_user.is_empty() {
        s.push_str(&format!(" smtp_user={smtp_user}"));
    }
    s
}

/// A client address for the log: what parses as an IP, else `unknown` (so that a
/// value mb-web did not check cannot forge the rest of the line).
fn loggable_ip(text: &str) -> String {
    text.trim()
        .parse::<std::net::IpAddr>()
        .map_or_else(|_| "unknown".to_string(), |ip| ip.to_string())
}

/// A user name as typed, for the log: printable ASCII, at most 64 characters.
fn loggable(user: &str) -> String {
    user.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], Status> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Status::internal("no random numbers"))?;
    Ok(b)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// The stored form of a session id or key secret.
pub(crate) fn digest(secret: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes()).as_ref())
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// RFC 4648 base32 without padding, as authenticator apps take secrets.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes `base32` (any case, spaces and padding ignored).
pub fn unbase32(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c.to_ascii_uppercase() {
            c @ b'A'..=b'Z' => c - b'A',
            c @ b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        buffer = (buffer << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((buffer >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// The TOTP code of `secret` for the 30-second step `step` (RFC 6238 over RFC 4226).
pub fn totp_code(secret: &[u8], step: i64) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = aws_lc_rs::hmac::sign(&key, &step.to_be_bytes());
    let h = tag.as_ref();
    let offset = usize::from(h[h.len() - 1] & 0x0f);
    let n = u32::from_be_bytes([
        h[offset] & 0x7f,
        h[offset + 1],
        h[offset + 2],
        h[offset + 3],
    ]);
    format!(
        "{:0width$}",
        n % 10u32.pow(TOTP_DIGITS),
        width = TOTP_DIGITS as usize
    )
}

/// The step a code is good for: the current one or one either side, and later than
/// the last step accepted (a code works once). `None` when the code is wrong.
fn totp_step(secret: &[u8], code: &str, at: i64, last: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != TOTP_DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = at.div_euclid(TOTP_STEP);
    [now, now - 1, now + 1]
        .into_iter()
        .filter(|s| *s > last)
        .find(|s| same(&totp_code(secret, *s), code))
}

fn totp_uri(name: &str, secret: &[u8]) -> WebTotpSecret {
    let b32 = base32(secret);
    // The label is the account name, percent-encoded where it is not plain.
    let label: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._@".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    WebTotpSecret {
        uri: format!(
            "otpauth://totp/Mailborder:{label}?secret={b32}&issuer=Mailborder&algorithm=SHA1&digits={TOTP_DIGITS}&period={TOTP_STEP}"
        ),
        base32: b32,
    }
}

/// AES-256-GCM under the key file, loaded (or created) at first use.
struct Sealer {
    path: PathBuf,
    key: Mutex<Option<[u8; 32]>>,
}

impl Sealer {
    fn key(&self) -> Result<[u8; 32], SealError> {
        let mut guard = self.key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = *guard {
            return Ok(k);
        }
        let k = load_or_create_key(&self.path)?;
        *guard = Some(k);
        Ok(k)
    }

    fn aead(&self) -> Result<LessSafeKey, SealError> {
        let k = self.key()?;
        let unbound = UnboundKey::new(&AES_256_GCM, &k).map_err(|_| SealError::Seal)?;
        Ok(LessSafeKey::new(unbound))
    }

    /// `hex(nonce || ciphertext || tag)`, bound to the account's name.
    fn seal(&self, name: &str, secret: &[u8]) -> Result<String, SealError> {
        let key = self.aead()?;
        let nonce_bytes: [u8; NONCE_LEN] = random().map_err(|_| SealError::Seal)?;
        let mut data = secret.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(name.as_bytes()),
            &mut data,
        )
        .map_err(|_| SealError::Seal)?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&data);
        Ok(hex(&out))
    }

    fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let bad = || SealError::Open {
            path: self.path.clone(),
        };
        let key = self.aead()?;
        let raw = unhex(sealed).ok_or_else(bad)?;
        if raw.len() <= NONCE_LEN {
            return Err(bad());
        }
        let (nonce, data) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut data = data.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| bad())?;
        Ok(plain.to_vec())
    }
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], SealError> {
    load_or_create_key_file(path, "seals web TOTP secrets").map_err(|e| match e {
        KeyFileProblem::Io(cause) => SealError::KeyFile {
            path: path.to_path_buf(),
            cause,
        },
        KeyFileProblem::Bad => SealError::BadKey {
            path: path.to_path_buf(),
        },
        KeyFileProblem::Random => SealError::Seal,
    })
}

/// Why a 32-byte key file could not be had (each caller names its own key).
pub(crate) enum KeyFileProblem {
    Io(std::io::Error),
    Bad,
    Random,
}

/// Reads the 32-byte key (64 hex digits), or creates it (mode 0600) when there is
/// none; two processes creating it at once agree on the first one written. `what`
/// ends the log line written when the key is created ("created the key that ...").
pub(crate) fn load_or_create_key_file(path: &Path, what: &str) -> Result<[u8; 32], KeyFileProblem> {
    let parse = |text: &str| -> Result<[u8; 32], KeyFileProblem> {
        unhex(text.trim())
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or(KeyFileProblem::Bad)
    };
    match std::fs::read_to_string(path) {
        Ok(text) => return parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(KeyFileProblem::Io(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(KeyFileProblem::Io)?;
    }
    let key: [u8; 32] = random().map_err(|_| KeyFileProblem::Random)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(KeyFileProblem::Io)?;
    f.write_all(format!("{}\n", hex(&key)).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(KeyFileProblem::Io)?;
    // A hard link fails when the file appeared meanwhile: then that one is the key.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(file = %path.display(), "created the key that {what}: back it up with the database");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            parse(&std::fs::read_to_string(path).map_err(KeyFileProblem::Io)?)
        }
        Err(e) => Err(KeyFileProblem::Io(e)),
    }
}

fn lines(v: &[String]) -> String {
    v.join("\n")
}

fn unlines(s: &str) -> Vec<String> {
    s.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

impl WebAccountRecord {
    fn wire(&self) -> WebAccount {
        WebAccount {
            name: self.name.clone(),
            role: self.role.wire(),
            domains: self.domains.clone(),
            addresses: self.addresses.clone(),
            smtp_user: self.smtp_user.clone(),
            totp_enrolled: !self.totp_secret.is_empty(),
            locked_until_unix: if self.locked_until > now() {
                self.locked_until
            } else {
                0
            },
            created_at_unix: self.created_at,
            created_by: self.created_by.clone(),
            updated_at_unix: self.updated_at,
            last_login_unix: self.last_login,
        }
    }
}

impl ApiKeyRecord {
    fn wire(&self) -> WebApiKey {
        WebApiKey {
            id: self.id.clone(),
            role: self.role.wire(),
            domains: self.domains.clone(),
            addresses: self.addresses.clone(),
            description: self.description.clone(),
            created_at_unix: self.created_at,
            created_by: self.created_by.clone(),
            expires_at_unix: self.expires_at,
            revoked_at_unix: self.revoked_at,
            last_used_unix: self.last_used,
        }
    }
}

/// What Login decided.
enum Outcome {
    Ok,
    Bad,
    TotpRequired,
    Enrol(WebTotpSecret),
    Locked(i64),
}

impl WebAccountsService {
    /// The addresses a user's quarantine covers: its own, then its SMTP account's login
    /// (when an address) and address aliases; `@domain` grants are for sending only.
    async fn addresses(&self, a: &WebAccountRecord) -> Result<Vec<String>, DbError> {
        let mut out = a.addresses.clone();
        if a.role == Role::User && !a.smtp_user.is_empty() {
            if let Ok(login) = address(&a.smtp_user)
                && !out.contains(&login)
            {
                out.push(login);
            }
            for (_, alias, _) in self.db().aliases(Some(&a.smtp_user)).await? {
                if !alias.starts_with('@') && !out.contains(&alias) {
                    out.push(alias);
                }
            }
        }
        Ok(out)
    }

    async fn principal(&self, a: &WebAccountRecord) -> Result<WebPrincipal, Status> {
        Ok(WebPrincipal {
            name: a.name.clone(),
            role: a.role.wire(),
            domains: a.domains.clone(),
            addresses: self.addresses(a).await.map_err(db_status)?,
            via: "session".into(),
        })
    }

    /// A failed attempt: logged for fail2ban, counted against the account when there
    /// is one; returns the lock's end when this failure locked it.
    async fn failed(
        &self,
        account: Option<&WebAccountRecord>,
        name: &str,
        ip: &str,
        reason: &str,
    ) -> Result<Option<i64>, Status> {
        self.info.counters.add("web_login_failed", 1);
        // One stable line per failure: etc/fail2ban/filter.d/mailborder-web.conf matches it.
        tracing::warn!(
            "web login failed client={} user={} reason=\"{reason}\"",
            loggable_ip(ip),
            loggable(name)
        );
        let Some(a) = account else { return Ok(None) };
        let cfg = self.store.effective();
        let max = cfg.int("web.lockout.failures").max(1);
        let window = secs(cfg.duration("web.lockout.window")).max(1);
        let at = now();
        let locked = self
            .db()
            .record_web_failure(&a.name, at, window, max)
            .await
            .map_err(db_status)?;
        if let Some(until) = locked {
            self.info.counters.add("web_lockouts", 1);
            tracing::warn!(
                "web account locked client={} user={} failures={max} seconds={window}",
                loggable_ip(ip),
                a.name
            );
            return Ok(Some(until));
        }
        Ok(None)
    }

    async fn decide(
        &self,
        r: &WebLoginRequest,
    ) -> Result<(Outcome, Option<WebAccountRecord>), Status> {
        let name = account_name(&r.name).ok();
        let account = match &name {
            Some(n) => self.db().web_account(n).await.map_err(db_status)?,
            None => None,
        };
        let at = now();
        if let Some(a) = &account
            && a.locked_until > at
        {
            self.failed(None, &r.name, &r.client_ip, "locked out")
                .await?;
            return Ok((Outcome::Locked(a.locked_until - at), account));
        }
        let ok = verify_password(
            r.password.clone(),
            account.as_ref().map(|a| a.password_hash.clone()),
        )
        .await?;
        if !ok {
            self.failed(account.as_ref(), &r.name, &r.client_ip, "bad credentials")
                .await?;
            return Ok((Outcome::Bad, account));
        }
        let Some(a) = account else {
            return Err(Status::internal("a password matched no account"));
        };
        let required = self
            .store
            .effective()
            .list("web.totp_required")
            .iter()
            .any(|role| role == a.role.as_str());
        if !a.totp_secret.is_empty() {
            if r.totp.trim().is_empty() {
                return Ok((Outcome::TotpRequired, Some(a)));
            }
            let secret = self
                .sealer
                .open(&a.name, &a.totp_secret)
                .map_err(seal_status)?;
            let step = totp_step(&secret, &r.totp, at, a.totp_last_step);
            // Of two logins racing with one code, only the first moves the step on.
            let fresh = match step {
                Some(step) => self
                    .db()
                    .set_web_totp_step(&a.name, step)
                    .await
                    .map_err(db_status)?,
                None => false,
            };
            return match fresh {
                true => Ok((Outcome::Ok, Some(a))),
                false => {
                    self.failed(Some(&a), &r.name, &r.client_ip, "bad credentials")
                        .await?;
                    Ok((Outcome::Bad, Some(a)))
                }
            };
        }
        if !required {
            return Ok((Outcome::Ok, Some(a)));
        }
        // Enrolment at the first login: the password opens a pending secret, a code from
        // it confirms it.
        let pending = if a.totp_pending.is_empty() {
            None
        } else {
            self.sealer.open(&a.name, &a.totp_pending).ok()
        };
        if let Some(secret) = &pending
            && !r.totp.trim().is_empty()
        {
            return match totp_step(secret, &r.totp, at, a.totp_last_step) {
                Some(step) => {
                    let audit = WebAudit {
                        key: format!("web-account:{}", a.name),
                        action: "totp-enrol",
                        old: None,
                        new: Some("enrolled at login".into()),
                        uid: None,
                        user: &a.name,
                        at,
                    };
                    self.db()
                        .confirm_web_totp(&a.name, step, &audit)
                        .await
                        .map_err(db_status)?;
                    tracing::info!(user = %a.name, "TOTP enrolled at login");
                    Ok((Outcome::Ok, Some(a)))
                }
                None => {
                    self.failed(Some(&a), &r.name, &r.client_ip, "bad credentials")
                        .await?;
                    Ok((Outcome::Bad, Some(a)))
                }
            };
        }
        let secret = match pending {
            Some(s) => s,
            None => {
                let s: [u8; 20] = random()?;
                let sealed = self.sealer.seal(&a.name, &s).map_err(seal_status)?;
                self.db()
                    .set_web_totp_pending(&a.name, &sealed)
                    .await
                    .map_err(db_status)?;
                s.to_vec()
            }
        };
        Ok((Outcome::Enrol(totp_uri(&a.name, &secret)), Some(a)))
    }

    async fn create_session(
        &self,
        a: &WebAccountRecord,
        ip: &str,
    ) -> Result<(String, String, i64), Status> {
        let at = now();
        let lifetime = secs(self.store.effective().duration("web.session_lifetime")).max(60);
        let id = hex(&random::<32>()?);
        let csrf = hex(&random::<32>()?);
        let expires = at.saturating_add(lifetime);
        self.db()
            .create_web_session(&digest(&id), &a.name, &csrf, &loggable_ip(ip), at, expires)
            .await
            .map_err(db_status)?;
        Ok((id, csrf, expires))
    }

    async fn session_principal(&self, session_id: &str) -> Result<WebAuthenticateResponse, Status> {
        let gone = || Status::unauthenticated("the session has ended or expired: log in again");
        if session_id.len() != 64 || !session_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(gone());
        }
        let id_hash = digest(session_id);
        let s = self
            .db()
            .web_session(&id_hash)
            .await
            .map_err(db_status)?
            .ok_or_else(gone)?;
        let at = now();
        if s.expires_at <= at {
            self.db()
                .delete_web_session(&id_hash)
                .await
                .map_err(db_status)?;
            return Err(gone());
        }
        // A users' portal session (an SMTP AUTH login, a directory login or a digest
        // link): no web account.
        if s.account.contains(':') {
            let principal =
                crate::portal_login::principal(&self.store.effective(), self.db(), &s.account)
                    .await?
                    .ok_or_else(gone)?;
            return Ok(WebAuthenticateResponse {
                principal: Some(principal),
                csrf_token: s.csrf_token,
                expires_at_unix: s.expires_at,
            });
        }
        let a = self
            .db()
            .web_account(&s.account)
            .await
            .map_err(db_status)?
            .ok_or_else(gone)?;
        if at - s.last_seen >= TOUCH_EVERY {
            self.db()
                .touch_web_session(&id_hash, at)
                .await
                .map_err(db_status)?;
        }
        Ok(WebAuthenticateResponse {
            principal: Some(self.principal(&a).await?),
            csrf_token: s.csrf_token,
            expires_at_unix: s.expires_at,
        })
    }

    async fn key_principal(&self, key: &str, ip: &str) -> Result<WebAuthenticateResponse, Status> {
        let refuse = |reason: &str| {
            tracing::warn!(
                "web login failed client={} user=api-key reason=\"{reason}\"",
                loggable_ip(ip)
            );
            self.info.counters.add("web_login_failed", 1);
            Status::unauthenticated(format!("the API key is {reason}"))
        };
        let Some((id, secret)) = key
            .trim()
            .strip_prefix(KEY_PREFIX)
            .and_then(|rest| rest.split_once('_'))
        else {
            return Err(refuse("not one (mbk_ID_SECRET)"));
        };
        if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(refuse("unknown"));
        }
        let Some(k) = self.db().api_key(id).await.map_err(db_status)? else {
            return Err(refuse("unknown"));
        };
        if !same(&digest(secret), &k.secret_hash) {
            return Err(refuse("unknown"));
        }
        let at = now();
        if k.revoked_at != 0 {
            return Err(refuse("revoked"));
        }
        if k.expires_at != 0 && k.expires_at <= at {
            return Err(refuse("expired"));
        }
        if at - k.last_used >= TOUCH_EVERY {
            self.db().touch_api_key(id, at).await.map_err(db_status)?;
        }
        Ok(WebAuthenticateResponse {
            principal: Some(WebPrincipal {
                name: format!("key:{id}"),
                role: k.role.wire(),
                domains: k.domains,
                addresses: k.addresses,
                via: "key".into(),
            }),
            csrf_token: String::new(),
            expires_at_unix: k.expires_at,
        })
    }

    async fn existing(&self, name: &str) -> Result<WebAccountRecord, Status> {
        let name = account_name(name)?;
        self.db()
            .web_account(&name)
            .await
            .map_err(db_status)?
            .ok_or_else(|| {
                Status::not_found(format!("no web account {name}; see `mb-web account list`"))
            })
    }

    async fn check_smtp_user(&self, smtp_user: &str) -> Result<(), Status> {
        if smtp_user.is_empty() {
            return Ok(());
        }
        if self
            .db()
            .user_hash(smtp_user)
            .await
            .map_err(db_status)?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "no SMTP account {smtp_user}; add it with `mb-user add {smtp_user}`, or give the user --addresses"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl WebAccounts for WebAccountsService {
    async fn create(
        &self,
        req: Request<WebAccountCreateRequest>,
    ) -> Result<Response<WebAccountCreateResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let by = actor(&who, &r.actor).to_string();
        let name = account_name(&r.name)?;
        check_password(&r.password)?;
        let s = scope(r.role, &r.domains, &r.addresses, &r.smtp_user, false)?;
        self.check_smtp_user(&s.smtp_user).await?;
        let hash = hash_password(r.password).await?;
        let at = now();
        let totp = if r.totp {
            let secret: [u8; 20] = random()?;
            let sealed = self.sealer.seal(&name, &secret).map_err(seal_status)?;
            Some((sealed, totp_uri(&name, &secret)))
        } else {
            None
        };
        let rec = WebAccountRecord {
            name: name.clone(),
            password_hash: hash,
            role: s.role,
            domains: s.domains,
            addresses: s.addresses,
            smtp_user: s.smtp_user,
            totp_secret: totp.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
            totp_pending: String::new(),
            totp_last_step: 0,
            failed_count: 0,
            failed_since: 0,
            locked_until: 0,
            created_at: at,
            created_by: by.clone(),
            updated_at: at,
            last_login: 0,
        };
        let mut new = describe(rec.role, &rec.domains, &rec.addresses, &rec.smtp_user);
        if totp.is_some() {
            new.push_str(" totp=enrolled");
        }
        let audit = WebAudit {
            key: format!("web-account:{name}"),
            action: "create",
            old: None,
            new: Some(new),
            uid: who.uid,
            user: &by,
            at,
        };
        if !self
            .db()
            .create_web_account(&rec, &audit)
            .await
            .map_err(db_status)?
        {
            return Err(Status::already_exists(format!(
                "web account {name} exists; change it with `mb-web account passwd {name}` or delete it first"
            )));
        }
        tracing::info!(user = %name, role = rec.role.as_str(), by = %by, "web account created");
        Ok(Response::new(WebAccountCreateResponse {
            account: Some(rec.wire()),
            totp: totp.map(|t| t.1),
        }))
    }

    async fn delete(
        &self,
        req: Request<WebAccountDeleteRequest>,
    ) -> Result<Response<WebAccountDeleteResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let by = actor(&who, &r.actor).to_string();
        let a = self.existing(&r.name).await?;
        let audit = WebAudit {
            key: format!("web-account:{}", a.name),
            action: "delete",
            old: Some(describe(a.role, &a.domains, &a.addresses, &a.smtp_user)),
            new: None,
            uid: who.uid,
            user: &by,
            at: now(),
        };
        let sessions = self
            .db()
            .delete_web_account(&a.name, &audit)
            .await
            .map_err(db_status)?;
        let Some(sessions) = sessions else {
            return Err(Status::not_found(format!("no web account {}", a.name)));
        };
        tracing::info!(user = %a.name, by = %by, sessions, "web account deleted");
        Ok(Response::new(WebAccountDeleteResponse {
            deleted: true,
            sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
        }))
    }

    async fn list(
        &self,
        _req: Request<WebAccountListRequest>,
    ) -> Result<Response<WebAccountListResponse>, Status> {
        let accounts = self
            .db()
            .web_accounts()
            .await
            .map_err(db_status)?
            .iter()
            .map(WebAccountRecord::wire)
            .collect();
        Ok(Response::new(WebAccountListResponse { accounts }))
    }

    async fn set_password(
        &self,
        req: Request<WebSetPasswordRequest>,
    ) -> Result<Response<WebAccount>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let by = actor(&who, &r.actor).to_string();
        check_password(&r.password)?;
        let a = self.existing(&r.name).await?;
        let hash = hash_password(r.password).await?;
        let at = now();
        let audit = WebAudit {
            key: format!("web-account:{}", a.name),
            action: "password",
            old: None,
            new: Some("changed; sessions ended, lock cleared".into()),
            uid: who.uid,
            user: &by,
            at,
        };
        let ended = self
            .db()
            .set_web_password(&a.name, &hash, at, &audit)
            .await
            .map_err(db_status)?;
        tracing::info!(user = %a.name, by = %by, sessions = ended, "web password changed");
        let a = self.existing(&a.name).await?;
        Ok(Response::new(a.wire()))
    }

    async fn set_role(
        &self,
        req: Request<WebSetRoleRequest>,
    ) -> Result<Response<WebAccount>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let by = actor(&who, &r.actor).to_string();
        let a = self.existing(&r.name).await?;
        let s = scope(r.role, &r.domains, &r.addresses, &r.smtp_user, false)?;
        self.check_smtp_user(&s.smtp_user).await?;
        let at = now();
        let audit = WebAudit {
            key: format!("web-account:{}", a.name),
            action: "role",
            old: Some(describe(a.role, &a.domains, &a.addresses, &a.smtp_user)),
            new: Some(describe(s.role, &s.domains, &s.addresses, &s.smtp_user)),
            uid: who.uid,
            user: &by,
            at,
        };
        self.db()
            .set_web_role(&a.name, &s, at, &audit)
            .await
            .map_err(db_status)?;
        tracing::info!(user = %a.name, role = s.role.as_str(), by = %by, "web role changed");
        let a = self.existing(&a.name).await?;
        Ok(Response::new(a.wire()))
    }

    async fn enrol_totp(
        &self,
        req: Request<WebTotpRequest>,
    ) -> Result<Response<WebTotpResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let by = actor(&who, &r.actor).to_string();
        let a = self.existing(&r.name).await?;
        let at = now();
        let (sealed, shown) = if r.remove {
            (String::new(), None)
        } else {
            let secret: [u8; 20] = random()?;
            (
                self.sealer.seal(&a.name, &secret).map_err(seal_status)?,
                Some(totp_uri(&a.name, &secret)),
            )
        };
        let audit = WebAudit {
            key: format!("web-account:{}", a.name),
            action: if r.remove {
                "totp-remove"
            } else {
                "totp-enrol"
            },
            old: None,
            new: Some(if r.remove { "removed" } else { "new secret" }.into()),
            uid: who.uid,
            user: &by,
            at,
        };
        self.db()
            .set_web_totp(&a.name, &sealed, at, &audit)
            .await
            .map_err(db_status)?;
        tracing::info!(user = %a.name, by = %by, removed = r.remove, "web TOTP changed");
        let a = self.existing(&a.name).await?;
        Ok(Response::new(WebTotpResponse {
            account: Some(a.wire()),
            secret: shown,
        }))
    }

    async fn login(
        &self,
        req: Request<WebLoginRequest>,
    ) -> Result<Response<WebLoginResponse>, Status> {
        let r = req.into_inner();
        let (outcome, account) = self.decide(&r).await?;
        let mut out = WebLoginResponse::default();
        match outcome {
            Outcome::Ok => {
                let Some(a) = account else {
                    return Err(Status::internal("a login without an account"));
                };
                let at = now();
                self.db()
                    .record_web_success(&a.name, at)
                    .await
                    .map_err(db_status)?;
                let (id, csrf, expires) = self.create_session(&a, &r.client_ip).await?;
                self.info.counters.add("web_logins", 1);
                tracing::info!(
                    "web login client={} user={}",
                    loggable_ip(&r.client_ip),
                    a.name
                );
                out.outcome = WebLoginOutcome::WebLoginOk as i32;
                out.session_id = id;
                out.csrf_token = csrf;
                out.expires_at_unix = expires;
                out.principal = Some(self.principal(&a).await?);
            }
            Outcome::Bad => out.outcome = WebLoginOutcome::WebLoginBadCredentials as i32,
            Outcome::TotpRequired => out.outcome = WebLoginOutcome::WebLoginTotpRequired as i32,
            Outcome::Enrol(secret) => {
                out.outcome = WebLoginOutcome::WebLoginTotpEnrol as i32;
                out.enrol = Some(secret);
            }
            Outcome::Locked(left) => {
                out.outcome = WebLoginOutcome::WebLoginLockedOut as i32;
                out.retry_after_seconds = u64::try_from(left).unwrap_or(0);
            }
        }
        Ok(Response::new(out))
    }

    async fn authenticate(
        &self,
        req: Request<WebAuthenticateRequest>,
    ) -> Result<Response<WebAuthenticateResponse>, Status> {
        let r = req.into_inner();
        let out = match r.credential {
            Some(Credential::SessionId(id)) => self.session_principal(&id).await?,
            Some(Credential::ApiKey(key)) => self.key_principal(&key, &r.client_ip).await?,
            None => return Err(Status::unauthenticated("no credential")),
        };
        Ok(Response::new(out))
    }

    async fn logout(
        &self,
        req: Request<WebLogoutRequest>,
    ) -> Result<Response<WebLogoutResponse>, Status> {
        let id = req.into_inner().session_id;
        let ended = self
            .db()
            .delete_web_session(&digest(&id))
            .await
            .map_err(db_status)?;
        Ok(Response::new(WebLogoutResponse { ended }))
    }

    async fn create_key(
        &self,
        req: Request<WebKeyCreateRequest>,
    ) -> Result<Response<WebKeyCreateResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let by = actor(&who, &r.actor).to_string();
        let s = scope(r.role, &r.domains, &r.addresses, "", true)?;
        let at = now();
        if r.expires_at_unix != 0 && r.expires_at_unix <= at {
            return Err(Status::invalid_argument(
                "the expiry is in the past: give a time to come (--expires 90d)",
            ));
        }
        if r.description.len() > 255 || r.description.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "the description must be at most 255 bytes, without control characters",
            ));
        }
        let id = hex(&random::<6>()?);
        let secret = hex(&random::<32>()?);
        let rec = ApiKeyRecord {
            id: id.clone(),
            secret_hash: digest(&secret),
            description: r.description,
            role: s.role,
            domains: s.domains,
            addresses: s.addresses,
            created_at: at,
            created_by: by.clone(),
            expires_at: r.expires_at_unix,
            revoked_at: 0,
            last_used: 0,
        };
        let mut new = describe(rec.role, &rec.domains, &rec.addresses, "");
        new.push_str(&format!(" expires={}", rec.expires_at));
        let audit = WebAudit {
            key: format!("web-key:{id}"),
            action: "key-create",
            old: None,
            new: Some(new),
            uid: who.uid,
            user: &by,
            at,
        };
        self.db()
            .create_api_key(&rec, &audit)
            .await
            .map_err(db_status)?;
        tracing::info!(key = %id, role = rec.role.as_str(), by = %by, "API key created");
        Ok(Response::new(WebKeyCreateResponse {
            key: Some(rec.wire()),
            secret: format!("{KEY_PREFIX}{id}_{secret}"),
        }))
    }

    async fn list_keys(
        &self,
        _req: Request<WebKeyListRequest>,
    ) -> Result<Response<WebKeyListResponse>, Status> {
        let keys = self
            .db()
            .api_keys()
            .await
            .map_err(db_status)?
            .iter()
            .map(ApiKeyRecord::wire)
            .collect();
        Ok(Response::new(WebKeyListResponse { keys }))
    }

    async fn revoke_key(
        &self,
        req: Request<WebKeyRevokeRequest>,
    ) -> Result<Response<WebApiKey>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let by = actor(&who, &r.actor).to_string();
        let id = r.id.trim().to_ascii_lowercase();
        let not_found = || Status::not_found(format!("no API key {id}; see `mb-web key list`"));
        let k = self
            .db()
            .api_key(&id)
            .await
            .map_err(db_status)?
            .ok_or_else(not_found)?;
        if k.revoked_at != 0 {
            return Ok(Response::new(k.wire()));
        }
        let at = now();
        let audit = WebAudit {
            key: format!("web-key:{id}"),
            action: "key-revoke",
            old: Some(describe(k.role, &k.domains, &k.addresses, "")),
            new: Some("revoked".into()),
            uid: who.uid,
            user: &by,
            at,
        };
        self.db()
            .revoke_api_key(&id, at, &audit)
            .await
            .map_err(db_status)?;
        tracing::info!(key = %id, by = %by, "API key revoked");
        let k = self
            .db()
            .api_key(&id)
            .await
            .map_err(db_status)?
            .ok_or_else(not_found)?;
        Ok(Response::new(k.wire()))
    }
}

const ACCOUNT_COLUMNS: &str = "name, password_hash, role, domains, addresses, smtp_user, totp_secret, totp_pending, totp_last_step, failed_count, failed_since, locked_until, created_at, created_by, updated_at, last_login";

const KEY_COLUMNS: &str = "id, secret_hash, description, role, domains, addresses, created_at, created_by, expires_at, revoked_at, last_used";

fn role_of(r: &AnyRow, i: usize) -> Result<Role, DbError> {
    let text: String = r.try_get(i)?;
    Role::parse(&text).ok_or_else(|| {
        DbError::Query(sqlx::Error::Decode(
            format!("unknown web role {text:?}").into(),
        ))
    })
}

fn account_record(r: &AnyRow) -> Result<WebAccountRecord, DbError> {
    Ok(WebAccountRecord {
        name: r.try_get(0)?,
        password_hash: r.try_get(1)?,
        role: role_of(r, 2)?,
        domains: unlines(&r.try_get::<String, _>(3)?),
        addresses: unlines(&r.try_get::<String, _>(4)?),
        smtp_user: r.try_get(5)?,
        totp_secret: r.try_get(6)?,
        totp_pending: r.try_get(7)?,
        totp_last_step: r.try_get(8)?,
        failed_count: r.try_get(9)?,
        failed_since: r.try_get(10)?,
        locked_until: r.try_get(11)?,
        created_at: r.try_get(12)?,
        created_by: r.try_get(13)?,
        updated_at: r.try_get(14)?,
        last_login: r.try_get(15)?,
    })
}

fn key_record(r: &AnyRow) -> Result<ApiKeyRecord, DbError> {
    Ok(ApiKeyRecord {
        id: r.try_get(0)?,
        secret_hash: r.try_get(1)?,
        description: r.try_get(2)?,
        role: role_of(r, 3)?,
        domains: unlines(&r.try_get::<String, _>(4)?),
        addresses: unlines(&r.try_get::<String, _>(5)?),
        created_at: r.try_get(6)?,
        created_by: r.try_get(7)?,
        expires_at: r.try_get(8)?,
        revoked_at: r.try_get(9)?,
        last_used: r.try_get(10)?,
    })
}

/// Tables `web_accounts`, `web_sessions` and `web_api_keys` (migration 0015); each
/// change and its audit entry in one transaction.
impl Db {
    async fn web_audit(
        &self,
        conn: &mut sqlx::AnyConnection,
        a: &WebAudit<'_>,
    ) -> Result<(), DbError> {
        self.write_audit(
            conn,
            &crate::db::AuditLine {
                key: &a.key,
                action: a.action,
                old: a.old.as_deref(),
                new: a.new.as_deref(),
                uid: a.uid,
                user: a.user,
                at: a.at,
            },
        )
        .await
    }

    pub async fn web_account(&self, name: &str) -> Result<Option<WebAccountRecord>, DbError> {
        let row = sqlx::query(self.sql(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM web_accounts WHERE name = ?"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(account_record).transpose()
    }

    pub async fn web_accounts(&self) -> Result<Vec<WebAccountRecord>, DbError> {
        let rows = sqlx::query(self.sql(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM web_accounts ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(account_record).collect()
    }

    /// False when an account of that name exists.
    pub async fn create_web_account(
        &self,
        a: &WebAccountRecord,
        audit: &WebAudit<'_>,
    ) -> Result<bool, DbError> {
        let mut tx = self.write_tx().await?;
        if sqlx::query(self.sql("SELECT 1 FROM web_accounts WHERE name = ?"))
            .bind(&a.name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Ok(false);
        }
        sqlx::query(self.sql(&format!(
            "INSERT INTO web_accounts ({ACCOUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )))
        .bind(&a.name)
        .bind(&a.password_hash)
        .bind(a.role.as_str())
        .bind(lines(&a.domains))
        .bind(lines(&a.addresses))
        .bind(&a.smtp_user)
        .bind(&a.totp_secret)
        .bind(&a.totp_pending)
        .bind(a.totp_last_step)
        .bind(a.failed_count)
        .bind(a.failed_since)
        .bind(a.locked_until)
        .bind(a.created_at)
        .bind(&a.created_by)
        .bind(a.updated_at)
        .bind(a.last_login)
        .execute(&mut *tx)
        .await?;
        self.web_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The number of sessions ended with the account; `None` when there was none.
    pub async fn delete_web_account(
        &self,
        name: &str,
        audit: &WebAudit<'_>,
    ) -> Result<Option<u64>, DbError> {
        let mut tx = self.write_tx().await?;
        let gone = sqlx::query(self.sql("DELETE FROM web_accounts WHERE name = ?"))
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone == 0 {
            return Ok(None);
        }
        let sessions = sqlx::query(self.sql("DELETE FROM web_sessions WHERE account = ?"))
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        self.web_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(sessions))
    }

    /// A new password ends the account's sessions and clears its lock; returns how
    /// many sessions ended.
    pub async fn set_web_password(
        &self,
        name: &str,
        hash: &str,
        at: i64,
        audit: &WebAudit<'_>,
    ) -> Result<u64, DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(self.sql(
            "UPDATE web_accounts SET password_hash = ?, failed_count = 0, failed_since = 0, locked_until = 0, updated_at = ? WHERE name = ?",
        ))
        .bind(hash)
        .bind(at)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let ended = sqlx::query(self.sql("DELETE FROM web_sessions WHERE account = ?"))
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        self.web_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(ended)
    }

    async fn set_web_role(
        &self,
        name: &str,
        s: &Scope,
        at: i64,
        audit: &WebAudit<'_>,
    ) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(self.sql(
            "UPDATE web_accounts SET role = ?, domains = ?, addresses = ?, smtp_user = ?, updated_at = ? WHERE name = ?",
        ))
        .bind(s.role.as_str())
        .bind(lines(&s.domains))
        .bind(lines(&s.addresses))
        .bind(&s.smtp_user)
        .bind(at)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        self.web_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets (or, with an empty value, removes) the enrolled secret.
    pub async fn set_web_totp(
        &self,
        name: &str,
        sealed: &str,
        at: i64,
        audit: &WebAudit<'_>,
    ) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(self.sql(
            "UPDATE web_accounts SET totp_secret = ?, totp_pending = '', totp_last_step = 0, updated_at = ? WHERE name = ?",
        ))
        .bind(sealed)
        .bind(at)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        self.web_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_web_totp_pending(&self, name: &str, sealed: &str) -> Result<(), DbError> {
        sqlx::query(
            self.sql(
                "UPDATE web_accounts SET totp_pending = ? WHERE name = ? AND totp_secret = ''",
            ),
        )
        .bind(sealed)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The pending secret becomes the enrolled one.
    async fn confirm_web_totp(
        &self,
        name: &str,
        step: i64,
        audit: &WebAudit<'_>,
    ) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(self.sql(
            "UPDATE web_accounts SET totp_secret = totp_pending, totp_pending = '', totp_last_step = ?, updated_at = ? WHERE name = ? AND totp_pending <> ''",
        ))
        .bind(step)
        .bind(audit.at)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        self.web_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the step of an accepted code, only forwards: of two logins racing with
    /// the same code, one wins.
    async fn set_web_totp_step(&self, name: &str, step: i64) -> Result<bool, DbError> {
        let r = sqlx::query(self.sql(
            "UPDATE web_accounts SET totp_last_step = ? WHERE name = ? AND totp_last_step < ?",
        ))
        .bind(step)
        .bind(name)
        .bind(step)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Counts a failure in the account's window; returns the end of the lock when this
    /// failure reached `max`.
    pub async fn record_web_failure(
        &self,
        name: &str,
        at: i64,
        window: i64,
        max: i64,
    ) -> Result<Option<i64>, DbError> {
        let mut tx = self.write_tx().await?;
        let Some(row) = sqlx::query(
            self.sql("SELECT failed_count, failed_since FROM web_accounts WHERE name = ?"),
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let (count, since): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        let (count, since) = if since == 0 || at - since >= window {
            (1, at)
        } else {
            (count + 1, since)
        };
        let locked_until = if count >= max { at + window } else { 0 };
        // A lock starts a new window: the failures that caused it are spent.
        let (count, since) = if locked_until != 0 {
            (0, 0)
        } else {
            (count, since)
        };
        sqlx::query(self.sql(
            "UPDATE web_accounts SET failed_count = ?, failed_since = ?, locked_until = ? WHERE name = ?",
        ))
        .bind(count)
        .bind(since)
        .bind(locked_until)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((locked_until != 0).then_some(locked_until))
    }

    pub async fn record_web_success(&self, name: &str, at: i64) -> Result<(), DbError> {
        sqlx::query(self.sql(
            "UPDATE web_accounts SET failed_count = 0, failed_since = 0, locked_until = 0, last_login = ? WHERE name = ?",
        ))
        .bind(at)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores a session and forgets the expired ones.
    pub async fn create_web_session(
        &self,
        id_hash: &str,
        account: &str,
        csrf: &str,
        client_ip: &str,
        at: i64,
        expires_at: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(self.sql("DELETE FROM web_sessions WHERE expires_at <= ?"))
            .bind(at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(self.sql(
            "INSERT INTO web_sessions (id_hash, account, csrf_token, client_ip, created_at, expires_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(id_hash)
        .bind(account)
        .bind(csrf)
        .bind(client_ip)
        .bind(at)
        .bind(expires_at)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn web_session(&self, id_hash: &str) -> Result<Option<SessionRecord>, DbError> {
        let row = sqlx::query(self.sql(
            "SELECT account, csrf_token, expires_at, last_seen FROM web_sessions WHERE id_hash = ?",
        ))
        .bind(id_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(SessionRecord {
                account: r.try_get(0)?,
                csrf_token: r.try_get(1)?,
                expires_at: r.try_get(2)?,
                last_seen: r.try_get(3)?,
            })
        })
        .transpose()
    }

    async fn touch_web_session(&self, id_hash: &str, at: i64) -> Result<(), DbError> {
        sqlx::query(self.sql("UPDATE web_sessions SET last_seen = ? WHERE id_hash = ?"))
            .bind(at)
            .bind(id_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_web_session(&self, id_hash: &str) -> Result<bool, DbError> {
        let r = sqlx::query(self.sql("DELETE FROM web_sessions WHERE id_hash = ?"))
            .bind(id_hash)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn create_api_key(
        &self,
        k: &ApiKeyRecord,
        audit: &WebAudit<'_>,
    ) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(self.sql(&format!(
            "INSERT INTO web_api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )))
        .bind(&k.id)
        .bind(&k.secret_hash)
        .bind(&k.description)
        .bind(k.role.as_str())
        .bind(lines(&k.domains))
        .bind(lines(&k.addresses))
        .bind(k.created_at)
        .bind(&k.created_by)
        .bind(k.expires_at)
        .bind(k.revoked_at)
        .bind(k.last_used)
        .execute(&mut *tx)
        .await?;
        self.web_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, DbError> {
        let row = sqlx::query(self.sql(&format!(
            "SELECT {KEY_COLUMNS} FROM web_api_keys WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_record).transpose()
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, DbError> {
        let rows = sqlx::query(self.sql(&format!(
            "SELECT {KEY_COLUMNS} FROM web_api_keys ORDER BY created_at, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_record).collect()
    }

    pub async fn revoke_api_key(
        &self,
        id: &str,
        at: i64,
        audit: &WebAudit<'_>,
    ) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            self.sql("UPDATE web_api_keys SET revoked_at = ? WHERE id = ? AND revoked_at = 0"),
        )
        .bind(at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        self.web_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn touch_api_key(&self, id: &str, at: i64) -> Result<(), DbError> {
        sqlx::query(self.sql("UPDATE web_api_keys SET last_used = ? WHERE id = ?"))
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service over a fresh SQLite database in a temp dir, with `extra` TOML.
    async fn service(tag: &str, extra: &str) -> (WebAccountsService, PathBuf) {
        let dir = std::env::temp_dir().join(format!("mb-web-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = Db::open(&url, 2).await.expect("open");
        let toml = format!("[paths]\ndata_dir = \"{}\"\n{extra}", dir.display());
        let cfg = mb_core::Config::from_toml_str(&toml, "test").expect("config");
        let store = Arc::new(Store::open(db, cfg, None).await.expect("store"));
        let svc =
            WebAccountsService::new(store, DaemonInfo::new("mb-rpcd"), dir.join("web-totp.key"));
        (svc, dir)
    }

    async fn create(
        svc: &WebAccountsService,
        name: &str,
        role: WebRole,
        scope: &[&str],
        totp: bool,
    ) -> WebAccountCreateResponse {
        let list: Vec<String> = scope.iter().map(|s| s.to_string()).collect();
        let (domains, addresses) = match role {
            WebRole::DomainAdmin => (list, Vec::new()),
            _ => (Vec::new(), list),
        };
        svc.create(Request::new(WebAccountCreateRequest {
            name: name.into(),
            password: "correct horse battery".into(),
            role: role as i32,
            domains,
            addresses,
            totp,
            actor: "tester".into(),
            ..Default::default()
        }))
        .await
        .expect("create")
        .into_inner()
    }

    async fn login(
        svc: &WebAccountsService,
        name: &str,
        password: &str,
        totp: &str,
    ) -> WebLoginResponse {
        svc.login(Request::new(WebLoginRequest {
            name: name.into(),
            password: password.into(),
            totp: totp.into(),
            client_ip: "192.0.2.7".into(),
        }))
        .await
        .expect("login")
        .into_inner()
    }

    fn outcome(r: &WebLoginResponse) -> WebLoginOutcome {
        WebLoginOutcome::try_from(r.outcome).unwrap()
    }

    async fn authenticate(
        svc: &WebAccountsService,
        c: Credential,
    ) -> Result<WebAuthenticateResponse, Status> {
        svc.authenticate(Request::new(WebAuthenticateRequest {
            credential: Some(c),
            client_ip: "192.0.2.7".into(),
        }))
        .await
        .map(Response::into_inner)
    }

    fn code_now(secret: &WebTotpSecret, offset: i64) -> String {
        let raw = unbase32(&secret.base32).unwrap();
        totp_code(&raw, now().div_euclid(TOTP_STEP) + offset)
    }

    #[test]
    fn totp_follows_rfc_6238() {
        // RFC 6238 appendix B, SHA-1, truncated to six digits.
        let secret = b"12345678901234567890";
        for (time, code) in [
            (59, "287082"),
            (1_111_111_109, "081804"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
        ] {
            assert_eq!(totp_code(secret, time / 30), code, "{time}");
        }
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(unbase32("mzxw 6ytb oi======").unwrap(), b"foobar");
        // A code works once: not for the step already used, nor for an earlier one.
        let at = 1_234_567_890;
        assert_eq!(totp_step(secret, "005924", at, 0), Some(at / 30));
        assert_eq!(totp_step(secret, "005924", at, at / 30), None);
        assert_eq!(totp_step(secret, "005925", at, 0), None);
        assert_eq!(totp_step(secret, "5924", at, 0), None);
    }

    #[test]
    fn sealed_secrets_open_only_for_their_account_and_key() {
        let dir = std::env::temp_dir().join(format!("mb-web-seal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sealer = Sealer {
            path: dir.join("web-totp.key"),
            key: Mutex::new(None),
        };
        let sealed = sealer.seal("alice", b"twenty bytes secret!").unwrap();
        assert!(!sealed.contains(&hex(b"twenty bytes secret!")));
        assert_eq!(
            sealer.open("alice", &sealed).unwrap(),
            b"twenty bytes secret!"
        );
        assert!(matches!(
            sealer.open("bob", &sealed),
            Err(SealError::Open { .. })
        ));
        let mode = std::fs::metadata(&sealer.path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Another key (the database restored without its key file) opens nothing.
        std::fs::remove_file(&sealer.path).unwrap();
        let other = Sealer {
            path: sealer.path.clone(),
            key: Mutex::new(None),
        };
        assert!(matches!(
            other.open("alice", &sealed),
            Err(SealError::Open { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn scopes_fit_their_roles() {
        let s = |role: WebRole, d: &[&str], a: &[&str], smtp: &str| {
            let d: Vec<String> = d.iter().map(|x| x.to_string()).collect();
            let a: Vec<String> = a.iter().map(|x| x.to_string()).collect();
            scope(role as i32, &d, &a, smtp, false).map(|s| (s.domains, s.addresses))
        };
        assert!(s(WebRole::Admin, &[], &[], "").is_ok());
        assert!(s(WebRole::Admin, &["a.test"], &[], "").is_err());
        assert!(s(WebRole::Unspecified, &[], &[], "").is_err());
        assert_eq!(
            s(WebRole::DomainAdmin, &["A.Test.", "a.test"], &[], "")
                .unwrap()
                .0,
            ["a.test"]
        );
        assert!(s(WebRole::DomainAdmin, &[], &[], "").is_err());
        assert!(s(WebRole::DomainAdmin, &["a b.test"], &[], "").is_err());
        assert_eq!(
            s(WebRole::User, &[], &["Jane@A.test"], "").unwrap().1,
            ["jane@a.test"]
        );
        assert!(s(WebRole::User, &[], &["@a.test"], "").is_err());
        assert!(s(WebRole::User, &[], &[], "").is_err());
        assert!(s(WebRole::User, &[], &[], "jane").is_ok());
        assert!(account_name("key:1").is_err());
        assert_eq!(account_name(" Alice ").unwrap(), "alice");
    }

    #[tokio::test]
    async fn lockout_after_failures_refuses_even_the_right_password() {
        let (svc, dir) = service(
            "lockout",
            "[web]\ntotp_required = \"\"\n\"lockout.failures\" = 3\n",
        )
        .await;
        create(&svc, "bob", WebRole::Admin, &[], false).await;
        // An unknown name and a wrong password get the same answer.
        let r = login(&svc, "nobody", "correct horse battery", "").await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginBadCredentials);
        for _ in 0..3 {
            let r = login(&svc, "bob", "wrong password!!", "").await;
            assert_eq!(outcome(&r), WebLoginOutcome::WebLoginBadCredentials);
        }
        let r = login(&svc, "bob", "correct horse battery", "").await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginLockedOut);
        assert!(
            r.retry_after_seconds > 800 && r.retry_after_seconds <= 900,
            "{r:?}"
        );
        assert!(r.session_id.is_empty());
        // A new password (an administrator's reset) clears the lock.
        svc.set_password(Request::new(WebSetPasswordRequest {
            name: "bob".into(),
            password: "another good one".into(),
            actor: "tester".into(),
        }))
        .await
        .unwrap();
        let r = login(&svc, "BOB", "another good one", "").await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginOk);
        // Failures spread over more than the window never lock.
        let a = svc.db().web_account("bob").await.unwrap().unwrap();
        assert_eq!((a.failed_count, a.locked_until), (0, 0));
        assert_eq!(
            svc.db()
                .record_web_failure("bob", 1000, 900, 3)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            svc.db()
                .record_web_failure("bob", 1500, 900, 3)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            svc.db()
                .record_web_failure("bob", 2000, 900, 3)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            svc.db()
                .record_web_failure("bob", 2100, 900, 3)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            svc.db()
                .record_web_failure("bob", 2200, 900, 3)
                .await
                .unwrap(),
            Some(3100)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn sessions_authenticate_until_logout_expiry_or_deletion() {
        let (svc, dir) = service("sessions", "[web]\ntotp_required = \"\"\n").await;
        create(&svc, "dora", WebRole::DomainAdmin, &["a.test"], false).await;
        let r = login(&svc, "dora", "correct horse battery", "").await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginOk);
        assert_eq!(r.session_id.len(), 64);
        let p = r.principal.clone().unwrap();
        assert_eq!(
            (p.name.as_str(), p.domains.as_slice()),
            ("dora", &["a.test".to_string()][..])
        );
        // Only a digest of the id is stored.
        let stored = svc.db().web_session(&r.session_id).await.unwrap();
        assert!(stored.is_none());
        let a = authenticate(&svc, Credential::SessionId(r.session_id.clone()))
            .await
            .unwrap();
        assert_eq!(a.csrf_token, r.csrf_token);
        assert_eq!(a.principal.unwrap().role, WebRole::DomainAdmin as i32);
        // A role change applies to the running session at once.
        svc.set_role(Request::new(WebSetRoleRequest {
            name: "dora".into(),
            role: WebRole::DomainAdmin as i32,
            domains: vec!["b.test".into()],
            ..Default::default()
        }))
        .await
        .unwrap();
        let a = authenticate(&svc, Credential::SessionId(r.session_id.clone()))
            .await
            .unwrap();
        assert_eq!(a.principal.unwrap().domains, ["b.test"]);
        // Logout ends it.
        assert!(
            svc.logout(Request::new(WebLogoutRequest {
                session_id: r.session_id.clone()
            }))
            .await
            .unwrap()
            .into_inner()
            .ended
        );
        assert!(
            authenticate(&svc, Credential::SessionId(r.session_id))
                .await
                .is_err()
        );
        // An expired session is refused and forgotten.
        let r = login(&svc, "dora", "correct horse battery", "").await;
        sqlx::query("UPDATE web_sessions SET expires_at = 1")
            .execute(&svc.db().pool)
            .await
            .unwrap();
        let e = authenticate(&svc, Credential::SessionId(r.session_id.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            svc.db()
                .web_session(&digest(&r.session_id))
                .await
                .unwrap()
                .is_none()
        );
        // Deleting the account ends its sessions.
        let r = login(&svc, "dora", "correct horse battery", "").await;
        let d = svc
            .delete(Request::new(WebAccountDeleteRequest {
                name: "dora".into(),
                actor: "tester".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.sessions, 1);
        assert!(
            authenticate(&svc, Credential::SessionId(r.session_id))
                .await
                .is_err()
        );
        // Every change is in the configuration audit trail, without secrets.
        let h = svc.db().history("web-account:dora", 10).await.unwrap();
        let actions: Vec<&str> = h.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["delete", "role", "create"]);
        assert_eq!(h[2].user, "tester");
        assert_eq!(
            h[1].new_value.as_deref(),
            Some("role=domain-admin domains=b.test")
        );
        assert!(h.iter().all(|e| !format!("{e:?}").contains("horse")));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn totp_is_enrolled_at_the_first_login_and_then_required() {
        let (svc, dir) = service("totp", "").await;
        create(&svc, "root-admin", WebRole::Admin, &[], false).await;
        // The password alone: a secret to enrol, no session.
        let r = login(&svc, "root-admin", "correct horse battery", "").await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginTotpEnrol);
        let secret = r.enrol.clone().unwrap();
        assert!(
            secret
                .uri
                .starts_with("otpauth://totp/Mailborder:root-admin?secret="),
            "{}",
            secret.uri
        );
        assert!(r.session_id.is_empty());
        // Asked again, the same pending secret.
        let again = login(&svc, "root-admin", "correct horse battery", "").await;
        assert_eq!(again.enrol.unwrap().base32, secret.base32);
        // The secret is not in the database in the clear.
        let a = svc.db().web_account("root-admin").await.unwrap().unwrap();
        let raw = unbase32(&secret.base32).unwrap();
        assert!(!a.totp_pending.contains(&hex(&raw)) && !a.totp_pending.contains(&secret.base32));
        // A wrong code is a failure; the right one confirms and logs in.
        let wrong = (0..)
            .map(|n| format!("{n:06}"))
            .find(|c| (-1..=1).all(|o| code_now(&secret, o) != *c))
            .unwrap();
        let r = login(&svc, "root-admin", "correct horse battery", &wrong).await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginBadCredentials);
        // The very code used, replayed below (recomputing it could give the next
        // step's code when a 30-second boundary passes meanwhile).
        let first = code_now(&secret, 0);
        let r = login(&svc, "root-admin", "correct horse battery", &first).await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginOk, "{r:?}");
        // From now on: the password alone asks for the code; a wrong password with a
        // right code is still bad credentials; a used code does not work twice.
        let r = login(&svc, "root-admin", "correct horse battery", "").await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginTotpRequired);
        let r = login(
            &svc,
            "root-admin",
            "wrong password!!",
            &code_now(&secret, 1),
        )
        .await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginBadCredentials);
        let r = login(&svc, "root-admin", "correct horse battery", &first).await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginBadCredentials);
        let r = login(
            &svc,
            "root-admin",
            "correct horse battery",
            &code_now(&secret, 1),
        )
        .await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginOk);
        // A user role is not required to have one.
        create(&svc, "jane", WebRole::User, &["jane@a.test"], false).await;
        let r = login(&svc, "jane", "correct horse battery", "").await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginOk);
        // Enrolled by an administrator: shown once, then required.
        let t = svc
            .enrol_totp(Request::new(WebTotpRequest {
                name: "jane".into(),
                remove: false,
                actor: "tester".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(t.account.unwrap().totp_enrolled);
        let r = login(&svc, "jane", "correct horse battery", "").await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginTotpRequired);
        let r = login(
            &svc,
            "jane",
            "correct horse battery",
            &code_now(&t.secret.unwrap(), 0),
        )
        .await;
        assert_eq!(outcome(&r), WebLoginOutcome::WebLoginOk);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn api_keys_work_until_revoked_or_expired() {
        let (svc, dir) = service("keys", "").await;
        let k = svc
            .create_key(Request::new(WebKeyCreateRequest {
                role: WebRole::DomainAdmin as i32,
                domains: vec!["a.test".into()],
                expires_at_unix: now() + 3600,
                description: "monitoring".into(),
                actor: "tester".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let id = k.key.unwrap().id;
        assert!(k.secret.starts_with(&format!("mbk_{id}_")));
        let a = authenticate(&svc, Credential::ApiKey(k.secret.clone()))
            .await
            .unwrap();
        let p = a.principal.unwrap();
        assert_eq!(
            (p.name, p.via.as_str(), p.domains),
            (format!("key:{id}"), "key", vec!["a.test".to_string()])
        );
        let listed = svc
            .list_keys(Request::new(WebKeyListRequest {}))
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert!(listed[0].last_used_unix > 0);
        // Stored hashed only.
        let stored = svc.db().api_key(&id).await.unwrap().unwrap();
        assert!(!k.secret.contains(&stored.secret_hash));
        // A wrong secret for the right id.
        let forged = format!("mbk_{id}_{}", "0".repeat(64));
        assert!(
            authenticate(&svc, Credential::ApiKey(forged))
                .await
                .is_err()
        );
        // Revoked.
        let r = svc
            .revoke_key(Request::new(WebKeyRevokeRequest {
                id: id.clone(),
                actor: "tester".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(r.revoked_at_unix > 0);
        let e = authenticate(&svc, Credential::ApiKey(k.secret))
            .await
            .unwrap_err();
        assert!(e.message().contains("revoked"), "{e:?}");
        // Expired.
        let k = svc
            .create_key(Request::new(WebKeyCreateRequest {
                role: WebRole::Admin as i32,
                expires_at_unix: now() + 3600,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let id2 = k.key.unwrap().id;
        sqlx::query("UPDATE web_api_keys SET expires_at = 5 WHERE id = ?")
            .bind(&id2)
            .execute(&svc.db().pool)
            .await
            .unwrap();
        let e = authenticate(&svc, Credential::ApiKey(k.secret))
            .await
            .unwrap_err();
        assert!(e.message().contains("expired"), "{e:?}");
        // An expiry in the past is refused at creation.
        let e = svc
            .create_key(Request::new(WebKeyCreateRequest {
                role: WebRole::Admin as i32,
                expires_at_unix: 10,
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let h = svc
            .db()
            .history(&format!("web-key:{id}"), 10)
            .await
            .unwrap();
        let actions: Vec<&str> = h.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["key-revoke", "key-create"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_users_addresses_include_its_smtp_accounts_but_not_domain_grants() {
        let (svc, dir) = service("addresses", "[web]\ntotp_required = \"\"\n").await;
        assert!(svc.db().add_user("Jane@A.test", "x", 1).await.unwrap());
        assert!(
            svc.db()
                .add_alias("Jane@A.test", "sales@a.test", 1)
                .await
                .unwrap()
        );
        assert!(
            svc.db()
                .add_alias("Jane@A.test", "@b.test", 1)
                .await
                .unwrap()
        );
        let e = svc
            .create(Request::new(WebAccountCreateRequest {
                name: "jane".into(),
                password: "correct horse battery".into(),
                role: WebRole::User as i32,
                smtp_user: "nobody@a.test".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        svc.create(Request::new(WebAccountCreateRequest {
            name: "jane".into(),
            password: "correct horse battery".into(),
            role: WebRole::User as i32,
            addresses: vec!["jane.doe@a.test".into()],
            smtp_user: "Jane@A.test".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
        let r = login(&svc, "jane", "correct horse battery", "").await;
        assert_eq!(
            r.principal.unwrap().addresses,
            ["jane.doe@a.test", "jane@a.test", "sales@a.test"]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
