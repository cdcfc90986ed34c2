//! The filter's rules tested from case files, `tests/data/filter/<name>.case` (the
//! format is described in tests/data/filter/README.md): this module reads them and runs
//! every case that needs no DNS through `engine::scan`. Cases with `dns` records are for
//! the end-to-end runner, which serves them from a test DNS server.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use mb_core::policy::{self, Policy, PolicyError};
use mb_core::verdict::{Action, Direction, ScanRequest, Verdict};
use mb_core::{Config, EnhancedStatus};
use serde::Deserialize;

/// Where the cases live.
pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/filter");
/// The line between the TOML header and the message.
pub const SEPARATOR: &str = "--- message ---";
/// A message line `%repeat COUNT TEXT` stands for COUNT lines `TEXT`, so a large part
/// does not make a large file.
const REPEAT: &str = "%repeat ";
/// Fewer cases than this ran without DNS: cases were lost (a moved directory, a case
/// that grew `dns` records by mistake), and the test says so instead of passing on
/// nothing.
const AT_LEAST: usize = 34;

/// One case file, read.
#[derive(Debug)]
pub struct Case {
    /// What the case proves (its first line, without `# `).
    pub about: String,
    pub config: Config,
    /// dnsmasq options (as `mb_testkit::Dnsmasq::start` takes them) the case needs.
    pub dns: Vec<String>,
    pub request: ScanRequest,
    pub policies: Vec<Policy>,
    pub expect: Expect,
    /// CRLF line endings.
    pub message: Vec<u8>,
}

/// Why a case file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the first line must be a comment (`# ...`) saying what the case proves")]
    NoComment,
    #[error("no `{SEPARATOR}` line between the header and the message")]
    NoSeparator,
    #[error("line {0} has a CR: write case files with LF line endings (CRLF is made on loading)")]
    CarriageReturn(usize),
    #[error("the header: {0}")]
    Header(#[from] toml::de::Error),
    #[error("config: {0}")]
    Config(String),
    #[error("policy {name:?}: {source}")]
    Policy { name: String, source: PolicyError },
    #[error("message line {0}: `%repeat COUNT TEXT` needs a count")]
    Repeat(usize),
}

/// The TOML header of a case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    #[serde(default)]
    config: String,
    #[serde(default)]
    dns: Vec<String>,
    envelope: Envelope,
    #[serde(default)]
    policy: Vec<CasePolicy>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    /// Empty for the null sender.
    sender: String,
    recipients: Vec<String>,
    client_ip: Option<IpAddr>,
    #[serde(default)]
    helo: String,
    #[serde(default)]
    direction: Direction,
    #[serde(default)]
    auth_user: String,
}

/// A policy as mb-rpcd would hold it; the id is the policy's place in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasePolicy {
    name: String,
    #[serde(default = "default_priority")]
    priority: i32,
    object: policy::Object,
    #[serde(default)]
    pattern: String,
    direction: policy::Direction,
    action: policy::Action,
    tag: Option<f64>,
    quarantine: Option<f64>,
    reject: Option<f64>,
}

fn default_priority() -> i32 {
    10
}

/// What the verdict must be.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub action: Action,
    /// The reply code the verdict carries; absent means none (the action's default).
    pub code: Option<u16>,
    /// Likewise the enhanced status.
    pub status: Option<EnhancedStatus>,
    /// The verdict's text, exactly; absent means empty.
    pub text: Option<String>,
    /// Symbols that must be there: `NAME`, or `NAME(SCORE)` with the score to one
    /// decimal as X-Spam-Status writes it.
    #[serde(default)]
    pub symbols: Vec<String>,
    /// Symbols that must not be there (names).
    #[serde(default)]
    pub absent: Vec<String>,
    pub score_min: Option<f64>,
    pub score_max: Option<f64>,
    /// When given, exactly the fields the verdict adds, in order, as `Name: value`.
    pub headers: Option<Vec<String>>,
    /// When given, exactly the field names the verdict removes, in order.
    pub removed: Option<Vec<String>>,
}

/// Reads one case from its text; `name` is used for the queue id and in messages.
pub fn parse(name: &str, text: &str) -> Result<Case, CaseError> {
    if let Some(i) = text.split('\n').position(|l| l.contains('\r')) {
        return Err(CaseError::CarriageReturn(i + 1));
    }
    let about = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .ok_or(CaseError::NoComment)?
        .trim()
        .to_string();
    let (head, body) = split(text).ok_or(CaseError::NoSeparator)?;
    let header: Header = toml::from_str(head)?;
    let config =
        Config::from_toml_str(&header.config, &format!("{name} config")).map_err(|errors| {
            CaseError::Config(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
    let mut policies = Vec::new();
    for (i, p) in header.policy.into_iter().enumerate() {
        let policy = Policy {
            id: i64::try_from(i).unwrap_or(i64::MAX) + 1,
            name: p.name,
            priority: p.priority,
            object: p.object,
            pattern: p.pattern,
            direction: p.direction,
            action: p.action,
            tag: p.tag,
            quarantine: p.quarantine,
            reject: p.reject,
        };
        // A case holds only what mb-rpcd would accept.
        policy.validate().map_err(|source| CaseError::Policy {
            name: policy.name.clone(),
            source,
        })?;
        policies.push(policy);
    }
    let e = header.envelope;
    Ok(Case {
        about,
        config,
        dns: header.dns,
        request: ScanRequest {
            queue_id: name.to_string(),
            client_ip: e.client_ip,
            client_name: String::new(),
            helo: e.helo,
            sender: e.sender,
            recipients: e.recipients,
            auth_user: e.auth_user,
            tls: String::new(),
            direction: e.direction,
        },
        policies,
        expect: header.expect,
        message: message(body)?,
    })
}

/// The header and the message, split at the separator line.
fn split(text: &str) -> Option<(&str, &str)> {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end_matches('\n') == SEPARATOR {
            return Some((&text[..at], &text[at + line.len()..]));
        }
        at += line.len();
    }
    None
}

/// The message with CRLF line endings and its `%repeat` lines expanded.
fn message(body: &str) -> Result<Vec<u8>, CaseError> {
    let mut out = String::with_capacity(body.len() + body.len() / 16);
    for (i, line) in body.split_inclusive('\n').enumerate() {
        let (line, newline) = match line.strip_suffix('\n') {
            Some(l) => (l, "\r\n"),
            None => (line, ""),
        };
        match line.strip_prefix(REPEAT) {
            Some(rest) => {
                let (count, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let count: usize = count.parse().map_err(|_| CaseError::Repeat(i + 1))?;
                for _ in 0..count {
                    out.push_str(text);
                    out.push_str("\r\n");
                }
            }
            None => {
                out.push_str(line);
                out.push_str(newline);
            }
        }
    }
    Ok(out.into_bytes())
}

/// Every `*.case` file under `dir`, by name, read or not.
pub fn load_all(dir: &Path) -> Vec<(String, Result<Case, CaseError>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "case"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let case = std::fs::read_to_string(&path)
                .map_err(|source| CaseError::Read {
                    path: path.clone(),
                    source,
                })
                .and_then(|text| parse(&name, &text));
            (name, case)
        })
        .collect()
}

/// Everything in which `v` differs from `want`; empty when it is as expected.
pub fn check(want: &Expect, v: &Verdict) -> Vec<String> {
    let mut out = Vec::new();
    if v.action != want.action {
        out.push(format!("action is {}, expected {}", v.action, want.action));
    }
    if v.refusal.code != want.code {
        out.push(format!(
            "code is {:?}, expected {:?}",
            v.refusal.code, want.code
        ));
    }
    if v.refusal.status != want.status {
        out.push(format!(
            "status is {}, expected {}",
            shown(v.refusal.status),
            shown(want.status)
        ));
    }
    let text = want.text.as_deref().unwrap_or_default();
    if v.refusal.text != text {
        out.push(format!("text is {:?}, expected {text:?}", v.refusal.text));
    }
    for s in &want.symbols {
        let (name, score) = match s.strip_suffix(')').and_then(|s| s.split_once('(')) {
            Some((name, score)) => (name, Some(score)),
            None => (s.as_str(), None),
        };
        let found = v.symbols.iter().find(|have| have.name == name);
        match (found, score) {
            (None, _) => out.push(format!("symbol {name} is missing")),
            (Some(have), Some(score)) if format!("{:.1}", have.score) != score => out.push(
                format!("symbol {name} scores {:.1}, expected {score}", have.score),
            ),
            _ => {}
        }
    }
    for name in &want.absent {
        if v.symbols.iter().any(|s| &s.name == name) {
            out.push(format!("symbol {name} is there and must not be"));
        }
    }
    if let Some(min) = want.score_min
        && v.score < min - 1e-9
    {
        out.push(format!("score {} is below {min}", v.score));
    }
    if let Some(max) = want.score_max
        && v.score > max + 1e-9
    {
        out.push(format!("score {} is above {max}", v.score));
    }
    if let Some(headers) = &want.headers {
        let added: Vec<String> = v
            .add_headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}"))
            .collect();
        if &added != headers {
            out.push(format!("adds {added:?}, expected {headers:?}"));
        }
    }
    if let Some(removed) = &want.removed
        && &v.remove_headers != removed
    {
        out.push(format!(
            "removes {:?}, expected {removed:?}",
            v.remove_headers
        ));
    }
    out
}

fn shown(status: Option<EnhancedStatus>) -> String {
    status.map_or_else(|| "none".into(), |s| s.to_string())
}

/// The verdict in a few words, for a failure report.
fn summary(v: &Verdict) -> String {
    let mut out = format!("{} {:.1}", v.action, v.score);
    if let Some(code) = v.refusal.code {
        let _ = write!(out, " {code}");
    }
    if let Some(status) = v.refusal.status {
        let _ = write!(out, " {status}");
    }
    if !v.refusal.text.is_empty() {
        let _ = write!(out, " {:?}", v.refusal.text);
    }
    let symbols: Vec<String> = v
        .symbols
        .iter()
        .map(|s| format!("{}({:.1})", s.name, s.score))
        .collect();
    let _ = write!(out, " [{}]", symbols.join(","));
    out
}

#[cfg(test)]
mod tests {
    use mb_core::verdict::Symbol;

    use super::*;

    #[tokio::test]
    async fn every_case_without_dns_gives_its_expected_verdict() {
        let cases = load_all(Path::new(DIR));
        let mut failures = Vec::new();
        let (mut ran, mut with_dns) = (0, Vec::new());
        for (name, case) in &cases {
            let case = match case {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{name}: unusable case: {e}"));
                    continue;
                }
            };
            // These need their records served: the end-to-end runner's.
            if !case.dns.is_empty() {
                with_dns.push(name.as_str());
                continue;
            }
            ran += 1;
            let v = crate::engine::scan(
                &case.config,
                &case.request,
                &case.message,
                None,
                &case.policies,
            )
            .await;
            let problems = check(&case.expect, &v);
            if !problems.is_empty() {
                failures.push(format!(
                    "{name} ({}):\n    {}\n    verdict: {}",
                    case.about,
                    problems.join("\n    "),
                    summary(&v)
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases in {DIR} failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        assert!(
            ran >= AT_LEAST,
            "only {ran} cases without DNS ran from {DIR} (expected at least {AT_LEAST}); \
             {} with DNS were left to the end-to-end runner: {with_dns:?}",
            with_dns.len()
        );
    }

    const SMALL: &str = "# A sample.\n[envelope]\nsender = \"a@b.example\"\nrecipients = [\"c@d.example\"]\n\
                         [expect]\naction = \"accept\"\n--- message ---\nSubject: x\n\n%repeat 3 QUFB\nend\n";

    #[test]
    fn cases_are_read_with_crlf_and_repeats_and_bad_ones_are_refused() {
        let c = parse("small", SMALL).unwrap();
        assert_eq!(c.about, "A sample.");
        assert_eq!(c.request.queue_id, "small");
        assert_eq!(c.request.direction, Direction::Inbound);
        assert_eq!(
            String::from_utf8(c.message).unwrap(),
            "Subject: x\r\n\r\nQUFB\r\nQUFB\r\nQUFB\r\nend\r\n"
        );
        let bad = |text: &str| parse("bad", text).unwrap_err();
        assert!(matches!(
            bad(&SMALL.replace("# A sample.\n", "")),
            CaseError::NoComment
        ));
        assert!(matches!(
            bad(&SMALL.replace(SEPARATOR, "---")),
            CaseError::NoSeparator
        ));
        assert!(matches!(
            bad(&SMALL.replace("end\n", "end\r\n")),
            CaseError::CarriageReturn(11)
        ));
        assert!(matches!(
            bad(&SMALL.replace("%repeat 3", "%repeat x")),
            CaseError::Repeat(3)
        ));
        assert!(matches!(
            bad(&SMALL.replace("[expect]", "[expect]\nscore = 1.0")),
            CaseError::Header(_)
        ));
        assert!(matches!(
            bad(&SMALL.replace(
                "# A sample.\n",
                "# A sample.\nconfig = \"[spam]\\nno_such_key = 1\"\n"
            )),
            CaseError::Config(_)
        ));
        let policy = "[[policy]]\nname = \"p\"\nobject = \"address\"\npattern = \"no-at-sign\"\n\
                      direction = \"from\"\naction = \"allow\"\n[expect]";
        assert!(matches!(
            bad(&SMALL.replace("[expect]", policy)),
            CaseError::Policy { .. }
        ));
    }

    #[test]
    fn the_checker_sees_every_kind_of_difference() {
        let want: Expect = toml::from_str(
            "action = \"reject\"\ncode = 554\nstatus = \"5.7.1\"\ntext = \"no\"\n\
             symbols = [\"A\", \"B(2.0)\"]\nabsent = [\"C\"]\nscore_min = 1.0\nscore_max = 3.0\n\
             headers = [\"X: 1\"]\nremoved = [\"Y\"]\n",
        )
        .unwrap();
        let symbol = |name: &str, score| Symbol {
            name: name.into(),
            score,
            detail: String::new(),
        };
        let mut good = Verdict::refuse(Action::Reject, 554, EnhancedStatus::POLICY_REJECT, "no");
        good.symbols = vec![symbol("A", 0.0), symbol("B", 2.0)];
        good.score = 2.0;
        good.add_headers = vec![("X".into(), "1".into())];
        good.remove_headers = vec!["Y".into()];
        assert_eq!(check(&want, &good), Vec::<String>::new());
        let bad = Verdict {
            symbols: vec![symbol("B", 1.5), symbol("C", 0.0)],
            score: 9.0,
            ..Verdict::accept()
        };
        let problems = check(&want, &bad);
        // Action, code, status, text, A missing, B's score, C present, score, headers,
        // removed.
        assert_eq!(problems.len(), 10, "{problems:#?}");
        let low = Verdict { score: 0.5, ..good };
        assert_eq!(check(&want, &low), ["score 0.5 is below 1"]);
    }
}
