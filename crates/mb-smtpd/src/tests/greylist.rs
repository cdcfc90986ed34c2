//! Greylisting at RCPT over the in-memory session, with a test clock and the in-process
//! store: who is deferred, when a retry passes, and who is never greylisted.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use mb_core::greylist::Timing;
use mb_core::policy::{Action, Direction, Object, Policy};
use mb_runtime::policies::PolicySet;

use super::{INSIDE, OUTSIDE, T, settings};
use crate::greylist::{Clock, Greylist, Store};
use crate::session::{Listener, Settings};

fn allow(name: &str, object: Object, pattern: &str, unauthenticated: bool) -> Policy {
    Policy {
        id: 1,
        name: name.into(),
        priority: 10,
        object,
        pattern: pattern.into(),
        direction: Direction::From,
        action: Action::Allow,
        tag: None,
        quarantine: None,
        reject: None,
        unauthenticated,
        recipient: String::new(),
    }
}

fn greylisting(now: &Arc<AtomicI64>, policies: Vec<Policy>) -> Settings {
    let clock: Clock = {
        let now = now.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    };
    let mut s = settings();
    s.max_recipients = 100;
    s.greylist = Some(crate::greylist::Settings {
        timing: Timing {
            delay: 300,
            retry_window: 4 * 3600,
            lifetime: 35 * 86_400,
            auto_whitelist: 2,
        },
        ipv6_prefix: 64,
        delimiter: "+".into(),
        greylist: Arc::new(Greylist {
            store: Store::memory(clock),
            policies: Some(PolicySet::fixed(policies)),
            resolver: None,
        }),
    });
    s
}

#[tokio::test]
async fn new_triplets_are_deferred_until_retried_after_the_delay() {
    let now = Arc::new(AtomicI64::new(1_000_000));
    let s = greylisting(&now, Vec::new());
    let mut t = T::start(s.clone(), OUTSIDE, Listener::Smtp).await;
    t.cmd("EHLO client.example", 250).await;
    t.cmd("MAIL FROM:<Someone@Sender.example>", 250).await;
    let r = t.cmd("RCPT TO:<User@served.example>", 451).await;
    assert!(
        r.starts_with("451 4.7.1 <User@served.example>: Recipient address rejected: Greylisted, please try again in 300 seconds"),
        "{r}"
    );
    now.fetch_add(120, Ordering::SeqCst);
    let r = t.cmd("RCPT TO:<user@served.example>", 451).await;
    assert!(r.contains("try again in 180 seconds"), "{r}");
    now.fetch_add(180, Ordering::SeqCst);
    // The same triplet in other letter cases, from a neighbour in the same /24.
    let mut t = T::start(s.clone(), "198.51.100.200", Listener::Smtp).await;
    t.cmd("EHLO client.example", 250).await;
    t.cmd("MAIL FROM:<someone@sender.example>", 250).await;
    t.cmd("RCPT TO:<USER@served.example>", 250).await;
    // Another recipient is another triplet; another /24 is another client.
    t.cmd("RCPT TO:<other@served.example>", 451).await;
    let mut t = T::start(s.clone(), "198.51.101.7", Listener::Smtp).await;
    t.cmd("EHLO client.example", 250).await;
    t.cmd("MAIL FROM:<someone@sender.example>", 250).await;
    t.cmd("RCPT TO:<user@served.example>", 451).await;
    // The null sender is a sender of its own.
    t.cmd("RSET", 250).await;
    t.cmd("MAIL FROM:<>", 250).await;
    t.cmd("RCPT TO:<user@served.example>", 451).await;
}

#[tokio::test]
async fn trusted_clients_and_allowed_senders_are_not_greylisted() {
    let now = Arc::new(AtomicI64::new(1_000_000));
    let s = greylisting(
        &now,
        vec![
            allow("partner", Object::Domain, "partner.example", true),
            allow("needs-spf", Object::Domain, "signed.example", false),
        ],
    );
    // mynetworks and reinjection.
    for (ip, listener) in [(INSIDE, Listener::Smtp), ("127.0.0.1", Listener::Reinject)] {
        let mut t = T::start(s.clone(), ip, listener).await;
        t.envelope("a@sender.example", &["user@served.example"])
            .await;
    }
    let mut t = T::start(s.clone(), OUTSIDE, Listener::Smtp).await;
    // An allow that applies without authentication.
    t.envelope("news@partner.example", &["user@served.example"])
        .await;
    t.cmd("RSET", 250).await;
    // An allow that needs an authenticated sender, and no SPF pass (no resolver here).
    t.cmd("MAIL FROM:<news@signed.example>", 250).await;
    t.cmd("RCPT TO:<user@served.example>", 451).await;
}

#[tokio::test]
async fn a_client_that_passed_enough_is_auto_whitelisted() {
    let now = Arc::new(AtomicI64::new(1_000_000));
    let s = greylisting(&now, Vec::new());
    let mut t = T::start(s.clone(), OUTSIDE, Listener::Smtp).await;
    t.cmd("EHLO client.example", 250).await;
    t.cmd("MAIL FROM:<a@sender.example>", 250).await;
    t.cmd("RCPT TO:<one@served.example>", 451).await;
    t.cmd("RCPT TO:<two@served.example>", 451).await;
    t.cmd("RCPT TO:<three@served.example>", 451).await;
    now.fetch_add(300, Ordering::SeqCst);
    t.cmd("RCPT TO:<one@served.example>", 250).await;
    // One pass is not enough (auto_whitelist = 2)...
    t.cmd("RCPT TO:<four@served.example>", 451).await;
    t.cmd("RCPT TO:<two@served.example>", 250).await;
    // ...two are: a triplet never seen passes, and so does one still deferred.
    t.cmd("RCPT TO:<five@served.example>", 250).await;
    now.fetch_add(1, Ordering::SeqCst);
    t.cmd("RCPT TO:<four@served.example>", 250).await;
}

/// A first-time sender with more recipients than `smtp.max_errors` is deferred on each
/// and keeps its session: only the transaction's first deferral counts as an error, so
/// the next transaction and a real error still count.
#[tokio::test]
async fn greylisting_many_recipients_does_not_end_the_session() {
    let now = Arc::new(AtomicI64::new(1_000_000));
    let mut s = greylisting(&now, Vec::new());
    s.max_errors = 3;
    let mut t = T::start(s, OUTSIDE, Listener::Smtp).await;
    t.cmd("EHLO client.example", 250).await;
    t.cmd("MAIL FROM:<someone@sender.example>", 250).await;
    for n in 0..12 {
        t.cmd(&format!("RCPT TO:<user{n}@served.example>"), 451)
            .await;
    }
    t.cmd("RSET", 250).await;
    t.cmd("MAIL FROM:<someone@sender.example>", 250).await;
    // The second transaction's first deferral counts (errors: 2 of 3)...
    t.cmd("RCPT TO:<more@served.example>", 451).await;
    t.cmd("RCPT TO:<more2@served.example>", 451).await;
    // ... and a real client error then reaches the limit.
    t.cmd("RCPT TO:<x@elsewhere.example>", 421).await;
}
