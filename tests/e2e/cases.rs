//! The filter cases (`tests/data/filter/*.case`, read by `mb_testkit::cases`) through a
//! real mb-filter worker: the cases with `dns` records, which the unit runner in
//! crates/mb-filter/src/cases.rs cannot run, and every other case too, so the unit
//! runner and the real daemon are known to agree (where they do not, `KNOWN_DIFFERENT`
//! says why).
//!
//! Cases that need the same gateway (the same `config`, `dns` records, policies and
//! client networks) share one: a private dnsmasq serving the records, mb-rpcd with the
//! policies added by `mb-policy`, one worker whose content filter (`filter.port`) hands
//! what passes to an smtp-sink. Each message goes through the content filter with
//! XFORWARD saying who the client was; the verdict is read from the SMTP reply, from
//! the message log (`mb-log --stage scanned --json`) and from the message delivered at
//! the sink.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mb_core::policy::{self, Policy};
use mb_core::verdict::{Action, Direction};
use mb_testkit::cases::{Case, DIR, load_all};
use mb_testkit::{Dnsmasq, Gateway, SmtpSink, free_port, text, wait_until};

/// Fewer cases with `dns` records than this ran: they were lost (a moved directory,
/// records dropped by mistake), and the test says so instead of passing on nothing.
const DNS_AT_LEAST: usize = 14;
/// Likewise for all cases (the unit runner's `AT_LEAST` plus `DNS_AT_LEAST`).
const AT_LEAST: usize = 74;
/// Cases the real worker judges differently from the unit runner, with the symbol that
/// makes the difference. Each must still differ, and by that symbol, so an entry goes
/// as soon as its cause is fixed. None do now: the last ones were messages without a
/// From field, which the worker's DMARC check took for a DMARC failure.
const KNOWN_DIFFERENT: &[(&str, &str)] = &[];
/// Added by the worker for every message whose sender it authenticated: the unit
/// runner has no resolver, so cases without `dns` never name it among the added fields.
/// It is removed from every message passed on, so a case's `removed` names it.
const AUTH_RESULTS: &str = "Authentication-Results";

#[test]
fn every_case_gives_its_expected_verdict_through_a_real_worker() {
    let started = Instant::now();
    let all = load_all(Path::new(DIR));
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (name, case) in &all {
        let case = match case {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{name}: unusable case: {e}"));
                continue;
            }
        };
        let mynetworks = match networks(case) {
            Ok(n) => n,
            // The unit runner covers it; a case that needs DNS has no other runner.
            Err(why) if case.dns.is_empty() => {
                skipped.push(format!("{name} ({why})"));
                continue;
            }
            Err(why) => {
                failures.push(format!("{name}: cannot run end to end: {why}"));
                continue;
            }
        };
        match groups.iter_mut().find(|g| g.fits(case, &mynetworks)) {
            Some(g) => g.cases.push((name, case)),
            None => groups.push(Group {
                mynetworks,
                cases: vec![(name, case)],
            }),
        }
    }
    let (mut ran, mut ran_dns) = (0, 0);
    for group in &groups {
        let (first, _) = group.cases[0];
        match group.run() {
            Ok(problems) => failures.extend(problems),
            Err(e) => failures.extend(group.cases.iter().map(|(name, _)| {
                format!("{name}: the gateway of its group (from {first} on) failed: {e:#}")
            })),
        }
        ran += group.cases.len();
        ran_dns += group
            .cases
            .iter()
            .filter(|(_, c)| !c.dns.is_empty())
            .count();
    }
    eprintln!(
        "cases: {ran} case(s) ({ran_dns} with DNS) on {} gateway(s) in {:.1}s; skipped: {skipped:?}",
        groups.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases in {DIR} failed end to end:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
    assert!(
        ran_dns >= DNS_AT_LEAST && ran >= AT_LEAST,
        "only {ran} cases ({ran_dns} with DNS) ran end to end from {DIR} (expected at least \
         {AT_LEAST} and {DNS_AT_LEAST}); skipped: {skipped:?}"
    );
}

/// `smtp.mynetworks` for a case: the content filter cannot carry an AUTH account
/// (Postfix does not forward it), so its direction comes from the client's network
/// alone, and an outbound case needs its client address in there.
fn networks(case: &Case) -> Result<String, &'static str> {
    let r = &case.request;
    if !r.auth_user.is_empty() {
        return Err("the content filter cannot carry an AUTH account");
    }
    match (r.direction, r.client_ip) {
        (Direction::Inbound, _) => Ok(String::new()),
        (Direction::Outbound, Some(ip)) => Ok(ip.to_string()),
        (Direction::Outbound, None) => {
            Err("outbound through the content filter needs a client address")
        }
    }
}

/// Cases that can share a gateway.
struct Group<'a> {
    mynetworks: String,
    cases: Vec<(&'a str, &'a Case)>,
}

impl<'a> Group<'a> {
    fn first(&self) -> &'a Case {
        self.cases[0].1
    }

    fn fits(&self, case: &Case, mynetworks: &str) -> bool {
        let first = self.first();
        self.mynetworks == mynetworks
            && first.config_text == case.config_text
            && first.dns == case.dns
            && first.policies == case.policies
    }

    /// Starts the group's gateway and runs its cases one after the other; returns a
    /// line for every case that failed, or an error when the gateway cannot run.
    fn run(&self) -> Result<Vec<String>> {
        let first = self.first();
        // A server even for no records: nothing the worker asks leaves the machine,
        // and every question it cannot answer is refused at once (no symbol), as the
        // unit runner's scans have no resolver at all.
        let dns = Dnsmasq::start(&first.dns).context("start dnsmasq")?;
        let sink = SmtpSink::start(&[]).context("start smtp-sink")?;
        let port = free_port();
        let domains: BTreeSet<&str> = self
            .cases
            .iter()
            .flat_map(|(_, c)| &c.request.recipients)
            .filter_map(|r| r.rsplit_once('@').map(|(_, d)| d))
            .collect();
        let overrides = format!(
            "[smtp]\nenabled = false\nhostname = \"gw.cases.test\"\ndomains = \"{}\"\nmynetworks = \"{}\"\n\
             [filter]\nenabled = true\nworkers = 1\nlisten = \"127.0.0.1\"\nport = {port}\n\
             next_hop = \"127.0.0.1:{}\"\n[network.dns]\nservers = \"{}\"\n",
            domains.into_iter().collect::<Vec<_>>().join(","),
            self.mynetworks,
            sink.port,
            dns.servers()
        );
        let mut gw = Gateway::new(&first.config_with(&overrides)?);
        gw.start().context("start mb-rpcd")?;
        add_policies(&gw, &first.policies)?;
        gw.start_filter(1).context("start mb-filter")?;
        wait_until(
            "the content filter to listen",
            Duration::from_secs(10),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        )?;
        let worker_log = || std::fs::read_to_string(gw.path("filter-1.log")).unwrap_or_default();
        if !first.policies.is_empty() {
            let loaded = format!("policies loaded count={}", first.policies.len());
            wait_until(
                "the worker loads the policies",
                Duration::from_secs(20),
                || worker_log().contains(&loaded),
            )
            .with_context(worker_log)?;
        }
        let mut failures = Vec::new();
        for (name, case) in &self.cases {
            let ran = run_case(&gw, port, &sink, name, case).unwrap_or_else(|e| Ran {
                problems: vec![format!("{e:#}")],
                symbols: Vec::new(),
            });
            let problems = known_difference(name, ran);
            if !problems.is_empty() {
                failures.push(format!(
                    "{name} ({}):\n    {}",
                    case.about,
                    problems.join("\n    ")
                ));
            }
        }
        if !failures.is_empty() {
            let log = worker_log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let last = failures.len() - 1;
            let _ = write!(
                failures[last],
                "\n    (the worker's log of this gateway ends with:\n      {})",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n      ")
            );
        }
        Ok(failures)
    }
}

/// What came of one case: every difference from its expectation, and the names of the
/// symbols the message log shows.
struct Ran {
    problems: Vec<String>,
    symbols: Vec<String>,
}

/// The problems of a case that stand: none for a case in `KNOWN_DIFFERENT` that differs
/// by its symbol, one for such a case that agrees now.
fn known_difference(name: &str, ran: Ran) -> Vec<String> {
    let Some((_, symbol)) = KNOWN_DIFFERENT.iter().find(|(n, _)| *n == name) else {
        return ran.problems;
    };
    if ran.problems.is_empty() {
        return vec![
            "gives its expected verdict end to end now: take it off KNOWN_DIFFERENT".into(),
        ];
    }
    if ran.symbols.iter().any(|s| s == symbol) {
        eprintln!(
            "cases: {name} differs by {symbol}, as known: {:?}",
            ran.problems
        );
        return Vec::new();
    }
    let mut problems = ran.problems;
    problems.push(format!(
        "(listed in KNOWN_DIFFERENT for {symbol}, which the worker did not add)"
    ));
    problems
}

/// The case's policies, added as an administrator would, then read back: what mb-rpcd
/// holds must be what the case says (the tool tells an address from a domain by its
/// `@`, and has defaults of its own).
pub(crate) fn add_policies(gw: &Gateway, policies: &[Policy]) -> Result<()> {
    for p in policies {
        let args = policy_args(p)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = text(&gw.tool("mb-policy", &args));
        ensure!(code == 0, "mb-policy {args:?} failed ({code}): {out}{err}");
    }
    let (code, out, err) = text(&gw.tool("mb-policy", &["--json", "list"]));
    ensure!(code == 0, "mb-policy list failed ({code}): {out}{err}");
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&out).with_context(|| format!("mb-policy list: {out}"))?;
    for p in policies {
        let held = listed
            .iter()
            .find(|l| l["name"] == p.name.as_str())
            .with_context(|| format!("policy {} is not listed: {out}", p.name))?;
        let same = held["priority"] == p.priority
            && held["object"] == p.object.as_str()
            && held["pattern"] == p.pattern.as_str()
            && held["direction"] == p.direction.as_str()
            && held["action"] == p.action.as_str()
            && held["tag"].as_f64() == p.tag
            && held["quarantine"].as_f64() == p.quarantine
            && held["reject"].as_f64() == p.reject
            && held["unauthenticated"] == p.unauthenticated;
        ensure!(same, "mb-rpcd holds {held} for policy {p:?}");
    }
    Ok(())
}

/// `mb-policy add` arguments for a case's policy.
fn policy_args(p: &Policy) -> Result<Vec<String>> {
    let mut args: Vec<String> = vec![
        "add".into(),
        p.name.clone(),
        "--action".into(),
        p.action.as_str().into(),
        "--priority".into(),
        p.priority.to_string(),
    ];
    match p.object {
        policy::Object::Default => args.push("--default".into()),
        policy::Object::Network => {
            ensure!(
                p.direction == policy::Direction::From,
                "policy {}: mb-policy adds network policies for the sender side only",
                p.name
            );
            args.extend(["--network".into(), p.pattern.clone()]);
        }
        policy::Object::Address | policy::Object::Domain => {
            let flag = match p.direction {
                policy::Direction::From => "--from",
                policy::Direction::To => "--to",
                policy::Direction::FromOrTo => "--from-or-to",
            };
            args.extend([flag.into(), p.pattern.clone()]);
        }
    }
    for (flag, v) in [
        ("--tag", p.tag),
        ("--quarantine", p.quarantine),
        ("--reject", p.reject),
    ] {
        if let Some(v) = v {
            args.extend([flag.into(), v.to_string()]);
        }
    }
    if p.unauthenticated {
        args.push("--unauthenticated".into());
    }
    Ok(args)
}

/// Sends one case through the content filter and compares what came of it with the
/// case's expectation; returns every difference (empty when it is as expected).
fn run_case(gw: &Gateway, port: u16, sink: &SmtpSink, name: &str, case: &Case) -> Result<Ran> {
    let want = &case.expect;
    let mut out = Vec::new();
    let mut symbols = Vec::new();
    let before = dumps(sink);
    let reply = send(port, name, case).context("sending through the content filter")?;
    let reply_line = reply.to_string();

    // The reply: a refusal's words, or a 250 for everything the gateway takes.
    match want.action {
        Action::Reject | Action::Tempfail => {
            let class = if want.action == Action::Reject { 5 } else { 4 };
            match want.code {
                Some(code) if reply.code != code => {
                    out.push(format!("reply is {reply_line:?}, expected code {code}"));
                }
                None if reply.code / 100 != class => {
                    out.push(format!("reply is {reply_line:?}, expected a {class}xx"));
                }
                _ => {}
            }
            if let Some(status) = want.status
                && reply.status != status.to_string()
            {
                out.push(format!(
                    "reply is {reply_line:?}, expected enhanced status {status}"
                ));
            }
            if let Some(text) = &want.text
                && &reply.text != text
            {
                out.push(format!("reply is {reply_line:?}, expected text {text:?}"));
            }
        }
        _ if reply.code != 250 => out.push(format!(
            "reply is {reply_line:?}, expected 250 for {}",
            want.action
        )),
        _ => {}
    }

    // The scan in the message log: under the case's name, or the quarantine id the
    // reply names.
    let id = reply
        .text
        .strip_prefix("Ok: quarantined as ")
        .unwrap_or(name)
        .to_string();
    let mut scanned = Vec::new();
    let logged = wait_until(
        "the scan in the message log",
        Duration::from_secs(15),
        || {
            let (code, stdout, _) =
                text(&gw.tool("mb-log", &["--id", &id, "--stage", "scanned", "--json"]));
            scanned = if code == 0 {
                serde_json::from_str(&stdout).unwrap_or_default()
            } else {
                Vec::new()
            };
            !scanned.is_empty()
        },
    );
    match (logged, scanned.as_slice()) {
        (Ok(()), [event]) => {
            out.extend(check_event(case, event));
            symbols = logged_symbols(event)
                .into_iter()
                .map(|(name, _)| name.to_string())
                .collect();
        }
        (Ok(()), events) => out.push(format!(
            "{} scans of {id} in the message log: {events:?}",
            events.len()
        )),
        (Err(e), _) => out.push(format!("no scan of {id} in the message log ({e})")),
    }

    // What the sink got: the message with the expected header changes, or nothing.
    let delivered: Vec<String> = dumps(sink).difference(&before).cloned().collect();
    let delivers = want.action.delivers();
    if delivers && reply.code == 250 {
        match delivered.as_slice() {
            [file] => out.extend(check_delivered(sink, file, case)),
            [] => out.push(format!(
                "nothing arrived at the next hop after {reply_line:?}"
            )),
            more => out.push(format!("{} messages arrived at the next hop", more.len())),
        }
    } else if !delivered.is_empty() {
        out.push(format!(
            "{} message(s) arrived at the next hop after {reply_line:?}",
            delivered.len()
        ));
    }
    Ok(Ran {
        problems: out,
        symbols,
    })
}

/// The symbols of a scan in the message log as (name, score to one decimal): the log
/// writes them `NAME(SCORE)`.
fn logged_symbols(event: &serde_json::Value) -> Vec<(&str, &str)> {
    let Some(symbols) = event["symbols"].as_array() else {
        return Vec::new();
    };
    symbols
        .iter()
        .filter_map(serde_json::Value::as_str)
        .map(|s| {
            s.strip_suffix(')')
                .and_then(|s| s.split_once('('))
                .unwrap_or((s, ""))
        })
        .collect()
}

/// The scan as the message log tells it, against the expectation.
fn check_event(case: &Case, event: &serde_json::Value) -> Vec<String> {
    let want = &case.expect;
    let mut out = Vec::new();
    let verdict = event["verdict"].as_str().unwrap_or_default();
    if verdict != want.action.as_str() {
        out.push(format!("action is {verdict}, expected {}", want.action));
    }
    let detail = event["detail"].as_str().unwrap_or_default();
    let text = want.text.as_deref().unwrap_or_default();
    if detail != text {
        out.push(format!("text is {detail:?}, expected {text:?}"));
    }
    let client = case.request.client_ip.map(|ip| ip.to_string());
    if event["client_ip"].as_str().unwrap_or_default() != client.as_deref().unwrap_or_default() {
        out.push(format!(
            "the worker saw client {}, expected {client:?}",
            event["client_ip"]
        ));
    }
    let symbols = logged_symbols(event);
    for (name, score) in want.required() {
        match (symbols.iter().find(|(n, _)| *n == name), score) {
            (None, _) => out.push(format!("symbol {name} is missing")),
            (Some((_, have)), Some(score)) if *have != score => {
                out.push(format!("symbol {name} scores {have}, expected {score}"));
            }
            _ => {}
        }
    }
    for name in &want.absent {
        if symbols.iter().any(|(n, _)| n == name) {
            out.push(format!("symbol {name} is there and must not be"));
        }
    }
    let score = event["score"].as_f64().unwrap_or_default();
    if event["score"].as_f64().is_none() {
        out.push(format!("no score logged: {}", event["score"]));
    }
    if let Some(min) = want.score_min
        && score < min - 1e-9
    {
        out.push(format!("score {score} is below {min}"));
    }
    if let Some(max) = want.score_max
        && score > max + 1e-9
    {
        out.push(format!("score {score} is above {max}"));
    }
    if !out.is_empty() {
        out.push(format!(
            "logged: {verdict} {score:.1} {detail:?} {}",
            event["symbols"]
        ));
    }
    out
}

/// The delivered message (`file` in the sink's directory) against the expected header
/// changes: the worker puts the fields it adds on top and drops the ones it removes,
/// so the message's fields are the added ones, then the original ones it kept.
fn check_delivered(sink: &SmtpSink, file: &str, case: &Case) -> Vec<String> {
    let want = &case.expect;
    let path = sink.dir.path().join(file);
    let read = || String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
    // smtp-sink writes the dump as the data arrives, with LF line endings: wait for
    // the end of the body (the header changes are checked below).
    let original = String::from_utf8_lossy(&case.message).replace("\r\n", "\n");
    let body = original.split_once("\n\n").map_or("", |(_, b)| b);
    let end: String = body
        .trim_end_matches('\n')
        .chars()
        .rev()
        .take(200)
        .collect();
    let end: String = end.chars().rev().collect();
    if wait_until(
        "the whole message at the sink",
        Duration::from_secs(15),
        || read().trim_end_matches('\n').ends_with(&end),
    )
    .is_err()
    {
        let dump = read();
        let tail = &dump[dump.floor_char_boundary(dump.len().saturating_sub(300))..];
        return vec![format!(
            "the message at the sink ({file}) does not end as the case's does ({end:?}): ...{tail:?}"
        )];
    }
    let dump = read();
    // The sink's own records and Received field come first.
    let fields = header_fields(&dump);
    let Some(start) = fields
        .iter()
        .position(|f| f.starts_with("Received:") && f.contains("by smtp-sink"))
    else {
        return vec![format!("no smtp-sink Received field in {dump:?}")];
    };
    let fields = &fields[start + 1..];
    let original = header_fields(&original);
    // Names as RFC 5322 compares them: any case, and white space before the colon
    // (the obsolete syntax of 4.5) not part of the name.
    let is = |f: &str, name: &str| {
        f.split_once(':')
            .is_some_and(|(n, _)| n.trim_end_matches([' ', '\t']).eq_ignore_ascii_case(name))
    };
    // Where the added fields end: before exactly the original fields less the removed
    // ones when the case names them, else before the longest tail that could be
    // original fields (in their order, some left out).
    let kept_from = match &want.removed {
        Some(removed) => {
            let kept: Vec<&String> = original
                .iter()
                .filter(|f| !removed.iter().any(|r| is(f, r)))
                .collect();
            let at = fields.len().checked_sub(kept.len());
            match at.filter(|&n| fields[n..].iter().eq(kept.iter().copied())) {
                Some(n) => n,
                None => {
                    return vec![format!(
                        "the delivered fields {fields:?} do not end with the original ones \
                         less {removed:?}: {kept:?}"
                    )];
                }
            }
        }
        None => (0..=fields.len())
            .find(|&n| {
                let mut rest = original.iter();
                fields[n..].iter().all(|f| rest.any(|o| o == f))
            })
            .unwrap_or(fields.len()),
    };
    let mut out = Vec::new();
    if let Some(headers) = &want.headers {
        let added: Vec<&String> = fields[..kept_from]
            .iter()
            .filter(|f| !(case.dns.is_empty() && is(f, AUTH_RESULTS)))
            .collect();
        if !added.iter().copied().eq(headers.iter()) {
            out.push(format!("adds {added:?}, expected {headers:?}"));
        }
    }
    out
}

/// The header fields of a message (LF line endings), each unfolded onto one line.
fn header_fields(message: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in message.split('\n') {
        if line.is_empty() {
            break;
        }
        match out.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) => last.push_str(line),
            _ => out.push(line.to_string()),
        }
    }
    out
}

/// The files in the sink's directory (one per transaction).
fn dumps(sink: &SmtpSink) -> BTreeSet<String> {
    std::fs::read_dir(sink.dir.path())
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// An SMTP reply, split.
struct Reply {
    code: u16,
    /// The enhanced status as written, empty when there is none.
    status: String,
    /// The lines' texts, joined by spaces.
    text: String,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.code, self.status, self.text)
    }
}

/// A line-oriented SMTP client that returns errors instead of panicking, so one case's
/// broken session fails that case alone.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        // Scanning a few megabytes in a debug build takes a while.
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Client {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    fn reply(&mut self) -> Result<Reply> {
        let (mut status, mut texts) = (String::new(), Vec::new());
        loop {
            let mut line = String::new();
            ensure!(
                self.r.read_line(&mut line)? > 0,
                "the connection closed (after {texts:?})"
            );
            let line = line.trim_end_matches(['\r', '\n']);
            let code = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("not a reply: {line:?}"))?;
            let rest = line.get(4..).unwrap_or_default();
            let (first, after) = rest.split_once(' ').unwrap_or((rest, ""));
            let is_status =
                first.split('.').count() == 3 && first.split('.').all(|p| p.parse::<u16>().is_ok());
            if is_status {
                status = first.to_string();
                texts.push(after.to_string());
            } else {
                texts.push(rest.to_string());
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply {
                    code,
                    status,
                    text: texts.join(" "),
                });
            }
        }
    }

    fn cmd(&mut self, line: &str, expect: u16) -> Result<Reply> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        let r = self.reply()?;
        if r.code != expect {
            bail!("{line:?} got {r}");
        }
        Ok(r)
    }
}

/// The case's envelope and message through the content filter; the reply to the
/// message.
fn send(port: u16, name: &str, case: &Case) -> Result<Reply> {
    let r = &case.request;
    let mut c = Client::connect(port)?;
    let greeting = c.reply()?;
    ensure!(greeting.code == 220, "greeting {greeting}");
    c.cmd("EHLO cases.test", 250)?;
    // As Postfix's content_filter client says it; IDENT makes the queue id the case's
    // name, as in the unit runner.
    let mut xforward = format!("XFORWARD IDENT={name}");
    match r.client_ip {
        Some(IpAddr::V6(ip)) => write!(xforward, " ADDR=IPV6:{ip}")?,
        Some(ip) => write!(xforward, " ADDR={ip}")?,
        None => xforward.push_str(" ADDR=[UNAVAILABLE]"),
    }
    if !r.helo.is_empty() {
        write!(xforward, " HELO={}", r.helo)?;
    }
    c.cmd(&xforward, 250)?;
    c.cmd(&format!("MAIL FROM:<{}>", r.sender), 250)?;
    for rcpt in &r.recipients {
        c.cmd(&format!("RCPT TO:<{rcpt}>"), 250)?;
    }
    c.cmd("DATA", 354)?;
    // Dot-stuffed, and ended by a line break of its own when the message has none.
    let mut data = Vec::with_capacity(case.message.len() + 64);
    for line in case.message.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b".") {
            data.push(b'.');
        }
        data.extend_from_slice(line);
    }
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(b".\r\n");
    c.w.write_all(&data)?;
    let reply = c.reply()?;
    let _ = c.cmd("QUIT", 221);
    Ok(reply)
}
