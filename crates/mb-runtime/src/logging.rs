//! Log lines for people and fail2ban: `YYYY-MM-DD HH:MM:SS [LEVEL] daemon: message key=value`,
//! or, under systemd, journal entries with a priority and structured fields.
//!
//! Times are UTC so that lines from several nodes sort together. JSON lines are available
//! for log collectors (`log.format = "json"` or `--log-format json`). With `log.files`,
//! each line also goes to `paths.log_dir/DAEMON.log`, reopened on SIGHUP ([`reopen`]) so
//! that logrotate can move the file away.
//!
//! When systemd connected stderr to the journal (`JOURNAL_STREAM` names stderr's device
//! and inode, as systemd.exec(5) documents), events go to journald over its native
//! protocol instead ([`journal`]): `PRIORITY` from the level, `SYSLOG_IDENTIFIER` the
//! daemon, and each tracing field as an uppercase journal field (`client` as `CLIENT_IP`,
//! `id` as `QUEUE_ID`), so `journalctl -p warning` and `journalctl CLIENT_IP=...` work.
//! The journal socket is `/run/systemd/journal/socket`; the environment variable
//! `MB_JOURNAL_SOCKET` replaces that path (tests use a stand-in journal). Where the
//! socket cannot be reached the text line on stderr is kept.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

pub mod journal;

/// Installs the global subscriber writing to stderr, or to the journal under systemd.
/// `RUST_LOG`, when set, overrides `level`. Calling it twice is harmless.
pub fn init(daemon: &'static str, level: &str, json: bool) {
    init_with_file(daemon, level, json, None);
}

/// Prints a start-up failure on stderr for whoever started the daemon, unless the journal
/// already has it as an entry of its own. Under systemd, before logging is set up (a
/// configuration error), the line gets sd-daemon(3)'s `<3>` prefix so that the journal
/// files it at priority error rather than at the stream's info.
pub fn print_error(daemon: &str, line: &str) {
    if !TO_STDERR.load(Ordering::Relaxed) {
        return;
    }
    if journal::socket_for_stderr().is_some() {
        eprintln!("<3>{daemon}: {line}");
    } else {
        eprintln!("{daemon}: {line}");
    }
}

/// The log file a daemon appends to besides stderr, when `log.files` asks for one.
struct LogFile {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Reopens the log file (after logrotate moved it); `None` when there is none. On an
/// error the lines go to stderr only until the next reopen.
pub fn reopen() -> Option<io::Result<PathBuf>> {
    let log = LOG_FILE.get()?;
    let (file, result) = match open_append(&log.path) {
        Ok(f) => (Some(f), Ok(log.path.clone())),
        Err(e) => (None, Err(e)),
    };
    if let Ok(mut f) = log.file.lock() {
        *f = file;
    }
    Some(result)
}

/// Where each formatted event goes: stderr, and the log file when there is one. The
/// formatter hands over a whole line in one `write`, and the file is opened for
/// appending, so lines from the workers of one program sharing a file do not interleave.
struct Output;

/// Off when the journal takes the events: the line then goes to the log file only.
static TO_STDERR: AtomicBool = AtomicBool::new(true);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = if TO_STDERR.load(Ordering::Relaxed) {
            io::stderr().write_all(buf)
        } else {
            Ok(())
        };
        if let Some(log) = LOG_FILE.get()
            && let Ok(mut f) = log.file.lock()
            && let Some(file) = f.as_mut()
        {
            let _ = file.write_all(buf);
        }
        written.map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Like [`init`], also appending every line to `file` (created, with its directory,
/// when missing). A file that cannot be opened is reported on stderr and left out.
pub fn init_with_file(daemon: &'static str, level: &str, json: bool, file: Option<PathBuf>) {
    if let Some(path) = file {
        let opened = match open_append(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("{daemon}: cannot open the log file {}: {e}", path.display());
                None
            }
        };
        let _ = LOG_FILE.set(LogFile {
            path,
            file: Mutex::new(opened),
        });
    }
    // hickory logs every failed DNSSEC proof and server hiccup at WARN and ERROR, once per
    // query; the daemons report what a failed lookup means (an SPF temperror, a deferred
    // delivery) themselves, so hickory's own lines are left to RUST_LOG.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},hickory_proto=off,hickory_net=off,hickory_resolver=off"
        ))
    });
    let journal = journal::socket_for_stderr().and_then(|path| {
        match journal::JournalLayer::connect(daemon, &path) {
            Ok(layer) => Some(layer),
            Err(e) => {
                // Under systemd without a reachable journal (a container, a test machine):
                // stderr still reaches whoever reads it.
                eprintln!(
                    "{daemon}: cannot reach the journal at {}: {e}; logging text lines to stderr",
                    path.display()
                );
                None
            }
        }
    });
    let has_file = LOG_FILE.get().is_some();
    if journal.is_some() {
        TO_STDERR.store(false, Ordering::Relaxed);
    }
    // The formatted line goes to stderr when there is no journal, and to the log file when
    // `log.files` asks for one.
    let lines = (journal.is_none() || has_file).then(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(|| Output)
            .with_ansi(false);
        if json {
            let inner = tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false);
            layer
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(JsonFormat { daemon, inner })
                .boxed()
        } else {
            layer.event_format(LineFormat { daemon }).boxed()
        }
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(lines)
        .try_init();
}

/// The text line format of the blueprint.
pub struct LineFormat {
    pub daemon: &'static str,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = event.metadata().level().as_str();
        write!(
            w,
            "{} [{level}] {}: ",
            timestamp(SystemTime::now()),
            self.daemon
        )?;
        ctx.format_fields(w.by_ref(), event)?;
        // Fields of the enclosing spans (session=..., client=...) follow the message.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(w, " {fields}")?;
                }
            }
        }
        writeln!(w)
    }
}

/// JSON lines with the daemon's name as their first field, so a collector that mixes
/// several daemons' output can tell them apart.
pub struct JsonFormat<F> {
    pub daemon: &'static str,
    pub inner: F,
}

impl<S, N, F> FormatEvent<S, N> for JsonFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(w, "{{\"daemon\":\"{}\",{rest}", self.daemon),
            None => w.write_str(&line),
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps() {
        let at = |s| timestamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(at(1_795_300_000), "2026-11-21 22:26:40");
        assert_eq!(at(4_107_542_399), "2100-02-28 23:59:59");
    }
}
