//! The outbound side: an SMTP and LMTP client that hands one message to a next hop and
//! reports what happened to each recipient (RFC 5321, RFC 2920 pipelining, RFC 2033
//! per-recipient LMTP replies, STARTTLS). The queue manager builds on it.

use std::time::Duration;

use crate::conn::{Conn, Io, ReadError};
pub use crate::reply::{Capabilities, Response};
use crate::reply::{MAX_REPLY_LINE, ReplyParser};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not host:port (for example 127.0.0.1:10025)")]
    BadHop(String),
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
            self.caps = Capabilities::from_ehlo(&r);
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
        let rcpts: Vec<mb_core::Recipient> = recipients
            .iter()
            .map(|a| mb_core::Recipient::plain(a))
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
        rcpts: &[mb_core::Recipient],
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

    /// Asks whether the server would take mail for `recipient` without sending any
    /// (a recipient verification callout): MAIL FROM:<from>, RCPT TO:<recipient>, RSET.
    /// Returns the RCPT reply; a refused MAIL is an error.
    pub async fn probe_recipient(
        &mut self,
        from: &str,
        recipient: &str,
    ) -> Result<Response, ClientError> {
        let mail = self.command(&format!("MAIL FROM:<{from}>")).await?;
        if !mail.is_positive() {
            return Err(ClientError::Refused(mail));
        }
        let rcpt = self.command(&format!("RCPT TO:<{recipient}>")).await?;
        let _ = self.command("RSET").await;
        Ok(rcpt)
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
        let mut parser = ReplyParser::default();
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
            if let Some(r) = parser
                .line(&line)
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                return Ok(r);
            }
        }
    }
}

/// The host and port of a reinjection hop: `host:port`, `[host]:port` or
/// `smtp:[host]:port` (Postfix's syntax, as in `filter.next_hop`).
pub fn reinjection_address(hop: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::BadHop(hop.to_string());
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
    let (host, port) = reinjection_address(hop)?;
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
