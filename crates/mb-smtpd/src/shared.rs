//! Rate counters and bans shared through Redis (`redis.url`), so that several mb-smtpd
//! processes and nodes count a source together and a ban made by one holds for all.
//! Without Redis, or while it is unreachable, each process counts on its own.

use std::net::IpAddr;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::protect::{Policy, Refusal};

/// Checks the ban and counts the connection in one step, atomically.
const ADMIT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
if n > tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[4], 'EX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
";

/// Why Redis could not answer; mail keeps flowing, counted locally.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("no answer within 3s")]
    Timeout,
}

#[derive(Clone)]
pub struct Shared {
    conn: ConnectionManager,
    script: redis::Script,
}

/// How often Redis is tried again when it was unreachable at start.
const CONNECT_RETRY: Duration = Duration::from_secs(30);

/// Connects to Redis in the background after it was unreachable at start, every 30 s
/// until it answers, then puts it in place: sessions started from then on share rate
/// counters, bans and account budgets without a restart.
pub async fn connect_later(
    server: std::sync::Arc<crate::server::Server>,
    url: String,
    shutdown: mb_runtime::lifecycle::Shutdown,
) {
    loop {
        tokio::select! {
            () = shutdown.requested() => return,
            () = tokio::time::sleep(CONNECT_RETRY) => {}
        }
        match Shared::connect(&url).await {
            Ok(r) => {
                if let Ok(mut shared) = server.shared.write() {
                    *shared = Some(r);
                }
                tracing::info!(redis = %mb_core::config::redact_url(&url), "Redis reachable: sharing rate counters, bans and account budgets from now on");
                return;
            }
            Err(e) => {
                tracing::debug!(redis = %mb_core::config::redact_url(&url), cause = %e, "Redis still unreachable");
            }
        }
    }
}

impl Shared {
    /// Connects (with short timeouts: a slow Redis must not hold up mail).
    pub async fn connect(url: &str) -> Result<Shared, SharedError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            Duration::from_secs(3),
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| SharedError::Timeout)??;
        Ok(Shared {
            conn,
            script: redis::Script::new(ADMIT),
        })
    }

    /// The connection, for counters kept elsewhere (account_limits.rs).
    pub(crate) fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Whether another process banned `ip` (a port-25 connection is checked, not counted).
    pub async fn banned(&self, ip: IpAddr) -> Result<bool, SharedError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("EXISTS")
            .arg(format!("mailborder:ban:{ip}"))
            .query_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Counts a connection from `ip` against the shared rate; `Err` when Redis failed.
    pub async fn admit(&self, p: &Policy, ip: IpAddr) -> Result<Option<Refusal>, SharedError> {
        let window = p.window.as_secs().max(1);
        let slot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / window);
        let mut conn = self.conn.clone();
        let r: i64 = self
            .script
            .key(format!("mailborder:ban:{ip}"))
            .key(format!("mailborder:rate:{ip}:{slot}"))
            .arg(p.rate)
            .arg(window)
            .arg(p.ban_for.as_secs().max(1))
            .arg(format!("more than {} connections in {window}s", p.rate))
            .invoke_async(&mut conn)
            .await?;
        Ok(match r {
            1 => Some(Refusal::NewBan),
            2 => Some(Refusal::Banned),
            _ => None,
        })
    }
}
