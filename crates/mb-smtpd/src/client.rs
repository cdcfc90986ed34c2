//! The outbound side: an SMTP and LMTP client that hands one message to a next hop and
//! reports what happened to each recipient (RFC 5321, RFC 2920 pipelining, RFC 2033
//! per-recipient LMTP replies, STARTTLS). The queue manager builds on it.

use std::time::Duration;

use crate::conn::{Conn, Io, ReadError};

/// A reply from the server: its code and text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Response {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// A 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The reply as one line, for logs and the queue's "last error".
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection failed: {0}")]
    Io(String),
    #[error("the server did not answer in time")]
    Timeout,
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused the session or the whole transaction.
    #[error("refused: {}", .0.text())]
    Refused(Response),
}

impl ClientError {
    /// Whether a later attempt may succeed (everything but a 5xx refusal).
    pub fn is_transient(&self) -> bool {
        !matches!(self, ClientError::Refused(r) if !r.is_transient())
    }
}

/// What the server offered after EHLO/LHLO.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    /// AUTH mechanisms offered, upper case.
    pub auth: Vec<String>,
}

/// The final answer for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub recipient: String,
    pub response: Response,
}

pub struct Client {
    conn: Conn,
    lmtp: bool,
    pub caps: Capabilities,
}

/// Longest reply line accepted from a server.
const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one reply.
const MAX_REPLY_LINES: usize = 100;

impl Client {
    /// Reads the greeting; anything but 220 is a refusal.
    pub async fn connect(
        io: Box<dyn Io>,
        timeout: Duration,
        lmtp: bool,
    ) -> Result<Client, ClientError> {
        let mut client = Client {
            conn: Conn::new(io, timeout),
            lmtp,
            caps: Capabilities::default(),
        };
        let greeting = client.response().await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused(greeting));
        }
        Ok(client)
    }

    /// EHLO (LHLO for LMTP), falling back to HELO for an SMTP server without ESMTP.
    pub async fn hello(&mut self, name: &str) -> Result<(), ClientError> {
        let verb = if self.lmtp { "LHLO" } else { "EHLO" };
        let r = self.command(&format!("{verb} {name}")).await?;
        if r.code == 250 {
            self.caps = parse_caps(&r);
            return Ok(());
        }
        if self.lmtp || r.code < 500 {
            return Err(ClientError::Refused(r));
        }
        let r = self.command(&format!("HELO {name}")).await?;
        if r.code != 250 {
            return Err(ClientError::Refused(r));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// Upgrades to TLS with STARTTLS and says hello again (RFC 3207). Returns the
    /// negotiated version and cipher for the Received header and logs.
    pub async fn starttls(
        &mut self,
        connector: &tokio_rustls::TlsConnector,
        server: rustls_pki_types::ServerName<'static>,
        name: &str,
    ) -> Result<String, ClientError> {
        let r = self.command("STARTTLS").await?;
        if r.code != 220 {
            return Err(ClientError::Refused(r));
        }
        if !self.conn.buffered().is_empty() {
            return Err(ClientError::Protocol(
                "data after the STARTTLS reply".into(),
            ));
        }
        let io = self.conn.take_io();
        let tls = tokio::time::timeout(self.conn.timeout, connector.connect(server, io))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|e| ClientError::Io(format!("TLS handshake: {e}")))?;
        let (_, state) = tls.get_ref();
        let description = format!(
            "{:?} with cipher {:?}",
            state
                .protocol_version()
                .map_or(rustls::ProtocolVersion::Unknown(0), |v| v),
            state.negotiated_cipher_suite().map(|c| c.suite())
        );
        self.conn.set_io(Box::new(tls));
        self.hello(name).await?;
        Ok(description)
    }

    /// AUTH PLAIN (RFC 4954). The caller makes sure the session is encrypted.
    pub async fn auth_plain(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        let token = base64_encode(format!("\0{user}\0{password}").as_bytes());
        let r = self.command(&format!("AUTH PLAIN {token}")).await?;
        if r.code != 235 {
            return Err(ClientError::Refused(r));
        }
        Ok(())
    }

    /// Checks that a cached connection still works (RSET answered 250).
    pub async fn reset(&mut self) -> bool {
        matches!(self.command("RSET").await, Ok(r) if r.code == 250)
    }

    /// Sends one message to `recipients` without DSN parameters.
    pub async fn send(
        &mut self,
        from: &str,
        recipients: &[String],
        message: &[u8],
    ) -> Result<Vec<Outcome>, ClientError> {
        let rcpts: Vec<crate::spool::Recipient> = recipients
            .iter()
            .map(|a| crate::spool::Recipient {
                address: a.clone(),
                ..Default::default()
            })
            .collect();
        self.send_with_dsn(from, "", "", &rcpts, message).await
    }

    /// Sends one message. The DSN parameters (RET, ENVID, NOTIFY, ORCPT) go along when
    /// the server offers DSN (RFC 3461 §5.2). A refused MAIL FROM is an error for the
    /// whole message; otherwise every recipient gets its own final outcome.
    pub async fn send_with_dsn(
        &mut self,
        from: &str,
        ret: &str,
        envid: &str,
        rcpts: &[crate::spool::Recipient],
        message: &[u8],
    ) -> Result<Vec<Outcome>, ClientError> {
        let recipients: Vec<String> = rcpts.iter().map(|r| r.address.clone()).collect();
        let mut mail = format!("MAIL FROM:<{from}>");
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", message.len()));
        }
        if self.caps.eightbitmime && !message.is_ascii() {
            mail.push_str(" BODY=8BITMIME");
        }
        if self.caps.smtputf8 && !(from.is_ascii() && recipients.iter().all(|r| r.is_ascii())) {
            mail.push_str(" SMTPUTF8");
        }
        if self.caps.dsn {
            if !ret.is_empty() {
                mail.push_str(&format!(" RET={ret}"));
            }
            if !envid.is_empty() {
                mail.push_str(&format!(" ENVID={envid}"));
            }
        }
        let mut lines = vec![mail];
        lines.extend(rcpts.iter().map(|r| {
            let mut l = format!("RCPT TO:<{}>", r.address);
            if self.caps.dsn {
                if !r.notify.is_empty() {
                    l.push_str(&format!(" NOTIFY={}", r.notify));
                }
                if !r.orcpt.is_empty() {
                    l.push_str(&format!(" ORCPT={}", r.orcpt));
                }
            }
            l
        }));
        lines.push("DATA".into());
        // With PIPELINING the whole envelope goes in one write (RFC 2920); without, one
        // command at a time.
        let mut replies = Vec::with_capacity(lines.len());
        if self.caps.pipelining {
            for l in &lines {
                self.conn.queue(&format!("{l}\r\n"));
            }
            for _ in &lines {
                replies.push(self.response().await?);
            }
        } else {
            let mail = self.command(&lines[0]).await?;
            let go_on = mail.is_positive();
            replies.push(mail);
            if go_on {
                for l in &lines[1..lines.len() - 1] {
                    replies.push(self.command(l).await?);
                }
                // Without pipelining, DATA is sent only when someone was accepted.
                if replies[1..].iter().any(Response::is_positive) {
                    replies.push(self.command("DATA").await?);
                }
            }
        }
        let mail_reply = replies[0].clone();
        if !mail_reply.is_positive() {
            self.reset_after_refusal(&replies).await;
            return Err(ClientError::Refused(mail_reply));
        }
        let rcpt_replies: Vec<Response> = replies[1..]
            .iter()
            .take(recipients.len())
            .cloned()
            .collect();
        let accepted: Vec<usize> = (0..recipients.len())
            .filter(|i| rcpt_replies.get(*i).is_some_and(Response::is_positive))
            .collect();
        let mut outcomes: Vec<Outcome> = recipients
            .iter()
            .enumerate()
            .map(|(i, r)| Outcome {
                recipient: r.clone(),
                response: rcpt_replies.get(i).cloned().unwrap_or(Response {
                    code: 451,
                    lines: vec!["no reply".into()],
                }),
            })
            .collect();
        let data_reply = replies.get(1 + recipients.len()).cloned();
        match data_reply {
            Some(r) if r.code == 354 => {}
            Some(r) => {
                // DATA refused (or nobody accepted): the accepted recipients get that answer.
                for i in &accepted {
                    outcomes[*i].response = r.clone();
                }
                return Ok(outcomes);
            }
            None => return Ok(outcomes),
        }
        self.conn.queue_bytes(&dot_stuff(message));
        self.conn.queue(".\r\n");
        if self.lmtp {
            // One reply per accepted recipient, in order (RFC 2033 §4.2).
            for i in &accepted {
                outcomes[*i].response = self.response().await?;
            }
        } else {
            let r = self.response().await?;
            for i in &accepted {
                outcomes[*i].response = r.clone();
            }
        }
        Ok(outcomes)
    }

    /// After a refused MAIL, a lax server may still have answered the pipelined DATA
    /// with 354: end that data phase with an empty message, then RSET.
    async fn reset_after_refusal(&mut self, replies: &[Response]) {
        if replies.iter().any(|r| r.code == 354) {
            self.conn.queue(".\r\n");
            let _ = self.response().await;
        }
        let _ = self.command("RSET").await;
    }

    pub async fn quit(&mut self) {
        let _ = self.command("QUIT").await;
        self.conn.shutdown().await;
    }

    async fn command(&mut self, line: &str) -> Result<Response, ClientError> {
        self.conn.queue(&format!("{line}\r\n"));
        self.response().await
    }

    /// Reads one reply (flushing what is queued first).
    async fn response(&mut self) -> Result<Response, ClientError> {
        let mut lines = Vec::new();
        let mut code = None;
        loop {
            let line = self
                .conn
                .read_line(MAX_REPLY_LINE)
                .await
                .map_err(|e| match e {
                    ReadError::Timeout => ClientError::Timeout,
                    ReadError::Eof => ClientError::Io("connection closed by the server".into()),
                    ReadError::Io(e) => ClientError::Io(e.to_string()),
                    ReadError::TooLong => ClientError::Protocol("reply line too long".into()),
                    ReadError::BareLf => {
                        ClientError::Protocol("reply line ended in a bare LF".into())
                    }
                })?;
            let text = String::from_utf8_lossy(&line).into_owned();
            let this: u16 = text
                .get(..3)
                .and_then(|c| c.parse().ok())
                .filter(|c| (200..600).contains(c))
                .ok_or_else(|| ClientError::Protocol(format!("malformed reply {text:?}")))?;
            if *code.get_or_insert(this) != this {
                return Err(ClientError::Protocol(
                    "reply codes differ within one reply".into(),
                ));
            }
            let sep = text.as_bytes().get(3).copied();
            lines.push(text.get(4..).unwrap_or("").to_string());
            if lines.len() > MAX_REPLY_LINES {
                return Err(ClientError::Protocol("reply has too many lines".into()));
            }
            match sep {
                Some(b'-') => continue,
                None | Some(b' ') => return Ok(Response { code: this, lines }),
                Some(_) => return Err(ClientError::Protocol(format!("malformed reply {text:?}"))),
            }
        }
    }
}

/// The host and port of a reinjection hop: `host:port`, `[host]:port` or
/// `smtp:[host]:port` (Postfix's syntax, as in `filter.next_hop`).
pub fn reinjection_address(hop: &str) -> Result<(String, u16), String> {
    let bad = || format!("{hop:?} is not host:port (for example 127.0.0.1:10025)");
    let rest = hop.strip_prefix("smtp:").unwrap_or(hop);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Hands one message to a reinjection hop over plain SMTP (a local, trusted listener
/// such as mb-smtpd's or Postfix's 10025) and returns each recipient's outcome.
pub async fn reinject(
    hop: &str,
    helo: &str,
    from: &str,
    recipients: &[String],
    message: &[u8],
    timeout: Duration,
) -> Result<Vec<Outcome>, ClientError> {
    let (host, port) = reinjection_address(hop).map_err(ClientError::Io)?;
    let stream = tokio::time::timeout(
        timeout,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| ClientError::Timeout)?
    .map_err(|e| ClientError::Io(format!("{host}:{port}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let mut client = Client::connect(Box::new(stream), timeout, false).await?;
    client.hello(helo).await?;
    let outcomes = client.send(from, recipients, message).await;
    client.quit().await;
    outcomes
}

fn parse_caps(r: &Response) -> Capabilities {
    let mut caps = Capabilities::default();
    for line in r.lines.iter().skip(1) {
        let mut words = line.split_ascii_whitespace();
        match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("PIPELINING") => caps.pipelining = true,
            Some("STARTTLS") => caps.starttls = true,
            Some("8BITMIME") => caps.eightbitmime = true,
            Some("SMTPUTF8") => caps.smtputf8 = true,
            Some("DSN") => caps.dsn = true,
            Some("AUTH") => caps.auth = words.map(str::to_ascii_uppercase).collect(),
            Some("SIZE") => {
                caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0))
            }
            _ => {}
        }
    }
    caps
}

pub use mb_core::message::base64_encode;

/// The message as DATA needs it: lines starting with "." get another, and it ends in CRLF.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;
    use crate::session::{Client as Peer, Listener, Session, Settings, TlsMode};
    use crate::spool::{Spool, read_message};

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
        let file = std::fs::read_dir(spool.incoming())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let (got, env) = read_message(&file).unwrap();
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
}
