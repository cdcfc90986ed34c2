//! Architecture invariants enforced by tests (as rust-analyzer's `xtask/src/tidy.rs`):
//! no daemon crate depends on another daemon crate, and no library function returns
//! `Result<_, String>`. They run with every `cargo xtask test` (xtask is a workspace
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
    let code = match source.find("#[cfg(test)]\nmod tests") {
        Some(i) => &source[..i],
        None => source,
    };
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
