//! What a package would ship: the install layout, the systemd units, and `cargo xtask up`.

use std::path::Path;
use std::process::Command;

use mb_testkit::{bin, source_root, text};

/// Daemons whose units ship before their binaries exist (they arrive with their own
/// issues). Remove a name when its binary is built; the test checks the list is true.
const NOT_YET_BUILT: &[&str] = &[];

#[test]
fn install_lays_out_the_documented_tree_and_units_verify() {
    let systemd_analyze = mb_testkit::require("systemd-analyze", "systemd");
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new(bin("xtask"))
        .args([
            "install",
            "--debug",
            "--no-build",
            "--prefix",
            "/usr",
            "--destdir",
        ])
        .arg(dest.path())
        .output()
        .unwrap();
    let (code, stdout, err) = text(&out);
    assert_eq!(code, 0, "{stdout}{err}");
    for f in [
        "usr/sbin/mb-rpcd",
        "usr/bin/mb-config",
        "usr/bin/mb-status",
        "usr/bin/mb-user",
        "usr/bin/mb-ban",
        "usr/bin/mb-queue",
        "usr/bin/mb-quarantine",
        "usr/bin/mb-log",
        "usr/bin/mb-stats",
        "usr/bin/mb-policy",
        "usr/bin/mb-greylist",
        "usr/bin/mb-dkim",
        "usr/bin/mb-recipient",
        "usr/bin/mb-backup",
        "usr/sbin/mb-smtpd",
        "usr/sbin/mb-milter",
        "usr/sbin/mb-web",
        "usr/lib/systemd/system/mb-web.service",
        "usr/lib/systemd/system/mb-rpcd.service",
        "usr/lib/systemd/system/mb-smtpd.service",
        "usr/lib/systemd/system/mb-filter@.service",
        "usr/lib/systemd/system/mb-milter.service",
        "usr/lib/systemd/system/mb-cluster.service",
        "usr/lib/systemd/system/mailborder.target",
        "usr/lib/sysusers.d/mailborder.conf",
        "usr/lib/tmpfiles.d/mailborder.conf",
        "etc/mailborder/mailborder.toml",
        "etc/fail2ban/filter.d/mailborder-auth.conf",
        "etc/fail2ban/jail.d/mailborder.conf",
        "usr/share/doc/mailborder/README.md",
    ] {
        assert!(
            dest.path().join(f).exists(),
            "{f} missing from the install tree"
        );
    }
    // Every program has its manual page (daemons in section 8, tools in 1, one page per
    // subcommand) that groff formats without a warning, and completions for three shells.
    let share = dest.path().join("usr/share");
    let pages = [
        "man8/mb-rpcd.8",
        "man8/mb-smtpd.8",
        "man8/mb-filter.8",
        "man8/mb-milter.8",
        "man8/mb-cluster.8",
        "man8/mb-web.8",
        "man8/mb-web-account.8",
        "man1/mb-config.1",
        "man1/mb-config-set.1",
        "man1/mb-status.1",
        "man1/mb-queue-flush.1",
        "man1/mb-policy.1",
        "man1/mb-recipient-import.1",
        "man1/mb-backup-restore.1",
        "man1/mb-greylist.1",
        "man1/mb-greylist-flush.1",
        "man1/mb-stats.1",
    ];
    for page in pages {
        let path = share.join("man").join(page);
        assert!(path.exists(), "{page} missing");
        let groff = Command::new(mb_testkit::require("groff", "groff-base"))
            .args(["-man", "-ww", "-z", "-Tutf8"])
            .arg(&path)
            .output()
            .unwrap();
        let (code, _, warnings) = text(&groff);
        assert!(code == 0 && warnings.is_empty(), "{page}: {warnings}");
    }
    let rendered = Command::new(mb_testkit::require("man", "man-db"))
        .args(["-P", "cat", "-l"])
        .arg(share.join("man/man1/mb-config.1"))
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    let (_, page, _) = text(&rendered);
    assert!(
        page.contains("EXIT STATUS") && page.contains("mb-config-set"),
        "{page}"
    );
    for tool in ["mb-config", "mb-queue", "mb-smtpd"] {
        for f in [
            format!("bash-completion/completions/{tool}"),
            format!("zsh/vendor-completions/_{tool}"),
            format!("fish/vendor_completions.d/{tool}.fish"),
        ] {
            assert!(share.join(&f).exists(), "{f} missing");
        }
    }
    // The bash completion completes subcommands.
    let bash = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(mb-config s); COMP_CWORD=1; _mb__config mb-config s mb-config; echo \"${{COMPREPLY[@]}}\"",
            share.join("bash-completion/completions/mb-config").display()
        ))
        .output()
        .unwrap();
    let (code, words, err) = text(&bash);
    assert!(
        code == 0 && words.contains("set") && words.contains("show"),
        "{words}{err}"
    );
    // An upgrade keeps what the administrator edited under /etc and puts the new
    // version beside it; files nobody edited are left alone.
    let conf = dest.path().join("etc/mailborder/mailborder.toml");
    let edited = format!(
        "{}\n# edited by the admin\n",
        std::fs::read_to_string(&conf).unwrap()
    );
    std::fs::write(&conf, &edited).unwrap();
    let again = Command::new(bin("xtask"))
        .args([
            "install",
            "--debug",
            "--no-build",
            "--prefix",
            "/usr",
            "--destdir",
        ])
        .arg(dest.path())
        .output()
        .unwrap();
    let (code, stdout, err) = text(&again);
    assert_eq!(code, 0, "{stdout}{err}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    assert!(
        stdout.contains("mailborder.toml.new"),
        "the upgrade says where the new version went: {stdout}"
    );
    assert!(
        dest.path()
            .join("etc/mailborder/mailborder.toml.new")
            .exists()
    );
    assert!(
        !dest
            .path()
            .join("etc/fail2ban/jail.d/mailborder.conf.new")
            .exists(),
        "an unedited file needs no .new"
    );
    let mode = std::fs::metadata(dest.path().join("usr/sbin/mb-rpcd")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o755);
    // The configuration may hold passwords: never world-readable.
    let conf = std::fs::metadata(dest.path().join("etc/mailborder/mailborder.toml")).unwrap();
    assert_eq!(conf.permissions().mode() & 0o777, 0o640);

    // Verify the units as installed, with /usr/sbin pointing into the install tree so the
    // check that each ExecStart binary exists looks at what was laid out.
    let units = dest.path().join("usr/lib/systemd/system");
    let verify_dir = tempfile::tempdir().unwrap();
    let sbin = dest.path().join("usr/sbin");
    for entry in std::fs::read_dir(&units).unwrap() {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        assert!(text.contains("Type=notify") || entry.file_name() == "mailborder.target");
        // A daemon refusing its configuration (exit 64) is not restarted in a loop.
        assert!(
            !text.contains("Restart=on-failure") || text.contains("RestartPreventExitStatus=64"),
            "{:?} restarts a daemon whose configuration is broken",
            entry.file_name()
        );
        let name = entry
            .file_name()
            .into_string()
            .unwrap()
            .replace("@.service", "@1.service");
        std::fs::write(
            verify_dir.path().join(name),
            text.replace("/usr/sbin/", &format!("{}/", sbin.display())),
        )
        .unwrap();
    }
    for entry in std::fs::read_dir(verify_dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let unit = path.file_name().unwrap().to_string_lossy().into_owned();
        let out = Command::new(&systemd_analyze)
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let (code, stdout, err) = text(&out);
        let daemon = unit.split(['.', '@']).next().unwrap();
        if NOT_YET_BUILT.contains(&daemon) {
            assert!(
                !sbin.join(daemon).exists(),
                "{daemon} is built now: remove it from NOT_YET_BUILT"
            );
            // The only complaint allowed is the missing binary.
            let problems: Vec<&str> = err
                .lines()
                .filter(|l| !l.contains("is not executable: No such file or directory"))
                .collect();
            assert!(problems.is_empty(), "{unit}: {problems:?}");
            assert!(
                err.contains(&format!("{}/{daemon}", sbin.display())),
                "{unit}: {err}"
            );
        } else {
            assert_eq!(code, 0, "{unit} does not verify: {stdout}{err}");
            assert!(err.trim().is_empty(), "{unit}: {err}");
        }
    }
    let rpcd = std::fs::read_to_string(units.join("mb-rpcd.service")).unwrap();
    for line in [
        "User=mailborder",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "RuntimeDirectory=mailborder",
    ] {
        assert!(rpcd.contains(line), "mb-rpcd.service lacks {line:?}");
    }
    let smtpd = std::fs::read_to_string(units.join("mb-smtpd.service")).unwrap();
    assert!(smtpd.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"));
    let filter = std::fs::read_to_string(units.join("mb-filter@.service")).unwrap();
    assert!(filter.contains("--instance %i"));
}

#[test]
fn xtask_up_runs_the_suite_and_down_stops_it() {
    let dev = tempfile::tempdir().unwrap();
    let (smtp, submission, reinject, milter, https) = (
        mb_testkit::free_port(),
        mb_testkit::free_port(),
        mb_testkit::free_port(),
        mb_testkit::free_port(),
        mb_testkit::free_port(),
    );
    let xtask = |args: &[&str]| {
        let out = Command::new(bin("xtask"))
            .args(args)
            .env("MB_DEV_DIR", dev.path())
            .env("MB_DEV_SMTP_PORT", smtp.to_string())
            .env("MB_DEV_SUBMISSION_PORT", submission.to_string())
            .env("MB_DEV_REINJECT_PORT", reinject.to_string())
            .env("MB_DEV_MILTER_PORT", milter.to_string())
            .env("MB_DEV_HTTPS_PORT", https.to_string())
            .current_dir(source_root())
            .output()
            .unwrap();
        text(&out)
    };
    let (code, out, err) = xtask(&["up", "--detach", "--no-build"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("mb-rpcd") && out.contains("mb-status --config"),
        "{out}"
    );
    let config = dev.path().join("mailborder.toml");
    assert!(Path::new(&config).exists());
    // mb-web on HTTPS, with a first admin account made through its socket.
    assert!(
        out.contains(&format!("https://127.0.0.1:{https}/")),
        "{out}"
    );
    assert!(out.contains("web login      admin / "), "{out}");
    let (code, accounts, err) = text(
        &Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&config)
            .args(["account", "list"])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{accounts}{err}");
    assert!(accounts.contains("admin"), "{accounts}");
    // Every command `up` suggests works as printed, from any directory: the status and
    // config tools, a test message with swaks, and the queue that now holds it.
    let suggested: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let cmd = l.find('/').filter(|_| !l.starts_with("configuration"))?;
            let rest = &l[cmd..];
            (rest.contains(" --config ")).then(|| rest.split("   (").next().unwrap_or(rest))
        })
        .chain(
            out.lines()
                .filter_map(|l| l.trim_start().strip_prefix("send mail")),
        )
        .map(str::trim)
        .collect();
    assert!(suggested.len() >= 4, "{out}");
    for cmd in suggested {
        let run = Command::new("sh")
            .args(["-c", cmd])
            .current_dir("/")
            .output()
            .unwrap();
        let (code, sout, serr) = text(&run);
        assert_eq!(code, 0, "`{cmd}` as printed by up:\n{sout}{serr}");
    }
    let status = Command::new(bin("mb-status"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let (code, sout, serr) = text(&status);
    assert_eq!(code, 0, "{sout}{serr}");
    let (code, _, err) = xtask(&["up", "--detach", "--no-build"]);
    assert_ne!(code, 0);
    assert!(err.contains("already running"), "{err}");
    let (code, out, err) = xtask(&["down"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("stopped mb-smtpd") && out.contains("stopped mb-rpcd"),
        "{out}"
    );
    let status = Command::new(bin("mb-status"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
}

/// Removes what the package test installed, even when an assertion failed half-way, and
/// the policy-rc.d it put in place (only if it was the test's).
struct DebCleanup {
    policy_rc_d: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl DebCleanup {
    fn new() -> DebCleanup {
        // Debian's invoke-rc.d and deb-systemd-invoke ask policy-rc.d before starting
        // anything: 101 is "action forbidden", so no maintainer script can start a service.
        let policy_rc_d = !Path::new(POLICY_RC_D).exists();
        if policy_rc_d {
            std::fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        DebCleanup { policy_rc_d }
    }
}

impl Drop for DebCleanup {
    fn drop(&mut self) {
        if deb_installed().is_some() {
            let _ = dpkg(&["--purge", "mailborder"]);
        }
        if self.policy_rc_d {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

/// dpkg's status of the mailborder package ("installed", "config-files"), if known.
fn deb_installed() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "mailborder"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !status.is_empty() && status != "not-installed").then_some(status)
}

/// Runs dpkg without a terminal (it must never ask). While another apt or dpkg holds the
/// lock (a test peer being installed), it waits for it, up to five minutes.
fn dpkg(args: &[&str]) -> (i32, String, String) {
    let started = std::time::Instant::now();
    loop {
        let out = Command::new("dpkg")
            .args(["--force-confold"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let (code, o, e) = text(&out);
        let locked = code != 0 && e.contains("lock") && e.contains("another process");
        if !locked || started.elapsed() > std::time::Duration::from_secs(300) {
            return (code, o, e);
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Processes running a program from /usr/sbin or /usr/bin named mb-* (the package's, not
/// the tests' copies under target/).
fn packaged_processes() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path().join("exe")).ok())
        .map(|exe| exe.display().to_string())
        .filter(|exe| exe.starts_with("/usr/sbin/mb-") || exe.starts_with("/usr/bin/mb-"))
        .collect()
}

#[test]
fn deb_installs_upgrades_keeps_conffile_edits_and_purges() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the package test installs a .deb: run the suite as root (sudo cargo xtask test)"
    );
    mb_testkit::require("dpkg-deb", "dpkg");
    mb_testkit::require("dpkg-shlibdeps", "dpkg-dev");
    let lintian = mb_testkit::require("lintian", "lintian");
    // Two runs of this test on one machine (two test processes) would install and purge
    // the same package under each other: the second waits for the first.
    let lock_file = std::fs::File::create("/run/lock/mailborder-deb-test.lock")
        .or_else(|_| std::fs::File::create("/tmp/mailborder-deb-test.lock"))
        .unwrap();
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    assert_eq!(
        deb_installed(),
        None,
        "a mailborder package is installed on this machine; the test would replace it: \
         remove it first (dpkg --purge mailborder)"
    );
    let _cleanup = DebCleanup::new();
    let out_dir = tempfile::tempdir().unwrap();
    let build = |version: Option<&str>| {
        let mut cmd = Command::new(bin("xtask"));
        cmd.args(["deb", "--debug", "--no-build", "--out-dir"])
            .arg(out_dir.path());
        if let Some(v) = version {
            cmd.args(["--version", v]);
        }
        let (code, stdout, err) = text(&cmd.output().unwrap());
        assert_eq!(code, 0, "{stdout}{err}");
        stdout
    };
    let version = env!("CARGO_PKG_VERSION");
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let started = std::time::Instant::now();
    let stdout = build(None);
    eprintln!("xtask deb (debug build): {:?}", started.elapsed());
    let v1 = out_dir
        .path()
        .join(format!("mailborder_{version}-1_{arch}.deb"));
    assert!(stdout.contains(&v1.display().to_string()), "{stdout}");
    assert!(v1.exists());

    // What the package holds and declares.
    let (_, contents, _) = text(
        &Command::new("dpkg-deb")
            .arg("--contents")
            .arg(&v1)
            .output()
            .unwrap(),
    );
    for f in [
        "./usr/sbin/mb-smtpd",
        "./usr/sbin/mb-rpcd",
        "./usr/bin/mb-config",
        "./usr/lib/systemd/system/mailborder.target",
        "./usr/lib/systemd/system/mb-filter@.service",
        "./usr/lib/sysusers.d/mailborder.conf",
        "./usr/lib/tmpfiles.d/mailborder.conf",
        "./usr/share/man/man8/mb-smtpd.8.gz",
        "./usr/share/man/man1/mb-config.1.gz",
        "./usr/share/bash-completion/completions/mb-config",
        "./usr/share/doc/mailborder/copyright",
        "./usr/share/doc/mailborder/changelog.Debian.gz",
        "./etc/mailborder/mailborder.toml",
        "./etc/fail2ban/jail.d/mailborder.conf",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(f)),
            "{f} missing from the package:\n{contents}"
        );
    }
    let foreign: Vec<&str> = contents
        .lines()
        .filter(|l| !l.contains(" root/root "))
        .collect();
    assert!(foreign.is_empty(), "not owned by root: {foreign:#?}");
    assert!(
        contents.lines().any(
            |l| l.starts_with("-rw-r----- ") && l.ends_with("./etc/mailborder/mailborder.toml")
        ),
        "mailborder.toml is shipped 0640:\n{contents}"
    );
    let (_, conffiles, _) = text(
        &Command::new("dpkg-deb")
            .args(["--info"])
            .arg(&v1)
            .arg("conffiles")
            .output()
            .unwrap(),
    );
    for f in [
        "/etc/mailborder/mailborder.toml",
        "/etc/fail2ban/jail.d/mailborder.conf",
        "/etc/fail2ban/filter.d/mailborder-auth.conf",
    ] {
        assert!(conffiles.lines().any(|l| l == f), "{f}: {conffiles}");
    }

    // lintian: no errors (its warnings are printed for the record).
    let (code, report, lintian_err) = text(
        &Command::new(&lintian)
            .arg("--no-tag-display-limit")
            .arg(&v1)
            .output()
            .unwrap(),
    );
    eprintln!("lintian:\n{report}");
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(
        errors.is_empty(),
        "lintian errors: {errors:#?}\n{lintian_err}"
    );
    // lintian exits 0 when it found no error (and 1 when it could not check the package).
    assert_eq!(code, 0, "{report}{lintian_err}");

    // The upgrade: a higher version whose shipped mailborder.toml and jail differ from the
    // first (as a new release's would), repacked from what `deb --version` built.
    build(Some(&format!("{version}-2")));
    let v2 = out_dir
        .path()
        .join(format!("mailborder_{version}-2_{arch}.deb"));
    let unpacked = out_dir.path().join("v2");
    let (code, o, e) = text(
        &Command::new("dpkg-deb")
            .arg("--raw-extract")
            .arg(&v2)
            .arg(&unpacked)
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{o}{e}");
    for f in [
        "etc/mailborder/mailborder.toml",
        "etc/fail2ban/jail.d/mailborder.conf",
    ] {
        let path = unpacked.join(f);
        let mut shipped = std::fs::read_to_string(&path).unwrap();
        shipped.push_str("# changed in the next release\n");
        std::fs::write(&path, shipped).unwrap();
    }
    let (code, o, e) = text(
        &Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zgzip", "-z1", "--build"])
            .arg(&unpacked)
            .arg(&v2)
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{o}{e}");

    // Install: the account and the directories exist, nothing runs, nothing is enabled.
    let (code, o, e) = dpkg(&["--install", &v1.display().to_string()]);
    assert_eq!(code, 0, "dpkg --install:\n{o}{e}");
    assert_eq!(deb_installed().as_deref(), Some("installed"));
    use nix::unistd::{Group, User};
    let user = User::from_name("mailborder")
        .unwrap()
        .expect("the mailborder user");
    assert!(Group::from_name("mailborder").unwrap().is_some());
    use std::os::unix::fs::MetadataExt;
    for dir in [
        "/var/lib/mailborder",
        "/var/spool/mailborder",
        "/var/spool/mailborder/segments",
        "/var/log/mailborder",
    ] {
        let meta = std::fs::metadata(dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!(meta.uid(), user.uid.as_raw(), "{dir} belongs to mailborder");
        assert_eq!(meta.mode() & 0o777, 0o750, "{dir}");
    }
    assert_eq!(
        packaged_processes(),
        Vec::<String>::new(),
        "a daemon started"
    );
    for link in [
        "/etc/systemd/system/multi-user.target.wants/mailborder.target",
        "/etc/systemd/system/mailborder.target.wants/mb-smtpd.service",
    ] {
        assert!(
            !Path::new(link).exists(),
            "{link}: the package enabled a unit"
        );
    }
    let mode = std::fs::metadata("/usr/sbin/mb-smtpd").unwrap().mode();
    assert_eq!(mode & 0o777, 0o755);
    // The configuration may hold passwords: root:mailborder 0640, so the daemons (group
    // mailborder) read it and nobody else does; the same after the upgrade below.
    let group = Group::from_name("mailborder").unwrap().unwrap();
    let conf_mode = || {
        let meta = std::fs::metadata("/etc/mailborder/mailborder.toml").unwrap();
        (meta.uid(), meta.gid(), meta.mode() & 0o777)
    };
    assert_eq!(conf_mode(), (0, group.gid.as_raw(), 0o640));
    // The jail ships disabled, as Debian's fail2ban jails do.
    let jail = std::fs::read_to_string("/etc/fail2ban/jail.d/mailborder.conf").unwrap();
    assert!(jail.contains("\nenabled = false\n"), "{jail}");
    assert!(!jail.contains("\nenabled = true"), "{jail}");
    // The tests run their own builds: nothing the package put on PATH may shadow them.
    for program in ["mb-config", "mb-smtpd", "mb-rpcd"] {
        let path = bin(program);
        assert!(
            path.is_absolute() && !path.starts_with("/usr"),
            "{}",
            path.display()
        );
    }

    // The administrator edits the configuration; the upgrade keeps the edit, puts the new
    // release's version beside it, and replaces the files nobody edited.
    let conf = Path::new("/etc/mailborder/mailborder.toml");
    let edited = std::fs::read_to_string(conf).unwrap().replacen(
        "[smtp]\n",
        "[smtp]\nhostname = \"mx.edited.test\"\n",
        1,
    );
    assert!(edited.contains("mx.edited.test"), "no [smtp] table to edit");
    std::fs::write(conf, &edited).unwrap();
    let (code, o, e) = dpkg(&["--install", &v2.display().to_string()]);
    assert_eq!(code, 0, "dpkg --install (upgrade):\n{o}{e}");
    let (_, shown, _) = text(
        &Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", "mailborder"])
            .output()
            .unwrap(),
    );
    assert_eq!(shown, format!("{version}-2"));
    assert_eq!(std::fs::read_to_string(conf).unwrap(), edited);
    assert_eq!(conf_mode(), (0, group.gid.as_raw(), 0o640));
    assert!(
        std::fs::read_to_string("/etc/mailborder/mailborder.toml.dpkg-dist")
            .unwrap()
            .contains("# changed in the next release"),
        "the new release's file goes beside the edited one"
    );
    assert!(
        std::fs::read_to_string("/etc/fail2ban/jail.d/mailborder.conf")
            .unwrap()
            .contains("# changed in the next release"),
        "an unedited conffile is replaced"
    );
    assert_eq!(
        packaged_processes(),
        Vec::<String>::new(),
        "a daemon started"
    );

    // The installed tools accept the installed, edited configuration.
    let out = Command::new("/usr/bin/mb-config")
        .args(["validate", "/etc/mailborder/mailborder.toml"])
        .output()
        .unwrap();
    let (code, o, e) = text(&out);
    assert_eq!(code, 0, "mb-config validate:\n{o}{e}");

    // Remove keeps the configuration and the data; purge takes both, and the account stays.
    std::fs::write(
        "/var/spool/mailborder/segments/queued-mail",
        "a queued message",
    )
    .unwrap();
    let (code, o, e) = dpkg(&["--remove", "mailborder"]);
    assert_eq!(code, 0, "dpkg --remove:\n{o}{e}");
    assert_eq!(deb_installed().as_deref(), Some("config-files"));
    assert!(!Path::new("/usr/sbin/mb-smtpd").exists());
    assert!(!Path::new("/usr/bin/mb-config").exists());
    assert_eq!(std::fs::read_to_string(conf).unwrap(), edited);
    assert!(Path::new("/var/spool/mailborder/segments/queued-mail").exists());
    let (code, o, e) = dpkg(&["--purge", "mailborder"]);
    assert_eq!(code, 0, "dpkg --purge:\n{o}{e}");
    assert_eq!(deb_installed(), None);
    for gone in [
        "/etc/mailborder",
        "/etc/fail2ban/jail.d/mailborder.conf",
        "/var/lib/mailborder",
        "/var/spool/mailborder",
        "/var/log/mailborder",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} survived the purge");
    }
    assert!(User::from_name("mailborder").unwrap().is_some());
    let (_, overrides, _) = text(
        &Command::new("dpkg-statoverride")
            .args(["--list", "/etc/mailborder/mailborder.toml"])
            .output()
            .unwrap(),
    );
    assert_eq!(overrides, "", "the purge leaves no statoverride behind");
}
