//! Journald under systemd: a real mb-smtpd whose stderr is "the journal stream" logs
//! native-protocol entries (priority, identifier, structured fields) to a stand-in
//! journal socket, and fail2ban's filter matches their `journalctl -o short` rendering.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mb_testkit::{Gateway, Proc, bin, free_port, text, wait_until};

/// One journal entry: its fields, in order, and whether a value came in the binary
/// (length-prefixed) form.
#[derive(Debug, Clone)]
struct Entry {
    fields: Vec<(String, String)>,
    binary: bool,
}

impl Entry {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a native-protocol datagram: `NAME=value\n`, or `NAME\n`, a 64-bit little-endian
/// length, the value and `\n`.
fn parse(mut d: &[u8]) -> Result<Entry, String> {
    let mut entry = Entry {
        fields: Vec::new(),
        binary: false,
    };
    while !d.is_empty() {
        let end = d
            .iter()
            .position(|&b| b == b'\n' || b == b'=')
            .ok_or("a field without = or a newline")?;
        let name = String::from_utf8(d[..end].to_vec()).map_err(|e| e.to_string())?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            || name.starts_with('_')
        {
            return Err(format!("field name {name:?} journald would refuse"));
        }
        let value;
        if d[end] == b'=' {
            let rest = &d[end + 1..];
            let nl = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or("no newline after a value")?;
            value = rest[..nl].to_vec();
            d = &rest[nl + 1..];
        } else {
            let rest = &d[end + 1..];
            let len = u64::from_le_bytes(rest.get(..8).ok_or("short length")?.try_into().unwrap());
            let len = usize::try_from(len).map_err(|e| e.to_string())?;
            value = rest.get(8..8 + len).ok_or("short value")?.to_vec();
            if rest.get(8 + len) != Some(&b'\n') {
                return Err("no newline after a binary value".into());
            }
            entry.binary = true;
            d = &rest[9 + len..];
        }
        entry
            .fields
            .push((name, String::from_utf8_lossy(&value).into_owned()));
    }
    Ok(entry)
}

#[test]
fn the_parser_reads_both_forms() {
    let mut d = b"PRIORITY=4\nMESSAGE\n".to_vec();
    d.extend_from_slice(&7u64.to_le_bytes());
    d.extend_from_slice(b"a\nb=c d\nX=1\n");
    let e = parse(&d).unwrap();
    assert_eq!(
        (e.get("PRIORITY"), e.get("MESSAGE"), e.get("X"), e.binary),
        (Some("4"), Some("a\nb=c d"), Some("1"), true)
    );
    assert!(parse(b"lower=1\n").is_err());
    assert!(parse(b"A=1").is_err());
}

/// A stand-in for journald: a datagram socket that keeps what it receives.
struct StandIn {
    path: PathBuf,
    entries: Arc<Mutex<Vec<Result<Entry, String>>>>,
}

impl StandIn {
    fn bind(path: PathBuf) -> StandIn {
        let socket = UnixDatagram::bind(&path).unwrap();
        let entries = Arc::new(Mutex::new(Vec::new()));
        let keep = entries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = socket.recv(&mut buf) {
                // The empty datagram is the daemon checking that the journal answers.
                if n > 0 {
                    keep.lock().unwrap().push(parse(&buf[..n]));
                }
            }
        });
        StandIn { path, entries }
    }

    fn entries(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(|e| {
                e.clone()
                    .unwrap_or_else(|e| panic!("malformed datagram: {e}"))
            })
            .collect()
    }

    fn wait_for(&self, what: &str, check: impl Fn(&Entry) -> bool) -> Entry {
        let mut found = None;
        let waited = wait_until(what, Duration::from_secs(20), || {
            found = self.entries().into_iter().find(&check);
            found.is_some()
        });
        waited.unwrap_or_else(|e| panic!("{e}: {:#?}", self.entries()));
        found.unwrap()
    }
}

/// `journalctl -o short`: `MMM dd HH:MM:SS host IDENTIFIER[PID]: MESSAGE`.
fn short(entry: &Entry, pid: u32) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let stamp = mb_runtime::logging::timestamp(SystemTime::now());
    let month: usize = stamp[5..7].parse().unwrap();
    format!(
        "{} {} {} gw1 {}[{pid}]: {}",
        MONTHS[month - 1],
        &stamp[8..10],
        &stamp[11..19],
        entry.get("SYSLOG_IDENTIFIER").unwrap_or("?"),
        entry.get("MESSAGE").unwrap_or_default()
    )
}

fn greeting(port: u16) -> String {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    let _ = (&s).write_all(b"QUIT\r\n");
    line
}

/// mb-smtpd as systemd would start it: stderr is the journal stream that `JOURNAL_STREAM`
/// names (here a file), the journal socket the stand-in.
fn spawn_smtpd(gw: &Gateway, stderr: &Path, stream: Option<&str>, journal: &Path) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr)
        .unwrap();
    let meta = log.metadata().unwrap();
    let mut cmd = Command::new(bin("mb-smtpd"));
    cmd.arg("--config")
        .arg(&gw.config)
        .env(
            "JOURNAL_STREAM",
            stream.map_or_else(|| format!("{}:{}", meta.dev(), meta.ino()), str::to_string),
        )
        .env("MB_JOURNAL_SOCKET", journal)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cmd
}

#[test]
fn under_systemd_entries_carry_priorities_and_fields_and_feed_fail2ban() {
    let swaks = mb_testkit::require("swaks", "swaks");
    let fail2ban = mb_testkit::require("fail2ban-regex", "fail2ban");
    let (port, sub, reinject) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.submission]\nenabled = true\nport = {sub}\n\
         [network.reinject]\nport = {reinject}\n\
         [network.protection]\nmode = \"autoban\"\n\"autoban.rate\" = \"3/minute\"\n\
         trusted_networks = \"192.0.2.0/24\"\n\
         [smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n"
    ));
    gw.start().unwrap();
    let journal = StandIn::bind(gw.path("journal.socket"));
    let stderr = gw.path("smtpd-stderr.log");
    let child = spawn_smtpd(&gw, &stderr, None, &journal.path)
        .spawn()
        .unwrap();
    let smtpd = Proc {
        child,
        name: "mb-smtpd".into(),
    };
    let pid = smtpd.child.id();
    let socket = gw.path("run/mb-smtpd.sock");
    wait_until("mb-smtpd's socket", Duration::from_secs(30), || {
        socket.exists()
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        )
    });

    // An authentication failure: the line fail2ban matches, at priority warning.
    let out = Command::new(&swaks)
        .args(["--server", "127.0.0.1", "--port", &sub.to_string()])
        .args([
            "--from",
            "a@served.test",
            "--to",
            "b@elsewhere.test",
            "--tls",
        ])
        .args(["--auth", "PLAIN", "--auth-user", "mallory"])
        .args(["--auth-password", "guess-guess-guess"])
        .output()
        .unwrap();
    let (_, o, e) = text(&out);
    assert!(format!("{o}{e}").contains("535 5.7.8"), "{o}{e}");
    let auth = journal.wait_for("the authentication failure", |e| {
        e.get("MESSAGE")
            .is_some_and(|m| m.starts_with("authentication failed client=127.0.0.1 user=mallory"))
    });
    assert_eq!(auth.get("PRIORITY"), Some("4"), "{auth:#?}");
    assert_eq!(auth.get("SYSLOG_IDENTIFIER"), Some("mb-smtpd"), "{auth:#?}");

    // A ban: a warning whose client address is a field of its own.
    // (On the submission port every connection counts toward the ban.)
    let banned = (0..10).any(|_| greeting(sub).starts_with("421"));
    assert!(banned, "127.0.0.1 was never banned");
    let ban = journal.wait_for("the ban", |e| {
        e.get("MESSAGE")
            .is_some_and(|m| m.starts_with("banned for") && m.contains("too many connections"))
    });
    assert_eq!(ban.get("PRIORITY"), Some("4"), "{ban:#?}");
    assert_eq!(ban.get("CLIENT_IP"), Some("127.0.0.1"), "{ban:#?}");
    assert!(
        ban.get("MESSAGE").unwrap().ends_with(" client=127.0.0.1"),
        "journalctl shows the address too: {ban:#?}"
    );

    // An error: a reload of a broken configuration file, with its cause as a field.
    let good = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, format!("{good}\n[smtp]\nduplicate = \n")).unwrap();
    smtpd.signal(nix::sys::signal::Signal::SIGHUP);
    let failed = journal.wait_for("the failed reload", |e| {
        e.get("MESSAGE")
            .is_some_and(|m| m.starts_with("reload failed"))
    });
    std::fs::write(&gw.config, &good).unwrap();
    assert_eq!(failed.get("PRIORITY"), Some("3"), "{failed:#?}");
    assert!(
        failed.get("CAUSE").is_some_and(|c| !c.is_empty()),
        "{failed:#?}"
    );

    let entries = journal.entries();
    // Start-up lines are informational (6), and no entry repeats the time, level or
    // daemon name journald records itself.
    assert!(
        entries.iter().any(|e| e.get("PRIORITY") == Some("6")),
        "{entries:#?}"
    );
    for e in &entries {
        let message = e.get("MESSAGE").unwrap_or_default();
        assert!(
            !message.starts_with("20")
                && !message.contains("[WARN]")
                && !message.contains("[INFO]"),
            "{e:#?}"
        );
        assert_eq!(e.get("SYSLOG_IDENTIFIER"), Some("mb-smtpd"));
        assert!(
            matches!(e.get("PRIORITY"), Some("3" | "4" | "6" | "7")),
            "{e:#?}"
        );
    }
    // The journal took the lines: stderr does not repeat them.
    let plain = std::fs::read_to_string(&stderr).unwrap();
    assert!(!plain.contains("authentication failed"), "{plain}");

    // fail2ban's filter on the journal rendering: the failure, and nothing else.
    let rendered: String = entries.iter().map(|e| short(e, pid) + "\n").collect();
    let log = gw.path("journal-short.log");
    std::fs::write(&log, &rendered).unwrap();
    let filter = mb_testkit::source_root().join("etc/fail2ban/filter.d/mailborder-auth.conf");
    let (_, out, _) = text(
        &Command::new(fail2ban)
            .arg(&log)
            .arg(&filter)
            .output()
            .unwrap(),
    );
    let summary = out
        .lines()
        .find(|l| l.starts_with("Lines:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        summary.contains(", 1 matched,") && summary.contains(" 0 ignored"),
        "{summary}\n{out}\n{rendered}"
    );
    assert!(out.contains("127.0.0.1"), "{out}");

    // A configuration error, found before logging starts, reaches the journal stream with
    // the `<3>` prefix that makes journald file it at priority error.
    std::fs::write(&gw.config, "[smtp\nhostname = \n").unwrap();
    let broken = gw.path("broken-stderr.log");
    let out = spawn_smtpd(&gw, &broken, None, &journal.path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let said = std::fs::read_to_string(&broken).unwrap();
    assert!(
        said.lines()
            .next()
            .is_some_and(|l| l.starts_with("<3>mb-smtpd: ")),
        "{said}"
    );
    std::fs::write(&gw.config, &good).unwrap();

    // A process that inherited JOURNAL_STREAM but not the stream (its stderr is a pipe)
    // keeps the documented text line on stderr and sends nothing to the journal.
    let other = StandIn::bind(gw.path("other-journal.socket"));
    let mut second = spawn_smtpd(&gw, &gw.path("unused.log"), Some("1:1"), &other.path);
    let mut second = Proc {
        child: second.stderr(Stdio::piped()).spawn().unwrap(),
        name: "second mb-smtpd".into(),
    };
    let exited = wait_until(
        "the second mb-smtpd to give up",
        Duration::from_secs(30),
        || matches!(second.child.try_wait(), Ok(Some(_))),
    );
    let mut err = String::new();
    if let Some(mut pipe) = second.child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut err);
    }
    exited.unwrap_or_else(|e| panic!("{e}: a second mb-smtpd on the same sockets runs: {err}"));
    assert!(err.contains("[ERROR] mb-smtpd: "), "{err}");
    // Its lines, had it sent any, were queued on the socket before it exited; the
    // stand-in's reader takes a moment to pick them up.
    std::thread::sleep(Duration::from_millis(300));
    assert!(other.entries().is_empty(), "{:#?}", other.entries());
}
