//! The openspf.org RFC 7208 test suite (`tests/data/openspf/rfc7208-tests.yml`, with its
//! LICENSE) run against `mb_spf::verify`: each scenario's zone served by the test kit's
//! authoritative DNS server, each case evaluated with its client address, HELO and MAIL
//! FROM through a hickory resolver pointed at that server, as the filter's own is at
//! `network.dns.servers`. A case agrees when the result is one the suite allows
//! (explanations are not compared). That the filter's sender checks report this
//! evaluator's verdict is tested in mb-filter (`spf.rs`).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use mail_auth::hickory_resolver::TokioResolver;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{MessageAuthenticator, SpfResult};
use mb_testkit::{AuthDns, Rr, Zone};
use yaml_rust2::{Yaml, YamlLoader};

/// Cases whose disagreement is known and accepted, with the reason. The test fails when
/// one of them agrees again, so this list can only shrink.
const KNOWN_DISAGREEMENTS: &[(&str, &str)] = &[];

/// The suite has 203 cases; far fewer means the file was not read as it should be.
const MIN_CASES: usize = 200;

struct Case {
    scenario: String,
    name: String,
    helo: String,
    host: String,
    mailfrom: String,
    allowed: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openspf_rfc7208_suite_agrees() {
    let path = format!(
        "{}/../../tests/data/openspf/rfc7208-tests.yml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let known: BTreeMap<&str, &str> = KNOWN_DISAGREEMENTS.iter().copied().collect();
    let mut names = HashSet::new();
    let mut disagreements = Vec::new();
    let mut agreeing_known = Vec::new();
    let mut run = 0;
    // Every scenario has a server of its own (the same names hold other records in
    // other scenarios) and all cases run at once, so the cases waiting out a TIMEOUT
    // overlap.
    let mut servers = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for doc in &docs {
        let scenario = doc["description"].as_str().unwrap_or("?").to_string();
        let server = AuthDns::start(zone(&doc["zonedata"])).expect("the DNS server starts");
        let resolver = resolver(server.port);
        servers.push(server);
        for case in cases(&scenario, &doc["tests"]) {
            assert!(names.insert(case.name.clone()), "case {} twice", case.name);
            let resolver = resolver.clone();
            tasks.spawn(async move {
                let ip = case
                    .host
                    .parse()
                    .unwrap_or_else(|e| panic!("{}: host {:?}: {e}", case.name, case.host));
                let request = super::Request {
                    ip,
                    helo: &case.helo,
                    sender: &case.mailfrom,
                    receiver: "receiver.test",
                };
                let got = name(super::verify(&resolver, &request).await.result());
                (case, got)
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (case, got) = done.expect("a case ran to its end");
        run += 1;
        let agrees = case.allowed.iter().any(|a| a == got);
        match (agrees, known.get(case.name.as_str())) {
            (true, Some(_)) => agreeing_known.push(case.name.clone()),
            (false, None) => disagreements.push(format!(
                "{} / {}: expected {}, got {got}",
                case.scenario,
                case.name,
                case.allowed.join(" or ")
            )),
            _ => {}
        }
    }
    drop(servers);
    for name in known.keys() {
        assert!(
            names.contains(*name),
            "KNOWN_DISAGREEMENTS names {name}, which the suite does not have"
        );
    }
    disagreements.sort();
    assert!(run >= MIN_CASES, "only {run} cases ran, the suite has 203");
    assert!(
        disagreements.is_empty(),
        "{} of {run} cases disagree with the openspf suite:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    assert!(
        agreeing_known.is_empty(),
        "these cases agree now: remove them from KNOWN_DISAGREEMENTS: {agreeing_known:?}"
    );
}

fn name(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

/// A resolver on the scenario's server. Short timeouts: the suite's TIMEOUT names never
/// answer, and each such case waits out one.
fn resolver(port: u16) -> TokioResolver {
    let on_port = |mut c: ConnectionConfig| {
        c.port = port;
        c
    };
    let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
        [127, 0, 0, 1].into(),
        true,
        vec![
            on_port(ConnectionConfig::udp()),
            on_port(ConnectionConfig::tcp()),
        ],
    )]);
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(1500);
    opts.attempts = 1;
    MessageAuthenticator::new(config, opts)
        .expect("a resolver")
        .0
}

fn cases(scenario: &str, tests: &Yaml) -> Vec<Case> {
    let Some(tests) = tests.as_hash() else {
        panic!("{scenario}: no tests");
    };
    tests
        .iter()
        .map(|(name, t)| {
            let name = name.as_str().expect("a case name").to_string();
            let text = |key: &str| match &t[key] {
                Yaml::String(s) => s.clone(),
                other => panic!("{name}: {key} is {other:?}"),
            };
            let allowed = match &t["result"] {
                Yaml::String(s) => vec![s.clone()],
                Yaml::Array(a) => a
                    .iter()
                    .filter_map(|r| r.as_str().map(String::from))
                    .collect(),
                other => panic!("{name}: result is {other:?}"),
            };
            Case {
                scenario: scenario.to_string(),
                helo: text("helo"),
                host: text("host"),
                mailfrom: text("mailfrom"),
                allowed,
                name,
            }
        })
        .collect()
}

/// The scenario's zone, read as pyspf's driver reads it: a name's SPF (type 99) records
/// are also served as TXT unless it lists TXT records of its own (the suite relies on
/// this "auto-magic duplication"), `TXT: NONE` only says there are none, and `TIMEOUT`
/// makes queries for the types the name has no records of go unanswered.
fn zone(data: &Yaml) -> Zone {
    let mut zone = Zone::new();
    let Some(data) = data.as_hash() else {
        return zone;
    };
    for (owner, entries) in data {
        let owner = owner.as_str().expect("an owner name");
        let entries = entries.as_vec().map(Vec::as_slice).unwrap_or_default();
        let has_txt = entries.iter().any(|e| {
            e.as_hash()
                .is_some_and(|h| h.contains_key(&Yaml::String("TXT".into())))
        });
        for entry in entries {
            if entry.as_str() == Some("TIMEOUT") {
                zone.timeout(owner).expect("a name");
                continue;
            }
            let Some(map) = entry.as_hash() else {
                panic!("{owner}: entry {entry:?}");
            };
            for (rtype, value) in map {
                let rtype = rtype.as_str().expect("a record type");
                let strings = || -> Vec<Vec<u8>> {
                    match value {
                        Yaml::String(s) => vec![s.as_bytes().to_vec()],
                        // No strings at all (`SPF: [ ]`, "illegal, but SPF should not
                        // crash") cannot be served: RFC 1035 3.3.14 wants one or more,
                        // and hickory refuses the whole answer holding such a record
                        // (InvalidEmptyRecord), so it would become a temperror that says
                        // nothing about SPF. One empty string is the nearest legal form.
                        Yaml::Array(a) if a.is_empty() => vec![Vec::new()],
                        Yaml::Array(a) => a
                            .iter()
                            .map(|s| s.as_str().expect("a string").as_bytes().to_vec())
                            .collect(),
                        other => panic!("{owner}: {rtype} {other:?}"),
                    }
                };
                let text = || {
                    value
                        .as_str()
                        .unwrap_or_else(|| panic!("{owner}: {rtype} {value:?}"))
                };
                let rrs = match rtype {
                    "TXT" if value.as_str() == Some("NONE") => vec![],
                    "TXT" => vec![Rr::Txt(strings())],
                    "SPF" if value.as_str() == Some("NONE") => vec![],
                    "SPF" if has_txt => vec![Rr::Spf(strings())],
                    "SPF" => vec![Rr::Spf(strings()), Rr::Txt(strings())],
                    "A" => vec![Rr::A(text().parse().expect("an IPv4 address"))],
                    "AAAA" => vec![Rr::Aaaa(text().parse().expect("an IPv6 address"))],
                    "PTR" => vec![Rr::Ptr(text().to_string())],
                    "CNAME" => vec![Rr::Cname(text().to_string())],
                    "MX" => {
                        let pair = value.as_vec().expect("[preference, exchange]");
                        let preference = pair[0].as_i64().expect("a preference");
                        vec![Rr::Mx(
                            u16::try_from(preference).expect("a 16-bit preference"),
                            pair[1].as_str().expect("an exchange").to_string(),
                        )]
                    }
                    other => panic!("{owner}: record type {other}"),
                };
                for rr in rrs {
                    zone.add(owner, rr)
                        .unwrap_or_else(|e| panic!("{owner}: {e:#}"));
                }
            }
        }
    }
    zone
}

/// The suite does not compare explanations: a fail carries the expanded `exp=` text of
/// the record that failed, never an included record's.
#[tokio::test]
async fn a_fail_is_explained_by_its_own_record() {
    let mut zone = Zone::new();
    for (name, text) in [
        (
            "own.test",
            "v=spf1 include:other.test -all exp=why.own.test",
        ),
        (
            "why.own.test",
            "%{i} is not one of %{d}'s servers (%{L}, %{C}, %{r})",
        ),
        ("other.test", "v=spf1 -all exp=why.other.test"),
        ("why.other.test", "other's reason"),
    ] {
        zone.add(name, Rr::txt(text)).expect("a record");
    }
    let server = AuthDns::start(zone).expect("the DNS server starts");
    let resolver = resolver(server.port);
    let request = super::Request {
        ip: [192, 0, 2, 1].into(),
        helo: "mail.own.test",
        sender: "Jo.Smith@own.test",
        receiver: "mx.example.com",
    };
    let out = super::verify(&resolver, &request).await;
    assert_eq!(out.result(), SpfResult::Fail);
    assert_eq!(
        out.explanation(),
        Some("192.0.2.1 is not one of own.test's servers (Jo.Smith, 192.0.2.1, mx.example.com)")
    );
}
