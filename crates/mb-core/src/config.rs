//! The effective configuration: built-in defaults, then the TOML file, then database overrides.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::registry::{self, KEYS, KeyDef};
use crate::value::{Kind, Value};

/// Where the effective value of a key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Default,
    File,
    Database,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Database => "database",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub value: Value,
    pub source: Source,
    /// The file value underneath a database override, so `unset` can restore it.
    file_value: Option<Value>,
}

/// A problem in a configuration file, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FileError {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A key or value refused by `mb-config set` (or found in the database).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("unknown key {key:?}{}", hint(.suggestion))]
    Unknown {
        key: String,
        suggestion: Option<&'static str>,
    },
    #[error("invalid value for {key} ({kind}): {message}")]
    Invalid {
        key: String,
        kind: &'static str,
        message: String,
    },
    #[error(
        "{key} is read from the configuration file only (it says where the sockets and the database are): edit the file and restart the daemons"
    )]
    FileOnly { key: String },
}

fn hint(s: &Option<&str>) -> String {
    s.map(|s| format!("; did you mean {s}?"))
        .unwrap_or_default()
}

/// Finds a key and parses a value for it.
pub fn parse_key_value(key: &str, text: &str) -> Result<(&'static KeyDef, Value), KeyError> {
    let def = lookup(key)?;
    let value = Value::parse(&def.kind, text).map_err(|e| KeyError::Invalid {
        key: def.key.to_string(),
        kind: def.kind.name(),
        message: e.0,
    })?;
    if let Some(check) = def.validate {
        check(&value).map_err(|e| KeyError::Invalid {
            key: def.key.to_string(),
            kind: def.kind.name(),
            message: e.to_string(),
        })?;
    }
    Ok((def, value))
}

/// Finds a key, or says which one was probably meant.
pub fn lookup(key: &str) -> Result<&'static KeyDef, KeyError> {
    registry::find(key).ok_or_else(|| KeyError::Unknown {
        key: key.to_string(),
        suggestion: registry::nearest(key),
    })
}

/// The effective configuration of one daemon or tool.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    entries: BTreeMap<&'static str, Entry>,
    /// The file the configuration was read from, if any.
    pub file: Option<PathBuf>,
    /// What the file sets that is ignored with a warning rather than refused: keys this
    /// version dropped (`registry::REMOVED`).
    pub notices: Vec<FileError>,
}

impl Default for Config {
    fn default() -> Self {
        let entries = KEYS
            .iter()
            .map(|k| {
                // Defaults are checked by the registry's tests; fall back to text on the
                // impossible failure rather than panic.
                let value = Value::parse(&k.kind, k.default)
                    .unwrap_or_else(|_| Value::Text(k.default.to_string()));
                (
                    k.key,
                    Entry {
                        value,
                        source: Source::Default,
                        file_value: None,
                    },
                )
            })
            .collect();
        Config {
            entries,
            file: None,
            notices: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and checks a configuration file; every problem is reported, not just the first.
    pub fn load_file(path: &Path) -> Result<Config, Vec<FileError>> {
        let (cfg, errors) = Config::load_file_lenient(path);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }

    /// Reads a file leniently (see [`Config::from_toml_str_lenient`]).
    pub fn load_file_lenient(path: &Path) -> (Config, Vec<FileError>) {
        let name = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                let error = FileError {
                    file: name,
                    line: 0,
                    column: 0,
                    key: None,
                    message: format!("cannot read: {e}"),
                };
                return (Config::default(), vec![error]);
            }
        };
        let (mut cfg, errors) = Config::from_toml_str_lenient(&text, &name);
        cfg.file = Some(path.to_path_buf());
        (cfg, errors)
    }

    /// Parses a TOML document; `name` is used in error messages.
    pub fn from_toml_str(text: &str, name: &str) -> Result<Config, Vec<FileError>> {
        let (cfg, errors) = Config::from_toml_str_lenient(text, name);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }

    /// Like [`Config::from_toml_str`], but also returns the configuration made of the
    /// values that did parse (the defaults after a syntax error). Tools use it to find
    /// the sockets when the file is broken; daemons never start on it.
    pub fn from_toml_str_lenient(text: &str, name: &str) -> (Config, Vec<FileError>) {
        let at = |span: std::ops::Range<usize>, key: Option<String>, message: String| {
            let (line, column) = line_col(text, span.start);
            FileError {
                file: name.to_string(),
                line,
                column,
                key,
                message,
            }
        };
        let syntax = |e: toml::de::Error| {
            vec![at(
                e.span().unwrap_or(0..0),
                None,
                e.message().trim().to_string(),
            )]
        };
        let parsed = toml::de::DeTable::parse(text)
            .map_err(syntax)
            .and_then(|spanned| {
                Ok((
                    spanned,
                    toml::from_str::<toml::Table>(text).map_err(syntax)?,
                ))
            });
        let (spanned, table) = match parsed {
            Ok(p) => p,
            Err(errors) => return (Config::default(), errors),
        };
        let mut spans = BTreeMap::new();
        collect_spans(spanned.get_ref(), "", &mut spans);
        let mut flat = Vec::new();
        flatten(&table, "", &mut flat);

        let mut cfg = Config::default();
        let mut errors = Vec::new();
        for (key, value) in flat {
            let span = spans.get(&key).cloned().unwrap_or(0..0);
            if let Some((_, why)) = registry::REMOVED.iter().find(|(k, _)| *k == key) {
                cfg.notices.push(at(span, Some(key), (*why).to_string()));
                continue;
            }
            let Some(def) = registry::find(&key) else {
                let message = match value {
                    Flat::Value(_) => format!("unknown key{}", hint(&registry::nearest(&key))),
                    Flat::Unsupported(what) => {
                        format!("unknown key ({what}){}", hint(&registry::nearest(&key)))
                    }
                };
                errors.push(at(span, Some(key), message));
                continue;
            };
            let parsed = match value {
                Flat::Value(v) => Value::from_toml(&def.kind, v)
                    .map_err(|e| e.0)
                    .and_then(|v| match def.validate {
                        Some(check) => check(&v).map(|()| v).map_err(|e| e.to_string()),
                        None => Ok(v),
                    }),
                Flat::Unsupported(what) => Err(format!("expected a value, got {what}")),
            };
            match parsed {
                Ok(v) => {
                    if let Some(e) = cfg.entries.get_mut(def.key) {
                        e.value = v.clone();
                        e.source = Source::File;
                        e.file_value = Some(v);
                    }
                }
                Err(message) => errors.push(at(
                    span,
                    Some(key),
                    format!(
                        "{message} (type {}{})",
                        def.kind.name(),
                        range_hint(&def.kind)
                    ),
                )),
            }
        }
        (cfg, errors)
    }

    /// The entry of a key, `None` for a key not in the registry.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Every key with its entry, in name order.
    pub fn entries(&self) -> impl Iterator<Item = (&'static KeyDef, &Entry)> {
        KEYS.iter()
            .filter_map(|k| self.entries.get(k.key).map(|e| (k, e)))
    }

    /// The value of a registered key. Asking for an unregistered key is a bug in the
    /// caller, caught by the tests of that caller; it yields an empty text.
    pub fn get(&self, key: &str) -> &Value {
        static EMPTY: Value = Value::Text(String::new());
        debug_assert!(self.entries.contains_key(key), "unregistered key {key}");
        self.entries.get(key).map_or(&EMPTY, |e| &e.value)
    }

    /// Applies a database override (already parsed and checked).
    pub fn set_override(&mut self, def: &KeyDef, value: Value) {
        if let Some(e) = self.entries.get_mut(def.key) {
            e.value = value;
            e.source = Source::Database;
        }
    }

    /// Removes a database override: the file value, or else the default, applies again.
    pub fn clear_override(&mut self, def: &KeyDef) {
        if let Some(e) = self.entries.get_mut(def.key) {
            if e.source != Source::Database {
                return;
            }
            match e.file_value.clone() {
                Some(v) => {
                    e.value = v;
                    e.source = Source::File;
                }
                None => {
                    e.value = Value::parse(&def.kind, def.default)
                        .unwrap_or(Value::Text(def.default.into()));
                    e.source = Source::Default;
                }
            }
        }
    }

    /// Applies stored overrides; ones that no longer parse (a key removed or narrowed in
    /// a newer version) are skipped and returned so the caller can warn about them.
    pub fn apply_overrides<'a>(
        &mut self,
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<KeyError> {
        let mut skipped = Vec::new();
        for (key, text) in overrides {
            match parse_key_value(key, text) {
                Ok((def, _)) if def.file_only => skipped.push(KeyError::FileOnly {
                    key: def.key.into(),
                }),
                Ok((def, v)) => self.set_override(def, v),
                Err(e) => skipped.push(e),
            }
        }
        skipped
    }

    /// Problems that involve several keys: the daemons refuse to start with any of them.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.bool("network.rpcd.tcp.enabled") {
            let bind = self.ip("network.rpcd.tcp.bind");
            let tls = !self.text("network.rpcd.tcp.tls.cert").is_empty()
                && !self.text("network.rpcd.tcp.tls.key").is_empty();
            let key = self.text("network.rpcd.tcp.api_key");
            if !bind.is_loopback() {
                if !tls {
                    problems.push(format!(
                        "network.rpcd.tcp.bind is {bind}, beyond loopback: set network.rpcd.tcp.tls.cert and network.rpcd.tcp.tls.key"
                    ));
                }
                if key.len() < 16 {
                    problems.push(format!(
                        "network.rpcd.tcp.bind is {bind}, beyond loopback: set network.rpcd.tcp.api_key (at least 16 characters)"
                    ));
                }
            } else if self.bool("network.rpcd.tcp.require_auth") && key.len() < 16 {
                problems.push(
                    "network.rpcd.tcp.require_auth is true: set network.rpcd.tcp.api_key (at least 16 characters)".into(),
                );
            }
        }
        for (cert, key) in [
            ("network.smtp.tls.cert", "network.smtp.tls.key"),
            ("network.rpcd.tcp.tls.cert", "network.rpcd.tcp.tls.key"),
        ] {
            if self.text(cert).is_empty() != self.text(key).is_empty() {
                problems.push(format!("{cert} and {key} must be set together"));
            }
        }
        let (tag, quarantine, reject) = (
            self.float("spam.threshold.tag"),
            self.float("spam.threshold.quarantine"),
            self.float("spam.threshold.reject"),
        );
        if !(tag <= quarantine && quarantine <= reject) {
            problems.push(format!(
                "spam thresholds must rise: tag ({tag}) <= quarantine ({quarantine}) <= reject ({reject})"
            ));
        }
        // A triplet must be retried after greylist.delay and before greylist.retry_window
        // ends: with the window no longer than the delay, no retry can ever pass.
        if let Some(p) = crate::greylist::Timing::from_config(self).problem() {
            problems.push(p);
        }
        let min = self.text("network.tls.min_version");
        if !self.list("network.tls.versions").iter().any(|v| *v >= min) {
            problems.push(format!(
                "network.tls.versions offers nothing at or above network.tls.min_version ({min})"
            ));
        }
        let relay = self.text("relay.host");
        if !relay.is_empty()
            && let Err(e) = crate::route::relay_next_hop(
                &relay,
                self.port("relay.port"),
                self.text("relay.protocol") == "lmtp",
            )
        {
            problems.push(e.to_string());
        }
        if self.duration("queue.retry_min") > self.duration("queue.retry_max") {
            problems.push("queue.retry_min must not exceed queue.retry_max".into());
        }
        if self.bool("cluster.enabled")
            && self.text("cluster.role") == "child"
            && self.text("cluster.main").is_empty()
        {
            problems.push(
                "cluster.role is child: set cluster.main to the main node's host:port".into(),
            );
        }
        problems
    }

    pub fn bool(&self, key: &str) -> bool {
        matches!(self.get(key), Value::Bool(true))
    }

    pub fn int(&self, key: &str) -> i64 {
        match self.get(key) {
            Value::Int(n) => *n,
            _ => 0,
        }
    }

    pub fn port(&self, key: &str) -> u16 {
        u16::try_from(self.int(key)).unwrap_or(0)
    }

    pub fn float(&self, key: &str) -> f64 {
        match self.get(key) {
            Value::Float(n) => *n,
            _ => 0.0,
        }
    }

    /// Text, words, paths; the canonical form of anything else.
    pub fn text(&self, key: &str) -> String {
        match self.get(key) {
            Value::Text(s) | Value::Word(s) => s.clone(),
            other => other.to_string(),
        }
    }

    pub fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.text(key))
    }

    pub fn duration(&self, key: &str) -> Duration {
        match self.get(key) {
            Value::Duration(d) => *d,
            _ => Duration::ZERO,
        }
    }

    pub fn size(&self, key: &str) -> u64 {
        match self.get(key) {
            Value::Size(n) => *n,
            _ => 0,
        }
    }

    pub fn rate(&self, key: &str) -> Option<crate::value::Rate> {
        match self.get(key) {
            Value::Rate(r) => Some(*r),
            _ => None,
        }
    }

    pub fn ip(&self, key: &str) -> IpAddr {
        match self.get(key) {
            Value::Ip(ip) => *ip,
            _ => IpAddr::from([0, 0, 0, 0]),
        }
    }

    pub fn ips(&self, key: &str) -> Vec<IpAddr> {
        match self.get(key) {
            Value::IpList(ips) => ips.clone(),
            _ => Vec::new(),
        }
    }

    pub fn nets(&self, key: &str) -> Vec<IpNet> {
        match self.get(key) {
            Value::CidrList(nets) => nets.clone(),
            _ => Vec::new(),
        }
    }

    pub fn list(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Value::List(items) => items.clone(),
            _ => Vec::new(),
        }
    }

    /// The database URL, with SQLite under `paths.data_dir` when none is set.
    pub fn database_url(&self) -> String {
        let url = self.text("database.url");
        if url.is_empty() {
            format!("sqlite://{}/mailborder.db", self.text("paths.data_dir"))
        } else {
            url
        }
    }

    /// This node's name in the quarantine index and the cluster: `cluster.node_name`,
    /// else `smtp.hostname`, else the system's host name.
    pub fn node_name(&self) -> String {
        for key in ["cluster.node_name", "smtp.hostname"] {
            let name = self.text(key);
            if !name.is_empty() {
                return name;
            }
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }

    /// Whether this node is the main of a cluster (`cluster.enabled`, role main).
    pub fn is_cluster_main(&self) -> bool {
        self.bool("cluster.enabled") && self.text("cluster.role") == "main"
    }

    /// The socket of a daemon (`mb-rpcd`, `mb-filter-2`) under `paths.run_dir`.
    pub fn socket(&self, daemon: &str) -> PathBuf {
        self.path("paths.run_dir").join(format!("{daemon}.sock"))
    }
}

/// Text shown for a value that must not be revealed.
pub const REDACTED: &str = "********";

/// A URL with its password replaced, fit for logs and status output.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{REDACTED}@{host}"),
        None => url.to_string(),
    }
}

fn range_hint(kind: &Kind) -> String {
    let r = kind.range();
    if r.is_empty() { r } else { format!(", {r}") }
}

fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let col = offset
        - before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

enum Flat<'a> {
    Value(&'a toml::Value),
    Unsupported(&'static str),
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Turns nested tables into dotted keys. A quoted key containing dots (`"tls.verify"` in
/// `[relay]`) joins the same way, which is how a key that is also a section is written.
fn flatten<'a>(table: &'a toml::Table, prefix: &str, out: &mut Vec<(String, Flat<'a>)>) {
    for (k, v) in table {
        let key = join(prefix, k);
        match v {
            toml::Value::Table(t) => flatten(t, &key, out),
            toml::Value::Datetime(_) => out.push((key, Flat::Unsupported("a date"))),
            toml::Value::Array(items) if items.iter().any(|i| i.is_table()) => {
                out.push((key, Flat::Unsupported("an array of tables")));
            }
            v => out.push((key, Flat::Value(v))),
        }
    }
}

fn collect_spans(
    table: &toml::de::DeTable<'_>,
    prefix: &str,
    out: &mut BTreeMap<String, std::ops::Range<usize>>,
) {
    for (k, v) in table {
        let key = join(prefix, k.get_ref());
        if let toml::de::DeValue::Table(t) = v.get_ref() {
            collect_spans(t, &key, out);
        }
        out.insert(key, k.span());
    }
}

/// Splits a key into the TOML table it is written in and its name there, quoting the
/// name when a prefix of the key is itself a key (`relay.tls.verify` is `"tls.verify"`
/// in `[relay]`, because `relay.tls` holds a value).
pub fn toml_location(key: &str) -> (String, String) {
    let parts: Vec<&str> = key.split('.').collect();
    for i in 1..parts.len() {
        let prefix = parts[..i].join(".");
        if registry::find(&prefix).is_some() {
            let table = parts[..i - 1].join(".");
            return (table, format!("\"{}\"", parts[i - 1..].join(".")));
        }
    }
    (
        parts[..parts.len() - 1].join("."),
        parts[parts.len() - 1].to_string(),
    )
}

/// A TOML literal for a canonical value of a kind.
pub fn toml_literal(kind: &Kind, text: &str) -> String {
    match kind {
        Kind::Bool | Kind::Int { .. } | Kind::Float { .. } => text.to_string(),
        _ => format!("{text:?}"),
    }
}

/// The annotated configuration file that ships as `/etc/mailborder/mailborder.toml`:
/// every key, commented out at its default.
pub fn render_example() -> String {
    let mut out = String::from(
        "# /etc/mailborder/mailborder.toml: the gateway's bootstrap configuration.\n\
         #\n\
         # Every key is listed at its built-in default, commented out. The TOML path of a\n\
         # value is its key: `[network.smtp] port = 25` is network.smtp.port. Values set\n\
         # here are overridden by `mb-config set`, which stores them in the database;\n\
         # `mb-config show` tells where each effective value comes from.\n\
         #\n\
         # Sizes: 50M, 512K. Durations: 30s, 10m, 1h, 5d (a bare number is seconds).\n\
         # Rates: 10/minute. Lists: \"a,b\" or [\"a\", \"b\"].\n\
         # The copy in the source tree is generated by `cargo xtask gen-config`.\n",
    );
    // Group by table in order of first appearance: a table may be written only once.
    let mut tables: Vec<(String, Vec<(&KeyDef, String)>)> = Vec::new();
    for k in KEYS {
        let (table, name) = toml_location(k.key);
        match tables.iter_mut().find(|(t, _)| *t == table) {
            Some((_, keys)) => keys.push((k, name)),
            None => tables.push((table, vec![(k, name)])),
        }
    }
    for (table, keys) in tables {
        out.push_str(&format!("\n[{table}]\n"));
        for (k, name) in keys {
            out.push_str(&describe(k));
            out.push_str(&format!("#{name} = {}\n", toml_literal(&k.kind, k.default)));
        }
    }
    out
}

fn describe(k: &KeyDef) -> String {
    let mut meta = k.kind.name().to_string();
    let range = k.kind.range();
    if !range.is_empty() && !matches!(k.kind, Kind::Bool) {
        meta.push_str(&format!(", {range}"));
    }
    if k.apply == registry::Apply::Restart {
        meta.push_str(", restart");
    }
    if k.secret {
        meta.push_str(", secret");
    }
    if k.file_only {
        meta.push_str(", file only");
    }
    format!("# {} ({meta})\n", k.description)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<FileError> {
        Config::from_toml_str(text, "test.toml").expect_err("should fail")
    }

    #[test]
    fn file_values_override_defaults() {
        let cfg = Config::from_toml_str(
            "[network.smtp]\nport = 2525\nlisten = [\"127.0.0.1\", \"127.0.0.2\"]\n[relay]\ntls = \"none\"\n\"tls.verify\" = false\n[spam.threshold]\ntag = 5\n",
            "t",
        )
        .unwrap();
        assert_eq!(cfg.port("network.smtp.port"), 2525);
        assert_eq!(cfg.entry("network.smtp.port").unwrap().source, Source::File);
        assert_eq!(
            cfg.get("network.smtp.listen").to_string(),
            "127.0.0.1,127.0.0.2"
        );
        assert_eq!(cfg.text("relay.tls"), "none");
        assert!(!cfg.bool("relay.tls.verify"));
        assert_eq!(cfg.float("spam.threshold.tag"), 5.0);
        assert_eq!(
            cfg.entry("smtp.max_recipients").unwrap().source,
            Source::Default
        );
        // Dotted keys at top level work the same.
        let cfg = Config::from_toml_str("network.dns.cache.ttl = 300\n", "t").unwrap();
        assert_eq!(
            cfg.duration("network.dns.cache.ttl"),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = errors("[network.smtp]\nport = 25\nprot = 26\n");
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].column), (3, 1));
        assert_eq!(e[0].key.as_deref(), Some("network.smtp.prot"));
        assert!(
            e[0].message.contains("did you mean network.smtp.port?"),
            "{}",
            e[0]
        );

        let e = errors("[network.smtp]\n\nport = 70000\n");
        assert_eq!(e[0].line, 3);
        assert!(e[0].message.contains("out of range 1..65535"), "{}", e[0]);

        let e = errors("[network.submission]\nenabled = \"yes\"\n");
        assert!(e[0].message.contains("true or false"), "{}", e[0]);

        let e = errors("[network.smtp]\nport = \n");
        assert_eq!(e[0].line, 2);
        assert!(e[0].to_string().starts_with("test.toml:2:"), "{}", e[0]);

        let e = errors("[network.smtp\n");
        assert_eq!(e[0].line, 1);

        let e = errors("[network]\nsmtp = 5\n");
        assert!(e[0].message.contains("unknown key"), "{}", e[0]);

        // Every problem is reported, not just the first.
        let e = errors("a = 1\nb = 2\n");
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn overrides_and_unset() {
        let mut cfg = Config::from_toml_str("[smtp]\nmax_recipients = 50\n", "t").unwrap();
        let skipped = cfg.apply_overrides([
            ("smtp.max_recipients", "70"),
            ("relay.port", "2525"),
            ("gone.key", "1"),
        ]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(cfg.int("smtp.max_recipients"), 70);
        assert_eq!(cfg.entry("relay.port").unwrap().source, Source::Database);
        let def = registry::find("smtp.max_recipients").unwrap();
        cfg.clear_override(def);
        assert_eq!(cfg.int("smtp.max_recipients"), 50);
        assert_eq!(
            cfg.entry("smtp.max_recipients").unwrap().source,
            Source::File
        );
        cfg.clear_override(registry::find("relay.port").unwrap());
        assert_eq!(cfg.int("relay.port"), 25);
        assert_eq!(cfg.entry("relay.port").unwrap().source, Source::Default);
    }

    #[test]
    fn cross_key_checks() {
        assert!(
            Config::default().check().is_empty(),
            "{:?}",
            Config::default().check()
        );
        let mut cfg = Config::default();
        cfg.apply_overrides([
            ("network.rpcd.tcp.enabled", "true"),
            ("network.rpcd.tcp.bind", "0.0.0.0"),
        ]);
        let p = cfg.check();
        assert!(p.iter().any(|p| p.contains("tls.cert")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("api_key")), "{p:?}");
        cfg.apply_overrides([
            ("network.rpcd.tcp.tls.cert", "/c.pem"),
            ("network.rpcd.tcp.tls.key", "/k.pem"),
            ("network.rpcd.tcp.api_key", "0123456789abcdef"),
        ]);
        assert!(cfg.check().is_empty(), "{:?}", cfg.check());
        cfg.apply_overrides([("spam.threshold.tag", "30")]);
        assert!(cfg.check().iter().any(|p| p.contains("thresholds")));
    }

    #[test]
    fn key_errors() {
        let e = parse_key_value("network.smtp.prot", "25").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown key \"network.smtp.prot\"; did you mean network.smtp.port?"
        );
        let e = parse_key_value("network.smtp.port", "x").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid value for network.smtp.port (integer)")
        );
    }

    #[test]
    fn example_file_parses_when_uncommented() {
        let example = render_example();
        let uncommented: String = example
            .lines()
            .filter(|l| !l.starts_with("# ") && *l != "#")
            .map(|l| l.strip_prefix('#').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg =
            Config::from_toml_str(&uncommented, "example").unwrap_or_else(|e| panic!("{e:?}"));
        for k in KEYS {
            assert_eq!(
                cfg.entry(k.key).unwrap().source,
                Source::File,
                "{} missing from the example",
                k.key
            );
            assert_eq!(cfg.get(k.key).to_string(), k.default);
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("mysql://mb:secret@127.0.0.1:3306/mb"),
            "mysql://mb:********@127.0.0.1:3306/mb"
        );
        assert_eq!(redact_url("postgres://mb@h/db"), "postgres://mb@h/db");
        assert_eq!(
            redact_url("sqlite:///var/lib/x.db"),
            "sqlite:///var/lib/x.db"
        );
    }

    #[test]
    fn a_removed_key_in_a_file_is_a_notice_not_an_error() {
        let cfg = Config::from_toml_str(
            "[network.tls]\nmin_version = \"1.3\"\ndhparam = \"/etc/ssl/dh.pem\"\n",
            "m.toml",
        )
        .unwrap();
        assert_eq!(cfg.text("network.tls.min_version"), "1.3");
        let notices: Vec<String> = cfg.notices.iter().map(ToString::to_string).collect();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(
            notices[0].starts_with("m.toml:3:1: network.tls.dhparam: removed:"),
            "{notices:?}"
        );
        // A key that never existed is still an error.
        assert!(Config::from_toml_str("[network.tls]\ndhparams = \"x\"\n", "m.toml").is_err());
    }
}
