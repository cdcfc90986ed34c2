//! Keys that were accepted and did nothing: `paths.log_dir` now names the daemons' log
//! files (`log.files`), and `network.tls.dhparam` is gone, a file that still sets it
//! being warned rather than refused.

use std::time::Duration;

use mb_testkit::{Gateway, text, wait_until};
use nix::sys::signal::Signal;

const ONLY_RPCD: &str = "[smtp]\nenabled = false\n[filter]\nenabled = false\n";

#[test]
fn log_files_go_to_paths_log_dir_and_are_reopened_on_sighup() {
    let mut gw = Gateway::new(&format!("{ONLY_RPCD}[log]\nfiles = true\n"));
    gw.start().unwrap();
    let file = gw.path("log/mb-rpcd.log");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until("the log file", Duration::from_secs(10), || {
        !read(&file).is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", gw.log()));
    // The same lines as stderr (the journal), in the same format.
    let first = read(&file);
    let line = first.lines().next().unwrap();
    assert!(
        line.contains(" mb-rpcd: ") && gw.log().contains(line),
        "{first}\nstderr:\n{}",
        gw.log()
    );

    // logrotate moves the file away and sends SIGHUP: the daemon starts a new one.
    let rotated = gw.path("log/mb-rpcd.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    gw.rpcd.as_ref().unwrap().signal(Signal::SIGHUP);
    wait_until("a new log file", Duration::from_secs(10), || {
        read(&file).contains("reopened the log file")
    })
    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", gw.log()));
    assert!(
        !read(&rotated).contains("reopened the log file"),
        "{}",
        read(&rotated)
    );
    assert_eq!(gw.stop(), Some(0));
    assert!(read(&file).contains("mb-rpcd stopped"), "{}", read(&file));
}

#[test]
fn without_log_files_nothing_is_written_to_paths_log_dir() {
    let mut gw = Gateway::new(ONLY_RPCD);
    gw.start().unwrap();
    assert_eq!(gw.stop(), Some(0));
    assert!(gw.log().contains("mb-rpcd stopped"), "{}", gw.log());
    assert!(!gw.path("log/mb-rpcd.log").exists());
}

#[test]
fn a_file_that_still_sets_network_tls_dhparam_is_warned_not_refused() {
    let mut gw = Gateway::new(&format!(
        "{ONLY_RPCD}[network.tls]\ndhparam = \"/etc/ssl/dhparam.pem\"\n"
    ));
    let (code, out, err) = text(&gw.tool("mb-config", &["validate"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning:") && err.contains("network.tls.dhparam: removed"),
        "{err}"
    );
    assert!(out.contains(": valid"), "{out}");
    let (code, out, _) = text(&gw.tool("mb-config", &["--json", "validate"]));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true, "{v}");
    assert!(
        v["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("network.tls.dhparam")),
        "{v}"
    );
    gw.start().unwrap();
    assert!(
        gw.log()
            .lines()
            .any(|l| l.contains("[WARN]") && l.contains("network.tls.dhparam: removed")),
        "{}",
        gw.log()
    );
    // A key that never existed still stops the daemon (exit 64).
    assert_eq!(gw.stop(), Some(0));
    let body = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, body.replace("dhparam", "dhparams")).unwrap();
    let (code, err) = gw.run_rpcd_expecting_exit();
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("network.tls.dhparams: unknown key"), "{err}");
}
