//! One verdict, one answer: the same messages through the three ways a site can deploy
//! the gateway (mb-smtpd standalone, Postfix's content filter on 10031, Postfix's milter
//! on 10032) get the same reply code, enhanced status code and text, because all three
//! turn a verdict into a reply through `mb_scan::reply`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mb_testkit::mta::{self, Envelope};
use mb_testkit::{Clamd, EICAR, Gateway, SmtpSink, free_port, text, wait_until};

use crate::filter::{send, with_attachment};

/// The final reply to one SMTP transaction, without its CRLF.
fn smtp(port: u16, message: &str) -> String {
    send(port, message).trim_end().to_string()
}

/// One message through the milter as Postfix hands it over (`mb_testkit::mta::milter`);
/// the final reply: `250` for continue/accept (with modifications), else the reply
/// Postfix would give, as one line.
fn milter(port: u16, message: &str) -> String {
    let env = Envelope {
        queue_id: String::new(),
        client_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        helo: "client.test".into(),
        sender: "alice@sender.test".into(),
        recipients: vec!["bob@served.test".into()],
    };
    let answer = mta::milter(port, &env, message.as_bytes()).expect("a milter answer");
    match answer.reply.code {
        250 => "250".into(),
        _ => answer.reply.to_string(),
    }
}

#[test]
fn standalone_content_filter_and_milter_answer_a_verdict_alike() {
    let clamd = Clamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let (smtp_port, cf_port, milter_port) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp_port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\nport = {cf_port}\nnext_hop = \"127.0.0.1:{}\"\n\
         [milter]\nenabled = true\nport = {milter_port}\n\
         [spam.threshold]\ntag = 0.3\nquarantine = 0.4\nreject = 0.5\n\
         [clamav]\nenabled = true\naddress = \"{}\"\n",
        free_port(),
        sink.port,
        sink.port,
        clamd.address()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    gw.start_milter().unwrap();

    let clean = "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: clean\r\n\
                 Date: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <clean@sender.test>\r\n\r\nhello\r\n";
    // No Date and no Message-ID: header symbols over the (lowered) reject threshold.
    let spam = "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: spam\r\n\r\nbuy\r\n";
    let cases = [
        (
            "virus",
            with_attachment("infected", "readme.txt", EICAR.as_bytes()),
            "554 5.7.1 ",
        ),
        (
            "blocked attachment",
            with_attachment("blocked", "invoice.pdf.exe", b"MZ not really"),
            "554 5.7.1 ",
        ),
        ("spam score", spam.to_string(), "550 5.7.1 "),
        ("clean", clean.to_string(), "250"),
    ];
    let all = |message: &str| {
        [
            ("standalone", smtp(smtp_port, message)),
            ("content filter", smtp(cf_port, message)),
            ("milter", milter(milter_port, message)),
        ]
    };
    for (name, message, want) in &cases {
        let answers = all(message);
        for (mode, answer) in &answers {
            assert!(
                answer.starts_with(want),
                "{name} in {mode} mode: {answer:?}\n{answers:#?}"
            );
        }
        if !want.starts_with("250") {
            // The whole line, text included, is the same in every mode.
            assert!(
                answers.iter().all(|(_, a)| a == &answers[0].1),
                "{name}: {answers:#?}"
            );
        }
    }

    // clamd gone, clamav.unavailable_action = tempfail (the default): the same 451 4.7.1
    // everywhere. The change reaches the worker through the configuration feed.
    let (code, _, err) = text(&gw.tool("mb-config", &["set", "clamav.address", "127.0.0.1:1"]));
    assert_eq!(code, 0, "{err}");
    wait_until(
        "the worker to follow clamav.address",
        Duration::from_secs(20),
        || smtp(smtp_port, clean).starts_with("451"),
    )
    .unwrap();
    let answers = all(clean);
    for (mode, answer) in &answers {
        assert!(answer.starts_with("451 4.7.1 "), "{mode}: {answers:#?}");
    }
    assert!(
        answers.iter().all(|(_, a)| a == &answers[0].1),
        "{answers:#?}"
    );
}
