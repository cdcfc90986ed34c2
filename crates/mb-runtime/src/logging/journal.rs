//! Events to journald over its native protocol (systemd's JOURNAL_NATIVE_PROTOCOL).
//!
//! Written here rather than with `tracing-journald` because that crate sends to a fixed
//! socket path (so no test can stand in for journald on a machine without systemd) and
//! can only uppercase field names, not give the gateway's fields their journal names.

use std::fmt::{self, Write as _};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Where journald listens for native-protocol datagrams.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The environment variable that replaces [`JOURNAL_SOCKET`] (for tests).
pub const SOCKET_ENV: &str = "MB_JOURNAL_SOCKET";

/// The journal socket to use when stderr is systemd's journal stream: `JOURNAL_STREAM`
/// is `DEVICE:INODE` of the stream systemd connected, and only when it matches stderr
/// (a child that inherited the variable but not the stream must keep its own stderr).
pub fn socket_for_stderr() -> Option<PathBuf> {
    let stream = std::env::var("JOURNAL_STREAM").ok()?;
    let (dev, ino) = stream.split_once(':')?;
    let (dev, ino) = (dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?);
    let meta = std::fs::metadata("/proc/self/fd/2").ok()?;
    if meta.dev() != dev || meta.ino() != ino {
        return None;
    }
    Some(
        std::env::var_os(SOCKET_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(JOURNAL_SOCKET)),
    )
}

/// The journal name of a tracing field. The fields every connection line carries get the
/// names an administrator searches for; the rest are uppercased as tracing-journald does.
/// Names journald gives a meaning of its own (`MESSAGE_ID`, `PRIORITY`, ...) and names it
/// would refuse (leading digit or underscore, over 64 bytes) get an `MB_` prefix.
pub fn field_name(name: &str) -> String {
    match name {
        "client" => return "CLIENT_IP".into(),
        "id" => return "QUEUE_ID".into(),
        _ => {}
    }
    let upper: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            'A'..='Z' | '0'..='9' | '_' => c,
            _ => '_',
        })
        .collect();
    let upper = upper.trim_start_matches('_');
    const RESERVED: &[&str] = &[
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "ERRNO",
        "INVOCATION_ID",
        "USER_INVOCATION_ID",
        "SYSLOG_FACILITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_PID",
        "SYSLOG_TIMESTAMP",
        "SYSLOG_RAW",
        "DOCUMENTATION",
        "TID",
        "UNIT",
        "USER_UNIT",
        "TARGET",
    ];
    let mut out = if upper.is_empty()
        || upper.starts_with(|c: char| c.is_ascii_digit())
        || RESERVED.contains(&upper)
        || upper.starts_with("OBJECT_")
        || upper.starts_with("COREDUMP")
    {
        format!("MB_{upper}")
    } else {
        upper.to_string()
    };
    out.truncate(64);
    out
}

/// The syslog priority of a level: error 3, warning 4, info 6, debug and trace 7.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Appends one field in the native protocol: `NAME=value\n`, or, for a value with a
/// newline, `NAME\n`, its length as 64-bit little endian, the value and `\n`.
pub fn put_field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// Longest field value sent as it is: a longer one (a whole message put into a log line)
/// is cut, so what reaches the journal does not depend on the socket's buffer size.
pub const MAX_VALUE: usize = 64 * 1024;

/// Longest field value on the second try, after the datagram was still too large.
const RETRY_VALUE: usize = 2 * 1024;

/// The send buffer asked for: a datagram's limit is the socket's send buffer (about
/// 200 KiB by default, net.core.wmem_default), and journald's own client raises it the
/// same way. Without privileges the kernel grants at most net.core.wmem_max.
const SEND_BUFFER: usize = 8 << 20;

/// A `tracing_subscriber` layer sending each event as one journal entry.
pub struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
    identifier: &'static str,
    /// Entries that could not be sent, reported in the next one sent and by `dropped`.
    dropped: std::sync::atomic::AtomicU64,
    unreported: std::sync::atomic::AtomicU64,
}

/// `value` cut to at most `max` bytes (at a character boundary), marked as cut.
fn cut(value: &[u8], max: usize) -> std::borrow::Cow<'_, [u8]> {
    if value.len() <= max {
        return value.into();
    }
    let mut end = max;
    // Cut at a UTF-8 boundary: never in the middle of a character's continuation bytes.
    while end > 0 && value[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    let mut out = value[..end].to_vec();
    out.extend_from_slice(format!(" [cut at {end} bytes]").as_bytes());
    out.into()
}

impl JournalLayer {
    /// Checks that the journal answers at `path` (an empty datagram, which journald
    /// ignores) so that the caller can fall back to stderr when it does not.
    pub fn connect(identifier: &'static str, path: &Path) -> io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        // SO_SNDBUFFORCE passes wmem_max when privileged; SO_SNDBUF up to it otherwise.
        use nix::sys::socket::{setsockopt, sockopt};
        if setsockopt(&socket, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
            let _ = setsockopt(&socket, sockopt::SndBuf, &SEND_BUFFER);
        }
        socket.send_to(&[], path)?;
        Ok(JournalLayer {
            socket,
            path: path.to_path_buf(),
            identifier,
            dropped: 0.into(),
            unreported: 0.into(),
        })
    }

    /// Entries lost so far (too large for the socket even cut down, or refused).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends the entry made of `fields` (name, value; MESSAGE among them). Values are cut
    /// to `MAX_VALUE`; on EMSGSIZE, all of them to `RETRY_VALUE`; a failure then is
    /// counted and reported as `MB_JOURNAL_DROPPED` in the next entry that gets through.
    fn send(&self, fields: &[(String, Vec<u8>)]) {
        use std::sync::atomic::Ordering;
        let build = |max: usize| {
            let mut entry = Vec::with_capacity(1024);
            for (name, value) in fields {
                put_field(&mut entry, name, &cut(value, max));
            }
            let lost = self.unreported.load(Ordering::Relaxed);
            if lost > 0 {
                put_field(
                    &mut entry,
                    "MB_JOURNAL_DROPPED",
                    lost.to_string().as_bytes(),
                );
            }
            (entry, lost)
        };
        let (entry, lost) = build(MAX_VALUE);
        let mut result = self.socket.send_to(&entry, &self.path);
        if matches!(&result, Err(e) if e.raw_os_error() == Some(nix::libc::EMSGSIZE)) {
            let (entry, _) = build(RETRY_VALUE);
            result = self.socket.send_to(&entry, &self.path);
        }
        match result {
            Ok(_) => {
                self.unreported.fetch_sub(lost, Ordering::Relaxed);
            }
            // Nothing to report an error to but the journal itself: counted, and said in
            // the next entry.
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.unreported.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The fields of a span, kept in its extensions for the events inside it.
struct SpanFields(Vec<(String, String)>);

/// Collects `message` and the other fields of an event or span.
#[derive(Default)]
struct Collect {
    message: Option<String>,
    fields: Vec<(String, String)>,
}

impl Visit for Collect {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_string());
        } else {
            self.fields
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = Some(text);
        } else {
            self.fields.push((field.name().to_string(), text));
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut collect = Collect::default();
        attrs.record(&mut collect);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(collect.fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut collect = Collect::default();
        values.record(&mut collect);
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            fields.0.extend(collect.fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut collect = Collect::default();
        event.record(&mut collect);
        let mut all = collect.fields;
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    all.extend(fields.0.iter().cloned());
                }
            }
        }
        // MESSAGE reads like the text line without its time, level and daemon (journald
        // records those itself): the message, then key=value, so `journalctl` shows the
        // client address and fail2ban's filter matches the same words.
        let mut message = collect.message.unwrap_or_default();
        for (name, value) in &all {
            if value.contains([' ', '"', '=']) || value.is_empty() {
                let _ = write!(message, " {name}={value:?}");
            } else {
                let _ = write!(message, " {name}={value}");
            }
        }
        let meta = event.metadata();
        let mut fields: Vec<(String, Vec<u8>)> = Vec::with_capacity(8 + all.len());
        fields.push((
            "PRIORITY".into(),
            priority(meta.level()).to_string().into_bytes(),
        ));
        fields.push((
            "SYSLOG_IDENTIFIER".into(),
            self.identifier.as_bytes().to_vec(),
        ));
        fields.push(("TARGET".into(), meta.target().as_bytes().to_vec()));
        if let Some(file) = meta.file() {
            fields.push(("CODE_FILE".into(), file.as_bytes().to_vec()));
        }
        if let Some(line) = meta.line() {
            fields.push(("CODE_LINE".into(), line.to_string().into_bytes()));
        }
        for (name, value) in all {
            fields.push((field_name(&name), value.into_bytes()));
        }
        fields.push(("MESSAGE".into(), message.into_bytes()));
        self.send(&fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn field_names_follow_the_journal_rules() {
        for (tracing, journal) in [
            ("client", "CLIENT_IP"),
            ("id", "QUEUE_ID"),
            ("quarantine_id", "QUARANTINE_ID"),
            ("cause", "CAUSE"),
            ("message_id", "MB_MESSAGE_ID"),
            ("priority", "MB_PRIORITY"),
            ("_private", "PRIVATE"),
            ("elapsed.ms", "ELAPSED_MS"),
            ("2fa", "MB_2FA"),
        ] {
            assert_eq!(field_name(tracing), journal, "{tracing}");
        }
        assert_eq!(field_name(&"x".repeat(80)).len(), 64);
    }

    #[test]
    fn values_with_a_newline_take_the_binary_form() {
        let mut buf = Vec::new();
        put_field(&mut buf, "A", b"one line");
        put_field(&mut buf, "B", b"two\nlines");
        let mut want = b"A=one line\nB\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(buf, want);
    }

    /// The datagrams a layer sends to a stand-in socket while `emit` logs.
    fn sent(emit: impl FnOnce()) -> Vec<Vec<u8>> {
        use tracing_subscriber::layer::SubscriberExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let journal = UnixDatagram::bind(&path).unwrap();
        journal.set_nonblocking(true).unwrap();
        let layer = JournalLayer::connect("mb-test", &path).unwrap();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        let mut out = Vec::new();
        let mut buf = vec![0; 512 * 1024];
        while let Ok(n) = journal.recv(&mut buf) {
            if n > 0 {
                out.push(buf[..n].to_vec());
            }
        }
        out
    }

    #[test]
    fn entries_carry_priority_identifier_fields_and_span_fields() {
        let got = sent(|| {
            let span = tracing::info_span!("session", client = "192.0.2.7");
            let _in = span.enter();
            tracing::warn!(id = "4F2A", reason = "two words", "refused");
        });
        assert_eq!(got.len(), 1);
        let text = String::from_utf8_lossy(&got[0]);
        for line in [
            "PRIORITY=4\n",
            "SYSLOG_IDENTIFIER=mb-test\n",
            "QUEUE_ID=4F2A\n",
            "REASON=two words\n",
            "CLIENT_IP=192.0.2.7\n",
            "MESSAGE=refused id=4F2A reason=\"two words\" client=192.0.2.7\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text:?}");
        }
    }

    /// Whatever net.core.wmem_default is: a huge message and a huge field are both cut
    /// to `MAX_VALUE` (the journal's socket need not be the limit).
    #[test]
    fn a_message_or_field_over_the_limit_is_cut_not_lost() {
        let got = sent(|| {
            tracing::error!(body = %"y".repeat(400 * 1024), "{}", "x".repeat(400 * 1024));
        });
        assert_eq!(got.len(), 1);
        let text = String::from_utf8_lossy(&got[0]);
        assert!(text.contains("PRIORITY=3\n"), "{}", &text[..200]);
        assert!(
            text.contains(&format!(
                "\nBODY={} [cut at 65536 bytes]\n",
                "y".repeat(MAX_VALUE)
            )),
            "the field is cut"
        );
        assert!(
            text.ends_with(" [cut at 65536 bytes]\n"),
            "{}",
            &text[text.len() - 60..]
        );
        assert!(got[0].len() < 3 * MAX_VALUE, "{}", got[0].len());
    }

    /// A send buffer too small even for the cut entry: the entry is counted as dropped
    /// and the next one that gets through says how many were lost.
    #[test]
    fn entries_that_cannot_be_sent_are_counted_and_reported() {
        use nix::sys::socket::{setsockopt, sockopt};
        use tracing_subscriber::layer::SubscriberExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let journal = UnixDatagram::bind(&path).unwrap();
        journal.set_nonblocking(true).unwrap();
        let layer = Arc::new(JournalLayer::connect("mb-test", &path).unwrap());
        // The kernel's minimum (it doubles the value asked for, to about 4.6 KiB at least).
        setsockopt(&layer.socket, sockopt::SndBuf, &1024).unwrap();
        let many: Vec<String> = (0..16).map(|i| format!("{i}").repeat(4096)).collect();
        let shared = SharedLayer(layer.clone());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(shared), || {
            tracing::warn!(
                a = %many[0], b = %many[1], c = %many[2], d = %many[3], e = %many[4],
                f = %many[5], g = %many[6], h = %many[7], "too many long fields"
            );
            tracing::warn!("short");
        });
        assert_eq!(layer.dropped(), 1);
        let mut buf = vec![0; 64 * 1024];
        // The empty datagram `connect` sends first.
        assert_eq!(journal.recv(&mut buf).unwrap(), 0);
        let n = journal.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.contains("MESSAGE=short\n"), "{text}");
        assert!(text.contains("MB_JOURNAL_DROPPED=1\n"), "{text}");
        assert!(journal.recv(&mut buf).is_err(), "nothing else arrived");
    }

    /// The layer behind an `Arc`, so the test keeps a handle to read its counter.
    struct SharedLayer(Arc<JournalLayer>);

    impl<S> tracing_subscriber::Layer<S> for SharedLayer
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            self.0.on_new_span(attrs, id, ctx);
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            self.0.on_event(event, ctx);
        }
    }

    #[test]
    fn without_a_journal_the_layer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(JournalLayer::connect("mb-test", &dir.path().join("none")).is_err());
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(
            [
                Level::ERROR,
                Level::WARN,
                Level::INFO,
                Level::DEBUG,
                Level::TRACE
            ]
            .map(|l| priority(&l)),
            [3, 4, 6, 7, 7]
        );
    }
}
