//! The files a backup carries besides the database: where each kind lives (from the
//! configuration, with the database's overrides applied, as the daemons see it), taking
//! them with their mode and owner, and putting them back without ever replacing a
//! different file unasked.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mb_core::Config;

use crate::archive::{FileInfo, FileKind};

/// Where a file of `kind` named `name` belongs on this installation.
pub fn target(cfg: &Config, kind: FileKind, name: &str) -> PathBuf {
    match kind {
        FileKind::Dkim => cfg.path("dkim.key"),
        FileKind::WebTotp => cfg.path("paths.data_dir").join("web-totp.key"),
        FileKind::Cluster => cfg.path("paths.data_dir").join("cluster").join(name),
        FileKind::Quarantine => cfg.path("paths.spool_dir").join("quarantine").join(name),
    }
}

/// Why a file could not be taken or put back.
#[derive(Debug, thiserror::Error)]
#[error("{}: {cause}", path.display())]
pub struct FileError {
    pub path: PathBuf,
    pub cause: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |cause| FileError {
        path: path.to_path_buf(),
        cause,
    }
}

/// A file to take: its manifest entry and where it is.
pub fn describe(kind: FileKind, name: &str, path: &Path) -> Result<FileInfo, FileError> {
    let meta = fs::metadata(path).map_err(at(path))?;
    let user = nix::unistd::User::from_uid(meta.uid().into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let group = nix::unistd::Group::from_gid(meta.gid().into())
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_default();
    Ok(FileInfo {
        kind,
        name: name.to_string(),
        source: path.display().to_string(),
        mode: meta.mode() & 0o7777,
        size: meta.len(),
        user,
        group,
    })
}

/// Every regular file under `root`, as names relative to it, sorted; temporary files
/// of a write in progress (`*.tmp`) are left out.
pub fn walk(root: &Path) -> Result<Vec<String>, FileError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(at(&dir))? {
            let entry = entry.map_err(at(&dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(at(&path))?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() && path.extension().is_none_or(|e| e != "tmp") {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What restoring a file would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing there: write it.
    Write,
    /// The same content is there already (restoring where it was taken): leave it.
    Same,
    /// A different file is there: replaced only with `--force`.
    Differs,
}

/// Compares the archived content with what is at `path`.
pub fn plan(path: &Path, content: &[u8]) -> Result<Plan, FileError> {
    match fs::read(path) {
        Ok(existing) if existing == content => Ok(Plan::Same),
        Ok(_) => Ok(Plan::Differs),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Plan::Write),
        Err(e) => Err(at(path)(e)),
    }
}

/// Writes `content` to `path` with the archived mode (and, as root, owner), through a
/// temporary file renamed into place, so that a daemon never reads half a key.
pub fn put(path: &Path, info: &FileInfo, content: &[u8]) -> Result<(), FileError> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(at(dir))?;
    }
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.mb-backup-{}", std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content)?;
        // The umask does not apply to an explicit chmod: the archived mode is kept.
        f.set_permissions(fs::Permissions::from_mode(info.mode & 0o7777))?;
        chown(&f, info);
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(at(path))
}

/// As root, gives the file to the archived owner and group when this system has them
/// (the daemon's user reads its DKIM key through its group); otherwise keeps the
/// current user's.
fn chown(f: &fs::File, info: &FileInfo) {
    if !nix::unistd::Uid::effective().is_root() {
        return;
    }
    let uid = nix::unistd::User::from_name(&info.user)
        .ok()
        .flatten()
        .map(|u| u.uid);
    let gid = nix::unistd::Group::from_name(&info.group)
        .ok()
        .flatten()
        .map(|g| g.gid);
    if let Err(e) = nix::unistd::fchown(f, uid, gid) {
        eprintln!(
            "mb-backup: warning: cannot give a restored file to {}:{}: {e}",
            info.user, info.group
        );
    }
}

/// Reads a file for the archive: exactly the size the manifest announced, or an error
/// (a file that changed while the backup was written).
pub fn open(path: &Path, size: u64) -> Result<impl Read, FileError> {
    let f = fs::File::open(path).map_err(at(path))?;
    let now = f.metadata().map_err(at(path))?.len();
    if now != size {
        return Err(FileError {
            path: path.to_path_buf(),
            cause: io::Error::other(format!(
                "changed while the backup was written ({size} bytes, now {now}); run mb-backup again"
            )),
        });
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_keeps_the_mode_and_never_leaves_a_half_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/dkim/private.key");
        let info = FileInfo {
            kind: FileKind::Dkim,
            name: "private.key".into(),
            source: String::new(),
            mode: 0o640,
            size: 3,
            user: String::new(),
            group: String::new(),
        };
        assert_eq!(plan(&path, b"key").unwrap(), Plan::Write);
        put(&path, &info, b"key").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"key");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        assert_eq!(plan(&path, b"key").unwrap(), Plan::Same);
        assert_eq!(plan(&path, b"other").unwrap(), Plan::Differs);
        let names = walk(dir.path()).unwrap();
        assert_eq!(names, ["keys/dkim/private.key"]);
    }
}
