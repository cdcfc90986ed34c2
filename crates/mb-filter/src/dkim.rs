//! DKIM signing of outbound mail (RFC 6376, rsa-sha256, relaxed/relaxed) with the key in
//! `dkim.key` and the selector `dkim.selector`. The caller signs only outbound mail (an
//! authenticated or mynetworks client); `signing_domain` then asks that both the From
//! domain and the envelope sender's domain be served (`smtp.domains`), so that a
//! trusted client relaying someone else's mail does not get our signature on it. The
//! key is read once and re-read when the file changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use mail_auth::common::crypto::{RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use mb_core::Config;
use mb_core::verdict::ScanRequest;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// The fields signed when present (and their absence signed otherwise, so none can be
/// added later).
const SIGNED: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

type Ready = Arc<DkimSigner<RsaKey<Sha256>, Done>>;

/// Signers per (domain, selector), valid for one version of the key file.
struct Loaded {
    path: PathBuf,
    modified: SystemTime,
    signers: HashMap<(String, String), Ready>,
}

/// Why a message could not be signed (it leaves unsigned, with a symbol that says why).
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("cannot read the DKIM key {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is not an RSA private key in PEM ({source}); make one with mb-dkim keygen",
        path.display()
    )]
    Pem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "{} is not an RSA private key in PEM ({source}); make one with mb-dkim keygen",
        path.display()
    )]
    Key {
        path: PathBuf,
        source: mail_auth::Error,
    },
    #[error("DKIM signing failed: {0}")]
    Sign(mail_auth::Error),
}

#[derive(Default)]
pub struct Signer {
    cache: Mutex<Option<Loaded>>,
}

impl Signer {
    fn signer(&self, path: PathBuf, domain: &str, selector: &str) -> Result<Ready, DkimError> {
        let unreadable = |source| DkimError::ReadKey {
            path: path.clone(),
            source,
        };
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(unreadable)?;
        let id = (domain.to_string(), selector.to_string());
        if let Ok(guard) = self.cache.lock()
            && let Some(l) = guard.as_ref()
            && l.path == path
            && l.modified == modified
            && let Some(s) = l.signers.get(&id)
        {
            return Ok(s.clone());
        }
        let pem = std::fs::read_to_string(&path).map_err(unreadable)?;
        let der =
            PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| DkimError::Pem {
                path: path.clone(),
                source,
            })?;
        let key = RsaKey::<Sha256>::from_key_der(der).map_err(|source| DkimError::Key {
            path: path.clone(),
            source,
        })?;
        let signer = Arc::new(
            DkimSigner::from_key(key)
                .domain(domain)
                .selector(selector)
                .headers(SIGNED.iter().copied()),
        );
        if let Ok(mut guard) = self.cache.lock() {
            let fresh = guard
                .as_ref()
                .is_none_or(|l| l.path != path || l.modified != modified);
            if fresh {
                *guard = Some(Loaded {
                    path,
                    modified,
                    signers: HashMap::new(),
                });
            }
            if let Some(l) = guard.as_mut() {
                l.signers.insert(id, signer.clone());
            }
        }
        Ok(signer)
    }

    /// The `DKIM-Signature` field value for outbound `message` whose header From has
    /// `from_domain`, or `None` when it is not ours to sign (see `signing_domain`).
    pub fn sign(
        &self,
        cfg: &Config,
        request: &ScanRequest,
        from_domain: &str,
        message: &[u8],
    ) -> Result<Option<String>, DkimError> {
        let Some(domain) = signing_domain(
            &cfg.list("smtp.domains"),
            &request.sender,
            !request.auth_user.is_empty(),
            from_domain,
        ) else {
            return Ok(None);
        };
        let signature = self
            .signer(cfg.path("dkim.key"), &domain, &cfg.text("dkim.selector"))?
            .sign(message)
            .map_err(DkimError::Sign)?;
        let header = signature.to_header();
        let value = header
            .strip_prefix("DKIM-Signature:")
            .unwrap_or(&header)
            .trim_start()
            .trim_end_matches(['\r', '\n']);
        Ok(Some(value.to_string()))
    }
}

/// The domain to sign outbound mail for (`d=`, the From domain, lowercase), or `None`:
/// - the From domain must be one of `domains` exactly (the key is published there);
/// - the envelope sender's domain must be served too (listed, or under a `.parent`
///   entry), so mail a trusted client relays for a foreign envelope is not signed;
/// - the null sender (a bounce) is signed only for a client that did not authenticate
///   (the internal mail server in mynetworks): an account could otherwise send as
///   `MAIL FROM:<>`, which sender binding allows, with any served From.
pub fn signing_domain(
    domains: &[String],
    envelope_sender: &str,
    authenticated: bool,
    from_domain: &str,
) -> Option<String> {
    let from = from_domain.trim().to_ascii_lowercase();
    if from.is_empty() || !domains.iter().any(|d| d.eq_ignore_ascii_case(&from)) {
        return None;
    }
    match envelope_sender.rsplit_once('@') {
        Some((_, domain)) if served(domains, domain) => Some(from),
        Some(_) => None,
        None if envelope_sender.is_empty() && !authenticated => Some(from),
        None => None,
    }
}

/// `smtp.domains` as mb-smtpd reads it: `example.org` itself, `.example.org` for its
/// subdomains.
fn served(domains: &[String], domain: &str) -> bool {
    let domain = domain.to_ascii_lowercase();
    domains.iter().any(|d| {
        let d = d.to_ascii_lowercase();
        match d.strip_prefix('.') {
            Some(parent) => domain.ends_with(&format!(".{parent}")),
            None => d == domain,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_envelope_and_from_domains_are_signed() {
        let domains: Vec<String> = ["served.example", ".corp.example"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let check = |sender: &str, auth: bool, from: &str, want: Option<&str>| {
            assert_eq!(
                signing_domain(&domains, sender, auth, from).as_deref(),
                want,
                "{sender} {auth} {from}"
            );
        };
        check(
            "alice@served.example",
            true,
            "served.example",
            Some("served.example"),
        );
        check(
            "alice@Served.Example",
            false,
            "SERVED.example",
            Some("served.example"),
        );
        check(
            "alice@mail.corp.example",
            false,
            "served.example",
            Some("served.example"),
        );
        // A trusted client relaying a foreign From, or a foreign envelope, gets none.
        check("alice@served.example", false, "foreign.example", None);
        check("news@foreign.example", false, "served.example", None);
        check("news@foreign.example", true, "served.example", None);
        // The From domain must be listed itself: the key is published under it.
        check("alice@served.example", true, "mail.corp.example", None);
        check("alice@served.example", true, "", None);
        // Bounces: the internal server's, not an account's.
        check("", false, "served.example", Some("served.example"));
        check("", true, "served.example", None);
    }
}
