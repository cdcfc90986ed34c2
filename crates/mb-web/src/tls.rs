//! The HTTPS certificate: `network.https.tls.cert`/`key` (PEM), or a self-signed one made
//! in memory when neither is set (with a warning; mb-web writes no files). Reloaded from
//! the same files on SIGHUP: connections in progress keep the certificate they started
//! with, new ones get the new certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use mb_core::Config;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {cause}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("network.https.tls.cert and network.https.tls.key go together: set both or neither")]
    HalfSet,
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the HTTPS certificate and key do not work together: {0}")]
    Config(#[from] rustls::Error),
}

/// Where the certificate comes from, fixed at start (the paths are restart-only keys).
#[derive(Debug, Clone)]
pub struct Source {
    files: Option<(PathBuf, PathBuf)>,
    tls13_only: bool,
    /// Names in a self-signed certificate.
    names: Vec<String>,
}

impl Source {
    pub fn from_config(cfg: &Config) -> Result<Source, TlsError> {
        let (cert, key) = (
            cfg.text("network.https.tls.cert"),
            cfg.text("network.https.tls.key"),
        );
        let files = match (cert.is_empty(), key.is_empty()) {
            (true, true) => None,
            (false, false) => Some((PathBuf::from(cert), PathBuf::from(key))),
            _ => return Err(TlsError::HalfSet),
        };
        let mut names = vec!["localhost".to_string()];
        let host = cfg.text("smtp.hostname");
        if !host.is_empty() {
            names.insert(0, host);
        } else if let Ok(h) = nix::unistd::gethostname()
            && let Some(h) = h.to_str()
        {
            names.insert(0, h.to_string());
        }
        names.extend(
            cfg.ips("network.https.listen")
                .iter()
                .filter(|ip| !ip.is_unspecified())
                .map(ToString::to_string),
        );
        Ok(Source {
            files,
            tls13_only: cfg.text("network.tls.min_version") == "1.3",
            names,
        })
    }

    /// A server configuration from the files, or a new self-signed certificate.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let (certs, key) = match &self.files {
            Some((cert, key)) => (read_certs(cert)?, read_key(key)?),
            None => {
                let made = rcgen::generate_simple_self_signed(self.names.clone())?;
                tracing::warn!(
                    names = %self.names.join(","),
                    "network.https.tls.cert is not set: serving HTTPS with a self-signed certificate; install a real one"
                );
                (
                    vec![made.cert.der().clone()],
                    PrivateKeyDer::try_from(made.signing_key.serialize_der())
                        .map_err(|e| TlsError::Config(rustls::Error::General(e.into())))?,
                )
            }
        };
        let versions: &[&rustls::SupportedProtocolVersion] = if self.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Whether a reload re-reads files (a self-signed certificate stays as it is).
    pub fn from_files(&self) -> bool {
        self.files.is_some()
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |cause| TlsError::Read {
        what: "the certificate",
        path: path.to_path_buf(),
        cause,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<_, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|cause| TlsError::Read {
        what: "the key",
        path: path.to_path_buf(),
        cause,
    })
}

/// The certificate new connections get; swapped whole on reload.
#[derive(Clone)]
pub struct Current {
    source: Source,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Current {
    pub fn new(source: Source, config: Arc<ServerConfig>) -> Current {
        Current {
            source,
            config: Arc::new(RwLock::new(config)),
        }
    }

    pub fn get(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the files; on failure the running certificate stays. Returns whether a
    /// new certificate is in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        if !self.source.from_files() {
            return Ok(false);
        }
        let fresh = self.source.load()?;
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(true)
    }
}
