//! Per-account hourly sending limits for authenticated clients (`smtp.auth.messages_per_hour`
//! counted at MAIL, `smtp.auth.recipients_per_hour` counted at RCPT), so that one phished
//! password cannot send without bound.
//!
//! The window is a fixed clock hour (UTC): a count starts at zero at the top of each
//! hour. That is simple to share and to explain, at the price that an account may send
//! up to twice its limit across an hour boundary (the end of one hour and the start of
//! the next). Only what is allowed is counted: a refused MAIL or RCPT does not use up
//! the budget.
//!
//! With `redis.url` set, every mb-smtpd process and node counts an account together
//! (keys `mb:acct:msg:LOGIN:HOUR` and `mb:acct:rcpt:LOGIN:HOUR`, expiring after the
//! hour); without Redis, or while it does not answer, each process counts on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

/// Adds to the hour's count unless that would pass the limit; returns the new count,
/// or -1 when refused. Atomic, so two processes never both take the last unit.
const TAKE: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n + 1 > tonumber(ARGV[1]) then return -1 end
n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return n
";

/// Seconds a shared counter outlives its hour (clock skew between nodes).
const KEY_TTL: u64 = 3600 + 300;

/// How long a Redis answer may take before the process counts on its own.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// How long Redis is skipped (counting in this process) after it failed to answer.
const REDIS_BACKOFF: Duration = Duration::from_secs(30);

/// Accounts remembered in memory before the counts of past hours are dropped.
const PRUNE_AT: usize = 10_000;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Messages (MAIL commands accepted).
    Messages,
    /// Recipients (RCPT commands accepted).
    Recipients,
}

impl Counter {
    fn key_part(self) -> &'static str {
        match self {
            Counter::Messages => "msg",
            Counter::Recipients => "rcpt",
        }
    }

    /// The configuration key that sets this counter's limit.
    pub fn config_key(self) -> &'static str {
        match self {
            Counter::Messages => "smtp.auth.messages_per_hour",
            Counter::Recipients => "smtp.auth.recipients_per_hour",
        }
    }
}

/// The counts of this process: (counter, login) → (hour, count).
#[derive(Default)]
pub struct LocalCounts {
    map: Mutex<HashMap<(Counter, String), (u64, u32)>>,
    /// Until when Redis is not asked after a failure ([`REDIS_BACKOFF`]): each RCPT
    /// would otherwise wait out [`REDIS_TIMEOUT`] again while Redis is down.
    redis_down_until: Mutex<Option<std::time::Instant>>,
}

impl LocalCounts {
    fn redis_backing_off(&self) -> bool {
        self.redis_down_until
            .lock()
            .map(|u| u.is_some_and(|u| std::time::Instant::now() < u))
            .unwrap_or(false)
    }

    fn redis_failed(&self) {
        if let Ok(mut u) = self.redis_down_until.lock() {
            *u = Some(std::time::Instant::now() + REDIS_BACKOFF);
        }
    }

    fn take(&self, counter: Counter, login: &str, limit: u32, hour: u64) -> bool {
        let Ok(mut map) = self.map.lock() else {
            // A poisoned lock only means another session panicked mid-update: the
            // counts are still numbers, so keep counting rather than refuse all mail.
            return true;
        };
        if map.len() >= PRUNE_AT {
            map.retain(|_, (h, _)| *h == hour);
        }
        let entry = map.entry((counter, login.to_string())).or_insert((hour, 0));
        if entry.0 != hour {
            *entry = (hour, 0);
        }
        if entry.1 >= limit {
            return false;
        }
        entry.1 += 1;
        true
    }
}

/// The limits a session runs with: this process's counts, Redis when configured, and
/// the two hourly limits read from the configuration at connect time (0: no limit).
#[derive(Clone)]
pub struct AccountLimits {
    pub local: Arc<LocalCounts>,
    pub redis: Option<ConnectionManager>,
    pub messages_per_hour: u32,
    pub recipients_per_hour: u32,
}

/// Over the limit: the limit that was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded(pub u32);

impl AccountLimits {
    /// Counts one message or recipient for `login`; `Err` when the hour's budget is spent.
    pub async fn take(&self, counter: Counter, login: &str) -> Result<(), Exceeded> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.take_at(counter, login, now).await
    }

    async fn take_at(&self, counter: Counter, login: &str, now: u64) -> Result<(), Exceeded> {
        let limit = match counter {
            Counter::Messages => self.messages_per_hour,
            Counter::Recipients => self.recipients_per_hour,
        };
        if limit == 0 {
            return Ok(());
        }
        let login = login.to_ascii_lowercase();
        let hour = now / 3600;
        if let Some(conn) = &self.redis
            && !self.local.redis_backing_off()
        {
            match shared_take(conn.clone(), counter, &login, limit, hour).await {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(Exceeded(limit)),
                Err(e) => {
                    self.local.redis_failed();
                    tracing::warn!(cause = %e, login = %login, backoff = REDIS_BACKOFF.as_secs(), "Redis did not answer; counting accounts' mail in this process only for a while");
                }
            }
        }
        if self.local.take(counter, &login, limit, hour) {
            Ok(())
        } else {
            Err(Exceeded(limit))
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SharedError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {REDIS_TIMEOUT:?}")]
    Timeout,
}

async fn shared_take(
    mut conn: ConnectionManager,
    counter: Counter,
    login: &str,
    limit: u32,
    hour: u64,
) -> Result<bool, SharedError> {
    let script = redis::Script::new(TAKE);
    let key = format!("mb:acct:{}:{login}:{hour}", counter.key_part());
    let mut invocation = script.key(key);
    invocation.arg(limit).arg(KEY_TTL);
    let n: i64 = tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut conn))
        .await
        .map_err(|_| SharedError::Timeout)??;
    Ok(n >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(messages: u32, recipients: u32) -> AccountLimits {
        AccountLimits {
            local: Arc::default(),
            redis: None,
            messages_per_hour: messages,
            recipients_per_hour: recipients,
        }
    }

    #[tokio::test]
    async fn each_account_has_its_own_hourly_budget() {
        let l = limits(3, 5);
        let t = 7 * 3600 + 10;
        for _ in 0..3 {
            assert_eq!(l.take_at(Counter::Messages, "alice", t).await, Ok(()));
        }
        assert_eq!(
            l.take_at(Counter::Messages, "Alice", t + 60).await,
            Err(Exceeded(3)),
            "the login is counted whatever its case"
        );
        // Another account, and the other counter of the same account, are unaffected.
        assert_eq!(l.take_at(Counter::Messages, "bob", t).await, Ok(()));
        for _ in 0..5 {
            assert_eq!(l.take_at(Counter::Recipients, "alice", t).await, Ok(()));
        }
        assert_eq!(
            l.take_at(Counter::Recipients, "alice", t).await,
            Err(Exceeded(5))
        );
        // Refusals were not counted, and the next clock hour starts afresh.
        assert_eq!(
            l.take_at(Counter::Messages, "alice", 8 * 3600).await,
            Ok(())
        );
        assert_eq!(
            l.local.map.lock().unwrap()[&(Counter::Messages, "alice".into())],
            (8, 1)
        );
    }

    #[tokio::test]
    async fn zero_means_no_limit() {
        let l = limits(0, 0);
        for _ in 0..1000 {
            assert_eq!(l.take_at(Counter::Messages, "alice", 0).await, Ok(()));
        }
        assert!(l.local.map.lock().unwrap().is_empty());
    }

    #[test]
    fn past_hours_are_pruned() {
        let c = LocalCounts::default();
        for i in 0..PRUNE_AT {
            assert!(c.take(Counter::Messages, &format!("u{i}"), 1, 1));
        }
        assert!(c.take(Counter::Messages, "late", 1, 2));
        assert_eq!(c.map.lock().unwrap().len(), 1);
    }
}
