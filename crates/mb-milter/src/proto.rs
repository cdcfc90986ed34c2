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

// Protocol steps (SMFIP_*): "do not send" and "no reply expected".
pub const NOUNKNOWN: u32 = 0x100;
pub const NODATA: u32 = 0x200;
pub const NOHREPL: u32 = 0x80;
pub const NR_CONN: u32 = 0x1000;
pub const NR_HELO: u32 = 0x2000;
pub const NR_EOH: u32 = 0x4_0000;
pub const NR_BODY: u32 = 0x8_0000;

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

/// Writes one packet.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, cmd: u8, data: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(data.len() + 1).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(data.len() + 5);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(cmd);
    out.extend_from_slice(data);
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
}
