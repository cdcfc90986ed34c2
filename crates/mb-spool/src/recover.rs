//! Start-up recovery: reads every segment in order, applies each whole record to a new
//! index, skips torn tails and corrupt records, and checks the large bodies.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::record::{self, Bad, Record};
use crate::{
    BodyLoc, Index, OpKind, Seg, SpoolError, apply, body_path, segment_path, spare_path, unref,
};

/// What a start-up scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub records: u64,
    /// Live messages after recovery.
    pub messages: usize,
    /// Segments that ended in bytes that are not a whole record of theirs (a write cut
    /// by a crash, never acknowledged; or the old contents of a recycled segment file),
    /// and how many bytes that was.
    pub torn_tails: usize,
    pub torn_bytes: u64,
    /// Bad records followed by good ones in the same segment: damage, not a crash.
    pub corrupt_records: usize,
    /// Messages whose body file is missing or short: dropped, and named here.
    pub missing_bodies: Vec<String>,
    /// Body files no live message names (a crash between a Done and the unlink, or a
    /// body written for a commit that never became durable): removed.
    pub orphan_bodies: usize,
    /// Segments deleted because nothing live referred to them.
    pub reclaimed: usize,
    pub elapsed: Duration,
}

pub(crate) fn scan(root: &Path) -> Result<(Index, Recovery), SpoolError> {
    let started = Instant::now();
    let mut rec = Recovery::default();
    let mut index = Index::default();
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(root.join("segments"))? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with("spare-")) {
            index.spares.push(entry.path());
            continue;
        }
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .filter(|n| n.len() == 16)
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        else {
            continue;
        };
        seqs.push(seq);
    }
    seqs.sort_unstable();
    let mut finished = Vec::new();
    for seq in seqs {
        let path = segment_path(root, seq);
        let data = std::fs::read(&path)?;
        if data.len() < record::SEGMENT_HEADER {
            // Created, but its header never became durable: a crash inside rotation,
            // before anything could be written to it.
            std::fs::remove_file(&path)?;
            continue;
        }
        if &data[..8] != record::SEGMENT_MAGIC {
            return Err(SpoolError::BadSegment { segment: path });
        }
        if data[8..16] != seq.to_le_bytes() {
            // A recycled file renamed for this segment whose new header never became
            // durable: nothing can have been written to it. Back to the spares.
            std::fs::rename(&path, spare_path(root, seq))?;
            index.spares.push(spare_path(root, seq));
            continue;
        }
        rec.segments += 1;
        index.segs.insert(
            seq,
            Seg::new(Arc::new(File::open(&path)?), data.len() as u64),
        );
        let mut pos = record::SEGMENT_HEADER;
        while pos < data.len() {
            match record::decode(&data[pos..], seq) {
                Ok((r, len)) => {
                    rec.records += 1;
                    replay(&mut index, seq, pos as u64, len as u64, r, &mut finished);
                    pos += len;
                }
                // The zeros of a prepared spare behind the last record: unused space,
                // not a torn write (a record whose writing began is not all zeros).
                Err(Bad::Short | Bad::Corrupt) if data[pos..].iter().all(|&b| b == 0) => break,
                Err(Bad::Short | Bad::Corrupt) => match resync(&data, pos + 1, seq) {
                    Some(next) => {
                        rec.corrupt_records += 1;
                        pos = next;
                    }
                    None => {
                        rec.torn_tails += 1;
                        rec.torn_bytes += (data.len() - pos) as u64;
                        break;
                    }
                },
            }
        }
    }
    // Large bodies: each was fsynced before its record, so a missing one is damage.
    let mut missing = Vec::new();
    for (id, e) in &index.live {
        if let BodyLoc::File { len } = e.body {
            let ok = std::fs::metadata(body_path(root, id)).is_ok_and(|m| m.len() >= len);
            if !ok {
                missing.push(id.clone());
            }
        }
    }
    for id in missing {
        if let Some(e) = index.live.remove(&id) {
            unref(&mut index, e.commit_seg, e.record_len);
            unref(&mut index, e.state_seg, 0);
            index.body_files -= 1;
        }
        rec.missing_bodies.push(id.to_string());
    }
    rec.missing_bodies.sort();
    for entry in std::fs::read_dir(root.join("bodies"))? {
        let entry = entry?;
        let name = entry.file_name();
        let named = name
            .to_str()
            .and_then(|n| index.live.get(n))
            .is_some_and(|e| matches!(e.body, BodyLoc::File { .. }));
        if !named {
            std::fs::remove_file(entry.path())?;
            rec.orphan_bodies += 1;
        }
    }
    rec.messages = index.live.len();
    rec.elapsed = started.elapsed();
    Ok((index, rec))
}

/// The next offset after `from` where a whole record verifies, if any.
pub(crate) fn resync(data: &[u8], from: usize, seq: u64) -> Option<usize> {
    let magic = record::RECORD_MAGIC.to_le_bytes();
    let mut at = from;
    while at + record::RECORD_HEADER <= data.len() {
        let hit = data[at..].windows(4).position(|w| w == magic)?;
        at += hit;
        if record::decode(&data[at..], seq).is_ok() {
            return Some(at);
        }
        at += 1;
    }
    None
}

fn replay(
    index: &mut Index,
    seq: u64,
    offset: u64,
    len: u64,
    r: Record<'_>,
    finished: &mut Vec<Box<str>>,
) {
    match r {
        Record::Commit {
            id,
            state,
            envelope,
            envelope_at,
            body,
            body_at,
        } => {
            if let Some(g) = index.ghosts.remove(id) {
                // An id used again after its Done: the new message starts afresh.
                if let Some(s) = index.segs.get_mut(&g.done_seg) {
                    s.pins -= 1;
                }
            }
            let copy = index.live.contains_key(id);
            let kind = OpKind::Commit {
                id: id.into(),
                envelope_at,
                envelope_len: envelope.len() as u32,
                body,
                body_at,
                copy,
            };
            apply(index, seq, offset, len, &kind, finished);
            // A new message's record carries the default state, a compaction copy the
            // state it had when copied.
            if let Some(e) = index.live.get_mut(id) {
                e.state = state;
            }
        }
        Record::State { id, state } => {
            if let Some(e) = index.live.get_mut(id) {
                e.state = state;
                apply(
                    index,
                    seq,
                    offset,
                    len,
                    &OpKind::State { id: id.into() },
                    finished,
                );
            }
        }
        Record::Done { id } => {
            apply(
                index,
                seq,
                offset,
                len,
                &OpKind::Done { id: id.into() },
                finished,
            );
        }
    }
}
