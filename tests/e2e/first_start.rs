//! A daemon's first start after `mb-config set`: restart-only keys stored in mb-rpcd
//! before the start are in force at that start (the skeleton waits for mb-rpcd's answer
//! before binding), and with mb-rpcd down a daemon starts after `process.config_wait`
//! on its cache or its file, with a warning naming what it could not confirm.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mb_testkit::{Gateway, free_port, text};

/// A gateway whose file says `process.config_wait = WAIT` (a root key: it must come
/// before the tables `Gateway::new` writes).
fn gateway(wait: &str, extra: &str) -> Gateway {
    let gw = Gateway::new(extra);
    let body = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        format!("process.config_wait = \"{wait}\"\n{body}"),
    )
    .unwrap();
    gw
}

fn set(gw: &Gateway, key: &str, value: &str) {
    let (code, out, err) = text(&gw.tool("mb-config", &["set", key, value]));
    assert_eq!(code, 0, "mb-config set {key} {value}: {out}{err}");
}

fn listening(port: u16) -> bool {
    listening_on("127.0.0.1", port)
}

fn listening_on(ip: &str, port: u16) -> bool {
    TcpStream::connect((ip, port)).is_ok()
}

fn log(gw: &Gateway, name: &str) -> String {
    std::fs::read_to_string(gw.path(name)).unwrap_or_default()
}

/// The first line a server sends on `port`.
fn greeting(port: u16) -> String {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[test]
fn smtpd_first_start_listens_where_mb_config_said_and_later_starts_use_the_cache() {
    let (file_port, port, reinject) = (free_port(), free_port(), free_port());
    let mut gw = gateway(
        "5s",
        &format!(
            "[network.smtp]\nlisten = \"127.0.0.2\"\nport = {file_port}\n\
             [network.reinject]\nport = {reinject}\n[filter]\nenabled = false\n"
        ),
    );
    gw.start().unwrap();
    // As the admin did, on a node where mb-smtpd never ran (no cache).
    set(&gw, "network.smtp.listen", "127.0.0.1");
    set(&gw, "network.smtp.port", &port.to_string());
    gw.start_smtpd().unwrap();
    assert!(
        greeting(port).starts_with("220 "),
        "not listening on the port mb-config set:\n{}",
        gw.smtpd_log()
    );
    assert!(
        !listening_on("127.0.0.2", file_port),
        "listening where the file says too:\n{}",
        gw.smtpd_log()
    );
    assert!(
        gw.smtpd_log()
            .contains("configuration confirmed by mb-rpcd"),
        "{}",
        gw.smtpd_log()
    );

    // Stopped, then started again while mb-rpcd is down: the cache written at the first
    // start holds, and the warning says the keys are not confirmed.
    assert_eq!(
        gw.smtpd.take().unwrap().stop(Duration::from_secs(15)),
        Some(0)
    );
    assert_eq!(gw.stop(), Some(0), "{}", gw.log());
    gw.start_smtpd().unwrap();
    assert!(greeting(port).starts_with("220 "), "{}", gw.smtpd_log());
    let log = gw.smtpd_log();
    let warning = log
        .lines()
        .find(|l| l.contains("mb-rpcd did not answer within 5s"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(
        warning.contains("overrides cached in") && warning.contains("network.smtp.port"),
        "{warning}"
    );
}

#[test]
fn filter_first_start_listens_where_mb_config_said() {
    let (file_port, port) = (free_port(), free_port());
    let mut gw = gateway(
        "5s",
        &format!("[smtp]\nenabled = false\n[filter]\nlisten = \"127.0.0.1\"\nport = {file_port}\n"),
    );
    gw.start().unwrap();
    set(&gw, "filter.port", &port.to_string());
    gw.start_filter(1).unwrap();
    let log = || log(&gw, "filter-1.log");
    assert!(greeting(port).starts_with("220 "), "{}", log());
    assert!(!listening(file_port), "{}", log());
    assert!(
        log().contains("configuration confirmed by mb-rpcd"),
        "{}",
        log()
    );
}

#[test]
fn milter_first_start_listens_where_mb_config_said() {
    let (file_port, port) = (free_port(), free_port());
    let mut gw = gateway(
        "5s",
        &format!(
            "[smtp]\nenabled = false\n[filter]\nenabled = false\n\
             [milter]\nenabled = true\nlisten = \"127.0.0.1\"\nport = {file_port}\n"
        ),
    );
    gw.start().unwrap();
    set(&gw, "milter.port", &port.to_string());
    gw.start_milter().unwrap();
    let log = || log(&gw, "milter.log");
    assert!(listening(port), "{}", log());
    assert!(!listening(file_port), "{}", log());
    assert!(
        log().contains("configuration confirmed by mb-rpcd"),
        "{}",
        log()
    );
}

/// mb-cluster restarts its role when `cluster.*` changes, so the port would be right in
/// the end either way: what the fix changes is that the very first role runs with the
/// stored settings, with no restart and nothing ever bound on the file's port.
#[test]
fn cluster_first_start_runs_the_role_mb_config_set() {
    let (file_port, port) = (free_port(), free_port());
    let mut gw = gateway(
        "5s",
        &format!(
            "[smtp]\nenabled = false\n[filter]\nenabled = false\n\
             [cluster]\nbind = \"127.0.0.1\"\nport = {file_port}\n"
        ),
    );
    gw.start().unwrap();
    let (code, out, err) = text(&gw.tool("mb-cluster", &["init", "--name", "main"]));
    assert_eq!(code, 0, "{out}{err}");
    set(&gw, "cluster.port", &port.to_string());
    gw.start_cluster().unwrap();
    mb_testkit::wait_until("the cluster listener", Duration::from_secs(20), || {
        listening(port)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.cluster_log()));
    let log = gw.cluster_log();
    assert!(!listening(file_port), "{log}");
    assert!(log.contains("configuration confirmed by mb-rpcd"), "{log}");
    assert!(
        !log.contains("cluster settings changed") && !log.contains(&format!(":{file_port}")),
        "the first role did not run with the stored settings:\n{log}"
    );
}

/// With mb-rpcd down and no cache, each daemon waits `process.config_wait`, then starts
/// on its file and names the restart-only keys it could not confirm.
#[test]
fn with_rpcd_down_each_daemon_starts_after_config_wait_and_names_the_unconfirmed_keys() {
    let mut gw = gateway(
        "2s",
        &format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {}\n\
             [network.reinject]\nport = {}\n\
             [filter]\nlisten = \"127.0.0.1\"\nport = {}\n\
             [milter]\nlisten = \"127.0.0.1\"\nport = {}\n\
             [cluster]\nbind = \"127.0.0.1\"\nport = {}\n",
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port()
        ),
    );
    type Start = fn(&mut Gateway) -> anyhow::Result<()>;
    let daemons: [(&str, Start, &str, &str); 4] = [
        (
            "mb-smtpd",
            Gateway::start_smtpd,
            "smtpd.log",
            "network.smtp.port",
        ),
        (
            "mb-filter",
            |g| g.start_filter(1),
            "filter-1.log",
            "filter.port",
        ),
        (
            "mb-milter",
            Gateway::start_milter,
            "milter.log",
            "milter.port",
        ),
        (
            "mb-cluster",
            Gateway::start_cluster,
            "cluster.log",
            "cluster.port",
        ),
    ];
    for (name, start, file, key) in daemons {
        let began = Instant::now();
        start(&mut gw).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let took = began.elapsed();
        let log = log(&gw, file);
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(20),
            "{name} started after {took:?}, not after process.config_wait:\n{log}"
        );
        let warning = log
            .lines()
            .find(|l| l.contains("mb-rpcd did not answer within 2s"))
            .unwrap_or_else(|| panic!("{name}: no warning:\n{log}"));
        assert!(
            warning.contains("WARN")
                && warning.contains("the configuration file alone")
                && warning.contains(key),
            "{name}: {warning}"
        );
    }
}

/// Started while mb-rpcd was down (no cache: a fresh node), a daemon runs on its file;
/// when mb-rpcd comes back, the log names each stored restart-only key it is not running
/// with.
#[test]
fn once_rpcd_answers_a_daemon_names_the_stored_keys_that_wait_for_a_restart() {
    let (file_port, port) = (free_port(), free_port());
    let mut gw = gateway(
        "1s",
        &format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {file_port}\n\
             [network.reinject]\nport = {}\n[filter]\nenabled = false\n",
            free_port()
        ),
    );
    gw.start().unwrap();
    set(&gw, "network.smtp.port", &port.to_string());
    assert_eq!(gw.stop(), Some(0), "{}", gw.log());
    gw.start_smtpd().unwrap();
    assert!(listening(file_port), "{}", gw.smtpd_log());
    gw.start().unwrap();
    let expected = format!(
        "network.smtp.port = {port} is stored, but mb-smtpd runs with {file_port} until it is restarted"
    );
    mb_testkit::wait_until("the restart warning", Duration::from_secs(20), || {
        gw.smtpd_log().contains(&expected)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.smtpd_log()));
    // Only keys that differ are named.
    assert!(
        !gw.smtpd_log().contains("network.smtp.listen = "),
        "{}",
        gw.smtpd_log()
    );
}
