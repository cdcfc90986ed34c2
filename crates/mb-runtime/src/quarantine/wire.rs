//! The one conversion between the `Quarantine` service's `QuarantineEntry` and the
//! domain's `mb_core::quarantine::Entry`: the filter workers use one direction to index
//! what they stored (`Quarantine.Add`), mb-rpcd's services both (what they answer, and
//! what a worker or a cluster child sends). The files and the database index never see
//! the gRPC type.

use mb_core::quarantine::Entry;
use mb_proto::v1::QuarantineEntry;

use super::{valid_id, valid_path};

/// An entry from the wire whose id or path could point outside the quarantine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad quarantine entry {id:?} at {path:?}")]
pub struct BadEntry {
    pub id: String,
    pub path: String,
}

pub fn to_wire(e: Entry) -> QuarantineEntry {
    QuarantineEntry {
        id: e.id,
        node: e.node,
        at_unix_ms: e.at_unix_ms,
        queue_id: e.queue_id,
        client_ip: e.client_ip,
        sender: e.sender,
        recipients: e.recipients,
        subject: e.subject,
        reason: e.reason,
        score: e.score,
        symbols: e.symbols,
        size: e.size,
        path: e.path,
    }
}

/// An entry as another process sent it, checked like a file's (`valid_id`, `valid_path`).
pub fn from_wire(e: QuarantineEntry) -> Result<Entry, BadEntry> {
    if !valid_id(&e.id) || !valid_path(&e.path) {
        return Err(BadEntry {
            id: e.id,
            path: e.path,
        });
    }
    Ok(Entry {
        id: e.id,
        node: e.node,
        at_unix_ms: e.at_unix_ms,
        queue_id: e.queue_id,
        client_ip: e.client_ip,
        sender: e.sender,
        recipients: e.recipients,
        subject: e.subject,
        reason: e.reason,
        score: e.score,
        symbols: e.symbols,
        size: e.size,
        path: e.path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_cross_the_wire_unchanged_and_bad_ones_are_refused() {
        let e = Entry {
            id: "Q1".into(),
            node: "mx1".into(),
            at_unix_ms: 7,
            queue_id: "4XyZ".into(),
            client_ip: "192.0.2.7".into(),
            sender: "x@sender.test".into(),
            recipients: vec!["a@served.test".into()],
            subject: "s".into(),
            reason: "r".into(),
            score: 1.5,
            symbols: vec!["S".into()],
            size: 9,
            path: "1970/01/01/Q1.eml".into(),
        };
        assert_eq!(from_wire(to_wire(e.clone())), Ok(e.clone()));
        for (id, path) in [("../x", e.path.as_str()), ("Q1", "../../etc/passwd")] {
            let bad = QuarantineEntry {
                id: id.into(),
                path: path.into(),
                ..to_wire(e.clone())
            };
            assert_eq!(
                from_wire(bad).map_err(|b| b.to_string()),
                Err(format!("bad quarantine entry {id:?} at {path:?}"))
            );
        }
    }
}
