//! Valid-recipient patterns for recipient verification in `list` mode, and the address
//! extension rule (`smtp.recipient_delimiter`) shared with the policies.
//!
//! A pattern is an address whose domain is literal: `user@example.org` (exact),
//! `*@example.org` (catch-all) or a local part with the wildcards `*` and `?`
//! (`sales-*@example.org`). Patterns are kept lowercase and matched ignoring ASCII case,
//! as Postfix's lookup tables are. Mail to `user+tag@example.org` is looked up as the
//! full address first, then as `user@example.org` (Postfix's order).

use std::collections::{HashMap, HashSet};

/// The longest pattern accepted (RFC 5321's 64-octet local part, `@`, 255-octet domain).
const MAX_PATTERN: usize = 320;

/// Postfix writes a domain's catch-all as `@domain`; ours is `*@domain`. Both the CLI
/// (`mb-recipient`) and the REST API read patterns through this.
pub fn normalise(pattern: &str) -> String {
    let p = pattern.trim();
    match p.strip_prefix('@') {
        Some(domain) => format!("*@{domain}"),
        None => p.to_string(),
    }
}

/// The patterns of an import file with their line numbers: blank lines and `#` comments
/// are skipped and only the first field counts, so a Postfix map (`user@example.org OK`)
/// imports as it is.
pub fn import_lines(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .zip(1u32..)
        .filter_map(|(l, n)| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            l.split_whitespace().next().map(|f| (n, normalise(f)))
        })
        .collect()
}

/// Why a recipient pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{0:?} has no @ (write user@example.org, *@example.org or sales-*@example.org)")]
    NoAt(String),
    #[error("{0:?} has an empty local part (write *@DOMAIN for every address of a domain)")]
    EmptyLocal(String),
    #[error("{0:?} is too long or has spaces or control characters")]
    Malformed(String),
    #[error("the domain of {0:?} is not a domain name (wildcards go in the local part only)")]
    Domain(String),
}

/// A checked pattern, lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern {
    pub local: String,
    pub domain: String,
}

impl Pattern {
    /// Parses and normalises a pattern (surrounding spaces and `<>` are dropped).
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let t = text.trim();
        let t = t
            .strip_prefix('<')
            .and_then(|x| x.strip_suffix('>'))
            .unwrap_or(t);
        if t.len() > MAX_PATTERN || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PatternError::Malformed(text.to_string()));
        }
        let (local, domain) = t
            .rsplit_once('@')
            .ok_or_else(|| PatternError::NoAt(text.to_string()))?;
        if local.is_empty() {
            return Err(PatternError::EmptyLocal(text.to_string()));
        }
        let domain = domain.trim_end_matches('.').to_lowercase();
        let valid_domain = !domain.is_empty()
            && domain.len() <= 253
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
            });
        if !valid_domain {
            return Err(PatternError::Domain(text.to_string()));
        }
        Ok(Pattern {
            local: local.to_lowercase(),
            domain,
        })
    }

    /// Whether the local part has wildcards.
    pub fn is_wildcard(&self) -> bool {
        self.local.contains(['*', '?'])
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The local part without its extension: `user` for `user+tag` when `+` is one of
/// `delimiters` (each character is a delimiter, as in Postfix), split at the first
/// delimiter found. `None` when there is no extension (or no delimiter is configured).
/// A local part that starts with a delimiter keeps it (`+tag` has no user to strip to).
pub fn strip_extension<'a>(local: &'a str, delimiters: &str) -> Option<&'a str> {
    if delimiters.is_empty() {
        return None;
    }
    let i = local.find(|c| delimiters.contains(c))?;
    (i > 0).then(|| &local[..i])
}

/// The address without the extension of its local part (see [`strip_extension`]).
pub fn strip_address_extension(address: &str, delimiters: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    strip_extension(local, delimiters).map(|base| format!("{base}@{domain}"))
}

/// What the list says about an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A pattern matched (the pattern, as stored).
    Known(String),
    /// The domain has entries and none matched: 550 5.1.1.
    Unknown,
    /// The domain has no entry at all: accepted (list mode does not bounce a domain
    /// whose users were not imported yet).
    Unlisted,
}

#[derive(Debug, Default, Clone)]
struct DomainEntries {
    exact: HashSet<String>,
    /// Local parts with wildcards (the catch-all `*` among them).
    wild: Vec<String>,
}

/// The recipient list, indexed by domain.
#[derive(Debug, Default, Clone)]
pub struct RecipientList {
    domains: HashMap<String, DomainEntries>,
    len: usize,
}

impl RecipientList {
    pub fn new<I: IntoIterator<Item = Pattern>>(patterns: I) -> RecipientList {
        let mut list = RecipientList::default();
        for p in patterns {
            let d = list.domains.entry(p.domain).or_default();
            let fresh = if p.local.contains(['*', '?']) {
                (!d.wild.contains(&p.local))
                    .then(|| d.wild.push(p.local))
                    .is_some()
            } else {
                d.exact.insert(p.local)
            };
            list.len += usize::from(fresh);
        }
        list
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `domain` has at least one entry.
    pub fn lists_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(&domain.to_lowercase())
    }

    /// Looks `address` up: the full address, then (with an extension) the address
    /// without it; exact entries before wildcards.
    pub fn lookup(&self, address: &str, delimiters: &str) -> Lookup {
        let (local, domain) = address.rsplit_once('@').unwrap_or((address, ""));
        let domain = domain.trim_end_matches('.').to_lowercase();
        let Some(d) = self.domains.get(&domain) else {
            return Lookup::Unlisted;
        };
        let local = local.to_lowercase();
        let mut candidates = vec![local.as_str()];
        if let Some(base) = strip_extension(&local, delimiters) {
            candidates.push(base);
        }
        for l in &candidates {
            if d.exact.contains(*l) {
                return Lookup::Known(format!("{l}@{domain}"));
            }
        }
        for l in &candidates {
            if let Some(w) = d
                .wild
                .iter()
                .find(|w| crate::policy::glob(w.as_bytes(), l.as_bytes()))
            {
                return Lookup::Known(format!("{w}@{domain}"));
            }
        }
        Lookup::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(patterns: &[&str]) -> RecipientList {
        RecipientList::new(patterns.iter().map(|p| Pattern::parse(p).unwrap()))
    }

    #[test]
    fn patterns_are_checked_and_normalised() {
        let p = Pattern::parse(" <Sales-*@Example.ORG.> ").unwrap();
        assert_eq!(p.to_string(), "sales-*@example.org");
        assert!(p.is_wildcard());
        assert!(!Pattern::parse("bob@example.org").unwrap().is_wildcard());
        for (bad, what) in [
            ("example.org", "no @"),
            ("@example.org", "empty local part"),
            ("bob@", "domain"),
            ("bob@*.example.org", "domain"),
            ("bob@exa mple.org", "spaces"),
            ("bo\u{7}b@example.org", "control"),
            ("bob@example..org", "domain"),
        ] {
            let e = Pattern::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(bad.trim()) || e.contains("control"),
                "{bad}: {what}: {e}"
            );
        }
        assert!(Pattern::parse(&format!("{}@example.org", "a".repeat(400))).is_err());
    }

    #[test]
    fn exact_wildcard_catch_all_and_unlisted_domains() {
        let l = list(&[
            "bob@example.org",
            "sales-*@example.org",
            "t?m@example.org",
            "*@catchall.example",
            "BOB@example.org",
        ]);
        assert_eq!(l.len(), 4, "the duplicate in another case counts once");
        let check = |a: &str, expect: Lookup| assert_eq!(l.lookup(a, "+"), expect, "{a}");
        check("bob@example.org", Lookup::Known("bob@example.org".into()));
        check("Bob@EXAMPLE.org", Lookup::Known("bob@example.org".into()));
        check(
            "sales-eu@example.org",
            Lookup::Known("sales-*@example.org".into()),
        );
        check("tom@example.org", Lookup::Known("t?m@example.org".into()));
        check("toom@example.org", Lookup::Unknown);
        check("sales@example.org", Lookup::Unknown);
        check("alice@example.org", Lookup::Unknown);
        check(
            "anyone@catchall.example",
            Lookup::Known("*@catchall.example".into()),
        );
        check("alice@other.example", Lookup::Unlisted);
        assert!(l.lists_domain("EXAMPLE.org"));
        assert!(!l.lists_domain("other.example"));
    }

    #[test]
    fn extensions_are_stripped_when_the_full_address_is_unknown() {
        let l = list(&[
            "bob@example.org",
            "bob+exact@example.org",
            "sales-*@example.org",
        ]);
        let check = |a: &str, delims: &str, expect: Lookup| {
            assert_eq!(l.lookup(a, delims), expect, "{a} with {delims:?}")
        };
        check(
            "bob+news@example.org",
            "+",
            Lookup::Known("bob@example.org".into()),
        );
        check(
            "bob+exact@example.org",
            "+",
            Lookup::Known("bob+exact@example.org".into()),
        );
        check(
            "bob-news@example.org",
            "+-",
            Lookup::Known("bob@example.org".into()),
        );
        check(
            "sales-eu+x@example.org",
            "+",
            Lookup::Known("sales-*@example.org".into()),
        );
        // Without a delimiter, or with another one, the extension is part of the name.
        check("bob+news@example.org", "", Lookup::Unknown);
        check("bob+news@example.org", "-", Lookup::Unknown);
        // A leading delimiter has no user before it.
        check("+bob@example.org", "+", Lookup::Unknown);
        assert_eq!(strip_extension("a+b+c", "+"), Some("a"));
        assert_eq!(strip_extension("abc", "+"), None);
        assert_eq!(
            strip_address_extension("a+b@x.example", "+").as_deref(),
            Some("a@x.example")
        );
        assert_eq!(strip_address_extension("a@x.example", "+"), None);
    }
}
