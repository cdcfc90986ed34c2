//! Users' portal logins beyond the web accounts (issue 17): the directory login (an
//! LDAP bind as the user when `ldap.url` is set), the addresses a directory session
//! sees mail for, and the lockout every portal login form shares.
//!
//! The bind happens here, in mb-rpcd, because it needs the service account
//! (`ldap.bind_password`), which mb-rpcd masks for mb-web's user (`secrets`): mb-web
//! only passes on what the user typed, as it does for an SMTP account's password.
//!
//! A directory session is stored like the other portal sessions (`web_sessions`, see
//! `digest`), under the account `ldap:LOGIN`. Its addresses are not stored: they are
//! read from the directory as the service account (the login filter again, no password)
//! and reused for `ldap.cache_ttl`, so an entry that loses an address, or is removed,
//! loses its mail at the next look; while the directory is down the last answer stands.
//!
//! The lockout counts failures per login as typed (lowercase), known or not, in
//! memory: `web.lockout.failures` within `web.lockout.window` refuse every password for
//! that login until the window has passed, so guessing cannot tell a known login from
//! an unknown one, and cannot lock the user's directory account (Active Directory's own
//! lockout) from the gateway either. A restart forgets the counts, as fail2ban (which
//! reads the same "web login failed" lines) does not.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mb_core::Config;
use mb_proto::v1::{WebPrincipal, WebRole};
use mb_runtime::ldap::{Directory, DirectoryUser, LdapError, LdapSettings};
use tonic::Status;

use crate::db::Db;

/// The session account prefix of a directory login.
pub const LDAP_PREFIX: &str = "ldap:";
/// The longest login taken: `ldap:LOGIN` must fit `web_sessions.account` (191).
pub const MAX_LOGIN: usize = 191 - LDAP_PREFIX.len();
/// Most logins whose failures or addresses are remembered (a flood of made-up logins
/// must not grow memory without bound).
const MAX_REMEMBERED: usize = 100_000;

/// What a directory login came to.
#[derive(Debug, PartialEq, Eq)]
pub enum DirectoryLogin {
    /// `ldap.url` is empty: there is no directory to ask.
    Off,
    /// Unknown, ambiguous, empty or wrong password: never which.
    Refused,
    /// The password was right: the session's account name and the entry.
    User {
        account: String,
        user: DirectoryUser,
    },
}

/// Checks `login` and `password` against the directory (search as the service account
/// with `ldap.login_filter`, bind as the entry found). An empty password is refused
/// before anything is asked: an "unauthenticated bind" succeeds on many servers.
pub async fn directory_login(
    cfg: &Config,
    login: &str,
    password: &str,
) -> Result<DirectoryLogin, LdapError> {
    let Some(dir) = directory(cfg) else {
        return Ok(DirectoryLogin::Off);
    };
    let login = login.trim();
    if password.is_empty() || login.is_empty() || login.len() > MAX_LOGIN {
        return Ok(DirectoryLogin::Refused);
    }
    let Some(user) = dir.login(login, password).await? else {
        return Ok(DirectoryLogin::Refused);
    };
    let account = format!("{LDAP_PREFIX}{login}");
    if !user.addresses.is_empty() {
        remember(&ADDRESSES, account.clone(), user.addresses.clone());
    }
    Ok(DirectoryLogin::User { account, user })
}

/// Who a portal session's account is: a directory session's addresses (read again
/// when older than `ldap.cache_ttl`), else an SMTP account's or a digest link's
/// (`digest::portal_principal`). None ends the session.
pub async fn principal(
    cfg: &Config,
    db: &Db,
    account: &str,
) -> Result<Option<WebPrincipal>, Status> {
    let Some(login) = account.strip_prefix(LDAP_PREFIX) else {
        return crate::digest::portal_principal(db, account)
            .await
            .map_err(|e| {
                tracing::error!(cause = %e, "database operation failed");
                Status::unavailable(e.to_string())
            });
    };
    // LDAP turned off ends the directory's sessions.
    let Some(dir) = directory(cfg) else {
        return Ok(None);
    };
    let cached = lock(&ADDRESSES).get(account).cloned();
    if let Some((addresses, at)) = &cached
        && at.elapsed() < dir.settings().cache_ttl
    {
        return Ok(Some(user_principal(account, addresses.clone())));
    }
    match dir.find_user(login).await {
        Ok(Some(u)) if !u.addresses.is_empty() => {
            remember(&ADDRESSES, account.to_string(), u.addresses.clone());
            Ok(Some(user_principal(account, u.addresses)))
        }
        Ok(_) => {
            lock(&ADDRESSES).remove(account);
            tracing::info!(user = %account, "directory entry gone or without addresses: portal session ended");
            Ok(None)
        }
        Err(e) => match cached {
            Some((addresses, _)) => {
                tracing::warn!(user = %account, cause = %e, "LDAP directory unavailable: keeping the session's last known addresses");
                Ok(Some(user_principal(account, addresses)))
            }
            None => Err(unavailable(&e)),
        },
    }
}

/// A portal user session's principal for `addresses`.
pub fn user_principal(account: &str, addresses: Vec<String>) -> WebPrincipal {
    WebPrincipal {
        name: account.to_string(),
        role: WebRole::User as i32,
        domains: Vec::new(),
        addresses,
        via: "session".into(),
    }
}

/// The answer for a directory that cannot be asked: a temporary failure, logged with
/// its cause, never "wrong password".
pub fn unavailable(e: &LdapError) -> Status {
    tracing::error!(cause = %e, "LDAP directory unavailable for a portal login");
    Status::unavailable(
        "the directory that checks your password cannot be reached: try again in a few minutes",
    )
}

/// Seconds until `login` may try again, when it is locked out.
pub fn locked(cfg: &Config, login: &str) -> Option<u64> {
    let window = lockout_window(cfg);
    let key = login.trim().to_lowercase();
    let failures = lock(&FAILURES);
    let f = failures.get(&key)?;
    let until = f.locked_at? + window;
    until
        .checked_duration_since(Instant::now())
        .map(|left| left.as_secs().max(1))
}

/// Counts a failed portal login for `login`; true when this failure locked it.
pub fn failed(cfg: &Config, login: &str) -> bool {
    let max = u32::try_from(cfg.int("web.lockout.failures").max(1)).unwrap_or(u32::MAX);
    let window = lockout_window(cfg);
    let key = login.trim().to_lowercase();
    let now = Instant::now();
    let mut failures = lock(&FAILURES);
    if failures.len() >= MAX_REMEMBERED && !failures.contains_key(&key) {
        failures.retain(|_, f| now.duration_since(f.since) < window);
        if failures.len() >= MAX_REMEMBERED {
            failures.clear();
        }
    }
    let f = failures.entry(key).or_insert(Failures {
        count: 0,
        since: now,
        locked_at: None,
    });
    if now.duration_since(f.since) >= window || f.locked_at.is_some() {
        // A new window: a lock that has run out starts the count again.
        *f = Failures {
            count: 0,
            since: now,
            locked_at: None,
        };
    }
    f.count += 1;
    if f.count >= max {
        f.locked_at = Some(now);
        return true;
    }
    false
}

/// A successful login clears the login's failures.
pub fn succeeded(login: &str) {
    lock(&FAILURES).remove(&login.trim().to_lowercase());
}

struct Failures {
    count: u32,
    since: Instant,
    locked_at: Option<Instant>,
}

type AddressCache = Mutex<HashMap<String, (Vec<String>, Instant)>>;

/// The directory of the current settings (a new one when they change: its pooled
/// connections are the service account's).
static DIRECTORY: LazyLock<Mutex<Option<Arc<Directory>>>> = LazyLock::new(|| Mutex::new(None));
/// Directory sessions' addresses by account, with when they were read.
static ADDRESSES: LazyLock<AddressCache> = LazyLock::new(|| Mutex::new(HashMap::new()));
static FAILURES: LazyLock<Mutex<HashMap<String, Failures>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn directory(cfg: &Config) -> Option<Arc<Directory>> {
    let settings = LdapSettings::from_config(cfg)?;
    let mut d = lock(&DIRECTORY);
    match d.as_ref() {
        Some(dir) if *dir.settings() == settings => Some(dir.clone()),
        _ => {
            let dir = Directory::new(settings);
            *d = Some(dir.clone());
            Some(dir)
        }
    }
}

fn remember(cache: &AddressCache, account: String, addresses: Vec<String>) {
    let mut c = lock(cache);
    if c.len() >= MAX_REMEMBERED && !c.contains_key(&account) {
        c.clear();
    }
    c.insert(account, (addresses, Instant::now()));
}

fn lockout_window(cfg: &Config) -> Duration {
    cfg.duration("web.lockout.window")
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mb_runtime::ldap::{DEFAULT_LOGIN_FILTER, fill_filter};

    /// A directory on port 1, where nothing listens: any question asked is an error.
    fn unreachable() -> Config {
        Config::from_toml_str(
            "[ldap]\nurl = \"ldap://127.0.0.1:1/\"\nbind_dn = \"cn=svc,dc=example,dc=test\"\nbind_password = \"pw\"\nbase = \"dc=example,dc=test\"\ntimeout = \"2s\"\n",
            "test.toml",
        )
        .expect("config")
    }

    #[test]
    fn a_login_cannot_widen_or_restructure_the_login_filter() {
        let f = fill_filter(DEFAULT_LOGIN_FILTER, "*)(uid=*");
        assert_eq!(
            f,
            r"(|(uid=\2a\29\28uid=\2a)(mail=\2a\29\28uid=\2a)(sAMAccountName=\2a\29\28uid=\2a))"
        );
        assert!(!f.contains('*') && f.matches('(').count() == 4, "{f}");
        assert_eq!(
            fill_filter("(uid=%s)", "alice)(|(uid=*"),
            r"(uid=alice\29\28|\28uid=\2a)"
        );
        assert_eq!(fill_filter("(uid=%s)", "a\\2a\0"), r"(uid=a\5c2a\00)");
    }

    #[tokio::test]
    async fn an_empty_password_is_refused_before_any_question() {
        let cfg = unreachable();
        // Refused, not a connection error: nothing was asked.
        for (login, password) in [("alice", ""), ("", "pw"), ("  ", "pw")] {
            assert_eq!(
                directory_login(&cfg, login, password).await.unwrap(),
                DirectoryLogin::Refused,
                "{login:?}"
            );
        }
        let long = "a".repeat(MAX_LOGIN + 1);
        assert_eq!(
            directory_login(&cfg, &long, "pw").await.unwrap(),
            DirectoryLogin::Refused
        );
        // With a password, the directory is asked, and its absence is an error, never a
        // refusal that would read as "wrong password".
        assert!(directory_login(&cfg, "alice", "pw").await.is_err());
        let off = Config::default();
        assert_eq!(
            directory_login(&off, "alice", "pw").await.unwrap(),
            DirectoryLogin::Off
        );
    }

    #[test]
    fn failures_lock_a_login_known_or_not_for_the_window() {
        let cfg = Config::from_toml_str(
            "[web]\n\"lockout.failures\" = 3\n\"lockout.window\" = \"10m\"\n",
            "test.toml",
        )
        .expect("config");
        let login = "Lockout-Test@Example.Test";
        assert_eq!(locked(&cfg, login), None);
        assert!(!failed(&cfg, login));
        assert!(!failed(&cfg, "lockout-test@example.test"));
        assert_eq!(locked(&cfg, login), None);
        assert!(
            failed(&cfg, " LOCKOUT-test@example.test "),
            "third failure locks"
        );
        let left = locked(&cfg, login).expect("locked");
        assert!((590..=600).contains(&left), "{left}");
        assert_eq!(locked(&cfg, "other-login"), None);
        succeeded(login);
        assert_eq!(locked(&cfg, login), None);
    }
}
