//! A read-only look at a spool's files: what tests and the benchmark use to see the
//! queue of a running (or stopped) daemon without opening the spool, which would
//! reclaim files and start a new segment.

use std::collections::BTreeMap;
use std::path::Path;

use crate::record::{self, BodySpec, Record};
use crate::{SpoolError, State, body_path};

/// One live message as the segments on disk hold it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMessage {
    pub id: String,
    pub envelope: Vec<u8>,
    /// The body, read whole (from the record, or from `bodies/ID`); empty when a large
    /// body's file cannot be read.
    pub body: Vec<u8>,
    pub state: State,
}

/// What kind of record an entry of `Snapshot::log` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// A new message, or a compaction copy of one.
    Commit,
    State,
    Done,
}

/// The live messages, ordered by id, and every whole record's kind and id in log order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub messages: Vec<SnapshotMessage>,
    pub log: Vec<(LogKind, String)>,
}

/// Reads the spool under `root` without changing any file. A segment being written
/// while this reads it ends in a torn tail, which is skipped as recovery skips it: the
/// result is the spool as of some moment during the call.
pub fn snapshot(root: &Path) -> Result<Snapshot, SpoolError> {
    let mut seqs: Vec<u64> = Vec::new();
    let dir = match std::fs::read_dir(root.join("segments")) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
        Err(e) => return Err(e.into()),
    };
    for entry in dir {
        let name = entry?.file_name();
        if let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .filter(|n| n.len() == 16)
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let mut live: BTreeMap<String, SnapshotMessage> = BTreeMap::new();
    let mut log = Vec::new();
    for seq in seqs {
        let data = match std::fs::read(crate::segment_path(root, seq)) {
            Ok(d) => d,
            // Reclaimed between the listing and the read: nothing live was in it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if data.len() < record::SEGMENT_HEADER
            || &data[..8] != record::SEGMENT_MAGIC
            || data[8..16] != seq.to_le_bytes()
        {
            continue;
        }
        let mut pos = record::SEGMENT_HEADER;
        while pos < data.len() {
            let Ok((r, len)) = record::decode(&data[pos..], seq) else {
                match crate::recover::resync(&data, pos + 1, seq) {
                    Some(next) => {
                        pos = next;
                        continue;
                    }
                    None => break,
                }
            };
            match r {
                Record::Commit {
                    id,
                    state,
                    envelope,
                    body,
                    body_at,
                    ..
                } => {
                    let body = match body {
                        BodySpec::Inline { len } => {
                            let at = pos + body_at;
                            data[at..at + len as usize].to_vec()
                        }
                        BodySpec::File { .. } => {
                            std::fs::read(body_path(root, id)).unwrap_or_default()
                        }
                    };
                    log.push((LogKind::Commit, id.to_string()));
                    live.insert(
                        id.to_string(),
                        SnapshotMessage {
                            id: id.to_string(),
                            envelope: envelope.to_vec(),
                            body,
                            state,
                        },
                    );
                }
                Record::State { id, state } => {
                    log.push((LogKind::State, id.to_string()));
                    if let Some(m) = live.get_mut(id) {
                        m.state = state;
                    }
                }
                Record::Done { id } => {
                    log.push((LogKind::Done, id.to_string()));
                    live.remove(id);
                }
            }
            pos += len;
        }
    }
    Ok(Snapshot {
        messages: live.into_values().collect(),
        log,
    })
}
