//! The cluster's certificates and TLS settings. The main holds a private CA; every node
//! (the main included) has a P-256 key that never leaves it and a certificate the CA
//! signed, naming the node (DNS SAN) so each side checks the other's identity. All
//! node-to-node traffic is TLS 1.3 with certificates on both sides; the one exception is
//! `Join`, where the child has no certificate yet and pins the CA by the fingerprint in
//! its join token instead.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// How long node certificates and the CA are valid.
const NODE_YEARS: i32 = 10;
const CA_YEARS: i32 = 30;

/// SHA-256 of a DER certificate, as lowercase hex: how nodes and the CA are named in
/// tokens, the node table and the revocation list.
pub fn fingerprint(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of arbitrary bytes as hex (token secrets are stored hashed).
pub fn sha256_hex(data: &[u8]) -> String {
    fingerprint(data)
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| anyhow!("the system random source failed"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A node name is also the DNS name in its certificate: lowercase letters, digits,
/// hyphens and dots, 1 to 63 characters per label.
pub fn check_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !ok {
        bail!(
            "{name:?} is not a valid node name: use lowercase letters, digits, hyphens and dots (like a host name)"
        );
    }
    Ok(())
}

/// Valid from yesterday (clocks drift between nodes) for `years` years.
fn validity(params: &mut CertificateParams, years: i32) {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0));
    let (y, m, d) = mb_runtime::logging::civil_from_days(days - 1);
    let (y, m, d) = (
        i32::try_from(y).unwrap_or(2026),
        u8::try_from(m).unwrap_or(1),
        // Day 29 to 31 may not exist `years` later; the 28th always does.
        u8::try_from(d.min(28)).unwrap_or(1),
    );
    params.not_before = rcgen::date_time_ymd(y, m, d);
    params.not_after = rcgen::date_time_ymd(y + years, m, d);
}

/// The CA's parameters. Rebuilt the same way from its name whenever the main signs, so
/// only the name and the key need storing.
fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mailborder cluster");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A new CA: (common name, certificate PEM, key PEM).
pub fn create_ca() -> Result<(String, String, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cn = format!("Mailborder cluster CA {}", &random_hex(4)?);
    let mut params = ca_params(&cn);
    validity(&mut params, CA_YEARS);
    let cert = params.self_signed(&key)?;
    Ok((cn, cert.pem(), key.serialize_pem()))
}

/// A new node key: (key PEM, raw public key to send in a join request).
pub fn node_key() -> Result<(String, Vec<u8>)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    Ok((key.serialize_pem(), key.public_key_raw().to_vec()))
}

/// A P-256 public key received from a joining node.
struct RawP256(Vec<u8>);

impl PublicKeyData for RawP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Signs a node certificate for `name` and the public key `raw` with the CA.
pub fn sign_node(ca_cn: &str, ca_key_pem: &str, name: &str, raw: &[u8]) -> Result<String> {
    check_node_name(name)?;
    // An uncompressed P-256 point: 0x04, X, Y.
    if raw.len() != 65 || raw[0] != 4 {
        bail!("the node's public key is not an uncompressed P-256 point");
    }
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the CA key does not parse")?;
    let issuer = Issuer::new(ca_params(ca_cn), ca_key);
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mailborder cluster");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        random_hex(16)?.as_bytes().get(..16).unwrap_or_default(),
    ));
    validity(&mut params, NODE_YEARS);
    Ok(params.signed_by(&RawP256(raw.to_vec()), &issuer)?.pem())
}

/// The first certificate in a PEM text, as DER.
pub fn cert_der(pem: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| anyhow!("no certificate in the PEM text"))?
        .map_err(|e| anyhow!("bad certificate PEM: {e}"))
}

/// What a node presents: its certificate and key, and the CA it trusts.
#[derive(Clone)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub ca: CertificateDer<'static>,
}

impl Identity {
    pub fn from_pem(cert: &str, key: &str, ca: &str) -> Result<Identity> {
        let ca = cert_der(ca)?;
        Ok(Identity {
            chain: vec![cert_der(cert)?, ca.clone()],
            key: Arc::new(
                PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|e| anyhow!("bad key PEM: {e}"))?,
            ),
            ca,
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The listener's TLS: TLS 1.3 only; a client certificate from the cluster CA is
/// checked when presented and required by every call but `Join` (the service checks).
pub fn server_config(id: &Identity) -> Result<ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots()?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A node's client TLS towards another node: TLS 1.3, the peer's certificate must chain
/// to the cluster CA and name the expected node; our certificate goes along.
pub fn client_config(id: &Identity) -> Result<ClientConfig> {
    let verifier = WebPkiServerVerifier::builder_with_provider(id.roots()?, provider()).build()?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Chain(Arc::new(
            rustls::sign::CertifiedKey::from_der(
                id.chain.clone(),
                id.key.clone_key(),
                &provider(),
            )?,
        ))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct Chain(Arc<rustls::sign::CertifiedKey>);

impl ResolvesClientCert for Chain {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The joining node's TLS: no certificate of its own; the main's chain must contain a CA
/// whose fingerprint is the one in the token, and the main's certificate must chain to it.
pub fn join_config(ca_fingerprint: &str) -> Result<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            fingerprint: ca_fingerprint.to_ascii_lowercase(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct Pinned {
    fingerprint: String,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the main's CA is not the one the join token names (wrong address, or a token from another cluster)".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        // The main's name is not known before the join answers: the chain decides.
        let name = leaf_name(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        inner.verify_server_cert(end_entity, &[], &name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The node name a cluster certificate carries (its common name, which is also its DNS
/// SAN).
pub fn leaf_name(der: &CertificateDer<'_>) -> Option<ServerName<'static>> {
    ServerName::try_from(common_name(der)?).ok()
}

/// The common name of a certificate this module issued. Our certificates put the
/// organisation then the common name, both UTF8String, so the last CN attribute in the
/// DER is the subject's (the issuer's comes first).
pub fn common_name(der: &[u8]) -> Option<String> {
    // OID 2.5.4.3 (commonName) followed by a UTF8String (0x0c) or PrintableString (0x13).
    const CN: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let mut found = None;
    let mut i = 0;
    while i + CN.len() + 2 <= der.len() {
        if der[i..i + CN.len()] == CN && matches!(der[i + CN.len()], 0x0c | 0x13) {
            let len = usize::from(der[i + CN.len() + 1]);
            let start = i + CN.len() + 2;
            if len < 0x80 && start + len <= der.len() {
                found = std::str::from_utf8(&der[start..start + len])
                    .ok()
                    .map(str::to_string);
            }
        }
        i += 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_node_certificate_names_the_node_and_chains_to_the_ca() {
        let (cn, ca_pem, ca_key) = create_ca().unwrap();
        let (key_pem, raw) = node_key().unwrap();
        let cert = sign_node(&cn, &ca_key, "child-1.example", &raw).unwrap();
        let der = cert_der(&cert).unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("child-1.example"));
        assert_eq!(
            common_name(&cert_der(&ca_pem).unwrap()).as_deref(),
            Some(cn.as_str())
        );
        let id = Identity::from_pem(&cert, &key_pem, &ca_pem).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(id.roots().unwrap(), provider())
            .build()
            .unwrap();
        let now = UnixTime::now();
        verifier
            .verify_server_cert(
                &der,
                &[],
                &ServerName::try_from("child-1.example").unwrap(),
                &[],
                now,
            )
            .expect("chains to the CA and names the node");
        assert!(
            verifier
                .verify_server_cert(&der, &[], &ServerName::try_from("main").unwrap(), &[], now)
                .is_err(),
            "another node's name is refused"
        );
        // A certificate from another CA does not chain.
        let (cn2, _, key2) = create_ca().unwrap();
        let other = sign_node(&cn2, &key2, "child-1.example", &raw).unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &cert_der(&other).unwrap(),
                    &[],
                    &ServerName::try_from("child-1.example").unwrap(),
                    &[],
                    now
                )
                .is_err()
        );
        assert!(sign_node(&cn, &ca_key, "Bad Name", &raw).is_err());
        assert!(sign_node(&cn, &ca_key, "ok", &raw[..10]).is_err());
    }

    #[test]
    fn node_names_look_like_host_names() {
        for good in ["main", "mx1.example.org", "node-2"] {
            check_node_name(good).unwrap();
        }
        for bad in ["", "Main", "-x", "a..b", "x_y", &"a".repeat(64)] {
            assert!(check_node_name(bad).is_err(), "{bad}");
        }
    }
}
