//! mb-dkim: the DKIM signing key (`dkim.key`) and the DNS record that publishes it, as
//! `opendkim-genkey` makes them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rcgen::{KeyPair, PKCS_RSA_SHA256, PublicKeyData, RsaKeySize};

const AFTER_HELP: &str = "\
mb-filter signs outbound mail (authenticated or from smtp.mynetworks) whose From domain
is one of smtp.domains, when dkim.sign = true, with the key in dkim.key and the selector
dkim.selector. Publish the record this tool prints in each signing domain's zone before
turning signing on.

Examples:
  mb-dkim keygen --domain example.org       # writes dkim.key, prints the TXT record
  mb-dkim record --domain example.org       # the record for the existing key
  mb-config set dkim.sign true

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
        #[arg(long, default_value_t = 2048)]
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

/// A domain as DNS names allow (letters, digits, hyphens, dots).
fn check_domain(d: &str) -> Result<(), Failure> {
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(Failure(2, format!("{d:?} is not a domain name")))
    }
}

/// `v=DKIM1; k=rsa; p=...` for a key.
fn record_value(key: &KeyPair) -> String {
    format!(
        "v=DKIM1; k=rsa; p={}",
        mb_core::message::base64_encode(&key.subject_public_key_info())
    )
}

fn print_record(json: bool, selector: &str, domain: &str, key: &KeyPair) {
    let name = format!("{selector}._domainkey.{domain}");
    let value = record_value(key);
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "type": "TXT", "value": value})
        );
        return;
    }
    // Zone-file form: TXT strings are at most 255 bytes each.
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    println!("{name}. IN TXT ( {} )", strings.join(" "));
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
            check_domain(&domain)?;
            let selector = selector.unwrap_or_else(|| cfg.text("dkim.selector"));
            let path = key.unwrap_or_else(|| cfg.path("dkim.key"));
            let size = match bits {
                2048 => RsaKeySize::_2048,
                3072 => RsaKeySize::_3072,
                4096 => RsaKeySize::_4096,
                _ => return Err(Failure(2, "--bits must be 2048, 3072 or 4096".into())),
            };
            if path.exists() && !force {
                return Err(Failure(
                    1,
                    format!(
                        "{} exists; mb-dkim record prints its DNS record, --force replaces it",
                        path.display()
                    ),
                ));
            }
            eprintln!("mb-dkim: generating a {bits}-bit RSA key ...");
            let pair = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, size)
                .map_err(|e| Failure(1, format!("cannot generate a key: {e}")))?;
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Failure(1, format!("cannot create {}: {e}", dir.display())))?;
            }
            let tmp = path.with_extension("tmp");
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o640)
                .open(&tmp)
                .and_then(|mut f| {
                    f.write_all(pair.serialize_pem().as_bytes())?;
                    f.sync_all()
                })
                .and_then(|()| std::fs::rename(&tmp, &path));
            written.map_err(|e| Failure(1, format!("cannot write {}: {e}", path.display())))?;
            eprintln!(
                "mb-dkim: wrote {}; publish this record, then: mb-config set dkim.sign true",
                path.display()
            );
            print_record(args.json, &selector, &domain, &pair);
        }
        Command::Record {
            domain,
            selector,
            key,
        } => {
            check_domain(&domain)?;
            let selector = selector.unwrap_or_else(|| cfg.text("dkim.selector"));
            let path = key.unwrap_or_else(|| cfg.path("dkim.key"));
            let pem = std::fs::read_to_string(&path).map_err(|e| {
                Failure(
                    1,
                    format!(
                        "cannot read {}: {e} (mb-dkim keygen makes a key)",
                        path.display()
                    ),
                )
            })?;
            let pair = KeyPair::from_pem(&pem)
                .map_err(|e| Failure(1, format!("{} is not a private key: {e}", path.display())))?;
            print_record(args.json, &selector, &domain, &pair);
        }
    }
    Ok(())
}
