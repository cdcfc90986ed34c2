//! What the administrator's tools share: exit statuses, turning gRPC errors into words,
//! reaching mb-rpcd, and running on a small runtime.

use std::future::Future;
use std::process::ExitCode;

use mb_core::Config;
use tonic::transport::Channel;

use crate::uds::ConnectError;

/// A failure with the exit status it maps to: 1 refused, 69 unreachable, 77 denied.
pub struct Failure(pub u8, pub anyhow::Error);

impl Failure {
    pub fn refused(e: impl Into<anyhow::Error>) -> Failure {
        Failure(1, e.into())
    }
}

impl From<ConnectError> for Failure {
    fn from(e: ConnectError) -> Self {
        let code = if matches!(e, ConnectError::Denied { .. }) {
            77
        } else {
            69
        };
        Failure(code, e.into())
    }
}

/// A gRPC error from `daemon` as a failure: the request refused (1), the caller denied
/// (77), or the daemon unavailable (69).
pub fn grpc(daemon: &str, e: &tonic::Status) -> Failure {
    let code = match e.code() {
        tonic::Code::NotFound
        | tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::AlreadyExists => 1,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => 77,
        _ => 69,
    };
    Failure(
        code,
        anyhow::anyhow!(crate::uds::describe_status(daemon, e)),
    )
}

/// A channel to mb-rpcd's socket.
pub async fn rpcd(cfg: &Config) -> Result<Channel, Failure> {
    Ok(crate::uds::connect(&cfg.socket("mb-rpcd"), "mb-rpcd").await?)
}

/// Runs a tool's work on a single-threaded runtime; prints `tool: error` and exits
/// with the failure's status.
pub fn run<F: Future<Output = Result<(), Failure>>>(tool: &str, work: F) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{tool}: {e}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("{tool}: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Why a `--since`/`--until` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("{text:?} is neither an age such as 2h or 7d nor a UTC time such as 2026-11-22 08:30")]
    NotATime { text: String },
}

/// A `--since`/`--until` value as Unix milliseconds: an age (`30m`, `2h`, `7d`: that
/// long before `now_ms`) or a UTC time `YYYY-MM-DD[ HH:MM[:SS]]` (also with a `T`).
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, TimeError> {
    let text = text.trim();
    if let Ok(age) = mb_core::value::parse_duration(text) {
        return Ok(now_ms - i64::try_from(age.as_millis()).unwrap_or(i64::MAX / 2));
    }
    let bad = || TimeError::NotATime {
        text: text.to_string(),
    };
    let (date, time) = match text.split_once([' ', 'T']) {
        Some((d, t)) => (d, t),
        None => (text, "00:00"),
    };
    let mut dp = date.split('-');
    let (Some(y), Some(m), Some(d), None) = (dp.next(), dp.next(), dp.next(), dp.next()) else {
        return Err(bad());
    };
    let (y, m, d): (i64, u32, u32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    let mut tp = time.split(':');
    let h: i64 = tp.next().unwrap_or("0").parse().map_err(|_| bad())?;
    let min: i64 = tp.next().unwrap_or("0").parse().map_err(|_| bad())?;
    let sec: i64 = tp.next().unwrap_or("0").parse().map_err(|_| bad())?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || min > 59 || sec > 60 {
        return Err(bad());
    }
    Ok(((days_from_civil(y, m, d) * 86_400) + h * 3600 + min * 60 + sec) * 1000)
}

/// Text from a message (a subject, a header, a reason) made safe for a terminal: control
/// characters other than newline and tab, and the bidirectional overrides that can
/// disguise a file name, are shown escaped (`\x1b`, `\u{202e}`) instead of acting on the
/// administrator's terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if u32::from(c) < 0x80 {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// What a change command prints: with `--json`, one JSON object (for scripts); else the
/// sentence, made printable.
pub fn changed(json: bool, value: &serde_json::Value, text: std::fmt::Arguments<'_>) {
    if json {
        println!("{value}");
    } else {
        println!("{}", printable(&text.to_string()));
    }
}

/// `println!` for a tool's output: the line passes through `printable`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", $crate::cli::printable(&format!($($arg)*)))
    };
}

/// A duration in the short form status tables use: `42s`, `5m2s`, `3h10m`, `2d4h`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The cluster's node table, one line per node, as `mb-cluster status` and `mb-status`
/// print it (like Proxmox's `pmgcm status`).
pub fn node_table(nodes: &[mb_proto::v1::NodeStatus], now_ms: i64) -> String {
    let mut out = format!(
        "{:<20} {:<6} {:<11} {:<22} {:>7} {:>8} {:>5} {:>6}  {}\n",
        "NODE", "ROLE", "STATE", "ADDRESS", "VERSION", "UPTIME", "LOAD", "QUEUE", "LAST SEEN"
    );
    for n in nodes {
        let seen = if n.last_seen_unix_ms == 0 {
            "never".to_string()
        } else {
            let secs = u64::try_from((now_ms - n.last_seen_unix_ms).max(0) / 1000).unwrap_or(0);
            format!("{} ago", age(secs))
        };
        out.push_str(&format!(
            "{:<20} {:<6} {:<11} {:<22} {:>7} {:>8} {:>5.2} {:>6}  {}\n",
            n.name,
            n.role,
            n.state,
            if n.address.is_empty() {
                "-"
            } else {
                &n.address
            },
            n.config_version,
            age(n.uptime_secs),
            n.load,
            n.queue_depth,
            seen
        ));
    }
    out
}

/// A node as JSON, the same in `mb-cluster status --json` and `mb-status --json`.
pub fn node_json(n: &mb_proto::v1::NodeStatus) -> serde_json::Value {
    serde_json::json!({
        "name": n.name, "address": n.address, "role": n.role, "state": n.state,
        "config_version": n.config_version, "uptime_secs": n.uptime_secs, "load": n.load,
        "queue_depth": n.queue_depth, "last_seen_unix_ms": n.last_seen_unix_ms,
        "fingerprint": n.fingerprint, "software_version": n.software_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_text_cannot_drive_the_terminal() {
        assert_eq!(
            printable("plain subject\n\tindented"),
            "plain subject\n\tindented"
        );
        assert_eq!(printable("a\x1b[2Jb\r"), "a\\x1b[2Jb\\x0d");
        assert_eq!(
            printable("invoice\u{202e}fdp.exe"),
            "invoice\\u{202e}fdp.exe"
        );
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert!(matches!(printable("ok"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn times_are_ages_or_utc_dates() {
        let now = 1_795_322_400_000; // 2026-11-22 04:40:00 UTC
        assert_eq!(parse_time("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_time("2026-11-22 04:40", now), Ok(now));
        assert_eq!(parse_time("2026-11-22T04:40:00", now), Ok(now));
        assert_eq!(parse_time("1970-01-02", now), Ok(86_400_000));
        assert_eq!(
            parse_time(" yesterday", now).unwrap_err().to_string(),
            "\"yesterday\" is neither an age such as 2h or 7d nor a UTC time such as 2026-11-22 08:30"
        );
        assert!(parse_time("2026-13-01", now).is_err());
    }
}
