//! DKIM signing of outbound mail (RFC 6376, rsa-sha256, relaxed/relaxed) with the key in
//! `dkim.key` and the selector `dkim.selector`, for mail whose From domain is one of the
//! served domains (`smtp.domains`). The key is read once and re-read when the file
//! changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use mail_auth::common::crypto::{RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use mb_core::Config;
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

    /// The `DKIM-Signature` field value for `message` sent from `from_domain`, or `None`
    /// when the domain is not ours to sign for.
    pub fn sign(
        &self,
        cfg: &Config,
        from_domain: &str,
        message: &[u8],
    ) -> Result<Option<String>, DkimError> {
        let domain = from_domain.to_ascii_lowercase();
        if domain.is_empty()
            || !cfg
                .list("smtp.domains")
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&domain))
        {
            return Ok(None);
        }
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
