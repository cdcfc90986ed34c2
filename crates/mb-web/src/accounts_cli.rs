//! The `mb-web account|key` subcommands: web accounts and API keys, managed through
//! mb-web's own API on its Unix socket (hyperlocal). Root and mb-web's user count there
//! as the local administrator without logging in, which is how the first account of a
//! fresh install is made.
//!
//! For `main.rs` (C1): flatten [`Tool`] into the daemon's arguments as an optional
//! subcommand and call [`run`] with the `--config` path when one is given.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::anyhow;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};
use mb_runtime::cli::{self, Failure};
use serde_json::{Value as Json, json};

/// What a subcommand's exit status means.
pub const EXIT_STATUS: &str = "\
Exit status: 0 success, 1 refused (exists, missing, weak password, bad scope), 2 usage
error, 69 mb-web could not be reached, 77 permission denied (run as root or as mb-web's
user: they act as the local administrator on the socket).";

/// The tool subcommands of `mb-web`.
#[derive(Debug, Clone, Subcommand)]
pub enum Tool {
    /// Web accounts (the logins of the web interface and API; not SMTP accounts)
    #[command(after_help = EXIT_STATUS)]
    Account(AccountArgs),
    /// API keys, sent as "Authorization: Bearer KEY"
    #[command(after_help = EXIT_STATUS)]
    Key(KeyArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AccountArgs {
    /// Print data as JSON
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AccountCommand,
}

/// A role and what it is limited to.
#[derive(Debug, Clone, Args)]
pub struct ScopeArgs {
    /// admin, domain-admin (its --domains) or user (its --addresses or --smtp-user)
    #[arg(long, value_parser = ["admin", "domain-admin", "user"])]
    pub role: String,
    /// A domain admin's domains, comma-separated
    #[arg(long, value_delimiter = ',')]
    pub domains: Vec<String>,
    /// A user's quarantine addresses, comma-separated
    #[arg(long, value_delimiter = ',')]
    pub addresses: Vec<String>,
    /// A user's SMTP account (mb-user), whose login and aliases are its addresses too
    #[arg(long, default_value = "")]
    pub smtp_user: String,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AccountCommand {
    /// Add an account; the password is read from the terminal (twice) or one line of stdin
    Add {
        name: String,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Enrol a TOTP second factor now and print its secret (shown once)
        #[arg(long)]
        totp: bool,
    },
    /// Delete an account and end its sessions
    #[command(alias = "remove")]
    Del { name: String },
    /// List the accounts
    List,
    /// Set an account's password (ends its sessions, clears a lockout)
    Passwd { name: String },
    /// Change an account's role and scope
    Role {
        name: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Enrol a new TOTP secret (printed once), or remove the second factor
    Totp {
        name: String,
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// Print data as JSON
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeyCommand {
    /// Create a key; its secret is printed this once
    Create {
        #[command(flatten)]
        scope: ScopeArgs,
        /// How long it lasts (90d, 12h), or never
        #[arg(long)]
        expires: String,
        /// What the key is for
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the keys, revoked ones included
    List,
    /// Revoke a key: it stops working at once
    #[command(alias = "del")]
    Revoke { id: String },
}

/// Runs a subcommand against mb-web's socket as `config` (or the default) places it.
pub fn run(tool: Tool, config: Option<&Path>) -> ExitCode {
    let cfg = mb_runtime::load_config_for_tool("mb-web", config);
    let socket = cfg.socket("mb-web");
    cli::run("mb-web", run_on(tool, socket))
}

/// The same against a given socket.
pub async fn run_on(tool: Tool, socket: PathBuf) -> Result<(), Failure> {
    let api = Api { socket };
    match tool {
        Tool::Account(a) => account(&api, a.command, a.json).await,
        Tool::Key(k) => key(&api, k.command, k.json).await,
    }
}

/// mb-web's API over its socket.
struct Api {
    socket: PathBuf,
}

impl Api {
    async fn call(&self, method: Method, path: &str, body: Option<Json>) -> Result<Json, Failure> {
        let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, path).into();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure(70, e.into()))?;
        let resp = client.request(req).await.map_err(|e| {
            // The connector's io::Error is somewhere down the chain of causes.
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut io = None;
            while let Some(c) = cause {
                if let Some(e) = c.downcast_ref::<std::io::Error>() {
                    io = Some(e);
                }
                cause = c.source();
            }
            let socket = self.socket.display();
            match io {
                Some(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Failure(
                    77,
                    anyhow!(
                        "permission denied on {socket}: run as root or as mb-web's user (the local administrator)"
                    ),
                ),
                _ => Failure(
                    69,
                    anyhow!(
                        "cannot reach mb-web on {socket} ({}); start it with `systemctl start mb-web` (or `cargo xtask up` in a source checkout)",
                        io.map_or_else(|| format!("{e:#}"), ToString::to_string)
                    ),
                ),
            }
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure(69, anyhow!("mb-web's answer was cut short: {e}")))?
            .to_bytes();
        let value: Json = if bytes.is_empty() {
            Json::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                Failure(
                    69,
                    anyhow!("mb-web answered something that is not JSON: {e}"),
                )
            })?
        };
        if status.is_success() {
            return Ok(value);
        }
        let detail = value["detail"]
            .as_str()
            .map_or_else(|| status.to_string(), str::to_string);
        if status == StatusCode::UNAUTHORIZED {
            return Err(Failure(
                77,
                anyhow!(
                    "{detail}; mb-web account|key act as the local administrator only when run as root or as mb-web's user"
                ),
            ));
        }
        let code = match status {
            StatusCode::FORBIDDEN => 77,
            s if s.is_client_error() => 1,
            _ => 69,
        };
        Err(Failure(code, anyhow!(detail)))
    }
}

/// A path segment, percent-encoded where it is not plain.
fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn scope_json(s: &ScopeArgs) -> Json {
    json!({
        "role": s.role,
        "domains": s.domains,
        "addresses": s.addresses,
        "smtp_user": s.smtp_user,
    })
}

fn print_json(v: &Json) {
    println!("{v}");
}

fn time(unix: i64) -> String {
    if unix <= 0 {
        return "never".into();
    }
    mb_runtime::logging::timestamp(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0)),
    )
}

fn list(v: &Json) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Json::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn print_totp(t: &Json) {
    if t.is_object() {
        println!(
            "TOTP secret (shown once): {}",
            t["secret"].as_str().unwrap_or_default()
        );
        println!("  {}", t["uri"].as_str().unwrap_or_default());
    }
}

async fn account(api: &Api, cmd: AccountCommand, json: bool) -> Result<(), Failure> {
    match cmd {
        AccountCommand::Add { name, scope, totp } => {
            let password = read_password(&name)?;
            let mut body = scope_json(&scope);
            body["name"] = json!(name);
            body["password"] = json!(password);
            body["totp"] = json!(totp);
            let r = api
                .call(Method::POST, "/api/v1/accounts", Some(body))
                .await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "added {} ({})",
                    cli::printable(r["account"]["name"].as_str().unwrap_or(&name)),
                    scope.role
                );
                print_totp(&r["totp"]);
            }
        }
        AccountCommand::Del { name } => {
            api.call(
                Method::DELETE,
                &format!("/api/v1/accounts/{}", segment(&name)),
                None,
            )
            .await?;
            cli::changed(
                json,
                &json!({"name": name, "deleted": true}),
                format_args!("deleted {name}"),
            );
        }
        AccountCommand::List => {
            let r = api.call(Method::GET, "/api/v1/accounts", None).await?;
            if json {
                print_json(&r);
                return Ok(());
            }
            for a in r.as_array().into_iter().flatten() {
                let scope = match a["role"].as_str() {
                    Some("domain-admin") => list(&a["domains"]),
                    Some("user") => {
                        let mut s = list(&a["addresses"]);
                        if let Some(u) = a["smtp_user"].as_str().filter(|u| !u.is_empty()) {
                            s.push_str(&format!(" smtp:{u}"));
                        }
                        s
                    }
                    _ => String::new(),
                };
                let locked = a["locked_until"].as_i64().unwrap_or(0);
                mb_runtime::say!(
                    "{} {} {}{}{} last login {}",
                    a["name"].as_str().unwrap_or_default(),
                    a["role"].as_str().unwrap_or_default(),
                    scope,
                    if a["totp_enrolled"] == true {
                        " totp"
                    } else {
                        ""
                    },
                    if locked > 0 {
                        format!(" locked until {}", time(locked))
                    } else {
                        String::new()
                    },
                    time(a["last_login"].as_i64().unwrap_or(0))
                );
            }
        }
        AccountCommand::Passwd { name } => {
            let password = read_password(&name)?;
            api.call(
                Method::POST,
                &format!("/api/v1/accounts/{}/password", segment(&name)),
                Some(json!({"password": password})),
            )
            .await?;
            cli::changed(
                json,
                &json!({"name": name, "changed": true}),
                format_args!("changed the password of {name}; its sessions ended"),
            );
        }
        AccountCommand::Role { name, scope } => {
            let r = api
                .call(
                    Method::PUT,
                    &format!("/api/v1/accounts/{}/role", segment(&name)),
                    Some(scope_json(&scope)),
                )
                .await?;
            cli::changed(json, &r, format_args!("{name} is now {}", scope.role));
        }
        AccountCommand::Totp { name, remove } => {
            let r = api
                .call(
                    Method::POST,
                    &format!("/api/v1/accounts/{}/totp", segment(&name)),
                    Some(json!({"remove": remove})),
                )
                .await?;
            if json {
                print_json(&r);
            } else if remove {
                println!("removed the second factor of {name}");
            } else {
                println!("enrolled a new TOTP secret for {name}");
                print_totp(&r["totp"]);
            }
        }
    }
    Ok(())
}

async fn key(api: &Api, cmd: KeyCommand, json: bool) -> Result<(), Failure> {
    match cmd {
        KeyCommand::Create {
            scope,
            expires,
            description,
        } => {
            let mut body = scope_json(&scope);
            if let Some(o) = body.as_object_mut() {
                o.remove("smtp_user");
            }
            body["expires"] = json!(expires);
            body["description"] = json!(description);
            let r = api.call(Method::POST, "/api/v1/keys", Some(body)).await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "created key {} ({}, expires {}); its secret, shown this once:",
                    r["key"]["id"].as_str().unwrap_or_default(),
                    scope.role,
                    time(r["key"]["expires_at"].as_i64().unwrap_or(0))
                );
                println!("{}", r["secret"].as_str().unwrap_or_default());
            }
        }
        KeyCommand::List => {
            let r = api.call(Method::GET, "/api/v1/keys", None).await?;
            if json {
                print_json(&r);
                return Ok(());
            }
            for k in r.as_array().into_iter().flatten() {
                let state = if k["revoked_at"].as_i64().unwrap_or(0) > 0 {
                    "revoked".to_string()
                } else {
                    format!("expires {}", time(k["expires_at"].as_i64().unwrap_or(0)))
                };
                mb_runtime::say!(
                    "{} {} {}{} {state}, last used {} {}",
                    k["id"].as_str().unwrap_or_default(),
                    k["role"].as_str().unwrap_or_default(),
                    list(&k["domains"]),
                    list(&k["addresses"]),
                    time(k["last_used"].as_i64().unwrap_or(0)),
                    k["description"].as_str().unwrap_or_default()
                );
            }
        }
        KeyCommand::Revoke { id } => {
            api.call(
                Method::DELETE,
                &format!("/api/v1/keys/{}", segment(&id)),
                None,
            )
            .await?;
            cli::changed(
                json,
                &json!({"id": id, "revoked": true}),
                format_args!("revoked key {id}"),
            );
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_paths_are_encoded() {
        assert_eq!(segment("jane@a.test"), "jane@a.test");
        assert_eq!(segment("a/../b c"), "a%2F..%2Fb%20c");
        assert_eq!(segment("x?y#z"), "x%3Fy%23z");
    }
}
