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
        "usr/bin/mb-policy",
        "usr/bin/mb-dkim",
        "usr/sbin/mb-smtpd",
        "usr/sbin/mb-milter",
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
        "man1/mb-config.1",
        "man1/mb-config-set.1",
        "man1/mb-status.1",
        "man1/mb-queue-flush.1",
        "man1/mb-policy.1",
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
    let (smtp, submission, reinject, milter) = (
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
