//! Architecture invariants enforced by tests (as rust-analyzer's `xtask/src/tidy.rs`):
//! no daemon crate depends on another daemon crate, no library function returns
//! `Result<_, String>`, and every configuration key is read by some code (a key that
//! `mb-config` accepts must do something). They run with every `cargo xtask test` (xtask is a workspace
//! member, so `cargo test --workspace` includes these).

use std::fs;
use std::path::{Path, PathBuf};

/// The daemon crates: each is a leaf; what two of them share lives in a library crate.
pub const DAEMON_CRATES: &[&str] = &[
    "mb-smtpd",
    "mb-filter",
    "mb-milter",
    "mb-rpcd",
    "mb-cluster",
    "mb-web",
];

/// Every `(daemon, dependency)` pair where a daemon crate's manifest names another
/// daemon crate, in any dependency table (normal, dev, build, target-specific).
pub fn daemon_edges(manifest: &str, package: &str) -> Vec<(String, String)> {
    let Ok(doc) = manifest.parse::<toml::Table>() else {
        return vec![(package.to_string(), "<unparsable Cargo.toml>".to_string())];
    };
    if !DAEMON_CRATES.contains(&package) {
        return Vec::new();
    }
    let mut tables: Vec<&toml::Table> = Vec::new();
    for key in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(t) = doc.get(key).and_then(toml::Value::as_table) {
            tables.push(t);
        }
    }
    if let Some(targets) = doc.get("target").and_then(toml::Value::as_table) {
        for target in targets.values().filter_map(toml::Value::as_table) {
            for key in ["dependencies", "dev-dependencies", "build-dependencies"] {
                if let Some(t) = target.get(key).and_then(toml::Value::as_table) {
                    tables.push(t);
                }
            }
        }
    }
    let mut out = Vec::new();
    for table in tables {
        for (name, spec) in table {
            // `foo = { package = "mb-smtpd" }` renames count too.
            let real = spec
                .get("package")
                .and_then(toml::Value::as_str)
                .unwrap_or(name);
            if real != package && DAEMON_CRATES.contains(&real) {
                out.push((package.to_string(), real.to_string()));
            }
        }
    }
    out
}

/// Places in library source where an error type is a bare `String`: `Result<T, String>`
/// in a signature, a type alias or anywhere else. Test modules (from `#[cfg(test)]` to
/// the end of the file, the house layout) are not library code.
pub fn string_errors(source: &str) -> Vec<(usize, String)> {
    let code = without_tests(source);
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("Result<") {
        let start = from + i;
        from = start + "Result<".len();
        // Only the type `Result`, not e.g. `ParseResult<`.
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(args) = generic_args(&code[from..]) else {
            continue;
        };
        if let Some(err) = args.get(1)
            && matches!(err.as_str(), "String" | "std::string::String")
        {
            let line = code[..start].matches('\n').count() + 1;
            let text = code[start..]
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            out.push((line, text));
        }
    }
    out
}

/// `source` up to its inline test module (`#[cfg(test)] mod tests {`, the house layout:
/// last in the file). A `#[cfg(test)] mod tests;` declaration near the top names a file
/// of its own and must not hide the rest of the file.
fn without_tests(source: &str) -> &str {
    match source.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &source[..i],
        None => source,
    }
}

/// Registry keys that no code reads yet because an open issue implements them. Each
/// entry is a key or a `SECTION.*` pattern, with the reason. The list only shrinks: the
/// test fails when an exempt key is read after all, so the entry goes with the work.
pub const UNREAD_KEYS_EXEMPT: &[(&str, &str)] = &[];

/// Whether `key` is covered by an exemption `pattern` (a key, or `SECTION.*`).
pub fn exempt_covers(pattern: &str, key: &str) -> bool {
    match pattern.strip_suffix(".*") {
        Some(section) => key
            .strip_prefix(section)
            .is_some_and(|rest| rest.starts_with('.')),
        None => pattern == key,
    }
}

/// The keys of `keys` that `sources` read. The rule: a key is read when its full name
/// appears as a string literal (`cfg.port("network.smtp.port")`, a key in a list of
/// keys), or when a format string whose `{...}` placeholders each stand for one name
/// segment matches it (`format!("network.{listener}.port")`, `format!("{scanner}.enabled")`),
/// which is how code that reads a key by section names it. Test modules do not count (a test that sets a
/// key does not make a daemon use it), nor do comment lines.
pub fn read_keys<'k>(keys: &[&'k str], sources: &[String]) -> Vec<&'k str> {
    let code: Vec<String> = sources
        .iter()
        .map(|source| {
            without_tests(source)
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let literals: Vec<&str> = code.iter().flat_map(|c| key_literals(c)).collect();
    keys.iter()
        .copied()
        .filter(|key| {
            literals
                .iter()
                .any(|lit| *lit == *key || (lit.contains('{') && format_matches(lit, key)))
        })
        .collect()
}

/// The double-quoted literals of `code` that look like a key or a key's format string:
/// lowercase names, digits, `_`, dots (at least one) and `{...}` placeholders.
fn key_literals(code: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(at) = code[i..].find('"') {
        let start = i + at + 1;
        let mut end = start;
        let mut depth = 0usize;
        while end < bytes.len() {
            match bytes[end] {
                b'{' => depth += 1,
                b'}' if depth > 0 => depth -= 1,
                b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' => {}
                b':' | b'?' | b'#' if depth > 0 => {}
                _ => break,
            }
            end += 1;
        }
        if end < bytes.len() && bytes[end] == b'"' && end > start && depth == 0 {
            let lit = &code[start..end];
            if lit.contains('.') {
                out.push(lit);
            }
            i = end + 1;
        } else {
            i = start;
        }
    }
    out
}

/// Whether the format string `pattern` can produce `key`, each placeholder standing for
/// exactly one name segment (`{scanner}.enabled` is `clamav.enabled`, not
/// `network.submission.enabled`). A pattern without a letter of its own (`{}.{}`) names
/// no key.
fn format_matches(pattern: &str, key: &str) -> bool {
    let mut literal = String::new();
    let mut depth = 0usize;
    for c in pattern.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            c if depth == 0 => literal.push(c),
            _ => {}
        }
    }
    if !literal.bytes().any(|b| b.is_ascii_lowercase()) {
        return false;
    }
    let pattern_segments: Vec<&str> = pattern.split('.').collect();
    let key_segments: Vec<&str> = key.split('.').collect();
    pattern_segments.len() == key_segments.len()
        && pattern_segments
            .iter()
            .zip(&key_segments)
            .all(|(p, k)| segment_matches(p, k))
}

/// One segment: literal text with placeholders, each one or more characters.
fn segment_matches(pattern: &str, segment: &str) -> bool {
    match pattern.find('{') {
        None => pattern == segment,
        Some(open) => {
            let Some(close) = pattern[open..].find('}') else {
                return false;
            };
            let (head, tail) = (&pattern[..open], &pattern[open + close + 1..]);
            let Some(rest) = segment.strip_prefix(head) else {
                return false;
            };
            (1..=rest.len()).any(|n| rest.is_char_boundary(n) && segment_matches(tail, &rest[n..]))
        }
    }
}

/// Every Rust source of the product: library and binary code under `crates/*/src`,
/// except the test helpers (`mb-testkit`) and test-only files. xtask is not the product.
pub fn product_sources(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(crates) = fs::read_dir(root.join("crates")) else {
        return out;
    };
    for krate in crates.filter_map(Result::ok) {
        if krate.file_name() == "mb-testkit" {
            continue;
        }
        walk(&krate.path().join("src"), &mut out);
    }
    out.retain(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        name != "tests.rs" && !name.ends_with("_tests.rs")
    });
    out.sort();
    out
}

/// The top-level arguments of a generic list that starts just after its `<`.
fn generic_args(rest: &str) -> Option<Vec<String>> {
    let mut depth = 0usize;
    let mut args = Vec::new();
    let mut current = String::new();
    for c in rest.chars() {
        match c {
            '<' | '(' | '[' => {
                depth += 1;
                current.push(c);
            }
            '>' | ')' | ']' if depth > 0 => {
                depth -= 1;
                current.push(c);
            }
            '>' => {
                args.push(current.split_whitespace().collect::<String>());
                return Some(args);
            }
            ',' if depth == 0 => {
                args.push(current.split_whitespace().collect::<String>());
                current.clear();
            }
            // Not a type after all (a comparison, or the end of the item).
            ';' | '{' => return None,
            _ => current.push(c),
        }
    }
    None
}

/// The library source files of the workspace's crates: everything under
/// `crates/*/src`, except binaries' `main.rs` and `bin/`, and test-only modules.
pub fn library_sources(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(crates) = fs::read_dir(root.join("crates")) else {
        return out;
    };
    for krate in crates.filter_map(Result::ok) {
        // The test helpers are test code, not the product's library.
        if krate.file_name() == "mb-testkit" {
            continue;
        }
        walk(&krate.path().join("src"), &mut out);
    }
    out.retain(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        name != "main.rs"
            && name != "tests.rs"
            && !name.ends_with("_tests.rs")
            && !p.components().any(|c| c.as_os_str() == "bin")
    });
    out.sort();
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask lives in the workspace")
            .to_path_buf()
    }

    #[test]
    fn no_daemon_crate_depends_on_another() {
        let mut edges = Vec::new();
        let mut seen = 0;
        for e in fs::read_dir(root().join("crates")).unwrap() {
            let dir = e.unwrap().path();
            let Ok(manifest) = fs::read_to_string(dir.join("Cargo.toml")) else {
                continue;
            };
            let package = dir.file_name().unwrap().to_string_lossy().to_string();
            if DAEMON_CRATES.contains(&package.as_str()) {
                seen += 1;
            }
            edges.extend(daemon_edges(&manifest, &package));
        }
        assert!(seen >= 5, "the daemon crates were not found under crates/");
        assert!(
            edges.is_empty(),
            "daemon crates depend on other daemon crates (move what they share into a \
             library crate such as mb-smtp, mb-scan, mb-runtime or mb-core): {edges:?}"
        );
    }

    #[test]
    fn the_dependency_check_sees_every_kind_of_edge() {
        let m = "[package]\nname = \"mb-filter\"\n[dependencies]\nmb-core.workspace = true\n\
                 mb-smtpd.workspace = true\n[dev-dependencies]\nrpc = { package = \"mb-rpcd\", path = \"x\" }\n\
                 [target.'cfg(unix)'.dependencies]\nmb-milter = \"1\"\n";
        let mut edges: Vec<String> = daemon_edges(m, "mb-filter")
            .into_iter()
            .map(|(_, to)| to)
            .collect();
        edges.sort();
        assert_eq!(edges, ["mb-milter", "mb-rpcd", "mb-smtpd"]);
        // Libraries and tools may depend on anything.
        assert!(daemon_edges(m, "mb-scan").is_empty());
        assert!(daemon_edges("[dependencies]\nmb-smtp = \"1\"\n", "mb-smtpd").is_empty());
    }

    #[test]
    fn no_library_function_returns_a_string_error() {
        let mut found = Vec::new();
        let files = library_sources(&root());
        assert!(files.len() > 20, "library sources were not found");
        for f in files {
            let source = fs::read_to_string(&f).unwrap();
            for (line, text) in string_errors(&source) {
                found.push(format!("{}:{line}: {text}", f.display()));
            }
        }
        assert!(
            found.is_empty(),
            "library code returns Result<_, String>; use a thiserror enum:\n{}",
            found.join("\n")
        );
    }

    /// The registry's own file does not count: every key is written there.
    fn sources_outside_the_registry() -> Vec<String> {
        let files = product_sources(&root());
        assert!(files.len() > 20, "product sources were not found");
        files
            .iter()
            .filter(|f| !f.ends_with("crates/mb-core/src/registry.rs"))
            .map(|f| fs::read_to_string(f).unwrap())
            .collect()
    }

    #[test]
    fn every_configuration_key_is_read_by_some_code() {
        let keys: Vec<&str> = mb_core::registry::KEYS.iter().map(|k| k.key).collect();
        let read = read_keys(&keys, &sources_outside_the_registry());
        let exempt = |key: &str| {
            UNREAD_KEYS_EXEMPT
                .iter()
                .find(|(p, _)| exempt_covers(p, key))
        };
        let dead: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !read.contains(k) && exempt(k).is_none())
            .collect();
        assert!(
            dead.is_empty(),
            "configuration keys no code reads: implement them, remove them from \
             crates/mb-core/src/registry.rs, or exempt them in UNREAD_KEYS_EXEMPT naming the \
             open issue that implements them:\n{}",
            dead.join("\n")
        );
        let mut stale = Vec::new();
        for (pattern, why) in UNREAD_KEYS_EXEMPT {
            let covered: Vec<&str> = keys
                .iter()
                .copied()
                .filter(|k| exempt_covers(pattern, k))
                .collect();
            if covered.is_empty() {
                stale.push(format!("{pattern}: no such key any more ({why})"));
            }
            for k in covered.iter().filter(|k| read.contains(k)) {
                stale.push(format!(
                    "{k}: read now, so {pattern} is no longer exempt ({why})"
                ));
            }
        }
        assert!(
            stale.is_empty(),
            "shrink UNREAD_KEYS_EXEMPT in xtask/src/tidy.rs:\n{}",
            stale.join("\n")
        );
    }

    #[test]
    fn the_read_key_check_sees_literals_and_format_strings_only() {
        let keys = [
            "network.smtp.port",
            "network.smtps.port",
            "network.reinject.max_connections",
            "relay.tls",
            "relay.tls.verify",
            "dkim.key",
            "spam.threshold.tag",
            "log.level",
        ];
        let src = "fn a(cfg: &Config) { cfg.port(\"network.smtp.port\"); }\n\
                   fn b(l: &str) -> String { format!(\"network.{l}.max_connections\") }\n\
                   fn c() { x(\"relay.tls\"); y(\"spam.threshold.{}\", 1); }\n\
                   // \"dkim.key\" in a comment, \"log.level\" in a test:\n\
                   #[cfg(test)]\nmod tests {\n fn t() { cfg.text(\"log.level\"); }\n}\n";
        let mut read = read_keys(&keys, &[src.to_string()]);
        read.sort();
        assert_eq!(
            read,
            [
                "network.reinject.max_connections",
                "network.smtp.port",
                "relay.tls",
                "spam.threshold.tag"
            ]
        );
        assert!(format_matches("network.{a}.{b}", "network.smtps.port"));
        assert!(format_matches("{scanner}.enabled", "clamav.enabled"));
        assert!(!format_matches(
            "{scanner}.enabled",
            "network.submission.enabled"
        ));
        assert!(!format_matches("network.{a}.port", "network.smtps.enabled"));
        assert!(!format_matches("network.{a}.port", "network..port"));
        assert!(!format_matches("{prefix}.{key}", "relay.port"));
        assert!(exempt_covers("network.http.*", "network.http.port"));
        assert!(!exempt_covers("network.http.*", "network.https.port"));
        assert!(exempt_covers(
            "smtp.recipient_delimiter",
            "smtp.recipient_delimiter"
        ));
    }

    #[test]
    fn the_string_error_check_sees_signatures_and_aliases() {
        let src = "pub fn a() -> Result<(), String> {}\n\
                   type R<T> = Result<T, String>;\n\
                   fn b() -> Result<\n    Vec<(u8, String)>,\n    String,\n> {}\n\
                   fn c() -> Result<String, Error> {}\n\
                   fn d() -> io::Result<String> {}\n\
                   fn e() -> ParseResult<u8, String> {}\n\
                   fn f() -> std::result::Result<HashMap<String, String>, std::string::String> {}\n\
                   #[cfg(test)]\nmod tests {\n fn g() -> Result<(), String> {}\n}\n";
        let lines: Vec<usize> = string_errors(src).into_iter().map(|(l, _)| l).collect();
        assert_eq!(lines, [1, 2, 3, 10]);
    }
}
