//! No backscatter, no loops (issue 14, item 3): mail from the internet that the internal
//! server refuses is bounced with its headers only and gets no success notices; MX hosts
//! that are this gateway (loopback, 0.0.0.0) bounce with 5.4.6 and are never connected.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mb_testkit::{Dnsmasq, Gateway, SmtpSink, free_port, text, wait_until};

use crate::smtp::Raw;

/// The transactions an internal server received: each its MAIL and RCPT lines, joined.
type Lines = Arc<Mutex<Vec<String>>>;

/// An internal mail server: refuses RCPT to `nobody@` with 550 5.1.1, takes the rest.
/// Without `dsn` it offers no DSN, so the gateway reports success itself when asked;
/// with it, the DSN parameters are passed on (and recorded).
fn internal_server(dsn: bool) -> (u16, Lines) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let lines = Lines::default();
    let seen = lines.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let seen = seen.clone();
            std::thread::spawn(move || serve(stream, dsn, &seen));
        }
    });
    (port, lines)
}

fn serve(stream: TcpStream, dsn: bool, seen: &Mutex<Vec<String>>) {
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let _ = w.write_all(b"220 internal.served.test ESMTP\r\n");
    let mut in_data = false;
    let mut transaction = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let reply: &[u8] = if in_data {
            if line != ".\r\n" {
                continue;
            }
            in_data = false;
            b"250 2.0.0 queued\r\n"
        } else {
            let up = line.to_ascii_uppercase();
            if up.starts_with("MAIL") || up.starts_with("RCPT") {
                if up.starts_with("MAIL") && !transaction.is_empty() {
                    seen.lock().unwrap().push(std::mem::take(&mut transaction));
                }
                transaction.push_str(line.trim_end());
                transaction.push('\n');
            }
            if up.starts_with("EHLO") && dsn {
                b"250-internal.served.test\r\n250-DSN\r\n250 8BITMIME\r\n"
            } else if up.starts_with("EHLO") {
                b"250-internal.served.test\r\n250 8BITMIME\r\n"
            } else if up.starts_with("RCPT TO:<NOBODY@") {
                b"550 5.1.1 <nobody@served.test>: Recipient address rejected: User unknown\r\n"
            } else if up.starts_with("DATA") {
                seen.lock().unwrap().push(std::mem::take(&mut transaction));
                in_data = true;
                b"354 go ahead\r\n"
            } else if up.starts_with("QUIT") {
                let _ = w.write_all(b"221 bye\r\n");
                return;
            } else {
                b"250 2.0.0 ok\r\n"
            }
        };
        if w.write_all(reply).is_err() {
            return;
        }
    }
}

struct Setup {
    gw: Gateway,
    port: u16,
    notices: SmtpSink,
    _dns: Dnsmasq,
    /// Connections made to loopback's mx_port (where loop.test's MX points).
    loop_hits: Arc<AtomicUsize>,
    /// What the DSN-capable server for dsn.test was sent.
    dsn_lines: Lines,
}

/// The gateway for served.test (relay host: `internal_server` without DSN) and dsn.test
/// (a transport entry to one with DSN), with mynetworks 127.0.0.9 only: 127.0.0.5 is the
/// internet. Notices to sender.test go to a sink.
fn setup() -> Setup {
    let (port, reinject, mx_port) = (free_port(), free_port(), free_port());
    let (internal, _) = internal_server(false);
    let (with_dsn, dsn_lines) = internal_server(true);
    let notices = SmtpSink::start(&[]).unwrap();
    // Anything listening where the looping MX hosts point counts its connections.
    let trap = TcpListener::bind(("127.0.0.1", mx_port)).unwrap();
    let loop_hits = Arc::new(AtomicUsize::new(0));
    let hits = loop_hits.clone();
    std::thread::spawn(move || {
        for s in trap.incoming() {
            if s.is_ok() {
                hits.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let dns = Dnsmasq::start(&[
        "--mx-host=loop.test,mx.loop.test,10".into(),
        "--host-record=mx.loop.test,127.0.0.1".into(),
        "--mx-host=zero.test,mx.zero.test,10".into(),
        "--host-record=mx.zero.test,0.0.0.0".into(),
    ])
    .unwrap();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
         [network.reinject]\nport = {reinject}\n\
         [network.protection]\nmode = \"public\"\n\
         [network.dns]\nservers = \"{}\"\n[network.smtp.tls]\noutbound = \"none\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test,dsn.test\"\nmynetworks = \"127.0.0.9/32\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {internal}\ntls = \"none\"\n\
         transport = \"sender.test=smtp:[127.0.0.1]:{},dsn.test=smtp:[127.0.0.1]:{with_dsn}\"\n\
         [queue]\nmx_port = {mx_port}\n[filter]\nenabled = false\n",
        dns.servers(),
        notices.port
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    Setup {
        gw,
        port,
        notices,
        _dns: dns,
        loop_hits,
        dsn_lines,
    }
}

/// Sends one message from `source` with DSN parameters on each RCPT.
fn send(port: u16, source: &str, rcpts: &[&str], subject: &str) {
    let mut c = Raw::from_source(source, port);
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO client.test");
    let r = c.cmd("MAIL FROM:<alice@sender.test> RET=FULL");
    assert!(r.starts_with("250"), "{r}");
    for rcpt in rcpts {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}> NOTIFY=SUCCESS,DELAY,FAILURE"));
        assert!(r.starts_with("250"), "{rcpt}: {r}");
    }
    c.cmd("DATA");
    let r = c.cmd(&format!(
        "Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nSECRET BODY OF {subject}\r\n."
    ));
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT");
}

fn wait_empty(gw: &Gateway) {
    wait_until("the queue to empty", Duration::from_secs(30), || {
        let (_, out, _) = text(&gw.tool("mb-queue", &["--json", "list"]));
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v.as_array().map(Vec::is_empty))
            .unwrap_or(false)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.smtpd_log()));
}

/// The notices received about messages with `subject`.
fn notices_about(s: &Setup, subject: &str) -> Vec<String> {
    s.notices
        .messages()
        .into_iter()
        .filter(|m| m.contains(&format!("Subject: {subject}")))
        .collect()
}

#[test]
fn internet_mail_is_bounced_with_headers_only_and_loops_bounce_with_5_4_6() {
    let s = setup();
    // From the internet: one unknown and one known recipient, NOTIFY=SUCCESS,DELAY,FAILURE.
    send(
        s.port,
        "127.0.0.5",
        &["nobody@served.test", "known@served.test"],
        "from-internet",
    );
    // The same to a next hop that takes DSN parameters: they are passed on trimmed.
    send(s.port, "127.0.0.5", &["outside@dsn.test"], "dsn-outside");
    send(s.port, "127.0.0.9", &["inside@dsn.test"], "dsn-inside");
    // From mynetworks, the same: the full treatment, as the sender asked.
    send(
        s.port,
        "127.0.0.9",
        &["nobody@served.test", "known@served.test"],
        "from-inside",
    );
    // Domains whose MX is this gateway (loopback, 0.0.0.0).
    send(
        s.port,
        "127.0.0.9",
        &["u@loop.test", "v@zero.test"],
        "to-loops",
    );
    wait_empty(&s.gw);
    wait_until("the notices", Duration::from_secs(30), || {
        notices_about(&s, "to-loops").len() == 1 && notices_about(&s, "from-inside").len() == 2
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", s.notices.messages()));

    let outside = notices_about(&s, "from-internet");
    assert_eq!(
        outside.len(),
        1,
        "one bounce, no success notice: {outside:?}"
    );
    let bounce = &outside[0];
    assert!(
        bounce.contains("Final-Recipient: rfc822; nobody@served.test"),
        "{bounce}"
    );
    assert!(bounce.contains("Status: 5.1.1"), "{bounce}");
    assert!(
        bounce.contains("Content-Type: text/rfc822-headers"),
        "{bounce}"
    );
    assert!(!bounce.contains("message/rfc822"), "{bounce}");
    assert!(
        !bounce.contains("SECRET BODY"),
        "the body went back: {bounce}"
    );

    let inside = notices_about(&s, "from-inside");
    let (failed, relayed): (Vec<&String>, Vec<&String>) =
        inside.iter().partition(|m| m.contains("Action: failed"));
    assert_eq!((failed.len(), relayed.len()), (1, 1), "{inside:?}");
    assert!(
        failed[0].contains("SECRET BODY OF from-inside"),
        "RET=FULL: {}",
        failed[0]
    );
    assert!(relayed[0].contains("Action: relayed"), "{}", relayed[0]);

    let loops = &notices_about(&s, "to-loops")[0];
    for d in ["loop.test", "zero.test"] {
        assert!(
            loops.contains(&format!("5.4.6 mail for {d} loops back to myself")),
            "{loops}"
        );
    }
    assert_eq!(
        s.loop_hits.load(Ordering::SeqCst),
        0,
        "a looping MX was connected to"
    );
    // What the DSN-capable next hop was told: success and delay notices and the body
    // only for mail from inside.
    let transactions = s.dsn_lines.lock().unwrap().clone();
    assert_eq!(transactions.len(), 2, "{transactions:?}");
    let to = |rcpt: &str| {
        transactions
            .iter()
            .find(|t| t.contains(rcpt))
            .unwrap_or_else(|| panic!("no transaction for {rcpt}: {transactions:?}"))
            .clone()
    };
    let outside = to("<outside@dsn.test>");
    assert!(
        outside.contains(" RET=HDRS")
            && outside.contains("RCPT TO:<outside@dsn.test> NOTIFY=FAILURE\n"),
        "{outside}"
    );
    let inside = to("<inside@dsn.test>");
    assert!(
        inside.contains(" RET=FULL")
            && inside.contains("RCPT TO:<inside@dsn.test> NOTIFY=SUCCESS,DELAY,FAILURE\n"),
        "{inside}"
    );
    assert!(notices_about(&s, "dsn-outside").is_empty());
    // The message log shows the status (events reach mb-rpcd in batches).
    let mut out = String::new();
    wait_until(
        "the bounce in the message log",
        Duration::from_secs(20),
        || {
            let (code, o, err) = text(
                &s.gw
                    .tool("mb-log", &["--json", "--since", "1h", "--stage", "bounced"]),
            );
            assert_eq!(code, 0, "{err}");
            out = o;
            out.contains("554 5.4.6 mail for loop.test loops back to myself")
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {out}"));
}
