//! What the archives in an attachment hold: member names of ZIP (found through the end of
//! central directory record, so data prepended to an archive does not hide it; ZIP64
//! included), tar, gzip and bzip2 archives, nested archives opened level by level, 7z
//! member names (read from its headers; members not unpacked), and what cannot be looked
//! into (encrypted ZIP members, 7z with encrypted names, RAR, CAB and ISO images, archives
//! nested too deep or expanding too far).
//!
//! Formats are recognised by their magic bytes, never by the attachment's name. Member
//! contents are read only to look for archives inside them, and never past the limits:
//! every byte a decompressor produces counts against `attachments.archive_max_size` and
//! `attachments.archive_max_ratio`, whatever sizes the archive declares.

use std::io::{Cursor, Read};

/// How far archives are opened: `attachments.archive_*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Levels of archives opened; the attachment itself is level 1.
    pub depth: u32,
    /// Most bytes decompressed from one attachment, all levels together.
    pub max_size: u64,
    /// Most bytes decompressed per byte of the attachment (see `RATIO_FLOOR`).
    pub max_ratio: u64,
}

/// What the archives of one attachment hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Contents {
    /// Every member name, with the archive that holds it (`"a.zip"`, or for nested ones
    /// `"a.zip/b.zip"`).
    pub members: Vec<Member>,
    /// Archives with encrypted members, by the same paths.
    pub encrypted: Vec<String>,
    /// What could not be looked into, one sentence each.
    pub unscannable: Vec<String>,
    /// Why the attachment is a decompression bomb, when it expands beyond
    /// `attachments.archive_max_ratio`.
    pub bomb: Option<String>,
}

/// One name inside an archive.
#[derive(Debug, PartialEq, Eq)]
pub struct Member {
    /// The archive that holds it.
    pub archive: String,
    /// Its name as the archive gives it.
    pub name: String,
}

/// What is in the attachment `name`, whose decoded content is `data`. An attachment that
/// is no archive holds nothing.
pub fn inspect(name: &str, data: &[u8], limits: &Limits) -> Contents {
    let input = u64::try_from(data.len()).unwrap_or(u64::MAX);
    let by_ratio = limits.max_ratio.saturating_mul(input).max(RATIO_FLOOR);
    let mut walk = Walk {
        limits: *limits,
        expanded: 0,
        ceiling: by_ratio.min(limits.max_size),
        ratio_binds: by_ratio < limits.max_size,
        stopped: false,
        out: Contents::default(),
    };
    walk.visit(name, data, 1);
    walk.out
}

/// Below this many decompressed bytes no attachment is a bomb, whatever its ratio: a
/// small, very repetitive file (a log, a blank image) compresses far beyond any ratio an
/// honest archive of documents reaches, and costs nothing to open.
const RATIO_FLOOR: u64 = 1 << 20;

/// Most members read from one archive; more are reported as unscannable.
const MAX_MEMBERS: usize = 10_000;

/// The archive formats told apart by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Zip,
    Tar,
    Gzip,
    Bzip2,
    /// Listed by name (sevenz-rust2 reads the headers); members are not unpacked.
    SevenZ,
    /// Recognised, but no maintained crate in the vetted set lists it.
    Opaque(&'static str),
}

/// The format of `data`, or `None` for what is no archive we know.
fn format(data: &[u8]) -> Option<Format> {
    let at = |offset: usize, magic: &[u8]| data.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"Rar!\x1a\x07") {
        return Some(Format::Opaque("RAR"));
    }
    if at(0, b"7z\xbc\xaf\x27\x1c") {
        return Some(Format::SevenZ);
    }
    if at(0, b"MSCF\0\0\0\0") {
        return Some(Format::Opaque("CAB"));
    }
    if at(0, b"\x1f\x8b\x08") {
        return Some(Format::Gzip);
    }
    // "BZh", the block size, then the magic of a first block or of an empty stream.
    if at(0, b"BZh")
        && data.get(3).is_some_and(|b| (b'1'..=b'9').contains(b))
        && (at(4, b"\x31\x41\x59\x26\x53\x59") || at(4, b"\x17\x72\x45\x38\x50\x90"))
    {
        return Some(Format::Bzip2);
    }
    // POSIX and GNU tar both write "ustar" in the first header.
    if at(257, b"ustar") {
        return Some(Format::Tar);
    }
    // ISO 9660: the primary volume descriptor's "CD001" in sector 16 (or the next ones).
    if [0x8001, 0x8801, 0x9001].iter().any(|&o| at(o, b"CD001")) {
        return Some(Format::Opaque("ISO 9660 image"));
    }
    if at(0, b"PK\x03\x04") || has_end_of_central_directory(data) {
        return Some(Format::Zip);
    }
    None
}

/// Whether an end of central directory record (APPNOTE 4.3.16) is where one can be: in
/// the last 22 + 65535 bytes (its size plus the longest comment). This, not the start of
/// the data, is how readers find a ZIP archive, so a self-extractor or a polyglot (an
/// image or a PDF with an archive appended) is one.
fn has_end_of_central_directory(data: &[u8]) -> bool {
    let from = data.len().saturating_sub(22 + 65_535);
    data[from..].windows(4).any(|w| w == b"PK\x05\x06")
}

/// One attachment being opened, with what it has cost so far.
struct Walk {
    limits: Limits,
    /// Bytes decompressed so far, all levels together.
    expanded: u64,
    /// Most bytes that may be decompressed: the lower of the size and ratio limits.
    ceiling: u64,
    /// The ceiling is the ratio's (going past it is a bomb), not the size's.
    ratio_binds: bool,
    /// The ceiling was reached: names are still listed, but nothing more is expanded.
    stopped: bool,
    out: Contents,
}

impl Walk {
    /// Looks into `data`, found at `path`, as an archive of nesting level `level`.
    fn visit(&mut self, path: &str, data: &[u8], level: u32) {
        let Some(format) = format(data) else {
            return;
        };
        if level > self.limits.depth {
            self.unscannable(format!(
                "archive {path:?} is nested deeper than attachments.archive_depth ({})",
                self.limits.depth
            ));
            return;
        }
        match format {
            Format::Zip => self.zip(path, data, level),
            Format::Tar => self.tar(path, data, level),
            Format::Gzip => {
                let mut decoder = flate2::read::MultiGzDecoder::new(data);
                // gzip keeps the original file name (FNAME), which is what a recipient
                // gets when unpacking; without it, tools take the archive's own name.
                // The decoder parsed the first member's header on creation.
                let inner = decoder
                    .header()
                    .and_then(|h| h.filename())
                    .map(|n| String::from_utf8_lossy(n).into_owned());
                let content = self.expand(path, &mut decoder);
                self.compressed(path, content, inner, level);
            }
            Format::Bzip2 => {
                let content = self.expand(path, bzip2::read::MultiBzDecoder::new(data));
                self.compressed(path, content, None, level);
            }
            Format::SevenZ => self.seven_zip(path, data),
            Format::Opaque(kind) => self.unscannable(format!(
                "archive {path:?} is a {kind}, which cannot be looked into"
            )),
        }
    }

    fn zip(&mut self, path: &str, data: &[u8], level: u32) {
        // The zip crate finds the archive through its end of central directory record,
        // and where the central directory says it starts (any prepended data skipped).
        let mut archive = match zip::ZipArchive::new(Cursor::new(data)) {
            Ok(a) => a,
            Err(e) => {
                self.unscannable(format!("archive {path:?} is a damaged ZIP archive ({e})"));
                return;
            }
        };
        if archive.len() > MAX_MEMBERS {
            self.unscannable(format!(
                "archive {path:?} has {} members; only the first {MAX_MEMBERS} were read",
                archive.len()
            ));
        }
        let mut encrypted = false;
        for i in 0..archive.len().min(MAX_MEMBERS) {
            // The raw entry: its name and flags without decrypting or decompressing.
            let (name, is_dir, is_encrypted) = match archive.by_index_raw(i) {
                Ok(f) => (f.name().to_string(), f.is_dir(), f.encrypted()),
                Err(e) => {
                    self.unscannable(format!("archive {path:?} has a damaged member ({e})"));
                    continue;
                }
            };
            self.member(path, &name);
            if is_encrypted {
                encrypted = true;
                continue;
            }
            if is_dir || self.stopped {
                continue;
            }
            let content = match archive.by_index(i) {
                Ok(mut file) => self.expand_member(path, &name, &mut file),
                Err(e) => {
                    self.unscannable(format!(
                        "archive {path:?}: member {name:?} cannot be read ({e})"
                    ));
                    None
                }
            };
            if let Some(content) = content {
                self.visit(&format!("{path}/{name}"), &content, level + 1);
            }
        }
        if encrypted {
            self.out.encrypted.push(path.to_string());
        }
    }

    /// A 7z archive's member names, from its headers (which may be compressed: the
    /// decoder's memory is bounded). Members are not unpacked, so an archive inside a 7z
    /// is named but not opened; ClamAV, which unpacks 7z itself, still sees the content.
    fn seven_zip(&mut self, path: &str, data: &[u8]) {
        /// KiB a 7z header's buffers and decoder may take.
        const HEADER_MEMORY_KB: usize = 64 * 1024;
        let archive = match sevenz_rust2::Archive::read_with_memory_limit(
            &mut Cursor::new(data),
            &sevenz_rust2::Password::empty(),
            HEADER_MEMORY_KB,
        ) {
            Ok(a) => a,
            // Encrypted headers hide the names themselves. Without the crate's aes256
            // feature (nothing here decrypts) they show as the AES coder unsupported.
            Err(
                sevenz_rust2::Error::PasswordRequired | sevenz_rust2::Error::MaybeBadPassword(_),
            ) => {
                self.encrypted_names(path);
                return;
            }
            Err(sevenz_rust2::Error::UnsupportedCompressionMethod(method))
                if method.contains("AES") =>
            {
                self.encrypted_names(path);
                return;
            }
            Err(e) => {
                self.unscannable(format!("archive {path:?} is a damaged 7z archive ({e})"));
                return;
            }
        };
        if archive.files.len() > MAX_MEMBERS {
            self.unscannable(format!(
                "archive {path:?} has {} members; only the first {MAX_MEMBERS} were read",
                archive.files.len()
            ));
        }
        let mut encrypted = false;
        for (i, file) in archive.files.iter().take(MAX_MEMBERS).enumerate() {
            self.member(path, file.name());
            encrypted |= archive.is_file_encrypted(i);
        }
        if encrypted {
            self.out.encrypted.push(path.to_string());
        }
    }

    fn encrypted_names(&mut self, path: &str) {
        self.out.encrypted.push(path.to_string());
        self.unscannable(format!(
            "archive {path:?} is a 7z archive whose names are encrypted"
        ));
    }

    fn tar(&mut self, path: &str, data: &[u8], level: u32) {
        let mut archive = tar::Archive::new(data);
        let entries = match archive.entries() {
            Ok(e) => e,
            Err(e) => {
                self.unscannable(format!("archive {path:?} is a damaged tar archive ({e})"));
                return;
            }
        };
        for (n, entry) in entries.enumerate() {
            if n >= MAX_MEMBERS {
                self.unscannable(format!(
                    "archive {path:?} has more than {MAX_MEMBERS} members; only the first were read"
                ));
                break;
            }
            let mut entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.unscannable(format!("archive {path:?} is a damaged tar archive ({e})"));
                    break;
                }
            };
            // GNU long names and PAX paths are resolved by the tar crate.
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            self.member(path, &name);
            if !entry.header().entry_type().is_file() {
                continue;
            }
            // A tar member is a slice of bytes already counted (the tar is either the
            // attachment or the output of a decompressor): no new expansion.
            let mut content = Vec::new();
            if let Err(e) = entry.read_to_end(&mut content) {
                self.unscannable(format!(
                    "archive {path:?}: member {name:?} cannot be read ({e})"
                ));
                break;
            }
            self.visit(&format!("{path}/{name}"), &content, level + 1);
        }
    }

    /// What a gzip or bzip2 stream at `path` decompressed to: a tar is listed as the
    /// members of `path` itself (`x.tar.gz` is one archive to its users); anything else is
    /// the single member `inner`, or the archive's name without its compression suffix.
    fn compressed(
        &mut self,
        path: &str,
        content: Option<Vec<u8>>,
        inner: Option<String>,
        level: u32,
    ) {
        let inner = inner.unwrap_or_else(|| uncompressed_name(path));
        let Some(content) = content else {
            // Nothing was decompressed (the limits, or a damaged stream): still the name.
            self.member(path, &inner);
            return;
        };
        if format(&content) == Some(Format::Tar) {
            self.tar(path, &content, level);
        } else {
            self.member(path, &inner);
            self.visit(&format!("{path}/{inner}"), &content, level + 1);
        }
    }

    /// Reads a decompressor to its end, within the ceiling: `None` when it went past it
    /// (then nothing more is expanded for this attachment) or the stream is damaged.
    fn expand(&mut self, path: &str, reader: impl Read) -> Option<Vec<u8>> {
        self.expand_member(path, "", reader)
    }

    fn expand_member(&mut self, path: &str, member: &str, reader: impl Read) -> Option<Vec<u8>> {
        let what = if member.is_empty() {
            format!("archive {path:?}")
        } else {
            format!("archive {path:?}: member {member:?}")
        };
        if self.stopped {
            return None;
        }
        let room = self.ceiling.saturating_sub(self.expanded);
        let mut content = Vec::new();
        // One byte more than there is room for tells a stream that ends at the ceiling
        // from one that goes on. On an error, what was read is in `content` and counts.
        let read = reader
            .take(room.saturating_add(1))
            .read_to_end(&mut content);
        let got = u64::try_from(content.len()).unwrap_or(u64::MAX);
        self.expanded = self.expanded.saturating_add(got.min(room));
        if got > room {
            self.stopped = true;
            if self.ratio_binds {
                self.out.bomb.get_or_insert_with(|| {
                    format!(
                        "{what} expands beyond {} bytes, more than attachments.archive_max_ratio ({}) times the attachment",
                        self.ceiling, self.limits.max_ratio
                    )
                });
            } else {
                self.unscannable(format!(
                    "{what} expands beyond attachments.archive_max_size ({} bytes); the rest was not looked into",
                    self.limits.max_size
                ));
            }
            return None;
        }
        if let Err(e) = read {
            self.unscannable(format!("{what} cannot be decompressed ({e})"));
            return None;
        }
        Some(content)
    }

    fn member(&mut self, archive: &str, name: &str) {
        self.out.members.push(Member {
            archive: archive.to_string(),
            name: name.to_string(),
        });
    }

    fn unscannable(&mut self, why: String) {
        self.out.unscannable.push(why);
    }
}

/// The name a gzip or bzip2 file unpacks to when it does not say (as gunzip and bunzip2
/// name it): `x.tgz` is `x.tar`, `x.exe.gz` is `x.exe`.
fn uncompressed_name(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    let lower = name.to_ascii_lowercase();
    for (suffix, replacement) in [
        (".tgz", ".tar"),
        (".tbz2", ".tar"),
        (".tbz", ".tar"),
        (".gz", ""),
        (".bz2", ""),
    ] {
        if lower.ends_with(suffix) && name.is_char_boundary(name.len() - suffix.len()) {
            return format!("{}{replacement}", &name[..name.len() - suffix.len()]);
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const LIMITS: Limits = Limits {
        depth: 3,
        max_size: 100 << 20,
        max_ratio: 100,
    };

    /// A ZIP archive of `(name, content)` members, deflated; ZIP64 extra fields when
    /// `zip64`.
    fn zip_of(members: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(zip64);
        for (name, content) in members {
            w.start_file(*name, options).expect("starts a member");
            w.write_all(content).expect("writes a member");
        }
        w.finish().expect("finishes the archive").into_inner()
    }

    fn names(c: &Contents) -> Vec<String> {
        c.members
            .iter()
            .map(|m| format!("{}:{}", m.archive, m.name))
            .collect()
    }

    #[test]
    fn zip_members_are_listed_wherever_the_archive_starts() {
        let zip = zip_of(&[("docs/a.pdf", b"%PDF-1.4"), ("run.exe", b"MZ")], false);
        let want = vec!["x.zip:docs/a.pdf".to_string(), "x.zip:run.exe".to_string()];
        assert_eq!(names(&inspect("x.zip", &zip, &LIMITS)), want);
        // A self-extractor: an executable stub before the archive.
        let mut sfx = b"MZ".to_vec();
        sfx.extend_from_slice(&[0x90; 1024]);
        sfx.extend_from_slice(&zip);
        let found = inspect("x.zip", &sfx, &LIMITS);
        assert_eq!(names(&found), want);
        assert!(found.unscannable.is_empty(), "{:?}", found.unscannable);
        // ZIP64 extra fields.
        let zip64 = zip_of(&[("big.scr", b"data")], true);
        assert_eq!(names(&inspect("y.zip", &zip64, &LIMITS)), ["y.zip:big.scr"]);
        // Not an archive at all.
        assert_eq!(inspect("a.txt", b"hello", &LIMITS), Contents::default());
    }

    #[test]
    fn nested_archives_are_opened_to_the_depth_limit() {
        let level3 = zip_of(&[("run.exe", b"MZ")], false);
        let level2 = zip_of(&[("c.zip", &level3)], false);
        // Named as text: the content, not the name, says it is an archive.
        let level1 = zip_of(&[("b.txt", &level2)], false);
        let found = inspect("a.zip", &level1, &LIMITS);
        assert_eq!(
            names(&found),
            [
                "a.zip:b.txt",
                "a.zip/b.txt:c.zip",
                "a.zip/b.txt/c.zip:run.exe"
            ]
        );
        assert!(found.unscannable.is_empty());
        // One level more is not opened, and says so.
        let level0 = zip_of(&[("a.zip", &level1)], false);
        let found = inspect("top.zip", &level0, &LIMITS);
        assert!(!names(&found).iter().any(|n| n.ends_with("run.exe")));
        assert_eq!(
            found.unscannable,
            [
                r#"archive "top.zip/a.zip/b.txt/c.zip" is nested deeper than attachments.archive_depth (3)"#
            ]
        );
    }

    #[test]
    fn expansion_stops_at_the_limits() {
        let zeros = vec![0u8; 8 << 20];
        let bomb = zip_of(&[("zeros.bin", &zeros), ("after.exe", b"MZ")], false);
        let found = inspect("bomb.zip", &bomb, &LIMITS);
        assert!(
            found
                .bomb
                .as_deref()
                .is_some_and(|b| b.contains("zeros.bin")),
            "{found:?}"
        );
        // Names are still listed once expansion stopped.
        assert!(names(&found).contains(&"bomb.zip:after.exe".to_string()));
        // With a ratio that allows it, the size limit stops it instead.
        let small = Limits {
            max_size: 1 << 20,
            max_ratio: 100_000,
            ..LIMITS
        };
        let found = inspect("bomb.zip", &bomb, &small);
        assert_eq!(found.bomb, None);
        assert_eq!(found.unscannable.len(), 1, "{found:?}");
        // Under the floor nothing is a bomb, whatever the ratio.
        let fine = zip_of(&[("zeros.bin", &zeros[..512 << 10])], false);
        assert_eq!(inspect("ok.zip", &fine, &LIMITS).bomb, None);
    }

    #[test]
    fn encrypted_members_are_reported_with_their_names() {
        let mut zip = zip_of(&[("secret.pdf", b"%PDF")], false);
        // Set bit 0 (encrypted) of the general purpose flags, local and central.
        for sig in [&b"PK\x03\x04"[..], &b"PK\x01\x02"[..]] {
            let at = zip.windows(4).position(|w| w == sig).expect("header");
            let flag = if sig[2] == 3 { at + 6 } else { at + 8 };
            zip[flag] |= 1;
        }
        let found = inspect("s.zip", &zip, &LIMITS);
        assert_eq!(found.encrypted, ["s.zip"]);
        assert_eq!(names(&found), ["s.zip:secret.pdf"]);
    }

    #[test]
    fn tar_gzip_and_bzip2_are_listed() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "a/setup.scr", &b"MZ"[..])
            .expect("appends");
        let tar = tar.into_inner().expect("finishes");
        assert_eq!(
            names(&inspect("t.tar", &tar, &LIMITS)),
            ["t.tar:a/setup.scr"]
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).expect("compresses");
        let tgz = gz.finish().expect("finishes");
        assert_eq!(
            names(&inspect("t.tgz", &tgz, &LIMITS)),
            ["t.tgz:a/setup.scr"]
        );
        // A single compressed file: named after the archive (no FNAME here).
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"MZ").expect("compresses");
        let gz = gz.finish().expect("finishes");
        assert_eq!(
            names(&inspect("tool.exe.gz", &gz, &LIMITS)),
            ["tool.exe.gz:tool.exe"]
        );
        // With FNAME, the name gzip stored is the one unpacked, whatever the archive's.
        let mut gz = flate2::GzBuilder::new()
            .filename("invoice.scr")
            .write(Vec::new(), flate2::Compression::default());
        gz.write_all(b"MZ").expect("compresses");
        let gz = gz.finish().expect("finishes");
        assert_eq!(
            names(&inspect("invoice.pdf.gz", &gz, &LIMITS)),
            ["invoice.pdf.gz:invoice.scr"]
        );
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz.write_all(&tar).expect("compresses");
        let tbz = bz.finish().expect("finishes");
        assert_eq!(
            names(&inspect("t.tar.bz2", &tbz, &LIMITS)),
            ["t.tar.bz2:a/setup.scr"]
        );
    }

    #[test]
    fn seven_zip_members_are_named_and_encryption_is_seen() {
        let data = |name: &str| {
            std::fs::read(format!(
                "{}/../../tests/data/archives/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
        };
        // Made with py7zr: report.pdf and tools/setup.exe, LZMA2 with compressed headers.
        let found = inspect("photos.zip", &data("names.7z"), &LIMITS);
        assert_eq!(
            names(&found),
            ["photos.zip:report.pdf", "photos.zip:tools/setup.exe"]
        );
        assert!(
            found.unscannable.is_empty() && found.encrypted.is_empty(),
            "{found:?}"
        );
        // Encrypted content: the names are still there.
        let found = inspect("a.7z", &data("encrypted-content.7z"), &LIMITS);
        assert_eq!(names(&found), ["a.7z:invoice.exe"]);
        assert_eq!(found.encrypted, ["a.7z"]);
        // Encrypted headers: no names, encrypted and unscannable.
        let found = inspect("a.7z", &data("encrypted-names.7z"), &LIMITS);
        assert!(found.members.is_empty());
        assert_eq!(found.encrypted, ["a.7z"], "{found:?}");
        assert_eq!(found.unscannable.len(), 1, "{found:?}");
        // A damaged one says so.
        let mut broken = data("names.7z");
        broken.truncate(40);
        let found = inspect("a.7z", &broken, &LIMITS);
        assert!(found.unscannable[0].contains("damaged 7z"), "{found:?}");
    }

    #[test]
    fn unlistable_formats_are_recognised_by_magic() {
        let mut iso = vec![0u8; 0x8010];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        for (data, kind) in [
            (&b"Rar!\x1a\x07\x01\x00rest"[..], "RAR"),
            (&b"MSCF\0\0\0\0\x10\x00"[..], "CAB"),
            (&iso[..], "ISO 9660 image"),
        ] {
            // The name says PDF: the magic decides.
            let found = inspect("report.pdf", data, &LIMITS);
            assert_eq!(
                found.unscannable,
                [format!(
                    r#"archive "report.pdf" is a {kind}, which cannot be looked into"#
                )]
            );
        }
    }

    #[test]
    fn names_without_a_compression_suffix() {
        for (given, want) in [
            ("a.tgz", "a.tar"),
            ("A.TAR.GZ", "A.TAR"),
            ("x.exe.gz", "x.exe"),
            ("dir/y.bz2", "y"),
            ("plain", "plain"),
        ] {
            assert_eq!(uncompressed_name(given), want);
        }
    }
}
