//! mb-greylist: shows and flushes the greylist (`greylist.*`), the triplets (client
//! network, sender, recipient) mb-smtpd deferred or passed and the client networks it
//! auto-whitelisted, as postgrey's `postgreyreport` and database clean-up do. The
//! greylist is in Redis when `redis.url` is set, else in mb-rpcd's database.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use mb_core::greylist::{REDIS_PREFIX, StoredClient, StoredTriplet, Timing};
use mb_proto::v1::greylist_client::GreylistClient;
use mb_proto::v1::{
    GreylistClient as Client, GreylistFlushRequest, GreylistListRequest, GreylistTriplet,
};
use mb_runtime::cli::{self, Failure};
use serde_json::{Value as Json, json};

const AFTER_HELP: &str = "\
With greylist.enabled, mb-smtpd answers 451 4.7.1 to the first attempt of a triplet
(the client's /24 or IPv6 network, the sender, the recipient) and lets a retry made
after greylist.delay and within greylist.retry_window through; a passed triplet is
remembered for greylist.lifetime after its last use, and a client network whose
triplets passed greylist.auto_whitelist times is not greylisted any more.
`list` shows deferred and passed triplets and the client networks; `flush` removes
what has expired (the default, as the daily pruning does) or, with --all, everything
(every sender is then greylisted again).

Examples:
  mb-greylist list
  mb-greylist list --json
  mb-greylist flush --expired
  mb-greylist flush --all

Exit status: 0 success, 2 usage error, 69 mb-rpcd or Redis could not be reached,
77 permission denied.";

/// List and flush the greylist.
#[derive(Parser)]
#[command(name = "mb-greylist", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file, for paths.run_dir and redis.url [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
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
    /// Every triplet and client network, with its state
    List,
    /// Remove the expired entries (default), or all of them
    Flush {
        /// Remove every entry: all senders are greylisted again
        #[arg(long, conflicts_with = "expired")]
        all: bool,
        /// Remove only the entries that have expired (the default)
        #[arg(long)]
        expired: bool,
    },
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fn triplet_json(t: &GreylistTriplet) -> Json {
    json!({
        "network": t.network, "sender": t.sender, "recipient": t.recipient,
        "state": if t.passed { "passed" } else { "deferred" },
        "first_seen": t.first_seen_unix, "last_seen": t.last_seen_unix,
        "count": t.count, "expires": t.expires_unix,
    })
}

fn client_json(c: &Client) -> Json {
    json!({
        "network": c.network, "passes": c.passes, "last_seen": c.last_seen_unix,
        "whitelisted": c.whitelisted, "expires": c.expires_unix,
    })
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-greylist", run(args))
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-greylist", args.config.as_deref());
    let redis_url = cfg.text("redis.url");
    let store = if redis_url.is_empty() {
        Store::Rpcd(GreylistClient::new(cli::rpcd(&cfg).await?))
    } else {
        Store::Redis(redis_connect(&redis_url).await?, Timing::from_config(&cfg))
    };
    match args.command {
        Command::List => {
            let (triplets, clients) = store.list().await?;
            if args.json {
                let out = json!({
                    "triplets": triplets.iter().map(triplet_json).collect::<Vec<_>>(),
                    "clients": clients.iter().map(client_json).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                return Ok(());
            }
            if triplets.is_empty() && clients.is_empty() {
                println!("the greylist is empty");
                return Ok(());
            }
            let now = now();
            let ago = |t: i64| cli::age(u64::try_from(now - t).unwrap_or(0));
            for t in &triplets {
                let state = if t.passed {
                    format!("passed {} times", t.count)
                } else {
                    format!("deferred {} times", t.count)
                };
                mb_runtime::say!(
                    "{:<20} <{}> -> <{}>  {state}, first seen {} ago, last {} ago",
                    t.network,
                    t.sender,
                    t.recipient,
                    ago(t.first_seen_unix),
                    ago(t.last_seen_unix)
                );
            }
            for c in &clients {
                let state = if c.whitelisted {
                    "auto-whitelisted"
                } else {
                    "not whitelisted yet"
                };
                mb_runtime::say!(
                    "{:<20} client: {} passed triplets, {state}, last seen {} ago",
                    c.network,
                    c.passes,
                    ago(c.last_seen_unix)
                );
            }
        }
        Command::Flush { all, expired: _ } => {
            let (triplets, clients) = store.flush(all).await?;
            let what = if all { "all" } else { "expired" };
            cli::changed(
                args.json,
                &json!({ "flushed": what, "triplets": triplets, "clients": clients }),
                format_args!("removed {triplets} triplets and {clients} client networks ({what})"),
            );
        }
    }
    Ok(())
}

/// Where the greylist is kept, as mb-smtpd chooses: Redis when `redis.url` is set.
enum Store {
    Rpcd(GreylistClient<tonic::transport::Channel>),
    Redis(redis::aio::MultiplexedConnection, Timing),
}

fn redis_failure(e: redis::RedisError) -> Failure {
    Failure(
        69,
        anyhow!("Redis: {e}; check redis.url and that Redis is running"),
    )
}

async fn redis_connect(url: &str) -> Result<redis::aio::MultiplexedConnection, Failure> {
    let client = redis::Client::open(url).map_err(|e| Failure(2, anyhow!("redis.url: {e}")))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(redis_failure)
}

/// Every key under `pattern`.
async fn redis_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>, Failure> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, mut batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(redis_failure)?;
        keys.append(&mut batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// The values of `keys` (a key that expired meanwhile is left out).
async fn redis_values(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
) -> Result<Vec<String>, Failure> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<Option<String>> = redis::cmd("MGET")
        .arg(keys)
        .query_async(conn)
        .await
        .map_err(redis_failure)?;
    Ok(values.into_iter().flatten().collect())
}

impl Store {
    async fn list(&self) -> Result<(Vec<GreylistTriplet>, Vec<Client>), Failure> {
        match self {
            Store::Rpcd(client) => {
                let r = client
                    .clone()
                    .list(GreylistListRequest {})
                    .await
                    .map_err(|e| cli::grpc("mb-rpcd", &e))?
                    .into_inner();
                Ok((r.triplets, r.clients))
            }
            Store::Redis(conn, timing) => {
                let mut conn = conn.clone();
                let now = now();
                let keys = redis_keys(&mut conn, &format!("{REDIS_PREFIX}t:*")).await?;
                let mut triplets: Vec<GreylistTriplet> = redis_values(&mut conn, &keys)
                    .await?
                    .iter()
                    .filter_map(|v| serde_json::from_str::<StoredTriplet>(v).ok())
                    .map(|s| GreylistTriplet {
                        expires_unix: s.entry.expires_at(timing),
                        network: s.network,
                        sender: s.sender,
                        recipient: s.recipient,
                        first_seen_unix: s.entry.first_seen,
                        last_seen_unix: s.entry.last_seen,
                        passed: s.entry.passed,
                        count: s.entry.count,
                    })
                    .collect();
                triplets.sort_by(|a, b| {
                    (a.first_seen_unix, &a.network, &a.sender, &a.recipient).cmp(&(
                        b.first_seen_unix,
                        &b.network,
                        &b.sender,
                        &b.recipient,
                    ))
                });
                let keys = redis_keys(&mut conn, &format!("{REDIS_PREFIX}c:*")).await?;
                let clients = redis_values(&mut conn, &keys)
                    .await?
                    .iter()
                    .filter_map(|v| serde_json::from_str::<StoredClient>(v).ok())
                    .map(|s| Client {
                        whitelisted: s.client.whitelisted(timing, now),
                        expires_unix: s.client.expires_at(timing),
                        network: s.network,
                        passes: s.client.passes,
                        last_seen_unix: s.client.last_seen,
                    })
                    .collect();
                Ok((triplets, clients))
            }
        }
    }

    async fn flush(&self, all: bool) -> Result<(u64, u64), Failure> {
        match self {
            Store::Rpcd(client) => {
                let r = client
                    .clone()
                    .flush(GreylistFlushRequest { all })
                    .await
                    .map_err(|e| cli::grpc("mb-rpcd", &e))?
                    .into_inner();
                Ok((r.triplets, r.clients))
            }
            // Redis forgets expired entries by itself (each key has its entry's TTL).
            Store::Redis(_, _) if !all => Ok((0, 0)),
            Store::Redis(conn, _) => {
                let mut conn = conn.clone();
                let mut gone = [0u64; 2];
                for (i, kind) in ["t", "c"].iter().enumerate() {
                    let keys = redis_keys(&mut conn, &format!("{REDIS_PREFIX}{kind}:*")).await?;
                    for chunk in keys.chunks(500) {
                        let n: u64 = redis::cmd("DEL")
                            .arg(chunk)
                            .query_async(&mut conn)
                            .await
                            .map_err(redis_failure)?;
                        gone[i] += n;
                    }
                }
                Ok((gone[0], gone[1]))
            }
        }
    }
}
