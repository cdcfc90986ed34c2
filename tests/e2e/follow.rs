//! A daemon's configuration follower against a real mb-rpcd: live changes, the disk
//! cache, and running on while mb-rpcd is down.

use std::time::Duration;

use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::shutdown_pair;
use mb_testkit::{Gateway, text};

async fn wait_for(f: &Follower, what: &str, check: impl Fn(&mb_core::Config) -> bool) {
    let mut rx = f.subscribe();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if check(&rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("follower never saw {what}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn follower_tracks_changes_and_survives_rpcd_outages() {
    let mut gw =
        Gateway::new("[smtp]\nenabled = false\nmax_recipients = 50\n[filter]\nenabled = false\n");
    gw.start().unwrap();
    let file = mb_core::Config::load_file(&gw.config).unwrap();
    let (trigger, shutdown) = shutdown_pair();
    let f = Follower::start("mb-smtpd", file.clone(), shutdown.clone());
    assert_eq!(f.current().int("smtp.max_recipients"), 50);
    let mut connected = f.connected();
    tokio::time::timeout(Duration::from_secs(20), connected.wait_for(|c| *c))
        .await
        .unwrap()
        .unwrap();

    let set = |gw: &Gateway, k: &str, v: &str| {
        let out = gw.tool("mb-config", &["set", k, v]);
        assert_eq!(text(&out).0, 0, "{}", text(&out).2);
    };
    tokio::task::block_in_place(|| set(&gw, "smtp.max_recipients", "77"));
    wait_for(&f, "max_recipients 77", |c| {
        c.int("smtp.max_recipients") == 77
    })
    .await;
    let cache = mb_runtime::follow::cache_path(&file, "mb-smtpd");
    assert!(std::fs::read_to_string(&cache).unwrap().contains("\"77\""));

    // mb-rpcd goes away: the follower keeps the last configuration.
    tokio::task::block_in_place(|| assert_eq!(gw.stop(), Some(0)));
    tokio::time::timeout(Duration::from_secs(20), connected.wait_for(|c| !*c))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.current().int("smtp.max_recipients"), 77);

    // A daemon started while mb-rpcd is down starts from the cache.
    let f2 = Follower::start("mb-smtpd", file.clone(), shutdown.clone());
    assert_eq!(f2.current().int("smtp.max_recipients"), 77);

    // A reloaded file shows through where there is no override.
    let mut edited = file.clone();
    edited.apply_overrides([("relay.port", "2526")]);
    f2.reload_file(edited);
    assert_eq!(f2.current().int("relay.port"), 2526);

    // mb-rpcd comes back: both reconnect and follow again.
    tokio::task::block_in_place(|| gw.start().unwrap());
    tokio::task::block_in_place(|| set(&gw, "smtp.max_recipients", "78"));
    wait_for(&f, "max_recipients 78", |c| {
        c.int("smtp.max_recipients") == 78
    })
    .await;
    wait_for(&f2, "max_recipients 78", |c| {
        c.int("smtp.max_recipients") == 78
    })
    .await;
    tokio::task::block_in_place(|| set(&gw, "smtp.max_recipients", "79"));
    wait_for(&f2, "max_recipients 79", |c| {
        c.int("smtp.max_recipients") == 79
    })
    .await;
    trigger.trigger();
}
