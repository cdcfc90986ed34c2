//! The outbound client (`mb_smtp::client`) against this daemon's own sessions and
//! against hand-written servers: pipelining, LMTP, STARTTLS, refusals.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::session::{Client as Peer, Listener, Session, Settings, TlsMode};
use crate::spool::{Queue, Spool};
use mb_smtp::client::*;

/// The session tests' settings, as a relay for served.example that takes 100 kB.
fn settings() -> Settings {
    let mut s = crate::tests::settings();
    s.max_size = 100_000;
    s.max_recipients = 10;
    s.mynetworks = vec![];
    s.tls_mode = TlsMode::None;
    s
}

#[test]
fn dot_stuffing() {
    assert_eq!(dot_stuff(b".a\r\nb\r\n..c"), b"..a\r\nb\r\n...c\r\n");
    assert_eq!(dot_stuff(b"x\r\n"), b"x\r\n");
    for (i, o) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("\0u\0p", "AHUAcA=="),
    ] {
        assert_eq!(base64_encode(i.as_bytes()), o);
        assert_eq!(crate::session::base64_decode(o).unwrap(), i.as_bytes());
    }
}

/// The client against our own server session: both sides of the protocol are real.
#[tokio::test]
async fn delivers_to_an_smtp_server_with_per_recipient_results() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let spool = Arc::new(spool);
    let (a, b) = tokio::io::duplex(1 << 20);
    let s = spool.clone();
    let server = tokio::spawn(async move {
        let settings = settings();
        let (_t, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        Session::new(
            Box::new(b),
            &settings,
            &s,
            Peer { ip, port: 25 },
            Listener::Smtp,
        )
        .run(shutdown)
        .await
    });
    let mut c = Client::connect(Box::new(a), Duration::from_secs(10), false)
        .await
        .unwrap();
    c.hello("mx.sender.example").await.unwrap();
    assert!(c.caps.pipelining && c.caps.eightbitmime && c.caps.size == Some(100_000));
    let msg = b"Subject: relay\r\n\r\n.starts with a dot\r\n..two\r\nend";
    let rcpts = vec![
        "u@served.example".to_string(),
        "x@elsewhere.example".to_string(),
        "v@served.example".to_string(),
    ];
    let out = c.send("a@sender.example", &rcpts, msg).await.unwrap();
    assert_eq!(
        out.iter().map(|o| o.response.code).collect::<Vec<_>>(),
        [250, 554, 250]
    );
    assert!(out[0].response.text().contains("queued as"), "{:?}", out[0]);
    // A refused sender refuses the whole message.
    let err = c.send("bad@@sender", &rcpts, msg).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Refused(ref r) if r.code == 501),
        "{err}"
    );
    assert!(!err.is_transient());
    c.quit().await;
    server.await.unwrap();
    let (got, env) = spool.messages(Queue::Incoming).remove(0);
    assert!(
        got.ends_with(b"Subject: relay\r\n\r\n.starts with a dot\r\n..two\r\nend\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(env.recipients.len(), 2);
}

/// A scripted LMTP server: one recipient's mailbox is full.
#[tokio::test]
async fn lmtp_gives_one_reply_per_recipient() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(b);
        let mut r = BufReader::new(r);
        w.write_all(b"220 lmtp ready\r\n").await.unwrap();
        let mut line = String::new();
        let mut seen = Vec::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            seen.push(line.trim_end().to_string());
            let reply: &[u8] = match line.split_whitespace().next().unwrap_or("") {
                "LHLO" => b"250-lmtp\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n",
                "MAIL" | "RCPT" => b"250 2.1.0 ok\r\n",
                "DATA" => b"354 go\r\n",
                "." => b"250 2.0.0 <a@served.example> delivered\r\n452 4.2.2 <b@served.example> mailbox full\r\n",
                "QUIT" => {
                    w.write_all(b"221 bye\r\n").await.unwrap();
                    break;
                }
                _ => b"",
            };
            w.write_all(reply).await.unwrap();
        }
        seen
    });
    let mut c = Client::connect(Box::new(a), Duration::from_secs(10), true)
        .await
        .unwrap();
    c.hello("gw.example").await.unwrap();
    let rcpts = vec![
        "a@served.example".to_string(),
        "b@served.example".to_string(),
    ];
    let out = c
        .send("s@sender.example", &rcpts, b"Subject: x\r\n\r\nhi\r\n")
        .await
        .unwrap();
    assert_eq!(out[0].response.code, 250);
    assert!(out[1].response.is_transient() && out[1].response.text().contains("mailbox full"));
    c.quit().await;
    let seen = server.await.unwrap();
    assert_eq!(seen[0], "LHLO gw.example");
    assert!(
        seen.iter().any(|l| l == "MAIL FROM:<s@sender.example>"),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|l| l == "RCPT TO:<b@served.example>"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn starttls_then_delivers() {
    let (acceptor, connector) = crate::tests::tls_pair();
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let (a, b) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut settings = settings();
        settings.tls_mode = TlsMode::Enabled;
        settings.tls = Some(acceptor);
        let (_t, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        Session::new(
            Box::new(b),
            &settings,
            &spool,
            Peer { ip, port: 25 },
            Listener::Smtp,
        )
        .run(shutdown)
        .await
    });
    let mut c = Client::connect(Box::new(a), Duration::from_secs(10), false)
        .await
        .unwrap();
    c.hello("mx.sender.example").await.unwrap();
    assert!(c.caps.starttls);
    let name = rustls_pki_types::ServerName::try_from("mx.served.example").unwrap();
    let tls = c
        .starttls(&connector, name, "mx.sender.example")
        .await
        .unwrap();
    assert!(tls.contains("TLSv1_3"), "{tls}");
    assert!(!c.caps.starttls, "STARTTLS offered again after the upgrade");
    let out = c
        .send(
            "a@sender.example",
            &["u@served.example".to_string()],
            b"Subject: t\r\n\r\nx\r\n",
        )
        .await
        .unwrap();
    assert_eq!(out[0].response.code, 250);
    c.quit().await;
    assert!(server.await.unwrap().tls);
}

#[tokio::test]
async fn refusals_and_bad_servers() {
    // A refused greeting.
    let (a, mut b) = tokio::io::duplex(1024);
    b.write_all(b"554 5.7.1 go away\r\n").await.unwrap();
    let err = Client::connect(Box::new(a), Duration::from_secs(5), false)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Refused(ref r) if r.code == 554));
    // Garbage instead of a reply.
    let (a, mut b) = tokio::io::duplex(1024);
    b.write_all(b"hello there\r\n").await.unwrap();
    let err = Client::connect(Box::new(a), Duration::from_secs(5), false)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    assert!(err.is_transient());
    // Silence.
    let (a, _b) = tokio::io::duplex(1024);
    let err = Client::connect(Box::new(a), Duration::from_millis(200), false)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Timeout));
}
