//! clamd's INSTREAM command (clamd(8)): the message goes in length-prefixed chunks over
//! TCP or a Unix socket; the answer is `stream: OK`, `stream: NAME FOUND`, or
//! `INSTREAM size limit exceeded. ERROR` when the stream passed clamd's StreamMaxLength.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What clamd said about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    Clean,
    Infected(String),
    /// clamd refused the stream as longer than its own StreamMaxLength: the scanner is
    /// up, the message is too large for it (`clamav.oversize_action` decides).
    SizeLimitExceeded,
}

/// Why clamd gave no answer about a message: every variant means the scanner is
/// unavailable, and the message follows `clamav.unavailable_action`.
#[derive(Debug, thiserror::Error)]
pub enum ClamError {
    #[error("cannot connect to clamd at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("clamd at {address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("clamd: {0}")]
    Io(#[from] std::io::Error),
    /// A chunk longer than INSTREAM's 32-bit length (cannot happen with `CHUNK`).
    #[error("chunk too large")]
    ChunkTooLarge,
    /// An answer that is neither OK, FOUND nor the size limit.
    #[error("clamd answered {0:?}")]
    Reply(String),
}

/// Longest answer read from clamd.
const MAX_REPLY: usize = 4096;
/// Bytes per INSTREAM chunk.
const CHUNK: usize = 64 * 1024;

/// A connection to clamd: `host:port`, or the path of its Unix socket.
async fn connect(address: &str) -> Result<Box<dyn mb_smtp::conn::Io>, ClamError> {
    let failed = |source: std::io::Error| ClamError::Connect {
        address: address.to_string(),
        source,
    };
    Ok(if address.starts_with('/') {
        Box::new(
            tokio::net::UnixStream::connect(address)
                .await
                .map_err(failed)?,
        )
    } else {
        Box::new(
            tokio::net::TcpStream::connect(address)
                .await
                .map_err(failed)?,
        )
    })
}

/// `work` within `timeout`, or the error that says clamd did not answer in time.
async fn within<T>(
    address: &str,
    timeout: Duration,
    work: impl Future<Output = Result<T, ClamError>>,
) -> Result<T, ClamError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClamError::Timeout {
            address: address.to_string(),
            timeout,
        })?
}

/// Scans `message` with the clamd at `address` (`host:port` or a Unix socket path).
pub async fn scan(address: &str, message: &[u8], timeout: Duration) -> Result<Scan, ClamError> {
    within(address, timeout, async {
        instream(connect(address).await?, message).await
    })
    .await
}

/// `zPING` -> `PONG`: whether clamd answers, for mb-status.
pub async fn ping(address: &str, timeout: Duration) -> Result<(), ClamError> {
    within(address, timeout, async {
        let mut s = connect(address).await?;
        s.write_all(b"zPING\0").await?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await?;
        if &buf == b"PONG\0" {
            Ok(())
        } else {
            Err(ClamError::Reply(String::from_utf8_lossy(&buf).into_owned()))
        }
    })
    .await
}

async fn instream<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    message: &[u8],
) -> Result<Scan, ClamError> {
    // clamd answers a stream over its StreamMaxLength at once and closes the
    // connection, so the rest of the message fails to write (EPIPE, ECONNRESET) while
    // the answer waits to be read: a failed write is only an error when no answer follows.
    let sent = send_stream(&mut s, message).await;
    match (sent, read_reply(&mut s).await) {
        (_, Ok(text)) if !text.is_empty() => parse_reply(&text),
        (Err(e), _) => Err(e),
        (Ok(()), Ok(text)) => parse_reply(&text),
        (Ok(()), Err(e)) => Err(e),
    }
}

async fn send_stream<S: AsyncWrite + Unpin>(s: &mut S, message: &[u8]) -> Result<(), ClamError> {
    s.write_all(b"zINSTREAM\0").await?;
    for chunk in message.chunks(CHUNK) {
        let len = u32::try_from(chunk.len()).map_err(|_| ClamError::ChunkTooLarge)?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(chunk).await?;
    }
    s.write_all(&0u32.to_be_bytes()).await?;
    s.flush().await?;
    Ok(())
}

/// clamd's answer up to its NUL, without the NUL and surrounding space.
async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, ClamError> {
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.contains(&0) || reply.len() > MAX_REPLY {
            break;
        }
    }
    let text = String::from_utf8_lossy(&reply);
    Ok(text.trim_end_matches(['\0', '\n']).trim().to_string())
}

/// `stream: OK`, `stream: Eicar-Signature FOUND`, `INSTREAM size limit exceeded. ERROR`.
pub fn parse_reply(text: &str) -> Result<Scan, ClamError> {
    let body = text.strip_prefix("stream:").map(str::trim).unwrap_or(text);
    if body == "OK" {
        Ok(Scan::Clean)
    } else if let Some(name) = body.strip_suffix(" FOUND") {
        Ok(Scan::Infected(name.trim().to_string()))
    } else if body.starts_with("INSTREAM size limit exceeded") {
        Ok(Scan::SizeLimitExceeded)
    } else {
        Err(ClamError::Reply(text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_reply("stream: OK").unwrap(), Scan::Clean);
        assert_eq!(
            parse_reply("stream: Test.EICAR.UNOFFICIAL FOUND").unwrap(),
            Scan::Infected("Test.EICAR.UNOFFICIAL".into())
        );
        assert_eq!(
            parse_reply("INSTREAM size limit exceeded. ERROR").unwrap(),
            Scan::SizeLimitExceeded
        );
        let e = parse_reply("UNKNOWN COMMAND").unwrap_err();
        assert!(matches!(e, ClamError::Reply(_)), "{e:?}");
        assert_eq!(e.to_string(), "clamd answered \"UNKNOWN COMMAND\"");
    }

    /// A scripted clamd: checks the framing and answers FOUND.
    #[tokio::test]
    async fn instream_frames_the_message() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut cmd = [0u8; 10];
            b.read_exact(&mut cmd).await.unwrap();
            assert_eq!(&cmd, b"zINSTREAM\0");
            let mut got = Vec::new();
            loop {
                let mut len = [0u8; 4];
                b.read_exact(&mut len).await.unwrap();
                let n = u32::from_be_bytes(len) as usize;
                if n == 0 {
                    break;
                }
                let mut chunk = vec![0u8; n];
                b.read_exact(&mut chunk).await.unwrap();
                got.extend(chunk);
            }
            b.write_all(b"stream: X FOUND\0").await.unwrap();
            got
        });
        let msg = vec![7u8; 150_000];
        assert_eq!(instream(a, &msg).await.unwrap(), Scan::Infected("X".into()));
        assert_eq!(server.await.unwrap(), msg);
    }

    /// clamd answers a stream past its StreamMaxLength at once and hangs up: the write
    /// that fails after that is not "clamd unavailable", the answer waiting is read.
    #[tokio::test]
    async fn a_refusal_in_mid_stream_is_read_after_the_broken_write() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut head = [0u8; 14];
            b.read_exact(&mut head).await.unwrap();
            b.write_all(b"INSTREAM size limit exceeded. ERROR\0")
                .await
                .unwrap();
        });
        let msg = vec![7u8; 5 << 20];
        assert_eq!(instream(a, &msg).await.unwrap(), Scan::SizeLimitExceeded);
        server.await.unwrap();
        // A hang-up without an answer stays an I/O error.
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut head = [0u8; 14];
            b.read_exact(&mut head).await.unwrap();
        });
        let e = instream(a, &msg).await.unwrap_err();
        assert!(matches!(e, ClamError::Io(_)), "{e:?}");
    }
}
