//! The `mailborder` system account that the package would create on a real host.

use std::process::Command;

use crate::procs::require;

/// Creates the `mailborder` system group and user if missing, as the package's
/// sysusers.d entry would (tests that check group access or privilege dropping need them).
pub fn ensure_mailborder_account() {
    use nix::unistd::{Group, User};
    if Group::from_name("mailborder").ok().flatten().is_none() {
        let _ = Command::new(require("groupadd", "passwd"))
            .args(["--system", "mailborder"])
            .status();
    }
    if User::from_name("mailborder").ok().flatten().is_none() {
        let _ = Command::new(require("useradd", "passwd"))
            .args([
                "--system",
                "--gid",
                "mailborder",
                "--no-create-home",
                "--home-dir",
                "/var/lib/mailborder",
            ])
            .args(["--shell", "/usr/sbin/nologin", "mailborder"])
            .status();
    }
    // Another test may have been creating them at the same time: check the outcome.
    assert!(
        Group::from_name("mailborder").ok().flatten().is_some(),
        "cannot create the mailborder group"
    );
    assert!(
        User::from_name("mailborder").ok().flatten().is_some(),
        "cannot create the mailborder user"
    );
}
