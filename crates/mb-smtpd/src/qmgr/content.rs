//! The message as delivered: the spooled message with the verdict's header changes
//! applied. A small message is read whole, as it always was; a large one keeps only its
//! header section in memory and is streamed from the spool (its body file, or its
//! segment) for each transaction (`mb_smtp::client::Body::streamed`), so delivering it
//! never holds it whole.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use mb_core::message::with_headers;
use mb_smtp::client::{Body, DATA_CHUNK};

use crate::dsn::Original;
use crate::spool::{Body as Spooled, Envelope};

/// Messages up to this size are read whole, in one read as before streaming: the
/// fast path of small mail. It is above `dsn::RETURN_LIMIT`, so a message a bounce may
/// return whole is always at hand whole.
pub(super) const WHOLE_LIMIT: u64 = 256 * 1024;

/// How far into a large message its header section is looked for. A message whose
/// header section does not end within it is read whole, as before: the verdict's
/// header removals must see every field.
const HEAD_LIMIT: u64 = 1 << 20;

pub(super) struct Content {
    /// The header section as delivered (without the empty line that ends it), or the
    /// whole message when `rest` is `None`.
    head: Vec<u8>,
    rest: Option<Rest>,
    /// Whether any byte is above 127 (for BODY=8BITMIME).
    eight_bit: bool,
}

/// The part of a large message that stays in the spool: `len` bytes at `offset` of
/// `file`.
struct Rest {
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
}

impl Content {
    /// Reads a spooled message's body (blocking: call it on the blocking pool).
    pub(super) fn load(body: &Spooled, env: &Envelope) -> io::Result<Content> {
        if body.len() <= WHOLE_LIMIT {
            return Ok(Content::whole(&body.read_all()?, env));
        }
        Content::from_file(body.file().clone(), body.offset(), body.len(), env)
    }

    pub(super) fn whole(message: &[u8], env: &Envelope) -> Content {
        let head = with_headers(message, &env.add_headers, &env.remove_headers);
        Content {
            eight_bit: !head.is_ascii(),
            head,
            rest: None,
        }
    }

    /// The message is bytes `base..base + len` of `file`.
    fn from_file(
        file: Arc<std::fs::File>,
        base: u64,
        len: u64,
        env: &Envelope,
    ) -> io::Result<Content> {
        let mut first = vec![0u8; usize::try_from(len.min(HEAD_LIMIT)).unwrap_or(0)];
        file.read_exact_at(&mut first, base)?;
        // Where the header section ends, exactly as `with_headers` finds it.
        let split = if first.starts_with(b"\r\n") {
            Some(0)
        } else {
            first
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + 2)
        };
        let Some(split) = split else {
            let mut message = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
            file.read_exact_at(&mut message, base)?;
            return Ok(Content::whole(&message, env));
        };
        first.truncate(split);
        let head = with_headers(&first, &env.add_headers, &env.remove_headers);
        let offset = split as u64;
        let eight_bit = !head.is_ascii() || has_eight_bit(&file, base + offset, base + len)?;
        Ok(Content {
            head,
            rest: Some(Rest {
                file,
                offset: base + offset,
                len: len - offset,
            }),
            eight_bit,
        })
    }

    /// The size of the message as delivered.
    pub(super) fn len(&self) -> u64 {
        self.head.len() as u64 + self.rest.as_ref().map_or(0, |r| r.len)
    }

    /// What a delivery status notification may quote.
    pub(super) fn original(&self) -> Original<'_> {
        match self.rest {
            None => Original::Whole(&self.head),
            Some(_) => Original::Headers(&self.head),
        }
    }

    /// The message for one transaction, after `prefix` (the Return-Path of final
    /// delivery, or nothing). `head` is where the caller keeps prefix and head joined.
    pub(super) fn body<'a>(&'a self, prefix: &[u8], head: &'a mut Vec<u8>) -> io::Result<Body<'a>> {
        let head: &'a [u8] = if prefix.is_empty() {
            &self.head
        } else {
            head.clear();
            head.extend_from_slice(prefix);
            head.extend_from_slice(&self.head);
            head
        };
        let Some(rest) = &self.rest else {
            return Ok(Body::memory(head));
        };
        // A handle of its own per transaction, positioned at the body. Clones share
        // the file offset, which is safe because one message's transactions run one
        // after the other.
        let mut file = rest.file.try_clone()?;
        io::Seek::seek(&mut file, io::SeekFrom::Start(rest.offset))?;
        let reader = tokio::fs::File::from_std(file);
        Ok(Body::streamed(
            head,
            Box::pin(reader),
            rest.len,
            self.eight_bit || !prefix.is_ascii(),
        ))
    }
}

/// Whether bytes `from..to` of `file` hold a byte above 127, read a chunk at a time.
fn has_eight_bit(file: &std::fs::File, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut at = from;
    while at < to {
        let want = usize::try_from((to - at).min(DATA_CHUNK as u64)).unwrap_or(DATA_CHUNK);
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spool is shorter than its message",
            ));
        }
        if !buf[..n].is_ascii() {
            return Ok(true);
        }
        at += n as u64;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Appends `message` to a spool as message `id` and reads it back. Bodies under
    /// 1 MiB stay inline in the segment (after other records), larger ones get a file.
    async fn spooled(log: &mb_spool::Spool, id: &str, message: &[u8]) -> Spooled {
        log.append(id, b"{}", message).await.unwrap();
        log.read(id).unwrap().body
    }

    /// Everything a transaction sends, read back.
    async fn sent(content: &Content, prefix: &[u8]) -> Vec<u8> {
        let mut joined = Vec::new();
        let body = content.body(prefix, &mut joined).unwrap();
        assert_eq!(body.len(), content.len() + prefix.len() as u64);
        let mut out = Vec::new();
        body.into_reader().read_to_end(&mut out).await.unwrap();
        out
    }

    /// Large or small, with or without header changes, with a header section that
    /// ends early, late or never: what is sent is what `with_headers` makes of the
    /// whole message, and only a large one is left in the file.
    #[tokio::test]
    async fn a_large_message_is_streamed_and_sent_as_the_whole_would_be() {
        let dir = tempfile::tempdir().unwrap();
        let config = mb_spool::Config {
            large_threshold: 1 << 20,
            ..mb_spool::Config::default()
        };
        let (log, _) = mb_spool::Spool::open(dir.path(), config).unwrap();
        log.append("FIRST", b"{}", b"a record before the others")
            .await
            .unwrap();
        let mut n = 0;
        let body: Vec<u8> = b"line of body text\r\n".repeat(20_000);
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (
                [b"X-Spam: yes\r\nSubject: big\r\n\r\n".as_slice(), &body].concat(),
                true,
            ),
            ([b"\r\n".as_slice(), &body].concat(), true),
            (
                [b"Subject: \xc3\xa9\r\n\r\n".as_slice(), &body].concat(),
                true,
            ),
            (
                [b"Subject: s\r\n\r\n".as_slice(), &body, b"\xff\r\n"].concat(),
                true,
            ),
            // No header section end within HEAD_LIMIT: read whole.
            (b"X-Long: aaaaaaaaaaaaaaaa\r\n".repeat(50_000), false),
            // In a body file of its own.
            (
                [b"Subject: huge\r\n\r\n".as_slice(), &body, &body, &body].concat(),
                true,
            ),
            (
                b"X-Spam: yes\r\nSubject: small\r\n\r\nbody\r\n".to_vec(),
                false,
            ),
        ];
        for (add, remove) in [
            (vec![], vec![]),
            (
                vec![("X-Added".to_string(), "1".to_string())],
                vec!["x-spam".to_string()],
            ),
        ] {
            for (message, streamed) in &cases {
                let env = Envelope {
                    id: "00000001A2B3C4D5".into(),
                    add_headers: add.clone(),
                    remove_headers: remove.clone(),
                    ..Default::default()
                };
                n += 1;
                let body = spooled(&log, &format!("M{n}"), message).await;
                let content = Content::load(&body, &env).unwrap();
                assert_eq!(content.rest.is_some(), *streamed, "{}", message.len());
                let expected = with_headers(message, &add, &remove);
                assert_eq!(content.eight_bit, !expected.is_ascii());
                assert_eq!(content.len(), expected.len() as u64);
                assert!(sent(&content, b"").await == expected);
                let mut lmtp = b"Return-Path: <a@b>\r\n".to_vec();
                lmtp.extend_from_slice(&expected);
                assert!(sent(&content, b"Return-Path: <a@b>\r\n").await == lmtp);
                match content.original() {
                    Original::Whole(m) => assert!(!*streamed && m == expected),
                    Original::Headers(h) => {
                        assert!(*streamed && expected.starts_with(h) && h.len() < 200)
                    }
                }
            }
        }
    }
}
