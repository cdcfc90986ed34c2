//! Who may use a daemon's socket: the file mode keeps strangers out, and SO_PEERCRED
//! refuses them even when the mode would let them in.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use mb_testkit::{Gateway, text};

const NOBODY: u32 = 65534;

fn as_nobody(gw: &Gateway, tool: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(mb_testkit::bin(tool))
        .arg("--config")
        .arg(&gw.config)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run as nobody");
    text(&out)
}

#[test]
fn another_uid_is_refused_on_every_socket() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test switches to uid {NOBODY}: run it as root (CI does)"
    );
    // Members of the mailborder group are let in: make sure it exists (as the package's
    // sysusers.d entry would) before the daemon starts and looks it up.
    mb_testkit::ensure_mailborder_account();
    let group = nix::unistd::Group::from_name("mailborder")
        .unwrap()
        .expect("mailborder group");
    let mut gw = Gateway::new("[smtp]\nenabled = false\n[filter]\nenabled = false\n");
    gw.start().unwrap();
    // Let nobody reach the directory and read the config, so only the socket decides.
    for p in [gw.dir.path().to_path_buf(), gw.path("run")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&gw.config, std::fs::Permissions::from_mode(0o644)).unwrap();

    let sockets: Vec<_> = std::fs::read_dir(gw.path("run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!sockets.is_empty());
    for socket in &sockets {
        let mode = std::fs::metadata(socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "{} has mode {mode:o}", socket.display());
    }

    // The mode alone keeps nobody out.
    let (code, _, err) = as_nobody(&gw, "mb-config", &["get", "smtp.hostname"]);
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains("permission denied") && err.contains("mailborder group"),
        "{err}"
    );

    // With the mode opened up, the peer-credential check still refuses every service.
    for socket in &sockets {
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let (code, _, err) = as_nobody(&gw, "mb-config", &["get", "smtp.hostname"]);
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains(&format!("uid {NOBODY} may not use this socket")),
        "{err}"
    );
    let (code, _, err) = as_nobody(&gw, "mb-config", &["set", "smtp.hostname", "evil.example"]);
    assert_eq!(code, 77, "{err}");
    let (code, out, _) = as_nobody(&gw, "mb-status", &["--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rpcd = &v["daemons"][0];
    assert_eq!(rpcd["state"], "down");
    assert!(
        rpcd["error"]
            .as_str()
            .unwrap()
            .contains("may not use this socket"),
        "{rpcd}"
    );
    assert!(
        gw.log()
            .contains(&format!("refused a caller on the socket uid={NOBODY}")),
        "{}",
        gw.log()
    );

    // Root still gets in, and nothing was changed by the refused calls.
    let (code, out, _) = text(&gw.tool("mb-config", &["get", "smtp.hostname"]));
    assert_eq!((code, out.as_str()), (0, "\n"));

    // The socket belongs to the group, and a member of it gets in with the mode at 0660.
    use std::os::unix::fs::MetadataExt;
    for socket in &sockets {
        assert_eq!(std::fs::metadata(socket).unwrap().gid(), group.gid.as_raw());
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).unwrap();
    }
    let out = Command::new(mb_testkit::bin("mb-config"))
        .arg("--config")
        .arg(&gw.config)
        .args(["get", "network.smtp.port"])
        .uid(NOBODY)
        .gid(group.gid.as_raw())
        .output()
        .unwrap();
    let (code, out, err) = text(&out);
    assert_eq!((code, out.as_str()), (0, "25\n"), "{err}");
    drop(gw);
}
