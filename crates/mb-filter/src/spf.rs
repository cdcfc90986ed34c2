//! SPF for the filter's sender checks: the RFC 7208 evaluator lives in the `mb-spf`
//! library (mb-smtpd's greylisting uses it too); this module keeps the filter's name for
//! it and tests that the sender checks report its verdict.

pub use mb_spf::*;

#[cfg(test)]
mod tests {
    use mb_testkit::{AuthDns, Rr, Zone};

    /// The filter's sender checks use this evaluator's verdict: in Authentication-Results,
    /// in the symbols, in what the message is authenticated for, and as the SPF result DMARC
    /// is given.
    #[tokio::test]
    async fn the_sender_checks_use_the_rfc_verdict() {
        let mut zone = Zone::new();
        let txt = |z: &mut Zone, name: &str, text: &str| {
            z.add(name, Rr::txt(text)).expect("a record");
        };
        // mail-auth passed a prefix of /33; RFC 7208 calls the record invalid.
        txt(&mut zone, "lenient.test", "v=spf1 ip4:192.0.2.0/33 -all");
        // MAIL FROM passes and is aligned with From, whose domain says p=reject; the HELO
        // name's own record fails the client, which mail-auth reported as the SPF result
        // (and so DMARC failed and the message was refused).
        txt(&mut zone, "aligned.test", "v=spf1 ip4:192.0.2.1 -all");
        txt(&mut zone, "_dmarc.aligned.test", "v=DMARC1; p=reject");
        txt(&mut zone, "helo-fails.test", "v=spf1 -all");
        let server = AuthDns::start(zone).expect("the DNS server starts");
        let cfg = mb_core::Config::from_toml_str(
            &format!("[network.dns]\nservers = \"{}\"\n", server.servers()),
            "test",
        )
        .expect("a configuration");
        let auth = crate::auth::Auth::from_config(&cfg).expect("a resolver");
        let ip = [192, 0, 2, 1].into();
        let message = |from: &str| {
            format!(
                "From: <{from}>\r\nTo: <rcpt@example.com>\r\nSubject: SPF\r\n\
                 Date: Tue, 1 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHello\r\n"
            )
        };
        let symbols = |o: &crate::auth::Outcome| -> Vec<String> {
            o.symbols.iter().map(|s| s.name.clone()).collect()
        };

        let raw = message("a@lenient.test");
        let out = auth
            .check(
                &cfg,
                "mx.example.com",
                ip,
                "mail.lenient.test",
                "a@lenient.test",
                raw.as_bytes(),
            )
            .await;
        assert!(out.header.contains("spf=permerror"), "{}", out.header);
        assert!(
            !symbols(&out).contains(&"SPF_PASS".to_string()),
            "{:?}",
            symbols(&out)
        );
        assert_eq!(out.sender_authenticated("a@lenient.test"), None);

        let raw = message("ceo@aligned.test");
        let out = auth
            .check(
                &cfg,
                "mx.example.com",
                ip,
                "helo-fails.test",
                "bounce@aligned.test",
                raw.as_bytes(),
            )
            .await;
        assert!(out.header.contains("spf=pass"), "{}", out.header);
        assert!(out.header.contains("dmarc=pass"), "{}", out.header);
        assert_eq!(out.dmarc_reject, None);
        let names = symbols(&out);
        assert!(names.contains(&"SPF_PASS".to_string()), "{names:?}");
        assert!(names.contains(&"DMARC_PASS".to_string()), "{names:?}");
        assert!(out.sender_authenticated("bounce@aligned.test").is_some());
    }
}
