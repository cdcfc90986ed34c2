//! mb-user: the accounts that may authenticate on the submission ports (SMTP AUTH), and
//! the sender addresses each may use (aliases, for sender binding).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use mb_proto::v1::users_client::UsersClient;
use mb_proto::v1::{
    AddUserRequest, AliasRequest, ListAliasesRequest, ListUsersRequest, RemoveUserRequest,
    SetPasswordRequest,
};
use mb_runtime::cli::{self, Failure};

const AFTER_HELP: &str = "\
Passwords are read from the terminal (twice, without echo) or, when stdin is not a
terminal, as one line from stdin. They are stored by mb-rpcd as Argon2id hashes.

An authenticated client may send only as its login (when the login is an address,
user+tag@ included) or as an address granted with `mb-user alias add LOGIN ADDRESS`;
`@example.org` grants every address of a domain. Changes apply to the next AUTH.

Exit status: 0 success, 1 refused (exists, missing, weak password), 2 usage error,
69 mb-rpcd could not be reached, 77 permission denied.";

/// Manage the accounts that may use SMTP AUTH.
#[derive(Parser)]
#[command(name = "mb-user", version, after_help = AFTER_HELP)]
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
    /// Add an account
    Add { name: String },
    /// Change an account's password
    Passwd { name: String },
    /// Remove an account
    #[command(alias = "remove")]
    Del { name: String },
    /// List the accounts
    List,
    /// Sender addresses an account may use besides its login
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
}

#[derive(Subcommand)]
enum AliasCommand {
    /// Let LOGIN send as ADDRESS (or as any address of a domain: @example.org)
    Add { login: String, address: String },
    /// Take ADDRESS back from LOGIN
    #[command(alias = "remove")]
    Del { login: String, address: String },
    /// List the aliases of LOGIN, or of every account
    List { login: Option<String> },
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-user", run(args))
}

fn grpc(e: tonic::Status) -> Failure {
    cli::grpc("mb-rpcd", &e)
}

/// Reads a new password: from the terminal twice without echo, else one line of stdin.
fn read_password(name: &str) -> Result<String, Failure> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| Failure(1, e.into()))?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let first = prompt(&format!("New password for {name}: "))?;
    let second = prompt("Again: ")?;
    if first != second {
        return Err(Failure(1, anyhow!("the passwords differ; nothing changed")));
    }
    Ok(first)
}

fn prompt(text: &str) -> Result<String, Failure> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let fail = |e: std::io::Error| Failure(1, e.into());
    eprint!("{text}");
    std::io::stderr().flush().map_err(fail)?;
    let saved = tcgetattr(&stdin).map_err(|e| Failure(1, e.into()))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).map_err(|e| Failure(1, e.into()))?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.map_err(fail)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-user", args.config.as_deref());
    let channel = mb_runtime::uds::connect(&cfg.socket("mb-rpcd"), "mb-rpcd")
        .await
        .map_err(|e| {
            let code = if matches!(e, mb_runtime::uds::ConnectError::Denied { .. }) {
                77
            } else {
                69
            };
            Failure(code, e.into())
        })?;
    let mut users = UsersClient::new(channel);
    match args.command {
        Command::Add { name } => {
            let password = read_password(&name)?;
            users
                .add(AddUserRequest {
                    username: name.clone(),
                    password,
                })
                .await
                .map_err(grpc)?;
            cli::changed(
                args.json,
                &serde_json::json!({"name": name, "added": true}),
                format_args!("added {name}"),
            );
        }
        Command::Passwd { name } => {
            let password = read_password(&name)?;
            users
                .set_password(SetPasswordRequest {
                    username: name.clone(),
                    password,
                })
                .await
                .map_err(grpc)?;
            cli::changed(
                args.json,
                &serde_json::json!({"name": name, "password_changed": true}),
                format_args!("password of {name} changed"),
            );
        }
        Command::Del { name } => {
            users
                .remove(RemoveUserRequest {
                    username: name.clone(),
                })
                .await
                .map_err(grpc)?;
            cli::changed(
                args.json,
                &serde_json::json!({"name": name, "removed": true}),
                format_args!("removed {name}"),
            );
        }
        Command::Alias { command } => alias(&mut users, args.json, command).await?,
        Command::List => {
            let list = users
                .list(ListUsersRequest {})
                .await
                .map_err(grpc)?
                .into_inner()
                .users;
            if args.json {
                let items: Vec<serde_json::Value> = list
                    .iter()
                    .map(|u| serde_json::json!({"name": u.username, "created_at": u.created_at_unix, "updated_at": u.updated_at_unix}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).unwrap_or_default()
                );
            } else {
                for u in list {
                    println!("{}", u.username);
                }
            }
        }
    }
    Ok(())
}

async fn alias(
    users: &mut UsersClient<tonic::transport::Channel>,
    json: bool,
    command: AliasCommand,
) -> Result<(), Failure> {
    match command {
        AliasCommand::Add { login, address } => {
            let r = users
                .add_alias(AliasRequest {
                    username: login.clone(),
                    address,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            let text = if r.changed {
                format!("{login} may now send as {}", r.address)
            } else {
                format!("{login} could already send as {}", r.address)
            };
            cli::changed(
                json,
                &serde_json::json!({"login": login, "address": r.address, "added": r.changed}),
                format_args!("{text}"),
            );
        }
        AliasCommand::Del { login, address } => {
            let r = users
                .remove_alias(AliasRequest {
                    username: login.clone(),
                    address,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            cli::changed(
                json,
                &serde_json::json!({"login": login, "address": r.address, "removed": true}),
                format_args!("{login} may no longer send as {}", r.address),
            );
        }
        AliasCommand::List { login } => {
            let list = users
                .list_aliases(ListAliasesRequest {
                    username: login.unwrap_or_default(),
                })
                .await
                .map_err(grpc)?
                .into_inner()
                .aliases;
            if json {
                let items: Vec<serde_json::Value> = list
                    .iter()
                    .map(|a| serde_json::json!({"login": a.username, "address": a.address, "created_at": a.created_at_unix}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).unwrap_or_default()
                );
            } else {
                for a in list {
                    mb_runtime::say!("{} {}", a.username, a.address);
                }
            }
        }
    }
    Ok(())
}
