//! TLS client configurations for delivery, built once per setting and cached: verifying
//! against `relay.tls.ca_file` towards the relay host, or encrypting without verifying
//! towards MX hosts. Which of them a session uses is the TLS policy in `deliver.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mb_core::Config;

use super::trouble::TlsConfigError;

/// Client configurations by the settings they were built from.
#[derive(Default)]
pub struct Connectors {
    cache: Mutex<HashMap<String, Arc<rustls::ClientConfig>>>,
}

impl Connectors {
    /// TLS client configuration: verifying against `relay.tls.ca_file`, or (MX delivery,
    /// where certificates are rarely valid for the MX name) encrypting without verifying,
    /// as Postfix's `may` and `encrypt` levels do.
    pub fn get(
        &self,
        cfg: &Config,
        verify: bool,
    ) -> Result<tokio_rustls::TlsConnector, TlsConfigError> {
        let ca = cfg.text("relay.tls.ca_file");
        // Everything `build` reads: the settings, and the CA file's identity, so that a
        // renewed file under the same name is read again.
        let ca_file = std::fs::metadata(&ca)
            .ok()
            .map(|m| (m.len(), m.modified().ok()));
        let key = format!(
            "{verify} {ca} {ca_file:?} {} {}",
            cfg.list("network.tls.versions").join(","),
            cfg.text("network.tls.min_version")
        );
        if let Some(c) = self.cache.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(tokio_rustls::TlsConnector::from(c));
        }
        let config = Arc::new(build(cfg, verify, &ca)?);
        if let Ok(mut m) = self.cache.lock() {
            m.insert(key, config.clone());
        }
        Ok(tokio_rustls::TlsConnector::from(config))
    }
}

fn build(cfg: &Config, verify: bool, ca: &str) -> Result<rustls::ClientConfig, TlsConfigError> {
    let versions = crate::server::tls_versions(cfg);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| TlsConfigError::Versions(e.to_string()))?;
    if !verify {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth());
    }
    Ok(builder
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth())
}

/// The certificate authorities in `relay.tls.ca_file`; at least one.
fn roots(ca: &str) -> Result<rustls::RootCertStore, TlsConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| TlsConfigError::CaFile {
        ca: ca.to_string(),
        cause: e.to_string(),
    })?;
    for c in certs.flatten() {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoAuthority { ca: ca.to_string() });
    }
    Ok(roots)
}

/// The name to verify and send as SNI; a name that is not a valid DNS name or address
/// gets one that can match no certificate.
pub fn server_name(name: &str) -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::try_from(name.to_string()).unwrap_or_else(|_| {
        rustls_pki_types::ServerName::try_from("invalid.invalid".to_string()).expect("static name")
    })
}

/// A certificate verifier that accepts any certificate but still checks the handshake
/// signatures: encryption without authentication, for MX hosts.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmgr::tests::config;

    #[test]
    fn a_ca_file_without_authorities_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let cfg = config(
            dir.path(),
            &format!("[relay]\n\"tls.ca_file\" = \"{}\"\n", empty.display()),
        );
        let connectors = Connectors::default();
        let err = connectors.get(&cfg, true).err().expect("no authority");
        assert_eq!(
            err,
            TlsConfigError::NoAuthority {
                ca: empty.display().to_string()
            }
        );
        assert!(
            err.to_string()
                .starts_with("451 4.7.5 no certificate authority")
        );
        // Without verification the file does not matter, and the result is cached.
        assert!(connectors.get(&cfg, false).is_ok());
        assert_eq!(connectors.cache.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_changed_minimum_version_or_renewed_ca_file_builds_a_new_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["relay.test".to_string()])
            .unwrap()
            .cert
            .pem();
        std::fs::write(&ca, &cert).unwrap();
        let relay = format!("[relay]\n\"tls.ca_file\" = \"{}\"\n", ca.display());
        let connectors = Connectors::default();
        let v12 = config(dir.path(), &relay);
        assert!(connectors.get(&v12, true).is_ok());
        assert!(connectors.get(&v12, true).is_ok());
        assert_eq!(connectors.cache.lock().unwrap().len(), 1, "cached");
        let v13 = config(
            dir.path(),
            &format!("{relay}[network.tls]\nmin_version = \"1.3\"\n"),
        );
        assert!(connectors.get(&v13, true).is_ok());
        assert_eq!(
            connectors.cache.lock().unwrap().len(),
            2,
            "min_version ignored"
        );
        // The same file name with new contents (a renewed CA bundle) is read again.
        std::fs::write(&ca, format!("{cert}{cert}")).unwrap();
        assert!(connectors.get(&v12, true).is_ok());
        assert_eq!(connectors.cache.lock().unwrap().len(), 3, "renewal ignored");
    }
}
