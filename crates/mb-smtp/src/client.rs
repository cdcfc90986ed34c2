//! The outbound side: an SMTP and LMTP client that hands one message to a next hop and
//! reports what happened to each recipient (RFC 5321, RFC 2920 pipelining, RFC 2033
//! per-recipient LMTP replies, STARTTLS). The queue manager builds on it.

use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

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
    /// The server ended the session instead of answering the transaction's first
    /// command (MAIL FROM): a 421, or the connection closed or reset. Nothing of the
    /// message was sent. On a session taken from a connection cache this is what an
    /// idle session the server has dropped looks like, and a new session may try again.
    #[error("the session ended before the reply to MAIL FROM: {0}")]
    Ended(String),
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

/// Bytes of message content read, dot-stuffed and written per step of the data phase:
/// a streamed message never has more than about this much of itself in memory here.
pub const DATA_CHUNK: usize = 64 * 1024;

/// The message a transaction sends: whole in memory, or a head in memory (the header
/// section as delivered) followed by the rest read from a stream (the spool file), so a
/// large message is never held whole.
pub struct Body<'a> {
    head: &'a [u8],
    rest: Option<Rest<'a>>,
    eight_bit: bool,
}

struct Rest<'a> {
    reader: Pin<Box<dyn AsyncRead + Send + 'a>>,
    len: u64,
}

impl<'a> Body<'a> {
    /// A message held whole in memory.
    pub fn memory(message: &'a [u8]) -> Body<'a> {
        Body {
            head: message,
            rest: None,
            eight_bit: !message.is_ascii(),
        }
    }

    /// `head`, then exactly `len` bytes from `reader`. `eight_bit` says whether any
    /// byte of the whole message is above 127 (for BODY=8BITMIME): it must be known
    /// before MAIL FROM, long before the stream is read.
    pub fn streamed(
        head: &'a [u8],
        reader: Pin<Box<dyn AsyncRead + Send + 'a>>,
        len: u64,
        eight_bit: bool,
    ) -> Body<'a> {
        Body {
            head,
            rest: Some(Rest { reader, len }),
            eight_bit,
        }
    }

    /// The size of the message in bytes (for SIZE=).
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.rest.as_ref().map_or(0, |r| r.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message as one reader, before dot-stuffing (head, then the rest).
    pub fn into_reader(self) -> Pin<Box<dyn AsyncRead + Send + 'a>> {
        let head = std::io::Cursor::new(self.head);
        match self.rest {
            None => Box::pin(head),
            Some(r) => Box::pin(head.chain(r.reader.take(r.len))),
        }
    }
}

/// Dot-stuffing done on the fly, chunk by chunk (RFC 5321 §4.5.2): a line that starts
/// with "." gets another, also when the line starts in a later chunk than the CRLF
/// before it, and `finish` ends the content in CRLF. Feeding any split of a message
/// gives exactly what `dot_stuff` gives for the whole.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    line_start: bool,
    /// The last two bytes written (zero before any).
    last: [u8; 2],
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            line_start: true,
            last: [0, 0],
        }
    }
}

impl DotStuffer {
    /// Appends `chunk`, dot-stuffed, to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let Some(&end) = chunk.last() else {
            return;
        };
        out.reserve(chunk.len() + 16);
        let mut from = 0;
        if self.line_start && chunk[0] == b'.' {
            out.push(b'.');
        }
        // From one LF to the next in one scan each, not a test per byte.
        let mut at = 0;
        while at < chunk.len() {
            let i = at + crate::data::find_bytes(&chunk[at..], [b'\n'; 3]);
            if i == chunk.len() {
                break;
            }
            if chunk.get(i + 1) == Some(&b'.') {
                out.extend_from_slice(&chunk[from..=i]);
                out.push(b'.');
                from = i + 1;
            }
            at = i + 1;
        }
        out.extend_from_slice(&chunk[from..]);
        self.line_start = end == b'\n';
        self.last = match chunk.len() {
            1 => [self.last[1], end],
            n => [chunk[n - 2], end],
        };
    }

    /// Ends the content in CRLF if it does not already.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.last != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
            self.last = *b"\r\n";
            self.line_start = true;
        }
    }
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
        self.send_body(from, ret, envid, rcpts, Body::memory(message))
            .await
    }

    /// `send_with_dsn` for a message in memory or streamed (`Body`). A streamed message
    /// is read, dot-stuffed and written `DATA_CHUNK` bytes at a time. A stream that
    /// fails or ends early is an `Io` error and leaves the session unusable (the data
    /// phase cannot be ended without sending a truncated message).
    pub async fn send_body(
        &mut self,
        from: &str,
        ret: &str,
        envid: &str,
        rcpts: &[mb_core::Recipient],
        body: Body<'_>,
    ) -> Result<Vec<Outcome>, ClientError> {
        let recipients: Vec<String> = rcpts.iter().map(|r| r.address.clone()).collect();
        let mut mail = format!("MAIL FROM:<{from}>");
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", body.len()));
        }
        if self.caps.eightbitmime && body.eight_bit {
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
            replies.push(self.first_reply().await?);
            for _ in &lines[1..] {
                replies.push(self.response().await?);
            }
        } else {
            self.conn.queue(&format!("{}\r\n", lines[0]));
            let mail = self.first_reply().await?;
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
        self.data(body).await?;
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

    /// The reply to MAIL FROM, the transaction's first command (flushing what is
    /// queued): a 421 or a connection that closes or resets instead is `Ended`.
    async fn first_reply(&mut self) -> Result<Response, ClientError> {
        match self.response().await {
            Ok(r) if r.code == 421 => Err(ClientError::Ended(r.text())),
            Err(ClientError::Io(e)) => Err(ClientError::Ended(e)),
            r => r,
        }
    }

    /// Queues the message dot-stuffed; a streamed one is written out chunk by chunk as
    /// it is read. A small message in memory is only queued: it goes out with the final
    /// dot when the reply is awaited, in the same write as before.
    async fn data(&mut self, body: Body<'_>) -> Result<(), ClientError> {
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        for piece in body.head.chunks(DATA_CHUNK) {
            stuffer.feed(piece, &mut out);
            if out.len() >= DATA_CHUNK {
                self.write_data(&mut out).await?;
            }
        }
        if let Some(rest) = body.rest {
            let mut reader = rest.reader.take(rest.len);
            let mut buf = vec![0u8; DATA_CHUNK];
            let mut left = rest.len;
            while left > 0 {
                let n = reader
                    .read(&mut buf)
                    .await
                    .map_err(|e| ClientError::Io(format!("reading the message: {e}")))?;
                if n == 0 {
                    return Err(ClientError::Io(format!(
                        "reading the message: it ended {left} bytes early"
                    )));
                }
                left -= n as u64;
                stuffer.feed(&buf[..n], &mut out);
                if out.len() >= DATA_CHUNK {
                    self.write_data(&mut out).await?;
                }
            }
        }
        stuffer.finish(&mut out);
        self.conn.queue_bytes(&out);
        Ok(())
    }

    /// Writes a stretch of dot-stuffed content now.
    async fn write_data(&mut self, out: &mut Vec<u8>) -> Result<(), ClientError> {
        self.conn.queue_bytes(out);
        out.clear();
        self.conn
            .flush()
            .await
            .map_err(|e| ClientError::Io(e.to_string()))
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
    /// Returns the RCPT reply; a refused MAIL is an error. A non-ASCII address is asked
    /// with SMTPUTF8 (RFC 6531); a server that does not offer it cannot be asked, which
    /// is an error (it cannot tell, rather than the address does not exist).
    pub async fn probe_recipient(
        &mut self,
        from: &str,
        recipient: &str,
    ) -> Result<Response, ClientError> {
        let utf8 = !recipient.is_ascii() || !from.is_ascii();
        if utf8 && !self.caps.smtputf8 {
            return Err(ClientError::Protocol(
                "the server does not offer SMTPUTF8 for a non-ASCII address".into(),
            ));
        }
        let param = if utf8 { " SMTPUTF8" } else { "" };
        let mail = self.command(&format!("MAIL FROM:<{from}>{param}")).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), so a failure repeats exactly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A message made mostly of the bytes that matter to dot-stuffing.
    fn random_message(rng: &mut Rng) -> Vec<u8> {
        const ALPHABET: &[u8] = b".\r\n.\r\n..ab\xc3";
        let len = rng.below(300);
        (0..len)
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect()
    }

    fn streamed(message: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        let mut from = 0;
        for &c in cuts {
            s.feed(&message[from..c], &mut out);
            from = c;
        }
        s.feed(&message[from..], &mut out);
        s.finish(&mut out);
        out
    }

    #[test]
    fn streamed_dot_stuffing_equals_whole_message_dot_stuffing() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let m = random_message(&mut rng);
            let mut cuts: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(m.len() + 1)).collect();
            cuts.sort_unstable();
            assert_eq!(
                streamed(&m, &cuts),
                dot_stuff(&m),
                "message {:?} cut at {cuts:?}",
                String::from_utf8_lossy(&m)
            );
        }
        // Every cut point of one message with dots after each line break, including a
        // cut between CRLF and the dot, and between CR and LF.
        let m = b".a\r\n.b\r\n..\r\nc.\r\n.";
        for c in 0..=m.len() {
            assert_eq!(streamed(m, &[c]), dot_stuff(m), "cut at {c}");
            for d in c..=m.len() {
                assert_eq!(streamed(m, &[c, d]), dot_stuff(m), "cut at {c} and {d}");
            }
        }
        assert_eq!(streamed(b"", &[]), b"\r\n");
        assert_eq!(streamed(b"x\r\n", &[2]), b"x\r\n");
        assert_eq!(streamed(b"x\r", &[1]), b"x\r\r\n");
    }

    /// Long lines (the stuffer's scan goes eight bytes at a time) are stuffed as the
    /// whole-message reference stuffs them, wherever the chunks are cut.
    #[test]
    fn long_lines_are_dot_stuffed_like_the_whole_message() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        for _ in 0..5_000 {
            let mut m = Vec::new();
            for _ in 0..rng.below(10) {
                let run = [0, 1, 7, 8, 9, 16, 17, 33][rng.below(8)];
                m.extend((0..run).map(|k| b'a' + (k % 26) as u8));
                m.extend_from_slice([&b"\r\n"[..], b"\r\n.", b".", b"\n.", b"\r"][rng.below(5)]);
            }
            let mut cuts: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(m.len() + 1)).collect();
            cuts.sort_unstable();
            assert_eq!(
                streamed(&m, &cuts),
                dot_stuff(&m),
                "message {:?} cut at {cuts:?}",
                String::from_utf8_lossy(&m)
            );
        }
    }

    /// A streamed body goes out byte for byte as the whole message dot-stuffed, with a
    /// dot at the start of a read chunk, and a stream that ends early is an error.
    #[tokio::test]
    async fn a_streamed_body_is_sent_dot_stuffed_and_a_short_stream_fails() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

        let head = b"Subject: big\r\n\r\n".to_vec();
        let mut rest = Vec::new();
        let mut rng = Rng(7);
        let mut placed = false;
        while rest.len() < 5 * DATA_CHUNK / 2 {
            rest.extend_from_slice(&random_message(&mut rng));
            // A dot right at the start of the second chunk of the stream.
            if !placed && rest.len() >= DATA_CHUNK {
                rest.truncate(DATA_CHUNK - 2);
                rest.extend_from_slice(b"\r\n.dot at the boundary\r\n");
                placed = true;
            }
        }
        assert_eq!(rest[DATA_CHUNK], b'.');
        let mut whole = head.clone();
        whole.extend_from_slice(&rest);
        let expected = dot_stuff(&whole);

        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(b);
            let mut r = BufReader::new(r);
            w.write_all(b"220 hi\r\n").await.unwrap();
            let mut line = Vec::new();
            let mut data = Vec::new();
            for reply in [
                "250-hi\r\n250 PIPELINING\r\n",
                "250 ok\r\n",
                "250 ok\r\n",
                "354 go\r\n",
            ] {
                line.clear();
                r.read_until(b'\n', &mut line).await.unwrap();
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            loop {
                line.clear();
                r.read_until(b'\n', &mut line).await.unwrap();
                if line == b".\r\n" {
                    break;
                }
                data.extend_from_slice(&line);
            }
            w.write_all(b"250 queued\r\n").await.unwrap();
            data
        });
        let mut c = Client::connect(Box::new(a), Duration::from_secs(5), false)
            .await
            .unwrap();
        c.hello("gw").await.unwrap();
        let reader = Box::pin(std::io::Cursor::new(rest.clone()));
        let body = Body::streamed(&head, reader, rest.len() as u64, false);
        assert_eq!(body.len(), whole.len() as u64);
        let out = c
            .send_body("a@b", "", "", &[mb_core::Recipient::plain("c@d")], body)
            .await
            .unwrap();
        assert_eq!(out[0].response.code, 250);
        let data = server.await.unwrap();
        assert!(data == expected, "the streamed data differs from dot_stuff");

        // The stream promises more than it has.
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(b);
            let mut r = BufReader::new(r);
            w.write_all(b"220 hi\r\n").await.unwrap();
            let mut line = Vec::new();
            for reply in ["250 hi\r\n", "250 ok\r\n", "250 ok\r\n", "354 go\r\n"] {
                line.clear();
                r.read_until(b'\n', &mut line).await.unwrap();
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut sink).await;
        });
        let mut c = Client::connect(Box::new(a), Duration::from_secs(5), false)
            .await
            .unwrap();
        c.hello("gw").await.unwrap();
        let body = Body::streamed(
            b"",
            Box::pin(std::io::Cursor::new(vec![b'x'; 10])),
            20,
            false,
        );
        let err = c
            .send_body("a@b", "", "", &[mb_core::Recipient::plain("c@d")], body)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("10 bytes early"), "{err}");
    }
}
