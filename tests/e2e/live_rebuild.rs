//! Live keys whose change must rebuild or re-read state in a running daemon, proven by
//! behaviour: the certificate mb-smtpd presents (`network.smtp.tls.*`), the verdict a
//! worker reaches (`spam.threshold.*`), the domains mb-smtpd accepts (`smtp.domains`)
//! and the next hop it delivers to (`relay.*`), each after an `mb-config set` and
//! without a restart. The resolver (`network.dns.*`) is `live_config.rs`'s.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mb_testkit::{Gateway, SmtpSink, free_port, text, wait_until};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::filter::send;
use crate::smtp::Raw;

/// `mb-config set KEY VALUE`, which must succeed.
fn set(gw: &Gateway, key: &str, value: &str) {
    let (code, out, err) = text(&gw.tool("mb-config", &["set", key, value]));
    assert_eq!(code, 0, "set {key} {value}: {out}{err}");
}

/// Waits until `daemon` reports (`Control.RunningConfig`) that it runs `key` = `want`.
fn wait_runs(gw: &Gateway, daemon: &str, key: &str, want: &str) {
    let mut got = String::new();
    wait_until(
        &format!("{daemon} to run {key}"),
        Duration::from_secs(20),
        || {
            let (code, out, err) =
                text(&gw.tool("mb-config", &["--json", "show", "--daemon", daemon, key]));
            assert_eq!(code, 0, "{out}{err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            got = v["values"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["key"] == key))
                .and_then(|x| x["value"].as_str())
                .unwrap_or_default()
                .to_string();
            got == want
        },
    )
    .unwrap_or_else(|e| panic!("{e}: it runs {got:?}"));
}

/// Accepts any certificate and keeps the server's end-entity certificate: the test
/// asks which certificate is presented, not whether it is trusted.
#[derive(Debug)]
struct Capture {
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate (DER) mb-smtpd presents on `port`: after STARTTLS, or at once
/// (SMTPS). The handshake completes, so the server also proved it holds the key.
fn presented(port: u16, starttls: bool) -> Vec<u8> {
    handshake(port, starttls, rustls::DEFAULT_VERSIONS)
        .unwrap_or_else(|e| panic!("TLS handshake on port {port}: {e}"))
}

/// A TLS handshake offering only `versions`; the server's certificate, or why it failed.
fn handshake(
    port: u16,
    starttls: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Vec<u8>, std::io::Error> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if starttls {
        let mut r = BufReader::new(tcp.try_clone().unwrap());
        let mut reply = || {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                assert!(r.read_line(&mut line).unwrap() > 0, "closed after {all}");
                all.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    return all;
                }
            }
        };
        let greeting = reply();
        assert!(greeting.starts_with("220"), "{greeting}");
        tcp.write_all(b"EHLO client.test\r\n").unwrap();
        let ehlo = reply();
        assert!(ehlo.contains("STARTTLS"), "{ehlo}");
        tcp.write_all(b"STARTTLS\r\n").unwrap();
        let go = reply();
        assert!(go.starts_with("220"), "{go}");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let seen = Arc::new(Mutex::new(None));
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Capture {
            seen: seen.clone(),
            provider,
        }))
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(seen.lock().unwrap().take().expect("a server certificate"))
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// `network.smtp.tls.cert`/`key` set live: the next STARTTLS and the next SMTPS session
/// present the new certificate; a certificate whose key does not match is refused by the
/// daemon (mb-config cannot see the files), which keeps the running one and says why;
/// `network.tls.min_version` rebuilds it too; SIGHUP (logrotate's daily signal) keeps
/// the certificate and versions the database names.
#[test]
fn a_new_certificate_set_live_is_presented_and_a_broken_pair_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (a_cert, a_key) = mb_testkit::self_signed_named("a.served.test");
    let (b_cert, b_key) = mb_testkit::self_signed_named("b.served.test");
    let (c_cert, _) = mb_testkit::self_signed_named("c.served.test");
    let (a_der, b_der) = (der(&a_cert), der(&b_cert));
    let (a_cert_path, a_key_path) = (write("a.crt", &a_cert), write("a.key", &a_key));
    let (b_cert_path, b_key_path) = (write("b.crt", &b_cert), write("b.key", &b_key));
    let c_cert_path = write("c.crt", &c_cert);
    let (port, smtps) = (free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
         rate_per_source = 1000\nconnection_rate = 10000\n\
         [network.smtp.tls]\ncert = \"{a_cert_path}\"\nkey = \"{a_key_path}\"\n\
         [network.smtps]\nenabled = true\nport = {smtps}\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n",
        free_port()
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    let pid = gw.smtpd.as_ref().unwrap().pid();
    assert!(
        presented(port, true) == a_der,
        "STARTTLS does not present A"
    );
    assert!(presented(smtps, false) == a_der, "SMTPS does not present A");

    // The key first: for a moment the pair does not match, which must not matter.
    set(&gw, "network.smtp.tls.key", &b_key_path);
    set(&gw, "network.smtp.tls.cert", &b_cert_path);
    wait_until("STARTTLS to present B", Duration::from_secs(20), || {
        presented(port, true) == b_der
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.smtpd_log()));
    assert!(presented(smtps, false) == b_der, "SMTPS still presents A");
    assert!(
        gw.smtpd_log()
            .contains("TLS settings changed: new sessions use a new certificate"),
        "{}",
        gw.smtpd_log()
    );

    // C's certificate with B's key: accepted by mb-config (the files are the daemon's
    // to read), refused by mb-smtpd, which keeps B and logs why.
    set(&gw, "network.smtp.tls.cert", &c_cert_path);
    wait_until("the refusal to be logged", Duration::from_secs(20), || {
        gw.smtpd_log()
            .lines()
            .any(|l| l.contains("keeping the running certificate") && l.contains("c.crt"))
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.smtpd_log()));
    let refusal = gw
        .smtpd_log()
        .lines()
        .find(|l| l.contains("keeping the running certificate") && l.contains("c.crt"))
        .unwrap()
        .to_string();
    assert!(
        refusal.contains("[WARN]")
            && refusal.contains(&format!(
                "the key in {b_key_path} does not belong to the certificate in {c_cert_path}"
            )),
        "the warning should name the file and the key mismatch: {refusal}"
    );
    assert!(presented(port, true) == b_der, "a broken pair replaced B");
    assert!(presented(smtps, false) == b_der, "a broken pair replaced B");

    // Back to B.
    set(&gw, "network.smtp.tls.cert", &b_cert_path);
    wait_runs(&gw, "mb-smtpd", "network.smtp.tls.cert", &b_cert_path);
    // network.tls.* rebuilds the acceptor too: TLS 1.2 is refused once 1.3 is the oldest
    // version allowed, on both ports.
    let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    assert!(handshake(port, true, tls12).is_ok());
    set(&gw, "network.tls.min_version", "1.3");
    wait_until("TLS 1.2 to be refused", Duration::from_secs(20), || {
        handshake(port, true, tls12).is_err()
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.smtpd_log()));
    assert!(
        handshake(smtps, false, tls12).is_err(),
        "SMTPS still speaks TLS 1.2"
    );
    assert!(presented(smtps, false) == b_der);

    // SIGHUP: the file still names A, the database B; B stays.
    gw.smtpd
        .as_ref()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the reload", Duration::from_secs(20), || {
        gw.smtpd_log()
            .contains("configuration and certificates reloaded")
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.smtpd_log()));
    assert!(
        presented(port, true) == b_der,
        "SIGHUP went back to the file's certificate:\n{}",
        gw.smtpd_log()
    );
    assert!(
        handshake(port, true, tls12).is_err(),
        "SIGHUP went back to the file's TLS versions"
    );
    assert_eq!(gw.smtpd.as_ref().unwrap().pid(), pid);
    assert!(
        gw.smtpd
            .as_mut()
            .unwrap()
            .child
            .try_wait()
            .unwrap()
            .is_none(),
        "mb-smtpd exited:\n{}",
        gw.smtpd_log()
    );
}

/// No Date (1.0) and no Message-ID (0.5): a score of exactly 1.5, from any worker; the
/// client is in `smtp.mynetworks`, so no DNS-based check adds to it.
fn scored(subject: &str) -> String {
    format!(
        "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: {subject}\r\n\r\nbuy now\r\n"
    )
}

/// `spam.threshold.*` set live: a message scoring 1.5 is tagged under the file's
/// thresholds, quarantined once the quarantine threshold drops below it, rejected once
/// the reject threshold does, with the same worker process throughout.
#[test]
fn thresholds_set_live_change_the_verdict_of_a_running_worker() {
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\n\
         [spam.threshold]\ntag = 1.0\nquarantine = 2.0\nreject = 3.0\n",
        free_port(),
        sink.port
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    let worker = gw.filters[0].pid();
    let filter_log = || std::fs::read_to_string(gw.path("filter-1.log")).unwrap_or_default();

    let r = send(port, &scored("one"));
    assert!(r.starts_with("250"), "{r}");
    wait_until("the tagged message", Duration::from_secs(20), || {
        sink.messages().iter().any(|m| m.contains("Subject: one"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", filter_log()));
    let one = sink.messages().concat();
    assert!(
        one.contains("X-Spam: Yes") && one.contains("X-Spam-Score: 1.5"),
        "tagged, score 1.5: {one}"
    );

    set(&gw, "spam.threshold.quarantine", "1.2");
    wait_runs(&gw, "mb-filter@1", "spam.threshold.quarantine", "1.2");
    let r = send(port, &scored("two"));
    assert!(r.starts_with("250"), "{r}");
    let mut listed = String::new();
    wait_until("two in the quarantine", Duration::from_secs(20), || {
        listed = text(&gw.tool("mb-quarantine", &["list"])).1;
        listed.contains("two")
    })
    .unwrap_or_else(|e| panic!("{e}: {listed}\n{}", filter_log()));
    assert!(listed.contains("spam score 1.5"), "{listed}");

    set(&gw, "spam.threshold.reject", "1.4");
    wait_runs(&gw, "mb-filter@1", "spam.threshold.reject", "1.4");
    let r = send(port, &scored("three"));
    assert!(
        r.starts_with("550 5.7.1") && r.contains("score 1.5"),
        "the new reject threshold: {r}\n{}",
        filter_log()
    );
    // Only the tagged message was delivered: quarantined and rejected mail is never
    // queued, so nothing is still on its way.
    let delivered = sink.messages();
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(gw.filters[0].pid(), worker);
    assert!(gw.filters[0].child.try_wait().unwrap().is_none());
}

/// RCPT for `domain` in a new session; returns the reply.
fn rcpt(port: u16, domain: &str) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<alice@sender.test>");
    let r = c.cmd(&format!("RCPT TO:<bob@{domain}>"));
    c.cmd("QUIT");
    r
}

/// `smtp.domains` set live: a domain added is accepted at RCPT by a running mb-smtpd,
/// and refused as relaying again once removed.
#[test]
fn domains_set_live_are_accepted_and_removed_ones_refused_again() {
    let port = free_port();
    // Loopback outside mynetworks: the client is on the internet.
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n",
        free_port()
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    assert!(rcpt(port, "served.test").starts_with("250"));
    let r = rcpt(port, "added.test");
    assert!(
        r.starts_with("554 5.7.1") && r.contains("Relay access denied"),
        "{r}"
    );

    set(&gw, "smtp.domains", "served.test, added.test");
    wait_runs(&gw, "mb-smtpd", "smtp.domains", "served.test,added.test");
    let r = rcpt(port, "added.test");
    assert!(r.starts_with("250"), "added.test is served now: {r}");

    set(&gw, "smtp.domains", "added.test");
    wait_runs(&gw, "mb-smtpd", "smtp.domains", "added.test");
    let r = rcpt(port, "served.test");
    assert!(
        r.starts_with("554 5.7.1") && r.contains("Relay access denied"),
        "served.test was removed: {r}"
    );
    assert!(rcpt(port, "added.test").starts_with("250"));
}

/// `relay.port` and `relay.transport` set live: mail queued afterwards goes to the new
/// next hop, one smtp-sink for each, with the same mb-smtpd process.
#[test]
fn relay_set_live_sends_new_mail_to_the_new_next_hop() {
    let (a, b) = (SmtpSink::start(&[]).unwrap(), SmtpSink::start(&[]).unwrap());
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n[filter]\nenabled = false\n",
        free_port(),
        a.port
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    let pid = gw.smtpd.as_ref().unwrap().pid();
    let at = |sink: &SmtpSink, subject: &str| {
        sink.messages()
            .iter()
            .any(|m| m.lines().any(|l| l == format!("Subject: {subject}")))
    };
    let message = |s: &str| {
        format!(
            "From: alice@served.test\r\nTo: bob@served.test\r\nSubject: {s}\r\n\
             Date: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <{s}@served.test>\r\n\r\nhello\r\n"
        )
    };
    let deliver = |subject: &str, to: &SmtpSink| {
        let r = send(port, &message(subject));
        assert!(r.starts_with("250"), "{r}");
        wait_until(
            &format!("{subject} at its sink"),
            Duration::from_secs(20),
            || at(to, subject),
        )
        .unwrap_or_else(|e| panic!("{e}:\n{}", gw.smtpd_log()));
    };

    deliver("first", &a);
    set(&gw, "relay.port", &b.port.to_string());
    wait_runs(&gw, "mb-smtpd", "relay.port", &b.port.to_string());
    deliver("second", &b);
    assert!(
        !at(&a, "second"),
        "the old relay port got the second message"
    );

    // A transport entry for the domain beats the relay host: back to A.
    let entry = format!("served.test=smtp:[127.0.0.1]:{}", a.port);
    set(&gw, "relay.transport", &entry);
    wait_runs(&gw, "mb-smtpd", "relay.transport", &entry);
    deliver("third", &a);
    assert!(
        !at(&b, "third"),
        "the relay host got mail its transport entry routes"
    );
    assert_eq!(gw.smtpd.as_ref().unwrap().pid(), pid);
}
