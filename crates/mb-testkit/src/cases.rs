//! The filter case files, `tests/data/filter/<name>.case` (the format is described in
//! tests/data/filter/README.md), read into `Case`s: one definition of the format for
//! both runners, mb-filter's unit runner (`engine::scan` without DNS) and the
//! end-to-end runner in tests/e2e/cases.rs (a real worker, a test DNS server). How a
//! verdict is compared with `Expect` is each runner's own business.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use mb_core::Config;
use mb_core::EnhancedStatus;
use mb_core::policy::{self, Policy, PolicyError};
use mb_core::verdict::{Action, Direction, ScanRequest};
use serde::Deserialize;

/// Where the cases live.
pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/filter");
/// Where the adversarial corpus lives (tests/data/corpus/README.md): `NAME.case` holds
/// the header alone and `NAME.eml` the message, byte for byte as it is sent.
pub const CORPUS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/corpus");
/// The line between the TOML header and the message.
pub const SEPARATOR: &str = "--- message ---";
/// A message line `%repeat COUNT TEXT` stands for COUNT lines `TEXT`, so a large part
/// does not make a large file.
const REPEAT: &str = "%repeat ";

/// One case file, read.
#[derive(Debug)]
pub struct Case {
    /// What the case proves (its first line, without `# `).
    pub about: String,
    /// The `config` text, as written: a runner that starts a daemon writes it into the
    /// daemon's configuration file (see `config_with`).
    pub config_text: String,
    /// `config_text` over the defaults.
    pub config: Config,
    /// dnsmasq options (as `crate::Dnsmasq::start` takes them) the case needs.
    pub dns: Vec<String>,
    /// The envelope; the queue id is the case's name.
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
    #[error("config and the runner's settings do not make one TOML document: {0}")]
    Merge(String),
    #[error(
        "the message has a line feed without a carriage return at byte {0}: an .eml of the corpus is sent as it is, with CRLF line endings"
    )]
    BareLineFeed(usize),
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
    /// decimal as X-Spam-Status writes it (see `required`).
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

impl Expect {
    /// The required symbols as (name, score to one decimal if one is given).
    pub fn required(&self) -> Vec<(&str, Option<&str>)> {
        self.symbols
            .iter()
            .map(
                |s| match s.strip_suffix(')').and_then(|s| s.split_once('(')) {
                    Some((name, score)) => (name, Some(score)),
                    None => (s.as_str(), None),
                },
            )
            .collect()
    }
}

impl Case {
    /// The case's `config` with `overrides` (TOML) laid over it key by key, as one
    /// document: a runner's own settings (ports, servers) win over the case's.
    pub fn config_with(&self, overrides: &str) -> Result<String, CaseError> {
        let parse = |text: &str| {
            text.parse::<toml::Table>()
                .map_err(|e| CaseError::Merge(e.to_string()))
        };
        let mut doc = parse(&self.config_text)?;
        merge(&mut doc, parse(overrides)?);
        toml::to_string(&doc).map_err(|e| CaseError::Merge(e.to_string()))
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
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
    from_header(name, about, head, message(body)?)
}

/// Reads one corpus case: `header` is the `NAME.case` text (no separator, no message)
/// and `message` the bytes of `NAME.eml`, kept as they are.
pub fn parse_corpus(name: &str, header: &str, message: Vec<u8>) -> Result<Case, CaseError> {
    if let Some(i) = header.split('\n').position(|l| l.contains('\r')) {
        return Err(CaseError::CarriageReturn(i + 1));
    }
    let about = header
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .ok_or(CaseError::NoComment)?
        .trim()
        .to_string();
    if let Some(at) = message
        .iter()
        .enumerate()
        .position(|(i, b)| *b == b'\n' && (i == 0 || message[i - 1] != b'\r'))
    {
        return Err(CaseError::BareLineFeed(at));
    }
    from_header(name, about, header, message)
}

fn from_header(name: &str, about: String, head: &str, message: Vec<u8>) -> Result<Case, CaseError> {
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
            unauthenticated: p.unauthenticated,
            recipient: String::new(),
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
        config_text: header.config,
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
        message,
    })
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

/// Every corpus case under `dir` (`NAME.case` with its `NAME.eml`), by name, read or
/// not; an `.eml` without its `.case` is a case that cannot be read, so no message of
/// the corpus goes unjudged.
pub fn load_corpus(dir: &Path) -> Vec<(String, Result<Case, CaseError>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "case" || x == "eml"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let read = |ext: &str| {
                let path = dir.join(format!("{name}.{ext}"));
                std::fs::read(&path).map_err(|source| CaseError::Read { path, source })
            };
            let case = read("case").and_then(|header| {
                let message = read("eml")?;
                parse_corpus(&name, &String::from_utf8_lossy(&header), message)
            });
            (name, case)
        })
        .collect()
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
    /// A sender allow that applies to unauthenticated senders too.
    #[serde(default)]
    unauthenticated: bool,
}

fn default_priority() -> i32 {
    10
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn corpus_cases_keep_their_message_bytes_and_refuse_bare_line_feeds() {
        let header = SMALL.split(SEPARATOR).next().unwrap();
        let c = parse_corpus("eml", header, b"Subject: x\r\n\r\na\0b\r\n".to_vec()).unwrap();
        assert_eq!(c.message, b"Subject: x\r\n\r\na\0b\r\n");
        assert_eq!(c.request.queue_id, "eml");
        assert!(matches!(
            parse_corpus("eml", header, b"Subject: x\r\n\nbody".to_vec()),
            Err(CaseError::BareLineFeed(12))
        ));
        assert!(matches!(
            parse_corpus("eml", &header.replace("# A sample.\n", ""), Vec::new()),
            Err(CaseError::NoComment)
        ));
        // The checked-in corpus reads, every case of it.
        let all = load_corpus(Path::new(CORPUS_DIR));
        assert!(all.len() >= 60, "{} corpus cases", all.len());
        for (name, case) in &all {
            assert!(case.is_ok(), "{name}: {:?}", case.as_ref().err());
        }
    }

    #[test]
    fn required_symbols_are_split_into_name_and_score() {
        let c = parse(
            "s",
            &SMALL.replace(
                "action = \"accept\"",
                "action = \"accept\"\nsymbols = [\"A\", \"B(2.0)\", \"C(-0.5)\"]",
            ),
        )
        .unwrap();
        assert_eq!(
            c.expect.required(),
            [("A", None), ("B", Some("2.0")), ("C", Some("-0.5"))]
        );
    }

    #[test]
    fn the_runners_settings_are_laid_over_the_cases_config() {
        let c = parse(
            "c",
            &SMALL.replace(
                "# A sample.\n",
                "# A sample.\nconfig = \"\"\"\n[spam.threshold]\ntag = 1.0\n[smtp]\ndomains = \"x.example\"\nhostname = \"case.example\"\n\"\"\"\n",
            ),
        )
        .unwrap();
        let text = c
            .config_with("[smtp]\ndomains = \"d.example\"\n[filter]\nport = 10099\n")
            .unwrap();
        let cfg = Config::from_toml_str(&text, "merged").unwrap();
        assert_eq!(cfg.float("spam.threshold.tag"), 1.0);
        assert_eq!(cfg.text("smtp.hostname"), "case.example");
        assert_eq!(cfg.list("smtp.domains"), ["d.example"]);
        assert_eq!(cfg.int("filter.port"), 10099);
        assert!(matches!(c.config_with("[smtp\n"), Err(CaseError::Merge(_))));
    }
}
