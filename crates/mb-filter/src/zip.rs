//! File names inside ZIP archives (PKWARE APPNOTE 4.3.12/4.3.16), read from the central
//! directory without decompressing anything, so blocked types cannot hide in an archive.
//! Entries are bounded; a malformed archive yields what could be read.

/// What an archive says about its entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub names: Vec<String>,
    /// Some entry is encrypted (general purpose flag bit 0).
    pub encrypted: bool,
}

/// Most entries read from one archive.
const MAX_ENTRIES: usize = 10_000;

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    b.get(at..at + 2)
        .map(|s| usize::from(u16::from_le_bytes([s[0], s[1]])))
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    b.get(at..at + 4)
        .and_then(|s| usize::try_from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])).ok())
}

/// Whether the data starts like a ZIP archive.
pub fn is_zip(data: &[u8]) -> bool {
    data.starts_with(b"PK\x03\x04") || data.starts_with(b"PK\x05\x06")
}

/// The entry names of a ZIP archive, or `None` when it is not one.
pub fn list(data: &[u8]) -> Option<Listing> {
    // The end of central directory record is in the last 22 + 65535 bytes.
    let from = data.len().saturating_sub(22 + 65_535);
    let eocd = (from..=data.len().saturating_sub(22))
        .rev()
        .find(|&i| data.get(i..i + 4) == Some(b"PK\x05\x06"))?;
    let count = u16_at(data, eocd + 10)?;
    let mut at = u32_at(data, eocd + 16)?;
    let mut out = Listing::default();
    for _ in 0..count.min(MAX_ENTRIES) {
        if data.get(at..at + 4) != Some(b"PK\x01\x02") {
            break;
        }
        let flags = u16_at(data, at + 8)?;
        let name_len = u16_at(data, at + 28)?;
        let extra_len = u16_at(data, at + 30)?;
        let comment_len = u16_at(data, at + 32)?;
        let name = data.get(at + 46..at + 46 + name_len)?;
        out.encrypted |= flags & 1 == 1;
        out.names.push(String::from_utf8_lossy(name).into_owned());
        at += 46 + name_len + extra_len + comment_len;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored (uncompressed) archive with the given entries, as `zip -0` writes it.
    fn archive(entries: &[(&str, bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, encrypted) in entries {
            let offset = out.len() as u32;
            let flags: u16 = u16::from(*encrypted);
            out.extend_from_slice(b"PK\x03\x04\x14\x00");
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&[0; 18]);
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(name.as_bytes());
            central.extend_from_slice(b"PK\x01\x02\x14\x00\x14\x00");
            central.extend_from_slice(&flags.to_le_bytes());
            central.extend_from_slice(&[0; 18]);
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00");
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    #[test]
    fn names_and_encryption_are_read_and_nonsense_is_survived() {
        let zip = archive(&[("docs/readme.txt", false), ("invoice.pdf.exe", true)]);
        assert!(is_zip(&zip));
        assert_eq!(
            list(&zip),
            Some(Listing {
                names: vec!["docs/readme.txt".into(), "invoice.pdf.exe".into()],
                encrypted: true
            })
        );
        assert_eq!(list(b"not a zip"), None);
        // Truncated in the middle of the central directory: what was read is kept.
        let mut cut = zip.clone();
        let eocd = cut.len() - 22;
        cut.drain(eocd - 10..eocd);
        assert!(list(&cut).is_none_or(|l| l.names.len() <= 2));
        // A count that lies.
        let mut lying = zip;
        let n = lying.len();
        lying[n - 12] = 0xff;
        lying[n - 11] = 0xff;
        assert_eq!(list(&lying).map(|l| l.names.len()), Some(2));
    }
}
