//! mb-cluster for real: three nodes on this machine, each with its own mb-rpcd, run dir
//! and database. One child reaches the main through a link the test can cut.

use std::time::Duration;

use mb_testkit::{Gateway, LinkProxy, SmtpSink, free_port, text, wait_until};

use crate::smtp::{Raw, mb_user};

fn node(cluster_port: u16, extra: &str) -> Gateway {
    let gw = Gateway::new(&format!(
        "[cluster]\nbind = \"127.0.0.1\"\nport = {cluster_port}\nheartbeat = \"1s\"\n{extra}"
    ));
    // Each node's DKIM key in its own directory (node-local in the file, as on real
    // machines where the path is the same everywhere).
    let mut cfg = std::fs::read_to_string(&gw.config).unwrap();
    cfg.push_str(&format!(
        "[dkim]\nkey = \"{}\"\n",
        gw.path("dkim.key").display()
    ));
    std::fs::write(&gw.config, cfg).unwrap();
    gw
}

fn ok(gw: &Gateway, tool: &str, args: &[&str]) -> String {
    let (code, out, err) = text(&gw.tool(tool, args));
    assert_eq!(code, 0, "{tool} {args:?}: {out}{err}");
    out
}

fn status(gw: &Gateway) -> serde_json::Value {
    serde_json::from_str(&ok(gw, "mb-cluster", &["status", "--json"])).unwrap()
}

/// The state the main reports for `name`.
fn node_state(main: &Gateway, name: &str) -> String {
    status(main)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .map(|n| n["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn get(gw: &Gateway, key: &str) -> String {
    ok(gw, "mb-config", &["get", key]).trim().to_string()
}

/// A message that scores 2.0 (no Date, no Message-ID, no Subject... see the engine's
/// header checks), so the tag threshold in X-Spam-Status shows which configuration the
/// child filtered it with.
fn send(port: u16, n: u32) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<alice@sender.test>");
    c.cmd("RCPT TO:<bob@served.test>");
    c.cmd("DATA");
    let r = c.cmd(&format!(
        "From: alice@sender.test\r\nTo: bob@served.test\r\n\r\nmessage {n}\r\n."
    ));
    c.cmd("QUIT");
    r
}

#[test]
fn three_nodes_share_the_main_configuration_and_a_cut_off_child_keeps_filtering() {
    let main_port = free_port();
    let mut main = node(main_port, "");
    main.start().unwrap();
    let out = ok(&main, "mb-cluster", &["init", "--name", "main"]);
    assert!(out.contains("main of a new cluster"), "{out}");
    main.start_cluster().unwrap();
    let main_addr: std::net::SocketAddr = format!("127.0.0.1:{main_port}").parse().unwrap();
    wait_until("the cluster listener", Duration::from_secs(20), || {
        std::net::TcpStream::connect(main_addr).is_ok()
    })
    .unwrap();
    let token = ok(&main, "mb-cluster", &["token", "--ttl", "10m"])
        .trim()
        .to_string();
    assert!(token.starts_with("mbc1."), "{token}");

    // child1 reaches the main through a link the test can cut; it also takes mail.
    let link = LinkProxy::start(main_addr).unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let (smtp_port, reinject) = (free_port(), free_port());
    let mut child1 = node(
        free_port(),
        &format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp_port}\n\
             [network.reinject]\nport = {reinject}\n[network.protection]\nmode = \"public\"\n\
             [smtp]\nhostname = \"child1.served.test\"\ndomains = \"served.test\"\n\
             [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
             [filter]\nenabled = true\nworkers = 1\nnext_hop = \"smtp:[127.0.0.1]:{reinject}\"\n",
            sink.port
        ),
    );
    child1.start().unwrap();
    child1.start_filter(1).unwrap();
    child1.start_smtpd().unwrap();
    let out = ok(
        &child1,
        "mb-cluster",
        &[
            "join",
            &link.address(),
            "--token",
            &token,
            "--name",
            "child1",
        ],
    );
    assert!(out.contains("joined the cluster of main"), "{out}");
    child1.start_cluster().unwrap();

    // A join token works once.
    let mut child2 = node(free_port(), "");
    child2.start().unwrap();
    let (code, _, err) = text(&child2.tool(
        "mb-cluster",
        &[
            "join",
            &main_addr.to_string(),
            "--token",
            &token,
            "--name",
            "child2",
        ],
    ));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("used already"), "{err}");
    assert!(
        main.cluster_log().contains("cluster join refused"),
        "{}",
        main.cluster_log()
    );
    let token2 = ok(&main, "mb-cluster", &["token"]).trim().to_string();
    ok(
        &child2,
        "mb-cluster",
        &[
            "join",
            &main_addr.to_string(),
            "--token",
            &token2,
            "--name",
            "child2",
        ],
    );
    child2.start_cluster().unwrap();

    // A node whose certificate comes from another cluster's CA is refused, and a token
    // naming another CA does not get a node to trust this main.
    let mut stranger = node(free_port(), "");
    stranger.start().unwrap();
    ok(&stranger, "mb-cluster", &["init", "--name", "child3"]);
    stranger.start_cluster().unwrap();
    let foreign = mb_cluster::state::Dir(stranger.path("data/cluster"))
        .identity()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(async {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut c = match mb_cluster::peer::main_client(
            &main_addr.to_string(),
            "main",
            &foreign,
            Duration::from_secs(5),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        let reports = tokio_stream::iter(vec![mb_proto::v1::NodeReport::default()]);
        match c.sync(reports).await {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.to_string(),
        }
    });
    assert_ne!(refused, "accepted");
    wait_until(
        "the main logs the refused handshake",
        Duration::from_secs(10),
        || main.cluster_log().contains("cluster TLS handshake refused"),
    )
    .unwrap();
    let foreign_token = ok(&stranger, "mb-cluster", &["token"]).trim().to_string();
    let mut child4 = node(free_port(), "");
    child4.start().unwrap();
    let (code, _, err) = text(&child4.tool(
        "mb-cluster",
        &[
            "join",
            &main_addr.to_string(),
            "--token",
            &foreign_token,
            "--name",
            "child4",
        ],
    ));
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains("CA is not the one the join token names"),
        "{err}"
    );

    // Every node is online on the main.
    wait_until("three nodes online", Duration::from_secs(30), || {
        ["main", "child1", "child2"]
            .iter()
            .all(|n| node_state(&main, n) == "online")
    })
    .unwrap();

    // A change on the main reaches both children: settings, policies, accounts.
    ok(&main, "mb-config", &["set", "spam.threshold.tag", "1.5"]);
    ok(
        &main,
        "mb-policy",
        &[
            "add",
            "partners",
            "--action",
            "allow",
            "--from",
            "*@partner.example",
        ],
    );
    assert_eq!(
        mb_user(
            &main,
            &["add", "carol@served.test"],
            "correct horse battery\n"
        )
        .0,
        0
    );
    // So do the valid recipients of recipient verification's list mode.
    ok(
        &main,
        "mb-recipient",
        &[
            "add",
            "alice@served.test",
            "*@catch.test",
            "--comment",
            "lab",
        ],
    );
    // Sender aliases travel with the accounts (sender binding holds on every node).
    assert_eq!(
        mb_user(
            &main,
            &["alias", "add", "carol@served.test", "sales@served.test"],
            ""
        )
        .0,
        0
    );
    for child in [&child1, &child2] {
        wait_until(
            "the main's change on a child",
            Duration::from_secs(30),
            || {
                get(child, "spam.threshold.tag") == "1.5"
                    && ok(child, "mb-policy", &["list"]).contains("partners")
                    && ok(child, "mb-user", &["list"]).contains("carol@served.test")
                    && ok(child, "mb-user", &["alias", "list"])
                        .contains("carol@served.test sales@served.test")
                    && ok(child, "mb-recipient", &["list"])
                        == "*@catch.test  # lab\nalice@served.test  # lab\n"
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}: tag {:?}, policies {:?}, users {:?}, aliases {:?}, recipients {:?}\n{}",
                get(child, "spam.threshold.tag"),
                ok(child, "mb-policy", &["list"]),
                ok(child, "mb-user", &["list"]),
                ok(child, "mb-user", &["alias", "list"]),
                ok(child, "mb-recipient", &["list"]),
                child.cluster_log()
            )
        });
    }
    // Node-local keys stay local: child1 keeps its own SMTP port.
    assert_eq!(get(&child1, "network.smtp.port"), smtp_port.to_string());

    // Nor does a child keep valid recipients of its own.
    let (code, _, err) = text(&child1.tool("mb-recipient", &["add", "x@served.test"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cluster-wide"), "{err}");
    // Nor does a child grant sender addresses of its own.
    let (code, _, err) = mb_user(
        &child1,
        &["alias", "add", "carol@served.test", "x@served.test"],
        "",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cluster-wide"), "{err}");

    // A child refuses local edits of cluster-wide settings and names the main.
    let (code, _, err) = text(&child1.tool("mb-config", &["set", "spam.threshold.tag", "9"]));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cluster child") && err.contains(&link.address()),
        "{err}"
    );
    let (code, _, err) = text(&child2.tool(
        "mb-policy",
        &["add", "x", "--action", "block", "--from", "x.example"],
    ));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("policies are cluster-wide"), "{err}");
    // ...but node-local ones are its own.
    ok(&child2, "mb-config", &["set", "network.smtp.port", "2626"]);

    // child1 filters with the cluster's threshold.
    assert!(send(smtp_port, 1).starts_with("250"));
    wait_until("message 1 at the sink", Duration::from_secs(20), || {
        sink.messages().iter().any(|m| m.contains("message 1"))
    })
    .unwrap();
    let m1 = sink
        .messages()
        .into_iter()
        .find(|m| m.contains("message 1"))
        .unwrap();
    assert!(m1.contains("required=1.5"), "{m1}");

    // Cut child1 off. The main sees it go offline; the child keeps taking and filtering
    // mail on the configuration it has, while the main moves on.
    link.cut();
    wait_until(
        "child1 offline on the main",
        Duration::from_secs(30),
        || node_state(&main, "child1") == "offline",
    )
    .unwrap();
    ok(&main, "mb-config", &["set", "spam.threshold.tag", "3"]);
    wait_until("child2 follows", Duration::from_secs(30), || {
        get(&child2, "spam.threshold.tag") == "3.0"
    })
    .unwrap();
    assert!(send(smtp_port, 2).starts_with("250"));
    wait_until("message 2 at the sink", Duration::from_secs(20), || {
        sink.messages().iter().any(|m| m.contains("message 2"))
    })
    .unwrap();
    let m2 = sink
        .messages()
        .into_iter()
        .find(|m| m.contains("message 2"))
        .unwrap();
    assert!(
        m2.contains("required=1.5"),
        "the cut-off child keeps its configuration: {m2}"
    );
    // The child notices the silent link by itself (HTTP/2 pings unanswered).
    wait_until("child1 sees the link down", Duration::from_secs(30), || {
        status(&child1)["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("disconnected"))
    })
    .unwrap();

    // Reconnected, it catches up.
    link.heal();
    wait_until("child1 catches up", Duration::from_secs(40), || {
        get(&child1, "spam.threshold.tag") == "3.0" && node_state(&main, "child1") == "online"
    })
    .unwrap();
    let main_version = status(&main)["config_version"].as_u64().unwrap();
    wait_until(
        "child1 reports the main's version",
        Duration::from_secs(20),
        || {
            status(&main)["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "child1" && n["config_version"] == main_version)
        },
    )
    .unwrap();
    assert!(send(smtp_port, 3).starts_with("250"));
    wait_until("message 3 at the sink", Duration::from_secs(20), || {
        sink.messages().iter().any(|m| m.contains("message 3"))
    })
    .unwrap();
    let m3 = sink
        .messages()
        .into_iter()
        .find(|m| m.contains("message 3"))
        .unwrap();
    assert!(m3.contains("required=3.0"), "{m3}");

    // The message log of the main holds child1's events, those from the cut included,
    // each once.
    let events = |gw: &Gateway, node: Option<&str>| -> Vec<String> {
        let out = ok(
            gw,
            "mb-log",
            &["--json", "--since", "1h", "--limit", "10000"],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut keys: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| node.is_none_or(|n| e["node"] == n))
            .map(|e| {
                format!(
                    "{} {} {} {}",
                    e["at_unix_ms"], e["daemon"], e["queue_id"], e["stage"]
                )
            })
            .collect();
        keys.sort();
        keys
    };
    wait_until(
        "child1's events on the main",
        Duration::from_secs(30),
        || {
            let own = events(&child1, None);
            own.len() >= 6 && events(&main, Some("child1")) == own
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nchild1: {:#?}\nmain: {:#?}",
            events(&child1, None),
            events(&main, Some("child1"))
        )
    });

    // A message quarantined on child1 is listed on the main and released from there.
    ok(&main, "mb-config", &["set", "spam.threshold.tag", "1"]);
    ok(
        &main,
        "mb-config",
        &["set", "spam.threshold.quarantine", "1.9"],
    );
    wait_until("child1 quarantines at 1.9", Duration::from_secs(30), || {
        get(&child1, "spam.threshold.quarantine") == "1.9"
    })
    .unwrap();
    assert!(send(smtp_port, 4).starts_with("250"));
    let listed = || -> serde_json::Value {
        serde_json::from_str(&ok(&main, "mb-quarantine", &["list", "--json"])).unwrap()
    };
    wait_until(
        "the quarantined message listed on the main",
        Duration::from_secs(30),
        || listed()["entries"].as_array().is_some_and(|e| e.len() == 1),
    )
    .unwrap();
    let entry = listed()["entries"][0].clone();
    assert_eq!(entry["node"], "child1", "{entry:#}");
    assert!(
        !sink.messages().iter().any(|m| m.contains("message 4")),
        "quarantined, not delivered"
    );
    let id = entry["id"].as_str().unwrap().to_string();
    let out = ok(&main, "mb-quarantine", &["release", &id]);
    assert!(out.contains("bob@served.test"), "{out}");
    wait_until(
        "the released message at the sink",
        Duration::from_secs(20),
        || sink.messages().iter().any(|m| m.contains("message 4")),
    )
    .unwrap();
    let (_, child_list, _) = text(&child1.tool("mb-quarantine", &["list", "--json"]));
    assert!(
        child_list.contains("\"entries\": []"),
        "gone on child1 too: {child_list}"
    );
    wait_until("the main's index follows", Duration::from_secs(20), || {
        listed()["entries"].as_array().is_some_and(Vec::is_empty)
    })
    .unwrap();

    // One node down: mb-status on the main shows all three and the one that is down.
    child2.cluster.take().unwrap().stop(Duration::from_secs(10));
    wait_until("child2 offline", Duration::from_secs(30), || {
        node_state(&main, "child2") == "offline"
    })
    .unwrap();
    let (code, out, _) = text(&main.tool("mb-status", &["--json"]));
    assert_eq!(code, 1, "a node down is a degraded cluster: {out}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nodes = st["cluster"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{st:#}");
    let states: Vec<(&str, &str)> = nodes
        .iter()
        .map(|n| (n["name"].as_str().unwrap(), n["state"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&("child2", "offline")), "{states:?}");
    assert!(states.contains(&("child1", "online")), "{states:?}");
    let (_, table, _) = text(&main.tool("mb-status", &[]));
    assert!(
        table.contains("child2") && table.contains("offline"),
        "{table}"
    );

    // A removed node is refused from then on.
    ok(&main, "mb-cluster", &["remove", "child1"]);
    wait_until("child1 refused", Duration::from_secs(30), || {
        status(&child1)["state"]
            .as_str()
            .is_some_and(|s| s.contains("removed"))
    })
    .unwrap();
}

/// A node that takes mail (no filter, no delivery) and guards it with autoban. One new
/// connection a second per client: on port 25 only connections refused by that limit
/// count toward a ban.
fn mail_node(cluster_port: u16, smtp_port: u16, redis: &str) -> Gateway {
    node(
        cluster_port,
        &format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp_port}\nrate_per_source = 1\nconnection_rate = 10000\n\
             [network.reinject]\nport = {}\n[network.protection]\nmode = \"autoban\"\ntrusted_networks = \"192.0.2.0/24\"\n\
             [smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
             [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n[redis]\nurl = \"{redis}\"\n",
            free_port()
        ),
    )
}

#[test]
fn with_redis_a_flooder_banned_by_one_node_is_refused_by_the_other() {
    let redis = mb_testkit::Redis::start().unwrap();
    let (main_port, main_smtp, child_smtp) = (free_port(), free_port(), free_port());
    let mut main = mail_node(main_port, main_smtp, &redis.url());
    main.start().unwrap();
    ok(&main, "mb-cluster", &["init", "--name", "mx1"]);
    main.start_cluster().unwrap();
    main.start_smtpd().unwrap();
    let main_addr = format!("127.0.0.1:{main_port}");
    wait_until("the cluster listener", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&main_addr).is_ok()
    })
    .unwrap();
    let token = ok(&main, "mb-cluster", &["token"]).trim().to_string();
    let mut child = mail_node(free_port(), child_smtp, &redis.url());
    child.start().unwrap();
    ok(
        &child,
        "mb-cluster",
        &["join", &main_addr, "--token", &token, "--name", "mx2"],
    );
    child.start_cluster().unwrap();
    child.start_smtpd().unwrap();

    // The ban threshold is a cluster-wide setting, made on the main.
    ok(
        &main,
        "mb-config",
        &["set", "network.protection.autoban.rate", "3/minute"],
    );
    wait_until("the rate on the child", Duration::from_secs(30), || {
        get(&child, "network.protection.autoban.rate") == "3/minute"
    })
    .unwrap();
    let greeting = |port| Raw::connect(port).reply();
    // A flooder that keeps knocking after 421s: the refusals are counted in Redis.
    let replies: Vec<String> = (0..8).map(|_| greeting(main_smtp)).collect();
    assert!(replies[0].starts_with("220"), "{replies:?}");
    assert!(
        replies
            .iter()
            .any(|r| r.contains("too many connections per second")),
        "{replies:?}"
    );
    let r = greeting(main_smtp);
    assert!(r.contains("127.0.0.1 is banned"), "{replies:?} then {r}");
    // The other node refuses the flooder at once, although it never saw it.
    let r = greeting(child_smtp);
    assert!(
        r.contains("127.0.0.1 is banned"),
        "mx2 did not see mx1's ban: {r}"
    );
}

/// Sets up a main and `children` children (no mail), all serving the cluster.
fn cluster(children: &[&str]) -> (Gateway, u16, Vec<Gateway>) {
    let main_port = free_port();
    let mut main = node(main_port, "");
    main.start().unwrap();
    ok(&main, "mb-cluster", &["init", "--name", "main"]);
    main.start_cluster().unwrap();
    let main_addr = format!("127.0.0.1:{main_port}");
    wait_until("the cluster listener", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&main_addr).is_ok()
    })
    .unwrap();
    let nodes = children
        .iter()
        .map(|name| {
            let token = ok(&main, "mb-cluster", &["token"]).trim().to_string();
            let mut child = node(free_port(), "");
            child.start().unwrap();
            ok(
                &child,
                "mb-cluster",
                &["join", &main_addr, "--token", &token, "--name", name],
            );
            child.start_cluster().unwrap();
            child
        })
        .collect();
    (main, main_port, nodes)
}

#[test]
fn a_child_promoted_when_the_main_is_lost_leads_the_others() {
    let (mut main, _, children) = cluster(&["child1", "child2"]);
    let (child1, child2) = (&children[0], &children[1]);
    ok(&main, "mb-config", &["set", "spam.threshold.tag", "3.5"]);
    for c in [child1, child2] {
        wait_until("the first snapshot", Duration::from_secs(30), || {
            get(c, "spam.threshold.tag") == "3.5"
        })
        .unwrap();
    }
    // The main's DKIM key signs for every node.
    ok(&main, "mb-dkim", &["keygen", "--domain", "served.test"]);
    ok(&main, "mb-config", &["set", "dkim.sign", "true"]);
    let key = std::fs::read_to_string(main.path("dkim.key")).unwrap();
    assert!(key.contains("PRIVATE KEY"), "{key}");
    for c in [child1, child2] {
        wait_until("the DKIM key on a child", Duration::from_secs(30), || {
            std::fs::read_to_string(c.path("dkim.key")).ok().as_deref() == Some(key.as_str())
        })
        .unwrap();
    }

    // The main is lost; the administrator promotes child1.
    main.cluster.take().unwrap().stop(Duration::from_secs(10));
    main.stop();
    let out = ok(child1, "mb-cluster", &["promote"]);
    assert!(out.contains("now the cluster main"), "{out}");
    let child1_port = {
        let cfg = std::fs::read_to_string(&child1.config).unwrap();
        let line = cfg
            .lines()
            .find(|l| l.starts_with("port = "))
            .unwrap()
            .to_string();
        line.trim_start_matches("port = ").parse::<u16>().unwrap()
    };
    let new_main = format!("127.0.0.1:{child1_port}");
    wait_until("the new main listens", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&new_main).is_ok()
    })
    .unwrap();
    ok(
        child2,
        "mb-cluster",
        &["follow", &new_main, "--main-name", "child1"],
    );
    // The new main edits the cluster's configuration; the other child follows it.
    ok(child1, "mb-config", &["set", "spam.threshold.tag", "2.5"]);
    wait_until(
        "child2 follows the new main",
        Duration::from_secs(30),
        || get(child2, "spam.threshold.tag") == "2.5",
    )
    .unwrap();
    let st = status(child1);
    assert_eq!(st["role"], "main", "{st:#}");
    let names: Vec<&str> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"main"), "the lost main is out: {names:?}");

    // child2 leaves: the main revokes it, and its settings are its own again.
    let out = ok(child2, "mb-cluster", &["leave"]);
    assert!(out.contains("left the cluster"), "{out}");
    ok(child2, "mb-config", &["set", "spam.threshold.tag", "4.5"]);
    wait_until(
        "child2 gone from the table",
        Duration::from_secs(20),
        || {
            !status(child1)["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "child2")
        },
    )
    .unwrap();
    // The main, alone now, may leave too.
    ok(child1, "mb-cluster", &["leave"]);
    // `leave` stores cluster.enabled = false through mb-rpcd; the daemon
    // learns it from the change feed, a moment later.
    wait_until(
        "the left main shows cluster disabled",
        Duration::from_secs(20),
        || status(child1)["enabled"].as_bool() == Some(false),
    )
    .unwrap_or_else(|e| panic!("{e}: {:#}", status(child1)));
}

/// A recipient list past tonic's 4 MiB default message size (150,000 patterns, about
/// 7 MB as a snapshot) reaches the child: Export from the main's mb-rpcd, the ClusterPeer
/// stream, Import into the child's mb-rpcd.
#[test]
fn a_recipient_list_larger_than_four_mebibytes_replicates() {
    const N: usize = 150_000;
    let (main, _, children) = cluster(&["child1"]);
    let child = &children[0];
    let file = main.path("recipients.txt");
    let list: String = (0..N)
        .map(|i| format!("user{i:06}@a-rather-long-recipient-domain.test\n"))
        .collect();
    std::fs::write(&file, list).unwrap();
    ok(&main, "mb-recipient", &["import", file.to_str().unwrap()]);
    wait_until(
        "150,000 recipients on the child",
        Duration::from_secs(120),
        || {
            let (code, out, _) = text(&child.tool("mb-recipient", &["list"]));
            code == 0 && out.lines().count() == N
        },
    )
    .unwrap_or_else(|e| {
        let (_, out, _) = text(&child.tool("mb-recipient", &["list"]));
        panic!(
            "{e}: the child has {} recipients\n{}",
            out.lines().count(),
            child.cluster_log()
        )
    });
}
