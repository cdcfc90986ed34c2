//! The queue manager: takes committed messages from the incoming queue, routes every
//! recipient (transport table, relay host, MX), delivers with connection reuse and
//! concurrency limits, keeps each recipient's state durably in the spool (the message's
//! `DeliveryState`), retries temporary failures from the deferred queue with exponential
//! backoff, and sends delay warnings and bounces as DSNs.
//!
//! Split by concern, as Postfix splits `qmgr_*.c`: this module schedules (the run loop,
//! concurrency, the connection cache, retries) and settles one attempt of a message;
//! `resolve.rs` routes a recipient, `deliver.rs` makes one attempt at one next hop,
//! `trouble.rs` is the failure policy (what each failure makes of a recipient),
//! `notify.rs` tells the sender and the message log, `tls.rs` holds the TLS client
//! configurations.
//!
//! Crash safety: the message itself is never changed. A DSN is appended to the spool and
//! durable before the state or completion of the message it reports on is written, so a
//! crash can repeat a notice, never lose one (a success notice the spool refuses to write
//! is logged and dropped, see `notify`). A deferral's state is awaited. A message
//! every recipient of which is delivered or bounced is completed, and that completion is
//! queued, not awaited: a crash before its batch is durable repeats the delivery (the
//! RFC 1047 window, one batch long), never loses one. Nothing is delivered while the
//! spool is poisoned.

mod content;
mod deliver;
mod notify;
pub(crate) mod resolve;
/// The queue manager with the spool: failed notices, administrators' changes during an
/// attempt, compaction and a poisoned spool.
#[cfg(test)]
mod spool_tests;
pub(crate) mod tls;
mod trouble;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_core::Config;
use mb_core::route::{NextHop, Protocol};
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::dns::Dns;
use crate::spool::{
    Change, Committed, DeliveryState, Envelope, Fresh, Queue, Recipient, RecipientState, Spool,
};
use content::Content;
use deliver::Session;
use notify::Handoff;
use trouble::{Attempted, DeliveryError};

pub use resolve::route;
pub use trouble::RouteError;

/// Wall-clock time that follows tokio's clock, so tests can pause and advance it.
#[derive(Clone, Copy)]
pub struct Clock {
    base_sys: SystemTime,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            base_sys: SystemTime::now(),
            base: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.base_sys + self.base.elapsed()
    }

    pub fn unix(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[derive(Default)]
pub struct DeliveryCounters {
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub bounced: AtomicU64,
    pub notices: AtomicU64,
    pub connections: AtomicU64,
    pub reused: AtomicU64,
    /// Cached sessions the next hop had ended when they were reused (the message then
    /// went over another session).
    pub ended: AtomicU64,
}

pub struct Manager {
    spool: Arc<Spool>,
    follower: Follower,
    dns: Dns,
    pub clock: Clock,
    active: Mutex<HashSet<String>>,
    /// Deferred messages by id: the unix second of their next attempt.
    schedule: Mutex<BTreeMap<String, u64>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Committed>>>,
    wake: Notify,
    /// Bytes of new messages held in memory for their first attempt (`Held`).
    held_bytes: Arc<AtomicUsize>,
    global: Arc<Semaphore>,
    destinations: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Idle sessions by `session_key`.
    pool: Mutex<HashMap<String, Vec<Session>>>,
    tls: tls::Connectors,
    pub events: Option<mb_runtime::events::EventSink>,
    pub counters: DeliveryCounters,
}

/// At most this many bytes of new messages wait in memory for their first attempt; past
/// it, a new message is read back from the spool when its turn comes, as a deferred one
/// is. It bounds what a backlog (the next hop slow, `queue.concurrency` reached) holds.
const HELD_BUDGET: usize = 32 << 20;

/// A new message's bytes held for its first attempt, counted against `HELD_BUDGET`
/// until dropped.
struct Held {
    fresh: Fresh,
    budget: Arc<AtomicUsize>,
}

impl Held {
    /// Holds `fresh` if the budget allows, else drops it.
    fn take(fresh: Fresh, budget: &Arc<AtomicUsize>) -> Option<Held> {
        let n = fresh.message.len();
        budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= HELD_BUDGET).then_some(used + n)
            })
            .ok()?;
        Some(Held {
            fresh,
            budget: budget.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget
            .fetch_sub(self.fresh.message.len(), Ordering::AcqRel);
    }
}

/// How long an idle outbound connection is kept for reuse.
const IDLE_REUSE: Duration = Duration::from_secs(5);

/// Removes a message from the active set when its delivery task ends, even by panic.
struct Active<'a>(&'a Manager, String);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.0.active.lock() {
            a.remove(&self.1);
        }
    }
}

/// One attempt of one message: what each step of it reads.
struct Delivery<'a> {
    cfg: &'a Config,
    env: &'a Envelope,
    /// The message as delivered (the verdict's header changes applied), streamed from
    /// the spool when it is large.
    message: &'a Content,
    /// Unix seconds at the start of the attempt.
    now: u64,
    /// Seconds since the message was received.
    age: u64,
    /// `queue.lifetime` in seconds.
    lifetime: u64,
}

impl<'a> Delivery<'a> {
    fn new(cfg: &'a Config, env: &'a Envelope, message: &'a Content, now: u64) -> Delivery<'a> {
        Delivery {
            cfg,
            env,
            message,
            now,
            age: now.saturating_sub(env.received_at),
            lifetime: cfg.duration("queue.lifetime").as_secs(),
        }
    }

    /// Unix seconds when the message expires: its last attempt.
    fn expiry(&self) -> u64 {
        self.env.received_at + self.lifetime
    }
}

/// A next hop and the recipients (indexes into the envelope) that go there.
struct Group {
    hop: NextHop,
    relay: bool,
    /// The hop is the recipient domain's own MX (no transport entry, not the relay
    /// host): addresses of this gateway among its hosts mean a loop (`LoopsBack`).
    guarded: bool,
    rcpts: Vec<usize>,
}

impl Manager {
    pub fn new(spool: Arc<Spool>, follower: Follower, dns: Dns, clock: Clock) -> Arc<Manager> {
        let cfg = follower.current();
        let (tx, rx) = mpsc::unbounded_channel();
        spool.on_commit(tx);
        let permits = usize::try_from(cfg.int("queue.concurrency")).unwrap_or(100);
        Arc::new(Manager {
            spool,
            follower,
            dns,
            clock,
            active: Mutex::default(),
            schedule: Mutex::default(),
            rx: Mutex::new(Some(rx)),
            wake: Notify::new(),
            held_bytes: Arc::default(),
            global: Arc::new(Semaphore::new(permits)),
            destinations: Mutex::default(),
            pool: Mutex::default(),
            tls: tls::Connectors::default(),
            events: None,
            counters: DeliveryCounters::default(),
        })
    }

    /// Runs until shutdown: picks up new messages at once, deferred ones when due.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        self.recover_schedule();
        self.scan_incoming();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        let mut enabled = true;
        loop {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => {
                        let held = c.fresh.and_then(|f| Held::take(f, &self.held_bytes));
                        self.dispatch_held(c.id, held);
                    }
                    None => break,
                },
                () = self.wake.notified() => {
                    self.scan_incoming();
                    self.dispatch_due();
                }
                _ = tick.tick() => {
                    ticks += 1;
                    enabled = self.on_tick(ticks, enabled);
                }
                () = shutdown.requested() => break,
            }
        }
    }

    /// At start: schedules the deferred messages the spool's recovery found, each at
    /// its next attempt (the incoming ones are dispatched by `scan_incoming`).
    fn recover_schedule(&self) {
        let mut schedule = self.lock_schedule();
        for (id, queue, next) in self.spool.list() {
            if queue == Queue::Deferred {
                schedule.insert(id, next);
            }
        }
    }

    /// Once a second: due retries, stale idle sessions, and the incoming queue again when
    /// delivery was just enabled (and every 30 s). Returns whether delivery is enabled.
    fn on_tick(self: &Arc<Self>, ticks: u64, was_enabled: bool) -> bool {
        let enabled = self.follower.current().bool("queue.delivery_enabled");
        if enabled && !was_enabled {
            tracing::info!("delivery enabled again");
            self.scan_incoming();
        }
        self.dispatch_due();
        self.sweep_pool();
        // A safety net: anything incoming that was not announced.
        if ticks.is_multiple_of(30) {
            self.scan_incoming();
        }
        enabled
    }

    fn lock_schedule(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `mb-queue flush [ID]`: deferred messages (or one) are tried at once.
    pub fn flush(&self, id: Option<&str>) -> usize {
        let mut s = self.lock_schedule();
        let n = match id {
            Some(id) => s.get_mut(id).map_or(0, |t| {
                *t = 0;
                1
            }),
            None => {
                s.values_mut().for_each(|t| *t = 0);
                s.len()
            }
        };
        drop(s);
        self.wake.notify_one();
        n
    }

    /// Whether a delivery attempt of `id` is running now.
    pub fn is_active(&self, id: &str) -> bool {
        self.active.lock().is_ok_and(|a| a.contains(id))
    }

    /// Tells the manager to look at the incoming queue again (after release or requeue).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    fn scan_incoming(self: &Arc<Self>) {
        for id in self.spool.ids(Queue::Incoming) {
            self.dispatch(id);
        }
    }

    fn dispatch_due(self: &Arc<Self>) {
        let now = self.clock.unix();
        let active = self.active.lock().map(|a| a.clone()).unwrap_or_default();
        let due: Vec<String> = {
            let mut s = self.lock_schedule();
            // A message still being delivered keeps its entry: its attempt reschedules it.
            let due: Vec<String> = s
                .iter()
                .filter(|(id, t)| **t <= now && !active.contains(*id))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &due {
                s.remove(id);
            }
            due
        };
        for id in due {
            self.dispatch(id);
        }
    }

    fn dispatch(self: &Arc<Self>, id: String) {
        self.dispatch_held(id, None);
    }

    /// `dispatch`, with the bytes of a new message when they are at hand.
    fn dispatch_held(self: &Arc<Self>, id: String, held: Option<Held>) {
        // A poisoned spool cannot record what a delivery did: deliver nothing (logged
        // once by `is_poisoned`) until a restart recovers it.
        if !self.follower.current().bool("queue.delivery_enabled") || self.spool.is_poisoned() {
            // Stays where it is; the tick re-scans when delivery is enabled again.
            if self.spool.locate(&id) == Some(Queue::Deferred) {
                self.lock_schedule().insert(id, self.clock.unix() + 1);
            }
            return;
        }
        if !self
            .active
            .lock()
            .map(|mut a| a.insert(id.clone()))
            .unwrap_or(false)
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _active = Active(&me, id.clone());
            let Ok(_permit) = me.global.clone().acquire_owned().await else {
                return;
            };
            // Boxed: an attempt's future is over 4 KB, and a task's future is copied
            // when it is spawned, stored and finished (measured: two thirds of the
            // bytes mb-smtpd copied per relayed message).
            Box::pin(me.deliver(&id, held)).await;
        });
    }

    /// One delivery attempt for every recipient of a message that is still pending.
    async fn deliver(self: &Arc<Self>, id: &str, held: Option<Held>) {
        let Some((message, env, mut state)) = self.load(id, held).await else {
            return;
        };
        let cfg = self.follower.current();
        let d = Delivery::new(&cfg, &env, &message, self.clock.unix());
        let started = tokio::time::Instant::now();
        let before: Vec<RecipientState> = state.recipients.iter().map(|r| r.state).collect();

        let handoffs = self.try_recipients(id, &d, &mut state).await;
        state.attempts += 1;
        if d.age >= d.lifetime {
            expire(&mut state, d.age);
        }
        // The notices are durable before anything below records what they report (a
        // bounce that could not be queued leaves its recipients deferred).
        self.notify(&d, &mut state, &before, &handoffs).await;
        self.count(&before, &state);
        self.event(&env, &state, message.len());

        if state.settled() {
            // The usual case: everything went on the first attempt, no state to write.
            // The completion is not awaited: it is written at once (a killed process
            // keeps it) and its fdatasync rides with the next commit's (at most
            // `mb_spool::LAZY_WAIT` later) instead of costing one of its own. Should the
            // machine go down before that sync, the message is delivered again (RFC
            // 1047's window).
            match self.spool.change(id, |_, _| (Change::CompleteLazily, ())) {
                Ok((pending, ())) => drop(pending),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::error!(id = %id, cause = %e, "cannot complete a delivered message")
                }
            }
            tracing::debug!(id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "message done");
            return;
        }
        self.reschedule(id, &d, state).await;
    }

    /// Opens a queued message and reads its delivery state, unless it is on hold or
    /// gone. A large message stays in its file (`Content`).
    async fn load(
        &self,
        id: &str,
        held: Option<Held>,
    ) -> Option<(Content, Envelope, DeliveryState)> {
        if let Some(mut held) = held {
            // A new message whose bytes came with its commit: its queue and state (an
            // administrator may have held it, or changed it, meanwhile) are in the
            // spool's index; nothing is read from disk.
            let env = std::mem::take(&mut held.fresh.envelope);
            let (queue, state) = self.spool.queued_state(id, &env)?;
            if queue == Queue::Hold {
                return None;
            }
            return Some((Content::whole(&held.fresh.message, &env), env, state));
        }
        // Reads go to the blocking pool: the runtime's threads serve every SMTP session
        // meanwhile.
        let (spool, idc) = (self.spool.clone(), id.to_string());
        let read = tokio::task::spawn_blocking(move || {
            let q = match spool.read(&idc) {
                Ok(q) => q,
                Err(e) if e.is_not_found() => return None,
                Err(e) => return Some(Err(io::Error::other(e))),
            };
            if q.queue == Queue::Hold {
                return None;
            }
            Some(Content::load(&q.body, &q.envelope).map(|m| (m, q.envelope, q.state)))
        })
        .await;
        match read {
            Ok(Some(Ok(m))) => Some(m),
            Ok(Some(Err(e))) => {
                tracing::error!(id = %id, cause = %e, "cannot read a queued message");
                None
            }
            Ok(None) | Err(_) => None,
        }
    }

    /// Routes the pending recipients and tries each next hop, at most
    /// `queue.recipient_limit` recipients per transaction, recording every outcome.
    async fn try_recipients(
        &self,
        id: &str,
        d: &Delivery<'_>,
        state: &mut DeliveryState,
    ) -> Vec<Handoff> {
        let (groups, unroutable) = plan(d.cfg, state);
        let limit = usize::try_from(d.cfg.int("queue.recipient_limit")).unwrap_or(50);
        let mut handoffs = vec![Handoff::default(); d.env.recipients.len()];
        for group in &groups {
            for chunk in group.rcpts.chunks(limit.max(1)) {
                let rcpts: Vec<Recipient> =
                    chunk.iter().map(|i| d.env.recipients[*i].clone()).collect();
                let results = self
                    .attempt(d, &group.hop, group.relay, group.guarded, &rcpts)
                    .await;
                for (i, res) in chunk.iter().zip(results) {
                    handoffs[*i] = Handoff {
                        dsn_passed: res.dsn_passed(),
                        lmtp: group.hop.protocol == Protocol::Lmtp,
                    };
                    self.record(id, d, &group.hop, state, *i, &res);
                }
            }
        }
        for (i, why) in unroutable {
            let r = &mut state.recipients[i];
            let error = DeliveryError::from(why);
            r.state = error.state();
            r.last_error = error.to_string();
            tracing::warn!(id = %id, to = %r.address, reply = %r.last_error, "{}", r.state);
        }
        handoffs
    }

    /// Records one recipient's outcome: its state, the log line and the history.
    fn record(
        &self,
        id: &str,
        d: &Delivery<'_>,
        hop: &NextHop,
        state: &mut DeliveryState,
        i: usize,
        res: &Attempted,
    ) {
        let r = &mut state.recipients[i];
        r.state = res.state();
        r.last_error = res.last_error();
        r.remote.clone_from(&res.remote);
        let relay = if res.remote.is_empty() {
            hop.to_string()
        } else {
            res.remote.clone()
        };
        let text = res.text();
        tracing::info!(
            id = %id,
            to = %r.address,
            relay = %relay,
            delay = d.age,
            reply = %text,
            "{}",
            r.state
        );
        let line = format!(
            "{} <{}> {} via {relay}: {text}",
            mb_runtime::logging::timestamp(self.clock.now()),
            r.address,
            r.state,
        );
        state.note(line);
    }

    /// Counts the recipients this attempt moved.
    fn count(&self, before: &[RecipientState], state: &DeliveryState) {
        for (was, r) in before.iter().zip(&state.recipients) {
            if *was == r.state {
                continue;
            }
            let counter = match r.state {
                RecipientState::Bounced => &self.counters.bounced,
                RecipientState::Delivered => &self.counters.delivered,
                RecipientState::Deferred | RecipientState::Queued => &self.counters.deferred,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Schedules the next attempt (backoff, never past expiry) and writes the state with
    /// the message in the deferred queue (a held one stays on hold, unscheduled).
    async fn reschedule(&self, id: &str, d: &Delivery<'_>, mut state: DeliveryState) {
        let backoff = backoff(
            state.attempts,
            d.cfg.duration("queue.retry_min"),
            d.cfg.duration("queue.retry_max"),
        );
        // Never retry after the lifetime without bouncing: the last try is at expiry.
        state.next_attempt = (d.now + backoff.as_secs()).min(d.expiry()).max(d.now + 1);
        let next = state.next_attempt;
        // Scheduled before the change, so a flush that sees it deferred finds it.
        self.lock_schedule().insert(id.to_string(), next);
        let written = self
            .spool
            .update(id, |queue, _| {
                // An administrator's hold made during the attempt stands.
                let to = if queue == Queue::Hold {
                    Queue::Hold
                } else {
                    Queue::Deferred
                };
                (Change::Set(to, Some(state)), to == Queue::Deferred)
            })
            .await;
        let schedule = match written {
            Ok(deferred) => deferred,
            Err(e) if e.is_not_found() => false,
            Err(e) => {
                tracing::error!(id = %id, cause = %e, "cannot write the delivery state; will retry");
                true
            }
        };
        if !schedule {
            self.lock_schedule().remove(id);
        }
    }

    fn destination(&self, key: &str, limit: usize) -> Arc<Semaphore> {
        let mut d = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        d.entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(limit.max(1))))
            .clone()
    }

    /// A session for `key` idle for less than `IDLE_REUSE`; older ones are closed. It
    /// is not probed with RSET (a round trip per message): a session the server has
    /// dropped meanwhile shows as `ClientError::Ended` at the next MAIL FROM, before
    /// any of the message is sent, and `attempt` then opens a new one.
    fn cached(&self, key: &str) -> Option<Session> {
        loop {
            let mut s = self
                .pool
                .lock()
                .ok()
                .and_then(|mut p| p.get_mut(key).and_then(Vec::pop))?;
            if s.idle_since.elapsed() < IDLE_REUSE {
                self.counters.reused.fetch_add(1, Ordering::Relaxed);
                return Some(s);
            }
            tokio::spawn(async move { s.client.quit().await });
        }
    }

    fn keep(&self, key: &str, mut s: Session) {
        s.idle_since = tokio::time::Instant::now();
        if let Ok(mut p) = self.pool.lock() {
            p.entry(key.to_string()).or_default().push(s);
        }
    }

    fn sweep_pool(&self) {
        let mut stale = Vec::new();
        if let Ok(mut pool) = self.pool.lock() {
            for list in pool.values_mut() {
                let (keep, old): (Vec<Session>, Vec<Session>) = list
                    .drain(..)
                    .partition(|s| s.idle_since.elapsed() < IDLE_REUSE);
                *list = keep;
                stale.extend(old);
            }
            pool.retain(|_, l| !l.is_empty());
        }
        for mut s in stale {
            tokio::spawn(async move { s.client.quit().await });
        }
    }
}

/// The delay before attempt `attempts + 1`: retry_min doubled per attempt, at most
/// retry_max.
pub fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max)
}

/// The connection cache's key: cached sessions are reused only under the settings they
/// were opened with.
fn session_key(cfg: &Config, hop: &NextHop, relay: bool) -> String {
    if relay {
        format!(
            "{hop} relay tls={} verify={} ca={} auth={}",
            cfg.text("relay.tls"),
            cfg.bool("relay.tls.verify"),
            cfg.text("relay.tls.ca_file"),
            cfg.text("relay.auth.username")
        )
    } else {
        format!("{hop} tls={}", cfg.text("network.smtp.tls.outbound"))
    }
}

/// The pending recipients grouped by next hop, and those without a route.
fn plan(cfg: &Config, state: &DeliveryState) -> (Vec<Group>, Vec<(usize, RouteError)>) {
    let transport =
        mb_core::route::parse_transport(&cfg.list("relay.transport"), cfg.port("queue.mx_port"))
            .unwrap_or_default();
    let mut groups: Vec<Group> = Vec::new();
    let mut unroutable = Vec::new();
    for (i, r) in state.recipients.iter().enumerate() {
        if r.state.is_final() {
            continue;
        }
        match route(cfg, &transport, &r.address) {
            Ok((hop, relay)) => {
                let guarded = !relay && !resolve::in_transport(&transport, &r.address);
                match groups
                    .iter_mut()
                    .find(|g| g.hop == hop && g.relay == relay && g.guarded == guarded)
                {
                    Some(g) => g.rcpts.push(i),
                    None => groups.push(Group {
                        hop,
                        relay,
                        guarded,
                        rcpts: vec![i],
                    }),
                }
            }
            Err(why) => unroutable.push((i, why)),
        }
    }
    (groups, unroutable)
}

/// The queue lifetime is over: what is still deferred bounces, with its last error.
fn expire(state: &mut DeliveryState, age: u64) {
    for r in state
        .recipients
        .iter_mut()
        .filter(|r| r.state == RecipientState::Deferred)
    {
        let error = DeliveryError::Expired {
            after: Duration::from_secs(age),
            last_error: std::mem::take(&mut r.last_error),
        };
        r.state = error.state();
        r.last_error = error.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    pub(super) type Got = Arc<Mutex<Vec<(String, Vec<String>, Vec<u8>)>>>;

    /// The commands each session of a scripted next hop received, in order.
    pub(super) type Sessions = Arc<Mutex<Vec<Vec<String>>>>;

    /// How a scripted next hop ends an idle session when told to.
    #[derive(Clone, Copy)]
    pub(super) enum Ending {
        /// "421 4.4.2 ... idle too long", then the close (as Postfix's smtpd does).
        With421,
        /// The close alone.
        Silently,
    }

    /// What a scripted next hop does besides taking mail: RCPT to bad* is refused
    /// (550), to tmp* deferred (451) unless `tmp_ok`; everything else accepted.
    #[derive(Clone, Default)]
    pub(super) struct Script {
        pub tmp_ok: Arc<AtomicBool>,
        /// Every RCPT waits for a permit of the semaphore, then is deferred (451); the
        /// counter counts the RCPTs that came.
        pub stall: Option<(Arc<tokio::sync::Semaphore>, Arc<AtomicUsize>)>,
        /// Taken by the first session waiting for a command: it ends that way (what a
        /// server's idle timeout does to a cached session).
        pub end_next: Arc<Mutex<Option<Ending>>>,
    }

    /// A scripted next hop: where it listens and what it saw.
    pub(super) struct Sink {
        pub addr: SocketAddr,
        /// Each transaction taken: sender, recipients, body (dot-unstuffed).
        pub got: Got,
        pub sessions: Sessions,
    }

    /// Starts a scripted SMTP server on loopback (PIPELINING offered).
    pub(super) async fn scripted(script: Script) -> Sink {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink = Sink {
            addr: l.local_addr().unwrap(),
            got: Arc::default(),
            sessions: Arc::default(),
        };
        let (got, log) = (sink.got.clone(), sink.sessions.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(Vec::new());
                    log.len() - 1
                };
                let (got, log, script) = (got.clone(), log.clone(), script.clone());
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    let _ = w.write_all(b"220 sink.test ESMTP\r\n").await;
                    let (mut from, mut rcpts) = (String::new(), Vec::new());
                    let mut line = String::new();
                    loop {
                        line.clear();
                        let end = tokio::select! {
                            n = r.read_line(&mut line) => {
                                if n.unwrap_or(0) == 0 {
                                    return;
                                }
                                None
                            }
                            e = async {
                                loop {
                                    if let Some(e) = script.end_next.lock().unwrap().take() {
                                        return e;
                                    }
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                            } => Some(e),
                        };
                        match end {
                            Some(Ending::With421) => {
                                let _ = w.write_all(b"421 4.4.2 sink.test idle too long\r\n").await;
                                return;
                            }
                            Some(Ending::Silently) => return,
                            None => {}
                        }
                        log.lock().unwrap()[n].push(line.trim_end().to_string());
                        let up = line.to_ascii_uppercase();
                        let reply: String = if up.starts_with("EHLO") {
                            "250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n".into()
                        } else if up.starts_with("MAIL FROM:") {
                            from = line[10..].trim().trim_matches(['<', '>']).to_string();
                            rcpts.clear();
                            "250 2.1.0 ok\r\n".into()
                        } else if up.starts_with("RCPT TO:") {
                            let a = line[8..].trim().trim_matches(['<', '>']).to_string();
                            if let Some((gate, entered)) = &script.stall {
                                entered.fetch_add(1, Ordering::SeqCst);
                                if let Ok(permit) = gate.acquire().await {
                                    permit.forget();
                                }
                                "451 4.2.0 try later\r\n".into()
                            } else if a.starts_with("bad") {
                                "550 5.1.1 no such user\r\n".into()
                            } else if a.starts_with("tmp") && !script.tmp_ok.load(Ordering::SeqCst)
                            {
                                "451 4.2.0 try later\r\n".into()
                            } else {
                                rcpts.push(a);
                                "250 2.1.5 ok\r\n".into()
                            }
                        } else if up.starts_with("DATA") && rcpts.is_empty() {
                            "554 5.5.1 no valid recipients\r\n".into()
                        } else if up.starts_with("DATA") {
                            let _ = w.write_all(b"354 go\r\n").await;
                            let mut data = Vec::new();
                            loop {
                                let mut l = String::new();
                                if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                if l == ".\r\n" {
                                    break;
                                }
                                data.extend_from_slice(
                                    l.strip_prefix('.').unwrap_or(&l).as_bytes(),
                                );
                            }
                            got.lock()
                                .unwrap()
                                .push((from.clone(), rcpts.clone(), data));
                            "250 2.0.0 queued\r\n".into()
                        } else if up.starts_with("QUIT") {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        } else {
                            "250 ok\r\n".into()
                        };
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        sink
    }

    /// A scripted next hop with only `tmp_ok` set.
    pub(super) async fn sink(tmp_ok: Arc<AtomicBool>) -> (SocketAddr, Got) {
        let s = scripted(Script {
            tmp_ok,
            ..Script::default()
        })
        .await;
        (s.addr, s.got)
    }

    pub(super) fn config(dir: &std::path::Path, extra: &str) -> Config {
        let text = format!(
            "[paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\n\
             [smtp]\nhostname = \"gw.test\"\ndomains = \"served.example\"\n{extra}",
            d = dir.display()
        );
        Config::from_toml_str(&text, "test").unwrap()
    }

    pub(super) async fn queue_message(spool: &Spool, received_at: u64, rcpts: &[&str]) -> String {
        let id = spool.new_id();
        let env = Envelope {
            id: id.clone(),
            received_at,
            sender: "alice@sender.example".into(),
            recipients: rcpts
                .iter()
                .map(|a| Recipient {
                    address: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n")
            .await
            .unwrap();
        // Waited for on the blocking pool: paused time stands still meanwhile (see
        // `spool::Wait`), so the first attempt starts when the message was queued.
        w.commit_off_thread(&env).await.unwrap();
        id
    }

    /// The notices (null-sender messages) in the spool, as text.
    pub(super) fn notices(spool: &Spool) -> Vec<String> {
        let mut out = Vec::new();
        for q in [Queue::Incoming, Queue::Deferred] {
            for id in spool.ids(q) {
                if let Ok((msg, env)) = spool.read_message(&id)
                    && env.sender.is_empty()
                {
                    out.push(String::from_utf8_lossy(&msg).into_owned());
                }
            }
        }
        out
    }

    /// Asserts, from the log on disk, that a notice was committed before the `Done` of
    /// message `id` (waiting for that `Done`, which is queued, not awaited).
    async fn notice_before_completion(root: &std::path::Path, id: &str) {
        use mb_spool::LogKind;
        let log = || mb_spool::snapshot(root).unwrap().log;
        wait_for("the completion on disk", || {
            log().iter().any(|(k, i)| *k == LogKind::Done && i == id)
        })
        .await;
        let log = log();
        let done = log.iter().position(|(k, i)| *k == LogKind::Done && i == id);
        let notice = log
            .iter()
            .position(|(k, i)| *k == LogKind::Commit && i != id);
        assert!(
            notice.is_some_and(|n| Some(n) < done),
            "the notice is not before the completion: {log:?}"
        );
    }

    pub(super) fn fixed_dns() -> Dns {
        Dns::Fixed {
            mx: HashMap::from([(
                "nowhere.example".into(),
                vec![(10, "mx.nowhere.example".into())],
            )]),
            hosts: HashMap::new(),
        }
    }

    /// A manager relaying everything to the SMTP server at 127.0.0.1:`port`, on a
    /// spool of `layout` under `dir/spool`. Not running yet: `run` it with the
    /// `Shutdown` returned once the test has prepared what it needs.
    pub(super) fn relay_manager(
        dir: &std::path::Path,
        port: u16,
        layout: mb_spool::Config,
    ) -> (
        Arc<Spool>,
        Arc<Manager>,
        mb_runtime::lifecycle::ShutdownTrigger,
        Shutdown,
    ) {
        let cfg = config(
            dir,
            &format!("[relay]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n"),
        );
        let (trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower = Follower::start("mb-smtpd", cfg, shutdown.clone());
        let (spool, _) = Spool::open_with(&dir.join("spool"), layout).unwrap();
        let spool = Arc::new(spool);
        let m = Manager::new(spool.clone(), follower, fixed_dns(), Clock::new());
        (spool, m, trigger, shutdown)
    }

    pub(super) async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// A new message reaches the manager with its bytes, so its first attempt reads
    /// nothing back; one an administrator held between its commit and that attempt
    /// stays held (the index is asked, not the bytes); the held bytes are let go.
    #[tokio::test]
    async fn a_new_message_goes_from_memory_unless_held_before_its_first_attempt() {
        let (addr, got) = sink(Arc::new(AtomicBool::new(true))).await;
        let dir = tempfile::tempdir().unwrap();
        // Not running yet: both commits wait in its channel, with their bytes.
        let (spool, m, _trigger, shutdown) =
            relay_manager(dir.path(), addr.port(), mb_spool::Config::default());
        let held = queue_message(&spool, m.clock.unix(), &["held@served.example"]).await;
        let sent = queue_message(&spool, m.clock.unix(), &["sent@served.example"]).await;
        let (pending, ()) = spool
            .change(&held, |_, _| (Change::Set(Queue::Hold, None), ()))
            .unwrap();
        pending.unwrap().await.unwrap();
        tokio::spawn(m.clone().run(shutdown.clone()));
        wait_for("the delivery", || spool.locate(&sent).is_none()).await;
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), 1, "only the message not held");
            assert_eq!(got[0].1, ["sent@served.example"]);
            assert_eq!(got[0].2, b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n");
        }
        assert_eq!(spool.locate(&held), Some(Queue::Hold));
        wait_for("the bytes let go", || {
            m.held_bytes.load(Ordering::Acquire) == 0
        })
        .await;
    }

    /// What waits in memory for a first attempt is bounded: past `HELD_BUDGET` a new
    /// message's bytes are dropped (it is read back from the spool when its turn comes).
    #[test]
    fn held_bytes_stay_within_their_budget() {
        let budget = Arc::new(AtomicUsize::new(0));
        let fresh = |n: usize| Fresh {
            envelope: Envelope::default(),
            message: vec![b'x'; n],
        };
        let big = Held::take(fresh(HELD_BUDGET - 10), &budget).expect("within the budget");
        assert!(Held::take(fresh(11), &budget).is_none(), "over it");
        let small = Held::take(fresh(10), &budget).expect("exactly at it");
        assert_eq!(budget.load(Ordering::Acquire), HELD_BUDGET);
        drop((big, small));
        assert_eq!(budget.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn relays_settles_each_recipient_and_bounces_to_the_sender() {
        let tmp_ok = Arc::new(AtomicBool::new(false));
        let (addr, got) = sink(tmp_ok.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let (spool, m, trigger, shutdown) =
            relay_manager(dir.path(), addr.port(), mb_spool::Config::default());
        tokio::spawn(m.clone().run(shutdown.clone()));
        let id = queue_message(
            &spool,
            m.clock.unix(),
            &[
                "ok1@served.example",
                "bad@served.example",
                "tmp@served.example",
                "ok2@Served.Example",
            ],
        )
        .await;
        wait_for("the deferral", || {
            spool.locate(&id) == Some(Queue::Deferred)
        })
        .await;
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), 1, "one transaction for the relay host");
            assert_eq!(got[0].0, "alice@sender.example");
            assert_eq!(got[0].1, ["ok1@served.example", "ok2@Served.Example"]);
            assert_eq!(got[0].2, b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n");
        }
        let st = spool.read(&id).unwrap().state;
        let states: Vec<RecipientState> = st.recipients.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            [
                RecipientState::Delivered,
                RecipientState::Bounced,
                RecipientState::Deferred,
                RecipientState::Delivered
            ]
        );
        assert!(
            st.recipients[1].last_error.starts_with("550 5.1.1"),
            "{:?}",
            st.recipients[1]
        );
        assert!(st.recipients[2].last_error.starts_with("451 4.2.0"));
        assert_eq!(st.attempts, 1);
        assert!(
            st.next_attempt >= m.clock.unix() + 299,
            "retry_min is 5m by default"
        );
        // The bounce went to the sender, about the refused recipient only.
        let n = notices(&spool);
        assert_eq!(n.len(), 1, "one notice");
        assert!(n[0].contains("Final-Recipient: rfc822; bad@served.example"));
        assert!(n[0].contains("Status: 5.1.1") && !n[0].contains("tmp@served.example>"));

        // A flush retries at once; delivered recipients are not sent again.
        tmp_ok.store(true, Ordering::SeqCst);
        assert_eq!(m.flush(Some(&id)), 1);
        wait_for("the retry", || spool.locate(&id).is_none()).await;
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1, ["tmp@served.example"]);
        assert!(
            m.counters.reused.load(Ordering::Relaxed)
                + m.counters.connections.load(Ordering::Relaxed)
                >= 2
        );
        trigger.trigger();
    }

    /// A cached session is reused without an RSET round trip; when the next hop ended
    /// it while it idled (a 421 and the close, or the close alone), the message goes
    /// over a new session at once instead of being deferred, and is delivered once.
    #[tokio::test]
    async fn a_cached_session_is_reused_without_rset_and_replaced_when_the_server_ended_it() {
        let script = Script::default();
        let drop_next = script.end_next.clone();
        let sink = scripted(script).await;
        let (addr, sessions, messages) = (sink.addr, sink.sessions, sink.got);
        let dir = tempfile::tempdir().unwrap();
        let (spool, m, trigger, shutdown) =
            relay_manager(dir.path(), addr.port(), mb_spool::Config::default());
        tokio::spawn(m.clone().run(shutdown.clone()));
        let pooled = |m: &Manager| m.pool.lock().unwrap().values().map(Vec::len).sum::<usize>();
        let send = |n: usize| {
            let (spool, m, messages) = (spool.clone(), m.clone(), messages.clone());
            async move {
                let id = queue_message(&spool, m.clock.unix(), &["rcpt@served.example"]).await;
                wait_for("the delivery", || {
                    spool.locate(&id).is_none() && messages.lock().unwrap().len() == n
                })
                .await;
                wait_for("the session back in the cache", || pooled(&m) == 1).await;
            }
        };
        // Two messages over one session: the second straight after the first.
        send(1).await;
        send(2).await;
        // The server ends that session with a 421, then a new one silently.
        for (n, how) in [(3, Ending::With421), (4, Ending::Silently)] {
            *drop_next.lock().unwrap() = Some(how);
            wait_for("the server ending the session", || {
                drop_next.lock().unwrap().is_none()
            })
            .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            send(n).await;
        }
        send(5).await;
        let c = &m.counters;
        assert_eq!(c.connections.load(Ordering::Relaxed), 3);
        assert_eq!(c.ended.load(Ordering::Relaxed), 2);
        assert_eq!(
            c.reused.load(Ordering::Relaxed),
            4,
            "every message after the first"
        );
        assert_eq!(c.deferred.load(Ordering::Relaxed), 0);
        let sessions = sessions.lock().unwrap().clone();
        let verbs = |s: &Vec<String>| -> Vec<String> {
            s.iter()
                .map(|c| c.split([' ', ':']).next().unwrap_or("").to_string())
                .collect()
        };
        let one = ["MAIL", "RCPT", "DATA"];
        let mut first = vec!["EHLO"];
        first.extend(one.iter().chain(&one));
        assert_eq!(sessions.len(), 3, "{sessions:?}");
        assert_eq!(verbs(&sessions[0]), first, "no RSET before the reuse");
        assert_eq!(verbs(&sessions[1]), ["EHLO", "MAIL", "RCPT", "DATA"]);
        assert_eq!(verbs(&sessions[2]), first, "no RSET before the reuse");
        assert_eq!(
            messages.lock().unwrap().len(),
            5,
            "each message delivered once"
        );
        trigger.trigger();
    }

    /// A message far above `content::WHOLE_LIMIT`, with header changes and lines that
    /// start with a dot everywhere (at chunk boundaries too), goes out streamed, byte
    /// for byte as the whole message with the changes; the bounce for its refused
    /// recipient quotes its headers only.
    #[tokio::test]
    async fn a_large_message_is_streamed_to_the_next_hop_and_bounced_with_headers_only() {
        let (addr, got) = sink(Arc::new(AtomicBool::new(true))).await;
        let dir = tempfile::tempdir().unwrap();
        let (spool, m, trigger, shutdown) =
            relay_manager(dir.path(), addr.port(), mb_spool::Config::default());
        let mut message = b"X-Spam: forged\r\nSubject: large\r\n\r\n".to_vec();
        let mut n = 0u32;
        while message.len() < 3 << 20 {
            n += 1;
            let line = if n.is_multiple_of(7) {
                format!(".dotted line {n}\r\n")
            } else {
                format!("body line {n} {}\r\n", "x".repeat((n % 90) as usize))
            };
            message.extend_from_slice(line.as_bytes());
        }
        let id = spool.new_id();
        let env = Envelope {
            id: id.clone(),
            received_at: m.clock.unix(),
            sender: "alice@sender.example".into(),
            recipients: ["ok@served.example", "bad@served.example"]
                .map(Recipient::plain)
                .to_vec(),
            add_headers: vec![("X-Spam-Status".into(), "No".into())],
            remove_headers: vec!["X-Spam".into()],
            ..Default::default()
        };
        let mut w = spool.create(&id).await.unwrap();
        w.write(&message).await.unwrap();
        w.commit(&env).await.unwrap();
        tokio::spawn(m.clone().run(shutdown.clone()));
        wait_for("the delivery", || spool.locate(&id).is_none()).await;
        // The bounce was durable before the completion of the message it reports on.
        notice_before_completion(&dir.path().join("spool"), &id).await;
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].1, ["ok@served.example"]);
            let expected =
                mb_core::message::with_headers(&message, &env.add_headers, &env.remove_headers);
            assert!(expected.starts_with(b"X-Spam-Status: No\r\nSubject: large\r\n\r\n"));
            assert!(got[0].2 == expected, "the delivered message differs");
        }
        let n = notices(&spool);
        assert_eq!(n.len(), 1, "one bounce");
        assert!(n[0].contains("Final-Recipient: rfc822; bad@served.example"));
        assert!(n[0].contains("text/rfc822-headers") && n[0].contains("Subject: large"));
        assert!(!n[0].contains("body line"), "the body is never returned");
        trigger.trigger();
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_then_warn_then_bounce() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            "[queue]\nretry_min = \"5m\"\nretry_max = \"30m\"\ndelay_warning = \"1h\"\nlifetime = \"3h\"\n",
        );
        let (trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower = Follower::start("mb-smtpd", cfg, shutdown.clone());
        let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
        let spool = Arc::new(spool);
        let clock = Clock::new();
        let m = Manager::new(spool.clone(), follower, fixed_dns(), clock);
        tokio::spawn(m.clone().run(shutdown.clone()));
        let t0 = clock.unix();
        let id = queue_message(&spool, t0, &["user@nowhere.example"]).await;
        let attempts = |spool: &Spool| spool.read(&id).ok().map(|q| q.state.attempts);
        let until = |mins: u64| async move {
            while clock.unix() < t0 + mins * 60 {
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        };
        // An attempt's writes wait for the spool's committer thread, in real time, while
        // paused time may run on: what an attempt wrote is looked for in real time.
        let settled = |want: Option<u32>| {
            let spool = spool.clone();
            let id = id.clone();
            async move {
                for _ in 0..500 {
                    if spool.read(&id).ok().map(|q| q.state.attempts) == want {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    tokio::task::yield_now().await;
                }
                false
            }
        };
        // Attempts at 0, 5m, 15m, 35m, 65m, 95m, ... (doubling from 5m, at most 30m).
        for (at, want) in [(4, 1), (6, 2), (14, 2), (16, 3), (36, 4), (64, 4)] {
            until(at).await;
            assert!(
                settled(Some(want)).await,
                "at {at}m: {:?}; now {} schedule {:?} active {:?} list {:?}",
                attempts(&spool),
                clock.unix() - t0,
                m.lock_schedule()
                    .iter()
                    .map(|(i, t)| (i.clone(), t.saturating_sub(t0)))
                    .collect::<Vec<_>>(),
                m.active.lock().unwrap(),
                spool.list(),
            );
        }
        assert!(notices(&spool).is_empty(), "no delay warning before 1h");
        until(66).await;
        assert!(settled(Some(5)).await, "{:?}", attempts(&spool));
        let n = notices(&spool);
        assert_eq!(n.len(), 1, "one delay warning");
        assert!(n[0].contains("Action: delayed") && n[0].contains("Will-Retry-Until:"));
        until(179).await;
        assert!(
            attempts(&spool).is_some(),
            "still retried before the lifetime"
        );
        until(181).await;
        assert!(settled(None).await, "bounced and removed at 3h");
        let n = notices(&spool);
        assert_eq!(n.len(), 2, "the warning and the bounce");
        let bounce = n
            .iter()
            .find(|t| t.contains("Action: failed"))
            .expect("a bounce");
        assert!(bounce.contains("Status: 5.4.7") && bounce.contains("expired"));
        assert!(bounce.contains("Final-Recipient: rfc822; user@nowhere.example"));
        trigger.trigger();
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let (min, max) = (Duration::from_secs(300), Duration::from_secs(3600));
        let got: Vec<u64> = (1..=6).map(|a| backoff(a, min, max).as_secs()).collect();
        assert_eq!(got, [300, 600, 1200, 2400, 3600, 3600]);
        assert_eq!(backoff(500, min, max), max);
    }

    /// Mail from the internet whose domains' MX hosts are this gateway: those recipients
    /// bounce with 5.4.6 and nothing connects to them, while the same loopback sink is
    /// reached through transport entries (configured next hops). The bounce carries the
    /// headers only, and NOTIFY=SUCCESS brings no success notice.
    #[tokio::test]
    async fn an_mx_that_is_this_gateway_loops_back_and_internet_mail_bounces_headers_only() {
        let (addr, got) = sink(Arc::new(AtomicBool::new(false))).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            &format!(
                "[queue]\nmx_port = {p}\n[network.smtp]\nlisten = \"192.0.2.55\"\n\
                 [relay]\ntransport = \"conf.example=smtp:conf.example:{p},ok.example=smtp:[127.0.0.1]:{p}\"\n",
                p = addr.port()
            ),
        );
        let (trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower = Follower::start("mb-smtpd", cfg, shutdown.clone());
        let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
        let spool = Arc::new(spool);
        let mx = |d: &str| (d.to_string(), vec![(10, format!("mx.{d}"))]);
        let dns = Dns::Fixed {
            mx: HashMap::from([
                mx("loop.example"),
                mx("zero.example"),
                mx("own.example"),
                mx("mapped.example"),
                mx("conf.example"),
            ]),
            hosts: HashMap::from([
                ("mx.loop.example".into(), vec![addr.ip()]),
                ("mx.zero.example".into(), vec!["0.0.0.0".parse().unwrap()]),
                ("mx.own.example".into(), vec!["192.0.2.55".parse().unwrap()]),
                (
                    "mx.mapped.example".into(),
                    vec!["::ffff:127.0.0.2".parse().unwrap()],
                ),
                ("mx.conf.example".into(), vec![addr.ip()]),
            ]),
        };
        let m = Manager::new(spool.clone(), follower, dns, Clock::new());
        tokio::spawn(m.clone().run(shutdown.clone()));
        let rcpts = [
            "a@loop.example",
            "b@zero.example",
            "c@own.example",
            "d@mapped.example",
            "e@conf.example",
            "tmp@ok.example",
        ];
        let id = spool.new_id();
        let env = Envelope {
            id: id.clone(),
            received_at: m.clock.unix(),
            client_ip: "198.51.100.7".into(),
            listener: "smtp".into(),
            sender: "forged@sender.example".into(),
            recipients: rcpts
                .iter()
                .map(|a| Recipient {
                    address: a.to_string(),
                    notify: "SUCCESS,FAILURE".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"Subject: secret plans\r\n\r\nthe body must never go back\r\n")
            .await
            .unwrap();
        w.commit(&env).await.unwrap();
        wait_for("the deferral", || {
            spool.locate(&id) == Some(Queue::Deferred)
        })
        .await;
        let st = spool.read(&id).unwrap().state;
        let states: Vec<(&str, RecipientState, &str)> = st
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.state, r.last_error.as_str()))
            .collect();
        assert_eq!(
            &states[..4],
            [
                (
                    "a@loop.example",
                    RecipientState::Bounced,
                    "554 5.4.6 mail for loop.example loops back to myself"
                ),
                (
                    "b@zero.example",
                    RecipientState::Bounced,
                    "554 5.4.6 mail for zero.example loops back to myself"
                ),
                (
                    "c@own.example",
                    RecipientState::Bounced,
                    "554 5.4.6 mail for own.example loops back to myself"
                ),
                (
                    "d@mapped.example",
                    RecipientState::Bounced,
                    "554 5.4.6 mail for mapped.example loops back to myself"
                ),
            ]
        );
        assert_eq!(states[4].1, RecipientState::Delivered, "{states:?}");
        assert_eq!(states[5].1, RecipientState::Deferred, "{states:?}");
        // Only the configured route reached the sink.
        {
            let got = got.lock().unwrap();
            let reached: Vec<&String> = got.iter().flat_map(|t| &t.1).collect();
            assert_eq!(reached, ["e@conf.example"], "{reached:?}");
        }
        // One bounce for the four, headers only; no success notice for e@conf.example.
        let n = notices(&spool);
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(n[0].contains("Status: 5.4.6"), "{}", n[0]);
        assert!(n[0].contains("text/rfc822-headers"), "{}", n[0]);
        assert!(n[0].contains("Subject: secret plans"), "{}", n[0]);
        assert!(!n[0].contains("the body must never go back"), "{}", n[0]);
        assert!(!n[0].contains("message/rfc822"), "{}", n[0]);
        trigger.trigger();
    }

    #[test]
    fn notify_of_internet_mail_keeps_failure_only() {
        use notify::effective_notify as e;
        assert_eq!(e(false, "SUCCESS,DELAY"), "SUCCESS,DELAY");
        assert_eq!(e(true, ""), "");
        assert_eq!(e(true, "SUCCESS"), "NEVER");
        assert_eq!(e(true, "SUCCESS,FAILURE,DELAY"), "FAILURE");
        assert_eq!(e(true, "NEVER"), "NEVER");
        let own = ["192.0.2.55".parse().unwrap()];
        for (ip, looped) in [
            ("127.0.0.1", true),
            ("127.8.9.10", true),
            ("0.0.0.0", true),
            ("::", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("192.0.2.55", true),
            ("::ffff:192.0.2.55", true),
            ("192.0.2.56", false),
            ("2001:db8::1", false),
        ] {
            assert_eq!(resolve::is_self(ip.parse().unwrap(), &own), looped, "{ip}");
        }
        // The host's own interface addresses count too (loopback at least).
        let cfg = Config::default();
        assert!(resolve::own_addresses(&cfg).contains(&"127.0.0.1".parse().unwrap()));
    }
}
