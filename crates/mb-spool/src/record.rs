//! The on-disk record format of a segment: encoding, and decoding that refuses anything
//! whose length or checksum does not hold (the torn tail of a crash).

/// The first bytes of every segment file; the layout version is its last digit.
pub const SEGMENT_MAGIC: &[u8; 8] = b"MBSPOOL1";
/// Segment header: `SEGMENT_MAGIC` then the segment's sequence number (u64 LE).
pub const SEGMENT_HEADER: usize = 16;
/// The first field of every record, so that a scan can tell a record from zeros or junk.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"MBR1");
/// Record header: magic (u32), payload length (u32), CRC-32 of kind and payload XOR
/// `seq_mask(segment)` (u32), kind (u8). All integers little-endian. The mask ties a
/// record to the segment it was written in, so the old records of a recycled segment
/// file never verify after its new tail.
pub const RECORD_HEADER: usize = 13;
/// The largest payload a record may carry (an inline body included).
pub const MAX_PAYLOAD: usize = 1 << 30;

/// Which queue a message is in, as the administrator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Queue {
    /// Committed, not yet tried (or requeued, or released from hold).
    Incoming,
    /// Tried, with recipients waiting for their next attempt.
    Deferred,
    /// Kept back by an administrator: never delivered until released.
    Hold,
}

impl Queue {
    fn to_byte(self) -> u8 {
        match self {
            Queue::Incoming => 0,
            Queue::Deferred => 1,
            Queue::Hold => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Queue> {
        match b {
            0 => Some(Queue::Incoming),
            1 => Some(Queue::Deferred),
            2 => Some(Queue::Hold),
            _ => None,
        }
    }
}

/// A message's mutable state: its queue, when to try it next, and the caller's opaque
/// delivery state (mb-smtpd's per-recipient states).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub queue: Queue,
    /// Unix seconds of the next attempt (0: at once).
    pub next_attempt: u64,
    pub data: Vec<u8>,
}

impl Default for State {
    fn default() -> State {
        State {
            queue: Queue::Incoming,
            next_attempt: 0,
            data: Vec::new(),
        }
    }
}

const KIND_COMMIT: u8 = 1;
const KIND_STATE: u8 = 2;
const KIND_DONE: u8 = 3;

const BODY_INLINE: u8 = 0;
const BODY_FILE: u8 = 1;

/// Where a committed message's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySpec {
    /// In the record itself, `len` bytes at the end of the payload.
    Inline { len: u64 },
    /// In `bodies/ID`, `len` bytes, fsynced (file and directory) before the record.
    File { len: u64 },
}

/// A decoded record, borrowing from the segment's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Commit {
        id: &'a str,
        state: State,
        envelope: &'a [u8],
        /// Offset of the envelope within the payload.
        envelope_at: usize,
        body: BodySpec,
        /// Offset of an inline body within the payload.
        body_at: usize,
    },
    State {
        id: &'a str,
        state: State,
    },
    Done {
        id: &'a str,
    },
}

/// A queue id the spool accepts: 1 to 64 ASCII letters and digits, so that it is safe
/// as the name of a body file and fits the record's one-byte length.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn header(buf: &mut Vec<u8>, kind: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    buf.extend_from_slice(&[0; 8]);
    buf.push(kind);
    start
}

fn seal(buf: &mut [u8], start: usize) {
    let payload_len = buf.len() - start - RECORD_HEADER;
    let len = u32::try_from(payload_len).unwrap_or(u32::MAX);
    buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&buf[start + 12..]);
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

fn put_id_state(buf: &mut Vec<u8>, id: &str, state: &State) {
    buf.push(id.len() as u8);
    buf.extend_from_slice(id.as_bytes());
    buf.push(state.queue.to_byte());
    buf.extend_from_slice(&state.next_attempt.to_le_bytes());
    buf.extend_from_slice(&(state.data.len() as u32).to_le_bytes());
    buf.extend_from_slice(&state.data);
}

/// Appends a commit record to `buf`; `inline` is the body when it lives in the record.
/// Returns the record's offsets of the envelope and the body within `buf`'s new bytes.
pub fn encode_commit(
    buf: &mut Vec<u8>,
    id: &str,
    state: &State,
    envelope: &[u8],
    body: BodySpec,
    inline: &[u8],
) -> (usize, usize) {
    let start = header(buf, KIND_COMMIT);
    put_id_state(buf, id, state);
    buf.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
    let envelope_at = buf.len() - start;
    buf.extend_from_slice(envelope);
    let (kind, len) = match body {
        BodySpec::Inline { len } => (BODY_INLINE, len),
        BodySpec::File { len } => (BODY_FILE, len),
    };
    buf.push(kind);
    buf.extend_from_slice(&len.to_le_bytes());
    let body_at = buf.len() - start;
    buf.extend_from_slice(inline);
    seal(buf, start);
    (envelope_at, body_at)
}

pub fn encode_state(buf: &mut Vec<u8>, id: &str, state: &State) {
    let start = header(buf, KIND_STATE);
    put_id_state(buf, id, state);
    seal(buf, start);
}

pub fn encode_done(buf: &mut Vec<u8>, id: &str) {
    let start = header(buf, KIND_DONE);
    buf.push(id.len() as u8);
    buf.extend_from_slice(id.as_bytes());
    seal(buf, start);
}

/// What the CRC of a record in segment `seq` is XORed with: never zero, different for
/// neighbouring sequence numbers.
pub fn seq_mask(seq: u64) -> u32 {
    let x = seq.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 32) as u32) | 1
}

/// Binds an encoded record (as `encode_*` left it, starting at `record[0]`) to the
/// segment it is about to be written in. The committer calls this, since a writer does
/// not know which segment its record will land in.
pub fn bind(record: &mut [u8], seq: u64) {
    let crc = u32::from_le_bytes([record[8], record[9], record[10], record[11]]) ^ seq_mask(seq);
    record[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// Why bytes at some offset are not a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// Fewer bytes than the header or the payload it announces: a torn write.
    Short,
    /// The magic, the checksum or the payload's structure is wrong.
    Corrupt,
}

/// Decodes the record at the start of `bytes`, read from segment `seq`: the record and
/// its total length. Offsets in the record (`envelope_at`, `body_at`) count from the
/// record's first byte.
pub fn decode(bytes: &[u8], seq: u64) -> Result<(Record<'_>, usize), Bad> {
    if bytes.len() < RECORD_HEADER {
        return Err(Bad::Short);
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if u32_at(0) != RECORD_MAGIC {
        return Err(Bad::Corrupt);
    }
    let len = u32_at(4) as usize;
    if len > MAX_PAYLOAD {
        return Err(Bad::Corrupt);
    }
    let total = RECORD_HEADER + len;
    if bytes.len() < total {
        return Err(Bad::Short);
    }
    if crc32fast::hash(&bytes[12..total]) ^ seq_mask(seq) != u32_at(8) {
        return Err(Bad::Corrupt);
    }
    let kind = bytes[12];
    let mut r = Reader {
        bytes: &bytes[..total],
        at: RECORD_HEADER,
    };
    let rec = match kind {
        KIND_COMMIT => {
            let (id, state) = r.id_state()?;
            let env_len = r.u32()? as usize;
            let envelope_at = r.at;
            let envelope = r.take(env_len)?;
            let body = match r.u8()? {
                BODY_INLINE => BodySpec::Inline { len: r.u64()? },
                BODY_FILE => BodySpec::File { len: r.u64()? },
                _ => return Err(Bad::Corrupt),
            };
            let body_at = r.at;
            let inline = match body {
                BodySpec::Inline { len } => usize::try_from(len).map_err(|_| Bad::Corrupt)?,
                BodySpec::File { .. } => 0,
            };
            r.take(inline)?;
            Record::Commit {
                id,
                state,
                envelope,
                envelope_at,
                body,
                body_at,
            }
        }
        KIND_STATE => {
            let (id, state) = r.id_state()?;
            Record::State { id, state }
        }
        KIND_DONE => Record::Done { id: r.id()? },
        _ => return Err(Bad::Corrupt),
    };
    if r.at != total {
        return Err(Bad::Corrupt);
    }
    Ok((rec, total))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Bad> {
        let end = self.at.checked_add(n).ok_or(Bad::Corrupt)?;
        let s = self.bytes.get(self.at..end).ok_or(Bad::Corrupt)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Bad> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Bad> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, Bad> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn id(&mut self) -> Result<&'a str, Bad> {
        let n = self.u8()? as usize;
        let id = std::str::from_utf8(self.take(n)?).map_err(|_| Bad::Corrupt)?;
        if !valid_id(id) {
            return Err(Bad::Corrupt);
        }
        Ok(id)
    }
    fn id_state(&mut self) -> Result<(&'a str, State), Bad> {
        let id = self.id()?;
        let queue = Queue::from_byte(self.u8()?).ok_or(Bad::Corrupt)?;
        let next_attempt = self.u64()?;
        let n = self.u32()? as usize;
        let data = self.take(n)?.to_vec();
        Ok((
            id,
            State {
                queue,
                next_attempt,
                data,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_every_flipped_byte_is_caught() {
        let st = State {
            queue: Queue::Deferred,
            next_attempt: 1_767_225_600,
            data: b"{\"r\":1}".to_vec(),
        };
        let mut buf = Vec::new();
        let (env_at, body_at) = encode_commit(
            &mut buf,
            "ABC123",
            &st,
            b"envelope",
            BodySpec::Inline { len: 4 },
            b"body",
        );
        let first = buf.len();
        encode_state(&mut buf, "ABC123", &State::default());
        let second = buf.len();
        encode_done(&mut buf, "ABC123");
        bind(&mut buf[..first], 5);
        bind(&mut buf[first..second], 5);
        bind(&mut buf[second..], 5);
        fn decode(b: &[u8]) -> Result<(Record<'_>, usize), Bad> {
            super::decode(b, 5)
        }
        let (rec, n) = decode(&buf).unwrap();
        assert_eq!(n, first);
        assert_eq!(&buf[env_at..env_at + 8], b"envelope");
        assert_eq!(&buf[body_at..body_at + 4], b"body");
        assert_eq!(
            rec,
            Record::Commit {
                id: "ABC123",
                state: st,
                envelope: b"envelope",
                envelope_at: env_at,
                body: BodySpec::Inline { len: 4 },
                body_at,
            }
        );
        let (rec, m) = decode(&buf[n..]).unwrap();
        assert!(matches!(rec, Record::State { id: "ABC123", .. }));
        assert_eq!(
            decode(&buf[n + m..]).unwrap().0,
            Record::Done { id: "ABC123" }
        );
        // The same bytes read as part of another segment (a recycled file's old
        // contents) are not a record.
        for seq in [4, 6, 1 << 40] {
            assert_eq!(super::decode(&buf, seq).unwrap_err(), Bad::Corrupt);
        }
        // Every byte of the first record matters: a flip anywhere is refused, and a
        // cut anywhere is short.
        for i in 0..first {
            let mut bad = buf[..first].to_vec();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} went unnoticed");
            assert_eq!(decode(&buf[..i]).unwrap_err(), Bad::Short, "cut at {i}");
        }
    }

    #[test]
    fn ids_that_could_be_paths_are_refused() {
        assert!(valid_id("18F0A1B2C3D4E5"));
        for id in ["", "../x", "a/b", "a.b", "a b", &"A".repeat(65)] {
            assert!(!valid_id(id), "{id}");
        }
    }
}
