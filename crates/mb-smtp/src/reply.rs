//! Replies, both ways and without I/O: `Reply` is what we send (one wire encoder, which
//! strips control characters so no text can forge a line), `ReplyParser` reads what a
//! server sends line by line, and `Capabilities` is what an EHLO/LHLO reply offers.

use std::fmt;

pub use mb_core::EnhancedStatus;

/// A reply we send: code, enhanced status code (none on the greeting and EHLO), text.
/// Text may hold several lines separated by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: Option<EnhancedStatus>,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, status: EnhancedStatus, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: Some(status),
            text: text.into(),
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO, HELO).
    pub fn bare(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: None,
            text: text.into(),
        }
    }

    /// The wire form, one or more lines each ending in CRLF. Control characters in the
    /// text become spaces, so a reply can never end early or add a line of its own.
    pub fn to_wire(&self) -> String {
        let lines: Vec<&str> = self.text.split('\n').collect();
        let mut out = String::with_capacity(self.text.len() + 16 * lines.len());
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&self.code.to_string());
            out.push(sep);
            if let Some(status) = self.status {
                out.push_str(&status.to_string());
                out.push(' ');
            }
            out.extend(line.chars().map(clean));
            out.push_str("\r\n");
        }
        out
    }

    /// The reply as a milter REPLYCODE wants it: one line without CRLF, `%` doubled
    /// (Postfix and libmilter treat the text as a format).
    pub fn to_milter(&self) -> String {
        let mut out = self.code.to_string();
        out.push(' ');
        if let Some(status) = self.status {
            out.push_str(&status.to_string());
            out.push(' ');
        }
        for c in self.text.replace('\n', " / ").chars().map(clean) {
            if c == '%' {
                out.push('%');
            }
            out.push(c);
        }
        out
    }

    pub fn is_error(&self) -> bool {
        self.code >= 400
    }
}

fn clean(c: char) -> char {
    if c.is_control() { ' ' } else { c }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(status) = self.status {
            write!(f, " {status}")?;
        }
        write!(f, " {}", self.text.replace('\n', " / "))
    }
}

/// A reply from a server: its code and text lines (the enhanced status code, when the
/// server sent one, stays at the start of each line's text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Response {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// A 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The reply as one line, for logs and the queue's "last error".
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }

    /// The enhanced status code at the start of the first line, if the server sent one
    /// whose class matches the reply code.
    pub fn status(&self) -> Option<EnhancedStatus> {
        let first = self.lines.first()?;
        let word = first.split(' ').next()?;
        word.parse::<EnhancedStatus>()
            .ok()
            .filter(|s| s.fits(self.code))
    }
}

/// Why a server's reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply {0:?}")]
    Malformed(String),
    #[error("reply codes differ within one reply")]
    MixedCodes,
    #[error("reply has too many lines")]
    TooManyLines,
}

/// Most lines in one reply.
pub const MAX_REPLY_LINES: usize = 100;
/// Longest reply line accepted from a server.
pub const MAX_REPLY_LINE: usize = 4096;

/// Reads a (possibly multi-line) reply one line at a time (without its CRLF).
#[derive(Debug, Default)]
pub struct ReplyParser {
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// Feeds one line; `Some` when the reply is complete.
    pub fn line(&mut self, line: &[u8]) -> Result<Option<Response>, ReplyError> {
        let text = String::from_utf8_lossy(line);
        let this: u16 = text
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse().ok())
            .filter(|c| (200..600).contains(c))
            .ok_or_else(|| ReplyError::Malformed(text.to_string()))?;
        if *self.code.get_or_insert(this) != this {
            return Err(ReplyError::MixedCodes);
        }
        let sep = text.as_bytes().get(3).copied();
        self.lines.push(text.get(4..).unwrap_or("").to_string());
        if self.lines.len() > MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        match sep {
            Some(b'-') => Ok(None),
            None | Some(b' ') => {
                self.code = None;
                Ok(Some(Response {
                    code: this,
                    lines: std::mem::take(&mut self.lines),
                }))
            }
            Some(_) => Err(ReplyError::Malformed(text.to_string())),
        }
    }
}

/// What the server offered after EHLO/LHLO.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub chunking: bool,
    pub enhanced_status_codes: bool,
    /// AUTH mechanisms offered, upper case.
    pub auth: Vec<String>,
    /// XFORWARD attributes offered, upper case.
    pub xforward: Vec<String>,
}

impl Capabilities {
    /// The keywords of a 250 reply to EHLO/LHLO (the first line is the greeting).
    pub fn from_ehlo(r: &Response) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in r.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("PIPELINING") => caps.pipelining = true,
                Some("STARTTLS") => caps.starttls = true,
                Some("8BITMIME") => caps.eightbitmime = true,
                Some("SMTPUTF8") => caps.smtputf8 = true,
                Some("DSN") => caps.dsn = true,
                Some("CHUNKING") => caps.chunking = true,
                Some("ENHANCEDSTATUSCODES") => caps.enhanced_status_codes = true,
                Some("AUTH") => caps.auth = words.map(str::to_ascii_uppercase).collect(),
                Some("XFORWARD") => caps.xforward = words.map(str::to_ascii_uppercase).collect(),
                Some("SIZE") => {
                    caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                }
                _ => {}
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REJECT: EnhancedStatus = EnhancedStatus::POLICY_REJECT;

    #[test]
    fn replies_encode_once_and_cannot_forge_lines() {
        assert_eq!(Reply::bare(250, "a\nb").to_wire(), "250-a\r\n250 b\r\n");
        assert_eq!(Reply::new(550, REJECT, "no").to_wire(), "550 5.7.1 no\r\n");
        // A CR, NUL or escape in the text (a filter's or next hop's words) is a space.
        assert_eq!(
            Reply::new(550, REJECT, "x\r250 ok\x00\x1b[2J").to_wire(),
            "550 5.7.1 x 250 ok  [2J\r\n"
        );
        assert_eq!(
            Reply::new(550, REJECT, "100% spam\r\nand more").to_milter(),
            "550 5.7.1 100%% spam  / and more"
        );
        assert_eq!(
            Reply::new(451, EnhancedStatus::POLICY_TEMPFAIL, "later").to_string(),
            "451 4.7.1 later"
        );
    }

    fn parse(lines: &[&str]) -> Result<Option<Response>, ReplyError> {
        let mut p = ReplyParser::default();
        let mut last = None;
        for l in lines {
            last = p.line(l.as_bytes())?;
        }
        Ok(last)
    }

    #[test]
    fn server_replies_parse_strictly() {
        let r = parse(&["250-mx.example", "250-PIPELINING", "250 SIZE 1000"])
            .unwrap()
            .unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines.len(), 3);
        let caps = Capabilities::from_ehlo(&r);
        assert!(caps.pipelining && caps.size == Some(1000) && !caps.starttls);
        assert_eq!(parse(&["250-a"]).unwrap(), None);
        assert!(matches!(
            parse(&["250-a", "251 b"]),
            Err(ReplyError::MixedCodes)
        ));
        for bad in ["", "25", "abc def", "199 x", "600 x", "250xok", "+50 x"] {
            assert!(
                matches!(parse(&[bad]), Err(ReplyError::Malformed(_))),
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_REPLY_LINES).map(|_| "250-x".to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(parse(&many), Err(ReplyError::TooManyLines)));
        let r = parse(&["550 5.1.1 no such user"]).unwrap().unwrap();
        assert_eq!(r.status(), Some(EnhancedStatus::new(5, 1, 1)));
        // A status whose class disagrees with the code is not believed.
        let r = parse(&["550 4.1.1 odd"]).unwrap().unwrap();
        assert_eq!(r.status(), None);
    }
}
