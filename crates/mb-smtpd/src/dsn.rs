//! Delivery status notifications (RFC 3464, RFC 3461, RFC 6522): the bounce, the delay
//! warning and the success notice sent to a message's sender, as a
//! `multipart/report; report-type=delivery-status` with a human-readable part, the
//! machine-readable `message/delivery-status` part and the returned message (whole, or
//! only its headers for `RET=HDRS`, delay warnings, success notices and large messages).

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::session::rfc5322_date;
use crate::spool::Envelope;

/// Largest message returned whole in a bounce (as Postfix's bounce_size_limit); above
/// it only the headers go back.
pub const RETURN_LIMIT: usize = 50 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    /// Delivered to the final destination (LMTP).
    Delivered,
    /// Handed to a next hop that does not speak DSN (RFC 3461 §4.1 "relayed").
    Relayed,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }

    /// The NOTIFY keyword that asks for this notice.
    pub fn notify_word(self) -> &'static str {
        match self {
            Action::Failed => "FAILURE",
            Action::Delayed => "DELAY",
            Action::Delivered | Action::Relayed => "SUCCESS",
        }
    }
}

/// Whether a recipient's NOTIFY asks for a notice of this kind. Without NOTIFY, failures
/// and delays are reported (RFC 3461 §4.1 leaves DELAY to the MTA; Postfix does the same
/// when delay warnings are on), successes are not.
pub fn wanted(notify: &str, action: Action) -> bool {
    if notify.is_empty() {
        return matches!(action, Action::Failed | Action::Delayed);
    }
    notify.split(',').any(|w| w == action.notify_word())
}

/// One recipient's line in the report.
#[derive(Debug, Clone)]
pub struct Report {
    pub address: String,
    /// The ORCPT parameter as received (`rfc822;` + xtext), or empty.
    pub orcpt: String,
    pub action: Action,
    /// The reply or reason, e.g. `550 5.1.1 no such user`.
    pub diagnostic: String,
    /// `dns; host` of the server that answered, or empty.
    pub remote_mta: String,
}

/// The enhanced status code (RFC 3463) of a reply text, or one made from its class.
pub fn status_of(diagnostic: &str, action: Action) -> String {
    let mut words = diagnostic.split_ascii_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(s) = words.next()
        && s.split('.').count() == 3
        && s.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && (s.starts_with('2') || s.starts_with('4') || s.starts_with('5'))
    {
        return s.to_string();
    }
    match (action, code.as_bytes().first()) {
        (Action::Delivered | Action::Relayed, _) => "2.0.0".into(),
        (Action::Delayed, _) | (_, Some(b'4')) => "4.0.0".into(),
        _ => "5.0.0".into(),
    }
}

/// Decodes RFC 3461 xtext (`+XX` hex escapes).
pub fn xtext_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'+'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A header field value made safe: no CR/LF can split it into two fields.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect()
}

fn header_section(message: &[u8]) -> &[u8] {
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message, |p| &message[..p + 2])
}

/// The message a notice is about, as much of it as the caller holds.
#[derive(Debug, Clone, Copy)]
pub enum Original<'a> {
    /// The whole message (a small one, read whole for delivery).
    Whole(&'a [u8]),
    /// Only its header section: a message larger than `RETURN_LIMIT` is streamed from
    /// the spool for delivery and never read whole, and it would be returned with its
    /// headers only anyway.
    Headers(&'a [u8]),
}

/// Builds the notice for `reports` (all of one action) about the message `env`.
/// `until` is the time retries end (for delay warnings).
pub fn build(
    hostname: &str,
    env: &Envelope,
    original: Original<'_>,
    reports: &[Report],
    now: SystemTime,
    until: Option<SystemTime>,
) -> Vec<u8> {
    let action = reports.first().map_or(Action::Failed, |r| r.action);
    let boundary = format!("{}.{}/{}", env.id, action.name(), hostname);
    let subject = match action {
        Action::Failed => "Undelivered Mail Returned to Sender",
        Action::Delayed => "Delayed Mail (still being retried)",
        Action::Delivered | Action::Relayed => "Successful Mail Delivery Report",
    };
    let mut m = String::new();
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{}>\r\n\
         Subject: {subject}\r\n\
         Date: {}\r\n\
         Message-ID: <{}.{}@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n",
        clean(&env.sender),
        rfc5322_date(now),
        env.id,
        action.name(),
    );
    let intro = match action {
        Action::Failed => format!(
            "This is the mail system at host {hostname}.\r\n\r\n\
             I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n"
        ),
        Action::Delayed => format!(
            "This is the mail system at host {hostname}.\r\n\r\n\
             Your message could not be delivered yet. It will be retried until it is\r\n\
             {} old; you do not need to send it again.\r\n",
            until
                .map(|u| format!("returned undelivered on {}", rfc5322_date(u)))
                .unwrap_or_else(|| "too".into())
        ),
        _ => format!(
            "This is the mail system at host {hostname}.\r\n\r\n\
             Your message was successfully delivered to the destination(s) listed below.\r\n"
        ),
    };
    m.push_str(&intro);
    m.push_str("\r\n");
    for r in reports {
        let _ = write!(m, "<{}>: {}\r\n", clean(&r.address), clean(&r.diagnostic));
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Mailborder-Queue-ID: {}\r\n",
        env.id
    );
    if !env.envid.is_empty() {
        let _ = write!(
            m,
            "Original-Envelope-Id: {}\r\n",
            clean(&xtext_decode(&env.envid))
        );
    }
    if !env.sender.is_empty() {
        let _ = write!(m, "X-Original-Sender: rfc822; {}\r\n", clean(&env.sender));
    }
    let arrival = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(env.received_at);
    let _ = write!(m, "Arrival-Date: {}\r\n", rfc5322_date(arrival));
    for r in reports {
        m.push_str("\r\n");
        if let Some((kind, addr)) = r.orcpt.split_once(';') {
            let _ = write!(
                m,
                "Original-Recipient: {}; {}\r\n",
                clean(kind),
                clean(&xtext_decode(addr))
            );
        }
        let _ = write!(
            m,
            "Final-Recipient: rfc822; {}\r\n\
             Action: {}\r\n\
             Status: {}\r\n",
            clean(&r.address),
            r.action.name(),
            status_of(&r.diagnostic, r.action),
        );
        if !r.remote_mta.is_empty() {
            let _ = write!(m, "Remote-MTA: {}\r\n", clean(&r.remote_mta));
        }
        if !r.diagnostic.is_empty() {
            let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", clean(&r.diagnostic));
        }
        let _ = write!(m, "Last-Attempt-Date: {}\r\n", rfc5322_date(now));
        if let (Action::Delayed, Some(u)) = (r.action, until) {
            let _ = write!(m, "Will-Retry-Until: {}\r\n", rfc5322_date(u));
        }
    }
    let (message, whole) = match original {
        Original::Whole(m) => (m, true),
        Original::Headers(h) => (h, false),
    };
    let full =
        whole && action == Action::Failed && env.ret != "HDRS" && message.len() <= RETURN_LIMIT;
    let mut out = m.into_bytes();
    if full {
        let _ = write_part(&mut out, &boundary, "Undelivered Message", "message/rfc822");
        out.extend_from_slice(message);
        if !message.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    } else {
        let _ = write_part(
            &mut out,
            &boundary,
            "Message Headers",
            "text/rfc822-headers",
        );
        out.extend_from_slice(header_section(message));
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

fn write_part(out: &mut Vec<u8>, boundary: &str, description: &str, ctype: &str) -> usize {
    let head = format!(
        "\r\n--{boundary}\r\nContent-Description: {description}\r\nContent-Type: {ctype}\r\n\r\n"
    );
    out.extend_from_slice(head.as_bytes());
    head.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Recipient;
    use mail_parser::MimeHeaders;

    fn env() -> Envelope {
        Envelope {
            id: "ABC123".into(),
            received_at: 1_700_000_000,
            sender: "alice@sender.example".into(),
            recipients: vec![Recipient {
                address: "bob@dest.example".into(),
                notify: String::new(),
                orcpt: "rfc822;bob+2Bx@dest.example".into(),
            }],
            envid: "env+2B1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_bounce_is_a_correct_multipart_report() {
        let msg = b"Subject: hello\r\nMessage-ID: <1@x>\r\n\r\nbody line\r\n";
        let reports = [Report {
            address: "bob@dest.example".into(),
            orcpt: "rfc822;bob+2Bx@dest.example".into(),
            action: Action::Failed,
            diagnostic: "550 5.1.1 <bob@dest.example>: no such user".into(),
            remote_mta: "dns; mx.dest.example".into(),
        }];
        let out = build(
            "gw.example",
            &env(),
            Original::Whole(msg),
            &reports,
            SystemTime::now(),
            None,
        );
        let parsed = mail_parser::MessageParser::default()
            .parse(&out)
            .expect("parses");
        assert_eq!(
            parsed.subject(),
            Some("Undelivered Mail Returned to Sender")
        );
        let ct = parsed.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(
            parsed.parts.len(),
            4,
            "root, text, delivery-status, message"
        );
        let status = String::from_utf8_lossy(parsed.parts[2].contents()).into_owned();
        assert_eq!(
            parsed.parts[2].content_type().unwrap().subtype(),
            Some("delivery-status")
        );
        for want in [
            "Reporting-MTA: dns; gw.example",
            "Original-Envelope-Id: env+1",
            "Original-Recipient: rfc822; bob+x@dest.example",
            "Final-Recipient: rfc822; bob@dest.example",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; mx.dest.example",
            "Diagnostic-Code: smtp; 550 5.1.1",
        ] {
            assert!(status.contains(want), "{want:?} missing in {status}");
        }
        let returned = parsed.parts[3].message().expect("message/rfc822 part");
        assert_eq!(returned.subject(), Some("hello"));

        // RET=HDRS and delay warnings return the headers only.
        let mut e = env();
        e.ret = "HDRS".into();
        let out = build(
            "gw.example",
            &e,
            Original::Whole(msg),
            &reports,
            SystemTime::now(),
            None,
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("text/rfc822-headers") && !text.contains("body line"));
        // A large message, streamed for delivery, is known by its headers only: a
        // bounce returns them, whatever RET says.
        let out = build(
            "gw.example",
            &env(),
            Original::Headers(b"Subject: hello\r\nMessage-ID: <1@x>\r\n"),
            &reports,
            SystemTime::now(),
            None,
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("text/rfc822-headers"), "{text}");
        assert!(text.contains("Message-ID: <1@x>\r\n\r\n--"), "{text}");
        assert!(!text.contains("message/rfc822"), "{text}");
        let delayed = [Report {
            action: Action::Delayed,
            diagnostic: "451 4.3.0 try later".into(),
            ..reports[0].clone()
        }];
        let until = SystemTime::now() + std::time::Duration::from_secs(3600);
        let out = build(
            "gw.example",
            &env(),
            Original::Whole(msg),
            &delayed,
            SystemTime::now(),
            Some(until),
        );
        let parsed = mail_parser::MessageParser::default().parse(&out).unwrap();
        let status = String::from_utf8_lossy(parsed.parts[2].contents()).into_owned();
        assert!(status.contains("Action: delayed") && status.contains("Status: 4.3.0"));
        assert!(status.contains("Will-Retry-Until: "));
    }

    #[test]
    fn notify_and_status_rules() {
        assert!(wanted("", Action::Failed) && wanted("", Action::Delayed));
        assert!(!wanted("", Action::Relayed));
        assert!(!wanted("NEVER", Action::Failed));
        assert!(wanted("SUCCESS,FAILURE", Action::Relayed));
        assert!(!wanted("FAILURE", Action::Delayed));
        assert_eq!(status_of("550 no such user", Action::Failed), "5.0.0");
        assert_eq!(status_of("connection refused", Action::Delayed), "4.0.0");
        assert_eq!(status_of("452 4.2.2 full", Action::Delayed), "4.2.2");
        assert_eq!(xtext_decode("a+2Bb+3D"), "a+b=");
        assert_eq!(xtext_decode("trail+4"), "trail+4");
    }
}
