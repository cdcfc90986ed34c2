//! `cargo xtask deb`: the Debian package, built with dpkg-deb over the tree `install` lays
//! out (so the package holds exactly what `install` knows: every binary, unit, manual
//! page, completion and /etc file) plus what Debian asks of a package.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, run};

/// What `cargo xtask deb` was asked for.
pub struct Options {
    /// The Debian version; by default the workspace version with Debian revision 1.
    pub version: Option<String>,
    /// Package the debug build (faster to build; what the tests package).
    pub debug: bool,
    /// Use the binaries already built.
    pub no_build: bool,
    /// Where the .deb goes (default target/debian).
    pub out_dir: Option<PathBuf>,
}

/// Builds `mailborder_VERSION_ARCH.deb` and returns its path.
pub fn deb(opts: &Options) -> Result<PathBuf> {
    let version = opts
        .version
        .clone()
        .unwrap_or_else(|| format!("{}-1", env!("CARGO_PKG_VERSION")));
    check_version(&version)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| root().join("target/debian"));
    fs::create_dir_all(&out_dir)?;
    let staging = tempfile::Builder::new()
        .prefix("mailborder-deb-")
        .tempdir_in(&out_dir)?;
    let tree = staging.path().join("mailborder");
    crate::install(&tree, "/usr", opts.debug, opts.no_build)?;
    fs::remove_file(tree.join("usr/share/doc/mailborder/ARCHITECTURE.md"))?;

    // Debian wants stripped programs (the debug build shrinks from about 50 MB each),
    // compressed manual pages, a copyright file and a changelog.
    let mut programs = Vec::new();
    for dir in ["usr/sbin", "usr/bin"] {
        for entry in fs::read_dir(tree.join(dir))? {
            programs.push(entry?.path());
        }
    }
    programs.sort();
    run(Command::new("strip")
        .args([
            "--remove-section=.comment",
            "--remove-section=.note",
            "--strip-unneeded",
        ])
        .args(&programs))?;
    let man = tree.join("usr/share/man");
    for section in fs::read_dir(&man)? {
        let mut pages: Vec<PathBuf> = fs::read_dir(section?.path())?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        pages.sort();
        run(Command::new("gzip").arg("-9n").args(&pages))?;
    }
    let doc = tree.join("usr/share/doc/mailborder");
    let templates = root().join("packaging/debian");
    fs::copy(templates.join("copyright"), doc.join("copyright"))?;
    let maintainer = maintainer();
    let date = output(Command::new("date").arg("-R"))?;
    fs::write(
        doc.join("changelog.Debian"),
        format!(
            "mailborder ({version}) unstable; urgency=medium\n\n  * Built by `cargo xtask deb` from the Mailborder-rs workspace.\n\n -- {maintainer}  {date}\n"
        ),
    )?;
    run(Command::new("gzip")
        .arg("-9n")
        .arg(doc.join("changelog.Debian")))?;
    normalise_modes(&tree)?;

    let debian = tree.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    // Every file under /etc is the administrator's once installed: dpkg keeps their
    // edits on upgrade (and asks, or with --force-confold keeps them silently).
    let mut conffiles = files_under(&tree, &tree.join("etc"))?;
    conffiles.sort();
    let mut list = String::new();
    for f in &conffiles {
        list.push_str(&format!("/{f}\n"));
    }
    fs::write(debian.join("conffiles"), list)?;
    let mut units: Vec<String> = fs::read_dir(tree.join("usr/lib/systemd/system"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    // A template unit has no state of its own: its instances are handled by pattern.
    units.retain(|u| !u.contains("@."));
    units.sort();
    let units = units.join(" ");
    for script in ["postinst", "prerm", "postrm"] {
        let text = fs::read_to_string(templates.join(script))?.replace("@UNITS@", &units);
        let path = debian.join(script);
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    let shlibs = shlibs_depends(staging.path(), &programs)?;
    let control = fs::read_to_string(templates.join("control"))?
        .replace("@VERSION@", &version)
        .replace("@ARCH@", &arch)
        .replace("@MAINTAINER@", &maintainer)
        .replace("@SIZE@", &installed_size_kib(&tree)?.to_string())
        .replace("@SHLIBS@", &shlibs);
    fs::write(debian.join("control"), control)?;
    let mut sums = Command::new("md5sum");
    let mut payload: Vec<String> = files_under(&tree, &tree.join("usr"))?;
    payload.sort();
    sums.args(&payload).current_dir(&tree);
    fs::write(debian.join("md5sums"), output(&mut sums)? + "\n")?;

    // Debian file names carry the version without its epoch.
    let plain = version.split_once(':').map_or(version.as_str(), |(_, v)| v);
    let deb = out_dir.join(format!("mailborder_{plain}_{arch}.deb"));
    // xz takes minutes over the unoptimised debug programs (about 220 MB stripped), which
    // only tests package: they get fast gzip.
    let compression: &[&str] = if opts.debug {
        &["-Zgzip", "-z1"]
    } else {
        &["-Zxz", "-z6"]
    };
    run(Command::new("dpkg-deb")
        .arg("--root-owner-group")
        .args(compression)
        .arg("--build")
        .arg(&tree)
        .arg(&deb))?;
    writeln!(std::io::stdout(), "built {}", deb.display())?;
    Ok(deb)
}

/// A Debian version: `[epoch:]upstream[-revision]`, upstream starting with a digit.
fn check_version(v: &str) -> Result<()> {
    let upstream = v.split_once(':').map_or(v, |(_, u)| u);
    let ok = upstream.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+-~:".contains(c));
    if !ok {
        bail!("{v:?} is not a Debian version (for example 0.2.0-1 or 0.2.0~rc1-1)");
    }
    Ok(())
}

/// The maintainer field, from Debian's usual DEBFULLNAME and DEBEMAIL when set.
fn maintainer() -> String {
    let name = std::env::var("DEBFULLNAME").unwrap_or_else(|_| "Mailborder-rs maintainers".into());
    let mail = std::env::var("DEBEMAIL").unwrap_or_else(|_| "packages@mailborder.org".into());
    format!("{name} <{mail}>")
}

/// The library dependencies of the programs, as dpkg-shlibdeps computes them (it wants a
/// debian/control to read, which `dir` provides).
fn shlibs_depends(dir: &Path, programs: &[PathBuf]) -> Result<String> {
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(
        dir.join("debian/control"),
        "Source: mailborder\n\nPackage: mailborder\nArchitecture: any\n",
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .args(programs)
            .current_dir(dir),
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .with_context(|| format!("dpkg-shlibdeps printed no dependencies: {out}"))
}

/// Directories 0755, programs 0755, mailborder.toml 0640, everything else 0644, whatever
/// the umask was.
fn normalise_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            normalise_modes(&path)?;
        } else {
            let exe = path
                .parent()
                .is_some_and(|p| p.ends_with("usr/sbin") || p.ends_with("usr/bin"));
            // mailborder.toml may hold passwords: never world-readable, not even between
            // unpack and postinst (which hands it to group mailborder, 0640).
            let secret = path.ends_with("etc/mailborder/mailborder.toml");
            let mode = match (exe, secret) {
                (true, _) => 0o755,
                (false, true) => 0o640,
                (false, false) => 0o644,
            };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// Files under `dir`, relative to `tree`.
fn files_under(tree: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(files_under(tree, &path)?);
        } else {
            out.push(path.strip_prefix(tree)?.to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// Installed-Size: kibibytes, each file rounded up to a whole one, as dpkg-gencontrol.
fn installed_size_kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            1 + installed_size_kib(&entry.path())?
        } else {
            entry.metadata()?.len().div_ceil(1024)
        };
    }
    Ok(total)
}

/// Runs a command and returns its standard output, trimmed.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_checked_before_anything_is_built() {
        for good in ["0.1.0-1", "1:0.2.0~rc1-3", "0.1.0+git20261201-1"] {
            assert!(check_version(good).is_ok(), "{good}");
        }
        for bad in ["v0.1.0", "0.1 0", "", "0.1.0_1"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }
}
