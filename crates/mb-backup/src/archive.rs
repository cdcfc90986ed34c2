//! The backup archive: a gzip-compressed tar whose first member is `manifest.json`
//! (format version, product version, creation time, source engine, what is included,
//! every table with its columns and row count, every file with its mode), then one
//! `database/TABLE.ndjson` per table (one JSON array of column values per line, in the
//! manifest's column order), then `files/KIND/NAME` (DKIM key, web TOTP key, cluster
//! state, quarantine messages).
//!
//! Reading checks everything a restore relies on before anything is restored: the
//! manifest first, rows that parse and count up to the manifest's figures, files of the
//! announced size, names that stay inside their directory, and gzip's checksum at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// The archive format this version writes and the newest it reads.
pub const FORMAT: u32 = 1;

pub const MANIFEST: &str = "manifest.json";

/// What an archive holds, written first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub product: String,
    pub product_version: String,
    /// Unix seconds, and the same as `YYYY-MM-DD HH:MM:SS` UTC.
    pub created_unix: i64,
    pub created: String,
    pub host: String,
    /// The database engine the rows were read from: sqlite, mysql or postgres.
    pub source_engine: String,
    /// mb-rpcd's row format (its `backup::FORMAT`).
    pub row_format: u32,
    pub includes: Includes,
    pub tables: Vec<TableInfo>,
    pub files: Vec<FileInfo>,
}

/// The optional parts, and whether the key files were there to take.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Includes {
    pub dkim_key: bool,
    pub web_totp_key: bool,
    pub cluster: bool,
    pub quarantine: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    pub name: String,
    pub columns: Vec<String>,
    pub rows: u64,
}

/// Which directory a file is restored into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// `dkim.key` (one file: `NAME` is `private.key`).
    Dkim,
    /// `paths.data_dir/web-totp.key`, which seals the web accounts' TOTP secrets.
    WebTotp,
    /// `paths.data_dir/cluster/NAME`.
    Cluster,
    /// `paths.spool_dir/quarantine/NAME`.
    Quarantine,
}

impl FileKind {
    pub fn dir(self) -> &'static str {
        match self {
            FileKind::Dkim => "dkim",
            FileKind::WebTotp => "web",
            FileKind::Cluster => "cluster",
            FileKind::Quarantine => "quarantine",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub kind: FileKind,
    /// Relative to the kind's directory, `/`-separated, without `..`.
    pub name: String,
    /// Where it was taken from.
    pub source: String,
    /// Permission bits (0o640 for a DKIM key).
    pub mode: u32,
    pub size: u64,
    /// The owner's and group's names, for a restore as root.
    pub user: String,
    pub group: String,
}

impl FileInfo {
    pub fn member(&self) -> String {
        format!("files/{}/{}", self.kind.dir(), self.name)
    }
}

/// Why an archive cannot be read or restored; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what}: the archive is damaged or truncated ({cause})")]
    Damaged { what: String, cause: io::Error },
    #[error("not an mb-backup archive: {0}")]
    NotOurs(String),
    #[error(
        "the archive has format {found}, newer than this mb-backup reads ({FORMAT}): restore it with mailborder {version} or newer"
    )]
    Newer { found: u32, version: String },
    #[error("{0}: the archive is damaged")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn damaged(what: &str) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |cause| ArchiveError::Damaged {
        what: what.to_string(),
        cause,
    }
}

/// A name that stays inside its directory: relative, no `..`, no empty part.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && name
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// One table's rows as a line of JSON per row.
pub fn row_line(values: &[Json]) -> String {
    let mut line = Json::Array(values.to_vec()).to_string();
    line.push('\n');
    line
}

/// Writes an archive: the manifest, then the tables and files in the manifest's order.
pub struct Writer<W: Write> {
    tar: tar::Builder<GzEncoder<W>>,
    mtime: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, manifest: &Manifest) -> io::Result<Writer<W>> {
        let mut tar = tar::Builder::new(GzEncoder::new(out, Compression::default()));
        tar.mode(tar::HeaderMode::Complete);
        let mtime = u64::try_from(manifest.created_unix).unwrap_or(0);
        let mut w = Writer { tar, mtime };
        let text = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
        w.append(MANIFEST, 0o600, text.len() as u64, "", "", &text[..])?;
        Ok(w)
    }

    fn append(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        user: &str,
        group: &str,
        data: impl Read,
    ) -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(mode & 0o7777);
        h.set_mtime(self.mtime);
        if !user.is_empty() {
            h.set_username(user)?;
        }
        if !group.is_empty() {
            h.set_groupname(group)?;
        }
        // Exactly `size` bytes, so that a file growing meanwhile cannot break the tar.
        self.tar
            .append_data(&mut h, path, data.take(size).chain(io::repeat(0).take(0)))
    }

    /// A table's rows (`row_line`s), `size` bytes.
    pub fn table(&mut self, name: &str, size: u64, rows: impl Read) -> io::Result<()> {
        self.append(
            &format!("database/{name}.ndjson"),
            0o600,
            size,
            "",
            "",
            rows,
        )
    }

    pub fn file(&mut self, info: &FileInfo, data: impl Read) -> io::Result<()> {
        self.append(
            &info.member(),
            info.mode,
            info.size,
            &info.user,
            &info.group,
            data,
        )
    }

    /// Ends the tar and the gzip stream; returns the output.
    pub fn finish(self) -> io::Result<W> {
        self.tar.into_inner()?.finish()
    }
}

/// A part of an archive as `read` hands it over.
pub enum Part<'a> {
    /// A table's rows, each checked to be an array of the manifest's width.
    Rows {
        table: &'a TableInfo,
        rows: &'a mut dyn Iterator<Item = Result<Vec<Json>, ArchiveError>>,
    },
    /// A file's content, exactly `info.size` bytes.
    File {
        info: &'a FileInfo,
        data: &'a mut dyn Read,
    },
}

/// Reads a whole archive, handing each part to `visit` (which may read it or not), and
/// checks it end to end; the manifest is returned only when everything was in order.
pub fn read(
    input: impl Read,
    mut visit: impl FnMut(&Manifest, Part<'_>) -> Result<(), ArchiveError>,
) -> Result<Manifest, ArchiveError> {
    let mut archive = tar::Archive::new(GzDecoder::new(input));
    let mut entries = archive.entries().map_err(damaged("the archive"))?;
    let manifest: Manifest = {
        let mut first = match entries.next() {
            Some(e) => e.map_err(damaged("the archive's first member"))?,
            None => return Err(ArchiveError::NotOurs("it is empty".into())),
        };
        let path = first.path().map_err(damaged("a member's name"))?;
        if path.to_str() != Some(MANIFEST) {
            return Err(ArchiveError::NotOurs(format!(
                "its first member is {}, not {MANIFEST}",
                path.display()
            )));
        }
        let mut text = Vec::new();
        first
            .read_to_end(&mut text)
            .map_err(damaged("the manifest"))?;
        let v: Json = serde_json::from_slice(&text)
            .map_err(|e| ArchiveError::NotOurs(format!("its manifest is not JSON: {e}")))?;
        let format = v["format"].as_u64().unwrap_or(0);
        if format > u64::from(FORMAT) {
            return Err(ArchiveError::Newer {
                found: u32::try_from(format).unwrap_or(u32::MAX),
                version: v["product_version"].as_str().unwrap_or("?").to_string(),
            });
        }
        serde_json::from_value(v)
            .map_err(|e| ArchiveError::NotOurs(format!("its manifest is incomplete: {e}")))?
    };
    let tables: BTreeMap<String, &TableInfo> = manifest
        .tables
        .iter()
        .map(|t| (format!("database/{}.ndjson", t.name), t))
        .collect();
    let files: BTreeMap<String, &FileInfo> =
        manifest.files.iter().map(|f| (f.member(), f)).collect();
    for f in &manifest.files {
        if !safe_name(&f.name) || (f.kind == FileKind::Dkim && f.name != "private.key") {
            return Err(ArchiveError::Invalid(format!(
                "the file name {:?} leaves its directory",
                f.name
            )));
        }
    }
    let mut seen = BTreeSet::new();
    for entry in entries {
        let mut entry = entry.map_err(damaged("a member's header"))?;
        // An archive repacked with tar(1) has its directories as members: nothing to
        // restore in them.
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let name = entry
            .path()
            .map_err(damaged("a member's name"))?
            .to_string_lossy()
            .into_owned();
        if !seen.insert(name.clone()) {
            return Err(ArchiveError::Invalid(format!("{name} appears twice")));
        }
        if let Some(table) = tables.get(&name) {
            let mut lines = BufReader::new(&mut entry).lines();
            let mut count = 0u64;
            let width = table.columns.len();
            let mut bad = None;
            let mut rows = std::iter::from_fn(|| {
                if bad.is_some() {
                    return None;
                }
                let line = match lines.next()? {
                    Ok(l) => l,
                    Err(e) => return Some(Err(damaged(&name)(e))),
                };
                count += 1;
                Some(match serde_json::from_str::<Json>(&line) {
                    Ok(Json::Array(values)) if values.len() == width => Ok(values),
                    _ => {
                        bad = Some(count);
                        Err(ArchiveError::Invalid(format!("{name}, line {count}")))
                    }
                })
            });
            visit(
                &manifest,
                Part::Rows {
                    table,
                    rows: &mut rows,
                },
            )?;
            // Whatever `visit` left unread is checked too.
            for r in rows.by_ref() {
                r?;
            }
            if count != table.rows {
                return Err(ArchiveError::Invalid(format!(
                    "{name} has {count} rows where the manifest says {}",
                    table.rows
                )));
            }
        } else if let Some(info) = files.get(&name) {
            if entry.size() != info.size {
                return Err(ArchiveError::Invalid(format!(
                    "{name} is {} bytes where the manifest says {}",
                    entry.size(),
                    info.size
                )));
            }
            let mut counted = Counted {
                inner: &mut entry,
                n: 0,
            };
            visit(
                &manifest,
                Part::File {
                    info,
                    data: &mut counted,
                },
            )?;
            io::copy(&mut counted, &mut io::sink()).map_err(damaged(&name))?;
            if counted.n != info.size {
                return Err(ArchiveError::Damaged {
                    what: name,
                    cause: io::ErrorKind::UnexpectedEof.into(),
                });
            }
        } else {
            return Err(ArchiveError::Invalid(format!(
                "{name} is not in the manifest"
            )));
        }
    }
    for name in tables.keys().chain(files.keys()) {
        if !seen.contains(name) {
            return Err(ArchiveError::Damaged {
                what: format!("{name}, named by the manifest, is missing"),
                cause: io::ErrorKind::UnexpectedEof.into(),
            });
        }
    }
    // The rest of the gzip stream: its checksum and length are checked at its end.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(damaged("the archive's end"))?;
    Ok(manifest)
}

struct Counted<'a> {
    inner: &'a mut dyn Read,
    n: u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            product: "mailborder".into(),
            product_version: "0.1.0".into(),
            created_unix: 1_795_300_000,
            created: "2026-11-21 22:26:40".into(),
            host: "mx1".into(),
            source_engine: "sqlite".into(),
            row_format: 1,
            includes: Includes {
                dkim_key: true,
                ..Default::default()
            },
            tables: vec![TableInfo {
                name: "policies".into(),
                columns: vec!["id".into(), "name".into(), "tag".into()],
                rows: 2,
            }],
            files: vec![FileInfo {
                kind: FileKind::Dkim,
                name: "private.key".into(),
                source: "/etc/mailborder/dkim/private.key".into(),
                mode: 0o640,
                size: 11,
                user: "root".into(),
                group: "mailborder".into(),
            }],
        }
    }

    fn rows() -> String {
        row_line(&[json!(1), json!("strict"), json!(2.5)])
            + &row_line(&[json!(3), json!("é\n\"x\""), Json::Null])
    }

    fn archive(m: &Manifest, rows: &str, key: &[u8]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), m).unwrap();
        w.table("policies", rows.len() as u64, rows.as_bytes())
            .unwrap();
        w.file(&m.files[0], key).unwrap();
        w.finish().unwrap()
    }

    /// Everything read back: rows, files and their modes; what `visit` sees.
    /// The manifest, the rows and the key file.
    type Contents = (Manifest, Vec<Vec<Json>>, Vec<u8>);

    fn read_all(bytes: &[u8]) -> Result<Contents, ArchiveError> {
        let (mut rows, mut key) = (Vec::new(), Vec::new());
        let m = read(bytes, |_, part| {
            match part {
                Part::Rows { rows: r, .. } => {
                    for row in r {
                        rows.push(row?);
                    }
                }
                Part::File { data, .. } => {
                    data.read_to_end(&mut key)?;
                }
            }
            Ok(())
        })?;
        Ok((m, rows, key))
    }

    #[test]
    fn an_archive_reads_back_as_written() {
        let m = manifest();
        let bytes = archive(&m, &rows(), b"-----KEY---");
        let (back, rows, key) = read_all(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            rows,
            vec![
                vec![json!(1), json!("strict"), json!(2.5)],
                vec![json!(3), json!("é\n\"x\""), Json::Null]
            ]
        );
        // An integer stays an integer and a real a real.
        assert!(rows[0][0].is_i64() && rows[0][2].is_f64());
        assert_eq!(key, b"-----KEY---");
        // The member keeps its mode and owner's names for the restore.
        let mut a = tar::Archive::new(GzDecoder::new(&bytes[..]));
        let e = a
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .find(|e| e.path().unwrap().starts_with("files"))
            .unwrap();
        assert_eq!(e.header().mode().unwrap(), 0o640);
        assert_eq!(e.header().groupname().unwrap(), Some("mailborder"));
    }

    #[test]
    fn a_cut_or_altered_archive_is_refused() {
        let m = manifest();
        let bytes = archive(&m, &rows(), b"-----KEY---");
        for cut in [10, bytes.len() / 2, bytes.len() - 9, bytes.len() - 1] {
            let e = read_all(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(e, ArchiveError::Damaged { .. } | ArchiveError::NotOurs(_)),
                "cut at {cut}: {e}"
            );
        }
        // One byte changed anywhere in the compressed data.
        for at in (20..bytes.len() - 8).step_by(7) {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(
                read_all(&b).is_err(),
                "a flipped byte at {at} was not noticed"
            );
        }
        // The manifest promising another count, a file of another size, a row of the
        // wrong width.
        let mut more = manifest();
        more.tables[0].rows = 3;
        let e = read_all(&archive(&more, &rows(), b"-----KEY---")).unwrap_err();
        assert!(
            e.to_string()
                .contains("has 2 rows where the manifest says 3"),
            "{e}"
        );
        let narrow = rows() + &row_line(&[json!(4)]);
        let mut m3 = manifest();
        m3.tables[0].rows = 3;
        assert!(matches!(
            read_all(&archive(&m3, &narrow, b"-----KEY---")),
            Err(ArchiveError::Invalid(_))
        ));
        // A name that would leave its directory.
        let mut evil = manifest();
        evil.files[0].kind = FileKind::Quarantine;
        evil.files[0].name = "../../etc/passwd".into();
        // (tar itself will not write such a member: the manifest alone names it.)
        let mut w = Writer::new(Vec::new(), &evil).unwrap();
        w.table("policies", rows().len() as u64, rows().as_bytes())
            .unwrap();
        assert!(matches!(
            read_all(&w.finish().unwrap()),
            Err(ArchiveError::Invalid(_))
        ));
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let mut m = manifest();
        m.format = FORMAT + 1;
        m.product_version = "9.0.0".into();
        let e = read_all(&archive(&m, &rows(), b"-----KEY---")).unwrap_err();
        assert!(matches!(e, ArchiveError::Newer { found, .. } if found == FORMAT + 1));
        assert!(e.to_string().contains("mailborder 9.0.0 or newer"), "{e}");
        // And something that is no archive of ours.
        let mut plain = GzEncoder::new(Vec::new(), Compression::default());
        plain.write_all(b"hello").unwrap();
        assert!(read_all(&plain.finish().unwrap()).is_err());
    }

    #[test]
    fn names_stay_inside_their_directory() {
        for good in ["private.key", "2026/11/22/Q-1.eml", "ca.pem"] {
            assert!(safe_name(good), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "./a",
            "a\\b",
        ] {
            assert!(!safe_name(bad), "{bad}");
        }
    }
}
