//! LDAP / Active Directory lookups: whether a recipient exists (`smtp.recipient_verification
//! = ldap`) and password checks for the users' portal, over a small pool of bound
//! connections with a positive and negative answer cache.
//!
//! Two traps shape this module. A bind that fails must never turn into an anonymous
//! search: most directories answer an anonymous search with zero entries, which would
//! read as "unknown user" and bounce real mail with 550, so every connection is bound
//! before it is used and a refused bind is an error. And an empty password is a
//! successful "unauthenticated bind" on many servers (RFC 4513 5.1.2), so `authenticate`
//! refuses it before asking.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry, SearchOptions};
use mb_core::Config;

/// Default of `ldap.login_filter`: the login as a Unix user name, a mail address or an
/// Active Directory account name.
pub const DEFAULT_LOGIN_FILTER: &str = "(|(uid=%s)(mail=%s)(sAMAccountName=%s))";

/// Default of `ldap.address_attributes`: the attributes whose values are a portal user's
/// mail addresses (OpenLDAP's `mail` and `mailAlternateAddress`, Active Directory's
/// `proxyAddresses` with its `smtp:` prefixes).
pub const DEFAULT_ADDRESS_ATTRIBUTES: &[&str] = &["mail", "mailAlternateAddress", "proxyAddresses"];

/// Connections kept to the directory. Lookups are multiplexed over each connection (LDAP
/// carries a message id per request), so a few are enough for a busy gateway; more than
/// one keeps a slow answer from holding up every RCPT.
const POOL_SIZE: usize = 4;

/// Most cached answers. Unknown addresses are cached too, so a dictionary attack would
/// otherwise grow the cache by one entry per guess.
const CACHE_MAX: usize = 100_000;

/// Where the directory is and how to ask it: the `ldap.*` keys.
#[derive(Clone, PartialEq, Eq)]
pub struct LdapSettings {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// The service account every lookup binds as.
    pub bind_dn: String,
    pub bind_password: String,
    /// Where searches start (subtree).
    pub base: String,
    /// Filter for a recipient, `%s` standing for the address.
    pub recipient_filter: String,
    /// Filter for a portal login, `%s` standing for what the user typed.
    pub login_filter: String,
    /// Attributes of a portal user's entry that hold its mail addresses.
    pub address_attributes: Vec<String>,
    /// How long an answer (positive or negative) is reused; zero turns the cache off.
    pub cache_ttl: Duration,
    /// Limit for connecting, binding and each search.
    pub timeout: Duration,
    /// Certificate authorities for ldaps:// (PEM); empty for the system's trust store.
    pub ca_file: PathBuf,
}

/// The password never appears in logs, not even in a debug dump of the settings.
impl std::fmt::Debug for LdapSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapSettings")
            .field("url", &self.url)
            .field("bind_dn", &self.bind_dn)
            .field("bind_password", &"<redacted>")
            .field("base", &self.base)
            .field("recipient_filter", &self.recipient_filter)
            .field("login_filter", &self.login_filter)
            .field("address_attributes", &self.address_attributes)
            .field("cache_ttl", &self.cache_ttl)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl LdapSettings {
    /// The settings the configuration describes, or None when `ldap.url` is empty (no
    /// directory). Compare two of these to decide whether a changed configuration needs
    /// a new [`Directory`].
    pub fn from_config(cfg: &Config) -> Option<LdapSettings> {
        let url = cfg.text("ldap.url").trim().to_string();
        if url.is_empty() {
            return None;
        }
        let login_filter = match cfg.text("ldap.login_filter") {
            f if f.trim().is_empty() => DEFAULT_LOGIN_FILTER.to_string(),
            f => f,
        };
        let mut address_attributes: Vec<String> = cfg
            .list("ldap.address_attributes")
            .into_iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if address_attributes.is_empty() {
            address_attributes = DEFAULT_ADDRESS_ATTRIBUTES
                .iter()
                .map(|a| a.to_string())
                .collect();
        }
        Some(LdapSettings {
            url,
            bind_dn: cfg.text("ldap.bind_dn"),
            bind_password: cfg.text("ldap.bind_password"),
            base: cfg.text("ldap.base"),
            recipient_filter: cfg.text("ldap.recipient_filter"),
            login_filter,
            address_attributes,
            cache_ttl: cfg.duration("ldap.cache_ttl"),
            timeout: cfg.duration("ldap.timeout"),
            ca_file: cfg.path("ldap.tls.ca_file"),
        })
    }
}

/// Why the directory could not answer. None of these means "no such user": callers
/// answer a temporary failure (450 4.1.1, "try again"), never 550.
#[derive(Debug, thiserror::Error)]
pub enum LdapError {
    /// TCP or TLS connection to the server failed.
    #[error("cannot connect to LDAP server {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: Box<ldap3::LdapError>,
    },
    /// The service account's bind was refused (wrong `ldap.bind_dn` or
    /// `ldap.bind_password`, locked account) or did not complete.
    #[error("LDAP bind as {dn:?} at {url} failed: {source}")]
    Bind {
        url: String,
        dn: String,
        #[source]
        source: Box<ldap3::LdapError>,
    },
    /// The search failed: a lost connection, or an error result (no such base,
    /// a filter the server rejects, ...).
    #[error("LDAP search under {base:?} at {url} failed: {source}")]
    Search {
        url: String,
        base: String,
        #[source]
        source: Box<ldap3::LdapError>,
    },
    /// `ldap.bind_dn` without `ldap.bind_password`: an "unauthenticated bind", which
    /// Active Directory accepts and then answers like an anonymous client, finding
    /// nobody. Refused instead of turning every recipient into "unknown".
    #[error("ldap.bind_dn {dn:?} is set but ldap.bind_password is empty")]
    NoBindPassword { dn: String },
    /// `ldap.tls.ca_file` cannot be read or is not PEM.
    #[error("cannot read ldap.tls.ca_file {}: {source}", .path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// `ldap.tls.ca_file` holds no usable certificate.
    #[error("ldap.tls.ca_file {} holds no usable CA certificate", .path.display())]
    NoCertificates { path: PathBuf },
    /// Every pooled connection was busy connecting for longer than `ldap.timeout`.
    #[error("no LDAP connection to {url} within {timeout:?}")]
    Busy { url: String, timeout: Duration },
    /// The server sent the search elsewhere: result code referral (10), or success with
    /// no entry but continuation references (part of the subtree is held by another
    /// server). Following referrals is not done (they may point to servers the service
    /// account cannot bind to), and "not found here" is not "no such user": an error, so
    /// the RCPT is deferred. Against a multi-domain Active Directory forest, point
    /// `ldap.url` at a Global Catalog (port 3268 or 3269), which answers for every domain.
    #[error(
        "LDAP search under {base:?} at {url} was referred elsewhere ({refs:?}): use a base the server holds, or an Active Directory Global Catalog (port 3268)"
    )]
    Referral {
        url: String,
        base: String,
        refs: Vec<String>,
    },
    /// The whole lookup (waiting for a pooled connection, connecting, binding, searching,
    /// retrying) took longer than its deadline (twice `ldap.timeout`).
    #[error("LDAP lookup at {url} did not finish within {deadline:?}")]
    Deadline { url: String, deadline: Duration },
    /// The user's password was right but the entry has no `mail` to show mail for.
    #[error("directory entry {dn:?} has no mail attribute")]
    NoMail { dn: String },
}

/// An RFC 4515 filter value: `*`, `(`, `)`, `\` and NUL become `\2a`, `\28`, `\29`,
/// `\5c`, `\00`, so an address can never widen or restructure the search.
pub fn escape_filter_value(value: &str) -> String {
    ldap3::ldap_escape(value).into_owned()
}

/// `template` with every `%s` replaced by the escaped `value`.
pub fn fill_filter(template: &str, value: &str) -> String {
    template.replace("%s", &escape_filter_value(value))
}

/// A portal user's directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryUser {
    pub dn: String,
    /// Its mail addresses: lowercase, each once, in the order of `ldap.address_attributes`.
    pub addresses: Vec<String>,
}

/// The mail addresses among an entry's `attributes` (names matched without regard to
/// case, as LDAP does). Active Directory's `proxyAddresses` values carry a type prefix:
/// `SMTP:` (the primary address) and `smtp:` are kept without it, other types (`X500:`,
/// `SIP:`, ...) are not mail addresses and are skipped.
pub fn entry_addresses(entry: &SearchEntry, attributes: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for wanted in attributes {
        for (name, values) in &entry.attrs {
            if !name.eq_ignore_ascii_case(wanted) {
                continue;
            }
            for v in values {
                if let Some(a) = mail_value(v)
                    && !out.contains(&a)
                {
                    out.push(a);
                }
            }
        }
    }
    out
}

fn mail_value(value: &str) -> Option<String> {
    let v = value.trim();
    let v = match v.get(..5) {
        Some(p) if p.eq_ignore_ascii_case("smtp:") => &v[5..],
        _ => v,
    };
    let (local, domain) = v.rsplit_once('@')?;
    let plain = |s: &str| {
        !s.is_empty() && !s.contains(':') && !s.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    (plain(local) && plain(domain) && !domain.contains('@')).then(|| v.to_lowercase())
}

fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// One pooled connection: the handle and a generation number, so that a caller whose
/// request failed drops only the connection it used, not a newer one another caller
/// has opened since.
type Slot = tokio::sync::Mutex<Option<(u64, Ldap)>>;

/// A directory: pooled, bound connections and the answer cache. Build a new one when
/// the settings change (the old one's connections close when it is dropped).
pub struct Directory {
    settings: LdapSettings,
    slots: Vec<Slot>,
    next_slot: AtomicUsize,
    generation: AtomicU64,
    cache: std::sync::Mutex<HashMap<String, (bool, Instant)>>,
}

impl Directory {
    /// A directory for `settings`; connects lazily, at the first lookup.
    pub fn new(settings: LdapSettings) -> Arc<Directory> {
        Arc::new(Directory {
            settings,
            slots: (0..POOL_SIZE)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next_slot: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            cache: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> &LdapSettings {
        &self.settings
    }

    /// Whether some directory entry matches `ldap.recipient_filter` for `address`.
    /// Answers (both ways) are cached for `ldap.cache_ttl`; errors are not, so the next
    /// RCPT asks again.
    pub async fn recipient_exists(&self, address: &str) -> Result<bool, LdapError> {
        let key = address.trim().to_ascii_lowercase();
        if key.is_empty() || has_control(&key) {
            // No mail address holds these, and slapd's matching stops at a NUL: with it,
            // "alice@example.test\0" would be found as alice.
            return Ok(false);
        }
        if let Some(known) = self.cached(&key) {
            return Ok(known);
        }
        let filter = fill_filter(&self.settings.recipient_filter, address.trim());
        // Each step below has its own ldap.timeout and a lost connection is retried once,
        // so without an overall bound one RCPT could wait several timeouts.
        let deadline = self.lookup_deadline();
        let entries = tokio::time::timeout(deadline, self.search(&filter, 1, &["1.1"]))
            .await
            .map_err(|_| LdapError::Deadline {
                url: self.settings.url.clone(),
                deadline,
            })??;
        let exists = !entries.is_empty();
        self.remember(key, exists);
        Ok(exists)
    }

    /// Checks a portal login and returns the entry's mail addresses: finds the one entry
    /// `ldap.login_filter` matches for `login` (as the service account) and binds as it
    /// with `password` on a connection of its own. None when the login is unknown,
    /// ambiguous or the password is wrong. An empty password is refused without asking:
    /// many servers answer an empty password with a successful "unauthenticated bind"
    /// (RFC 4513 5.1.2), which must never count as a login.
    pub async fn login(
        &self,
        login: &str,
        password: &str,
    ) -> Result<Option<DirectoryUser>, LdapError> {
        if password.is_empty() {
            return Ok(None);
        }
        let Some(user) = self.find_user(login).await? else {
            return Ok(None);
        };
        let (conn, mut ldap) = self.connect().await?;
        ldap3::drive!(conn);
        let bound = ldap
            .with_timeout(self.settings.timeout)
            .simple_bind(&user.dn, password)
            .await;
        let _ = ldap.unbind().await;
        let result = bound.map_err(|source| LdapError::Bind {
            url: self.settings.url.clone(),
            dn: user.dn.clone(),
            source: Box::new(source),
        })?;
        match result.rc {
            0 => Ok(Some(user)),
            // invalidCredentials: a wrong password (or a disabled account, which AD
            // reports the same way).
            49 => Ok(None),
            _ => Err(LdapError::Bind {
                url: self.settings.url.clone(),
                dn: user.dn.clone(),
                source: Box::new(result.into()),
            }),
        }
    }

    /// The one entry `ldap.login_filter` matches for `login`, searched as the service
    /// account, with its addresses (`ldap.address_attributes`); None when none or more
    /// than one match. No password is checked: this is for a session already signed in,
    /// whose addresses are read again so that a changed or removed entry takes effect.
    pub async fn find_user(&self, login: &str) -> Result<Option<DirectoryUser>, LdapError> {
        let login = login.trim();
        if login.is_empty() || has_control(login) {
            return Ok(None);
        }
        let filter = fill_filter(&self.settings.login_filter, login);
        let attrs: Vec<&str> = self
            .settings
            .address_attributes
            .iter()
            .map(String::as_str)
            .collect();
        let deadline = self.lookup_deadline();
        let entries = tokio::time::timeout(deadline, self.search(&filter, 2, &attrs))
            .await
            .map_err(|_| LdapError::Deadline {
                url: self.settings.url.clone(),
                deadline,
            })??;
        match entries.as_slice() {
            [one] => Ok(Some(DirectoryUser {
                dn: one.dn.clone(),
                addresses: entry_addresses(one, &self.settings.address_attributes),
            })),
            [] => Ok(None),
            _ => {
                tracing::warn!(
                    login,
                    "LDAP login matches more than one directory entry: refused (narrow ldap.login_filter)"
                );
                Ok(None)
            }
        }
    }

    /// Checks a portal login like [`Directory::login`] and returns the entry's first
    /// address (its `mail` with the default attributes).
    pub async fn authenticate(
        &self,
        login: &str,
        password: &str,
    ) -> Result<Option<String>, LdapError> {
        let Some(user) = self.login(login, password).await? else {
            return Ok(None);
        };
        match user.addresses.into_iter().next() {
            Some(mail) => Ok(Some(mail)),
            None => Err(LdapError::NoMail { dn: user.dn }),
        }
    }

    /// The most one recipient lookup may take, all steps and the retry included.
    pub fn lookup_deadline(&self) -> Duration {
        self.settings.timeout.saturating_mul(2)
    }

    fn cached(&self, key: &str) -> Option<bool> {
        if self.settings.cache_ttl.is_zero() {
            return None;
        }
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < self.settings.cache_ttl)
            .map(|(exists, _)| *exists)
    }

    fn remember(&self, key: String, exists: bool) {
        if self.settings.cache_ttl.is_zero() {
            return;
        }
        let ttl = self.settings.cache_ttl;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < ttl);
            if cache.len() >= CACHE_MAX {
                // Still full of live answers: start over rather than grow.
                cache.clear();
            }
        }
        cache.insert(key, (exists, Instant::now()));
    }

    /// A subtree search under `ldap.base` on a pooled connection. A failure on a
    /// connection that was already open (the server restarted, an idle timeout closed
    /// it) is retried once on a new one; a failure on a new one is the answer.
    async fn search(
        &self,
        filter: &str,
        limit: i32,
        attrs: &[&str],
    ) -> Result<Vec<SearchEntry>, LdapError> {
        let slot = &self.slots[self.next_slot.fetch_add(1, Ordering::Relaxed) % POOL_SIZE];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (generation, mut ldap, fresh) = self.pooled(slot).await?;
            let result = ldap
                .with_search_options(SearchOptions::new().sizelimit(limit))
                .with_timeout(self.settings.timeout)
                .search(&self.settings.base, Scope::Subtree, filter, attrs.to_vec())
                .await;
            let error = match result {
                Ok(ldap3::SearchResult(entries, res)) => match res.rc {
                    // success, sizeLimitExceeded (more entries than asked for: enough
                    // to answer). An entry found is an answer even when other parts of
                    // the subtree were referred elsewhere.
                    0 | 4 if !entries.is_empty() || res.refs.is_empty() => {
                        return Ok(entries.into_iter().map(SearchEntry::construct).collect());
                    }
                    // Nothing found here but continuation references (ldap3 collects
                    // them in `refs`), or a referral (10): the answer is elsewhere.
                    0 | 4 | 10 => {
                        return Err(LdapError::Referral {
                            url: self.settings.url.clone(),
                            base: self.settings.base.clone(),
                            refs: res.refs,
                        });
                    }
                    _ => {
                        return Err(LdapError::Search {
                            url: self.settings.url.clone(),
                            base: self.settings.base.clone(),
                            source: Box::new(res.into()),
                        });
                    }
                },
                Err(e) => e,
            };
            self.discard(slot, generation).await;
            // A timeout is a slow server, not a stale connection: asking again would
            // only double the wait.
            let timed_out = matches!(error, ldap3::LdapError::Timeout { .. });
            if fresh || attempt > 1 || timed_out {
                return Err(LdapError::Search {
                    url: self.settings.url.clone(),
                    base: self.settings.base.clone(),
                    source: Box::new(error),
                });
            }
            tracing::debug!(url = %self.settings.url, error = %error, "LDAP connection lost: reconnecting");
        }
    }

    /// The slot's connection, opened and bound if it has none (or a closed one). The
    /// flag says whether it was opened just now.
    async fn pooled(&self, slot: &Slot) -> Result<(u64, Ldap, bool), LdapError> {
        let mut guard = tokio::time::timeout(self.settings.timeout, slot.lock())
            .await
            .map_err(|_| LdapError::Busy {
                url: self.settings.url.clone(),
                timeout: self.settings.timeout,
            })?;
        if let Some((generation, ldap)) = guard.as_mut()
            && !ldap.is_closed()
        {
            return Ok((*generation, ldap.clone(), false));
        }
        *guard = None;
        if !self.settings.bind_dn.is_empty() && self.settings.bind_password.is_empty() {
            return Err(LdapError::NoBindPassword {
                dn: self.settings.bind_dn.clone(),
            });
        }
        let (conn, mut ldap) = self.connect().await?;
        ldap3::drive!(conn);
        let bound = ldap
            .with_timeout(self.settings.timeout)
            .simple_bind(&self.settings.bind_dn, &self.settings.bind_password)
            .await
            .and_then(|r| r.success());
        if let Err(source) = bound {
            let _ = ldap.unbind().await;
            tracing::warn!(
                url = %self.settings.url,
                bind_dn = %self.settings.bind_dn,
                error = %source,
                "LDAP bind refused: check ldap.bind_dn and ldap.bind_password"
            );
            return Err(LdapError::Bind {
                url: self.settings.url.clone(),
                dn: self.settings.bind_dn.clone(),
                source: Box::new(source),
            });
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        *guard = Some((generation, ldap.clone()));
        Ok((generation, ldap, true))
    }

    /// Forgets the slot's connection if it is still the one of `generation`.
    async fn discard(&self, slot: &Slot, generation: u64) {
        let mut guard = slot.lock().await;
        if guard.as_ref().is_some_and(|(g, _)| *g == generation)
            && let Some((_, mut ldap)) = guard.take()
        {
            let _ = ldap.unbind().await;
        }
    }

    async fn connect(&self) -> Result<(LdapConnAsync, Ldap), LdapError> {
        // ldaps:// builds a rustls configuration from the process's provider; daemons
        // install aws-lc-rs at start, this covers tools and tests (a no-op otherwise).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut settings = LdapConnSettings::new().set_conn_timeout(self.settings.timeout);
        if !self.settings.ca_file.as_os_str().is_empty() {
            settings = settings.set_config(self.tls_config()?);
        }
        LdapConnAsync::with_settings(settings, &self.settings.url)
            .await
            .map_err(|source| LdapError::Connect {
                url: self.settings.url.clone(),
                source: Box::new(source),
            })
    }

    /// TLS trusting only `ldap.tls.ca_file`'s certificates (read at each connection, so
    /// a renewed CA file is picked up; connections are few and long-lived).
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, LdapError> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let path = &self.settings.ca_file;
        let ca_error = |source| LdapError::CaFile {
            path: path.clone(),
            source,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(ca_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(ca_error)?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(LdapError::NoCertificates { path: path.clone() });
        }
        Ok(Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LdapSettings {
        LdapSettings {
            url: "ldap://127.0.0.1:1/".into(),
            bind_dn: "cn=svc,dc=example,dc=test".into(),
            bind_password: "s3cret-bind-pw".into(),
            base: "dc=example,dc=test".into(),
            recipient_filter: "(|(mail=%s)(proxyAddresses=smtp:%s))".into(),
            login_filter: DEFAULT_LOGIN_FILTER.into(),
            address_attributes: vec!["mail".into(), "proxyAddresses".into()],
            cache_ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
            ca_file: PathBuf::new(),
        }
    }

    #[test]
    fn filter_values_cannot_widen_or_restructure_the_search() {
        assert_eq!(escape_filter_value("a*@x"), r"a\2a@x");
        assert_eq!(
            fill_filter("(mail=%s)", "*)(uid=*"),
            r"(mail=\2a\29\28uid=\2a)"
        );
        assert_eq!(fill_filter("(mail=%s)", "a\\b\0c"), r"(mail=a\5cb\00c)");
        // Both places of the template get the address, and the result is one valid
        // filter whose only values are the literal address.
        let f = fill_filter("(|(mail=%s)(proxyAddresses=smtp:%s))", "*@example.test");
        assert_eq!(
            f,
            r"(|(mail=\2a@example.test)(proxyAddresses=smtp:\2a@example.test))"
        );
        assert!(ldap3::parse_filter(&f).is_ok(), "{f}");
        assert!(!f.contains('*'));
    }

    #[test]
    fn the_bind_password_never_shows_in_debug_output() {
        let text = format!("{:?}", settings());
        assert!(!text.contains("s3cret-bind-pw"), "{text}");
        assert!(
            text.contains("<redacted>") && text.contains("cn=svc"),
            "{text}"
        );
    }

    #[test]
    fn no_url_no_directory_and_the_keys_are_read() {
        let cfg = Config::default();
        assert_eq!(LdapSettings::from_config(&cfg), None);
        let cfg = Config::from_toml_str(
            "[ldap]\nurl = \"ldap://127.0.0.1:3890\"\nbind_dn = \"cn=svc\"\nbind_password = \"pw\"\nbase = \"dc=x\"\ncache_ttl = \"1m\"\ntimeout = \"3s\"\n",
            "test.toml",
        )
        .expect("config");
        let s = LdapSettings::from_config(&cfg).expect("settings");
        assert_eq!(s.url, "ldap://127.0.0.1:3890");
        assert_eq!(s.bind_password, "pw");
        assert_eq!(s.recipient_filter, "(|(mail=%s)(proxyAddresses=smtp:%s))");
        assert_eq!(s.login_filter, DEFAULT_LOGIN_FILTER);
        assert_eq!(
            s.address_attributes,
            ["mail", "mailAlternateAddress", "proxyAddresses"]
        );
        assert_eq!(s.cache_ttl, Duration::from_secs(60));
        assert_eq!(s.timeout, Duration::from_secs(3));
        let mut other = s.clone();
        assert_eq!(other, s);
        other.bind_password = "changed".into();
        assert_ne!(other, s, "a new password must make a new Directory");
    }

    #[tokio::test]
    async fn an_empty_password_is_refused_without_asking_the_server() {
        // Nothing listens on port 1: had it asked, this would be a connection error.
        let dir = Directory::new(settings());
        assert_eq!(dir.authenticate("alice", "").await.unwrap(), None);
        assert_eq!(dir.authenticate("", "pw").await.unwrap(), None);
        assert_eq!(dir.login("alice", "").await.unwrap(), None);
        assert_eq!(dir.login("", "pw").await.unwrap(), None);
        assert_eq!(dir.find_user("alice\0").await.unwrap(), None);
        // A non-empty password does ask: the unreachable server is an error.
        assert!(matches!(
            dir.login("alice", "pw").await,
            Err(LdapError::Connect { .. } | LdapError::Search { .. })
        ));
    }

    #[test]
    fn addresses_come_from_the_configured_attributes_without_smtp_prefixes() {
        let entry = SearchEntry {
            dn: "uid=a,dc=x".into(),
            attrs: HashMap::from([
                ("mail".to_string(), vec!["Alice@Example.TEST".to_string()]),
                (
                    "proxyAddresses".to_string(),
                    vec![
                        "SMTP:alice@example.test".into(),
                        "smtp:A.Liddell@example.test".into(),
                        "X500:/o=Example/cn=alice".into(),
                        "sip:alice@example.test".into(),
                        "smtp:not an address".into(),
                    ],
                ),
                (
                    "mailalternateaddress".to_string(),
                    vec!["sales@example.test".into(), "@example.test".into()],
                ),
                ("description".to_string(), vec!["x@y.test".into()]),
            ]),
            bin_attrs: HashMap::new(),
        };
        let attrs = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            entry_addresses(
                &entry,
                &attrs(&["mail", "mailAlternateAddress", "proxyAddresses"])
            ),
            [
                "alice@example.test",
                "sales@example.test",
                "a.liddell@example.test"
            ]
        );
        assert_eq!(
            entry_addresses(&entry, &attrs(&["proxyaddresses"])),
            ["alice@example.test", "a.liddell@example.test"]
        );
        assert!(entry_addresses(&entry, &attrs(&["cn"])).is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_and_is_not_cached() {
        let dir = Directory::new(settings());
        for _ in 0..2 {
            let err = dir.recipient_exists("a@example.test").await.unwrap_err();
            assert!(matches!(err, LdapError::Connect { .. }), "{err}");
        }
        assert!(dir.cache.lock().unwrap().is_empty());
    }
}
