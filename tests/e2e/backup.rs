//! mb-backup: a SQLite installation filled through the real tools, backed up, and
//! restored onto fresh PostgreSQL- and MariaDB-backed installations, which then show
//! the same configuration, policies, accounts, aliases, recipients, bans, greylist and
//! quarantine; and every restore that cannot be done whole refused with nothing changed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use mb_proto::v1::backup_chunk::Item;
use mb_proto::v1::backup_client::BackupClient;
use mb_proto::v1::backup_value::Kind as WireKind;
use mb_proto::v1::greylist_client::GreylistClient;
use mb_proto::v1::users_client::UsersClient;
use mb_proto::v1::{
    BackupChunk, BackupHeader, BackupRow, BackupRows, BackupTable, BackupValue,
    GreylistCheckRequest, VerifyRequest,
};
use mb_testkit::{Gateway, MariaDb, Postgres, text};

use crate::smtp::mb_user;

/// An installation with mb-rpcd only, its DKIM key in its own directory (`dkim.key` in
/// its file, so each installation has its own path), on `url` (SQLite when empty).
fn installation(url: &str) -> Gateway {
    let db = if url.is_empty() {
        String::new()
    } else {
        format!("[database]\nurl = \"{url}\"\n")
    };
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\n[filter]\nenabled = false\n{db}"
    ));
    let mut config = fs::read_to_string(&gw.config).unwrap();
    config.push_str(&format!(
        "[dkim]\nkey = \"{}\"\n",
        gw.path("keys/dkim.key").display()
    ));
    fs::write(&gw.config, config).unwrap();
    gw.start().unwrap();
    gw
}

fn ok(gw: &Gateway, tool: &str, args: &[&str]) -> String {
    let (code, out, err) = text(&gw.tool(tool, args));
    assert_eq!(code, 0, "{tool} {args:?}: {out}{err}");
    out
}

/// Fills an installation through the tools an administrator uses.
fn populate(gw: &Gateway) {
    for (key, value) in [
        ("smtp.domains", "served.test, other.test"),
        ("smtp.message_size_limit", "20M"),
        ("spam.threshold.tag", "3.5"),
        ("relay.host", "192.0.2.25"),
        // A secret travels too (and is shown to root alike on both sides).
        ("relay.auth.password", "s3cret-relay-pw"),
        ("greylist.enabled", "true"),
    ] {
        ok(gw, "mb-config", &["set", key, value]);
    }
    for add in [
        &[
            "add",
            "strict",
            "--action",
            "score",
            "--to",
            "ceo@served.test",
            "--tag",
            "2.5",
        ][..],
        &["add", "gone", "--action", "block", "--from", "*@spam.test"],
        &[
            "add",
            "partners",
            "--action",
            "allow",
            "--from",
            "*@partner.test",
        ],
    ] {
        ok(gw, "mb-policy", add);
    }
    // A gap in the ids: they are shown, so they are carried as they are.
    ok(gw, "mb-policy", &["del", "gone"]);
    for (args, stdin) in [
        (&["add", "carol@served.test"][..], "correct horse battery\n"),
        (&["add", "dave"], "another long passphrase\n"),
        (
            &["alias", "add", "carol@served.test", "sales@served.test"],
            "",
        ),
        (&["alias", "add", "dave", "@other.test"], ""),
    ] {
        let (code, out, err) = mb_user(gw, args, stdin);
        assert_eq!(code, 0, "mb-user {args:?}: {out}{err}");
    }
    ok(gw, "mb-ban", &["add", "198.51.100.7", "--for", "2d"]);
    ok(gw, "mb-ban", &["trust", "203.0.113.0/24", "--for", "3d"]);
    ok(
        gw,
        "mb-recipient",
        &[
            "add",
            "alice@served.test",
            "*@other.test",
            "--comment",
            "all",
        ],
    );
    let (code, out, err) = text(&gw.tool("mb-dkim", &["keygen", "--domain", "served.test"]));
    assert_eq!(code, 0, "mb-dkim keygen: {out}{err}");
    // A greylisted triplet, as mb-smtpd would ask about it.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = mb_runtime::uds::connect(&gw.socket(), "mb-rpcd")
            .await
            .unwrap();
        GreylistClient::new(channel)
            .check(GreylistCheckRequest {
                network: "192.0.2.0/24".into(),
                sender: "someone@far.test".into(),
                recipient: "alice@served.test".into(),
            })
            .await
            .unwrap();
    });
    // A quarantined message, indexed from its files.
    let at = now_ms() - 3_600_000;
    let entry = mb_core::quarantine::Entry {
        id: "BKQ1".into(),
        at_unix_ms: at,
        sender: "x@sender.test".into(),
        recipients: vec!["alice@served.test".into()],
        subject: "held".into(),
        size: 24,
        path: mb_runtime::quarantine::relative_path(at, "BKQ1"),
        ..Default::default()
    };
    mb_runtime::quarantine::store(
        &gw.path("spool/quarantine"),
        &entry,
        b"Subject: held\r\n\r\nbody\r\n",
    )
    .unwrap();
    ok(gw, "mb-quarantine", &["purge"]);
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// What an administrator sees of an installation's state, as the tools print it. The
/// configuration leaves out file-only and node-local keys (paths, database) and
/// dkim.key, which this test sets in each installation's own file.
fn observed(gw: &Gateway) -> Vec<(String, String)> {
    let config: String = ok(gw, "mb-config", &["show", "--show-secrets"])
        .lines()
        .filter(|l| {
            let key = l.split_whitespace().next().unwrap_or_default();
            let def = mb_core::config::lookup(key).unwrap();
            !def.file_only && !def.node_local && key != "dkim.key"
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(config.contains("s3cret-relay-pw"), "{config}");
    // Bans print the time left, which moves: everything but that.
    let mut bans: serde_json::Value =
        serde_json::from_str(&ok(gw, "mb-ban", &["--json", "list"])).unwrap();
    for b in bans.as_array_mut().unwrap() {
        assert!(b["seconds_left"].as_u64().unwrap() > 3600, "{b}");
        b.as_object_mut().unwrap().remove("seconds_left");
    }
    let quarantine: serde_json::Value =
        serde_json::from_str(&ok(gw, "mb-quarantine", &["list", "--json"])).unwrap();
    vec![
        ("mb-config show".into(), config),
        ("mb-policy list".into(), ok(gw, "mb-policy", &["list"])),
        (
            "mb-policy --json list".into(),
            ok(gw, "mb-policy", &["--json", "list"]),
        ),
        ("mb-user list".into(), ok(gw, "mb-user", &["list"])),
        (
            "mb-user --json list".into(),
            ok(gw, "mb-user", &["--json", "list"]),
        ),
        (
            "mb-user alias list".into(),
            ok(gw, "mb-user", &["alias", "list"]),
        ),
        (
            "mb-recipient list".into(),
            ok(gw, "mb-recipient", &["list"]),
        ),
        ("mb-ban --json list".into(), bans.to_string()),
        (
            "mb-greylist list --json".into(),
            ok(gw, "mb-greylist", &["list", "--json"]),
        ),
        (
            "mb-quarantine list".into(),
            quarantine["entries"].to_string(),
        ),
    ]
}

fn backup(gw: &Gateway, file: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "create"];
    args.extend(extra);
    args.push(file.to_str().unwrap());
    let (code, out, err) = text(&gw.tool("mb-backup", &args));
    assert_eq!(code, 0, "mb-backup create: {out}{err}");
    serde_json::from_str(&out).unwrap()
}

fn restore(gw: &Gateway, file: &Path) -> (i32, String, String) {
    text(&gw.tool("mb-backup", &["--json", "restore", file.to_str().unwrap()]))
}

async fn verify(gw: &Gateway, user: &str, password: &str) -> bool {
    let channel = mb_runtime::uds::connect(&gw.socket(), "mb-rpcd")
        .await
        .unwrap();
    UsersClient::new(channel)
        .verify(VerifyRequest {
            username: user.into(),
            password: password.into(),
            client_ip: "127.0.0.1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .ok
}

#[test]
fn a_sqlite_installation_restores_onto_postgresql_and_mariadb() {
    let source = installation("");
    populate(&source);
    let want = observed(&source);
    // Every part has something in it to compare.
    for (what, needle) in [
        ("mb-config show", "spam.threshold.tag"),
        ("mb-policy list", "partners"),
        ("mb-user list", "dave"),
        ("mb-user alias list", "sales@served.test"),
        ("mb-recipient list", "*@other.test"),
        ("mb-ban --json list", "203.0.113.0/24"),
        ("mb-greylist list --json", "someone@far.test"),
        ("mb-quarantine list", "BKQ1"),
    ] {
        let (_, seen) = want.iter().find(|(w, _)| w == what).unwrap();
        assert!(seen.contains(needle), "{what}: {seen}");
    }
    let keep = tempfile::tempdir().unwrap();
    let file = keep.path().join("mx1.mbk");
    // The node is the main of a cluster: its CA and keys go with --with-cluster.
    ok(&source, "mb-cluster", &["init", "--name", "mx1"]);
    let cluster_files: Vec<String> = fs::read_dir(source.path("data/cluster"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cluster_files.iter().any(|f| f == "ca.key"),
        "{cluster_files:?}"
    );
    let made = backup(&source, &file, &["--with-quarantine", "--with-cluster"]);
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600,
        "the archive holds hashes and keys"
    );
    assert_eq!(made["source_engine"], "sqlite", "{made:#}");
    assert_eq!(made["tables"]["policies"], 2, "{made:#}");
    assert_eq!(made["tables"]["users"], 2, "{made:#}");
    assert_eq!(made["files"]["dkim"], 1, "{made:#}");
    assert_eq!(made["files"]["quarantine"], 2, "{made:#}");
    // The password and the secret reach no line the tool prints.
    let (_, out, err) = text(&source.tool("mb-backup", &["inspect", file.to_str().unwrap()]));
    assert!(out.contains("sqlite"), "{out}{err}");
    assert!(!format!("{out}{err}").contains("s3cret"), "{out}{err}");

    let pg = Postgres::start().unwrap();
    let maria = MariaDb::start().unwrap();
    for (url, engine) in [(pg.url(), "postgres"), (maria.url(), "mysql")] {
        let target = installation(&url);
        let (code, out, err) = restore(&target, &file);
        assert_eq!(code, 0, "restore onto {engine}: {out}{err}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["restored"]["tables"]["policies"], 2, "{r:#}");
        assert_eq!(r["restored"]["written"], 3 + cluster_files.len(), "{r:#}");
        let got = observed(&target);
        for ((what, a), (_, b)) in want.iter().zip(&got) {
            assert_eq!(a, b, "{what} differs on {engine}");
        }
        assert!(
            !target.log().contains("s3cret") && !source.log().contains("s3cret"),
            "a secret reached mb-rpcd's log"
        );
        // The DKIM key, where this installation's dkim.key says, with its mode.
        let key = target.path("keys/dkim.key");
        assert_eq!(
            fs::read(&key).unwrap(),
            fs::read(source.path("keys/dkim.key")).unwrap()
        );
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o640
        );
        // The cluster's state, private keys still private.
        for f in &cluster_files {
            let (from, to) = (
                source.path(&format!("data/cluster/{f}")),
                target.path(&format!("data/cluster/{f}")),
            );
            assert_eq!(fs::read(&from).unwrap(), fs::read(&to).unwrap(), "{f}");
            assert_eq!(
                fs::metadata(&from).unwrap().permissions().mode(),
                fs::metadata(&to).unwrap().permissions().mode(),
                "{f}"
            );
        }
        assert_eq!(
            fs::metadata(target.path("data/cluster/ca.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o077,
            0
        );
        // The quarantined message is there to be shown.
        let shown = ok(&target, "mb-quarantine", &["show", "BKQ1"]);
        assert!(shown.contains("held"), "{shown}");
        // The password hashes came along: the accounts log in.
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert!(rt.block_on(verify(
            &target,
            "carol@served.test",
            "correct horse battery"
        )));
        assert!(!rt.block_on(verify(&target, "carol@served.test", "wrong horse")));
        // A new policy gets the next id: the sequence moved past the carried ids.
        ok(
            &target,
            "mb-policy",
            &[
                "add",
                "later",
                "--action",
                "block",
                "--from",
                "*@later.test",
            ],
        );
        let v: serde_json::Value =
            serde_json::from_str(&ok(&target, "mb-policy", &["--json", "list"])).unwrap();
        let ids: Vec<i64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids.iter().max(), Some(&4), "{engine}: {v:#}");
        // A backup of this engine holds the same, plus the policy just added.
        let again = backup(&target, &keep.path().join(format!("{engine}.mbk")), &[]);
        assert_eq!(again["source_engine"], engine, "{again:#}");
        let mut tables = made["tables"].clone();
        tables["policies"] = 3.into();
        tables.as_object_mut().unwrap().remove("quarantine");
        assert_eq!(again["tables"], tables, "{again:#}");
        // And the configuration reached a daemon following mb-rpcd (its feed moved on).
        let (_, out, _) = text(&target.tool("mb-config", &["get", "smtp.message_size_limit"]));
        assert_eq!(out.trim(), "20M");
    }
}

/// Builds the archive of a one-policy installation, for the refusals below.
fn small_archive(dir: &Path) -> (Gateway, PathBuf) {
    let source = installation("");
    ok(&source, "mb-config", &["set", "spam.threshold.tag", "3.5"]);
    ok(
        &source,
        "mb-policy",
        &[
            "add",
            "strict",
            "--action",
            "block",
            "--from",
            "*@spam.test",
        ],
    );
    let (code, out, err) = text(&source.tool("mb-dkim", &["keygen", "--domain", "served.test"]));
    assert_eq!(code, 0, "{out}{err}");
    let file = dir.join("small.mbk");
    backup(&source, &file, &[]);
    (source, file)
}

/// Rewrites the archive's manifest with `edit`, keeping it the first member.
fn edit_manifest(file: &Path, out: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let tar = mb_testkit::require("tar", "tar");
    let work = tempfile::tempdir().unwrap();
    let status = Command::new(&tar)
        .arg("-xzf")
        .arg(file)
        .arg("-C")
        .arg(work.path())
        .status()
        .unwrap();
    assert!(status.success());
    let path = work.path().join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let status = Command::new(&tar)
        .arg("-czf")
        .arg(out)
        .arg("-C")
        .arg(work.path())
        .args(["manifest.json", "database", "files"])
        .status()
        .unwrap();
    assert!(status.success());
}

fn empty(gw: &Gateway) -> bool {
    ok(gw, "mb-policy", &["--json", "list"]).trim() == "[]"
        && !ok(gw, "mb-config", &["show"]).contains("# database")
}

#[test]
fn a_restore_that_cannot_be_done_whole_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (source, file) = small_archive(dir.path());

    // Into a non-empty installation: refused, naming what is there and what to do.
    let (code, out, err) = restore(&source, &file);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("not empty")
            && err.contains("policies: 1 row")
            && err.contains("database.url"),
        "{err}"
    );

    let target = installation("");
    // A truncated archive: refused before mb-rpcd is asked anything.
    let bytes = fs::read(&file).unwrap();
    let cut = dir.path().join("cut.mbk");
    for len in [bytes.len() / 3, bytes.len() - 10] {
        fs::write(&cut, &bytes[..len]).unwrap();
        let (code, out, err) = restore(&target, &cut);
        assert_eq!(code, 65, "cut at {len}: {out}{err}");
        assert!(err.contains("damaged or truncated"), "{err}");
        assert!(empty(&target), "a truncated archive left something behind");
    }
    // An archive from a newer mb-backup.
    let newer = dir.path().join("newer.mbk");
    edit_manifest(&file, &newer, |m| {
        m["format"] = 99.into();
        m["product_version"] = "7.0.0".into();
    });
    let (code, out, err) = restore(&target, &newer);
    assert_eq!(code, 65, "{out}{err}");
    assert!(err.contains("newer") && err.contains("7.0.0"), "{err}");
    // Rows of a newer mb-rpcd (a row format this one does not read): refused by mb-rpcd.
    let rows = dir.path().join("rows.mbk");
    edit_manifest(&file, &rows, |m| m["row_format"] = 99.into());
    let (code, out, err) = restore(&target, &rows);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("newer than this mb-rpcd reads"), "{err}");
    assert!(empty(&target));

    // mb-rpcd itself keeps nothing of an import stream that stops before its end,
    // whatever the client: rows sent, then the stream dropped.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = mb_runtime::uds::connect(&target.socket(), "mb-rpcd")
            .await
            .unwrap();
        let text = |s: &str| BackupValue {
            kind: Some(WireKind::Text(s.into())),
        };
        let int = |i| BackupValue {
            kind: Some(WireKind::Int(i)),
        };
        let chunks = vec![
            BackupChunk {
                item: Some(Item::Header(BackupHeader {
                    format: 1,
                    engine: "sqlite".into(),
                    product_version: "0.1.0".into(),
                    tables: vec![BackupTable {
                        name: "config_overrides".into(),
                        columns: ["cfg_key", "cfg_value", "updated_at", "updated_by"]
                            .map(String::from)
                            .to_vec(),
                    }],
                })),
            },
            BackupChunk {
                item: Some(Item::Rows(BackupRows {
                    table: "config_overrides".into(),
                    rows: vec![BackupRow {
                        values: vec![
                            text("spam.threshold.tag"),
                            text("1.5"),
                            int(1),
                            text("root"),
                        ],
                    }],
                })),
            },
        ];
        let e = BackupClient::new(channel)
            .import(tokio_stream::iter(chunks))
            .await
            .unwrap_err();
        assert!(e.message().contains("nothing was restored"), "{e:?}");
    });
    assert!(empty(&target), "a cut import stream left rows behind");

    // A different DKIM key in the way: refused without --force, before the database.
    let key = target.path("keys/dkim.key");
    fs::create_dir_all(key.parent().unwrap()).unwrap();
    fs::write(&key, "another key\n").unwrap();
    let (code, out, err) = restore(&target, &file);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("--force") && err.contains("dkim.key"), "{err}");
    assert!(empty(&target));
    assert_eq!(fs::read_to_string(&key).unwrap(), "another key\n");

    // With --force the whole archive restores, and the key is replaced.
    let (code, out, err) =
        text(&target.tool("mb-backup", &["restore", "--force", file.to_str().unwrap()]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        ok(&target, "mb-policy", &["list"]),
        ok(&source, "mb-policy", &["list"])
    );
    assert_eq!(
        fs::read(&key).unwrap(),
        fs::read(source.path("keys/dkim.key")).unwrap()
    );
    // An archive is never written over another unasked.
    let (code, _, err) = text(&source.tool("mb-backup", &["create", file.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--force"), "{err}");
}

/// The mailborder group may use mb-rpcd's socket, but a backup carries password hashes
/// and keys: only root and mb-rpcd's own user may take or restore one.
#[test]
fn only_root_and_rpcds_user_may_take_a_backup() {
    use std::os::unix::process::CommandExt;
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test switches to another uid: run it as root (CI does)"
    );
    mb_testkit::ensure_mailborder_account();
    let group = nix::unistd::Group::from_name("mailborder")
        .unwrap()
        .expect("mailborder group");
    let gw = installation("");
    for p in [gw.dir.path().to_path_buf(), gw.path("run")] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&gw.config, fs::Permissions::from_mode(0o644)).unwrap();
    let member = |args: &[&str]| {
        text(
            &Command::new(mb_testkit::bin("mb-backup"))
                .arg("--config")
                .arg(&gw.config)
                .args(args)
                .uid(65534)
                .gid(group.gid.as_raw())
                .current_dir("/")
                .output()
                .unwrap(),
        )
    };
    // The group gets into the socket (mb-config answers it) ...
    let out = Command::new(mb_testkit::bin("mb-config"))
        .arg("--config")
        .arg(&gw.config)
        .args(["get", "network.smtp.port"])
        .uid(65534)
        .gid(group.gid.as_raw())
        .output()
        .unwrap();
    assert_eq!(text(&out).0, 0, "{}", text(&out).2);
    // ... but not into the backup, either way.
    let (code, out, err) = member(&["create", "/tmp/mb-backup-denied.mbk"]);
    assert_eq!(code, 77, "{out}{err}");
    assert!(err.contains("run mb-backup as root"), "{err}");
    assert!(!Path::new("/tmp/mb-backup-denied.mbk").exists());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ok.mbk");
    backup(&gw, &file, &[]);
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let other = installation("");
    for p in [other.dir.path().to_path_buf(), other.path("run")] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&other.config, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(mb_testkit::bin("mb-backup"))
        .arg("--config")
        .arg(&other.config)
        .args(["restore", file.to_str().unwrap()])
        .uid(65534)
        .gid(group.gid.as_raw())
        .output()
        .unwrap();
    let (code, out, err) = text(&out);
    assert_eq!(code, 77, "{out}{err}");
    assert!(err.contains("run mb-backup as root"), "{err}");
}
