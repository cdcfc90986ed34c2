//! mb-config: read and change the gateway's configuration, like `postconf` for Postfix.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use mb_core::config::REDACTED;
use mb_core::registry::KEYS;
use mb_proto::v1::config_client::ConfigClient;
use mb_proto::v1::control_client::ControlClient;
use mb_proto::v1::{
    self, GetRequest, HistoryRequest, ListRequest, ReloadRequest, RunningConfigRequest, SetRequest,
    UnsetRequest,
};
use mb_runtime::cli::{self, Failure};
use serde_json::{Value as Json, json};

const AFTER_HELP: &str = "\
Exit status: 0 success, 1 refused (unknown key, invalid value, invalid file),
2 usage error, 69 a daemon could not be reached, 77 permission denied.

Examples:
  mb-config set network.smtp.listen \"203.0.113.10,203.0.113.11\"
  mb-config set network.submission.require_tls true
  mb-config get network.dns.cache.ttl
  mb-config show network.smtp
  mb-config show --daemon mb-filter@1 network.dns
  mb-config list spam";

/// Read and change the Mailborder configuration.
///
/// Values set here are stored by mb-rpcd in the database and override the
/// configuration file; daemons follow changes live unless told to restart.
#[derive(Parser)]
#[command(name = "mb-config", version, after_help = AFTER_HELP)]
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
    /// Store a value (overrides the file); says when a restart is needed
    Set { key: String, value: String },
    /// Print the effective value of a key
    Get { key: String },
    /// Remove a stored value: the file value or the default applies again
    Unset { key: String },
    /// Effective values and where each comes from (default, file, database)
    Show {
        /// Only keys under this section, e.g. network.smtp
        section: Option<String>,
        /// Print secret values instead of masking them
        #[arg(long, conflicts_with = "daemon")]
        show_secrets: bool,
        /// What a running daemon uses instead (mb-smtpd, mb-filter@1, ...): its
        /// configuration generation and the values of the keys it reads, restart-only
        /// keys as it started with them (secrets always masked)
        #[arg(long, value_name = "NAME")]
        daemon: Option<String>,
    },
    /// Every key with type, default, range and description (works without mb-rpcd)
    List {
        /// Only keys under this section
        section: Option<String>,
    },
    /// Check a configuration file (default: the one in use) without starting anything
    Validate { file: Option<PathBuf> },
    /// Make every running daemon re-read its configuration
    Reload,
    /// Who changed what, when (the audit trail of `set` and `unset`)
    History {
        key: Option<String>,
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: u32,
    },
}

fn grpc(e: tonic::Status) -> Failure {
    cli::grpc("mb-rpcd", &e)
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-config", run(args))
}

async fn run(args: Args) -> Result<(), Failure> {
    let json = args.json;
    match args.command {
        Command::List { section } => return list(section.as_deref(), json),
        Command::Validate { file } => return validate(file.or(args.config), json),
        _ => {}
    }
    let cfg = mb_runtime::load_config_for_tool("mb-config", args.config.as_deref());
    if let Command::Show {
        section,
        daemon: Some(daemon),
        ..
    } = &args.command
    {
        return show_daemon(&cfg, daemon, section.as_deref().unwrap_or_default(), json).await;
    }
    let socket = cfg.socket("mb-rpcd");
    let channel = mb_runtime::uds::connect(&socket, "mb-rpcd").await?;
    let mut client = ConfigClient::new(channel.clone());
    match args.command {
        Command::Set { key, value } => {
            let r = client
                .set(SetRequest { key, value })
                .await
                .map_err(grpc)?
                .into_inner();
            let v = r.value.unwrap_or_default();
            if json {
                print_json(&json!({
                    "key": v.key, "value": shown(&v, true), "previous": r.previous.map(|p| shown(&p, true)),
                    "generation": r.generation, "restart_required": r.restart_required,
                    "restart": restart_units(&v), "warnings": r.warnings,
                }));
            } else {
                println!("{} = {}", v.key, shown(&v, true));
                if r.restart_required {
                    println!(
                        "note: restart to apply: systemctl restart {}",
                        restart_units(&v).join(" ")
                    );
                }
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
            }
        }
        Command::Get { key } => {
            let v = client
                .get(GetRequest { key })
                .await
                .map_err(grpc)?
                .into_inner()
                .value
                .unwrap_or_default();
            if json {
                print_json(&value_json(&v, true));
            } else {
                println!("{}", v.value);
            }
        }
        Command::Unset { key } => {
            let r = client
                .unset(UnsetRequest { key })
                .await
                .map_err(grpc)?
                .into_inner();
            let v = r.value.unwrap_or_default();
            if json {
                print_json(&json!({
                    "key": v.key, "value": shown(&v, true), "source": source_name(v.source),
                    "removed": r.removed, "restart_required": r.restart_required,
                }));
            } else {
                if !r.removed {
                    eprintln!("mb-config: {} had no stored value", v.key);
                }
                println!(
                    "{} = {} ({})",
                    v.key,
                    shown(&v, true),
                    source_name(v.source)
                );
                if r.restart_required {
                    println!(
                        "note: restart to apply: systemctl restart {}",
                        restart_units(&v).join(" ")
                    );
                }
            }
        }
        Command::Show {
            section,
            show_secrets,
            ..
        } => {
            let prefix = section.unwrap_or_default();
            let r = client
                .list(ListRequest { prefix })
                .await
                .map_err(grpc)?
                .into_inner();
            if json {
                let items: Vec<Json> = r
                    .values
                    .iter()
                    .map(|v| value_json(v, show_secrets))
                    .collect();
                print_json(&json!({ "generation": r.generation, "values": items }));
            } else {
                let width = r.values.iter().map(|v| v.key.len()).max().unwrap_or(0);
                for v in &r.values {
                    let text = shown(v, !show_secrets);
                    let text = if text.is_empty() {
                        "\"\"".to_string()
                    } else {
                        text
                    };
                    println!("{:width$} = {text}  # {}", v.key, source_name(v.source));
                }
            }
        }
        Command::Reload => reload(&cfg, channel, json).await?,
        Command::History { key, limit } => {
            let r = client
                .history(HistoryRequest {
                    key: key.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if json {
                let items: Vec<Json> = r
                    .entries
                    .iter()
                    .map(|e| {
                        json!({"id": e.id, "key": e.key, "action": e.action, "old": e.old_value,
                               "new": e.new_value, "uid": e.uid, "user": e.user, "at": e.at_unix})
                    })
                    .collect();
                print_json(&Json::Array(items));
            } else {
                for e in &r.entries {
                    let at = mb_runtime::logging::timestamp(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs(u64::try_from(e.at_unix).unwrap_or(0)),
                    );
                    println!(
                        "{at} {} {} {}: {:?} -> {:?}",
                        e.user, e.action, e.key, e.old_value, e.new_value
                    );
                }
            }
        }
        Command::List { .. } | Command::Validate { .. } => {}
    }
    Ok(())
}

/// Control.Reload on mb-rpcd, then on every other daemon that is running.
async fn reload(
    cfg: &mb_core::Config,
    rpcd: tonic::transport::Channel,
    json: bool,
) -> Result<(), Failure> {
    let mut results = Vec::new();
    let r = ControlClient::new(rpcd)
        .reload(ReloadRequest {})
        .await
        .map_err(grpc)?
        .into_inner();
    results.push(("mb-rpcd".to_string(), Ok(r)));
    for e in mb_runtime::probe::expected_daemons(cfg) {
        if e.name == "mb-rpcd" || !e.socket.exists() {
            continue;
        }
        let out = match mb_runtime::uds::connect(&e.socket, &e.name).await {
            Ok(ch) => ControlClient::new(ch)
                .reload(ReloadRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| mb_runtime::uds::describe_status(&e.name, &s)),
            Err(err) => Err(err.to_string()),
        };
        results.push((e.name, out));
    }
    let failed = results.iter().any(|(_, r)| r.is_err());
    if json {
        let items: Vec<Json> = results
            .iter()
            .map(|(name, r)| match r {
                Ok(r) => json!({"daemon": name, "reloaded": r.reloaded, "restart_required": r.restart_required}),
                Err(e) => json!({"daemon": name, "reloaded": false, "error": e}),
            })
            .collect();
        print_json(&Json::Array(items));
    } else {
        for (name, r) in &results {
            match r {
                Ok(r) if r.restart_required.is_empty() => println!("{name}: reloaded"),
                Ok(r) => println!(
                    "{name}: reloaded; restart to apply {}",
                    r.restart_required.join(", ")
                ),
                Err(e) => println!("{name}: not reloaded: {e}"),
            }
        }
    }
    if failed {
        return Err(Failure(69, anyhow!("some daemons did not reload")));
    }
    Ok(())
}

fn list(section: Option<&str>, json: bool) -> Result<(), Failure> {
    let prefix = section.unwrap_or("").trim_end_matches('.');
    let keys: Vec<_> = KEYS
        .iter()
        .filter(|k| {
            prefix.is_empty()
                || k.key == prefix
                || k.key
                    .strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with('.'))
        })
        .collect();
    if keys.is_empty() {
        let hint = mb_core::registry::nearest(prefix)
            .map(|k| format!("; did you mean {k}?"))
            .unwrap_or_default();
        return Err(Failure(1, anyhow!("no key under {prefix:?}{hint}")));
    }
    if json {
        let items: Vec<Json> = keys
            .iter()
            .map(|k| {
                json!({"key": k.key, "type": k.kind.name(), "default": k.default, "range": k.kind.range(),
                       "description": k.description, "restart": k.apply == mb_core::Apply::Restart,
                       "daemons": k.daemons, "secret": k.secret, "node_local": k.node_local})
            })
            .collect();
        print_json(&Json::Array(items));
    } else {
        for k in keys {
            let range = k.kind.range();
            let range = if range.is_empty() {
                String::new()
            } else {
                format!(" [{range}]")
            };
            let restart = if k.apply == mb_core::Apply::Restart {
                " (restart)"
            } else {
                ""
            };
            println!(
                "{} ({}{range}) default {:?}{restart}\n    {}",
                k.key,
                k.kind.name(),
                k.default,
                k.description
            );
        }
    }
    Ok(())
}

/// `show --daemon`: asks the daemon itself (it answers while mb-rpcd is down, and
/// says so).
async fn show_daemon(
    cfg: &mb_core::Config,
    daemon: &str,
    prefix: &str,
    json: bool,
) -> Result<(), Failure> {
    let socket = cfg.socket(&daemon.replace('@', "-"));
    let channel = mb_runtime::uds::connect(&socket, daemon).await?;
    let r = ControlClient::new(channel)
        .running_config(RunningConfigRequest {
            prefix: prefix.to_string(),
        })
        .await
        .map_err(|s| cli::grpc(daemon, &s))?
        .into_inner();
    if json {
        let values: Vec<Json> = r
            .values
            .iter()
            .map(|v| {
                json!({
                    "key": v.key, "value": v.value, "source": v.source, "restart": v.restart,
                    "pending": v.pending, "secret": v.secret,
                })
            })
            .collect();
        print_json(&json!({
            "daemon": r.daemon, "generation": r.generation, "confirmed": r.confirmed,
            "values": values,
        }));
        return Ok(());
    }
    println!(
        "# {}: configuration generation {}, {}",
        r.daemon,
        r.generation,
        if r.confirmed {
            "confirmed by mb-rpcd"
        } else {
            "running on its cached overrides (mb-rpcd unreachable)"
        }
    );
    let width = r.values.iter().map(|v| v.key.len()).max().unwrap_or(0);
    for v in &r.values {
        let value = if v.value.is_empty() {
            "\"\"".to_string()
        } else {
            v.value.clone()
        };
        let mut note = v.source.clone();
        if v.restart {
            note.push_str(", restart");
        }
        if let Some(p) = &v.pending {
            note.push_str(&format!("; a restart applies {p}"));
        }
        println!("{:width$} = {value}  # {note}", v.key);
    }
    Ok(())
}

fn validate(file: Option<PathBuf>, json: bool) -> Result<(), Failure> {
    let (path, named) = mb_runtime::config_path(file.as_deref());
    if !named && !path.exists() {
        return Err(Failure(
            1,
            anyhow!("{} does not exist; name a file to check", path.display()),
        ));
    }
    let mut warnings: Vec<String> = Vec::new();
    let problems: Vec<String> = match mb_core::Config::load_file(&path) {
        Ok(cfg) => {
            warnings = cfg.notices.iter().map(ToString::to_string).collect();
            cfg.check()
                .into_iter()
                .map(|p| format!("{}: {p}", path.display()))
                .collect()
        }
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    if json {
        print_json(&json!({
            "file": path.display().to_string(), "valid": problems.is_empty(),
            "errors": problems, "warnings": warnings,
        }));
    } else {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        if problems.is_empty() {
            println!("{}: valid", path.display());
        }
        for p in &problems {
            eprintln!("{p}");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure(
            1,
            anyhow!("{} problem(s) in {}", problems.len(), path.display()),
        ))
    }
}

fn shown(v: &v1::Value, mask: bool) -> String {
    let secret = v.info.as_ref().is_some_and(|i| i.secret);
    if secret && mask && !v.value.is_empty() {
        REDACTED.to_string()
    } else {
        v.value.clone()
    }
}

fn value_json(v: &v1::Value, show_secrets: bool) -> Json {
    let info = v.info.clone().unwrap_or_default();
    json!({
        "key": v.key, "value": shown(v, !show_secrets), "source": source_name(v.source),
        "type": info.r#type, "default": info.default_value, "secret": info.secret,
        "restart": info.apply == v1::Apply::Restart as i32,
    })
}

fn source_name(s: i32) -> &'static str {
    match v1::Source::try_from(s) {
        Ok(v1::Source::Default) => "default",
        Ok(v1::Source::File) => "file",
        Ok(v1::Source::Database) => "database",
        _ => "unknown",
    }
}

/// The systemd units to restart for a key (mb-filter is a template: all its instances).
fn restart_units(v: &v1::Value) -> Vec<String> {
    v.info
        .as_ref()
        .map(|i| {
            i.daemons
                .iter()
                .map(|d| {
                    if d == "mb-filter" {
                        "mb-filter@*".to_string()
                    } else {
                        d.clone()
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn print_json(v: &Json) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}
