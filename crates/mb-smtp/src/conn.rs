//! A client connection: buffered input with line limits and timeouts, batched replies
//! (flushed when the client waits for them, RFC 2920), and the STARTTLS upgrade.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of replies held back for batching, at most.
const MAX_PENDING_REPLIES: usize = 8 * 1024;

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
    out: Vec<u8>,
    pub timeout: Duration,
}

impl Conn {
    pub fn new(io: Box<dyn Io>, timeout: Duration) -> Conn {
        Conn {
            io,
            buf: Vec::with_capacity(8192),
            start: 0,
            out: Vec::with_capacity(1024),
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
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + 16 * 1024, 0);
        let r = tokio::time::timeout(self.timeout, self.io.read(&mut self.buf[old..])).await;
        match r {
            Err(_) => {
                self.buf.truncate(old);
                Err(ReadError::Timeout)
            }
            Ok(Err(e)) => {
                self.buf.truncate(old);
                Err(ReadError::Io(e))
            }
            Ok(Ok(0)) => {
                self.buf.truncate(old);
                Err(ReadError::Eof)
            }
            Ok(Ok(n)) => {
                self.buf.truncate(old + n);
                Ok(n)
            }
        }
    }

    /// Reads one CRLF-terminated line of at most `max` bytes (CRLF included) and returns
    /// it without the CRLF. Replies are flushed first when no input is waiting, so a
    /// client that waits for them is never kept waiting.
    pub async fn read_line(&mut self, max: usize) -> Result<Vec<u8>, ReadError> {
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
                    self.fill().await?;
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
            self.fill().await?;
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
        let mut probe = [0u8; 512];
        // One poll of the read, no timer: whatever has already arrived, nothing more.
        let read = tokio::select! {
            biased;
            r = self.io.read(&mut probe) => Some(r),
            () = std::future::ready(()) => None,
        };
        match read {
            Some(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&probe[..n]);
                true
            }
            _ => false,
        }
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
