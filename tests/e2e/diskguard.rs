//! The disk guard (issue 14, item 7) on a real small filesystem: the spool on an 8 MiB
//! tmpfs with `queue.min_free_space = 4M`. Filling it makes MAIL and RCPT answer
//! 452 4.3.1 and the filter refuse quarantine writes; freeing it lets mail flow again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mb_testkit::{Gateway, free_port, wait_until};

use crate::smtp::Raw;

/// A tmpfs mounted for the test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t tmpfs failed (the tests run as root, with mount from util-linux): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the daemons may still hold files open if the test failed before stopping them.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The reply to MAIL FROM in a new session.
fn mail_reply(port: u16) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO client.test");
    let r = c.cmd("MAIL FROM:<alice@sender.test>");
    c.cmd("QUIT");
    r
}

#[test]
fn a_full_spool_refuses_mail_and_quarantine_writes_until_space_returns() {
    let (port, reinject) = (free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {reinject}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [filter]\nenabled = true\nworkers = 1\n\
         [spam.threshold]\ntag = 0.5\nquarantine = 1.0\nreject = 20.0\n\
         [queue]\ndelivery_enabled = false\nmin_free_space = \"4M\"\n"
    ));
    let spool = gw.path("spool");
    let _tmpfs = Tmpfs::mount(&spool, "8m");
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    assert!(
        mail_reply(port).starts_with("250"),
        "space is plenty at first"
    );

    // A message in DATA and a transaction after MAIL, both begun while space was plenty.
    let mut in_data = Raw::connect(port);
    in_data.reply();
    in_data.cmd("EHLO client.test");
    assert!(
        in_data
            .cmd("MAIL FROM:<alice@sender.test>")
            .starts_with("250")
    );
    assert!(in_data.cmd("RCPT TO:<bob@served.test>").starts_with("250"));
    assert!(in_data.cmd("DATA").starts_with("354"));
    // No Date field scores 1.0: this message is to be quarantined.
    in_data
        .send("From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: held\r\n\r\nbuy now\r\n");
    let mut after_mail = Raw::connect(port);
    after_mail.reply();
    after_mail.cmd("EHLO client.test");
    assert!(
        after_mail
            .cmd("MAIL FROM:<alice@sender.test>")
            .starts_with("250")
    );

    // 5 MiB of ballast leave about 3 MiB free, under the 4M minimum.
    let ballast = spool.join("ballast");
    std::fs::write(&ballast, vec![0u8; 5 << 20]).unwrap();
    let mut last = String::new();
    wait_until("MAIL to be refused", Duration::from_secs(10), || {
        last = mail_reply(port);
        last.starts_with("452")
    })
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    assert!(
        last.starts_with("452 4.3.1 Insufficient system storage"),
        "{last}"
    );
    let r = after_mail.cmd("RCPT TO:<bob@served.test>");
    assert!(
        r.starts_with("452 4.3.1 Insufficient system storage"),
        "{r}"
    );
    // The message in DATA is finished: the filter does not write it to the quarantine
    // and the client is told to try again later.
    let r = in_data.cmd(".");
    assert!(r.starts_with("451"), "{r}");
    let filter_log = std::fs::read_to_string(gw.path("filter-1.log")).unwrap_or_default();
    assert!(
        filter_log.contains("quarantine write refused"),
        "{filter_log}"
    );
    assert!(
        gw.smtpd_log().contains("below queue.min_free_space"),
        "{}",
        gw.smtpd_log()
    );

    // Space returns: mail flows again, and the quarantine takes messages.
    std::fs::remove_file(&ballast).unwrap();
    wait_until("MAIL to be accepted again", Duration::from_secs(10), || {
        mail_reply(port).starts_with("250")
    })
    .unwrap();
    // mb-smtpd saw the space first; the worker reads free space at most once a second,
    // so the quarantine may still tempfail (451) within that second, as a sender retries.
    let mut r = String::new();
    for _ in 0..6 {
        let mut c = Raw::connect(port);
        c.reply();
        c.cmd("EHLO client.test");
        assert!(c.cmd("MAIL FROM:<alice@sender.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<bob@served.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        r = c.cmd(
            "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: held\r\n\r\nbuy now\r\n.",
        );
        if !r.starts_with("451") {
            c.cmd("QUIT");
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(r.starts_with("250"), "{r}");
    let quarantined = std::fs::read_dir(spool.join("quarantine"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        quarantined > 0,
        "nothing in the quarantine after space returned"
    );
}
