//! Messages larger than ClamAV takes: a real clamd whose StreamMaxLength (256 KiB) is
//! below the message, `clamav.max_size` above and below it, and every
//! `clamav.oversize_action`, changed live through `mb-config`.

use std::time::Duration;

use mb_testkit::{Clamd, EICAR, Gateway, SmtpSink, free_port, text, wait_until};

use crate::filter::send;

/// clamd's StreamMaxLength here.
const CLAMD_LIMIT: u64 = 256 * 1024;

/// A message of about 400 KiB: an EICAR attachment before the filler (`Head`), after
/// it (`Tail`) or none.
#[derive(Clone, Copy)]
enum Eicar {
    Head,
    Tail,
    None,
}

fn large(subject: &str, eicar: Eicar) -> String {
    sized(subject, eicar, 5000)
}

/// A message of `lines` filler lines of 85 bytes, with EICAR as `eicar` says.
fn sized(subject: &str, eicar: Eicar, lines: usize) -> String {
    let attachment = format!(
        "--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"eicar.txt\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n",
        mb_core::message::base64_encode(EICAR.as_bytes())
    );
    let mut m = format!(
        "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
         Message-ID: <{subject}@sender.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
    );
    if let Eicar::Head = eicar {
        m.push_str(&attachment);
    }
    m.push_str("--b1\r\nContent-Type: text/plain\r\n\r\n");
    for i in 0..lines {
        m.push_str(&format!("filler line {i:05} of a message larger than clamd takes ............................\r\n"));
    }
    if let Eicar::Tail = eicar {
        m.push_str(&attachment);
    }
    m.push_str("--b1--\r\n");
    assert!(m.len() as u64 > CLAMD_LIMIT + 100 * 1024, "{}", m.len());
    m
}

/// Sends `message` until the reply starts with `expected` (the filter follows a changed
/// key within moments, not at once); returns that reply.
fn reply_becomes(port: u16, message: &str, expected: &str) -> String {
    let mut last = String::new();
    wait_until(
        &format!("a reply starting {expected:?}"),
        Duration::from_secs(20),
        || {
            last = send(port, message);
            last.starts_with(expected)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: last reply {last:?}"));
    last
}

/// The delivered message whose Subject is `subject`.
fn delivered(sink: &SmtpSink, subject: &str) -> String {
    let mut found = None;
    wait_until(
        &format!("{subject:?} at the sink"),
        Duration::from_secs(20),
        || {
            found = sink.messages().into_iter().find(|m| {
                m.contains(&format!("Subject: {subject}\r\n"))
                    || m.contains(&format!("Subject: {subject}\n"))
            });
            found.is_some()
        },
    )
    .unwrap();
    found.unwrap()
}

fn set(gw: &Gateway, key: &str, value: &str) {
    let (code, out, err) = text(&gw.tool("mb-config", &["set", key, value]));
    assert_eq!(code, 0, "set {key} {value}: {out}{err}");
}

#[test]
fn oversize_messages_follow_max_size_and_oversize_action() {
    let clamd = Clamd::with_stream_max_length(CLAMD_LIMIT).unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 100000\nconnection_rate = 100000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\nport = {}\n\
         [clamav]\nenabled = true\naddress = \"{}\"\nmax_size = \"64K\"\n",
        free_port(),
        sink.port,
        free_port(),
        clamd.address()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    let filter_log = || std::fs::read_to_string(gw.path("filter-1.log")).unwrap_or_default();
    let refusals = || filter_log().matches("clamd refused the stream").count();

    // scan-head (the default), max_size 64K: EICAR in the first 64K of a 400K message is
    // found, a clean one passes with CLAMAV_PARTIAL, and EICAR past the cut is not seen
    // (what scan-head trades for never tempfailing).
    let r = send(port, &large("head", Eicar::Head));
    assert!(
        r.starts_with("554 5.7.1") && r.contains("virus found (Test.EICAR"),
        "{r}"
    );
    let r = send(port, &large("clean-partial", Eicar::None));
    assert!(r.starts_with("250 "), "{r}");
    let m = delivered(&sink, "clean-partial");
    assert!(m.contains("CLAMAV_PARTIAL(0.1)"), "{m}");
    let r = send(port, &large("tail", Eicar::Tail));
    assert!(
        r.starts_with("250 "),
        "EICAR past the first 64K is not scanned: {r}"
    );
    assert_eq!(refusals(), 0, "{}", filter_log());

    // reject: over max_size, 552 5.3.4 without asking clamd ...
    set(&gw, "clamav.oversize_action", "reject");
    let r = reply_becomes(port, &large("reject", Eicar::None), "552 5.3.4");
    assert!(
        r.contains("larger than the virus scanner's limit (65536 bytes)"),
        "{r}"
    );
    assert!(
        filter_log().contains("larger than clamav.max_size"),
        "{}",
        filter_log()
    );
    // ... and with max_size above clamd's limit, clamd's own refusal is recognised: the
    // same 552, not "scanner unavailable".
    set(&gw, "clamav.max_size", "16M");
    let r = reply_becomes(
        port,
        &large("reject", Eicar::None),
        "552 5.3.4 Message refused: clamd refused",
    );
    assert!(r.contains("as larger than its limit"), "{r}");
    assert!(
        clamd.log().contains("INSTREAM: Size limit reached"),
        "{}",
        clamd.log()
    );
    assert!(refusals() > 0);
    // 8 MiB: clamd answers after 256 KiB and hangs up while the rest is being written;
    // the answer still counts.
    let r = send(port, &sized("huge", Eicar::None, 100_000));
    assert!(
        r.starts_with("552 5.3.4 Message refused: clamd refused 8"),
        "{r}"
    );

    // tempfail: 451 4.7.1 saying why, for clamd's limit and for ours; the log names the key.
    set(&gw, "clamav.oversize_action", "tempfail");
    let r = reply_becomes(port, &large("tempfail", Eicar::None), "451 4.7.1");
    assert!(
        r.contains("Message not scanned for viruses: clamd refused"),
        "{r}"
    );
    set(&gw, "clamav.max_size", "64K");
    let r = reply_becomes(
        port,
        &large("tempfail", Eicar::None),
        "451 4.7.1 Message not scanned for viruses: the message (",
    );
    assert!(
        r.contains("larger than the virus scanner's limit (65536 bytes), try again later"),
        "{r}"
    );
    assert!(
        filter_log().contains("clamav.oversize_action = tempfail"),
        "{}",
        filter_log()
    );

    // accept: delivered, marked CLAMAV_UNSCANNED, even with EICAR inside.
    set(&gw, "clamav.oversize_action", "accept");
    let r = reply_becomes(port, &large("unscanned", Eicar::Head), "250 ");
    assert!(r.starts_with("250 "), "{r}");
    let m = delivered(&sink, "unscanned");
    assert!(m.contains("CLAMAV_UNSCANNED(1.0)"), "{m}");
    assert!(!m.contains("CLAMAV_PARTIAL"), "{m}");
    // A message under every limit is still scanned whole.
    let small = crate::filter::with_attachment("small", "readme.txt", EICAR.as_bytes());
    let r = send(port, &small);
    assert!(
        r.starts_with("554 5.7.1") && r.contains("virus found (Test.EICAR"),
        "{r}"
    );

    // scan-head with max_size above clamd's limit: clamd refuses the 400K, the head is
    // halved until it takes it, and EICAR in that head is found.
    set(&gw, "clamav.oversize_action", "scan-head");
    set(&gw, "clamav.max_size", "1M");
    let before = refusals();
    wait_until(
        "scan-head past clamd's refusal",
        Duration::from_secs(20),
        || {
            let r = send(port, &large("head-halved", Eicar::Head));
            assert!(
                !r.starts_with("451"),
                "never a tempfail under scan-head: {r}"
            );
            r.starts_with("554 5.7.1")
                && r.contains("virus found (Test.EICAR")
                && refusals() > before
        },
    )
    .unwrap();
    let r = send(port, &large("clean-halved", Eicar::None));
    assert!(r.starts_with("250 "), "{r}");
    let m = delivered(&sink, "clean-halved");
    assert!(m.contains("CLAMAV_PARTIAL(0.1)"), "{m}");
}
