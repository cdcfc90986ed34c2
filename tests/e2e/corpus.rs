//! The adversarial corpus (tests/data/corpus/, read by `mb_testkit::cases::load_corpus`)
//! through the three ways a site deploys the gateway, on one gateway: mb-smtpd
//! standalone (inline scan), mb-filter's content filter port with XFORWARD and
//! reinjection to an smtp-sink, and mb-milter driven as Postfix drives it. One real
//! worker, one real clamd, one dnsmasq serving every record the cases name
//! (authoritative for `test.`, so absent names are NXDOMAIN).
//!
//! Every case must get its expected verdict in every mode, and the three modes must
//! agree: the same action and the same symbols with the same scores, as the message log
//! shows them (`mb-log --stage scanned --json`). Forged Authentication-Results and
//! X-Spam fields must be gone from everything delivered, whichever mode delivered it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use mb_core::policy::Policy;
use mb_core::verdict::{Action, Direction};
use mb_testkit::cases::{CORPUS_DIR, Case, load_corpus};
use mb_testkit::mta::{self, Envelope, Reply};
use mb_testkit::{Clamd, Dnsmasq, Gateway, SmtpSink, free_port, text, wait_until};

/// Fewer cases than this ran: cases were lost, and the test says so instead of passing
/// on nothing.
const AT_LEAST: usize = 60;
/// The only client the standalone mode can present is the test's own address, so every
/// case is written for it (its SPF records allow or refuse 127.0.0.1).
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Fields the worker adds under these names are its own; any other copy is a forgery
/// that must not reach the next hop.
const OUR_AUTHSERV: &str = "gw.served.test";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Standalone,
    ContentFilter,
    Milter,
}

const MODES: [Mode; 3] = [Mode::Standalone, Mode::ContentFilter, Mode::Milter];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::ContentFilter => "content-filter",
            Mode::Milter => "milter",
        }
    }
}

/// One message sent in one mode: when (so its scan can be found in the message log by
/// time, since mb-smtpd makes its own queue ids) and what the client was told.
struct Sent {
    case: usize,
    mode: Mode,
    from_ms: i64,
    to_ms: i64,
    outcome: Result<Answer>,
    scan: Option<serde_json::Value>,
}

struct Answer {
    /// The reply to the message itself, or the command that ended the transaction.
    at: &'static str,
    reply: Reply,
    /// The milter's header removals, as (name, index).
    removed: Vec<(String, u32)>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[test]
fn every_corpus_case_gets_its_verdict_alike_in_all_three_modes() {
    let started = Instant::now();
    let loaded = load_corpus(Path::new(CORPUS_DIR));
    let mut failures = Vec::new();
    let mut cases: Vec<(&str, &Case)> = Vec::new();
    for (name, case) in &loaded {
        match case {
            Ok(c) => match fits(c) {
                Ok(()) => cases.push((name, c)),
                Err(why) => failures.push(format!("{name}: cannot run in the corpus: {why}")),
            },
            Err(e) => failures.push(format!("{name}: unusable case: {e}")),
        }
    }
    let (sent, forged) = match run(&cases) {
        Ok(ran) => ran,
        Err(e) => panic!("the corpus gateway failed: {e:#}\n{}", failures.join("\n")),
    };
    failures.extend(forged);
    let mut table = String::new();
    for (i, (name, case)) in cases.iter().enumerate() {
        let mine: Vec<&Sent> = sent.iter().filter(|s| s.case == i).collect();
        let problems = check_case(case, &mine);
        let _ = writeln!(table, "corpus: {name}: {}", summary(&mine));
        if !problems.is_empty() {
            failures.push(format!(
                "{name} ({}):\n    {}",
                case.about,
                problems.join("\n    ")
            ));
        }
    }
    eprint!("{table}");
    eprintln!(
        "corpus: {} case(s) in 3 modes in {:.1}s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failure(s) in the corpus of {} cases:\n{}",
        failures.len(),
        loaded.len(),
        failures.join("\n")
    );
    assert!(
        cases.len() >= AT_LEAST,
        "only {} corpus cases ran from {CORPUS_DIR} (expected at least {AT_LEAST})",
        cases.len()
    );
}

/// What every corpus case must share with the others to run on the one gateway.
fn fits(case: &Case) -> Result<(), String> {
    let r = &case.request;
    if r.client_ip != Some(CLIENT) {
        return Err(format!(
            "client_ip must be {CLIENT}, the standalone mode's client"
        ));
    }
    if r.direction != Direction::Inbound || !r.auth_user.is_empty() {
        return Err("corpus cases are inbound and unauthenticated".into());
    }
    if !case.config_text.trim().is_empty() {
        return Err("corpus cases share one gateway: no `config` of their own".into());
    }
    Ok(())
}

/// Starts the gateway, sends every case in every mode, then reads the scans from the
/// message log and the deliveries from the sink; returns the sends with their scans,
/// and every forged field that reached the next hop.
fn run(cases: &[(&str, &Case)]) -> Result<(Vec<Sent>, Vec<String>)> {
    let mut records: Vec<String> = Vec::new();
    let mut policies: Vec<&Policy> = Vec::new();
    let mut domains = BTreeSet::new();
    for (name, case) in cases {
        for r in &case.dns {
            if !records.contains(r) {
                records.push(r.clone());
            }
        }
        for p in &case.policies {
            match policies.iter().find(|q| q.name == p.name) {
                Some(q) => ensure!(
                    q.object == p.object
                        && q.pattern == p.pattern
                        && q.direction == p.direction
                        && q.action == p.action
                        && q.unauthenticated == p.unauthenticated,
                    "{name}: policy {} differs from another case's policy of that name",
                    p.name
                ),
                None => policies.push(p),
            }
        }
        for rcpt in &case.request.recipients {
            if let Some((_, d)) = rcpt.rsplit_once('@') {
                domains.insert(d.to_ascii_lowercase());
            }
        }
    }
    let clamd = Clamd::start().context("start clamd")?;
    let dns = Dnsmasq::start(&records).context("start dnsmasq")?;
    let sink = SmtpSink::start(&[]).context("start smtp-sink")?;
    let (smtp_port, cf_port, milter_port) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp_port}\nrate_per_source = 100000\nconnection_rate = 100000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [network.dns]\nservers = \"{}\"\n\
         [smtp]\nhostname = \"{OUR_AUTHSERV}\"\ndomains = \"{}\"\nmynetworks = \"\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\nport = {cf_port}\nnext_hop = \"127.0.0.1:{}\"\n\
         [milter]\nenabled = true\nport = {milter_port}\n\
         [clamav]\nenabled = true\naddress = \"{}\"\n",
        free_port(),
        dns.servers(),
        domains.into_iter().collect::<Vec<_>>().join(","),
        sink.port,
        sink.port,
        clamd.address()
    ));
    gw.start().context("start mb-rpcd")?;
    let owned: Vec<Policy> = policies.iter().map(|p| (*p).clone()).collect();
    crate::cases::add_policies(&gw, &owned)?;
    gw.start_filter(1).context("start mb-filter")?;
    gw.start_smtpd().context("start mb-smtpd")?;
    gw.start_milter().context("start mb-milter")?;
    let worker_log = || std::fs::read_to_string(gw.path("filter-1.log")).unwrap_or_default();
    for port in [smtp_port, cf_port, milter_port] {
        wait_until("the gateway to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
    }
    if !owned.is_empty() {
        let loaded = format!("policies loaded count={}", owned.len());
        wait_until(
            "the worker loads the policies",
            Duration::from_secs(20),
            || worker_log().contains(&loaded),
        )
        .with_context(worker_log)?;
    }

    let since = now_ms();
    let mut sent = Vec::new();
    for (i, (name, case)) in cases.iter().enumerate() {
        for mode in MODES {
            let env = Envelope {
                queue_id: match mode {
                    Mode::Standalone => String::new(),
                    Mode::ContentFilter => format!("{name}-cf"),
                    Mode::Milter => format!("{name}-milter"),
                },
                client_ip: case.request.client_ip,
                helo: case.request.helo.clone(),
                sender: case.request.sender.clone(),
                recipients: case.request.recipients.clone(),
            };
            let from_ms = now_ms();
            let outcome = match mode {
                Mode::Standalone => {
                    mta::smtp(smtp_port, &env, &case.message, false).map(|o| Answer {
                        at: o.at,
                        reply: o.reply,
                        removed: Vec::new(),
                    })
                }
                Mode::ContentFilter => {
                    mta::smtp(cf_port, &env, &case.message, true).map(|o| Answer {
                        at: o.at,
                        reply: o.reply,
                        removed: Vec::new(),
                    })
                }
                Mode::Milter => mta::milter(milter_port, &env, &case.message).map(|o| Answer {
                    at: if o.at == "eom" { "DATA" } else { o.at },
                    reply: o.reply,
                    removed: o.removed,
                }),
            };
            sent.push(Sent {
                case: i,
                mode,
                from_ms,
                to_ms: now_ms(),
                outcome,
                scan: None,
            });
            // The log keeps milliseconds: a pause makes the windows disjoint, so a scan
            // at the very end of one cannot be taken for the start of the next.
            std::thread::sleep(Duration::from_millis(3));
        }
    }

    // The scans, matched to the sends by time: the messages went one after the other,
    // and each scan is logged before its reply is sent. Every transaction that got to
    // the end of DATA has one, except what mb-smtpd refused while reading it: so the
    // log is read until it has them all, or until it has stopped growing (the workers
    // send their events every 200 ms).
    let expected = sent
        .iter()
        .filter(|s| s.outcome.as_ref().is_ok_and(|a| a.at == "DATA"))
        .count();
    let age = format!("{}s", (now_ms() - since) / 1000 + 60);
    let read_log = || -> Vec<serde_json::Value> {
        let (code, stdout, _) = text(&gw.tool(
            "mb-log",
            &[
                "--stage", "scanned", "--json", "--since", &age, "--limit", "5000",
            ],
        ));
        if code == 0 {
            serde_json::from_str(&stdout).unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = read_log();
    let mut unchanged_since = Instant::now();
    while events.len() < expected
        && Instant::now() < deadline
        && unchanged_since.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(250));
        let now = read_log();
        if now.len() != events.len() {
            unchanged_since = Instant::now();
        }
        events = now;
    }
    for event in events {
        let at = event["at_unix_ms"].as_i64().unwrap_or_default();
        if let Some(s) = sent
            .iter_mut()
            .find(|s| s.from_ms <= at && at <= s.to_ms && s.scan.is_none())
        {
            s.scan = Some(event);
        }
    }

    // What reached the next hop: every delivery of the standalone and content-filter
    // modes (mb-smtpd relays in the background).
    let delivered = sent
        .iter()
        .filter(|s| s.mode != Mode::Milter)
        .filter(|s| {
            s.scan
                .as_ref()
                .is_some_and(|e| matches!(e["verdict"].as_str(), Some("accept" | "tag")))
        })
        .count();
    let dumps = || {
        std::fs::read_dir(sink.dir.path())
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let arrived = wait_until(
        "every delivery at the sink",
        Duration::from_secs(60),
        || dumps().len() >= delivered,
    );
    let mut forged = Vec::new();
    for path in dumps() {
        // smtp-sink writes the header section first: it is there even while the body
        // is still arriving.
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
        let id = text
            .lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .unwrap_or("(no Message-ID)")
            .to_string();
        forged.extend(
            forgeries(&text)
                .into_iter()
                .map(|f| format!("delivered {id} ({}): {f}", path.display())),
        );
    }
    if let Err(e) = arrived {
        forged.push(format!(
            "{e}: {} of {delivered} messages arrived at the next hop",
            dumps().len()
        ));
    }
    Ok((sent, forged))
}

/// The forged fields in a message as smtp-sink dumped it (LF line endings, its own
/// records and Received field first): any Authentication-Results not ours, any
/// X-Spam-Flag or X-Spam-Level (we write neither), and a second X-Spam, X-Spam-Score or
/// X-Spam-Status (we write one each).
fn forgeries(dump: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    for line in dump.split('\n') {
        if line.is_empty() {
            break;
        }
        match fields.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) => last.push_str(line),
            _ => fields.push(line.to_string()),
        }
    }
    let Some(start) = fields
        .iter()
        .position(|f| f.starts_with("Received:") && f.contains("by smtp-sink"))
    else {
        return vec!["no smtp-sink Received field".into()];
    };
    let fields = &fields[start + 1..];
    let named = |name: &str| -> Vec<&String> {
        fields
            .iter()
            .filter(|f| {
                f.split_once(':').is_some_and(|(n, _)| {
                    n.trim_end_matches([' ', '\t']).eq_ignore_ascii_case(name)
                })
            })
            .collect()
    };
    let mut out = Vec::new();
    for f in named("Authentication-Results") {
        let value = f.split_once(':').map_or("", |(_, v)| v).trim_start();
        if !value.starts_with(OUR_AUTHSERV) {
            out.push(format!("kept {f:?}"));
        }
    }
    for name in ["X-Spam-Flag", "X-Spam-Level"] {
        out.extend(named(name).into_iter().map(|f| format!("kept {f:?}")));
    }
    for name in ["X-Spam", "X-Spam-Score", "X-Spam-Status"] {
        let all = named(name);
        if all.len() > 1 {
            out.push(format!("{} {name} fields: {all:?}", all.len()));
        }
    }
    out
}

/// One line per case: each mode's reply and scan.
fn summary(sent: &[&Sent]) -> String {
    sent.iter()
        .map(|s| {
            let reply = match &s.outcome {
                Ok(a) => format!("{}@{}", a.reply.code, a.at),
                Err(e) => format!("error {e:#}"),
            };
            let scan = s.scan.as_ref().map_or("no scan".to_string(), |e| {
                format!(
                    "{} {:.1} {}",
                    e["verdict"].as_str().unwrap_or_default(),
                    e["score"].as_f64().unwrap_or_default(),
                    symbols(e).join(",")
                )
            });
            format!("{}=[{reply} {scan}]", s.mode.name())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn symbols(event: &serde_json::Value) -> Vec<String> {
    event["symbols"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(serde_json::Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Every difference of one case from its expectation, in each mode, and between modes.
fn check_case(case: &Case, sent: &[&Sent]) -> Vec<String> {
    let mut out = Vec::new();
    for s in sent {
        let mode = s.mode.name();
        let problems = check_mode(case, s);
        out.extend(problems.into_iter().map(|p| format!("{mode}: {p}")));
    }
    // The modes agree: the same action and the same symbols with the same scores.
    let seen: Vec<(&str, String, Vec<String>)> = sent
        .iter()
        .filter_map(|s| {
            s.scan.as_ref().map(|e| {
                let mut syms = symbols(e);
                syms.sort();
                (
                    s.mode.name(),
                    e["verdict"].as_str().unwrap_or_default().to_string(),
                    syms,
                )
            })
        })
        .collect();
    if let Some((first, rest)) = seen.split_first()
        && rest.iter().any(|o| o.1 != first.1 || o.2 != first.2)
    {
        out.push(format!("the modes disagree: {seen:?}"));
    }
    // A refusal reads the same everywhere, and a refusal before the scan (standalone)
    // must be one the others' scans make for that reason alone, with no symbol.
    let replies: Vec<(&str, String)> = sent
        .iter()
        .filter_map(|s| {
            s.outcome
                .as_ref()
                .ok()
                .map(|a| (s.mode.name(), a.reply.to_string()))
        })
        .collect();
    let refused = replies.iter().any(|(_, r)| !r.starts_with("250"));
    if refused && replies.iter().any(|(_, r)| *r != replies[0].1) {
        out.push(format!(
            "the modes refuse with different replies: {replies:?}"
        ));
    }
    if seen.len() < sent.len() && seen.iter().any(|(_, _, syms)| !syms.is_empty()) {
        out.push(format!(
            "refused before the scan in one mode, with symbols in the others: {seen:?}"
        ));
    }
    out
}

fn check_mode(case: &Case, s: &Sent) -> Vec<String> {
    let want = &case.expect;
    let mut out = Vec::new();
    let answer = match &s.outcome {
        Ok(a) => a,
        Err(e) => return vec![format!("the session failed: {e:#}")],
    };
    let reply = &answer.reply;
    if answer.at != "DATA" {
        out.push(format!("refused at {}: {reply}", answer.at));
        return out;
    }
    match want.action {
        Action::Reject | Action::Tempfail => {
            let class = if want.action == Action::Reject { 5 } else { 4 };
            if reply.code / 100 != class || want.code.is_some_and(|c| c != reply.code) {
                out.push(format!(
                    "reply is {reply}, expected {:?} ({class}xx)",
                    want.code
                ));
            }
            if let Some(status) = want.status
                && reply.status != status.to_string()
            {
                out.push(format!(
                    "reply is {reply}, expected enhanced status {status}"
                ));
            }
            if let Some(text) = &want.text
                && &reply.text != text
            {
                out.push(format!("reply is {reply}, expected text {text:?}"));
            }
        }
        _ if reply.code != 250 => out.push(format!(
            "reply is {reply}, expected 250 for {}",
            want.action
        )),
        _ => {}
    }
    let Some(event) = &s.scan else {
        // mb-smtpd refuses what RFC 5321 forbids (a NUL, an over-long line) while it
        // reads DATA, before any scan; `check_case` holds the other modes to its reply.
        if !(s.mode == Mode::Standalone && reply.code >= 400) {
            out.push("no scan in the message log".into());
        }
        return out;
    };
    let verdict = event["verdict"].as_str().unwrap_or_default();
    if verdict != want.action.as_str() {
        out.push(format!("action is {verdict}, expected {}", want.action));
    }
    let logged: Vec<(String, String)> = symbols(event)
        .into_iter()
        .map(
            |s| match s.strip_suffix(')').and_then(|s| s.split_once('(')) {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (s, String::new()),
            },
        )
        .collect();
    for (name, score) in want.required() {
        match (logged.iter().find(|(n, _)| n == name), score) {
            (None, _) => out.push(format!("symbol {name} is missing")),
            (Some((_, have)), Some(score)) if have != score => {
                out.push(format!("symbol {name} scores {have}, expected {score}"));
            }
            _ => {}
        }
    }
    for name in &want.absent {
        if logged.iter().any(|(n, _)| n == name) {
            out.push(format!("symbol {name} is there and must not be"));
        }
    }
    let score = event["score"].as_f64().unwrap_or_default();
    if want.score_min.is_some_and(|min| score < min - 1e-9) {
        out.push(format!("score {score} is below {:?}", want.score_min));
    }
    if want.score_max.is_some_and(|max| score > max + 1e-9) {
        out.push(format!("score {score} is above {:?}", want.score_max));
    }
    // The milter removes every forged field it was handed, each by its index.
    if s.mode == Mode::Milter && matches!(verdict, "accept" | "tag") {
        let (fields, _) = mta::split_message(&case.message);
        for name in mb_core::message::FORGEABLE {
            let had = fields
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .count();
            let gone = answer
                .removed
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .count();
            if had != gone {
                out.push(format!("the milter removed {gone} of {had} {name} fields"));
            }
        }
    }
    if !out.is_empty() {
        out.push(format!(
            "logged: {verdict} {score:.1} {:?} {}",
            event["detail"].as_str().unwrap_or_default(),
            event["symbols"]
        ));
    }
    out
}
