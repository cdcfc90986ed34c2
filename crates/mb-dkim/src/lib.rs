//! The DKIM signing key (`dkim.key`) and the DNS record that publishes it, as
//! `opendkim-genkey` makes them: shared by the `mb-dkim` tool and mb-rpcd's `Dkim`
//! service (which mb-web's `/api/v1/dkim` calls), so both write the same file the same
//! way and word their refusals alike.
//!
//! Only RSA: mb-filter's signer (`mb_filter::dkim`) loads `dkim.key` as an RSA key and
//! signs rsa-sha256, so an Ed25519 key here would leave mail unsigned.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{KeyPair, PKCS_RSA_SHA256, PublicKeyData, RsaKeySize};

/// The key sizes `keygen` makes; 2048 is what DNS providers and receivers all accept.
pub const SIZES: [u32; 3] = [2048, 3072, 4096];

/// The default key size.
pub const DEFAULT_BITS: u32 = 2048;

/// The mode of a key file: the daemons' group reads it (mb-filter signs with it, and
/// mb-dkim run as root writes it), nobody else does.
pub const KEY_MODE: u32 = 0o640;

/// Why a key or record could not be made. The messages are the tool's and the API's.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("{0:?} is not a domain name")]
    Domain(String),
    #[error(
        "the selector {0:?} is not a DNS label (letters, digits, hyphens; dots between labels)"
    )]
    Selector(String),
    #[error("--bits must be 2048, 3072 or 4096")]
    Bits(u32),
    #[error("{} exists; mb-dkim record prints its DNS record, --force replaces it", .0.display())]
    Exists(PathBuf),
    #[error("cannot read {}: {source} (mb-dkim keygen makes a key)", path.display())]
    Missing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not an RSA private key: {source}", path.display())]
    NotAKey { path: PathBuf, source: rcgen::Error },
    #[error("cannot generate a key: {0}")]
    Generate(rcgen::Error),
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The TXT record that publishes a key for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `SELECTOR._domainkey.DOMAIN`, without the trailing dot.
    pub name: String,
    /// `v=DKIM1; k=rsa; p=...`
    pub value: String,
}

impl Record {
    /// The record for `key` under `selector` in `domain` (both already checked).
    pub fn new(selector: &str, domain: &str, key: &Key) -> Record {
        Record {
            name: format!("{selector}._domainkey.{domain}"),
            value: format!(
                "v=DKIM1; k=rsa; p={}",
                mb_core::message::base64_encode(&key.pair.subject_public_key_info())
            ),
        }
    }

    /// Zone-file form, as `opendkim-genkey` prints it: a TXT string holds at most 255
    /// bytes, so a 2048-bit key's value is split into several.
    pub fn zone_line(&self) -> String {
        let strings: Vec<String> = self
            .value
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!("{}. IN TXT ( {} )", self.name, strings.join(" "))
    }
}

/// An RSA signing key.
pub struct Key {
    pair: KeyPair,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private half.
        write!(f, "Key(rsa-{}, {})", self.bits(), self.fingerprint())
    }
}

impl Key {
    /// A new RSA key of `bits` (one of [`SIZES`]). Takes a second or so: call it off
    /// the async workers.
    pub fn generate(bits: u32) -> Result<Key, DkimError> {
        let size = match bits {
            2048 => RsaKeySize::_2048,
            3072 => RsaKeySize::_3072,
            4096 => RsaKeySize::_4096,
            other => return Err(DkimError::Bits(other)),
        };
        let pair =
            KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, size).map_err(DkimError::Generate)?;
        Ok(Key { pair })
    }

    /// The key in `path` (PKCS #8 or PKCS #1 PEM, as opendkim-genkey writes it).
    /// [`DkimError::Missing`] when there is no such file.
    pub fn read(path: &Path) -> Result<Key, DkimError> {
        let pem = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                DkimError::Missing {
                    path: path.to_path_buf(),
                    source,
                }
            } else {
                DkimError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        // With the algorithm named, an EC or Ed25519 key is refused rather than
        // published as `k=rsa`.
        let pair = KeyPair::from_pem_and_sign_algo(&pem, &PKCS_RSA_SHA256).map_err(|source| {
            DkimError::NotAKey {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(Key { pair })
    }

    /// The algorithm, as the record's `k=` names it.
    pub fn algorithm(&self) -> &'static str {
        "rsa"
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> u32 {
        modulus_bits(self.pair.public_key_raw()).unwrap_or(0)
    }

    /// `SHA256:` and the base64 SHA-256 of the public key (its SubjectPublicKeyInfo), for
    /// the audit trail: it names the key without revealing anything.
    pub fn fingerprint(&self) -> String {
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &self.pair.subject_public_key_info(),
        );
        format!(
            "SHA256:{}",
            mb_core::message::base64_encode(digest.as_ref()).trim_end_matches('=')
        )
    }

    /// Writes the key to `path` with mode [`KEY_MODE`] and the daemons' group (when that
    /// group exists), creating the directory. Without `force` an existing file is kept
    /// ([`DkimError::Exists`]); the check and the write are one step (a hard link),
    /// so two concurrent key generations cannot both win. Returns whether a key was
    /// replaced.
    pub fn write(&self, path: &Path, force: bool) -> Result<bool, DkimError> {
        if !force && path.exists() {
            return Err(DkimError::Exists(path.to_path_buf()));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(|source| DkimError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let write_err = |source| DkimError::Write {
            path: path.to_path_buf(),
            source,
        };
        let tmp = staging_name(path);
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(KEY_MODE)
            .open(&tmp)
            .and_then(|mut f| {
                // The umask may have taken bits away; the group must read the key.
                f.set_permissions(std::fs::Permissions::from_mode(KEY_MODE))?;
                give_to_group(&tmp)?;
                f.write_all(self.pair.serialize_pem().as_bytes())?;
                f.sync_all()
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        let existed = path.exists();
        let placed = if force {
            std::fs::rename(&tmp, path)
        } else {
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            linked
        };
        match placed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DkimError::Exists(path.to_path_buf()));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(write_err(e));
            }
        }
        // The rename is durable once the directory is.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
        Ok(force && existed)
    }
}

/// A domain as DNS names allow (letters, digits, hyphens, dots), lowercased.
pub fn check_domain(d: &str) -> Result<String, DkimError> {
    let d = d.trim().trim_end_matches('.');
    if is_dns_name(d, 253) {
        Ok(d.to_ascii_lowercase())
    } else {
        Err(DkimError::Domain(d.to_string()))
    }
}

/// A selector as a DNS name allows (`mb`, `2026.mb`).
pub fn check_selector(s: &str) -> Result<(), DkimError> {
    if is_dns_name(s, 63) {
        Ok(())
    } else {
        Err(DkimError::Selector(s.to_string()))
    }
}

fn is_dns_name(d: &str, max: usize) -> bool {
    !d.is_empty()
        && d.len() <= max
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `.NAME.PID.N.tmp` beside `path`: unique per process and call, so concurrent writers
/// never share a staging file.
fn staging_name(path: &Path) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Gives `path` to the daemons' group, when it exists: root's files would otherwise be
/// unreadable to mb-filter. Without the group (a development checkout) the file keeps
/// the writer's group.
fn give_to_group(path: &Path) -> std::io::Result<()> {
    match mb_runtime::uds::mailborder_gid() {
        Some(gid) => match nix::unistd::chown(path, None, Some(gid)) {
            // A user outside the group (a developer's own account) keeps its group: the
            // key is for daemons it runs itself.
            Err(nix::errno::Errno::EPERM) if !nix::unistd::Uid::effective().is_root() => Ok(()),
            other => other.map_err(std::io::Error::from),
        },
        None => Ok(()),
    }
}

/// The bit length of an RSA modulus from an `RSAPublicKey` in DER
/// (`SEQUENCE { INTEGER n, INTEGER e }`).
fn modulus_bits(der: &[u8]) -> Option<u32> {
    /// One DER element: (tag, contents, rest).
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (0x30, seq, _) = element(der)? else {
        return None;
    };
    let (0x02, n, _) = element(seq)? else {
        return None;
    };
    let start = n.iter().position(|b| *b != 0)?;
    let n = &n[start..];
    let bytes = u32::try_from(n.len()).ok()?;
    Some(bytes * 8 - n[0].leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_and_selectors_are_dns_names() {
        let check = |d: &str, ok: Option<&str>| {
            assert_eq!(check_domain(d).ok().as_deref(), ok, "{d:?}");
        };
        check("Example.ORG", Some("example.org"));
        check("example.org.", Some("example.org"));
        check("a-b.example", Some("a-b.example"));
        check("", None);
        check("-a.example", None);
        check("a..example", None);
        check("a b.example", None);
        check("a.example;rm", None);
        check(&format!("{}.example", "a".repeat(64)), None);
        assert!(check_selector("mb").is_ok());
        assert!(check_selector("2026.mb").is_ok());
        assert!(check_selector("m_b").is_err());
        assert!(check_selector("").is_err());
        assert!(matches!(Key::generate(1024), Err(DkimError::Bits(1024))));
    }

    #[test]
    fn a_key_is_written_once_with_its_mode_and_its_record_splits_for_zone_files() {
        let dir = std::env::temp_dir().join(format!("mb-dkim-test-{}", std::process::id()));
        let path = dir.join("keys/private.key");
        let key = Key::generate(2048).unwrap();
        assert_eq!(key.bits(), 2048);
        assert!(!key.write(&path, false).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, KEY_MODE);

        // Without force the existing key stays, with the tool's words.
        let other = Key::generate(2048).unwrap();
        let err = other.write(&path, false).unwrap_err();
        assert!(matches!(err, DkimError::Exists(_)));
        assert!(
            err.to_string()
                .ends_with("exists; mb-dkim record prints its DNS record, --force replaces it")
        );
        let read = Key::read(&path).unwrap();
        assert_eq!(read.fingerprint(), key.fingerprint());
        assert_ne!(read.fingerprint(), other.fingerprint());
        assert!(other.write(&path, true).unwrap());
        assert_eq!(Key::read(&path).unwrap().fingerprint(), other.fingerprint());
        // No staging file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["private.key"]);

        let r = Record::new("mb", "example.org", &other);
        assert_eq!(r.name, "mb._domainkey.example.org");
        assert!(r.value.starts_with("v=DKIM1; k=rsa; p=MII"), "{}", r.value);
        let line = r.zone_line();
        assert!(line.starts_with("mb._domainkey.example.org. IN TXT ( \"v=DKIM1; k=rsa; p="));
        // 2048 bits of key are about 400 bytes of base64: two strings, none over 255.
        let strings: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert_eq!(strings.len(), 2, "{line}");
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), r.value);

        // Not a key, and no file: each says so, the latter with what to do.
        std::fs::write(dir.join("junk.key"), "not a key").unwrap();
        assert!(matches!(
            Key::read(&dir.join("junk.key")),
            Err(DkimError::NotAKey { .. })
        ));
        let missing = Key::read(&dir.join("none.key")).unwrap_err();
        assert!(matches!(missing, DkimError::Missing { .. }));
        assert!(
            missing
                .to_string()
                .ends_with("(mb-dkim keygen makes a key)")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_modulus_size_is_read_from_the_der() {
        // SEQUENCE { INTEGER 0x00 0x80 .. (129 bytes: a 1024-bit modulus), INTEGER 3 }
        let mut n = vec![0x00, 0x80];
        n.extend([0u8; 127]);
        let mut seq = vec![0x02, 0x81, 129];
        seq.extend(&n);
        seq.extend([0x02, 0x01, 0x03]);
        let mut der = vec![0x30, 0x81, u8::try_from(seq.len()).unwrap()];
        der.extend(seq);
        assert_eq!(modulus_bits(&der), Some(1024));
        assert_eq!(modulus_bits(&der[..10]), None);
        assert_eq!(modulus_bits(&[0x31, 0x00]), None);
    }
}
