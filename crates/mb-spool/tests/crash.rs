//! Crash safety for real: a child process writes to the spool under load and is killed
//! with SIGKILL mid-batch; the spool it leaves must hold every message it acknowledged,
//! none it finished, and only whole messages. Three rounds on the same spool, so that
//! recovery also starts from a spool that an earlier recovery left.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mb_spool::{Config, Queue, Spool, State};

const CHILD_ENV: &str = "MB_SPOOL_CRASH_CHILD";

fn config() -> Config {
    // Small segments and a low large-body threshold: the kill lands in rotations,
    // reclaims and body-file commits too.
    Config {
        segment_size: 256 << 10,
        large_threshold: 32 << 10,
        ..Config::default()
    }
}

/// The body a message with this id has: its length and bytes follow from the id, so
/// the parent can check a recovered message without having seen it.
fn body_for(id: &str) -> Vec<u8> {
    let n: usize = id[3..].parse().unwrap();
    let len = match n % 10 {
        0 => 40_000 + n % 1000,
        _ => 200 + (n * 37) % 6000,
    };
    let seed = id
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

fn deferred(id: &str) -> State {
    State {
        queue: Queue::Deferred,
        next_attempt: 1_900_000_000,
        data: id.as_bytes().to_vec(),
    }
}

/// The child: 12 writers append as fast as acknowledgements come, defer every 5th
/// message, finish every 3rd and finish some others lazily (not awaited), and report
/// each acknowledgement on stdout.
fn child(dir: &str, round: u32) {
    let (spool, _) = Spool::open(std::path::Path::new(dir), config()).unwrap();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..12)
        .map(|w| {
            let (spool, out) = (spool.clone(), out.clone());
            std::thread::spawn(move || {
                let say = |line: String| {
                    let mut o = out.lock().unwrap();
                    writeln!(o, "{line}").unwrap();
                    o.flush().unwrap();
                };
                for i in 0.. {
                    let n = w + 12 * i;
                    let id = format!("R{round}W{n:07}");
                    spool
                        .append(&id, id.as_bytes(), &body_for(&id))
                        .wait()
                        .unwrap();
                    say(format!("A {id}"));
                    if n % 5 == 0 {
                        spool.set_state(&id, deferred(&id)).wait().unwrap();
                        say(format!("S {id}"));
                    }
                    if n % 3 == 0 {
                        say(format!("C {id}"));
                        spool.complete(&id).wait().unwrap();
                        say(format!("D {id}"));
                    } else if n % 7 == 1 {
                        // Not awaited, as mb-smtpd's queue manager does after a delivery.
                        say(format!("C {id}"));
                        drop(spool.complete_lazily(&id));
                        say(format!("L {id}"));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn sigkill_mid_batch_loses_no_acknowledged_message() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (dir, round) = spec.split_once(':').unwrap();
        child(dir, round.parse().unwrap());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap().to_string();
    let mut acked: HashSet<String> = HashSet::new();
    let mut deferred_acked: HashSet<String> = HashSet::new();
    let mut completing: HashSet<String> = HashSet::new();
    let mut done: HashSet<String> = HashSet::new();
    // Completed lazily: may come back (the record was queued, maybe not yet written).
    let mut lazy: HashSet<String> = HashSet::new();
    for round in 0..3u32 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_mid_batch_loses_no_acknowledged_message",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{dir_s}:{round}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Let it run until it has acknowledged a good number of messages this round,
        // at a moment chosen by how far it got, not by a clock, then kill it mid-flight.
        let target = 600 + 250 * round as usize;
        let mut this_round = 0;
        while this_round < target {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("child stalled after {this_round} acks: {e}"));
            if line.starts_with("A ") {
                this_round += 1;
            }
            record(
                &line,
                &mut acked,
                &mut deferred_acked,
                &mut completing,
                &mut done,
                &mut lazy,
            );
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines the child wrote before it died are acknowledgements too.
        reader.join().unwrap();
        while let Ok(line) = rx.try_recv() {
            record(
                &line,
                &mut acked,
                &mut deferred_acked,
                &mut completing,
                &mut done,
                &mut lazy,
            );
        }

        let (spool, rec) = Spool::open(dir.path(), config()).unwrap();
        assert_eq!(rec.corrupt_records, 0, "round {round}: {rec:?}");
        assert!(rec.missing_bodies.is_empty(), "round {round}: {rec:?}");
        let live: HashMap<String, State> = spool.list().into_iter().collect();
        for id in &acked {
            if done.contains(id) {
                assert!(
                    !live.contains_key(id),
                    "round {round}: finished {id} came back"
                );
            } else if !completing.contains(id) {
                assert!(
                    live.contains_key(id),
                    "round {round}: acknowledged {id} lost"
                );
            }
        }
        for (id, state) in &live {
            // Recovered messages are whole and are ones the child wrote (some may
            // have been durable without their acknowledgement reaching us).
            let m = spool.read(id).unwrap();
            assert_eq!(m.envelope, id.as_bytes(), "round {round}: {id}");
            assert!(
                m.body.read_all().unwrap() == body_for(id),
                "round {round}: {id} torn"
            );
            if deferred_acked.contains(id) {
                assert_eq!(state, &deferred(id), "round {round}: {id} lost its state");
            }
        }
        let lazy_back = lazy.iter().filter(|id| live.contains_key(*id)).count();
        eprintln!(
            "round {round}: {} acknowledged in all, {} live after recovery, {} torn bytes, recovered in {:?}, {lazy_back} of {} lazy completions back",
            acked.len(),
            live.len(),
            rec.torn_bytes,
            rec.elapsed,
            lazy.len()
        );
    }
}

fn record(
    line: &str,
    acked: &mut HashSet<String>,
    deferred_acked: &mut HashSet<String>,
    completing: &mut HashSet<String>,
    done: &mut HashSet<String>,
    lazy: &mut HashSet<String>,
) {
    let Some((kind, id)) = line.split_once(' ') else {
        return;
    };
    let id = id.to_string();
    match kind {
        "A" => {
            acked.insert(id);
        }
        "S" => {
            deferred_acked.insert(id);
        }
        "C" => {
            completing.insert(id);
        }
        "D" => {
            done.insert(id);
        }
        "L" => {
            lazy.insert(id);
        }
        _ => {}
    }
}
