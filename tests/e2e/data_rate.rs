//! Pacing of large messages from unauthenticated clients (issue 14, item 9;
//! `smtp.data_rate_limit`, `smtp.data_rate_allowance`): a client outside mynetworks
//! sending a 6 MiB message is read at the configured rate past its allowance, while
//! another client's small messages go through meanwhile, an authenticated submission
//! client's 6 MiB message is not paced, and the paced message arrives whole at the
//! relay. Real mb-rpcd, mb-smtpd, swaks and Postfix's smtp-sink.

use std::hash::{Hash, Hasher};
use std::process::Command;
use std::time::{Duration, Instant};

use mb_testkit::{Gateway, SmtpSink, free_port, text, wait_until};

use crate::smtp::{Raw, mb_user};

const MIB: usize = 1 << 20;

/// A message of about `size` bytes whose body ends with an `END tag` line (no line
/// starts with a dot).
fn message(tag: &str, from: &str, size: usize) -> String {
    let mut m = format!(
        "From: {from}\r\nTo: big@served.test\r\nSubject: data-rate {tag}\r\n\
         Message-ID: <{tag}@client.test>\r\n\r\n"
    );
    let mut n = 0u32;
    while m.len() < size {
        m.push_str(&format!("{tag} {n:08} {}\r\n", "x".repeat(60)));
        n += 1;
    }
    m.push_str(&format!("END {tag}\r\n"));
    m
}

/// The body of a message (what follows the first empty line), line ends as `\n`.
fn body(message: &str) -> String {
    let m = message.replace('\r', "");
    m.split_once("\n\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn checksum(s: &str) -> (usize, u64) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    (s.len(), h.finish())
}

/// The checksum of the body of `tag`'s message as smtp-sink received it, up to and
/// including its `END tag` line (none: not there, or cut short).
fn delivered(sink: &SmtpSink, tag: &str) -> Option<(usize, u64)> {
    let subject = format!("Subject: data-rate {tag}");
    let m = sink.messages().into_iter().find(|m| m.contains(&subject))?;
    let b = body(&m[m.find(&subject)?..]);
    let end = format!("END {tag}\n");
    let cut = b.find(&end)? + end.len();
    Some(checksum(&b[..cut]))
}

/// Sends `message` over plain SMTP from `source`; the final reply and the time from
/// the 354 to it.
fn send_from(source: &str, port: u16, message: &str) -> (String, Duration) {
    let mut c = Raw::from_source(source, port);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(
        c.cmd("MAIL FROM:<sender@elsewhere.test>")
            .starts_with("250")
    );
    assert!(c.cmd("RCPT TO:<big@served.test>").starts_with("250"));
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "{r}");
    let start = Instant::now();
    c.send(message);
    c.send(".\r\n");
    let r = c.reply();
    let took = start.elapsed();
    c.cmd("QUIT");
    (r, took)
}

#[test]
fn a_large_message_from_outside_is_paced_and_others_are_not() {
    let sink = SmtpSink::start(&[]).unwrap();
    let (port, sub) = (free_port(), free_port());
    // Loopback is outside mynetworks and the trusted networks: 127.0.0.2 is a stranger.
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.submission]\nenabled = true\nport = {sub}\n\
         [network.reinject]\nport = {}\n\
         [network.protection]\nmode = \"public\"\ntrusted_networks = \"192.0.2.0/24\"\n\
         [smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         data_rate_limit = \"1M\"\ndata_rate_allowance = \"1M\"\n\
         [filter]\nenabled = false\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
        free_port(),
        sink.port,
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    let (code, out, err) = mb_user(
        &gw,
        &["add", "sender@served.test"],
        "correct horse battery\n",
    );
    assert_eq!(code, 0, "{out}{err}");

    // The attack: 6 MiB from a stranger, 5 MiB of it past the allowance at 1 MiB/s.
    let paced = message("paced", "sender@elsewhere.test", 6 * MIB);
    let big = {
        let paced = paced.clone();
        std::thread::spawn(move || send_from("127.0.0.2", port, &paced))
    };
    // Meanwhile another stranger's small messages are each taken at once.
    let mut small = Vec::new();
    while !big.is_finished() {
        let tag = format!("small{}", small.len());
        let (r, took) = send_from(
            "127.0.0.3",
            port,
            &message(&tag, "sender@elsewhere.test", 2000),
        );
        assert!(r.starts_with("250"), "{tag}: {r}");
        small.push(took);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (r, took) = big.join().unwrap();
    assert!(r.starts_with("250"), "{r}");
    eprintln!("6 MiB paced in {took:?}; small messages meanwhile: {small:?}");
    assert!(
        took >= Duration::from_millis(4_500),
        "6 MiB at 1 MiB/s past a 1 MiB allowance took only {took:?}"
    );
    assert!(small.len() >= 3, "only {} small messages", small.len());
    for t in &small {
        assert!(
            *t < Duration::from_secs(3),
            "a small message took {t:?}: {small:?}"
        );
    }

    // The account holder's own 6 MiB, over submission with AUTH: not paced.
    let file = gw.path("submission.eml");
    let submitted = message("submitted", "sender@served.test", 6 * MIB);
    std::fs::write(&file, &submitted).unwrap();
    let swaks = mb_testkit::require("swaks", "swaks");
    let start = Instant::now();
    let (code, out, err) = text(
        &Command::new(swaks)
            .args(["--server", "127.0.0.1", "--port", &sub.to_string()])
            .args(["--local-interface", "127.0.0.4"])
            .args(["--from", "sender@served.test", "--to", "big@served.test"])
            .args(["--helo", "client.test", "--suppress-data"])
            .args([
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                "sender@served.test",
            ])
            .args(["--auth-password", "correct horse battery"])
            .arg("--data")
            .arg(format!("@{}", file.display()))
            .output()
            .unwrap(),
    );
    let unpaced = start.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("6 MiB over submission with AUTH in {unpaced:?}");
    assert!(
        unpaced < Duration::from_millis(4_000),
        "the authenticated client's 6 MiB took {unpaced:?}: paced?"
    );

    // Both arrive whole at the relay.
    for (tag, sent) in [("paced", &paced), ("submitted", &submitted)] {
        let want = checksum(&body(sent));
        wait_until(
            &format!("{tag} at the sink"),
            Duration::from_secs(30),
            || delivered(&sink, tag).is_some(),
        )
        .unwrap();
        assert_eq!(delivered(&sink, tag), Some(want), "{tag} arrived changed");
    }
}
