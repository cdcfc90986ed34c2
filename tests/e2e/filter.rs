//! mb-filter for real: two workers behind mb-smtpd, a real clamd with the EICAR
//! signature, attachment rules, verdict headers at delivery, worker failover and
//! `filter.unavailable_action`.

use std::time::Duration;

use mb_testkit::{Clamd, EICAR, Gateway, SmtpSink, free_port, text, wait_until};

use crate::smtp::Raw;

pub(crate) fn with_attachment(subject: &str, name: &str, content: &[u8]) -> String {
    format!(
        "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
         Message-ID: <{subject}@sender.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
         --b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--b1--\r\n",
        mb_core::message::base64_encode(content)
    )
}

/// Sends a message; returns the final reply.
pub(crate) fn send(port: u16, message: &str) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<alice@sender.test>");
    c.cmd("RCPT TO:<bob@served.test>");
    c.cmd("DATA");
    let dotted = message.replace("\r\n.", "\r\n..");
    let r = c.cmd(&format!("{dotted}."));
    c.cmd("QUIT");
    r
}

const CLEAN: &str = "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: clean\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <clean@sender.test>\r\nX-Spam: Yes\r\n\r\nhello\r\n";

#[test]
fn viruses_and_blocked_attachments_are_refused_in_the_session_and_workers_fail_over() {
    let clamd = Clamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 2\n\
         [clamav]\nenabled = true\naddress = \"{}\"\n",
        free_port(),
        sink.port,
        clamd.address()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_filter(2).unwrap();
    gw.start_smtpd().unwrap();

    let r = send(
        port,
        &with_attachment("infected", "readme.txt", EICAR.as_bytes()),
    );
    assert!(
        r.starts_with("554 5.7.1") && r.contains("virus found (Test.EICAR"),
        "{r}"
    );
    let r = send(
        port,
        &with_attachment("blocked", "invoice.pdf.exe", b"MZ not really"),
    );
    assert!(
        r.starts_with("554 5.7.1") && r.contains("invoice.pdf.exe"),
        "{r}"
    );
    // A real (deflated) archive made by Python's zipfile, with an executable inside.
    let zip = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import io,sys,zipfile\nb=io.BytesIO()\nz=zipfile.ZipFile(b,'w',zipfile.ZIP_DEFLATED)\n\
             z.writestr('docs/readme.txt','hello')\nz.writestr('docs/payload.exe','MZ'*100)\nz.close()\n\
             sys.stdout.buffer.write(b.getvalue())",
        ])
        .output()
        .unwrap();
    assert!(zip.status.success());
    let r = send(port, &with_attachment("zipped", "docs.zip", &zip.stdout));
    assert!(
        r.starts_with("554 5.7.1") && r.contains("holds \"docs/payload.exe\""),
        "{r}"
    );
    let r = send(port, CLEAN);
    assert!(r.starts_with("250 2.0.0"), "{r}");
    wait_until(
        "the clean message at the sink",
        Duration::from_secs(20),
        || sink.messages().iter().any(|m| m.contains("\nhello")),
    )
    .unwrap();
    let delivered = &sink.messages()[0];
    assert!(
        delivered.contains("X-Spam-Status: No, score=0.0 required=4.0"),
        "{delivered}"
    );
    assert!(
        !delivered.contains("X-Spam: Yes"),
        "the sender's own X-Spam field is removed: {delivered}"
    );
    assert_eq!(
        sink.messages().len(),
        1,
        "refused messages never reach the queue"
    );

    // Both workers serve and report; mb-status lists them.
    let (code, out, _) = text(&gw.tool("mb-status", &["--json"]));
    assert_eq!(code, 0, "{out}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let workers: Vec<&serde_json::Value> = st["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["name"].as_str().unwrap_or("").starts_with("mb-filter@"))
        .collect();
    assert_eq!(workers.len(), 2, "{st:#}");
    let scanned: u64 = workers
        .iter()
        .map(|w| w["counters"]["scanned"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(scanned, 4, "{st:#}");

    // A worker dies: the next message is scanned by the other one.
    let mut first = gw.filters.remove(0);
    first.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = first.child.wait();
    let r = send(port, &CLEAN.replace("Subject: clean", "Subject: failover"));
    assert!(r.starts_with("250"), "{r}");
    let r = send(
        port,
        &with_attachment("infected2", "x.txt", EICAR.as_bytes()),
    );
    assert!(r.starts_with("554"), "still scanned by worker 2: {r}");
    // No worker: tempfail by default, or accept unscanned when so configured.
    let mut second = gw.filters.remove(0);
    second.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = second.child.wait();
    let r = send(port, &CLEAN.replace("Subject: clean", "Subject: noworker"));
    assert!(r.starts_with("451 4.7.1"), "{r}");
    let (code, _, err) =
        text(&gw.tool("mb-config", &["set", "filter.unavailable_action", "accept"]));
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let r = send(port, &CLEAN.replace("Subject: clean", "Subject: unscanned"));
    assert!(r.starts_with("250"), "{r}");
    assert!(
        gw.smtpd_log().contains("accepting unscanned"),
        "{}",
        gw.smtpd_log()
    );
    // Unscanned is not unfiltered: the sender's forged X-Spam field does not arrive.
    wait_until(
        "the unscanned message at the sink",
        Duration::from_secs(30),
        || {
            sink.messages()
                .iter()
                .any(|m| m.contains("Subject: unscanned"))
        },
    )
    .unwrap();
    let got = sink
        .messages()
        .into_iter()
        .find(|m| m.contains("Subject: unscanned"))
        .unwrap();
    assert!(!got.contains("X-Spam: Yes"), "{got}");
}

fn send_from(port: u16, from: &str, message: &str) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO mail.sender.test");
    c.cmd(&format!("MAIL FROM:<{from}>"));
    c.cmd("RCPT TO:<bob@served.test>");
    c.cmd("DATA");
    let r = c.cmd(&format!("{message}."));
    c.cmd("QUIT");
    r
}

#[test]
fn spf_and_dmarc_are_checked_against_a_real_dns_server() {
    // Authoritative for all of .test: the DMARC tree walk asks up to _dmarc.test, which
    // must be "no such name", not a refusal.
    let mut records: Vec<String> = vec![
        "--auth-server=ns.test,127.0.0.1".into(),
        "--auth-zone=test".into(),
        // 127.0.0.1 is mail.sender.test, and mail.sender.test is 127.0.0.1: iprev passes.
        "--ptr-record=1.0.0.127.in-addr.arpa,mail.sender.test".into(),
        "--host-record=mail.sender.test,127.0.0.1".into(),
        // Blocklists: 127.0.0.1 is on bl.test, lenient.test is on dbl.test.
        "--host-record=1.0.0.127.bl.test,127.0.0.2".into(),
        "--host-record=lenient.test.dbl.test,127.0.1.2".into(),
    ];
    for (domain, spf, dmarc) in [
        (
            "aligned.test",
            "v=spf1 ip4:127.0.0.1 -all",
            "v=DMARC1; p=reject",
        ),
        (
            "forged.test",
            "v=spf1 ip4:192.0.2.1 -all",
            "v=DMARC1; p=reject",
        ),
        (
            "lenient.test",
            "v=spf1 ip4:192.0.2.1 -all",
            "v=DMARC1; p=none",
        ),
    ] {
        records.push(format!("--txt-record={domain},{spf}"));
        records.push(format!("--txt-record=_dmarc.{domain},{dmarc}"));
    }
    let dns = mb_testkit::Dnsmasq::start(&records).unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [network.dns]\nservers = \"{}\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\n[spam.threshold]\nquarantine = 15.0\n\
         [spam.rbl]\nip = \"bl.test=0.5\"\ndomain = \"dbl.test=1.5,missing.test=9\"\n",
        free_port(),
        dns.servers(),
        sink.port
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    let message = |domain: &str| {
        format!(
            "From: alice@{domain}\r\nTo: bob@served.test\r\nSubject: from {domain}\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
             Message-ID: <m@{domain}>\r\nAuthentication-Results: gw.served.test; spf=pass; dmarc=pass (forged)\r\n\r\nhello\r\n"
        )
    };
    // SPF passes and is aligned with From: DMARC passes.
    let r = send_from(port, "alice@aligned.test", &message("aligned.test"));
    assert!(r.starts_with("250"), "{r}");
    // SPF fails and the domain says reject: refused in the session.
    let r = send_from(port, "alice@forged.test", &message("forged.test"));
    assert!(
        r.starts_with("550 5.7.1") && r.contains("DMARC"),
        "{r}\n{}",
        std::fs::read_to_string(gw.path("filter-1.log")).unwrap_or_default()
    );
    // SPF fails, the policy is none: accepted, scored, results recorded.
    let r = send_from(port, "alice@lenient.test", &message("lenient.test"));
    assert!(r.starts_with("250"), "{r}");
    // smtp-sink writes its dump files while the data arrives: wait for both bodies.
    wait_until("two deliveries", Duration::from_secs(20), || {
        sink.messages()
            .iter()
            .filter(|m| m.contains("\nhello"))
            .count()
            == 2
    })
    .unwrap();
    let got = sink.messages();
    let aligned = got
        .iter()
        .find(|m| m.contains("Subject: from aligned.test"))
        .unwrap();
    let lenient = got
        .iter()
        .find(|m| m.contains("Subject: from lenient.test"))
        .unwrap();
    assert!(
        aligned.contains("Authentication-Results: gw.served.test;"),
        "{aligned}"
    );
    assert!(
        aligned.contains("spf=pass") && aligned.contains("dmarc=pass"),
        "{aligned}"
    );
    assert!(aligned.contains("iprev=pass"), "{aligned}");
    assert!(
        !aligned.contains("(forged)"),
        "the sender's own results are removed: {aligned}"
    );
    assert!(
        lenient.contains("spf=fail") && lenient.contains("dmarc=fail"),
        "{lenient}"
    );
    assert!(
        // p=none asks for no action: its failure is a token 0.1, not DMARC_FAIL.
        lenient.contains("SPF_FAIL(3.0)")
            && lenient.contains("DMARC_POLICY_NONE(0.1)")
            && !lenient.contains("DMARC_FAIL"),
        "{lenient}"
    );
    assert!(
        lenient.contains("X-Spam: Yes"),
        "above the tag threshold: {lenient}"
    );
    // The client address is listed on bl.test (both messages), the lenient.test domain
    // on dbl.test; the domain list that lists nothing adds nothing.
    assert!(
        aligned.contains("RBL_IP(0.5)") && !aligned.contains("RBL_DOMAIN"),
        "{aligned}"
    );
    assert!(
        lenient.contains("RBL_IP(0.5)") && lenient.contains("RBL_DOMAIN(1.5)"),
        "{lenient}"
    );
    assert!(!lenient.contains("(9.0)"), "{lenient}");
}

/// One daemon's entry in `mb-status --json` (Null when it is not listed).
fn daemon_status(gw: &Gateway, name: &str) -> serde_json::Value {
    let (_, out, _) = text(&gw.tool("mb-status", &["--json"]));
    let st: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    st["daemons"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name).cloned())
        .unwrap_or_default()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    let (code, stdout, err) = text(out);
    assert_eq!(code, 0, "{stdout}{err}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn quarantined_mail_is_held_released_and_purged_and_the_message_log_tells() {
    let clamd = Clamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let (port, reinject) = (free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {reinject}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\nnext_hop = \"127.0.0.1:{reinject}\"\n\
         [spam.threshold]\ntag = 0.5\nquarantine = 1.0\nreject = 20.0\n\
         [clamav]\nenabled = true\naddress = \"{}\"\nvirus_action = \"quarantine\"\n",
        sink.port,
        clamd.address()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    let quarantine = |args: &[&str]| gw.tool("mb-quarantine", args);

    // No Date field scores 1.0: quarantined. A virus is quarantined by configuration. Both
    // are answered 250 (the sender is not told) and neither is delivered.
    let spammy = "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: held for review\r\n\
                  Message-ID: <q1@sender.test>\r\n\r\nbuy now\r\n";
    assert!(send(port, spammy).starts_with("250 2.0.0"));
    let r = send(
        port,
        &with_attachment("infected", "readme.txt", EICAR.as_bytes()),
    );
    assert!(r.starts_with("250 2.0.0"), "{r}");
    assert!(send(port, CLEAN).starts_with("250 2.0.0"));
    wait_until(
        "the clean message at the sink",
        Duration::from_secs(20),
        || sink.messages().iter().any(|m| m.contains("\nhello")),
    )
    .unwrap();

    let mut listed = serde_json::Value::Null;
    wait_until("two messages indexed", Duration::from_secs(20), || {
        listed = json(&quarantine(&["list", "--json"]));
        listed["total"] == 2
    })
    .unwrap_or_else(|e| panic!("{e}: {listed:#}"));
    let entries = listed["entries"].as_array().unwrap();
    let held = entries
        .iter()
        .find(|e| e["subject"] == "held for review")
        .unwrap_or_else(|| panic!("{listed:#}"));
    assert_eq!(held["reason"], "spam score 1.0", "{held:#}");
    assert_eq!(held["recipients"], serde_json::json!(["bob@served.test"]));
    assert_eq!(held["sender"], "alice@sender.test");
    let virus = entries.iter().find(|e| e["subject"] == "infected").unwrap();
    assert!(
        virus["reason"]
            .as_str()
            .unwrap()
            .contains("virus found (Test.EICAR"),
        "{virus:#}"
    );
    let id = held["id"].as_str().unwrap().to_string();
    let stored = gw
        .path("spool/quarantine")
        .join(held["path"].as_str().unwrap());
    assert!(stored.exists(), "{}", stored.display());
    // Show prints the header section as stored, with the verdict's headers.
    let (code, out, err) = text(&quarantine(&["show", &id]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("X-Spam: Yes")
            && out.contains("MISSING_DATE(1.0)")
            && out.contains("Subject: held for review"),
        "{out}"
    );

    // Release: the message goes to its original recipient through the reinjection port,
    // unfiltered, and leaves the quarantine.
    let (code, out, err) = text(&quarantine(&["release", &id]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("released to bob@served.test") && out.contains("250"),
        "{out}"
    );
    wait_until(
        "the released message at the sink",
        Duration::from_secs(20),
        || sink.messages().iter().any(|m| m.contains("\nbuy now")),
    )
    .unwrap();
    let released = sink
        .messages()
        .into_iter()
        .find(|m| m.contains("held for review"))
        .unwrap();
    assert!(
        released.contains("X-Spam-Status: Yes, score=1.0"),
        "{released}"
    );
    assert!(!stored.exists(), "the released message's file is removed");
    let listed = json(&quarantine(&["list", "--json"]));
    assert_eq!(listed["total"], 1, "{listed:#}");
    let (code, _, err) = text(&quarantine(&["release", &id]));
    assert_eq!(code, 1, "released twice: {err}");
    assert!(err.contains("no message"), "{err}");

    // Retention: with at most one message kept, purge removes the oldest.
    let (code, _, err) = text(&gw.tool("mb-config", &["set", "quarantine.max_messages", "1"]));
    assert_eq!(code, 0, "{err}");
    assert!(send(port, &spammy.replace("held for review", "second")).starts_with("250"));
    wait_until(
        "two messages indexed again",
        Duration::from_secs(20),
        || json(&quarantine(&["list", "--json"]))["total"] == 2,
    )
    .unwrap();
    let purged = json(&quarantine(&["purge", "--json"]));
    assert_eq!(
        (purged["removed"].as_u64(), purged["remaining"].as_u64()),
        (Some(1), Some(1)),
        "{purged}"
    );
    let listed = json(&quarantine(&["list", "--json"]));
    assert_eq!(
        listed["entries"][0]["subject"], "second",
        "the newest stays: {listed:#}"
    );
    let last = listed["entries"][0]["id"].as_str().unwrap().to_string();
    let (code, out, err) = text(&quarantine(&["delete", &last]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json(&quarantine(&["list", "--json"]))["total"], 0);

    // The message log has every scan with its verdict, score and subject.
    let mut log = serde_json::Value::Null;
    wait_until("scans in the message log", Duration::from_secs(20), || {
        log = json(&gw.tool("mb-log", &["--stage", "scanned", "--json"]));
        log.as_array().is_some_and(|a| a.len() == 4)
    })
    .unwrap_or_else(|e| panic!("{e}: {log:#}"));
    let quarantined = json(&gw.tool("mb-log", &["--verdict", "quarantine", "--json"]));
    let subjects: Vec<&str> = quarantined
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(
        subjects,
        ["held for review", "infected", "second"],
        "{quarantined:#}"
    );
    let clean = json(&gw.tool(
        "mb-log",
        &[
            "--verdict",
            "accept",
            "--from",
            "alice@sender.test",
            "--json",
        ],
    ));
    assert_eq!(clean[0]["subject"], "clean", "{clean:#}");
    assert_eq!(clean[0]["score"], 0.0);
    let (code, out, _) = text(&gw.tool("mb-log", &["--since", "1h", "--to", "bob@served.test"]));
    assert_eq!(code, 0);
    assert!(
        out.contains("verdict=quarantine score=1.0 subject=\"held for review\""),
        "{out}"
    );
    let (code, _, err) = text(&gw.tool("mb-log", &["--since", "last week"]));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn policies_allow_block_and_explain_and_allowed_senders_still_get_virus_checks() {
    let clamd = Clamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\n\
         [clamav]\nenabled = true\naddress = \"{}\"\n",
        free_port(),
        sink.port,
        clamd.address()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    let policy = |args: &[&str]| text(&gw.tool("mb-policy", args));
    for add in [
        &[
            "add",
            "partners",
            "--action",
            "allow",
            "--from",
            "*@partner.test",
            "--priority",
            "10",
        ][..],
        &[
            "add",
            "legacy",
            "--action",
            "allow",
            "--from",
            "*@old-partner.test",
            "--unauthenticated",
        ],
        &[
            "add",
            "spammer",
            "--action",
            "block",
            "--from",
            "spammer.test",
        ],
        &[
            "add",
            "bad-net",
            "--action",
            "block",
            "--network",
            "198.51.100.0/24",
        ],
    ] {
        let (code, out, err) = policy(add);
        assert_eq!(code, 0, "{add:?}: {out}{err}");
        assert!(out.starts_with("added"), "{out}");
    }
    wait_until(
        "the worker loads the policies",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(gw.path("filter-1.log"))
                .unwrap_or_default()
                .contains("policies loaded count=4")
        },
    )
    .unwrap();

    // No From, Date, Message-ID or Subject: 4.0, tagged under the global thresholds.
    let spammy = |_from: &str, body: &str| format!("To: bob@served.test\r\n\r\n{body}\r\n");
    // partners is an authenticated-only sender allow. The client here, 127.0.0.1, is in
    // smtp.mynetworks: its mail is outbound, from our own network, and its sender counts
    // as authenticated, so partners applies. (An inbound forged sender is scored: the
    // cases policy-allow-forged-sender-scored and dns-policy-allow-* run through a real
    // worker.) legacy applies to any sender, as allows did before.
    let r = send_from(
        port,
        "news@partner.test",
        &spammy("news@partner.test", "own body"),
    );
    assert!(r.starts_with("250"), "{r}");
    let r = send_from(
        port,
        "news@old-partner.test",
        &spammy("news@old-partner.test", "allowed body"),
    );
    assert!(r.starts_with("250"), "{r}");
    let r = send_from(
        port,
        "news@old-partner.test",
        &with_attachment("allowed but infected", "a.txt", EICAR.as_bytes()),
    );
    assert!(
        r.starts_with("554 5.7.1") && r.contains("virus found"),
        "an allowed sender's virus is refused: {r}"
    );
    let r = send_from(
        port,
        "boss@spammer.test",
        &spammy("boss@spammer.test", "blocked body"),
    );
    assert!(
        r.starts_with("550 5.7.1") && r.contains("policy spammer"),
        "{r}"
    );
    let r = send_from(
        port,
        "someone@other.test",
        &spammy("someone@other.test", "scored body"),
    );
    assert!(r.starts_with("250"), "{r}");
    wait_until("three deliveries", Duration::from_secs(20), || {
        let got = sink.messages();
        got.iter().any(|m| m.contains("\nallowed body"))
            && got.iter().any(|m| m.contains("\nscored body"))
            && got.iter().any(|m| m.contains("\nown body"))
    })
    .unwrap();
    let got = sink.messages();
    let allowed = got.iter().find(|m| m.contains("allowed body")).unwrap();
    assert!(
        allowed.contains("X-Spam-Status: No, score=0.0") && allowed.contains("POLICY_ALLOW"),
        "{allowed}"
    );
    let scored = got.iter().find(|m| m.contains("scored body")).unwrap();
    assert!(scored.contains("X-Spam: Yes"), "{scored}");
    let own = got.iter().find(|m| m.contains("own body")).unwrap();
    assert!(
        own.contains("tests=[POLICY_ALLOW(0.0)]") && !own.contains("UNAUTHENTICATED"),
        "mail from our own network is allowed by partners: {own}"
    );
    assert_eq!(
        got.len(),
        3,
        "the blocked and the infected message were not delivered"
    );

    // test explains the choice, including a tie broken by specificity.
    let (code, out, _) = policy(&[
        "test",
        "--from",
        "x@partner.test",
        "--to",
        "bob@served.test",
        "--ip",
        "127.0.0.1",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("partners (priority 10, address allow): matches: sender x@partner.test matches *@partner.test"), "{out}");
    assert!(out.contains("=> partners wins"), "{out}");
    assert!(
        out.contains(
            "partners is a sender allow: it applies only when the sender is authenticated"
        ) && out.contains("the message is scored with the global thresholds instead"),
        "{out}"
    );
    // Several recipients: the strictest outcome among them.
    let (code, out, _) = policy(&[
        "test",
        "--from",
        "x@old-partner.test",
        "--to",
        "bob@served.test",
        "--to",
        "carol@served.test",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("for carol@served.test: => legacy wins"),
        "{out}"
    );
    assert!(
        out.contains("strictest outcome among its recipients") && out.contains("allowed by legacy"),
        "{out}"
    );
    let (code, out, _) = policy(&["list"]);
    assert_eq!(code, 0);
    let marked: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("[unauthenticated"))
        .collect();
    assert!(
        marked.len() == 1 && marked[0].contains("legacy"),
        "only legacy is marked: {out}"
    );
    let (code, out, _) = policy(&[
        "--json",
        "test",
        "--from",
        "a@spammer.test",
        "--ip",
        "198.51.100.7",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["policy"]["name"], "bad-net", "{v:#}");
    assert!(
        v["explanation"]
            .to_string()
            .contains("tie broken by specificity"),
        "{v:#}"
    );
    let (code, out, _) = policy(&["test", "--from", "a@elsewhere.test"]);
    assert_eq!(code, 0);
    assert!(out.contains("no policy matches"), "{out}");

    // Nonsense and duplicates are refused with the reason.
    let (code, _, err) = policy(&["add", "partners", "--action", "allow", "--from", "x.test"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exists"), "{err}");
    let (code, _, err) = policy(&["add", "n", "--action", "allow", "--network", "not-a-net"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("CIDR"), "{err}");
    let (code, _, err) = policy(&[
        "add", "n", "--action", "allow", "--from", "a.test", "--tag", "3",
    ]);
    assert_eq!(code, 1, "{err}");
    let (code, _, _) = policy(&["add", "n", "--action", "allow"]);
    assert_eq!(code, 2, "a target is required");
    let (code, out, err) = policy(&["del", "spammer"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = policy(&["del", "spammer"]);
    assert_eq!(code, 1, "{err}");
    let (_, out, _) = policy(&["--json", "list"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(3), "{v:#}");
    let (code, _, err) = policy(&[
        "add",
        "n",
        "--action",
        "block",
        "--from",
        "a.test",
        "--unauthenticated",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unauthenticated belongs to an allow"), "{err}");
}

#[test]
fn rspamd_scores_join_the_verdict_and_its_absence_follows_the_unavailable_action() {
    // Rspamd loads for 20-30 s: start it first, set up the rest meanwhile.
    let rspamd = mb_testkit::Rspamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\n\
         [rspamd]\nenabled = true\nurl = \"{}\"\ntimeout = \"10s\"\n",
        free_port(),
        sink.port,
        rspamd.url()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    rspamd.wait_ready().unwrap();

    // No Message-ID and no Date: Rspamd's MISSING_MID (2.5) and MISSING_DATE (1.0).
    let message = |subject: &str| {
        format!(
            "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: {subject}\r\n\r\nrspamd body\r\n"
        )
    };
    let r = send_from(port, "alice@sender.test", &message("scored by rspamd"));
    assert!(r.starts_with("250"), "{r}");
    wait_until("the delivery", Duration::from_secs(20), || {
        sink.messages().iter().any(|m| m.contains("\nrspamd body"))
    })
    .unwrap();
    let got = sink.messages().remove(0);
    let status = got
        .lines()
        .find(|l| l.starts_with("X-Spam-Status:"))
        .unwrap_or_else(|| panic!("{got}"));
    assert!(
        status.contains("MISSING_MID(2.5)") && status.contains("MISSING_DATE(1.0)"),
        "Rspamd's symbols join the verdict: {status}"
    );
    assert!(
        !status.contains("MISSING_MID(0.5)"),
        "ours are not counted twice: {status}"
    );
    let mut log = serde_json::Value::Null;
    wait_until(
        "the scan in the message log",
        Duration::from_secs(20),
        || {
            log = json(&gw.tool("mb-log", &["--stage", "scanned", "--json"]));
            log.as_array().is_some_and(|a| !a.is_empty())
        },
    )
    .unwrap();
    let symbols = log[0]["symbols"].to_string();
    assert!(
        symbols.contains("MISSING_MID(2.5)") && symbols.contains("RSPAMD(0.0)"),
        "{log:#}"
    );
    assert!(log[0]["score"].as_f64().unwrap() >= 3.0, "{log:#}");

    let scanner = |state: &str| {
        let (_, out, _) = text(&gw.tool("mb-status", &["--json"]));
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        let c = st["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "rspamd")
            .cloned()
            .unwrap_or_default();
        assert_eq!(c["state"], state, "{st:#}");
        c
    };
    scanner("ok");

    // Rspamd goes away: mb-status says so, and messages are scored without it by default
    // (our own header rules score instead) ...
    drop(rspamd);
    let down = scanner("down");
    assert!(
        down["detail"]
            .as_str()
            .unwrap()
            .contains("rspamd.unavailable_action (skip)"),
        "{down}"
    );
    let r = send_from(port, "alice@sender.test", &message("without rspamd"));
    assert!(r.starts_with("250"), "{r}");
    wait_until("the second delivery", Duration::from_secs(20), || {
        sink.messages()
            .iter()
            .filter(|m| m.contains("\nrspamd body"))
            .count()
            == 2
    })
    .unwrap();
    let second = sink
        .messages()
        .into_iter()
        .find(|m| m.contains("Subject: without rspamd"))
        .unwrap();
    assert!(second.contains("MISSING_MID(0.5)"), "{second}");
    // ... or tempfailed when so configured.
    let (code, _, err) = text(&gw.tool(
        "mb-config",
        &["set", "rspamd.unavailable_action", "tempfail"],
    ));
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let r = send_from(port, "alice@sender.test", &message("tempfailed"));
    assert!(r.starts_with("451 4.7.1"), "{r}");
}

/// Rspamd's action through the gateway, made deterministic by the testkit Rspamd's local
/// rule (`X-Test-Rspamd-Action`), in the three modes: standalone (mb-smtpd), content
/// filter (SMTP straight to mb-filter's content filter, which reinjects to the sink) and
/// milter (Postfix with mb-milter).
#[test]
fn rspamds_action_defers_rejects_tags_and_rewrites_the_subject_in_every_mode() {
    let rspamd = mb_testkit::Rspamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let (port, cf_port, milter_port) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\nport = {cf_port}\nnext_hop = \"127.0.0.1:{}\"\n\
         [milter]\nenabled = true\nport = {milter_port}\n\
         [rspamd]\nenabled = true\nurl = \"{}\"\ntimeout = \"10s\"\n",
        free_port(),
        sink.port,
        sink.port,
        rspamd.url()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    gw.start_milter().unwrap();
    let postfix = mb_testkit::Postfix::start(
        &format!("[127.0.0.1]:{}", sink.port),
        &format!(
            "smtpd_milters = inet:127.0.0.1:{milter_port}\nmilter_default_action = tempfail\nmilter_protocol = 6\n"
        ),
    )
    .unwrap();
    rspamd.wait_ready().unwrap();

    let message = |action: &str, subject: &str| {
        format!(
            "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
             Message-ID: <{}@sender.test>\r\nX-Test-Rspamd-Action: {action}\r\n\r\nbody of {subject}\r\n",
            subject.replace(' ', "-")
        )
    };
    let delivered = |subject: &str| {
        let marker = format!("\nbody of {subject}");
        let mut found = String::new();
        wait_until(
            &format!("{subject} at the sink"),
            Duration::from_secs(30),
            || {
                found = sink
                    .messages()
                    .into_iter()
                    .find(|m| m.contains(&marker))
                    .unwrap_or_default();
                !found.is_empty()
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", postfix.log()));
        found
    };
    let subjects = |m: &str| -> Vec<String> {
        m.lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("subject:"))
            .map(str::to_string)
            .collect()
    };
    for (mode, port) in [
        ("smtpd", port),
        ("content filter", cf_port),
        ("milter", postfix.port),
    ] {
        let send = |action: &str, subject: &str| {
            send_from(port, "alice@sender.test", &message(action, subject))
        };
        for action in ["greylist", "soft reject"] {
            let r = send(action, &format!("{mode} {action}"));
            assert!(
                r.starts_with("451 4.7.1") && r.contains("Rspamd"),
                "{mode}, {action}: {r}"
            );
        }
        let r = send("reject", &format!("{mode} reject"));
        assert!(
            r.starts_with("550 5.7.1") && r.contains("Rspamd"),
            "{mode}: {r}"
        );

        let r = send("rewrite subject", &format!("{mode} rewrite"));
        assert!(r.starts_with("250"), "{mode}: {r}");
        let got = delivered(&format!("{mode} rewrite"));
        // Rspamd's own template (`*** SPAM *** %s`), as the only Subject.
        assert_eq!(
            subjects(&got),
            [format!("Subject: *** SPAM *** {mode} rewrite")],
            "{got}"
        );
        assert!(got.lines().any(|l| l == "X-Spam: Yes"), "{got}");

        let r = send("add header", &format!("{mode} tagged"));
        assert!(r.starts_with("250"), "{mode}: {r}");
        let got = delivered(&format!("{mode} tagged"));
        assert_eq!(subjects(&got), [format!("Subject: {mode} tagged")], "{got}");
        assert!(got.lines().any(|l| l == "X-Spam: Yes"), "{got}");

        let r = send("no action", &format!("{mode} clean"));
        assert!(r.starts_with("250"), "{mode}: {r}");
        let got = delivered(&format!("{mode} clean"));
        assert!(!got.lines().any(|l| l == "X-Spam: Yes"), "{got}");
        assert_eq!(subjects(&got), [format!("Subject: {mode} clean")], "{got}");
    }
    for refused in ["greylist", "soft reject", "reject"] {
        assert!(
            !sink
                .messages()
                .iter()
                .any(|m| m.contains(&format!("{refused}\r\n"))),
            "a refused message was delivered"
        );
    }
}

/// Runs Python with dkimpy (Debian's python3-dkim) on `script`, with `stdin`.
fn dkimpy(script: &str, stdin: &[u8]) -> String {
    use std::io::Write;
    let python = "/usr/bin/python3";
    assert!(
        std::path::Path::new("/usr/lib/python3/dist-packages/dkim/__init__.py").exists(),
        "dkimpy is missing: install it with `apt-get install -y python3-dkim` (`cargo xtask test` does this when run as root)"
    );
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dkim_signatures_from_an_independent_signer_verify_and_ours_verify_with_dkimpy() {
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\nmynetworks = \"127.0.0.2/32\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\ntransport = \"elsewhere.test=smtp:[127.0.0.1]:{}\"\n\
         [filter]\nenabled = true\nworkers = 1\n[spam.threshold]\nquarantine = 15.0\n\
         [dkim]\nsign = true\nselector = \"mb\"\n",
        free_port(),
        sink.port,
        sink.port
    ));
    // Our key, made by our tool; dkimpy signs the inbound test mail with the same key
    // for another domain, so one record serves both checks.
    let key = gw.path("dkim.key");
    let (code, out, err) = text(&gw.tool(
        "mb-dkim",
        &[
            "--json",
            "keygen",
            "--domain",
            "served.test",
            "--key",
            key.to_str().unwrap(),
        ],
    ));
    assert_eq!(code, 0, "{out}{err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["name"], "mb._domainkey.served.test");
    let value = record["value"].as_str().unwrap().to_string();
    assert!(value.starts_with("v=DKIM1; k=rsa; p=MII"), "{value}");
    let (code, out, _) = text(&gw.tool(
        "mb-dkim",
        &[
            "record",
            "--domain",
            "served.test",
            "--key",
            key.to_str().unwrap(),
        ],
    ));
    assert_eq!(code, 0);
    assert!(
        out.starts_with("mb._domainkey.served.test. IN TXT ( \"v=DKIM1; k=rsa; p="),
        "{out}"
    );
    let (code, _, err) = text(&gw.tool(
        "mb-dkim",
        &[
            "keygen",
            "--domain",
            "served.test",
            "--key",
            key.to_str().unwrap(),
        ],
    ));
    assert_eq!(code, 1, "an existing key is kept: {err}");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&gw.config)
        .and_then(|mut f| {
            use std::io::Write;
            writeln!(f, "key = \"{}\"", key.display())
        })
        .unwrap();

    // signed.test: SPF does not cover 127.0.0.1, DMARC says reject; only a valid DKIM
    // signature can get its mail in.
    let chunks: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let dns = mb_testkit::Dnsmasq::start(&[
        "--auth-server=ns.test,127.0.0.1".into(),
        "--auth-zone=test".into(),
        "--txt-record=signed.test,v=spf1 ip4:192.0.2.1 -all".into(),
        "--txt-record=_dmarc.signed.test,v=DMARC1; p=reject".into(),
        format!(
            "--txt-record=sel._domainkey.signed.test,{}",
            chunks.join(",")
        ),
    ])
    .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&gw.config)
        .and_then(|mut f| {
            use std::io::Write;
            writeln!(f, "[network.dns]\nservers = \"{}\"", dns.servers())
        })
        .unwrap();
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();

    let sign = format!(
        "import dkim,sys\nmsg=sys.stdin.buffer.read()\nkey=open('{}','rb').read()\n\
         sys.stdout.buffer.write(dkim.sign(msg,b'sel',b'signed.test',key,include_headers=[b'from',b'to',b'subject',b'date',b'message-id'])+msg)",
        key.display()
    );
    let message = |subject: &str, body: &str| {
        format!(
            "From: alice@signed.test\r\nTo: bob@served.test\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
             Message-ID: <{subject}@signed.test>\r\n\r\n{body}\r\n"
        )
    };
    let signed = dkimpy(&sign, message("dkim-good", "signed body").as_bytes());
    let r = send_from(port, "alice@signed.test", &signed);
    assert!(
        r.starts_with("250"),
        "a valid signature passes DMARC although SPF fails: {r}"
    );
    let tampered = dkimpy(&sign, message("dkim-bad", "signed body").as_bytes())
        .replace("signed body", "changed body");
    let r = send_from(port, "alice@signed.test", &tampered);
    assert!(
        r.starts_with("550 5.7.1") && r.contains("DMARC"),
        "a broken signature fails DKIM, so DMARC's reject applies: {r}"
    );
    wait_until("the inbound delivery", Duration::from_secs(20), || {
        sink.messages().iter().any(|m| m.contains("\nsigned body"))
    })
    .unwrap();
    let inbound = sink.messages().remove(0);
    assert!(
        inbound.contains("dkim=pass")
            && inbound.contains("header.i=@signed.test")
            && inbound.contains("dmarc=pass"),
        "{inbound}"
    );
    assert!(inbound.contains("spf=fail"), "{inbound}");

    // An ARC set made by dkimpy (as a mailing list would seal what it saw) verifies.
    let seal = format!(
        "import dkim,sys\nmsg=sys.stdin.buffer.read()\nkey=open('{}','rb').read()\n\
         sys.stdout.buffer.write(b''.join(dkim.arc_sign(msg,b'sel',b'signed.test',key,b'lists.test'))+msg)",
        key.display()
    );
    let listed = "Authentication-Results: lists.test; dkim=pass header.d=plain.test\r\n\
                  From: alice@plain.test\r\nTo: bob@served.test\r\nSubject: arc\r\n\
                  Date: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <arc@plain.test>\r\n\r\nsealed body\r\n";
    let sealed = dkimpy(&seal, listed.as_bytes());
    let r = send_from(port, "alice@plain.test", &sealed);
    assert!(r.starts_with("250"), "{r}");
    let mut arc = String::new();
    wait_until("the sealed delivery", Duration::from_secs(20), || {
        arc = sink
            .messages()
            .into_iter()
            .find(|m| m.contains("\nsealed body"))
            .unwrap_or_default();
        !arc.is_empty()
    })
    .unwrap();
    assert!(arc.contains("arc=pass"), "{arc}");
    assert!(arc.contains("ARC_PASS(-0.2)"), "{arc}");

    // Outbound from mynetworks: signed by mb-filter, verified by dkimpy.
    let swaks = mb_testkit::require("swaks", "swaks");
    let out = std::process::Command::new(swaks)
        .args([
            "--server",
            &format!("127.0.0.1:{port}"),
            "--local-interface",
            "127.0.0.2",
        ])
        .args(["--from", "bob@served.test", "--to", "carol@elsewhere.test"])
        .args([
            "--header",
            "Subject: outbound signed",
            "--body",
            "outbound body",
        ])
        .output()
        .unwrap();
    let (code, out, err) = text(&out);
    assert_eq!(code, 0, "{out}{err}");
    let mut outbound = String::new();
    wait_until("the outbound delivery", Duration::from_secs(20), || {
        outbound = sink
            .messages()
            .into_iter()
            .find(|m| m.contains("outbound body"))
            .unwrap_or_default();
        !outbound.is_empty()
    })
    .unwrap();
    assert!(
        outbound.contains("DKIM-Signature: v=1; a=rsa-sha256;"),
        "{outbound}"
    );
    assert!(
        outbound.contains("d=served.test") && outbound.contains("s=mb"),
        "{outbound}"
    );
    // smtp-sink's own fields on top are not signed; normalise line ends for dkimpy.
    let crlf = outbound.replace("\r\n", "\n").replace('\n', "\r\n");
    let verify = format!(
        "import dkim,sys\nmsg=sys.stdin.buffer.read()\n\
         print(dkim.verify(msg, dnsfunc=lambda name, timeout=5: b'{value}' if name == b'mb._domainkey.served.test.' else None))"
    );
    assert_eq!(
        dkimpy(&verify, crlf.as_bytes()).trim(),
        "True",
        "{outbound}"
    );
    let broken = crlf.replace("outbound body", "altered body");
    assert_eq!(dkimpy(&verify, broken.as_bytes()).trim(), "False");
}

#[test]
fn postfix_content_filter_mode_scans_and_reinjects_and_a_down_filter_defers() {
    let clamd = Clamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let (cf_port, reinject) = (free_port(), free_port());
    let master = [
        "mbfilter unix - - n - 10 smtp".to_string(),
        "  -o smtp_send_xforward_command=yes".into(),
        "  -o disable_dns_lookups=yes".into(),
        format!("127.0.0.1:{reinject} inet n - n - 10 smtpd"),
        "  -o content_filter=".into(),
        "  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters".into(),
        "  -o smtpd_recipient_restrictions=permit_mynetworks,reject".into(),
        "  -o smtpd_relay_restrictions=permit_mynetworks,reject".into(),
        "  -o mynetworks=127.0.0.0/8".into(),
    ]
    .join("\n");
    let postfix = mb_testkit::Postfix::start_with(
        &format!("[127.0.0.1]:{}", sink.port),
        &format!("content_filter = mbfilter:[127.0.0.1]:{cf_port}\nminimal_backoff_time = 1s\nmaximal_backoff_time = 2s\nqueue_run_delay = 1s\n"),
        &master,
    )
    .unwrap();
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [filter]\nenabled = true\nworkers = 1\nport = {cf_port}\nnext_hop = \"127.0.0.1:{reinject}\"\n\
         [clamav]\nenabled = true\naddress = \"{}\"\n",
        clamd.address()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    let send_raw = |message: &str| {
        let mut c = Raw::connect(postfix.port);
        c.reply();
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<alice@sender.test>");
        c.cmd("RCPT TO:<bob@served.test>");
        c.cmd("DATA");
        let r = c.cmd(&format!("{message}."));
        c.cmd("QUIT");
        r
    };
    let send_postfix = |subject: &str, body: &str| {
        send_raw(&format!(
            "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
             Message-ID: <{subject}@sender.test>\r\n\r\n{body}\r\n"
        ))
    };

    // Clean: Postfix -> mb-filter (10031) -> Postfix reinjection -> smtp-sink, with headers.
    assert!(send_postfix("cf-clean", "through the filter").starts_with("250"));
    wait_until(
        "the filtered message at the sink",
        Duration::from_secs(30),
        || {
            sink.messages()
                .iter()
                .any(|m| m.contains("\nthrough the filter"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", postfix.log()));
    let got = sink.messages().remove(0);
    assert!(got.contains("X-Spam-Status: No, score="), "{got}");
    // XFORWARD told the filter who the client was; the scan is in the message log.
    let mut log = serde_json::Value::Null;
    wait_until(
        "the scan in the message log",
        Duration::from_secs(20),
        || {
            log = json(&gw.tool("mb-log", &["--stage", "scanned", "--json"]));
            log.as_array().is_some_and(|a| !a.is_empty())
        },
    )
    .unwrap();
    assert_eq!(log[0]["client_ip"], "127.0.0.1", "{log:#}");
    assert_eq!(log[0]["subject"], "cf-clean", "{log:#}");
    assert!(
        !log[0]["queue_id"].as_str().unwrap_or("").is_empty(),
        "Postfix's queue id: {log:#}"
    );

    // Spoken to in LMTP, the filter answers once per recipient after the next hop took
    // the message.
    let mut lmtp = Raw::connect(cf_port);
    lmtp.reply();
    lmtp.cmd("LHLO postfix.test");
    lmtp.cmd("MAIL FROM:<alice@sender.test>");
    assert!(lmtp.cmd("RCPT TO:<bob@served.test>").starts_with("250"));
    assert!(lmtp.cmd("RCPT TO:<carol@served.test>").starts_with("250"));
    lmtp.cmd("DATA");
    let first = lmtp.cmd(
        "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: cf-lmtp\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
         Message-ID: <cf-lmtp@sender.test>\r\n\r\nlmtp body\r\n.",
    );
    let second = lmtp.reply();
    assert!(
        first.starts_with("250") && second.starts_with("250"),
        "{first} / {second}"
    );
    lmtp.cmd("QUIT");
    wait_until(
        "the LMTP message at the sink",
        Duration::from_secs(30),
        || sink.messages().iter().any(|m| m.contains("\nlmtp body")),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", postfix.log()));

    // A virus: the filter refuses it, Postfix returns it to the sender (the bounce goes
    // to the sink, which is the relay host for everything).
    let r = send_raw(&with_attachment("cf-virus", "eicar.txt", EICAR.as_bytes()));
    assert!(r.starts_with("250"), "{r}");
    wait_until(
        "Postfix's bounce for the virus",
        Duration::from_secs(30),
        || sink.messages().iter().any(|m| m.contains("virus found")),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", postfix.log()));
    assert!(
        !sink
            .messages()
            .iter()
            .any(|m| m.contains("Subject: cf-virus") && m.contains("X-Spam-Status")),
        "the infected message itself is never delivered"
    );

    // The filter is down: Postfix keeps the message and delivers it once it is back.
    let mut worker = gw.filters.remove(0);
    worker.stop(Duration::from_secs(10));
    assert!(send_postfix("cf-later", "delivered later").starts_with("250"));
    wait_until("Postfix defers", Duration::from_secs(30), || {
        postfix.log().contains("status=deferred")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", postfix.log()));
    assert!(
        !sink
            .messages()
            .iter()
            .any(|m| m.contains("delivered later"))
    );
    gw.start_filter(1).unwrap();
    wait_until(
        "the deferred message after the filter is back",
        Duration::from_secs(60),
        || {
            postfix.flush();
            sink.messages()
                .iter()
                .any(|m| m.contains("\ndelivered later"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", postfix.log()));
    let worker = daemon_status(&gw, "mb-filter@1");
    assert_eq!(
        worker["counters"]["content_filter_messages"], 1,
        "the restarted worker: {worker:#}"
    );
}

/// A clamd stand-in that answers "clean" after `delay`, so scans are in flight long
/// enough for a worker to die in the middle of them.
fn slow_clamd(delay: Duration) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut command = [0u8; 10];
                if conn.read_exact(&mut command).is_err() {
                    return;
                }
                loop {
                    let mut len = [0u8; 4];
                    if conn.read_exact(&mut len).is_err() {
                        return;
                    }
                    let n = u32::from_be_bytes(len) as usize;
                    if n == 0 {
                        break;
                    }
                    let mut chunk = vec![0u8; n];
                    if conn.read_exact(&mut chunk).is_err() {
                        return;
                    }
                }
                std::thread::sleep(delay);
                let _ = conn.write_all(b"stream: OK\0");
            });
        }
    });
    port
}

#[test]
fn killing_a_worker_under_load_loses_no_message() {
    let sink = SmtpSink::start(&[]).unwrap();
    let clamd = slow_clamd(Duration::from_millis(300));
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 100000\nconnection_rate = 100000\nmax_per_source = 100\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 2\nport = {}\n\
         [clamav]\nenabled = true\naddress = \"127.0.0.1:{clamd}\"\n",
        free_port(),
        sink.port,
        free_port()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_filter(2).unwrap();
    gw.start_smtpd().unwrap();
    const CLIENTS: usize = 4;
    const EACH: usize = 12;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut replies = Vec::new();
                let mut conn = Raw::connect(port);
                conn.reply();
                conn.cmd("EHLO load.test");
                for i in 0..EACH {
                    conn.cmd("MAIL FROM:<load@sender.test>");
                    conn.cmd("RCPT TO:<bob@served.test>");
                    conn.cmd("DATA");
                    let r = conn.cmd(&format!(
                        "From: load@sender.test\r\nTo: bob@served.test\r\nSubject: load {c}-{i}\r\n\
                         Date: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <{c}-{i}@sender.test>\r\n\r\nload body {c}-{i}\r\n."
                    ));
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    replies.push((format!("{c}-{i}"), r));
                }
                conn.cmd("QUIT");
                replies
            })
        })
        .collect();
    // A quarter of the way in, worker 1 dies without warning.
    wait_until("a quarter of the load", Duration::from_secs(60), || {
        sent.load(std::sync::atomic::Ordering::Relaxed) >= CLIENTS * EACH / 4
    })
    .unwrap();
    let mut first = gw.filters.remove(0);
    first.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = first.child.wait();
    let replies: Vec<(String, String)> = clients
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    // Scans take 300 ms and four run at once: some were on worker 1 when it died, and
    // mb-smtpd asked worker 2 again.
    assert!(
        gw.smtpd_log()
            .contains("mb-filter worker failed; trying the next"),
        "{}",
        gw.smtpd_log()
    );
    let refused: Vec<&(String, String)> = replies
        .iter()
        .filter(|(_, r)| !r.starts_with("250"))
        .collect();
    assert!(
        refused.is_empty(),
        "every message was accepted: {refused:?}\n{}",
        gw.smtpd_log()
    );
    // Every accepted message is delivered, once.
    wait_until("all deliveries", Duration::from_secs(60), || {
        sink.messages()
            .iter()
            .filter(|m| m.contains("\nload body "))
            .count()
            >= CLIENTS * EACH
    })
    .unwrap();
    let got = sink.messages();
    for (id, _) in &replies {
        let n = got
            .iter()
            .filter(|m| {
                m.contains(&format!("\nload body {id}\r\n"))
                    || m.contains(&format!("\nload body {id}\n"))
            })
            .count();
        assert_eq!(n, 1, "message {id} delivered {n} times");
    }
}

#[test]
fn postfix_with_the_milter_gets_verdicts_headers_policy_blocks_and_tempfails() {
    let clamd = Clamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let milter_port = free_port();
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [filter]\nenabled = true\nworkers = 1\nport = {}\n\
         [milter]\nenabled = true\nport = {milter_port}\n\
         [clamav]\nenabled = true\naddress = \"{}\"\n",
        free_port(),
        clamd.address()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_milter().unwrap();
    let postfix = mb_testkit::Postfix::start(
        &format!("[127.0.0.1]:{}", sink.port),
        &format!(
            "smtpd_milters = inet:127.0.0.1:{milter_port}\nmilter_default_action = tempfail\nmilter_protocol = 6\n"
        ),
    )
    .unwrap();
    let (code, out, err) = text(&gw.tool(
        "mb-policy",
        &[
            "add",
            "no-spammer",
            "--action",
            "block",
            "--from",
            "spammer.test",
        ],
    ));
    assert_eq!(code, 0, "{out}{err}");
    let session = |from: &str, message: &str| -> (String, String) {
        let mut c = Raw::connect(postfix.port);
        c.reply();
        c.cmd("EHLO client.test");
        let mail = c.cmd(&format!("MAIL FROM:<{from}>"));
        if !mail.starts_with("250") {
            c.cmd("QUIT");
            return (mail, String::new());
        }
        c.cmd("RCPT TO:<bob@served.test>");
        c.cmd("DATA");
        let r = c.cmd(&format!("{message}."));
        c.cmd("QUIT");
        (mail, r)
    };

    // Clean: delivered with the verdict's headers; the sender's X-Spam is removed.
    let (_, r) = session("alice@sender.test", CLEAN);
    assert!(r.starts_with("250"), "{r}");
    wait_until(
        "the clean message at the sink",
        Duration::from_secs(30),
        || sink.messages().iter().any(|m| m.contains("\nhello")),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", postfix.log()));
    let got = sink.messages().remove(0);
    assert!(got.contains("X-Spam-Status: No, score="), "{got}");
    assert!(!got.contains("X-Spam: Yes"), "{got}");
    // A virus: refused by Postfix at the end of DATA, as the client sees it.
    let (_, r) = session(
        "alice@sender.test",
        &with_attachment("milter-virus", "eicar.txt", EICAR.as_bytes()),
    );
    assert!(
        r.starts_with("554 5.7.1") && r.contains("virus found"),
        "{r}"
    );
    // A large message (spilled to a file by the milter) reaches the worker whole: the
    // virus at its very end is found.
    let filler = "All work and no play makes Jack a dull boy, all day long.\r\n".repeat(50_000);
    let big = with_attachment("milter-big", "eicar.txt", EICAR.as_bytes())
        .replace("see attached\r\n", &filler);
    assert!(big.len() > 2 << 20);
    let (_, r) = session("alice@sender.test", &big);
    assert!(
        r.starts_with("554 5.7.1") && r.contains("virus found"),
        "{r}"
    );
    // A blocked sender: refused at MAIL, before any data (once the milter has the policy).
    wait_until(
        "the milter loads the policy",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(gw.path("milter.log"))
                .unwrap_or_default()
                .contains("policies loaded count=1")
        },
    )
    .unwrap();
    let (mail, _) = session("boss@spammer.test", CLEAN);
    assert!(
        mail.starts_with("550 5.7.1") && mail.contains("policy no-spammer"),
        "{mail}"
    );
    // No filter worker: Postfix answers 451 at the end of DATA.
    let mut worker = gw.filters.remove(0);
    worker.stop(Duration::from_secs(10));
    let (_, r) = session(
        "alice@sender.test",
        &CLEAN.replace("Subject: clean", "Subject: later"),
    );
    assert!(r.starts_with("451 4.7.1"), "{r}");
    // mb-status shows the milter's counters.
    let milter = daemon_status(&gw, "mb-milter");
    assert_eq!(milter["counters"]["messages"], 4, "{milter:#}");
    assert_eq!(milter["counters"]["rejected"], 3, "{milter:#}");
    assert_eq!(milter["counters"]["tempfailed"], 1, "{milter:#}");
}

/// `milter.socket`: Postfix (its smtpd runs as user postfix) reaches mb-milter on a Unix
/// socket given to group postfix, and gets the same verdicts as over TCP; a user outside
/// the group who gets through the file permissions anyway (an administrator's chmod) is
/// refused by the peer-credential check and counted.
#[test]
fn postfix_reaches_the_milter_on_its_unix_socket_and_other_users_are_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let sink = SmtpSink::start(&[]).unwrap();
    // Postfix must be able to walk to the socket: a directory of its own under one that
    // anybody may pass through (the gateway's own directory is root's alone).
    let outer = tempfile::Builder::new()
        .prefix("mb-milter-sock-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let socket = outer.path().join("pf/milter.sock");
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [filter]\nenabled = true\nworkers = 1\nport = {}\n\
         [milter]\nenabled = true\nport = {}\nsocket = {:?}\nsocket_group = \"postfix\"\n",
        free_port(),
        free_port(),
        socket.display().to_string()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_milter().unwrap();
    wait_until("the milter socket", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .unwrap();
    let postfix_gid = nix::unistd::Group::from_name("postfix")
        .unwrap()
        .expect("group postfix (the postfix package)")
        .gid
        .as_raw();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "the socket's mode");
    assert_eq!(meta.gid(), postfix_gid, "the socket's group");
    let dir = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(
        dir.mode() & 0o777,
        0o750,
        "the directory made for the socket"
    );
    assert_eq!(dir.gid(), postfix_gid, "the directory's group");

    let postfix = mb_testkit::Postfix::start(
        &format!("[127.0.0.1]:{}", sink.port),
        &format!(
            "smtpd_milters = unix:{}\nmilter_default_action = tempfail\nmilter_protocol = 6\n",
            socket.display()
        ),
    )
    .unwrap();
    let mut c = Raw::connect(postfix.port);
    c.reply();
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<alice@sender.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@served.test>").starts_with("250"));
    c.cmd("DATA");
    let r = c.cmd(&format!("{CLEAN}."));
    c.cmd("QUIT");
    assert!(r.starts_with("250"), "{r}\n{}", postfix.log());
    wait_until(
        "the clean message at the sink",
        Duration::from_secs(30),
        || sink.messages().iter().any(|m| m.contains("\nhello")),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", postfix.log()));
    let got = sink.messages().remove(0);
    assert!(got.contains("X-Spam-Status: No, score="), "{got}");
    assert!(
        !got.contains("X-Spam: Yes"),
        "the sender's X-Spam stays: {got}"
    );
    assert!(
        !postfix.log().contains("milter unix:"),
        "Postfix complained about the milter: {}",
        postfix.log()
    );

    // Opened up by hand: user nobody passes the file permissions and is still refused.
    std::fs::set_permissions(
        socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    // Refused, the connection is closed at once: an empty read, or a reset when the
    // probe's packet arrived after the close.
    let probe = "import socket,struct,sys\n\
        s=socket.socket(socket.AF_UNIX)\n\
        s.connect(sys.argv[1])\n\
        s.settimeout(10)\n\
        try:\n\
        \x20   s.sendall(struct.pack('>IBIII',13,ord('O'),6,0x1ff,0x1fffff))\n\
        \x20   print('reply' if s.recv(100) else 'closed')\n\
        except (ConnectionResetError, BrokenPipeError):\n\
        \x20   print('closed')\n";
    let out = std::process::Command::new("python3")
        .args(["-c", probe])
        .arg(&socket)
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "closed",
        "user nobody on the milter socket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same probe as root (allowed) gets the negotiation reply: the probe can tell.
    let out = std::process::Command::new("python3")
        .args(["-c", probe])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "reply");
    let log = std::fs::read_to_string(gw.path("milter.log")).unwrap_or_default();
    assert!(
        log.contains("milter connection refused on milter.socket"),
        "{log}"
    );
    let milter = daemon_status(&gw, "mb-milter");
    assert_eq!(milter["counters"]["messages"], 1, "{milter:#}");
    assert_eq!(milter["counters"]["refused"], 1, "{milter:#}");
    assert!(
        milter["listening"].to_string().contains("milter unix:"),
        "{milter:#}"
    );
}

#[test]
fn miltertest_scripts_drive_the_milter_and_malformed_frames_close_only_their_connection() {
    let miltertest = mb_testkit::require("miltertest", "miltertest");
    let milter_port = free_port();
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [filter]\nenabled = true\nworkers = 1\nport = {}\n\
         [milter]\nenabled = true\nport = {milter_port}\n",
        free_port(),
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_milter().unwrap();
    // Three messages on one connection: a clean one (headers inserted and the sender's
    // X-Spam deleted), one aborted halfway, one with a blocked attachment (a reply code).
    let attachment = with_attachment("mt-blocked", "run.exe", b"MZ")
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace("\r\n", "\\r\\n");
    let (headers, body) = attachment.split_once("\\r\\n\\r\\n").unwrap();
    let mut script = format!(
        "conn = mt.connect(\"inet:{milter_port}@127.0.0.1\", 10, 0.5)\n\
         if conn == nil then error(\"connect failed\") end\n\
         if mt.negotiate(conn, nil, nil, nil) ~= nil then error(\"negotiate failed\") end\n\
         mt.macro(conn, SMFIC_CONNECT, \"j\", \"gw.served.test\")\n\
         if mt.conninfo(conn, \"client.test\", \"127.0.0.1\") ~= nil then error(\"conninfo failed\") end\n\
         if mt.helo(conn, \"client.test\") ~= nil then error(\"helo failed\") end\n\
         mt.macro(conn, SMFIC_MAIL, \"i\", \"MT0001\")\n\
         if mt.mailfrom(conn, \"<alice@sender.test>\") ~= nil then error(\"mailfrom failed\") end\n\
         if mt.getreply(conn) ~= SMFIR_CONTINUE then error(\"mailfrom reply\") end\n\
         if mt.rcptto(conn, \"<bob@served.test>\") ~= nil then error(\"rcptto failed\") end\n\
         if mt.getreply(conn) ~= SMFIR_CONTINUE then error(\"rcptto reply\") end\n\
         mt.header(conn, \"From\", \"alice@sender.test\")\n\
         mt.header(conn, \"Subject\", \"miltertest\")\n\
         mt.header(conn, \"Date\", \"Sun, 22 Nov 2026 01:00:00 +0000\")\n\
         mt.header(conn, \"Message-ID\", \"<mt1@sender.test>\")\n\
         mt.header(conn, \"X-Spam\", \"Yes\")\n\
         mt.eoh(conn)\n\
         mt.bodystring(conn, \"hello\\r\\n\")\n\
         if mt.eom(conn) ~= nil then error(\"eom failed\") end\n\
         if mt.getreply(conn) ~= SMFIR_CONTINUE then error(\"eom reply\") end\n\
         if not mt.eom_check(conn, MT_HDRINSERT, \"X-Spam-Status\") then error(\"no X-Spam-Status inserted\") end\n\
         if not mt.eom_check(conn, MT_HDRDELETE, \"X-Spam\") then error(\"X-Spam not deleted\") end\n\
         mt.echo(\"STATUS=\" .. mt.getheader(conn, \"X-Spam-Status\", 0))\n\
         if mt.mailfrom(conn, \"<alice@sender.test>\") ~= nil then error(\"mailfrom 2 failed\") end\n\
         mt.rcptto(conn, \"<bob@served.test>\")\n\
         mt.header(conn, \"Subject\", \"aborted\")\n\
         if mt.abort(conn) ~= nil then error(\"abort failed\") end\n\
         if mt.mailfrom(conn, \"<alice@sender.test>\") ~= nil then error(\"mailfrom 3 failed\") end\n\
         mt.rcptto(conn, \"<bob@served.test>\")\n"
    );
    for line in headers.split("\\r\\n") {
        let (name, value) = line.split_once(": ").unwrap();
        script.push_str(&format!("mt.header(conn, \"{name}\", \"{value}\")\n"));
    }
    script.push_str(&format!(
        "mt.eoh(conn)\nmt.bodystring(conn, \"{body}\")\n\
         if mt.eom(conn) ~= nil then error(\"eom 3 failed\") end\n\
         if mt.getreply(conn) ~= SMFIR_REPLYCODE then error(\"a blocked attachment gets a reply code\") end\n\
         mt.disconnect(conn)\nmt.echo(\"DONE\")\n"
    ));
    let file = gw.path("test.lua");
    std::fs::write(&file, &script).unwrap();
    let out = std::process::Command::new(miltertest)
        .arg("-s")
        .arg(&file)
        .output()
        .unwrap();
    let (code, stdout, stderr) = text(&out);
    assert_eq!(
        code,
        0,
        "{stdout}{stderr}\n{script}\n{}",
        std::fs::read_to_string(gw.path("milter.log")).unwrap_or_default()
    );
    assert!(stdout.contains("STATUS=No, score="), "{stdout}");
    assert!(stdout.contains("DONE"), "{stdout}");

    // Malformed frames close their own connection; the milter serves the next one.
    use std::io::{Read, Write};
    for bad in [
        &[0xffu8, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 0],
        &[0, 0, 0, 1, b'Z'],
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", milter_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bad).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed after {bad:?}");
    }
    let out = std::process::Command::new(mb_testkit::require("miltertest", "miltertest"))
        .arg("-s")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(text(&out).0, 0, "still serving: {}", text(&out).1);
    let milter = daemon_status(&gw, "mb-milter");
    assert_eq!(milter["counters"]["malformed"], 3, "{milter:#}");
    assert_eq!(milter["counters"]["messages"], 4, "{milter:#}");
}
