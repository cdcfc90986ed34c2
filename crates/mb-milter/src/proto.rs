//! The milter wire protocol (Sendmail's libmilter, version 6, as Postfix speaks it):
//! packets are a 4-byte big-endian length, a command byte and its data. Packets are
//! bounded; anything malformed is an error that closes that connection only.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest packet accepted (Postfix sends body chunks of at most 64 KiB).
pub const MAX_PACKET: usize = 1 << 20;

// Commands from the MTA.
pub const ABORT: u8 = b'A';
pub const BODY: u8 = b'B';
pub const CONNECT: u8 = b'C';
pub const MACRO: u8 = b'D';
pub const BODYEOB: u8 = b'E';
pub const HELO: u8 = b'H';
pub const QUIT_NC: u8 = b'K';
pub const HEADER: u8 = b'L';
pub const MAIL: u8 = b'M';
pub const EOH: u8 = b'N';
pub const OPTNEG: u8 = b'O';
pub const QUIT: u8 = b'Q';
pub const RCPT: u8 = b'R';
pub const DATA: u8 = b'T';
pub const UNKNOWN: u8 = b'U';

// Replies and modifications.
pub const ACCEPT: u8 = b'a';
pub const CONTINUE: u8 = b'c';
pub const DISCARD: u8 = b'd';
pub const PROGRESS: u8 = b'p';
pub const CHGHEADER: u8 = b'm';
pub const INSHEADER: u8 = b'i';
pub const QUARANTINE: u8 = b'q';
pub const REPLYCODE: u8 = b'y';
pub const TEMPFAIL: u8 = b't';

// Actions we may take (SMFIF_*).
pub const ADDHDRS: u32 = 0x01;
pub const CHGHDRS: u32 = 0x10;
pub const QUARANTINE_ACT: u32 = 0x20;
/// The milter may name the macros it wants at each stage (protocol 6, after the three
/// words of its OPTNEG reply).
pub const SETSYMLIST: u32 = 0x100;

// Protocol steps (SMFIP_*): "do not send" and "no reply expected".
pub const NOEOH: u32 = 0x40;
pub const NOUNKNOWN: u32 = 0x100;
pub const NODATA: u32 = 0x200;
pub const NOHREPL: u32 = 0x80;
pub const NR_CONN: u32 = 0x1000;
pub const NR_HELO: u32 = 0x2000;
pub const NR_MAIL: u32 = 0x4000;
pub const NR_RCPT: u32 = 0x8000;
pub const NR_EOH: u32 = 0x4_0000;
pub const NR_BODY: u32 = 0x8_0000;

// Stages of a macro list in the OPTNEG reply (SMFIM_*).
pub const STAGE_CONNECT: u32 = 0;
pub const STAGE_HELO: u32 = 1;
pub const STAGE_MAIL: u32 = 2;
pub const STAGE_RCPT: u32 = 3;
pub const STAGE_DATA: u32 = 4;
pub const STAGE_EOM: u32 = 5;
pub const STAGE_EOH: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("packet of {0} bytes is larger than {MAX_PACKET}")]
    TooLarge(usize),
    #[error("empty packet")]
    Empty,
}

/// Reads one packet: (command, data).
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>), Error> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(Error::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(Error::Empty);
    }
    if len > MAX_PACKET {
        return Err(Error::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    let cmd = buf.remove(0);
    Ok((cmd, buf))
}

/// Bytes asked of the socket per read, and what an idle connection's buffer shrinks
/// back to after a large packet.
const READ_CHUNK: usize = 16 * 1024;

/// Reads packets through one reused buffer: the MTA writes several packets without
/// waiting (a macro packet and its command, header fields, body chunks), and one read
/// of the socket takes them all, where `read` needs two system calls and an allocation
/// per packet. The same bounds as `read`: `MAX_PACKET`, no empty packet.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
    /// Where the current packet starts in `buf` (what comes before is consumed).
    start: usize,
}

impl Reader {
    /// The current packet's (length prefix value, whether it is wholly buffered), once
    /// its 4-byte length is.
    fn head(&self) -> Result<Option<(usize, bool)>, Error> {
        let have = &self.buf[self.start..];
        let Some(len) = have.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 {
            return Err(Error::Empty);
        }
        if len > MAX_PACKET {
            return Err(Error::TooLarge(len));
        }
        Ok(Some((len, have.len() >= 4 + len)))
    }

    /// Whether a whole packet is buffered; a malformed length is an error at once.
    pub fn ready(&self) -> Result<bool, Error> {
        Ok(self.head()?.is_some_and(|(_, whole)| whole))
    }

    /// The buffered packet: (command, data), when `ready`.
    pub fn packet(&self) -> Option<(u8, &[u8])> {
        let (len, whole) = self.head().ok()??;
        if !whole {
            return None;
        }
        let p = &self.buf[self.start + 4..self.start + 4 + len];
        Some((p[0], &p[1..]))
    }

    /// Done with the buffered packet.
    pub fn consume(&mut self) {
        if let Ok(Some((len, true))) = self.head() {
            self.start += 4 + len;
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            // A connection between messages holds a small buffer, whatever came before.
            if self.buf.capacity() > 4 * READ_CHUNK {
                self.buf.shrink_to(READ_CHUNK);
            }
        }
    }

    /// One read from `r` (the caller checks `ready` again): `Closed` at the end of the
    /// stream between packets, an i/o error inside one.
    pub async fn read_more<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<(), Error> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // Room for the rest of the current packet (bounded by MAX_PACKET above), or a
        // chunk of whatever comes next.
        let want = match self.head()? {
            Some((len, _)) => (4 + len).saturating_sub(self.buf.len()),
            None => 0,
        };
        self.buf.reserve(want.max(READ_CHUNK));
        let n = r.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(if self.buf.len() < 4 {
                Error::Closed
            } else {
                Error::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        Ok(())
    }
}

/// Appends one packet to `out` (several replies go out in one write).
pub fn put(out: &mut Vec<u8>, cmd: u8, data: &[u8]) {
    let len = u32::try_from(data.len() + 1).unwrap_or(u32::MAX);
    out.reserve(data.len() + 5);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(cmd);
    out.extend_from_slice(data);
}

/// Writes one packet.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, cmd: u8, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(data.len() + 5);
    put(&mut out, cmd, data);
    w.write_all(&out).await
}

/// NUL-terminated strings in a packet's data.
pub fn strings(data: &[u8]) -> Vec<String> {
    let data = data.strip_suffix(&[0]).unwrap_or(data);
    if data.is_empty() {
        return Vec::new();
    }
    data.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A NUL-terminated string list as packet data.
pub fn cstrings(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    out
}

/// `<user@domain>` (with ESMTP parameters after it) as the bare address.
pub fn address(arg: &str) -> String {
    let a = arg.trim();
    let a = a.strip_prefix('<').unwrap_or(a);
    a.split('>').next().unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_round_trip_and_bounds_hold() {
        let mut buf = Vec::new();
        write(&mut buf, HELO, b"mail.example\0").await.unwrap();
        assert_eq!(&buf[..5], &[0, 0, 0, 14, b'H']);
        let (cmd, data) = read(&mut buf.as_slice()).await.unwrap();
        assert_eq!(
            (cmd, strings(&data)),
            (HELO, vec!["mail.example".to_string()])
        );
        let huge = (MAX_PACKET as u32 + 1).to_be_bytes();
        assert!(matches!(
            read(&mut huge.as_slice()).await,
            Err(Error::TooLarge(_))
        ));
        assert!(matches!(
            read(&mut [0u8, 0, 0, 0].as_slice()).await,
            Err(Error::Empty)
        ));
        assert!(matches!(
            read(&mut [0u8, 0].as_slice()).await,
            Err(Error::Closed)
        ));
        assert_eq!(address(" <a@b.example> SIZE=10"), "a@b.example");
        assert_eq!(address("<>"), "");
        assert_eq!(strings(b"a\0b\0"), vec!["a", "b"]);
    }

    /// Everything `read` returns from a stream, in order, through a `Reader`.
    async fn all_through_reader<R: AsyncRead + Unpin>(r: &mut R) -> (Vec<(u8, Vec<u8>)>, Error) {
        let mut reader = Reader::default();
        let mut got = Vec::new();
        loop {
            match reader.ready() {
                Ok(true) => {
                    let (cmd, data) = reader.packet().unwrap();
                    got.push((cmd, data.to_vec()));
                    reader.consume();
                }
                Ok(false) => {
                    if let Err(e) = reader.read_more(r).await {
                        return (got, e);
                    }
                }
                Err(e) => return (got, e),
            }
        }
    }

    /// The buffered reader sees the packets `read` sees, however the stream is cut
    /// (several packets in one read, one packet over many), with the same bounds.
    #[tokio::test]
    async fn the_buffered_reader_agrees_with_read_and_keeps_the_bounds() {
        let big = vec![b'x'; 70_000];
        let mut stream = Vec::new();
        for (cmd, data) in [
            (MACRO, &b"Mi\0Q1\0"[..]),
            (MAIL, b"<a@b.example>\0"),
            (BODY, &big),
            (EOH, b""),
        ] {
            put(&mut stream, cmd, data);
        }
        let mut expected = Vec::new();
        let mut s = stream.as_slice();
        while let Ok(p) = read(&mut s).await {
            expected.push(p);
        }
        assert_eq!(expected.len(), 4);
        // All at once.
        let (got, end) = all_through_reader(&mut stream.as_slice()).await;
        assert_eq!(got, expected);
        assert!(matches!(end, Error::Closed), "{end:?}");
        // Seven bytes at a time.
        let (mut mta, mut milter) = tokio::io::duplex(7);
        let writer = {
            let stream = stream.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                mta.write_all(&stream).await.unwrap();
            })
        };
        let (got, end) = all_through_reader(&mut milter).await;
        writer.await.unwrap();
        assert_eq!(got, expected);
        assert!(matches!(end, Error::Closed), "{end:?}");
        // Cut inside a packet: an error, not a short packet.
        let cut = &stream[..stream.len() - 40_000];
        let (got, end) = all_through_reader(&mut &cut[..]).await;
        assert_eq!(got.len(), 2);
        assert!(matches!(end, Error::Io(_)), "{end:?}");
        // Oversized and empty packets are refused before anything is buffered for them.
        let mut huge = (MAX_PACKET as u32 + 1).to_be_bytes().to_vec();
        huge.push(BODY);
        let (got, end) = all_through_reader(&mut huge.as_slice()).await;
        assert!(
            got.is_empty() && matches!(end, Error::TooLarge(_)),
            "{end:?}"
        );
        let (_, end) = all_through_reader(&mut [0u8, 0, 0, 0, 1].as_slice()).await;
        assert!(matches!(end, Error::Empty), "{end:?}");
        // A buffer grown for a large packet shrinks back once it is consumed.
        let mut reader = Reader::default();
        let mut one = Vec::new();
        put(&mut one, BODY, &big);
        let mut src = one.as_slice();
        while !reader.ready().unwrap() {
            reader.read_more(&mut src).await.unwrap();
        }
        assert!(reader.buf.capacity() > 4 * READ_CHUNK);
        reader.consume();
        assert!(
            reader.buf.capacity() <= READ_CHUNK,
            "{}",
            reader.buf.capacity()
        );
    }
}
