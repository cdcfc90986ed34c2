//! A client connection: buffered input with line limits and timeouts, batched replies
//! (flushed when the client waits for them, RFC 2920), and the STARTTLS upgrade.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Bytes of replies held back for batching, at most.
const MAX_PENDING_REPLIES: usize = 8 * 1024;

/// The input buffer's size while commands are awaited: a command line, or a pipelined
/// group of a few, in one read. Thousands of idle sessions each hold this much; DATA and
/// BDAT grow it (see `MAX_READ`) and the next wait for a command gives the growth back.
const IDLE_INPUT: usize = 512;

/// The largest read: reads start at `IDLE_INPUT` bytes and double, up to this, while
/// each one fills all the room it was given (a client streaming its message).
const MAX_READ: usize = 16 * 1024;

/// Anything a session can run over: TCP, TLS over TCP, an in-memory duplex in tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug)]
pub enum ReadError {
    Eof,
    Timeout,
    Io(io::Error),
    /// The line was longer than allowed; it has been skipped up to its LF.
    TooLong,
    /// A line ended in LF without CR.
    BareLf,
}

pub struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    start: usize,
    /// Room the next read asks for (from `IDLE_INPUT` up to `MAX_READ`).
    read_size: usize,
    out: Vec<u8>,
    pub timeout: Duration,
}

impl Conn {
    /// A connection with no buffers yet: they are allocated when the first bytes move.
    pub fn new(io: Box<dyn Io>, timeout: Duration) -> Conn {
        Conn {
            io,
            buf: Vec::new(),
            start: 0,
            read_size: IDLE_INPUT,
            out: Vec::new(),
            timeout,
        }
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads more input into the buffer; `Ok(0)` never happens (EOF is an error).
    pub async fn fill(&mut self) -> Result<usize, ReadError> {
        self.fill_until(None).await
    }

    /// `fill`, with its timeout cut short at `deadline` when that comes first (then it
    /// is a `Timeout` too): one timer per wait, whatever the caller's limits.
    async fn fill_until(&mut self, deadline: Option<Instant>) -> Result<usize, ReadError> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(self.read_size);
        let room = self.buf.capacity() - self.buf.len();
        // `read_buf` reads into the spare capacity: no zeroing, and the buffer only
        // grows by what arrived.
        let limit = Instant::now() + self.timeout;
        let limit = deadline.map_or(limit, |d| d.min(limit));
        let r = tokio::time::timeout_at(limit, self.io.read_buf(&mut self.buf)).await;
        match r {
            Err(_) => Err(ReadError::Timeout),
            Ok(Err(e)) => Err(ReadError::Io(e)),
            Ok(Ok(0)) => Err(ReadError::Eof),
            Ok(Ok(n)) => {
                if n >= room && self.read_size < MAX_READ {
                    self.read_size = (self.read_size * 2).min(MAX_READ);
                }
                Ok(n)
            }
        }
    }

    /// Makes the next reads as large as reads get: message content follows (DATA,
    /// BDAT), and ramping up from `IDLE_INPUT` would cost a few extra reads per message.
    /// The buffer shrinks back at the next wait for a command.
    pub fn expect_bulk(&mut self) {
        self.read_size = MAX_READ;
    }

    /// Gives back what a burst of input or replies made the buffers grow to; called
    /// when nothing is buffered in either direction and the peer is about to be waited
    /// for, so that an idle connection holds next to nothing.
    fn relax(&mut self) {
        if self.start == self.buf.len() && self.buf.capacity() > IDLE_INPUT {
            self.buf = Vec::new();
            self.start = 0;
            self.read_size = IDLE_INPUT;
        }
        // Replies are flushed by now: a session waiting for its client holds no reply
        // buffer (the next reply allocates one, a cheap allocation per exchange).
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = Vec::new();
        }
    }

    /// Reads one CRLF-terminated line of at most `max` bytes (CRLF included) and returns
    /// it without the CRLF. Replies are flushed first when no input is waiting, so a
    /// client that waits for them is never kept waiting.
    pub async fn read_line(&mut self, max: usize) -> Result<Vec<u8>, ReadError> {
        self.read_line_until(max, None).await
    }

    /// `read_line`, waiting for input no later than `deadline` (a `Timeout` then): a
    /// session's lifetime shares the read's timer instead of keeping one of its own.
    pub async fn read_line_until(
        &mut self,
        max: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<u8>, ReadError> {
        let mut searched = 0;
        loop {
            let avail = &self.buf[self.start..];
            if let Some(pos) = avail[searched..].iter().position(|b| *b == b'\n') {
                let pos = searched + pos;
                let line_end = pos + 1;
                if pos == 0 || avail[pos - 1] != b'\r' {
                    self.consume(line_end);
                    return Err(ReadError::BareLf);
                }
                if line_end > max {
                    self.consume(line_end);
                    return Err(ReadError::TooLong);
                }
                let line = avail[..pos - 1].to_vec();
                self.consume(line_end);
                return Ok(line);
            }
            searched = avail.len();
            if avail.len() > max {
                // Skip the rest of the over-long line, then report it.
                self.consume(avail.len());
                loop {
                    self.flush().await.map_err(ReadError::Io)?;
                    self.fill_until(deadline).await?;
                    let avail = &self.buf[self.start..];
                    if let Some(pos) = avail.iter().position(|b| *b == b'\n') {
                        self.consume(pos + 1);
                        return Err(ReadError::TooLong);
                    }
                    self.consume(avail.len());
                }
            }
            // Flush when the client waits, and whenever replies pile up: a client that never
            // lets the input run dry must not make us buffer replies without bound.
            if self.buffered().is_empty() || self.out.len() > MAX_PENDING_REPLIES {
                self.flush().await.map_err(ReadError::Io)?;
            }
            self.relax();
            self.fill_until(deadline).await?;
        }
    }

    /// Queues a reply; it is sent at the next flush.
    pub fn queue(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
    }

    /// Queues raw bytes (message content on the client side).
    pub fn queue_bytes(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Whether replies have piled up beyond the batching limit.
    pub fn replies_pending(&self) -> bool {
        self.out.len() > MAX_PENDING_REPLIES
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let r = tokio::time::timeout(self.timeout, self.io.write_all(&self.out)).await;
            self.out.clear();
            match r {
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
                Ok(r) => r?,
            }
            tokio::time::timeout(self.timeout, self.io.flush())
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "flush timed out"))??;
        }
        Ok(())
    }

    /// Sends a reply at once.
    pub async fn send(&mut self, text: &str) -> io::Result<()> {
        self.queue(text);
        self.flush().await
    }

    /// Whether input is waiting, without blocking (used to catch early talkers).
    pub async fn input_pending(&mut self) -> bool {
        if !self.buffered().is_empty() {
            return true;
        }
        // Into the input buffer, not a buffer on the stack: that would be part of every
        // session's task for as long as it lives.
        self.buf.reserve(IDLE_INPUT);
        // One poll of the read, no timer: whatever has already arrived, nothing more.
        let read = tokio::select! {
            biased;
            r = self.io.read_buf(&mut self.buf) => Some(r),
            () = std::future::ready(()) => None,
        };
        matches!(read, Some(Ok(n)) if n > 0)
    }

    /// Replaces the transport (STARTTLS). Input already buffered is an error the caller
    /// must have handled: it would cross the plaintext/TLS boundary.
    pub fn take_io(&mut self) -> Box<dyn Io> {
        std::mem::replace(
            &mut self.io,
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
        )
    }

    pub fn set_io(&mut self, io: Box<dyn Io>) {
        self.io = io;
        self.buf.clear();
        self.start = 0;
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.io.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// An idle connection holds next to nothing; a message makes the input buffer grow
    /// to large reads, and the next wait for a command gives the growth back.
    #[tokio::test]
    async fn buffers_start_small_grow_for_content_and_shrink_when_idle() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut conn = Conn::new(Box::new(server), Duration::from_secs(5));
        assert_eq!((conn.buf.capacity(), conn.out.capacity()), (0, 0));

        client.write_all(b"EHLO client.example\r\n").await.unwrap();
        assert_eq!(conn.read_line(512).await.unwrap(), b"EHLO client.example");
        assert!(conn.buf.capacity() <= IDLE_INPUT, "{}", conn.buf.capacity());

        conn.queue("354 go ahead\r\n");
        conn.flush().await.unwrap();
        conn.expect_bulk();
        let body = vec![b'x'; 100_000];
        client.write_all(&body).await.unwrap();
        let mut got = 0;
        while got < body.len() {
            got += conn.fill().await.unwrap();
            conn.consume(conn.buffered().len());
        }
        assert_eq!(got, body.len());
        assert!(conn.buf.capacity() >= MAX_READ, "{}", conn.buf.capacity());
        conn.queue(&"250-a long batch of replies\r\n".repeat(100));

        client.write_all(b"QUIT\r\n").await.unwrap();
        assert_eq!(conn.read_line(512).await.unwrap(), b"QUIT");
        assert!(conn.buf.capacity() <= IDLE_INPUT, "{}", conn.buf.capacity());
        assert_eq!(conn.out.capacity(), 0);
        // The replies queued before the wait were sent, not dropped with the buffer.
        let mut sent = vec![0u8; 14 + 29 * 100];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut sent)
            .await
            .unwrap();
        assert!(sent.starts_with(b"354 go ahead\r\n250-a long batch"));
        // A short reply's buffer is not kept either while the client is waited for.
        conn.queue("250 Ok\r\n");
        client.write_all(b"NOOP\r\n").await.unwrap();
        assert_eq!(conn.read_line(512).await.unwrap(), b"NOOP");
        assert_eq!(conn.out.capacity(), 0);
    }

    /// Reads ask for more room while the client keeps them full, so a pipelined burst
    /// of commands longer than the idle buffer is read whole, line by line.
    #[tokio::test]
    async fn a_burst_longer_than_the_idle_buffer_is_read_line_by_line() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut conn = Conn::new(Box::new(server), Duration::from_secs(5));
        let burst: String = (0..100)
            .map(|i| format!("RCPT TO:<user{i}@served.example>\r\n"))
            .collect();
        client.write_all(burst.as_bytes()).await.unwrap();
        for i in 0..100 {
            let line = conn.read_line(512).await.unwrap();
            assert_eq!(line, format!("RCPT TO:<user{i}@served.example>").as_bytes());
        }
        assert!(conn.read_size > IDLE_INPUT, "reads did not grow");
    }

    /// A deadline earlier than the timeout ends the wait with a timeout, at the deadline.
    #[tokio::test]
    async fn a_deadline_cuts_the_wait_short() {
        let (_client, server) = tokio::io::duplex(64);
        let mut conn = Conn::new(Box::new(server), Duration::from_secs(300));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(200);
        let r = conn.read_line_until(512, Some(deadline)).await;
        assert!(matches!(r, Err(ReadError::Timeout)), "{r:?}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(30),
            "{waited:?}"
        );
    }
}
