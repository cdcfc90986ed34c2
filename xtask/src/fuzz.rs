//! `cargo xtask fuzz`: libFuzzer campaigns over the parsers that read untrusted input
//! (targets in `fuzz/fuzz_targets`), and the short smoke run `cargo xtask test` ends with.
//!
//! cargo-fuzz is installed on first use. Targets build optimised without
//! `debug_assert!` (`--release`, as the daemons run in production) and without a sanitizer
//! (`--sanitizer none`), which works on the stable toolchain; Rust's own bounds checks
//! and overflow checks (on in `fuzz/Cargo.toml`'s release profile) still turn memory
//! and arithmetic errors into crashes. A campaign grows `fuzz/corpus/TARGET`; the smoke
//! run reads that corpus and writes what it finds to a temporary directory, so a test run
//! leaves the tree as it was. Crashes land in `fuzz/artifacts/TARGET`.

use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run};

/// Every fuzz target, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "smtp_command",
    "smtp_data",
    "smtp_reply",
    "milter_frame",
    "mime_attachments",
    "archive",
    "config_value",
    "config_file",
];

/// The cargo-fuzz release checked on this toolchain (see ../shared/CRATES.md).
const CARGO_FUZZ: &str = "0.13.2";

/// What libFuzzer reported at the end of one target's run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub runs: u64,
    pub cov: u64,
    pub ft: u64,
    pub corpus: u64,
}

/// Runs each target (or only `only`) for `seconds`; fails on the first crash, naming the
/// input that caused it. `keep` writes new inputs into the kept corpus.
pub fn fuzz(only: Option<&str>, seconds: u64, keep: bool) -> Result<()> {
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t}; the targets are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    ensure_cargo_fuzz()?;
    let fuzz_dir = root().join("fuzz");
    // One build of every target first, so the time limit is spent fuzzing.
    run(cargo().current_dir(&fuzz_dir).args([
        "fuzz",
        "build",
        "--release",
        "--sanitizer",
        "none",
    ]))?;
    let mut report = Vec::new();
    for target in targets {
        let kept = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&kept)?;
        let scratch = tempfile::tempdir()?;
        let (write_to, read_too) = if keep {
            (kept.clone(), None)
        } else {
            (scratch.path().to_path_buf(), Some(kept.clone()))
        };
        let started = Instant::now();
        let mut cmd = cargo();
        cmd.current_dir(&fuzz_dir)
            .args(["fuzz", "run", "--release", "--sanitizer", "none", target])
            .arg(&write_to);
        if let Some(dir) = &read_too {
            cmd.arg(dir);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048")
            .arg("-timeout=10")
            .arg("-print_final_stats=1");
        let out = cmd
            .output()
            .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed ({}); the input is in fuzz/artifacts/{target}, replay it with \
                 `cd fuzz && cargo fuzz run --sanitizer none {target} fuzz/artifacts/{target}/FILE`:\n{}",
                out.status,
                tail.join("\n")
            );
        }
        let figures = figures(&log);
        report.push(format!(
            "{target:<18} {:>10} runs in {:>4}s  cov {:>5}  ft {:>6}  corpus {:>5}",
            figures.runs,
            started.elapsed().as_secs(),
            figures.cov,
            figures.ft,
            figures.corpus
        ));
    }
    println!("fuzzing: no crash\n{}", report.join("\n"));
    Ok(())
}

/// Installs cargo-fuzz when `cargo fuzz` is not there.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ} (about a minute, once)");
    run(cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ]))
}

/// The last status line libFuzzer printed (`#123 DONE cov: 45 ft: 67 corp: 8/90b ...`)
/// and its final statistics (`stat::number_of_executed_units: 123`).
pub fn figures(log: &str) -> Figures {
    let mut f = Figures::default();
    let field = |line: &str, name: &str| -> Option<u64> {
        let rest = line.split(name).nth(1)?;
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    for line in log.lines() {
        if line.starts_with('#') && line.contains("cov: ") {
            f.cov = field(line, "cov:").unwrap_or(f.cov);
            f.ft = field(line, "ft:").unwrap_or(f.ft);
            f.corpus = field(line, "corp:").unwrap_or(f.corpus);
            f.runs = line[1..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(f.runs);
        }
        if let Some(n) = field(line, "stat::number_of_executed_units:") {
            f.runs = n;
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_figures_are_read_from_its_log() {
        let log = "INFO: Seed: 1\n\
                   #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 120 ft: 300 corp: 40/2Kb lim: 43 exec/s: 2048 rss: 40Mb\n\
                   #9000\tDONE   cov: 130 ft: 333 corp: 44/3Kb lim: 43 exec/s: 3000 rss: 41Mb\n\
                   stat::number_of_executed_units: 9001\n";
        assert_eq!(
            figures(log),
            Figures {
                runs: 9001,
                cov: 130,
                ft: 333,
                corpus: 44
            }
        );
        assert_eq!(figures(""), Figures::default());
    }

    #[test]
    fn every_target_is_declared_in_the_fuzz_manifest() {
        let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t}");
            assert!(
                root().join(format!("fuzz/fuzz_targets/{t}.rs")).exists(),
                "{t}"
            );
        }
        assert_eq!(manifest.matches("[[bin]]").count(), TARGETS.len());
    }
}
