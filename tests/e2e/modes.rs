//! One verdict, one answer: the same messages through the three ways a site can deploy
//! the gateway (mb-smtpd standalone, Postfix's content filter on 10031, Postfix's milter
//! on 10032) get the same reply code, enhanced status code and text, because all three
//! turn a verdict into a reply through `mb_scan::reply`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use mb_testkit::{Clamd, EICAR, Gateway, SmtpSink, free_port, text, wait_until};

use crate::filter::{send, with_attachment};

/// The final reply to one SMTP transaction, without its CRLF.
fn smtp(port: u16, message: &str) -> String {
    send(port, message).trim_end().to_string()
}

fn packet(s: &mut TcpStream, cmd: u8, data: &[u8]) {
    let len = u32::try_from(data.len() + 1).unwrap();
    let mut p = len.to_be_bytes().to_vec();
    p.push(cmd);
    p.extend_from_slice(data);
    s.write_all(&p).unwrap();
}

fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("a milter reply");
    let mut data = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut data).unwrap();
    (data[0], data[1..].to_vec())
}

/// The answer to a step that must be "continue".
fn expect_continue(s: &mut TcpStream, step: &str) {
    let (cmd, data) = read_packet(s);
    assert_eq!(
        char::from(cmd),
        'c',
        "{step}: {:?}",
        String::from_utf8_lossy(&data)
    );
}

/// One message through the milter as Postfix hands it over (protocol 6, every step
/// answered); the final reply: `250` for continue/accept (with modifications), or the
/// REPLYCODE text, or the one-letter command for anything else.
fn milter(port: u16, message: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut opt = 6u32.to_be_bytes().to_vec();
    opt.extend_from_slice(&0x1ffu32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    packet(&mut s, b'O', &opt);
    assert_eq!(read_packet(&mut s).0, b'O');
    let mut connect = b"client.test\0".to_vec();
    connect.push(b'4');
    connect.extend_from_slice(&2525u16.to_be_bytes());
    connect.extend_from_slice(b"127.0.0.1\0");
    packet(&mut s, b'C', &connect);
    expect_continue(&mut s, "connect");
    packet(&mut s, b'H', b"client.test\0");
    expect_continue(&mut s, "helo");
    packet(&mut s, b'M', b"<alice@sender.test>\0");
    expect_continue(&mut s, "mail");
    packet(&mut s, b'R', b"<bob@served.test>\0");
    expect_continue(&mut s, "rcpt");
    let (head, body) = message.split_once("\r\n\r\n").unwrap();
    for line in head.split("\r\n") {
        let (name, value) = line.split_once(": ").unwrap();
        packet(&mut s, b'L', format!("{name}\0{value}\0").as_bytes());
        expect_continue(&mut s, name);
    }
    packet(&mut s, b'N', &[]);
    expect_continue(&mut s, "end of headers");
    for chunk in body.as_bytes().chunks(60_000) {
        packet(&mut s, b'B', chunk);
        expect_continue(&mut s, "body");
    }
    packet(&mut s, b'E', &[]);
    loop {
        let (cmd, data) = read_packet(&mut s);
        match cmd {
            // Progress and header modifications come before the final answer.
            b'p' | b'h' | b'i' | b'm' | b'q' => continue,
            b'c' | b'a' => return "250".into(),
            b'y' => {
                return String::from_utf8_lossy(&data)
                    .trim_end_matches('\0')
                    .replace("%%", "%");
            }
            other => return char::from(other).to_string(),
        }
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
