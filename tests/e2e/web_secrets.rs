//! mb-web holds no database credentials (issue 16): mb-rpcd masks the secrets mb-web
//! does not read for mb-web's user, as it does for TCP callers, and `mb-web
//! config-export` writes the configuration mb-web runs on without them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

use mb_testkit::{Gateway, text};
use nix::unistd::{Group, User};

const MASK: &str = "********";

/// The `mb-web` system user, member of the mailborder group, as
/// packaging/debian/postinst makes it.
pub(crate) fn ensure_web_account() -> (u32, u32) {
    mb_testkit::ensure_mailborder_account();
    // useradd fails while another process (a test, the package's postinst) holds the
    // password file's lock: try a few times.
    for _ in 0..10 {
        if User::from_name("mb-web").ok().flatten().is_some() {
            break;
        }
        let _ = Command::new(mb_testkit::require("useradd", "passwd"))
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
            .args(["--groups", "mailborder", "mb-web"])
            .status();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Another test may have been creating it at the same time: check the outcome.
    let web = User::from_name("mb-web")
        .ok()
        .flatten()
        .expect("cannot create the mb-web user");
    let group = Group::from_name("mailborder")
        .ok()
        .flatten()
        .expect("mailborder group");
    (web.uid.as_raw(), group.gid.as_raw())
}

#[test]
fn mb_web_gets_no_secret_it_does_not_read() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test switches to mb-web's uid: run it as root (CI does)"
    );
    let (web_uid, mailborder_gid) = ensure_web_account();
    let mut gw = Gateway::new(
        "[ldap]\nbind_password = \"ldap-hunter2\"\n\n[rspamd]\ncontroller_password = \"rspamd-pw-for-web\"\n",
    );
    // A database URL whose value is the secret (SQLite has no password: the point is
    // that the value never reaches mb-web).
    let db_url = format!("sqlite://{}/data/pw-hunter2.db", gw.dir.path().display());
    let mut config = std::fs::read_to_string(&gw.config).unwrap();
    config.push_str(&format!("\n[database]\nurl = \"{db_url}\"\n"));
    std::fs::write(&gw.config, config).unwrap();
    gw.start().unwrap();
    // Let other users reach the socket directory and read the test's config, so only
    // mb-rpcd's answer decides what they see.
    for p in [gw.dir.path().to_path_buf(), gw.path("run")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&gw.config, std::fs::Permissions::from_mode(0o644)).unwrap();

    let config_as = |uid: u32, args: &[&str]| {
        text(
            &Command::new(mb_testkit::bin("mb-config"))
                .arg("--config")
                .arg(&gw.config)
                .args(args)
                .uid(uid)
                .gid(mailborder_gid)
                .current_dir("/")
                .output()
                .unwrap(),
        )
    };
    let get_as = |uid: u32, key: &str| config_as(uid, &["get", key]);
    let root_get = |key: &str| text(&gw.tool("mb-config", &["get", key]));

    // Root is given the real values ...
    assert_eq!(
        root_get("database.url"),
        (0, format!("{db_url}\n"), String::new())
    );
    assert_eq!(root_get("ldap.bind_password").1, "ldap-hunter2\n");
    // ... and so is another member of the mailborder group: the mask is mb-web's alone.
    let (code, out, err) = get_as(65534, "database.url");
    assert_eq!((code, out), (0, format!("{db_url}\n")), "{err}");

    // mb-web's user gets the mask for the secrets it does not read ...
    for key in ["database.url", "ldap.bind_password"] {
        let (code, out, err) = get_as(web_uid, key);
        assert_eq!(
            (code, out.as_str()),
            (0, format!("{MASK}\n").as_str()),
            "{key}: {err}"
        );
    }
    // Listings too, even when it asks for the secrets to be shown.
    let (code, out, err) = config_as(web_uid, &["show", "--show-secrets"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("hunter2") && out.contains("rspamd-pw-for-web"),
        "{out}"
    );
    // ... and the one it does read (its readers include mb-web in the registry).
    assert_eq!(
        get_as(web_uid, "rspamd.controller_password").1,
        "rspamd-pw-for-web\n"
    );

    // The copy mb-web.service makes for it: no secret but its own, handed to mb-web.
    let copy = gw.path("run/mb-web.toml");
    let out = Command::new(mb_testkit::bin("mb-web"))
        .arg("--config")
        .arg(&gw.config)
        .args(["config-export", "--to"])
        .arg(&copy)
        .output()
        .unwrap();
    let (code, _, err) = text(&out);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("database.url") && err.contains("ldap.bind_password"),
        "{err}"
    );
    let meta = std::fs::metadata(&copy).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (web_uid, 0o400));
    let exported = Command::new("cat")
        .arg(&copy)
        .uid(web_uid)
        .gid(mailborder_gid)
        .output()
        .unwrap();
    let (code, exported, err) = text(&exported);
    assert_eq!(code, 0, "mb-web cannot read its copy: {err}");
    for secret in ["hunter2", "ldap-hunter2"] {
        assert!(!exported.contains(secret), "{secret} in\n{exported}");
    }
    assert!(exported.contains("rspamd-pw-for-web"), "{exported}");
    // What the daemons need to find each other is all still there.
    let cfg = mb_core::Config::load_file(&copy).unwrap();
    assert_eq!(cfg.socket("mb-rpcd"), gw.socket());
    assert_eq!(cfg.text("database.url"), "");

    // An unreadable configuration is refused with EX_NOINPUT and writes nothing.
    let missing = gw.path("missing.toml");
    let out = Command::new(mb_testkit::bin("mb-web"))
        .arg("--config")
        .arg(&missing)
        .args(["config-export", "--to"])
        .arg(gw.path("run/none.toml"))
        .output()
        .unwrap();
    let (code, _, err) = text(&out);
    assert_eq!(code, 66, "{err}");
    assert!(
        err.contains("cannot read") && err.contains("missing.toml"),
        "{err}"
    );
    assert!(!gw.path("run/none.toml").exists());
    drop(gw);
}
