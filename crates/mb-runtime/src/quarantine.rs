//! The quarantine on disk, shared by the filter workers (which store) and mb-rpcd (which
//! indexes, releases and purges): `paths.spool_dir/quarantine/YYYY/MM/DD/ID.eml`, the
//! message as it would have been delivered, and `ID.json` beside it, the index entry
//! (`mb_core::quarantine::Entry`: envelope, reason, score). The files are the truth; the
//! database index is rebuilt from the `.json` files when they disagree.
//!
//! The files hold the domain type, never a gRPC message: `wire` converts at the edge.

pub mod wire;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use mb_core::quarantine::Entry;

/// `paths.spool_dir/quarantine`.
pub fn root(cfg: &mb_core::Config) -> PathBuf {
    cfg.path("paths.spool_dir").join("quarantine")
}

/// Ids are queue ids or generated ones: letters, digits, `-`, `_` and `.`, no path.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `YYYY/MM/DD/ID.eml` for a message quarantined at `at_ms` (UTC).
pub fn relative_path(at_ms: i64, id: &str) -> String {
    let (y, m, d) = crate::logging::civil_from_days(at_ms.div_euclid(86_400_000));
    format!("{y:04}/{m:02}/{d:02}/{id}.eml")
}

/// Whether a stored relative path has the shape `relative_path` makes (no `..`, no
/// absolute path), so an index entry can never point outside the quarantine.
pub fn valid_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    parts.len() == 4
        && parts[..3]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && parts[3].strip_suffix(".eml").is_some_and(valid_id)
}

/// An entry from its `.json` text; `None` when the text is not an entry or its id or path
/// could point outside the quarantine.
pub fn from_json(text: &str) -> Option<Entry> {
    let e: Entry = serde_json::from_str(text).ok()?;
    (valid_id(&e.id) && valid_path(&e.path)).then_some(e)
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Stores a message and its entry durably (blocking: call it on the blocking pool).
/// The `.eml` is written first and the `.json` last, so a crash leaves at worst an
/// unindexed message file, never an entry without its message.
pub fn store(root: &Path, entry: &Entry, message: &[u8]) -> io::Result<()> {
    if !valid_path(&entry.path) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad quarantine path {:?}", entry.path),
        ));
    }
    let json = serde_json::to_vec(entry).map_err(io::Error::other)?;
    let eml = root.join(&entry.path);
    let dir = eml.parent().unwrap_or(root).to_path_buf();
    if !dir.exists() {
        std::fs::create_dir_all(&dir)?;
        // The new day directory must survive a crash too.
        let mut d = dir.as_path();
        while let Some(parent) = d.parent() {
            sync_dir(parent)?;
            if parent == root {
                break;
            }
            d = parent;
        }
    }
    write_synced(&eml, message)?;
    write_synced(&eml.with_extension("json"), &json)?;
    sync_dir(&dir)
}

/// Removes a message's files (a missing file is not an error).
pub fn remove(root: &Path, entry: &Entry) -> io::Result<()> {
    if !valid_path(&entry.path) {
        return Ok(());
    }
    let eml = root.join(&entry.path);
    for p in [eml.with_extension("json"), eml.clone()] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // Empty day directories go too (a non-empty one stays: remove_dir refuses).
    let mut dir = eml.parent();
    while let Some(d) = dir {
        if d == root || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// Every entry found on disk (the `.json` files), for rebuilding the index.
pub fn scan(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for ent in rd.flatten() {
            let p = ent.path();
            if ent.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json")
                && let Some(e) = std::fs::read_to_string(&p).ok().and_then(|t| from_json(&t))
                && root.join(&e.path) == p.with_extension("eml")
                && p.with_extension("eml").exists()
            {
                out.push(e);
            }
        }
    }
    out
}

/// What the retention pass removes from `entries` (oldest first): anything older than
/// `max_age_ms`, then the oldest until at most `max_messages` (0: no limit) and
/// `max_bytes` remain.
pub fn expired(
    entries: &[Entry],
    now_ms: i64,
    max_age_ms: i64,
    max_messages: u64,
    max_bytes: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut count = entries.len() as u64;
    let mut bytes: u64 = entries.iter().map(|e| e.size).sum();
    for e in entries {
        let too_old = now_ms.saturating_sub(e.at_unix_ms) > max_age_ms;
        let too_many = max_messages > 0 && count > max_messages;
        if !(too_old || too_many || bytes > max_bytes) {
            break;
        }
        out.push(e.id.clone());
        count -= 1;
        bytes = bytes.saturating_sub(e.size);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, at: i64, size: u64) -> Entry {
        Entry {
            id: id.into(),
            at_unix_ms: at,
            size,
            path: relative_path(at, id),
            recipients: vec!["a@b.example".into()],
            ..Default::default()
        }
    }

    #[test]
    fn paths_are_dated_and_checked() {
        assert_eq!(relative_path(0, "X1"), "1970/01/01/X1.eml");
        // 2026-11-22 04:40:00 UTC
        assert_eq!(relative_path(1_795_322_400_000, "Q"), "2026/11/22/Q.eml");
        assert_eq!(relative_path(951_782_400_000, "L"), "2000/02/29/L.eml");
        assert!(valid_path("2026/11/22/Q-1.eml"));
        for bad in [
            "../11/22/Q.eml",
            "2026/11/22/../Q.eml",
            "/etc/passwd",
            "2026/11/Q.eml",
            "2026/11/22/.eml",
        ] {
            assert!(!valid_path(bad), "{bad}");
        }
        assert!(!valid_id("a/b") && !valid_id("..") && !valid_id("") && valid_id("1A2b-x_y.z"));
    }

    #[test]
    fn entries_round_trip_and_survive_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let e = entry("Q1", 1_795_322_400_000, 5);
        store(dir.path(), &e, b"hello").unwrap();
        assert_eq!(std::fs::read(dir.path().join(&e.path)).unwrap(), b"hello");
        assert_eq!(scan(dir.path()), vec![e.clone()]);
        remove(dir.path(), &e).unwrap();
        assert!(scan(dir.path()).is_empty());
        assert!(
            !dir.path().join("2026").exists(),
            "empty day directories are removed"
        );
    }

    /// An `ID.json` exactly as the writer before `mb_core::quarantine::Entry` made it
    /// (`serde_json::json!`: compact, keys in alphabetical order).
    const EARLIER_FORMAT: &str = r#"{"at_ms":1795322400000,"client_ip":"192.0.2.7","id":"4XyZ-1.a","node":"mx1","path":"2026/11/22/4XyZ-1.a.eml","queue_id":"4XyZ","reason":"Spam detected (score 12.5)","recipients":["a@served.test","b@served.test"],"score":12.5,"sender":"x@sender.test","size":5,"subject":"Win \"big\" été","symbols":["BAYES_SPAM","R_DKIM_REJECT"]}"#;

    #[test]
    fn files_written_before_the_domain_type_are_read_and_written_alike() {
        let expected = Entry {
            id: "4XyZ-1.a".into(),
            node: "mx1".into(),
            at_unix_ms: 1_795_322_400_000,
            queue_id: "4XyZ".into(),
            client_ip: "192.0.2.7".into(),
            sender: "x@sender.test".into(),
            recipients: vec!["a@served.test".into(), "b@served.test".into()],
            subject: "Win \"big\" été".into(),
            reason: "Spam detected (score 12.5)".into(),
            score: 12.5,
            symbols: vec!["BAYES_SPAM".into(), "R_DKIM_REJECT".into()],
            size: 5,
            path: "2026/11/22/4XyZ-1.a.eml".into(),
        };
        assert_eq!(from_json(EARLIER_FORMAT), Some(expected.clone()));

        // Found on disk by the scan that rebuilds the index.
        let old = tempfile::tempdir().unwrap();
        let eml = old.path().join(&expected.path);
        std::fs::create_dir_all(eml.parent().unwrap()).unwrap();
        std::fs::write(&eml, b"hello").unwrap();
        std::fs::write(eml.with_extension("json"), EARLIER_FORMAT).unwrap();
        assert_eq!(scan(old.path()), vec![expected.clone()]);

        // What is written now has the same keys and values, so an earlier version reads
        // it too.
        let new = tempfile::tempdir().unwrap();
        store(new.path(), &expected, b"hello").unwrap();
        let written =
            std::fs::read(new.path().join(&expected.path).with_extension("json")).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&written).unwrap(),
            serde_json::from_str::<serde_json::Value>(EARLIER_FORMAT).unwrap()
        );
    }

    #[test]
    fn a_score_that_is_not_a_number_reads_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = entry("NAN", 1_795_322_400_000, 5);
        e.score = f64::NAN;
        store(dir.path(), &e, b"hello").unwrap();
        let found = scan(dir.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].score.to_bits(), 0.0_f64.to_bits());
    }

    #[test]
    fn retention_removes_the_old_then_the_oldest() {
        let day = 86_400_000;
        let now = 100 * day;
        let entries = vec![
            entry("old", now - 40 * day, 10),
            entry("a", now - 3 * day, 10),
            entry("b", now - 2 * day, 10),
            entry("c", now - day, 10),
        ];
        assert_eq!(expired(&entries, now, 30 * day, 0, u64::MAX), vec!["old"]);
        assert_eq!(
            expired(&entries, now, 30 * day, 2, u64::MAX),
            vec!["old", "a"]
        );
        assert_eq!(
            expired(&entries, now, 30 * day, 0, 15),
            vec!["old", "a", "b"]
        );
        assert!(expired(&entries, now, 60 * day, 0, u64::MAX).is_empty());
    }
}
