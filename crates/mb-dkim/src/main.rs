//! mb-dkim: the DKIM signing key (`dkim.key`) and the DNS record that publishes it, as
//! `opendkim-genkey` makes them (the code is the library's, `mb_dkim`, shared with
//! mb-rpcd's `Dkim` service behind mb-web's `/api/v1/dkim`).
//!
//! The tool works on the file itself, as `opendkim-genkey` does, rather than through
//! mb-rpcd: an administrator makes the key as root before the daemons are set up or
//! while they are stopped, and `--key` may name any file. Run as root it gives the file
//! to the daemons' group, so mb-filter can read it. A key made through the API is also
//! recorded in the audit trail; one made here is not (the file's time says when).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mb_dkim::{DkimError, Key, Record};

const AFTER_HELP: &str = "\
mb-filter signs outbound mail (authenticated or from smtp.mynetworks) whose From domain
is one of smtp.domains, when dkim.sign = true, with the key in dkim.key and the selector
dkim.selector. Publish the record this tool prints in each signing domain's zone before
turning signing on.

Examples:
  mb-dkim keygen --domain example.org       # writes dkim.key, prints the TXT record
  mb-dkim record --domain example.org       # the record for the existing key
  mb-config set dkim.sign true

Only RSA keys: mb-filter signs rsa-sha256. The key file is written with mode 0640 and,
when run as root, the mailborder group. mb-web's API does the same through mb-rpcd
(GET /api/v1/dkim/record, POST /api/v1/dkim/keygen), and records it in the audit trail.

Exit status: 0 success, 1 refused (the key exists, cannot be read or written), 2 usage
error.";

/// Make DKIM signing keys and print their DNS records.
#[derive(Parser)]
#[command(name = "mb-dkim", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file, for dkim.key and dkim.selector [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the record as JSON
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an RSA key (mode 0640) and print its DNS TXT record
    Keygen {
        /// The signing domain the record is printed for
        #[arg(long)]
        domain: String,
        /// Selector [default: dkim.selector]
        #[arg(long)]
        selector: Option<String>,
        /// Key file [default: dkim.key]
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Key size: 2048, 3072 or 4096
        #[arg(long, default_value_t = mb_dkim::DEFAULT_BITS)]
        bits: u32,
        /// Replace an existing key (mail signed with the old one stops verifying once
        /// its record is gone)
        #[arg(long)]
        force: bool,
    },
    /// Print the DNS TXT record of the existing key
    Record {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: Option<String>,
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

struct Failure(u8, String);

impl From<DkimError> for Failure {
    fn from(e: DkimError) -> Failure {
        let code = match e {
            DkimError::Domain(_) | DkimError::Selector(_) | DkimError::Bits(_) => 2,
            _ => 1,
        };
        Failure(code, e.to_string())
    }
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("mb-dkim: {msg}");
            ExitCode::from(code)
        }
    }
}

fn print_record(json: bool, selector: &str, path: &Path, record: &Record, key: &Key) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "name": record.name,
                "type": "TXT",
                "value": record.value,
                "selector": selector,
                "key": path.display().to_string(),
                "algorithm": key.algorithm(),
                "bits": key.bits(),
                "fingerprint": key.fingerprint(),
            })
        );
    } else {
        println!("{}", record.zone_line());
    }
}

fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-dkim", args.config.as_deref());
    match args.command {
        Command::Keygen {
            domain,
            selector,
            key,
            bits,
            force,
        } => {
            let domain = mb_dkim::check_domain(&domain)?;
            let selector = selector.unwrap_or_else(|| cfg.text("dkim.selector"));
            mb_dkim::check_selector(&selector)?;
            let path = key.unwrap_or_else(|| cfg.path("dkim.key"));
            if !mb_dkim::SIZES.contains(&bits) {
                return Err(DkimError::Bits(bits).into());
            }
            // Refused before the slow part; the write checks again atomically.
            if path.exists() && !force {
                return Err(DkimError::Exists(path).into());
            }
            eprintln!("mb-dkim: generating a {bits}-bit RSA key ...");
            let pair = Key::generate(bits)?;
            pair.write(&path, force)?;
            eprintln!(
                "mb-dkim: wrote {}; publish this record, then: mb-config set dkim.sign true",
                path.display()
            );
            let record = Record::new(&selector, &domain, &pair);
            print_record(args.json, &selector, &path, &record, &pair);
        }
        Command::Record {
            domain,
            selector,
            key,
        } => {
            let domain = mb_dkim::check_domain(&domain)?;
            let selector = selector.unwrap_or_else(|| cfg.text("dkim.selector"));
            mb_dkim::check_selector(&selector)?;
            let path = key.unwrap_or_else(|| cfg.path("dkim.key"));
            let pair = Key::read(&path)?;
            let record = Record::new(&selector, &domain, &pair);
            print_record(args.json, &selector, &path, &record, &pair);
        }
    }
    Ok(())
}
