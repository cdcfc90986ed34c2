//! Pacing of large messages (`smtp.data_rate_limit`) over the in-memory session, in
//! paused time: DATA and BDAT from a stranger are read at the rate past the allowance,
//! the pauses count neither against the DATA deadline nor the idle timeout, and a
//! client in mynetworks is not paced.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::{INSIDE, OUTSIDE, T, settings};
use crate::session::{DataRate, Listener, Settings};

/// 100 KiB/s past 64 KiB; a 10 s DATA deadline and idle timeout, which the paced 2 MiB
/// messages below (about 20 s each) would overrun if the pauses counted.
fn paced() -> Settings {
    let mut s = settings();
    s.max_size = 10 << 20;
    s.timeout = Duration::from_secs(10);
    s.data_deadline = Duration::from_secs(10);
    s.data_rate = Some(DataRate {
        rate: 100 << 10,
        allowance: 64 << 10,
        exempt: vec![],
    });
    s
}

/// 2 MiB of 100-byte lines.
fn content() -> String {
    format!("{}\r\n", "x".repeat(98)).repeat(20 << 10)
}

/// The reply to a message, waited for without the harness's 10 s limit (the paced
/// message legitimately takes longer than that).
async fn final_reply(t: &mut T) -> String {
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        let mut buf = [0u8; 512];
        let n = t.io.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends 2 MiB with DATA from `ip`; the reply and the time it took.
async fn data(ip: &str) -> (String, Duration) {
    let mut t = T::start(paced(), ip, Listener::Smtp).await;
    t.envelope("a@sender.example", &["b@served.example"]).await;
    t.cmd("DATA", 354).await;
    let start = Instant::now();
    t.send(&content()).await;
    t.send(".\r\n").await;
    let r = final_reply(&mut t).await;
    (r, start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_strangers_large_message_is_paced_past_its_deadlines() {
    let (r, took) = data(OUTSIDE).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    // 2 MiB less the allowance and the read that used it up, at 100 KiB/s: 19.2 s.
    assert!(
        took >= Duration::from_secs(19) && took <= Duration::from_secs(21),
        "{took:?}"
    );
    let (r, took) = data(INSIDE).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    assert!(
        took < Duration::from_secs(1),
        "mynetworks was paced: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn bdat_chunks_are_paced_as_one_message() {
    let mut t = T::start(paced(), OUTSIDE, Listener::Smtp).await;
    t.envelope("a@sender.example", &["b@served.example"]).await;
    // 512 KiB, then 1.5 MiB, which alone takes longer than the 10 s deadline.
    let first = format!("{}\r\n", "x".repeat(98)).repeat(5 << 10);
    let last = format!("{}\r\n", "x".repeat(98)).repeat(15 << 10);
    let start = Instant::now();
    t.send(&format!("BDAT {}\r\n{first}", first.len())).await;
    let r = final_reply(&mut t).await;
    assert!(r.starts_with("250"), "{r}");
    t.send(&format!("BDAT {} LAST\r\n{last}", last.len())).await;
    let r = final_reply(&mut t).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let took = start.elapsed();
    // The allowance is the message's, not each chunk's: 2 MiB less the allowance and
    // the 64 KiB read that used it up (which starts the clock) at 100 KiB/s is 19.2 s
    // (18.6 s if each chunk had its own).
    assert!(
        took >= Duration::from_millis(18_900) && took <= Duration::from_millis(20_000),
        "{took:?}"
    );
    assert_eq!(t.spooled().len(), 1);
}
