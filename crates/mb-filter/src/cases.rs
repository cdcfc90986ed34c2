//! The filter's rules tested from case files, `tests/data/filter/<name>.case` (the
//! format is described in tests/data/filter/README.md; `mb_testkit::cases` reads them):
//! this module runs every case that needs no DNS through `engine::scan`. Cases with
//! `dns` records are for the end-to-end runner (tests/e2e/cases.rs), which serves them
//! from a test DNS server.

use std::fmt::Write as _;
use std::path::Path;

use mb_core::EnhancedStatus;
use mb_core::verdict::Verdict;
use mb_testkit::cases::{DIR, Expect, load_all};

/// Fewer cases than this ran without DNS: cases were lost (a moved directory, a case
/// that grew `dns` records by mistake), and the test says so instead of passing on
/// nothing.
const AT_LEAST: usize = 60;

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
    for (name, score) in want.required() {
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
    use mb_core::verdict::{Action, Symbol};

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
