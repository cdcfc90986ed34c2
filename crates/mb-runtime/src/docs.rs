//! Manual pages and shell completions, written from each program's own clap definition.
//!
//! `cargo xtask install` (and the package build) run every program once with
//! `MB_WRITE_DOCS=DIR`: the program writes its pages and completions there and exits
//! instead of running. The pages therefore never drift from the options the program
//! really takes.

use std::fs;
use std::io::Write;
use std::path::Path;

use clap_complete::Shell;

/// What the manual says beyond the options: the conventions all the programs share.
const EXIT_STATUS_TOOL: &str = "0 on success; 1 when the request was refused (a bad value, \
an unknown name); 64 for a usage error; 69 when the daemon it talks to is unavailable; \
77 when the caller may not use the socket (not root, not the daemon's user, not in the \
mailborder group).";
const EXIT_STATUS_DAEMON: &str = "0 after a clean shutdown (SIGTERM or SIGINT drain the \
sessions first); 64 when the configuration is invalid (nothing is bound; systemd does not \
restart it); 69 when a listener or socket cannot be bound; 70 on an internal error.";
const FILES: &str = "/etc/mailborder/mailborder.toml: the configuration file (every key, \
commented out at its default; mb-config list describes them).\n\
/var/run/mailborder/*.sock: the daemons' gRPC sockets (mode 0660, group mailborder).\n\
/var/spool/mailborder: the mail spool and the quarantine.\n\
/var/lib/mailborder: the SQLite database and the cached configuration.";
const ENVIRONMENT: &str = "MAILBORDER_CONFIG: the configuration file, when --config is not given.";

/// Writes the program's pages and completions and exits, when `MB_WRITE_DOCS` names a
/// directory; otherwise parses the command line as `A::parse()` does.
pub fn parse<A: clap::Parser>() -> A {
    if let Some(dir) = std::env::var_os("MB_WRITE_DOCS") {
        let section = std::env::var("MB_WRITE_DOCS_SECTION").unwrap_or_else(|_| "1".into());
        let code = match write(&A::command(), Path::new(&dir), &section) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!(
                    "cannot write the manual to {}: {e}",
                    Path::new(&dir).display()
                );
                73
            }
        };
        std::process::exit(code);
    }
    A::parse()
}

/// Writes `man/manS/NAME.S` (and one page per subcommand, `NAME-SUB.S`), and the bash,
/// zsh and fish completions under `DIR/completions/{bash,zsh,fish}`.
pub fn write(cmd: &clap::Command, dir: &Path, section: &str) -> std::io::Result<()> {
    let mut cmd = cmd.clone();
    cmd.build();
    let name = cmd.get_name().to_string();
    let man = dir.join("man").join(format!("man{section}"));
    fs::create_dir_all(&man)?;
    page(&cmd, &name, &man, section)?;
    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let d = dir.join("completions").join(sub);
        fs::create_dir_all(&d)?;
        let mut out = fs::File::create(d.join(file))?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
    }
    Ok(())
}

/// One page, then one per subcommand (`mb-config-set`), as git and systemd document theirs.
fn page(cmd: &clap::Command, title: &str, dir: &Path, section: &str) -> std::io::Result<()> {
    let cmd = cmd
        .clone()
        .name(title.to_string())
        .bin_name(title.replace('-', " "));
    let mut roff = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(title.to_uppercase())
        .section(section)
        .manual("Mailborder")
        .source(format!("Mailborder {}", env!("CARGO_PKG_VERSION")))
        .render(&mut roff)?;
    let daemon = section == "8";
    for (heading, text) in [
        (
            "EXIT STATUS",
            if daemon {
                EXIT_STATUS_DAEMON
            } else {
                EXIT_STATUS_TOOL
            },
        ),
        ("ENVIRONMENT", ENVIRONMENT),
        ("FILES", FILES),
    ] {
        writeln!(roff, ".SH \"{heading}\"")?;
        for line in text.lines() {
            writeln!(roff, ".PP\n{}", escape(line))?;
        }
    }
    fs::write(dir.join(format!("{title}.{section}")), roff)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        page(sub, &format!("{title}-{}", sub.get_name()), dir, section)?;
    }
    Ok(())
}

/// Text safe inside a roff paragraph: backslashes escaped, no line read as a request.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e");
    if text.starts_with(['.', '\'']) {
        format!("\\&{text}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    #[command(name = "mb-example", about = "Does an example thing")]
    struct Args {
        /// Print JSON
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        /// Set a key
        Set { key: String },
    }

    #[test]
    fn pages_and_completions_come_from_the_clap_definition() {
        use clap::CommandFactory;
        let dir = tempfile::tempdir().unwrap();
        write(&Args::command(), dir.path(), "1").unwrap();
        let page = fs::read_to_string(dir.path().join("man/man1/mb-example.1")).unwrap();
        assert!(page.contains(".TH MB-EXAMPLE 1"), "{page}");
        assert!(page.contains("Does an example thing"), "{page}");
        assert!(page.contains("json"), "{page}");
        assert!(
            page.contains(".SH \"EXIT STATUS\"") && page.contains("69 when"),
            "{page}"
        );
        let sub = fs::read_to_string(dir.path().join("man/man1/mb-example-set.1")).unwrap();
        assert!(sub.contains("Set a key") && sub.contains("KEY"), "{sub}");
        assert!(!dir.path().join("man/man1/mb-example-help.1").exists());
        let bash = fs::read_to_string(dir.path().join("completions/bash/mb-example")).unwrap();
        assert!(
            bash.contains("complete -F") && bash.contains("--json"),
            "{bash}"
        );
        let zsh = fs::read_to_string(dir.path().join("completions/zsh/_mb-example")).unwrap();
        assert!(zsh.starts_with("#compdef mb-example"), "{zsh}");
        let fish = fs::read_to_string(dir.path().join("completions/fish/mb-example.fish")).unwrap();
        assert!(fish.contains("complete -c mb-example"), "{fish}");
    }

    #[test]
    fn roff_requests_in_text_are_escaped() {
        assert_eq!(escape(".SH x"), "\\&.SH x");
        assert_eq!(escape("a\\b"), "a\\eb");
        assert_eq!(escape("plain"), "plain");
    }
}
