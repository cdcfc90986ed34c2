//! The queue manager with the spool under it: a bounce the spool cannot take, an
//! administrator's hold, delete or requeue while an attempt is in flight, the compaction
//! task after a busy queue drained, and a spool poisoned after records were written.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mb_proto::v1::queue_server::Queue as _;
use mb_proto::v1::{DeleteQueueRequest, QueueIdRequest};
use mb_runtime::lifecycle::{ShutdownTrigger as Trigger, shutdown_pair};
use mb_spool::LogKind;
use tokio::sync::Semaphore;
use tonic::Request;

use super::tests::{Script, notices, queue_message, relay_manager, scripted, sink, wait_for};
use super::{Clock, Manager};
use crate::queue::QueueService;
use crate::spool::{DeliveryState, Queue, RecipientState, Spool};

/// A manager that relays everything to the SMTP server at `addr`, on a spool of this
/// layout under `dir/spool`, started once `prepare` saw the opened spool.
fn relaying(
    dir: &Path,
    addr: SocketAddr,
    layout: mb_spool::Config,
    prepare: impl FnOnce(&Spool),
) -> (Arc<Spool>, Arc<Manager>, Trigger) {
    let (spool, m, trigger, shutdown) = relay_manager(dir, addr.port(), layout);
    prepare(&spool);
    tokio::spawn(m.clone().run(shutdown));
    (spool, m, trigger)
}

/// The recipients of the messages the sink took from `sender`, transaction by
/// transaction (a pipelined transaction whose recipients were all refused is not one).
fn taken_from(got: &super::tests::Got, sender: &str) -> Vec<Vec<String>> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|t| t.0 == sender && !t.1.is_empty())
        .map(|t| t.1.clone())
        .collect()
}

/// The log's records (kind, id) as they are on disk.
fn log_of(root: &Path) -> Vec<(LogKind, String)> {
    mb_spool::snapshot(root).unwrap().log
}

/// A bounce that cannot be queued (the spool refuses new messages) keeps the message:
/// the refused recipient goes back to deferred with its error, nothing is completed and
/// no notice exists. Once the spool takes messages again, the next attempt bounces it
/// with its notice and completes it; the delivered recipient is not sent again.
#[tokio::test]
async fn a_bounce_that_cannot_be_queued_keeps_the_message() {
    let (addr, got) = sink(Arc::new(AtomicBool::new(true))).await;
    let dir = tempfile::tempdir().unwrap();
    let spool_root = dir.path().join("spool");
    let (spool, m, trigger, shutdown) =
        relay_manager(dir.path(), addr.port(), mb_spool::Config::default());
    let id = queue_message(
        &spool,
        m.clock.unix(),
        &["ok@served.example", "bad@served.example"],
    )
    .await;
    spool.refuse_new.store(true, Ordering::SeqCst);
    tokio::spawn(m.clone().run(shutdown));
    wait_for("the deferral", || {
        spool.locate(&id) == Some(Queue::Deferred)
    })
    .await;
    wait_for("the end of the attempt", || !m.is_active(&id)).await;
    let st = spool.read(&id).unwrap().state;
    let states: Vec<RecipientState> = st.recipients.iter().map(|r| r.state).collect();
    assert_eq!(
        states,
        [RecipientState::Delivered, RecipientState::Deferred],
        "the refused recipient waits for its bounce"
    );
    assert!(
        st.recipients[1].last_error.starts_with("550 5.1.1"),
        "{:?}",
        st.recipients[1]
    );
    assert_eq!(st.attempts, 1);
    assert!(notices(&spool).is_empty());
    assert_eq!(m.counters.notices.load(Ordering::Relaxed), 0);
    assert_eq!(spool.list().len(), 1, "the message only");
    let log = log_of(&spool_root);
    assert!(
        !log.iter().any(|(k, _)| *k == LogKind::Done),
        "nothing was completed: {log:?}"
    );

    // The spool takes new messages again: the retry bounces it and tells the sender.
    spool.refuse_new.store(false, Ordering::SeqCst);
    assert_eq!(m.flush(Some(&id)), 1);
    wait_for("the bounce", || spool.locate(&id).is_none()).await;
    let n = notices(&spool);
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(n[0].contains("Final-Recipient: rfc822; bad@served.example"));
    assert!(n[0].contains("Status: 5.1.1"));
    assert_eq!(
        taken_from(&got, "alice@sender.example"),
        [["ok@served.example"]],
        "ok@ is delivered once"
    );
    trigger.trigger();
}

/// A message whose first attempt is in flight: the next hop has its RCPT and holds the
/// answer until `gate` gets a permit (then defers it).
struct InFlight {
    _dir: tempfile::TempDir,
    root: PathBuf,
    spool: Arc<Spool>,
    m: Arc<Manager>,
    service: QueueService,
    id: String,
    gate: Arc<Semaphore>,
    _trigger: Trigger,
}

async fn in_flight() -> InFlight {
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    // A next hop that holds its answer to every RCPT until the test lets one go, then
    // defers the recipient (451).
    let addr = scripted(Script {
        stall: Some((gate.clone(), entered.clone())),
        ..Script::default()
    })
    .await
    .addr;
    let dir = tempfile::tempdir().unwrap();
    let (spool, m, trigger) = relaying(dir.path(), addr, mb_spool::Config::default(), |_| {});
    let id = queue_message(&spool, m.clock.unix(), &["slow@served.example"]).await;
    wait_for("the attempt at RCPT", || {
        entered.load(Ordering::SeqCst) == 1 && m.is_active(&id)
    })
    .await;
    let service = QueueService {
        spool: spool.clone(),
        manager: Some(m.clone()),
    };
    InFlight {
        root: dir.path().join("spool"),
        _dir: dir,
        spool,
        m,
        service,
        id,
        gate,
        _trigger: trigger,
    }
}

impl InFlight {
    /// Lets the attempt's RCPT be deferred and waits until the attempt is over (its
    /// state written).
    async fn finish_attempt(&self) {
        self.gate.add_permits(1);
        wait_for("the end of the attempt", || !self.m.is_active(&self.id)).await;
    }

    fn scheduled(&self) -> bool {
        self.m.lock_schedule().contains_key(&self.id)
    }
}

/// `mb-queue hold` while an attempt is in flight stands after the attempt deferred: the
/// message stays on hold (with the attempt's outcome in its state), unscheduled, also
/// as read back from disk.
#[tokio::test]
async fn a_hold_during_an_attempt_stands_after_it_defers() {
    let t = in_flight().await;
    let e = t
        .service
        .hold(Request::new(QueueIdRequest { id: t.id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.queue, "hold");
    t.finish_attempt().await;
    let q = t.spool.read(&t.id).unwrap();
    assert_eq!(q.queue, Queue::Hold, "the attempt undid the hold");
    assert_eq!(q.state.attempts, 1, "the attempt's outcome is kept");
    assert_eq!(q.state.recipients[0].state, RecipientState::Deferred);
    assert!(q.state.recipients[0].last_error.starts_with("451 4.2.0"));
    assert!(!t.scheduled(), "a held message is not retried");
    let on_disk = crate::spool::snapshot(&t.root).unwrap();
    assert_eq!(on_disk.len(), 1);
    assert_eq!(on_disk[0].queue, Queue::Hold);
    assert_eq!(on_disk[0].state.as_ref().map(|s| s.attempts), Some(1));
}

/// `mb-queue delete` while an attempt is in flight stands: the attempt's deferral does
/// not bring the message back (not in the spool, not on disk, no state record after
/// its completion, not scheduled).
#[tokio::test]
async fn a_delete_during_an_attempt_stands() {
    let t = in_flight().await;
    let r = t
        .service
        .delete(Request::new(DeleteQueueRequest {
            id: t.id.clone(),
            queue: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 1);
    t.finish_attempt().await;
    assert_eq!(t.spool.locate(&t.id), None, "the attempt resurrected it");
    assert!(t.spool.read(&t.id).is_err_and(|e| e.is_not_found()));
    assert!(!t.scheduled(), "a deleted message is not retried");
    assert!(crate::spool::snapshot(&t.root).unwrap().is_empty());
    let log = log_of(&t.root);
    let done = log
        .iter()
        .position(|(k, i)| *k == LogKind::Done && *i == t.id)
        .expect("the deletion is in the log");
    assert!(
        !log[done..]
            .iter()
            .any(|(k, i)| *k != LogKind::Done && *i == t.id),
        "a record of the message after its deletion: {log:?}"
    );
}

/// `mb-queue requeue` while an attempt is in flight is refused ("being delivered now;
/// try again") and changes nothing; once the attempt is over it is taken.
#[tokio::test]
async fn a_requeue_during_an_attempt_is_refused() {
    let t = in_flight().await;
    let err = t
        .service
        .requeue(Request::new(QueueIdRequest { id: t.id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is being delivered now; try"),
        "{}",
        err.message()
    );
    assert_eq!(t.spool.locate(&t.id), Some(Queue::Incoming));
    t.finish_attempt().await;
    let q = t.spool.read(&t.id).unwrap();
    assert_eq!((q.queue, q.state.attempts), (Queue::Deferred, 1));
    // The attempt is over: now it is taken, with fresh counters.
    let e = t
        .service
        .requeue(Request::new(QueueIdRequest { id: t.id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((e.queue.as_str(), e.attempts), ("incoming", 0));
}

/// The segment files under `root`, oldest first.
fn segment_files(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

/// mb-smtpd's compaction task (`compact_every`, the loop `compact` runs every five
/// minutes): after a busy queue drained (many messages delivered) with a few deferred
/// ones left in old segments, a pass copies those forward and the old segments go; the
/// deferred messages keep their queue, delivery state, next attempt, envelope and body,
/// also as read back from disk.
#[tokio::test]
async fn the_compaction_task_reclaims_drained_segments_and_keeps_deferred_messages() {
    // tmp@ is deferred by the next hop, everything else delivered.
    let (addr, got) = sink(Arc::new(AtomicBool::new(false))).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let layout = mb_spool::Config {
        segment_size: 16 << 10,
        ..mb_spool::Config::default()
    };
    let (spool, m, trigger) = relaying(dir.path(), addr, layout, |_| {});
    let mut deferred = Vec::new();
    for i in 0..150 {
        let rcpt = if i % 50 == 7 {
            "tmp@served.example"
        } else {
            "ok@served.example"
        };
        let id = queue_message(&spool, m.clock.unix(), &[rcpt]).await;
        if rcpt.starts_with("tmp") {
            deferred.push(id);
        }
    }
    wait_for("the queue to drain", || {
        spool.stats().queues == [0, 3, 0] && deferred.iter().all(|id| !m.is_active(id))
    })
    .await;
    assert_eq!(taken_from(&got, "alice@sender.example").len(), 147);
    let kept: Vec<_> = deferred
        .iter()
        .map(|id| {
            let q = spool.read(id).unwrap();
            assert_eq!(q.state.recipients[0].state, RecipientState::Deferred);
            (q.queue, q.state, q.body.read_all().unwrap(), q.envelope)
        })
        .collect();
    let listed = spool.list();
    let before = segment_files(&root);
    // The deferred messages' commits lie in closed segments that are otherwise dead,
    // and nothing but a compaction lets those go.
    assert!(before.len() >= 2, "{before:?}");
    let closed = &before[..before.len() - 1];
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(segment_files(&root), before);

    let (stop, shutdown) = shutdown_pair();
    tokio::spawn(crate::compact_every(
        spool.clone(),
        shutdown,
        Duration::from_millis(50),
    ));
    wait_for("the old segments to go", || {
        closed.iter().all(|p| !p.exists())
    })
    .await;
    stop.trigger();
    assert_eq!(spool.list(), listed, "queues and next attempts");
    for (id, (queue, state, body, envelope)) in deferred.iter().zip(&kept) {
        let q = spool.read(id).unwrap();
        assert_eq!((&q.queue, &q.state), (queue, state), "{id}");
        assert!(q.body.read_all().unwrap() == *body, "{id}");
        assert_eq!(&q.envelope, envelope, "{id}");
    }
    // As a restart reads them.
    let on_disk = crate::spool::snapshot(&root).unwrap();
    let on_disk: Vec<_> = on_disk
        .into_iter()
        .map(|s| (s.id, s.queue, s.state, s.message, s.envelope))
        .collect();
    let expected: Vec<_> = deferred
        .iter()
        .zip(kept)
        .map(|(id, (q, st, body, env))| (id.clone(), q, Some(st), body, env))
        .collect();
    assert!(on_disk == expected, "{on_disk:?}");
    trigger.trigger();
}

/// A spool poisoned after records were written (a message was delivered from it, and
/// the reclaim that its durable completion allowed failed): new mail is refused (the
/// session's 451), nothing more is delivered (a flushed deferred message stays where
/// it is, untried) and `Control.Status` reports `spool_poisoned`.
#[tokio::test]
async fn a_spool_poisoned_after_writing_stops_delivery_and_says_so() {
    use mb_runtime::control::DaemonHooks as _;

    let (addr, got) = sink(Arc::new(AtomicBool::new(true))).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let now = Clock::new().unix();
    let envelope = |id: &str, rcpt: &str| crate::spool::Envelope {
        id: id.into(),
        received_at: now,
        sender: "alice@sender.example".into(),
        recipients: vec![crate::spool::Recipient::plain(rcpt)],
        ..Default::default()
    };
    // Segments small enough that the one holding `first` is whole: only a whole segment
    // is kept as a spare when it is reclaimed.
    let layout = mb_spool::Config {
        segment_size: 64,
        ..mb_spool::Config::default()
    };
    // An earlier run queued `first` (in the first segment), the run after it `second`,
    // deferred until much later (in a later segment).
    let first = {
        let (spool, _) = Spool::open_with(&root, layout.clone()).unwrap();
        let id = spool.new_id();
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"Subject: first\r\n\r\nbody\r\n").await.unwrap();
        w.commit(&envelope(&id, "one@served.example"))
            .await
            .unwrap();
        id
    };
    let first_segment = segment_files(&root);
    assert_eq!(first_segment.len(), 1);
    let second = {
        let (spool, _) = Spool::open_with(&root, layout.clone()).unwrap();
        let id = spool.new_id();
        let env = envelope(&id, "two@served.example");
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"Subject: second\r\n\r\nbody\r\n").await.unwrap();
        w.commit(&env).await.unwrap();
        let later = DeliveryState {
            next_attempt: 4_000_000_000,
            ..DeliveryState::fresh(&env)
        };
        spool
            .update(&id, |_, _| {
                (crate::spool::Change::Set(Queue::Deferred, Some(later)), ())
            })
            .await
            .unwrap();
        id
    };
    // Started again: the first segment cannot become a spare once `first` is delivered
    // (a directory has its spare name), so the reclaim after that completion's batch
    // fails, and poisons the spool.
    let stem = first_segment[0].file_stem().unwrap().to_str().unwrap();
    let block = root.join("segments").join(format!("spare-{stem}"));
    let (spool, m, trigger) = relaying(dir.path(), addr, layout, |_| {
        std::fs::create_dir(&block).unwrap();
    });
    wait_for("the poisoning", || spool.is_poisoned()).await;
    assert!(
        log_of(&root)
            .iter()
            .any(|(k, i)| *k == LogKind::Done && *i == first),
        "the completion was written before the spool was poisoned"
    );
    // New mail is refused: a session answers 451 when this fails.
    assert!(spool.create(&spool.new_id()).await.is_err());
    // Delivery has stopped: a deferred message flushed now is not tried.
    assert_eq!(m.flush(Some(&second)), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!m.is_active(&second));
    assert_eq!(
        taken_from(&got, "alice@sender.example"),
        [["one@served.example"]],
        "delivered while poisoned"
    );
    let q = spool.read(&second).unwrap();
    assert_eq!((q.queue, q.state.attempts), (Queue::Deferred, 0));
    // mb-status sees it.
    let hooks = crate::Hooks {
        server: Arc::new(crate::server::Server::new(
            m.follower.clone(),
            spool.clone(),
            None,
            mb_runtime::control::DaemonInfo::new("mb-smtpd"),
        )),
        manager: m.clone(),
        config: None,
    };
    let mut resp = mb_proto::v1::StatusResponse::default();
    hooks
        .status(&mb_proto::v1::StatusRequest::default(), &mut resp)
        .await;
    assert_eq!(resp.counters.get("spool_poisoned"), Some(&1), "{resp:?}");
    // And the log's own figures.
    let counter = |k: &str| resp.counters.get(k).copied();
    assert!(counter("spool_syncs").is_some_and(|n| n >= 1), "{resp:?}");
    assert!(
        counter("spool_segments").is_some_and(|n| n >= 1),
        "{resp:?}"
    );
    assert_eq!(counter("spool_spares_failed"), Some(0), "{resp:?}");
    assert!(resp.detail.contains("spool poisoned"), "{}", resp.detail);
    trigger.trigger();
}
