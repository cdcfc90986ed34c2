//! mb-policy: allow, block or score mail differently by sender, recipient or client
//! network, as Proxmox Mail Gateway's rule system or MailScanner's rulesets do.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Args as ClapArgs, Parser, Subcommand};
use mb_proto::v1::policies_client::PoliciesClient;
use mb_proto::v1::{ListPoliciesRequest, Policy, PolicyRef, TestPolicyRequest};
use mb_runtime::cli::{self, Failure};
use serde_json::{Value as Json, json};

const AFTER_HELP: &str = "\
A policy matches an address (wildcards * and ?: *@example.org), a domain (example.org, or
*.example.org for its subdomains), a client network (192.0.2.0/24) or every message
(--default), as the sender (--from), a recipient (--to) or either (--from-or-to).
The matching policy with the lowest priority wins; on a tie address > network > domain
> default. Actions: allow (no spam scoring; viruses, attachment rules and DMARC reject
still apply), block (refused with 550), score (this policy's --tag/--quarantine/--reject
thresholds). Each recipient gets its own policy and the message the strictest of them
(block > score > allow): an allow for one recipient never exempts the others.
An allow on the sender (--from, or --from-or-to matched by the sender) applies only when
the sender is authenticated (SPF pass for its domain, or a DKIM pass aligned with the
From domain): anyone can write any envelope sender. --unauthenticated lifts that for one
policy; `list` marks such policies [unauthenticated].
Filter workers pick up changes within a few seconds.

Examples:
  mb-policy add partners --action allow --from '*@partner.example' --priority 10
  mb-policy add no-spammer --action block --from spammer.example
  mb-policy add office --action allow --network 192.0.2.0/24
  mb-policy add ceo-strict --action score --to ceo@example.org --tag 2 --quarantine 4
  mb-policy test --from news@partner.example --to bob@example.org --ip 203.0.113.5

Exit status: 0 success, 1 refused (bad pattern, name taken, no such policy), 2 usage
error, 69 mb-rpcd could not be reached, 77 permission denied.";

/// List, add, remove and test policies.
#[derive(Parser)]
#[command(name = "mb-policy", version, after_help = AFTER_HELP)]
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

#[derive(ClapArgs)]
#[group(required = true, multiple = false)]
struct Target {
    /// Match the sender: an address pattern (with @) or a domain
    #[arg(long)]
    from: Option<String>,
    /// Match any recipient: an address pattern (with @) or a domain
    #[arg(long)]
    to: Option<String>,
    /// Match the sender or any recipient
    #[arg(long = "from-or-to", value_name = "PATTERN")]
    from_or_to: Option<String>,
    /// Match the client address: an IP or CIDR network
    #[arg(long, value_name = "CIDR")]
    network: Option<String>,
    /// Match every message
    #[arg(long)]
    default: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Every policy, in the order they are considered
    List,
    /// Add a policy
    Add {
        name: String,
        /// allow, block or score
        #[arg(long)]
        action: String,
        #[command(flatten)]
        target: Target,
        /// Lower wins
        #[arg(long, default_value_t = 50)]
        priority: i32,
        /// With --action score: the tag threshold
        #[arg(long)]
        tag: Option<f64>,
        /// With --action score: the quarantine threshold
        #[arg(long)]
        quarantine: Option<f64>,
        /// With --action score: the reject threshold
        #[arg(long)]
        reject: Option<f64>,
        /// With --action allow on a sender: apply it even when the sender is not
        /// authenticated (forgeable; the behaviour before authenticated allows)
        #[arg(long)]
        unauthenticated: bool,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Remove a policy by name or id
    Del { policy: String },
    /// Which policy a message would get, and why
    Test {
        /// The sender address (empty for the null sender)
        #[arg(long, default_value = "")]
        from: String,
        /// A recipient address (repeat for several)
        #[arg(long)]
        to: Vec<String>,
        /// The client's IP address
        #[arg(long)]
        ip: Option<String>,
    },
}

fn grpc(e: tonic::Status) -> Failure {
    cli::grpc("mb-rpcd", &e)
}

fn policy_json(p: &Policy) -> Json {
    json!({
        "id": p.id, "name": p.name, "priority": p.priority, "object": p.object,
        "pattern": p.pattern, "direction": p.direction, "action": p.action,
        "tag": p.tag, "quarantine": p.quarantine, "reject": p.reject, "comment": p.comment,
        "unauthenticated": p.unauthenticated,
    })
}

fn describe(p: &Policy) -> String {
    let target = match p.object.as_str() {
        "default" => "every message".to_string(),
        "network" => format!("client in {}", p.pattern),
        _ => format!("{} {}", p.direction, p.pattern),
    };
    let mut out = format!(
        "{:>4} {:<20} priority {:<4} {:<6} {target}",
        p.id, p.name, p.priority, p.action
    );
    for (name, v) in [
        ("tag", p.tag),
        ("quarantine", p.quarantine),
        ("reject", p.reject),
    ] {
        if let Some(v) = v {
            out.push_str(&format!(" {name}={v}"));
        }
    }
    if p.unauthenticated {
        out.push_str(" [unauthenticated: applies to forgeable senders too]");
    }
    if !p.comment.is_empty() {
        out.push_str(&format!("  # {}", p.comment));
    }
    out
}

fn object_of(pattern: &str) -> &'static str {
    if pattern.contains('@') {
        "address"
    } else {
        "domain"
    }
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-policy", run(args))
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-policy", args.config.as_deref());
    let mut client = PoliciesClient::new(cli::rpcd(&cfg).await?);
    match args.command {
        Command::List => {
            let list = client
                .list(ListPoliciesRequest {})
                .await
                .map_err(grpc)?
                .into_inner()
                .policies;
            if args.json {
                let items: Vec<Json> = list.iter().map(policy_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).unwrap_or_default()
                );
            } else if list.is_empty() {
                println!(
                    "no policies: the global thresholds (spam.threshold.*) apply to every message"
                );
            } else {
                for p in &list {
                    println!("{}", describe(p));
                }
            }
        }
        Command::Add {
            name,
            action,
            target,
            priority,
            tag,
            quarantine,
            reject,
            unauthenticated,
            comment,
        } => {
            let (object, pattern, direction) = if let Some(p) = target.from {
                (object_of(&p), p, "from")
            } else if let Some(p) = target.to {
                (object_of(&p), p, "to")
            } else if let Some(p) = target.from_or_to {
                (object_of(&p), p, "from-or-to")
            } else if let Some(p) = target.network {
                ("network", p, "from")
            } else {
                ("default", String::new(), "from-or-to")
            };
            let p = client
                .add(Policy {
                    name,
                    priority,
                    object: object.into(),
                    pattern,
                    direction: direction.into(),
                    action,
                    tag,
                    quarantine,
                    reject,
                    comment,
                    unauthenticated,
                    ..Default::default()
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if args.json {
                println!("{}", policy_json(&p));
            } else {
                println!("added {}", describe(&p).trim_start());
            }
        }
        Command::Del { policy } => {
            let r = match policy.parse::<i64>() {
                Ok(id) => PolicyRef {
                    id,
                    name: String::new(),
                },
                Err(_) => PolicyRef {
                    id: 0,
                    name: policy.clone(),
                },
            };
            client.delete(r).await.map_err(grpc)?;
            mb_runtime::cli::changed(
                args.json,
                &serde_json::json!({ "removed": policy }),
                format_args!("removed {policy}"),
            );
        }
        Command::Test { from, to, ip } => {
            if let Some(ip) = &ip
                && ip.parse::<std::net::IpAddr>().is_err()
            {
                return Err(Failure(2, anyhow!("--ip {ip:?} is not an IP address")));
            }
            let r = client
                .test(TestPolicyRequest {
                    sender: from,
                    recipients: to,
                    client_ip: ip.unwrap_or_default(),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "matched": r.matched,
                        "policy": r.policy.as_ref().map(policy_json),
                        "explanation": r.explanation,
                    }))
                    .unwrap_or_default()
                );
            } else {
                for line in &r.explanation {
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}
