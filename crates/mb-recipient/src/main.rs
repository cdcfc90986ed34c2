//! mb-recipient: the valid recipients of the served domains, for recipient verification
//! in list mode (`smtp.recipient_verification = list`), as Postfix's
//! relay_recipient_maps.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use mb_proto::v1::recipients_client::RecipientsClient;
use mb_proto::v1::{
    CheckRecipientRequest, ImportRecipientsRequest, ListRecipientsRequest, RecipientPatterns,
    RecipientsChanged,
};
use mb_runtime::cli::{self, Failure};
use serde_json::{Value as Json, json};
use tonic::transport::Channel;

const AFTER_HELP: &str = "\
A pattern is an address with a literal domain: user@example.org (exact), *@example.org
(catch-all: every address of the domain; Postfix's @example.org is read the same way)
or a local part with the wildcards * (any run of characters) and ? (one character):
sales-*@example.org. Patterns are stored lowercase and matched ignoring case. Mail to
user+tag@example.org is accepted when user+tag@example.org or user@example.org is
listed (smtp.recipient_delimiter).
In list mode, a served domain with no pattern at all accepts every address (with a
warning in mb-smtpd's log), so list mode can be enabled before the users are imported;
once a domain has one pattern, addresses not listed get 550 5.1.1 User unknown.
mb-smtpd picks up changes within 10 seconds; cluster children receive the main's list.

An import file has one pattern per line; blank lines and lines starting with # are
skipped, and only the first field counts, so a Postfix map (user@example.org OK) can be
imported as it is. FILE - reads standard input.

Examples:
  mb-recipient add alice@example.org bob@example.org
  mb-recipient add '*@lab.example.org' --comment 'lab: accept all'
  mb-recipient import /etc/postfix/relay_recipients
  mb-recipient import users.txt --replace
  mb-recipient check bob+news@example.org
  mb-recipient --json list --domain example.org

Exit status: 0 success (check: the address is accepted), 1 refused (invalid pattern,
unknown address for check), 2 usage error, 69 mb-rpcd could not be reached, 77
permission denied.";

/// Patterns sent in one request (a large import goes in several).
const CHUNK: usize = 20_000;

/// Largest answer read from mb-rpcd: the whole list of a large directory.
const MAX_ANSWER: usize = 256 << 20;

/// List, add, remove, import and check valid recipients.
#[derive(Parser)]
#[command(name = "mb-recipient", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file, for paths.run_dir [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print data as JSON
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every pattern, sorted
    List {
        /// Only this domain's patterns
        #[arg(long)]
        domain: Option<String>,
    },
    /// Add patterns
    Add {
        #[arg(required = true, value_name = "PATTERN")]
        patterns: Vec<String>,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Remove patterns
    Del {
        #[arg(required = true, value_name = "PATTERN")]
        patterns: Vec<String>,
    },
    /// Add the patterns of a file (one per line); --replace removes the others
    Import {
        /// The file, or - for standard input
        file: PathBuf,
        /// Make the list exactly the file's patterns (new ones are added before old ones
        /// are removed, so no listed user is refused meanwhile)
        #[arg(long)]
        replace: bool,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Whether an address is accepted, and which pattern says so
    Check { address: String },
}

fn grpc(e: tonic::Status) -> Failure {
    cli::grpc("mb-rpcd", &e)
}

/// The patterns of an import file, as the REST API reads them too.
fn read_patterns(text: &str) -> Vec<String> {
    mb_core::recipients::import_lines(text)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn add_up(total: &mut RecipientsChanged, c: RecipientsChanged) {
    total.added += c.added;
    total.removed += c.removed;
    total.unchanged += c.unchanged;
    total.invalid.extend(c.invalid);
}

fn report(json: bool, c: &RecipientsChanged) -> Result<(), Failure> {
    if json {
        println!(
            "{}",
            json!({
                "added": c.added, "removed": c.removed, "unchanged": c.unchanged,
                "invalid": c.invalid,
            })
        );
    } else {
        mb_runtime::say!(
            "added {}, removed {}, unchanged {}",
            c.added,
            c.removed,
            c.unchanged
        );
    }
    if c.invalid.is_empty() {
        return Ok(());
    }
    for i in &c.invalid {
        eprintln!("mb-recipient: refused {}", cli::printable(i));
    }
    Err(Failure(
        1,
        anyhow!(
            "{} pattern(s) refused, the others were applied",
            c.invalid.len()
        ),
    ))
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-recipient", run(args))
}

async fn list(
    client: &mut RecipientsClient<Channel>,
    domain: Option<String>,
) -> Result<Vec<mb_proto::v1::RecipientEntry>, Failure> {
    Ok(client
        .list(ListRecipientsRequest {
            domain: domain.unwrap_or_default(),
            if_not_version: String::new(),
        })
        .await
        .map_err(grpc)?
        .into_inner()
        .entries)
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-recipient", args.config.as_deref());
    let mut client =
        RecipientsClient::new(cli::rpcd(&cfg).await?).max_decoding_message_size(MAX_ANSWER);
    match args.command {
        Command::List { domain } => {
            let entries = list(&mut client, domain).await?;
            if args.json {
                let items: Vec<Json> = entries
                    .iter()
                    .map(|e| {
                        json!({"pattern": e.pattern, "comment": e.comment, "created_unix": e.created_unix})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).unwrap_or_default()
                );
            } else if entries.is_empty() {
                println!(
                    "no valid recipients: in list mode every address of a served domain is accepted"
                );
            } else {
                for e in &entries {
                    if e.comment.is_empty() {
                        mb_runtime::say!("{}", e.pattern);
                    } else {
                        mb_runtime::say!("{}  # {}", e.pattern, e.comment);
                    }
                }
            }
        }
        Command::Add { patterns, comment } => {
            let patterns = patterns
                .iter()
                .map(|p| mb_core::recipients::normalise(p))
                .collect();
            let c = client
                .add(RecipientPatterns { patterns, comment })
                .await
                .map_err(grpc)?
                .into_inner();
            report(args.json, &c)?;
        }
        Command::Del { patterns } => {
            let patterns = patterns
                .iter()
                .map(|p| mb_core::recipients::normalise(p))
                .collect();
            let c = client
                .delete(RecipientPatterns {
                    patterns,
                    comment: String::new(),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            report(args.json, &c)?;
        }
        Command::Import {
            file,
            replace,
            comment,
        } => {
            let text = if file.as_os_str() == "-" {
                let mut t = String::new();
                std::io::stdin()
                    .read_to_string(&mut t)
                    .context("cannot read standard input")
                    .map_err(Failure::refused)?;
                t
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))
                    .map_err(Failure::refused)?
            };
            let patterns = read_patterns(&text);
            let mut total = RecipientsChanged::default();
            for chunk in patterns.chunks(CHUNK) {
                let c = client
                    .import(ImportRecipientsRequest {
                        patterns: chunk.to_vec(),
                        replace: false,
                        comment: comment.clone(),
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                add_up(&mut total, c);
            }
            if replace {
                if !total.invalid.is_empty() {
                    report(args.json, &total)?;
                }
                // Compared as stored (lowercase, `<>` removed): what the file does not
                // name goes, once everything it names is in.
                let wanted: BTreeSet<String> = patterns
                    .iter()
                    .filter_map(|p| mb_core::recipients::Pattern::parse(p).ok())
                    .map(|p| p.to_string())
                    .collect();
                let gone: Vec<String> = list(&mut client, None)
                    .await?
                    .into_iter()
                    .map(|e| e.pattern)
                    .filter(|p| !wanted.contains(p))
                    .collect();
                for chunk in gone.chunks(CHUNK) {
                    let c = client
                        .delete(RecipientPatterns {
                            patterns: chunk.to_vec(),
                            comment: String::new(),
                        })
                        .await
                        .map_err(grpc)?
                        .into_inner();
                    total.removed += c.removed;
                }
            }
            report(args.json, &total)?;
        }
        Command::Check { address } => {
            let r = client
                .check(CheckRecipientRequest {
                    address: address.clone(),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    json!({"address": address, "result": r.result, "pattern": r.pattern, "looked_up": r.looked_up})
                );
            } else {
                match r.result.as_str() {
                    "known" => mb_runtime::say!(
                        "{address}: accepted, {} matches {}",
                        r.looked_up,
                        r.pattern
                    ),
                    "unlisted" => mb_runtime::say!(
                        "{address}: accepted, its domain has no valid recipients listed (list mode accepts every address of it)"
                    ),
                    _ => mb_runtime::say!(
                        "{address}: unknown, list mode answers 550 5.1.1 User unknown"
                    ),
                }
            }
            if r.result == "unknown" {
                return Err(Failure(1, anyhow!("{address} is not a valid recipient")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_files_take_the_first_field_and_postfix_catch_alls() {
        let text = "# HR\n\nalice@example.org OK\n  bob@example.org\t# desk\n@lab.example.org OK\n";
        assert_eq!(
            read_patterns(text),
            ["alice@example.org", "bob@example.org", "*@lab.example.org"]
        );
    }
}
