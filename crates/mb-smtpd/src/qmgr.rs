//! The queue manager: takes committed messages from `incoming/`, routes every recipient
//! (transport table, relay host, MX), delivers through `client.rs` with connection reuse
//! and concurrency limits, keeps each recipient's state durably in `state/ID`, retries
//! temporary failures from `deferred/` with exponential backoff, and sends delay warnings
//! and bounces as DSNs.
//!
//! Crash safety: the message file is never changed. A recipient's success is written to
//! the state file (fsynced) before anything else happens to the message, and the message
//! is removed only when every recipient is delivered or bounced. A crash can therefore
//! repeat a delivery whose 250 was not yet recorded (the window Postfix has too), never
//! lose one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_core::Config;
use mb_core::route::{Hop, NextHop, Protocol};
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::client::{Client, ClientError};
use crate::conn::Io;
use crate::dns::{Dns, DnsFailure};
use crate::dsn::{self, Action, Report};
use crate::spool::{self, DeliveryState, Envelope, Recipient, Spool};

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

/// How long an idle outbound connection is kept for reuse.
const IDLE_REUSE: Duration = Duration::from_secs(5);

/// What happened to one recipient in one attempt.
#[derive(Debug, Clone)]
struct Result1 {
    state: &'static str,
    text: String,
    remote: String,
    /// The next hop took the DSN parameters (it reports success itself).
    dsn_passed: bool,
}

/// A session with a next hop, ready for a transaction.
struct Session {
    client: Client,
    remote: String,
    tls: String,
    idle_since: tokio::time::Instant,
}

#[derive(Default)]
pub struct DeliveryCounters {
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub bounced: AtomicU64,
    pub notices: AtomicU64,
    pub connections: AtomicU64,
    pub reused: AtomicU64,
}

pub struct Manager {
    spool: Arc<Spool>,
    follower: Follower,
    dns: Dns,
    pub clock: Clock,
    active: Mutex<HashSet<String>>,
    /// Deferred messages by id: the unix second of their next attempt.
    schedule: Mutex<BTreeMap<String, u64>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    wake: Notify,
    global: Arc<Semaphore>,
    destinations: Mutex<HashMap<String, Arc<Semaphore>>>,
    pool: Mutex<HashMap<String, Vec<Session>>>,
    tls: Mutex<HashMap<String, Arc<rustls::ClientConfig>>>,
    pub events: Option<mb_runtime::events::EventSink>,
    pub counters: DeliveryCounters,
}

/// Removes a message from the active set when its delivery task ends, even by panic.
struct Active<'a>(&'a Manager, String);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.0.active.lock() {
            a.remove(&self.1);
        }
    }
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
            global: Arc::new(Semaphore::new(permits)),
            destinations: Mutex::default(),
            pool: Mutex::default(),
            tls: Mutex::default(),
            events: None,
            counters: DeliveryCounters::default(),
        })
    }

    /// Runs until shutdown: picks up new messages at once, deferred ones when due.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let pruned = self.spool.prune_states();
        if pruned > 0 {
            tracing::info!(pruned, "removed delivery states of messages that are gone");
        }
        for id in self.spool.ids("deferred").unwrap_or_default() {
            let next = self
                .spool
                .locate(&id)
                .and_then(|(_, p)| spool::read_message(&p).ok())
                .map_or(0, |(_, env)| self.spool.load_state(&env).next_attempt);
            self.lock_schedule().insert(id, next);
        }
        self.scan_incoming();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        let mut enabled = true;
        loop {
            tokio::select! {
                id = rx.recv() => match id {
                    Some(id) => self.dispatch(id),
                    None => break,
                },
                () = self.wake.notified() => {
                    self.scan_incoming();
                    self.dispatch_due();
                }
                _ = tick.tick() => {
                    ticks += 1;
                    let now_enabled = self.follower.current().bool("queue.delivery_enabled");
                    if now_enabled && !enabled {
                        tracing::info!("delivery enabled again");
                        self.scan_incoming();
                    }
                    enabled = now_enabled;
                    self.dispatch_due();
                    self.sweep_pool();
                    // A safety net: anything in incoming/ that was not announced.
                    if ticks.is_multiple_of(30) {
                        self.scan_incoming();
                    }
                }
                () = shutdown.requested() => break,
            }
        }
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

    /// Tells the manager to look at `incoming/` again (after release or requeue).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    fn scan_incoming(self: &Arc<Self>) {
        for id in self.spool.ids("incoming").unwrap_or_default() {
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
        if !self.follower.current().bool("queue.delivery_enabled") {
            // Stays where it is; the tick re-scans when delivery is enabled again.
            if self.spool.locate(&id).is_some_and(|(q, _)| q == "deferred") {
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
            me.deliver(&id).await;
        });
    }

    /// One delivery attempt for every recipient of a message that is still pending.
    async fn deliver(self: &Arc<Self>, id: &str) {
        // File system work goes to the blocking pool: a metadata operation can wait for a
        // journal commit, and the runtime's threads serve every SMTP session meanwhile.
        let read = {
            let (spool, id) = (self.spool.clone(), id.to_string());
            tokio::task::spawn_blocking(move || {
                let (queue, path) = spool.locate(&id)?;
                if queue == "hold" {
                    return None;
                }
                Some(spool::read_message(&path).map(|(m, env)| {
                    let state = spool.load_state(&env);
                    (m, env, state)
                }))
            })
            .await
        };
        let (message, env, mut state) = match read {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::error!(id = %id, cause = %e, "cannot read a queued message");
                return;
            }
            Ok(None) | Err(_) => return,
        };
        let message =
            mb_core::message::with_headers(&message, &env.add_headers, &env.remove_headers);
        let cfg = self.follower.current();
        let before: Vec<String> = state.recipients.iter().map(|r| r.state.clone()).collect();
        let now = self.clock.unix();
        let started = tokio::time::Instant::now();

        // Route the pending recipients; one group per next hop.
        let mut groups: Vec<(NextHop, bool, Vec<usize>)> = Vec::new();
        let mut unroutable: Vec<(usize, String)> = Vec::new();
        let transport = mb_core::route::parse_transport(
            &cfg.list("relay.transport"),
            cfg.port("queue.mx_port"),
        )
        .unwrap_or_default();
        for (i, r) in state.recipients.iter().enumerate() {
            if r.state == "delivered" || r.state == "bounced" {
                continue;
            }
            let (hop, relay) = match route(&cfg, &transport, &r.address) {
                Ok(r) => r,
                Err(why) => {
                    unroutable.push((i, why));
                    continue;
                }
            };
            match groups.iter_mut().find(|g| g.0 == hop && g.1 == relay) {
                Some(g) => g.2.push(i),
                None => groups.push((hop, relay, vec![i])),
            }
        }
        let limit = usize::try_from(cfg.int("queue.recipient_limit")).unwrap_or(50);
        let mut dsn_passed = vec![false; env.recipients.len()];
        let mut lmtp_final = vec![false; env.recipients.len()];
        for (hop, relay, idxs) in &groups {
            for chunk in idxs.chunks(limit.max(1)) {
                let rcpts: Vec<Recipient> =
                    chunk.iter().map(|i| env.recipients[*i].clone()).collect();
                let results = self
                    .attempt(&cfg, hop, *relay, &env, &message, &rcpts)
                    .await;
                for (i, res) in chunk.iter().zip(results) {
                    let r = &mut state.recipients[*i];
                    r.state = res.state.into();
                    r.last_error = if res.state == "delivered" {
                        String::new()
                    } else {
                        res.text.clone()
                    };
                    r.remote.clone_from(&res.remote);
                    dsn_passed[*i] = res.dsn_passed;
                    lmtp_final[*i] = hop.protocol == Protocol::Lmtp;
                    let delay = now.saturating_sub(env.received_at);
                    tracing::info!(
                        id = %id,
                        to = %r.address,
                        relay = %if res.remote.is_empty() { hop.to_string() } else { res.remote.clone() },
                        delay,
                        reply = %res.text,
                        "{}",
                        res.state
                    );
                    let line = format!(
                        "{} <{}> {} via {}: {}",
                        mb_runtime::logging::timestamp(self.clock.now()),
                        r.address,
                        res.state,
                        if res.remote.is_empty() {
                            hop.to_string()
                        } else {
                            res.remote.clone()
                        },
                        res.text
                    );
                    state.note(line);
                }
            }
        }
        for (i, why) in unroutable {
            let r = &mut state.recipients[i];
            tracing::warn!(id = %id, to = %r.address, reply = %why, "deferred");
            r.state = "deferred".into();
            r.last_error = why;
        }
        state.attempts += 1;

        // Expired: what is still deferred bounces.
        let age = now.saturating_sub(env.received_at);
        let lifetime = cfg.duration("queue.lifetime").as_secs();
        if age >= lifetime {
            for r in state
                .recipients
                .iter_mut()
                .filter(|r| r.state == "deferred")
            {
                r.state = "bounced".into();
                r.last_error = format!(
                    "550 5.4.7 message expired after {} in the queue; last error: {}",
                    mb_core::value::format_duration(Duration::from_secs(age)),
                    r.last_error
                );
            }
        }

        // Notices to the sender, written to the spool before the state that settles them.
        let mut failed = Vec::new();
        let mut succeeded = Vec::new();
        for (i, r) in state.recipients.iter().enumerate() {
            if before[i] == r.state {
                continue;
            }
            let rcpt = &env.recipients[i];
            let report = |action| Report {
                address: r.address.clone(),
                orcpt: rcpt.orcpt.clone(),
                action,
                diagnostic: r.last_error.clone(),
                remote_mta: host_of(&r.remote),
            };
            match r.state.as_str() {
                "bounced" => {
                    self.counters.bounced.fetch_add(1, Ordering::Relaxed);
                    if dsn::wanted(&rcpt.notify, Action::Failed) {
                        failed.push(report(Action::Failed));
                    }
                }
                "delivered" => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    let action = if lmtp_final[i] {
                        Action::Delivered
                    } else {
                        Action::Relayed
                    };
                    if !dsn_passed[i] && dsn::wanted(&rcpt.notify, action) {
                        let mut rep = report(action);
                        rep.diagnostic = "250 2.0.0 delivered".into();
                        succeeded.push(rep);
                    }
                }
                _ => {
                    self.counters.deferred.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(env.received_at + lifetime);
        self.notify_sender(&cfg, &env, &message, &failed, None)
            .await;
        self.notify_sender(&cfg, &env, &message, &succeeded, None)
            .await;
        let warning = cfg.duration("queue.delay_warning").as_secs();
        if warning > 0 && age >= warning && !state.delay_warned {
            let delayed: Vec<Report> = state
                .recipients
                .iter()
                .zip(&env.recipients)
                .filter(|(r, e)| r.state == "deferred" && dsn::wanted(&e.notify, Action::Delayed))
                .map(|(r, e)| Report {
                    address: r.address.clone(),
                    orcpt: e.orcpt.clone(),
                    action: Action::Delayed,
                    diagnostic: r.last_error.clone(),
                    remote_mta: host_of(&r.remote),
                })
                .collect();
            if state.recipients.iter().any(|r| r.state == "deferred") {
                state.delay_warned = true;
                self.notify_sender(&cfg, &env, &message, &delayed, Some(until))
                    .await;
            }
        }
        self.event(&env, &state, message.len() as u64);

        if state.settled() {
            // The usual case: everything went on the first attempt, no state to write.
            let (spool, idc) = (self.spool.clone(), id.to_string());
            let _ = tokio::task::spawn_blocking(move || spool.remove_delivered(&idc)).await;
            tracing::debug!(id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "message done");
            return;
        }
        let backoff = backoff(
            state.attempts,
            cfg.duration("queue.retry_min"),
            cfg.duration("queue.retry_max"),
        );
        state.next_attempt = now + backoff.as_secs();
        // Never retry after the lifetime without bouncing: the last try is at expiry.
        state.next_attempt = state
            .next_attempt
            .min(env.received_at + lifetime)
            .max(now + 1);
        let next = state.next_attempt;
        // Scheduled before the move, so a flush that sees it in deferred/ finds it.
        self.lock_schedule().insert(id.to_string(), next);
        let (spool, idc) = (self.spool.clone(), id.to_string());
        let schedule = tokio::task::spawn_blocking(move || {
            if let Err(e) = spool.save_state(&idc, &state) {
                tracing::error!(id = %idc, cause = %e, "cannot write the delivery state; will retry");
            }
            match spool.locate(&idc) {
                Some(("incoming", _)) => {
                    if let Err(e) = spool.move_to(&idc, "deferred") {
                        tracing::error!(id = %idc, cause = %e, "cannot move to deferred/");
                    }
                    true
                }
                Some(("hold", _)) | None => false,
                _ => true,
            }
        })
        .await
        .unwrap_or(true);
        if !schedule {
            self.lock_schedule().remove(id);
        }
    }

    fn event(&self, env: &Envelope, state: &DeliveryState, size: u64) {
        let Some(sink) = &self.events else { return };
        for stage in ["delivered", "deferred", "bounced"] {
            let rcpts: Vec<String> = state
                .recipients
                .iter()
                .filter(|r| r.state == stage)
                .map(|r| r.address.clone())
                .collect();
            if rcpts.is_empty() {
                continue;
            }
            let detail = state
                .recipients
                .iter()
                .find(|r| r.state == stage)
                .map(|r| {
                    if stage == "delivered" {
                        r.remote.clone()
                    } else {
                        r.last_error.clone()
                    }
                })
                .unwrap_or_default();
            sink.send(mb_proto::v1::MessageEvent {
                daemon: "mb-smtpd".into(),
                queue_id: env.id.clone(),
                client_ip: env.client_ip.clone(),
                helo: env.helo.clone(),
                sender: env.sender.clone(),
                recipients: rcpts,
                size,
                stage: stage.into(),
                detail,
                ..Default::default()
            });
        }
    }

    /// Writes a DSN about `env` into the spool (null sender, to the original sender).
    /// Nothing goes to the null sender: a notice about a notice would loop.
    async fn notify_sender(
        &self,
        cfg: &Config,
        env: &Envelope,
        message: &[u8],
        reports: &[Report],
        until: Option<SystemTime>,
    ) {
        if reports.is_empty() || env.sender.is_empty() {
            return;
        }
        let hostname = crate::server::hostname(cfg);
        let body = dsn::build(&hostname, env, message, reports, self.clock.now(), until);
        let id = self.spool.new_id();
        let notice = Envelope {
            id: id.clone(),
            received_at: self.clock.unix(),
            client_ip: "127.0.0.1".into(),
            client_name: "localhost".into(),
            helo: hostname.clone(),
            protocol: "local".into(),
            sender: String::new(),
            recipients: vec![Recipient {
                address: env.sender.clone(),
                notify: "NEVER".into(),
                orcpt: String::new(),
            }],
            body: "8BITMIME".into(),
            smtputf8: !env.sender.is_ascii(),
            listener: "dsn".into(),
            ..Default::default()
        };
        let written = async {
            let mut w = self.spool.create(&id).await?;
            w.write(&body).await?;
            w.commit(&notice).await
        };
        match written.await {
            Ok(()) => {
                self.counters.notices.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id = %env.id, notice = %id, to = %env.sender, action = ?reports[0].action, "sender notified");
            }
            Err(e) => {
                tracing::error!(id = %env.id, cause = %e, "cannot queue a delivery status notification")
            }
        }
    }

    fn destination(&self, key: &str, limit: usize) -> Arc<Semaphore> {
        let mut d = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        d.entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(limit.max(1))))
            .clone()
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

    /// One transaction for `rcpts` through `hop`; one result per recipient.
    async fn attempt(
        &self,
        cfg: &Config,
        hop: &NextHop,
        relay: bool,
        env: &Envelope,
        message: &[u8],
        rcpts: &[Recipient],
    ) -> Vec<Result1> {
        // Cached sessions are reused only under the settings they were opened with.
        let key = if relay {
            format!(
                "{hop} relay tls={} verify={} ca={} auth={}",
                cfg.text("relay.tls"),
                cfg.bool("relay.tls.verify"),
                cfg.text("relay.tls.ca_file"),
                cfg.text("relay.auth.username")
            )
        } else {
            format!("{hop} tls={}", cfg.text("network.smtp.tls.outbound"))
        };
        let limit = usize::try_from(cfg.int("queue.destination_concurrency")).unwrap_or(20);
        let sem = self.destination(&hop.to_string(), limit);
        let Ok(_permit) = sem.acquire_owned().await else {
            return Vec::new();
        };
        let all = |state: &'static str, text: String, remote: String| {
            rcpts
                .iter()
                .map(|_| Result1 {
                    state,
                    text: text.clone(),
                    remote: remote.clone(),
                    dsn_passed: false,
                })
                .collect::<Vec<_>>()
        };
        let mut session = None;
        loop {
            let cached = self
                .pool
                .lock()
                .ok()
                .and_then(|mut p| p.get_mut(&key).and_then(Vec::pop));
            let Some(mut s) = cached else { break };
            if s.idle_since.elapsed() < IDLE_REUSE && s.client.reset().await {
                self.counters.reused.fetch_add(1, Ordering::Relaxed);
                session = Some(s);
                break;
            }
            tokio::spawn(async move { s.client.quit().await });
        }
        let mut s = match session {
            Some(s) => s,
            None => match self.open(cfg, hop, relay).await {
                Ok(s) => s,
                Err(DnsOrConnect::Permanent(t)) => return all("bounced", t, String::new()),
                Err(DnsOrConnect::Transient(t, remote)) => return all("deferred", t, remote),
            },
        };
        let lmtp = hop.protocol == Protocol::Lmtp;
        let with_path;
        let body: &[u8] = if lmtp {
            // Final delivery: the envelope sender becomes Return-Path (RFC 5321 §4.4).
            let mut v = format!("Return-Path: <{}>\r\n", env.sender).into_bytes();
            v.extend_from_slice(message);
            with_path = v;
            &with_path
        } else {
            message
        };
        let dsn_passed = s.client.caps.dsn;
        let result = s
            .client
            .send_with_dsn(&env.sender, &env.ret, &env.envid, rcpts, body)
            .await;
        let tls_note = if s.tls.is_empty() {
            String::new()
        } else {
            format!(" (TLS {})", s.tls)
        };
        match result {
            Ok(outcomes) => {
                let out = outcomes
                    .into_iter()
                    .map(|o| Result1 {
                        state: if o.response.is_positive() {
                            "delivered"
                        } else if o.response.is_transient() {
                            "deferred"
                        } else {
                            "bounced"
                        },
                        text: format!("{}{tls_note}", o.response.text()),
                        remote: s.remote.clone(),
                        dsn_passed,
                    })
                    .collect();
                self.keep(&key, s);
                out
            }
            Err(ClientError::Refused(r)) => {
                let state = if r.is_transient() {
                    "deferred"
                } else {
                    "bounced"
                };
                let remote = s.remote.clone();
                self.keep(&key, s);
                all(
                    state,
                    format!("{} (in reply to MAIL FROM)", r.text()),
                    remote,
                )
            }
            Err(e) => all(
                "deferred",
                format!("451 4.4.2 {} lost the session: {e}", s.remote),
                s.remote.clone(),
            ),
        }
    }

    fn keep(&self, key: &str, mut s: Session) {
        s.idle_since = tokio::time::Instant::now();
        if let Ok(mut p) = self.pool.lock() {
            p.entry(key.to_string()).or_default().push(s);
        }
    }

    /// Opens a session with the next hop: resolves it, connects to its addresses in
    /// order until one greets, says EHLO, applies the TLS policy and relay AUTH.
    async fn open(
        &self,
        cfg: &Config,
        hop: &NextHop,
        relay: bool,
    ) -> Result<Session, DnsOrConnect> {
        let hostname = crate::server::hostname(cfg);
        let v6 = cfg.bool("network.ipv6.enabled");
        let mut targets: Vec<(String, Target)> = Vec::new();
        match &hop.hop {
            Hop::Unix(p) => targets.push((p.display().to_string(), Target::Unix(p.clone()))),
            Hop::Host { host, port } => match self.dns.addresses(host, v6).await {
                Ok(ips) => targets.extend(
                    ips.into_iter()
                        .map(|ip| (host.clone(), Target::Tcp(SocketAddr::new(ip, *port)))),
                ),
                // A misconfigured relay host or transport must not bounce mail: it waits.
                Err(DnsFailure::Permanent(t) | DnsFailure::Transient(t)) => {
                    return Err(DnsOrConnect::Transient(
                        t.replacen("550 5.", "451 4.", 1),
                        String::new(),
                    ));
                }
            },
            Hop::Mx { domain, port } => {
                let hosts = match self.dns.mx(domain).await {
                    Ok(h) => h,
                    Err(DnsFailure::Permanent(t)) => return Err(DnsOrConnect::Permanent(t)),
                    Err(DnsFailure::Transient(t)) => {
                        return Err(DnsOrConnect::Transient(t, String::new()));
                    }
                };
                let mut last = None;
                for h in hosts {
                    match self.dns.addresses(&h, v6).await {
                        Ok(ips) => targets.extend(
                            ips.into_iter()
                                .map(|ip| (h.clone(), Target::Tcp(SocketAddr::new(ip, *port)))),
                        ),
                        Err(DnsFailure::Permanent(t) | DnsFailure::Transient(t)) => last = Some(t),
                    }
                }
                if targets.is_empty() {
                    let t = last.unwrap_or_default().replacen("550 5.", "451 4.", 1);
                    return Err(DnsOrConnect::Transient(t, String::new()));
                }
            }
        }
        let timeout = cfg.duration("network.smtp.timeout");
        let connect_timeout = cfg.duration("queue.connect_timeout");
        let lmtp = hop.protocol == Protocol::Lmtp;
        let mut last_error = String::from("451 4.4.1 no address to connect to");
        let mut last_remote = String::new();
        for (name, target) in &targets {
            // Opportunistic TLS that fails its handshake is retried once in plaintext.
            for plaintext_retry in [false, true] {
                let remote = match target {
                    Target::Tcp(a) => format!("{name}[{}]:{}", a.ip(), a.port()),
                    Target::Unix(p) => format!("unix:{}", p.display()),
                };
                last_remote.clone_from(&remote);
                match self
                    .try_target(
                        cfg,
                        &hostname,
                        name,
                        target,
                        &remote,
                        relay,
                        lmtp,
                        timeout,
                        connect_timeout,
                        plaintext_retry,
                    )
                    .await
                {
                    Ok(s) => {
                        self.counters.connections.fetch_add(1, Ordering::Relaxed);
                        return Ok(s);
                    }
                    Err(Attempt::Fatal(t)) => return Err(DnsOrConnect::Transient(t, remote)),
                    Err(Attempt::RetryPlain(t)) if !plaintext_retry => {
                        tracing::info!(next_hop = %hop, "{t}; trying again without TLS");
                        last_error = t;
                        continue;
                    }
                    Err(Attempt::Next(t) | Attempt::RetryPlain(t)) => {
                        tracing::info!(next_hop = %hop, "{t}; trying the next address");
                        last_error = t;
                        break;
                    }
                }
            }
        }
        Err(DnsOrConnect::Transient(last_error, last_remote))
    }

    #[allow(clippy::too_many_arguments)]
    async fn try_target(
        &self,
        cfg: &Config,
        hostname: &str,
        name: &str,
        target: &Target,
        remote: &str,
        relay: bool,
        lmtp: bool,
        timeout: Duration,
        connect_timeout: Duration,
        plaintext: bool,
    ) -> Result<Session, Attempt> {
        let relay_tls = if relay {
            cfg.text("relay.tls")
        } else {
            String::new()
        };
        let verify = relay && cfg.bool("relay.tls.verify");
        let mut io: Box<dyn Io> = match target {
            Target::Tcp(a) => {
                match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(a)).await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        Box::new(s)
                    }
                    Ok(Err(e)) => {
                        return Err(Attempt::Next(format!("451 4.4.1 connect to {remote}: {e}")));
                    }
                    Err(_) => {
                        return Err(Attempt::Next(format!(
                            "451 4.4.1 connect to {remote}: timed out"
                        )));
                    }
                }
            }
            Target::Unix(p) => {
                match tokio::time::timeout(connect_timeout, tokio::net::UnixStream::connect(p))
                    .await
                {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        return Err(Attempt::Next(format!("451 4.4.1 connect to {remote}: {e}")));
                    }
                    Err(_) => {
                        return Err(Attempt::Next(format!(
                            "451 4.4.1 connect to {remote}: timed out"
                        )));
                    }
                }
            }
        };
        let mut tls = String::new();
        if relay_tls == "tls" {
            let connector = self.connector(cfg, verify).map_err(Attempt::Fatal)?;
            let server = server_name(name);
            let stream = tokio::time::timeout(timeout, connector.connect(server, io))
                .await
                .map_err(|_| {
                    Attempt::Next(format!("451 4.7.5 TLS handshake with {remote} timed out"))
                })?
                .map_err(|e| {
                    Attempt::Next(format!("451 4.7.5 TLS handshake with {remote} failed: {e}"))
                })?;
            let (_, st) = stream.get_ref();
            tls = format!(
                "{:?} with cipher {:?}",
                st.protocol_version()
                    .map_or(rustls::ProtocolVersion::Unknown(0), |v| v),
                st.negotiated_cipher_suite().map(|c| c.suite())
            );
            io = Box::new(stream);
        }
        let mut client =
            match tokio::time::timeout(connect_timeout, Client::connect(io, timeout, lmtp)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Err(Attempt::Next(format!("451 4.4.2 {remote} greeting: {e}")));
                }
                Err(_) => {
                    return Err(Attempt::Next(format!(
                        "451 4.4.2 {remote} did not greet in time"
                    )));
                }
            };
        if let Err(e) = client.hello(hostname).await {
            client.quit().await;
            return Err(Attempt::Next(format!(
                "451 4.4.2 {remote} refused EHLO: {e}"
            )));
        }
        let policy = if relay {
            match relay_tls.as_str() {
                "starttls" => "required",
                _ => "none",
            }
        } else {
            match cfg.text("network.smtp.tls.outbound").as_str() {
                "mandatory" => "required",
                "opportunistic" if !plaintext => "may",
                _ => "none",
            }
        };
        if policy != "none" && tls.is_empty() {
            if !client.caps.starttls {
                if policy == "required" {
                    client.quit().await;
                    let key = if relay {
                        "relay.tls = starttls"
                    } else {
                        "network.smtp.tls.outbound = mandatory"
                    };
                    return Err(Attempt::Next(format!(
                        "451 4.7.4 TLS is required ({key}) but {remote} does not offer STARTTLS"
                    )));
                }
            } else {
                let connector = self.connector(cfg, verify).map_err(Attempt::Fatal)?;
                match client
                    .starttls(&connector, server_name(name), hostname)
                    .await
                {
                    Ok(desc) => tls = desc,
                    Err(e) if policy == "may" => {
                        return Err(Attempt::RetryPlain(format!(
                            "451 4.7.5 STARTTLS with {remote} failed: {e}"
                        )));
                    }
                    Err(e) => {
                        return Err(Attempt::Next(format!(
                            "451 4.7.5 STARTTLS with {remote} failed: {e}"
                        )));
                    }
                }
            }
        }
        let user = if relay {
            cfg.text("relay.auth.username")
        } else {
            String::new()
        };
        if !user.is_empty() {
            if tls.is_empty() {
                client.quit().await;
                return Err(Attempt::Fatal(
                    "451 4.7.0 relay.auth.username is set but the session with the relay host is not encrypted: set relay.tls to starttls or tls".into(),
                ));
            }
            if let Err(e) = client
                .auth_plain(&user, &cfg.text("relay.auth.password"))
                .await
            {
                client.quit().await;
                return Err(Attempt::Fatal(format!(
                    "451 4.7.0 {remote} refused AUTH for {user}: {e}"
                )));
            }
        }
        Ok(Session {
            client,
            remote: remote.to_string(),
            tls,
            idle_since: tokio::time::Instant::now(),
        })
    }

    /// TLS client configuration: verifying against `relay.tls.ca_file`, or (MX delivery,
    /// where certificates are rarely valid for the MX name) encrypting without verifying,
    /// as Postfix's `may` and `encrypt` levels do.
    fn connector(&self, cfg: &Config, verify: bool) -> Result<tokio_rustls::TlsConnector, String> {
        let ca = cfg.text("relay.tls.ca_file");
        let versions = crate::server::tls_versions(cfg);
        let key = format!(
            "{verify} {ca} {}",
            cfg.list("network.tls.versions").join(",")
        );
        if let Some(c) = self.tls.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(tokio_rustls::TlsConnector::from(c));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| format!("451 4.7.5 TLS configuration: {e}"))?;
        let config = if verify {
            use rustls_pki_types::CertificateDer;
            use rustls_pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(&ca)
                .map_err(|e| format!("451 4.7.5 cannot read relay.tls.ca_file {ca}: {e}"))?;
            for c in certs.flatten() {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(format!(
                    "451 4.7.5 no certificate authority in relay.tls.ca_file {ca}"
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth()
        };
        let config = Arc::new(config);
        if let Ok(mut m) = self.tls.lock() {
            m.insert(key, config.clone());
        }
        Ok(tokio_rustls::TlsConnector::from(config))
    }
}

enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

enum DnsOrConnect {
    Permanent(String),
    Transient(String, String),
}

enum Attempt {
    /// Try the next address or MX host.
    Next(String),
    /// Opportunistic TLS failed: the same host again without TLS.
    RetryPlain(String),
    /// A configuration problem: no other host would do better.
    Fatal(String),
}

fn server_name(name: &str) -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::try_from(name.to_string()).unwrap_or_else(|_| {
        rustls_pki_types::ServerName::try_from("invalid.invalid".to_string()).expect("static name")
    })
}

/// `dns; host` for the DSN's Remote-MTA, from `host[ip]:port`.
fn host_of(remote: &str) -> String {
    match remote.split('[').next() {
        Some(h) if !h.is_empty() => format!("dns; {h}"),
        _ => String::new(),
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

/// Where a recipient goes: the transport table first (exact domain, then `.parent`
/// entries), then the relay host for the gateway's own domains, then the domain's MX.
/// The bool says whether it is the relay host (whose TLS and AUTH settings apply). A
/// served domain with neither a relay host nor a transport entry has no route: its MX
/// is this gateway, so delivering there would loop.
pub fn route(
    cfg: &Config,
    transport: &[(String, NextHop)],
    address: &str,
) -> Result<(NextHop, bool), String> {
    let domain = address
        .rsplit_once('@')
        .map_or(String::new(), |(_, d)| d.to_ascii_lowercase());
    let domain = domain
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if let Some((_, hop)) = transport.iter().find(|(d, _)| *d == domain) {
        return Ok((hop.clone(), false));
    }
    if let Some((_, hop)) = transport
        .iter()
        .filter(|(d, _)| d.starts_with('.') && (domain.ends_with(d.as_str())))
        .max_by_key(|(d, _)| d.len())
    {
        return Ok((hop.clone(), false));
    }
    let relay = cfg.text("relay.host");
    let local = cfg.list("smtp.domains").iter().any(|d| {
        let d = d.to_ascii_lowercase();
        match d.strip_prefix('.') {
            Some(parent) => domain.ends_with(&format!(".{parent}")),
            None => domain == d,
        }
    });
    if local
        && !relay.is_empty()
        && let Ok(hop) = mb_core::route::relay_next_hop(
            &relay,
            cfg.port("relay.port"),
            cfg.text("relay.protocol") == "lmtp",
        )
    {
        return Ok((hop, true));
    }
    if local {
        return Err(format!(
            "451 4.3.5 no route for {domain}: it is one of smtp.domains, so set relay.host (or a relay.transport entry) to the internal mail server; its MX is this gateway"
        ));
    }
    Ok((
        NextHop {
            protocol: Protocol::Smtp,
            hop: Hop::Mx {
                domain,
                port: cfg.port("queue.mx_port"),
            },
        },
        false,
    ))
}

/// A certificate verifier that accepts any certificate but still checks the handshake
/// signatures: encryption without authentication, for MX hosts.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    type Got = Arc<Mutex<Vec<(String, Vec<String>, Vec<u8>)>>>;

    /// A scripted SMTP server: RCPT to bad* is refused (550), to tmp* deferred (451)
    /// unless `tmp_ok`; everything else accepted. Records each transaction.
    async fn sink(tmp_ok: Arc<AtomicBool>) -> (SocketAddr, Got) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let got: Got = Arc::default();
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let g = g.clone();
                let tmp_ok = tmp_ok.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    let _ = w.write_all(b"220 sink.test ESMTP\r\n").await;
                    let (mut from, mut rcpts) = (String::new(), Vec::new());
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let up = line.to_ascii_uppercase();
                        let reply: String = if up.starts_with("EHLO") {
                            "250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n".into()
                        } else if up.starts_with("MAIL FROM:") {
                            from = line[10..].trim().trim_matches(['<', '>']).to_string();
                            rcpts.clear();
                            "250 2.1.0 ok\r\n".into()
                        } else if up.starts_with("RCPT TO:") {
                            let a = line[8..].trim().trim_matches(['<', '>']).to_string();
                            if a.starts_with("bad") {
                                "550 5.1.1 no such user\r\n".into()
                            } else if a.starts_with("tmp") && !tmp_ok.load(Ordering::SeqCst) {
                                "451 4.2.0 try later\r\n".into()
                            } else {
                                rcpts.push(a);
                                "250 2.1.5 ok\r\n".into()
                            }
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
                            g.lock().unwrap().push((from.clone(), rcpts.clone(), data));
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
        (addr, got)
    }

    fn config(dir: &std::path::Path, extra: &str) -> Config {
        let text = format!(
            "[paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\n\
             [smtp]\nhostname = \"gw.test\"\ndomains = \"served.example\"\n{extra}",
            d = dir.display()
        );
        Config::from_toml_str(&text, "test").unwrap()
    }

    async fn queue_message(spool: &Spool, received_at: u64, rcpts: &[&str]) -> String {
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
        w.commit(&env).await.unwrap();
        id
    }

    /// The notices (null-sender messages) in the spool, as text.
    fn notices(spool: &Spool) -> Vec<String> {
        let mut out = Vec::new();
        for q in ["incoming", "deferred"] {
            for id in spool.ids(q).unwrap() {
                if let Some((_, p)) = spool.locate(&id)
                    && let Ok((msg, env)) = spool::read_message(&p)
                    && env.sender.is_empty()
                {
                    out.push(String::from_utf8_lossy(&msg).into_owned());
                }
            }
        }
        out
    }

    fn fixed_dns() -> Dns {
        Dns::Fixed {
            mx: HashMap::from([(
                "nowhere.example".into(),
                vec![(10, "mx.nowhere.example".into())],
            )]),
            hosts: HashMap::new(),
        }
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn relays_settles_each_recipient_and_bounces_to_the_sender() {
        let tmp_ok = Arc::new(AtomicBool::new(false));
        let (addr, got) = sink(tmp_ok.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            &format!(
                "[relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
                addr.port()
            ),
        );
        let (trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower = Follower::start("mb-smtpd", cfg, shutdown.clone());
        let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
        let spool = Arc::new(spool);
        let m = Manager::new(spool.clone(), follower, fixed_dns(), Clock::new());
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
            spool.locate(&id).is_some_and(|(q, _)| q == "deferred")
        })
        .await;
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), 1, "one transaction for the relay host");
            assert_eq!(got[0].0, "alice@sender.example");
            assert_eq!(got[0].1, ["ok1@served.example", "ok2@Served.Example"]);
            assert_eq!(got[0].2, b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n");
        }
        let (_, env) = spool::read_message(&spool.locate(&id).unwrap().1).unwrap();
        let st = spool.load_state(&env);
        let states: Vec<&str> = st.recipients.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["delivered", "bounced", "deferred", "delivered"]);
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
        wait_for("the retry", || {
            spool.locate(&id).is_none() && !spool.has_state(&id)
        })
        .await;
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1, ["tmp@served.example"]);
        assert!(!spool.has_state(&id));
        assert!(
            m.counters.reused.load(Ordering::Relaxed)
                + m.counters.connections.load(Ordering::Relaxed)
                >= 2
        );
        trigger.trigger();
    }

    #[tokio::test]
    async fn mandatory_tls_never_falls_back_to_plaintext() {
        let (addr, got) = sink(Arc::new(AtomicBool::new(true))).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            &format!(
                "[queue]\nmx_port = {}\n[network.smtp.tls]\noutbound = \"mandatory\"\n",
                addr.port()
            ),
        );
        let (trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower = Follower::start("mb-smtpd", cfg, shutdown.clone());
        let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
        let spool = Arc::new(spool);
        let dns = Dns::Fixed {
            mx: HashMap::from([(
                "plain.example".into(),
                vec![(10, "mx.plain.example".into())],
            )]),
            hosts: HashMap::from([("mx.plain.example".into(), vec![addr.ip()])]),
        };
        let m = Manager::new(spool.clone(), follower, dns, Clock::new());
        tokio::spawn(m.clone().run(shutdown.clone()));
        let id = queue_message(&spool, m.clock.unix(), &["user@plain.example"]).await;
        wait_for("the deferral", || {
            spool.locate(&id).is_some_and(|(q, _)| q == "deferred")
        })
        .await;
        let (_, env) = spool::read_message(&spool.locate(&id).unwrap().1).unwrap();
        let st = spool.load_state(&env);
        assert_eq!(st.recipients[0].state, "deferred");
        assert!(
            st.recipients[0].last_error.contains("TLS is required")
                && st.recipients[0]
                    .last_error
                    .contains("does not offer STARTTLS"),
            "{:?}",
            st.recipients[0]
        );
        assert!(
            got.lock().unwrap().is_empty(),
            "nothing was sent in plaintext"
        );
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
        let attempts = |spool: &Spool| {
            spool.locate(&id).map(|(_, p)| {
                let (_, env) = spool::read_message(&p).unwrap();
                spool.load_state(&env).attempts
            })
        };
        let until = |mins: u64| async move {
            while clock.unix() < t0 + mins * 60 {
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        };
        // Attempts at 0, 5m, 15m, 35m, 65m, 95m, ... (doubling from 5m, at most 30m).
        for (at, want) in [(4, 1), (6, 2), (14, 2), (16, 3), (36, 4), (64, 4)] {
            until(at).await;
            assert_eq!(attempts(&spool), Some(want), "at {at}m");
        }
        assert!(notices(&spool).is_empty(), "no delay warning before 1h");
        until(66).await;
        assert_eq!(attempts(&spool), Some(5));
        let n = notices(&spool);
        assert_eq!(n.len(), 1, "one delay warning");
        assert!(n[0].contains("Action: delayed") && n[0].contains("Will-Retry-Until:"));
        until(179).await;
        assert!(
            attempts(&spool).is_some(),
            "still retried before the lifetime"
        );
        until(181).await;
        assert_eq!(attempts(&spool), None, "bounced and removed at 3h");
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

    #[test]
    fn routing_prefers_transport_then_relay_then_mx() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            "[relay]\nhost = \"[10.0.0.1]\"\nport = 2525\ntransport = \"lmtp.example=lmtp:unix:/run/lmtp,.sub.example=smtp:[10.0.0.9]:25\"\n",
        );
        let t = mb_core::route::parse_transport(&cfg.list("relay.transport"), 25).unwrap();
        let r = |a| route(&cfg, &t, a).unwrap();
        assert_eq!(r("a@served.example").0.to_string(), "smtp:[10.0.0.1]:2525");
        assert!(r("a@served.example").1);
        assert_eq!(r("a@LMTP.example").0.to_string(), "lmtp:unix:/run/lmtp");
        assert_eq!(r("a@x.sub.example").0.to_string(), "smtp:[10.0.0.9]:25");
        assert_eq!(r("a@other.example").0.to_string(), "smtp:other.example:25");
        assert!(!r("a@other.example").1);
        // A served domain without a relay host would loop through its own MX.
        let bare = config(dir.path(), "");
        let err = route(&bare, &[], "a@served.example").unwrap_err();
        assert!(
            err.starts_with("451 4.3.5") && err.contains("relay.host"),
            "{err}"
        );
    }
}
