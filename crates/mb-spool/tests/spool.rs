//! The spool's guarantees through its public API: group commit, torn tails and damaged
//! records at recovery, reclaiming segments, large bodies, compaction, and a property
//! test of recovery over random operation sequences.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use mb_spool::{Config, Queue, Spool, SpoolError, State};
use proptest::prelude::*;

fn body_for(id: &str, len: usize) -> Vec<u8> {
    let seed = id
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

fn segment_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(root.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

fn spare_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("segments")).unwrap().count() - segment_files(root).len()
}

/// A spool that grows by appending asks for a zero-filled spare once its active segment
/// passed 1 MiB, and moves to it at the next batch: from then on commits write over
/// allocated blocks (the file keeps the spare's length), and a restart recovers every
/// message without taking the zeros behind the last record for a torn tail.
#[test]
fn a_growing_spool_moves_to_a_prepared_zero_filled_spare() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = Config {
        segment_size: 8 << 20,
        ..Config::default()
    };
    let (spool, _) = Spool::open(root, cfg.clone()).unwrap();
    let append = |n: usize| {
        let id = format!("G{n:04}");
        spool
            .append(&id, id.as_bytes(), &body_for(&id, 4000))
            .wait()
            .unwrap();
    };
    // Past 1 MiB the preparer is asked for a spare; once it is ready, the next batch
    // moves to it.
    let asked = std::time::Instant::now();
    let mut n = 0;
    while segment_files(root).len() == 1 {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(60),
            "no move to a prepared spare within 60 s ({n} messages)"
        );
        append(n);
        n += 1;
        if n > 256 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    assert!(n > 256, "moved after {n} messages, before 1 MiB");
    let segments = segment_files(root);
    assert!(
        std::fs::metadata(&segments[0]).unwrap().len() < 2 << 20,
        "the first segment was left early"
    );
    let file_len = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(
        file_len(&segments[1]),
        8 << 20,
        "the new segment is a whole spare"
    );
    let prepared = std::fs::read_dir(root.join("segments"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().starts_with("spare-new-")
        })
        .count();
    assert_eq!(prepared, 0, "the spare was renamed to the segment");
    let total = n + 50;
    while n < total {
        append(n);
        n += 1;
    }
    assert_eq!(segment_files(root).len(), 2);
    assert_eq!(
        file_len(&segments[1]),
        8 << 20,
        "the new segment was written over, not grown"
    );
    // What lies behind the last record is still the spare's zeros.
    let data = std::fs::read(&segments[1]).unwrap();
    assert!(data[data.len() - (1 << 20)..].iter().all(|&b| b == 0));
    drop(spool);

    let (spool, rec) = Spool::open(root, cfg).unwrap();
    assert_eq!(
        (rec.messages, rec.torn_tails, rec.corrupt_records),
        (total, 0, 0)
    );
    for n in [0, 256, total - 51, total - 1] {
        let id = format!("G{n:04}");
        let m = spool.read(&id).unwrap();
        assert_eq!(m.body.read_all().unwrap(), body_for(&id, 4000));
    }
}

/// A preparer that cannot write its spare (here a directory is in the way of its file,
/// as a full disk would stop it) changes nothing for the writers: every append is
/// acknowledged in the segment that keeps growing, the failure is counted once, and
/// the committer does not ask again within that segment (no segment of zeros tried
/// after every batch).
#[test]
fn a_spare_that_cannot_be_prepared_is_given_up_once_per_segment() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = Config {
        segment_size: 8 << 20,
        ..Config::default()
    };
    let (spool, _) = Spool::open(root, cfg).unwrap();
    std::fs::create_dir(root.join("segments").join("preparing-spare")).unwrap();
    let append = |n: usize| {
        let id = format!("F{n:04}");
        spool
            .append(&id, id.as_bytes(), &body_for(&id, 4000))
            .wait()
            .unwrap();
    };
    for n in 0..300 {
        append(n);
    }
    let asked = std::time::Instant::now();
    while spool.stats().spares_failed == 0 {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(60),
            "the preparer never gave up"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for n in 300..600 {
        append(n);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let stats = spool.stats();
    assert_eq!(
        (stats.spares_failed, stats.spare_segments, stats.segments),
        (1, 0, 1)
    );
    assert_eq!(stats.queues[0], 600);
    assert_eq!(segment_files(root).len(), 1);
}

fn body_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("bodies")).unwrap().count()
}

fn small_segments() -> Config {
    Config {
        segment_size: 1,
        large_threshold: 1024,
        ..Config::default()
    }
}

#[test]
fn concurrent_writers_are_each_acknowledged_once_and_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, rec) = Spool::open(dir.path(), Config::default()).unwrap();
    assert_eq!(rec.messages, 0);
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let spool = spool.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let id = format!("T{t:02}M{i:03}");
                    spool
                        .append(&id, id.as_bytes(), &body_for(&id, 300))
                        .wait()
                        .unwrap();
                    // Acknowledged means visible and readable at once.
                    let m = spool.read(&id).unwrap();
                    assert_eq!(m.envelope, id.as_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = spool.stats();
    assert_eq!(stats.queues, [1280, 0, 0]);
    // One fdatasync per batch, not per message: concurrent writers share them.
    assert_eq!(stats.batches, stats.syncs);
    assert!(
        stats.syncs < 1280 / 2,
        "{} fsyncs for 1280 messages from 32 writers",
        stats.syncs
    );
    // An id is taken once.
    assert!(matches!(
        spool.append("T00M000", b"again", b"x").wait(),
        Err(SpoolError::Duplicate(_))
    ));
    assert!(matches!(
        spool.append("../x", b"e", b"x").wait(),
        Err(SpoolError::BadId(_))
    ));
    drop(spool);
    let (spool, rec) = Spool::open(dir.path(), Config::default()).unwrap();
    assert_eq!(
        (rec.messages, rec.torn_tails, rec.corrupt_records),
        (1280, 0, 0)
    );
    for (id, state) in spool.list() {
        assert_eq!(state, State::default());
        assert_eq!(
            spool.read(&id).unwrap().body.read_all().unwrap(),
            body_for(&id, 300)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_writers_await_their_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), Config::default()).unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|t| {
            let spool = spool.clone();
            tokio::spawn(async move {
                let id = format!("A{t:03}");
                spool
                    .append(&id, b"env", &body_for(&id, 4096))
                    .await
                    .unwrap();
                spool.complete(&id).await.unwrap();
                // Finished: gone, and a second completion is refused.
                assert!(matches!(
                    spool.complete(&id).await,
                    Err(SpoolError::NotFound(_))
                ));
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(spool.stats().queues, [0, 0, 0]);
}

#[test]
fn torn_tail_is_ignored_and_acknowledged_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), Config::default()).unwrap();
    for i in 0..10 {
        let id = format!("M{i}");
        spool
            .append(&id, b"env", &body_for(&id, 500))
            .wait()
            .unwrap();
    }
    drop(spool);
    let seg = segment_files(dir.path()).pop().unwrap();
    let full = std::fs::read(&seg).unwrap();
    // A crash in the middle of a write: the start of a record (here a copy of a whole
    // one, cut short), then nothing.
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&full[16..16 + 300]).unwrap();
    drop(f);
    let (spool, rec) = Spool::open(dir.path(), Config::default()).unwrap();
    assert_eq!((rec.messages, rec.torn_tails, rec.torn_bytes), (10, 1, 300));
    assert_eq!(rec.corrupt_records, 0);
    drop(spool);

    // Cut into the last record itself: that message is gone (it could not have been
    // acknowledged), every other one is whole.
    std::fs::write(&seg, &full[..full.len() - 7]).unwrap();
    let (spool, rec) = Spool::open(dir.path(), Config::default()).unwrap();
    assert_eq!((rec.messages, rec.torn_tails), (9, 1));
    assert!(spool.read("M9").is_err());
    for i in 0..9 {
        let id = format!("M{i}");
        assert_eq!(
            spool.read(&id).unwrap().body.read_all().unwrap(),
            body_for(&id, 500)
        );
    }
}

#[test]
fn a_damaged_record_is_skipped_and_the_records_after_it_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), Config::default()).unwrap();
    for i in 0..5 {
        let id = format!("M{i}");
        spool
            .append(&id, b"env", &body_for(&id, 1000))
            .wait()
            .unwrap();
    }
    drop(spool);
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut data = std::fs::read(&seg).unwrap();
    // The third record's body: a checksum mismatch, not a short record.
    let record = (data.len() - 16) / 5;
    data[16 + 2 * record + record / 2] ^= 0x01;
    std::fs::write(&seg, &data).unwrap();
    let (spool, rec) = Spool::open(dir.path(), Config::default()).unwrap();
    assert_eq!(
        (rec.messages, rec.corrupt_records, rec.torn_tails),
        (4, 1, 0)
    );
    assert!(spool.read("M2").is_err());
    assert_eq!(
        spool.read("M4").unwrap().body.read_all().unwrap(),
        body_for("M4", 1000)
    );
}

/// Waits until a reader of the spool's files finds no live message (a lazy Done written,
/// though not synced).
fn wait_written(root: &Path) {
    let started = std::time::Instant::now();
    while !mb_spool::snapshot(root).unwrap().messages.is_empty() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the lazy Done was never written"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A lazy completion costs no `fdatasync` of its own while another record is to come:
/// it is written at once (a process kill keeps it), and its sync waits (here up to a
/// minute) for the next commit's; a close syncs it; with a short wait it is synced on
/// its own. Meanwhile the message is hidden (as after any queued completion) and cannot
/// be completed twice.
#[test]
fn a_lazy_completion_rides_with_the_next_commit_or_goes_alone_after_its_wait() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let long = Config {
        lazy_wait: std::time::Duration::from_secs(60),
        ..Config::default()
    };
    let (spool, _) = Spool::open(root, long.clone()).unwrap();
    spool.append("A", b"env-a", b"body-a").wait().unwrap();
    let syncs = spool.stats().syncs;
    let done_a = spool.complete_lazily("A");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        spool.stats().syncs,
        syncs,
        "the lazy Done was synced on its own"
    );
    // Written at once, synced later: a reader of the files (what recovery after a
    // process kill reads) finds A done.
    wait_written(root);
    assert!(
        spool.list().is_empty(),
        "a queued completion hides A at once"
    );
    assert!(
        matches!(spool.complete("A").wait(), Err(SpoolError::NotFound(_))),
        "A was completed twice"
    );
    spool.append("B", b"env-b", b"body-b").wait().unwrap();
    done_a.wait().unwrap();
    assert_eq!(
        spool.stats().syncs,
        syncs + 1,
        "A's Done and B's commit: one batch"
    );
    let ids: Vec<String> = spool.list().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["B"]);
    // Closing syncs a lazy record still waiting.
    let done_b = spool.complete_lazily("B");
    drop(spool);
    done_b.wait().unwrap();
    let (spool, rec) = Spool::open(root, long).unwrap();
    assert_eq!(rec.messages, 0, "B's lazy Done was lost at close");
    drop(spool);

    // With a short wait and nothing else to come, it goes on its own.
    let short = Config {
        lazy_wait: std::time::Duration::from_millis(20),
        ..Config::default()
    };
    let (spool, _) = Spool::open(root, short.clone()).unwrap();
    spool.append("C", b"env-c", b"body-c").wait().unwrap();
    let syncs = spool.stats().syncs;
    let started = std::time::Instant::now();
    spool.complete_lazily("C").wait().unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(20));
    assert_eq!(spool.stats().syncs, syncs + 1);
    assert_eq!(spool.list(), vec![]);
    // An eager record queued behind a waiting lazy one wakes the committer at once.
    spool.append("D", b"env-d", b"body-d").wait().unwrap();
    let done_d = spool.complete_lazily("D");
    let started = std::time::Instant::now();
    spool.append("E", b"env-e", b"body-e").wait().unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the commit waited for the lazy record's timer"
    );
    done_d.wait().unwrap();
    drop(spool);
    let (spool, rec) = Spool::open(root, short).unwrap();
    assert_eq!(rec.messages, 1);
    assert!(spool.read("E").is_ok() && spool.read("D").is_err());
    drop(spool);

    // A commit that moves to a new segment first syncs the lazy record written to the
    // old one (a sync covers one file).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let rotating = Config {
        lazy_wait: std::time::Duration::from_secs(60),
        ..small_segments()
    };
    let (spool, _) = Spool::open(root, rotating.clone()).unwrap();
    spool.append("F", b"env-f", b"body-f").wait().unwrap();
    let syncs = spool.stats().syncs;
    let done_f = spool.complete_lazily("F");
    // F's Done written before G comes: otherwise both go in one batch to the new segment.
    wait_written(root);
    spool.append("G", b"env-g", b"body-g").wait().unwrap();
    done_f.wait().unwrap();
    assert_eq!(spool.stats().syncs, syncs + 2);
    drop(spool);
    let (spool, rec) = Spool::open(root, rotating).unwrap();
    assert_eq!(rec.messages, 1);
    assert!(spool.read("G").is_ok() && spool.read("F").is_err());
}

#[test]
fn a_segment_is_reclaimed_only_after_all_its_messages_are_done() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Every batch starts a new segment, so each record below has one of its own.
    let (spool, _) = Spool::open(root, small_segments()).unwrap();
    spool.append("A", b"env-a", b"body-a").wait().unwrap();
    let seg_a = segment_files(root).pop().unwrap();
    spool.append("B", b"env-b", b"body-b").wait().unwrap();
    let deferred = State {
        queue: Queue::Deferred,
        next_attempt: 1_800_000_000,
        data: b"{\"attempts\":1}".to_vec(),
    };
    spool.set_state("A", deferred.clone()).wait().unwrap();
    spool.complete("B").wait().unwrap();
    // B is done, A is not: A's commit segment stays, B's went.
    spool.append("C", b"env-c", b"body-c").wait().unwrap();
    assert!(seg_a.exists(), "A's segment went while A was live");
    assert_eq!(spool.stats().queues, [1, 1, 0]);
    drop(spool);

    let (spool, rec) = Spool::open(root, small_segments()).unwrap();
    assert_eq!(rec.messages, 2);
    assert_eq!(spool.state("A"), Some(deferred));
    assert!(spool.read("B").is_err(), "a finished message came back");
    assert_eq!(spool.read("A").unwrap().body.read_all().unwrap(), b"body-a");
    // A's segment, A's state segment, C's segment, the new active one.
    assert_eq!(segment_files(root).len(), 4);
    spool.complete("A").wait().unwrap();
    spool.complete("C").wait().unwrap();
    spool.append("D", b"env-d", b"body-d").wait().unwrap();
    spool.complete("D").wait().unwrap();
    drop(spool);
    let (spool, rec) = Spool::open(root, small_segments()).unwrap();
    assert_eq!(rec.messages, 0);
    assert_eq!(spool.list(), vec![]);
    // Everything done: only the segment just started, and at most the one holding the
    // last Done (its commit went in the same segment, so nothing pins it).
    assert!(segment_files(root).len() <= 2, "{:?}", segment_files(root));
    drop(spool);
    let (_spool, _) = Spool::open(root, small_segments()).unwrap();
    assert_eq!(segment_files(root).len(), 1);
}

#[test]
fn large_bodies_live_in_their_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (spool, _) = Spool::open(root, small_segments()).unwrap();
    let big = body_for("BIG", 10_000);
    spool.append("BIG", b"env", &big).wait().unwrap();
    spool.append("SMALL", b"env", b"small").wait().unwrap();
    assert!(root.join("bodies/BIG").exists());
    assert_eq!(body_files(root), 1);
    assert_eq!(spool.read("BIG").unwrap().body.read_all().unwrap(), big);
    // A body streamed to its file by the caller.
    let path = spool.body_file_path("STREAMED").unwrap();
    std::fs::write(&path, b"streamed body").unwrap();
    spool
        .append_with_body_file("STREAMED", b"env")
        .wait()
        .unwrap();
    assert_eq!(
        spool.read("STREAMED").unwrap().body.read_all().unwrap(),
        b"streamed body"
    );
    spool.complete("BIG").wait().unwrap();
    assert!(!root.join("bodies/BIG").exists(), "a finished body stayed");
    drop(spool);
    // An orphan (a body whose commit never became durable) is removed; a body that
    // vanished makes its message unreadable, so it is dropped and named.
    std::fs::write(root.join("bodies/ORPHAN"), b"x").unwrap();
    std::fs::remove_file(root.join("bodies/STREAMED")).unwrap();
    let (spool, rec) = Spool::open(root, small_segments()).unwrap();
    assert_eq!(rec.orphan_bodies, 1);
    assert_eq!(rec.missing_bodies, vec!["STREAMED".to_string()]);
    assert_eq!(body_files(root), 0);
    assert_eq!(rec.messages, 1);
    assert_eq!(
        spool.read("SMALL").unwrap().body.read_all().unwrap(),
        b"small"
    );
}

#[test]
fn compaction_moves_long_deferred_messages_forward() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = Config {
        segment_size: 16 << 10,
        large_threshold: 8 << 10,
        ..Config::default()
    };
    let (spool, _) = Spool::open(root, cfg.clone()).unwrap();
    let ids: Vec<String> = (0..60).map(|i| format!("M{i:02}")).collect();
    for id in &ids {
        let len = if id == "M07" { 9000 } else { 1000 };
        spool
            .append(id, id.as_bytes(), &body_for(id, len))
            .wait()
            .unwrap();
    }
    let held = State {
        queue: Queue::Hold,
        next_attempt: 0,
        data: b"held".to_vec(),
    };
    spool.set_state("M03", held.clone()).wait().unwrap();
    for id in ids.iter().filter(|i| *i != "M03" && *i != "M07") {
        spool.complete(id).wait().unwrap();
    }
    // The two survivors keep the first segment (16 KiB, 2 KiB of it live) alive.
    let first = segment_files(root).remove(0);
    assert_eq!(spool.compact(0.0).unwrap(), 0, "nothing is that sparse");
    assert!(first.exists());
    let copied = spool.compact(0.5).unwrap();
    assert_eq!(copied, 2);
    // The copies are durable and the sparse segment is gone.
    assert!(!first.exists(), "compaction left {first:?}");
    spool.append("NEW", b"env", b"x").wait().unwrap();
    drop(spool);
    let (spool, rec) = Spool::open(root, cfg).unwrap();
    assert_eq!(rec.messages, 3);
    assert_eq!(spool.state("M03"), Some(held));
    assert_eq!(spool.state("M07"), Some(State::default()));
    for id in ["M03", "M07"] {
        let m = spool.read(id).unwrap();
        assert_eq!(m.envelope, id.as_bytes());
        let len = if id == "M07" { 9000 } else { 1000 };
        assert_eq!(m.body.read_all().unwrap(), body_for(id, len));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Defer(usize, u64),
    Hold(usize),
    Complete(usize),
    Compact,
    Reopen { junk: Vec<u8> },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop_oneof![Just(10usize), Just(700), Just(3000)].prop_map(Op::Append),
        2 => (any::<usize>(), 1u64..2_000_000_000).prop_map(|(i, t)| Op::Defer(i, t)),
        1 => any::<usize>().prop_map(Op::Hold),
        3 => any::<usize>().prop_map(Op::Complete),
        1 => Just(Op::Compact),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(|junk| Op::Reopen { junk }),
    ]
}

fn check(spool: &Spool, model: &BTreeMap<String, (State, Vec<u8>)>) {
    let listed: Vec<(String, State)> = spool.list();
    let expected: Vec<(String, State)> = model
        .iter()
        .map(|(id, (st, _))| (id.clone(), st.clone()))
        .collect();
    assert_eq!(listed, expected);
    for (id, (_, body)) in model {
        let m = spool.read(id).unwrap();
        assert_eq!(m.envelope, id.as_bytes());
        assert_eq!(&m.body.read_all().unwrap(), body);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever happens (appends of every size, state changes, completions,
    /// compactions, restarts with junk at the end of the log), what recovery returns is
    /// exactly what was acknowledged, and when nothing is live, nothing is kept.
    #[test]
    fn recovery_returns_exactly_what_was_acknowledged(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let cfg = Config { segment_size: 2048, large_threshold: 1024, ..Config::default() };
        let mut spool = Spool::open(root, cfg.clone()).unwrap().0;
        let mut model: BTreeMap<String, (State, Vec<u8>)> = BTreeMap::new();
        let mut next = 0;
        for op in ops {
            let pick = |i: usize, m: &BTreeMap<String, (State, Vec<u8>)>| {
                (!m.is_empty()).then(|| m.keys().nth(i % m.len()).unwrap().clone())
            };
            match op {
                Op::Append(len) => {
                    let id = format!("P{next:05}");
                    next += 1;
                    let body = body_for(&id, len);
                    spool.append(&id, id.as_bytes(), &body).wait().unwrap();
                    model.insert(id, (State::default(), body));
                }
                Op::Defer(i, t) => if let Some(id) = pick(i, &model) {
                    let st = State { queue: Queue::Deferred, next_attempt: t, data: t.to_le_bytes().to_vec() };
                    spool.set_state(&id, st.clone()).wait().unwrap();
                    model.get_mut(&id).unwrap().0 = st;
                },
                Op::Hold(i) => if let Some(id) = pick(i, &model) {
                    let st = State { queue: Queue::Hold, next_attempt: 0, data: Vec::new() };
                    spool.set_state(&id, st.clone()).wait().unwrap();
                    model.get_mut(&id).unwrap().0 = st;
                },
                Op::Complete(i) => if let Some(id) = pick(i, &model) {
                    spool.complete(&id).wait().unwrap();
                    model.remove(&id);
                },
                Op::Compact => {
                    spool.compact(0.9).unwrap();
                }
                Op::Reopen { junk } => {
                    drop(spool);
                    // An unacknowledged write cut by a crash: bytes after the last record.
                    let last = segment_files(root).pop().unwrap();
                    std::fs::OpenOptions::new().append(true).open(&last).unwrap().write_all(&junk).unwrap();
                    let (s, rec) = Spool::open(root, cfg.clone()).unwrap();
                    prop_assert_eq!(rec.corrupt_records, 0);
                    prop_assert!(rec.missing_bodies.is_empty());
                    spool = s;
                }
            }
            check(&spool, &model);
        }
        drop(spool);
        let (spool, rec) = Spool::open(root, cfg.clone()).unwrap();
        prop_assert_eq!(rec.messages, model.len());
        check(&spool, &model);
        let large = model.values().filter(|(_, b)| b.len() > 1024).count();
        prop_assert_eq!(body_files(root), large);
        if model.is_empty() {
            drop(spool);
            let _ = Spool::open(root, cfg).unwrap();
            prop_assert_eq!(segment_files(root).len(), 1, "nothing live, yet segments kept");
        }
    }
}

#[test]
fn recycled_segment_files_never_bring_old_records_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = Config {
        segment_size: 4096,
        large_threshold: 1 << 20,
        ..Config::default()
    };
    let (spool, _) = Spool::open(root, cfg.clone()).unwrap();
    for i in 0..120 {
        let id = format!("OLD{i:03}");
        spool
            .append(&id, id.as_bytes(), &body_for(&id, 100))
            .wait()
            .unwrap();
    }
    for i in 0..120 {
        spool.complete(&format!("OLD{i:03}")).wait().unwrap();
    }
    spool.append("NEW000", b"NEW000", b"x").wait().unwrap();
    assert_eq!(spool.stats().spare_segments, 2);
    assert_eq!(spare_files(root), 2, "spares are kept, at most two");
    // New records go into a spare, over whole old records; stop as soon as one is
    // taken, so that most of that file is still old records.
    let mut n = 1;
    while spool.stats().spare_segments == 2 {
        let id = format!("NEW{n:03}");
        spool
            .append(&id, id.as_bytes(), &body_for(&id, 100))
            .wait()
            .unwrap();
        n += 1;
        assert!(n < 200, "no spare was reused");
    }
    drop(spool);
    let (spool, rec) = Spool::open(root, cfg).unwrap();
    let ids: Vec<String> = spool.list().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), n);
    assert!(
        ids.iter().all(|id| id.starts_with("NEW")),
        "an old record came back"
    );
    assert!(
        rec.torn_tails >= 1,
        "the reused file's old tail was not seen: {rec:?}"
    );
    assert_eq!(rec.corrupt_records, 0, "{rec:?}");
    for id in &ids[1..] {
        assert_eq!(
            spool.read(id).unwrap().body.read_all().unwrap(),
            body_for(id, 100)
        );
    }
}

/// The case the pins exist for: X shares its segment with messages still live, its
/// Done lands in a later segment, and that later segment empties. Deleting it would let
/// recovery find X's commit without its Done and deliver X again.
#[test]
fn a_done_record_outlives_the_commit_it_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = Config {
        segment_size: 600,
        large_threshold: 1 << 20,
        ..Config::default()
    };
    let (spool, _) = Spool::open(root, cfg.clone()).unwrap();
    // X, Y and Z share the first segment (Z fills it).
    for (id, len) in [("X", 50), ("Y", 50), ("Z", 600)] {
        spool
            .append(id, id.as_bytes(), &body_for(id, len))
            .wait()
            .unwrap();
    }
    let first = segment_files(root);
    // X's Done opens the second segment, W fills it, W's Done opens a third: the second
    // now holds nothing live, only X's Done.
    spool.complete("X").wait().unwrap();
    spool.append("W", b"W", &body_for("W", 600)).wait().unwrap();
    spool.complete("W").wait().unwrap();
    spool.append("V", b"V", b"v").wait().unwrap();
    assert!(
        segment_files(root).len() > first.len(),
        "the records did not spread"
    );
    drop(spool);
    let (spool, rec) = Spool::open(root, cfg).unwrap();
    let ids: Vec<String> = spool.list().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["V", "Y", "Z"], "{rec:?}");
}

/// A failed segment write (here: the next segment's name is already taken when the
/// committer rotates) poisons the spool: the pending append fails, every later one is
/// refused, and `is_poisoned` says so.
#[test]
fn a_failed_commit_poisons_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        segment_size: 0,
        large_threshold: 1024,
        ..Config::default()
    };
    let (spool, _) = Spool::open(dir.path(), config).unwrap();
    assert!(!spool.is_poisoned());
    let active = segment_files(dir.path());
    assert_eq!(active.len(), 1, "{active:?}");
    let seq = u64::from_str_radix(active[0].file_stem().unwrap().to_str().unwrap(), 16).unwrap();
    std::fs::write(
        dir.path()
            .join("segments")
            .join(format!("{:016X}.seg", seq + 1)),
        b"in the way",
    )
    .unwrap();
    assert!(spool.append("A1", b"env", b"body").wait().is_err());
    assert!(spool.is_poisoned());
    assert!(matches!(
        spool.append("A2", b"env", b"body").wait(),
        Err(SpoolError::Poisoned)
    ));
    assert!(
        spool.read("A1").is_err(),
        "a failed commit is never visible"
    );
}

/// `snapshot` sees what the spool holds (states, large bodies, done messages gone) and
/// the log's order, and changes no file.
#[test]
fn a_snapshot_reads_the_queue_without_changing_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        large_threshold: 1024,
        ..Config::default()
    };
    let (spool, _) = Spool::open(dir.path(), config).unwrap();
    spool.append("M1", b"e1", b"small").wait().unwrap();
    spool
        .append("M2", b"e2", &body_for("M2", 5000))
        .wait()
        .unwrap();
    spool.append("M3", b"e3", b"gone").wait().unwrap();
    let held = State {
        queue: Queue::Hold,
        next_attempt: 7,
        data: b"{}".to_vec(),
    };
    spool.set_state("M1", held.clone()).wait().unwrap();
    spool.complete("M3").wait().unwrap();
    let listing = |root: &Path| {
        let mut v: Vec<_> = ["segments", "bodies"]
            .iter()
            .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
            .map(|e| {
                let e = e.unwrap();
                (e.path(), e.metadata().unwrap().len())
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(dir.path());
    let snap = mb_spool::snapshot(dir.path()).unwrap();
    assert_eq!(listing(dir.path()), before);
    let ids: Vec<&str> = snap.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["M1", "M2"]);
    assert_eq!(snap.messages[0].state, held);
    assert_eq!(snap.messages[0].body, b"small");
    assert_eq!(snap.messages[1].body, body_for("M2", 5000));
    assert_eq!(snap.messages[1].envelope, b"e2");
    use mb_spool::LogKind;
    let log: Vec<(LogKind, &str)> = snap.log.iter().map(|(k, id)| (*k, id.as_str())).collect();
    assert_eq!(
        log,
        [
            (LogKind::Commit, "M1"),
            (LogKind::Commit, "M2"),
            (LogKind::Commit, "M3"),
            (LogKind::State, "M1"),
            (LogKind::Done, "M3")
        ]
    );
    assert_eq!(
        mb_spool::snapshot(&dir.path().join("nothing")).unwrap(),
        mb_spool::Snapshot::default()
    );
}

/// A reclaim that fails after its batch was made durable does not fail that batch (its
/// clients would resend it): the batch is acknowledged and the spool poisoned.
#[test]
fn a_failed_reclaim_acknowledges_the_durable_batch_and_poisons() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        segment_size: 0,
        ..Config::default()
    };
    let (spool, _) = Spool::open(dir.path(), config.clone()).unwrap();
    spool.append("A1", b"env", b"body").wait().unwrap();
    let segs = segment_files(dir.path());
    let a1_seg = segs
        .last()
        .unwrap()
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    // The segment A1 lies in cannot become a spare: its completion's reclaim fails.
    std::fs::create_dir(dir.path().join("segments").join(format!("spare-{a1_seg}"))).unwrap();
    spool.complete("A1").wait().unwrap();
    assert!(spool.is_poisoned());
    assert!(matches!(
        spool.append("A2", b"env", b"body").wait(),
        Err(SpoolError::Poisoned)
    ));
    drop(spool);
    std::fs::remove_dir(dir.path().join("segments").join(format!("spare-{a1_seg}"))).unwrap();
    let (spool, _) = Spool::open(dir.path(), config).unwrap();
    assert_eq!(
        spool.list(),
        vec![],
        "the acknowledged completion is durable"
    );
}

/// On a poisoned spool a state change or completion is refused and changes nothing:
/// the message keeps its state and stays listed.
#[test]
fn a_refused_change_leaves_the_message_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        segment_size: 0,
        ..Config::default()
    };
    let (spool, _) = Spool::open(dir.path(), config).unwrap();
    spool.append("A1", b"env", b"body").wait().unwrap();
    let segs = segment_files(dir.path());
    let seq = u64::from_str_radix(
        segs.last().unwrap().file_stem().unwrap().to_str().unwrap(),
        16,
    )
    .unwrap();
    // A directory (a spare file would be renamed over a file) is in the way of the
    // next segment: the next batch fails and poisons the spool.
    std::fs::create_dir(
        dir.path()
            .join("segments")
            .join(format!("{:016X}.seg", seq + 1)),
    )
    .unwrap();
    assert!(spool.append("A2", b"env", b"body").wait().is_err());
    assert!(spool.is_poisoned());
    let held = State {
        queue: Queue::Hold,
        next_attempt: 7,
        data: b"x".to_vec(),
    };
    assert!(matches!(
        spool.set_state("A1", held).wait(),
        Err(SpoolError::Poisoned)
    ));
    assert_eq!(spool.state("A1"), Some(State::default()));
    assert!(matches!(
        spool.complete("A1").wait(),
        Err(SpoolError::Poisoned)
    ));
    assert_eq!(spool.list(), vec![("A1".to_string(), State::default())]);
    assert!(spool.read("A1").is_ok());
}

/// One `compact` call copies about `compact_max_bytes`, so that a compaction after a
/// drained backlog does not hold every survivor in memory; calls repeated until one
/// copies nothing move every survivor, oldest segments first.
#[test]
fn one_compaction_copies_a_bounded_number_of_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = Config {
        segment_size: 64 << 10,
        large_threshold: 8 << 10,
        compact_max_bytes: 10_000,
        // Segments here are filled, not left early for a prepared spare.
        prepare_spare: false,
        ..Config::default()
    };
    let (spool, _) = Spool::open(root, cfg.clone()).unwrap();
    let ids: Vec<String> = (0..40).map(|i| format!("C{i:02}")).collect();
    for id in &ids {
        spool
            .append(id, id.as_bytes(), &body_for(id, 4000))
            .wait()
            .unwrap();
    }
    // Every other message finishes: each closed segment is about half live.
    let survivors: Vec<&String> = ids.iter().step_by(2).collect();
    for id in ids.iter().skip(1).step_by(2) {
        spool.complete(id).wait().unwrap();
    }
    let first = segment_files(root).remove(0);
    let mut calls = Vec::new();
    loop {
        let n = spool.compact(0.6).unwrap();
        if n == 0 {
            break;
        }
        // A copy is about 4 KiB: at most the 10,000 bytes and one record more.
        assert!(n <= 3, "one compaction copied {n} records");
        calls.push(n);
        assert!(calls.len() < 40, "compaction does not finish: {calls:?}");
    }
    assert!(calls.len() >= 4, "{calls:?}");
    assert!(!first.exists(), "compaction left {first:?}");
    drop(spool);
    let (spool, rec) = Spool::open(root, cfg).unwrap();
    assert_eq!(rec.messages, survivors.len());
    for id in survivors {
        let m = spool.read(id).unwrap();
        assert_eq!(m.body.read_all().unwrap(), body_for(id, 4000));
    }
}

/// `list_brief` gives what `list` does (ids in order, queue, next attempt) without the
/// states' data, and leaves out finished and finishing messages.
#[test]
fn list_brief_gives_queues_and_retry_times_without_data() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), Config::default()).unwrap();
    for id in ["B1", "B2", "B3", "B4"] {
        spool.append(id, b"env", b"body").wait().unwrap();
    }
    let deferred = State {
        queue: Queue::Deferred,
        next_attempt: 1_700_000_000,
        data: vec![b'd'; 8000],
    };
    spool.set_state("B2", deferred.clone()).wait().unwrap();
    spool
        .set_state(
            "B4",
            State {
                queue: Queue::Hold,
                next_attempt: 0,
                data: b"held".to_vec(),
            },
        )
        .wait()
        .unwrap();
    spool.complete("B3").wait().unwrap();
    assert_eq!(
        spool.list_brief(),
        vec![
            ("B1".to_string(), Queue::Incoming, 0),
            ("B2".to_string(), Queue::Deferred, 1_700_000_000),
            ("B4".to_string(), Queue::Hold, 0),
        ]
    );
    let full: Vec<(String, Queue, u64)> = spool
        .list()
        .into_iter()
        .map(|(id, s)| (id, s.queue, s.next_attempt))
        .collect();
    assert_eq!(full, spool.list_brief());
    assert_eq!(spool.state("B2"), Some(deferred));
}
