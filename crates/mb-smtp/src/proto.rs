//! SMTP commands and paths (RFC 5321 §4.1), parsed strictly and without I/O.
//!
//! Anything odd is refused rather than guessed at: source routes, `%` and `!` routing,
//! quoted local parts that hide an `@`, trailing dots, empty labels, control bytes.
//! Parsers never panic; every error carries the reply the client gets.

use std::fmt;

pub use crate::reply::{EnhancedStatus, Reply};

/// A mailbox `local@domain`, checked. The domain is lowercase ASCII (or UTF-8 when the
/// client used SMTPUTF8); the local part keeps its case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    pub local: String,
    pub domain: String,
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

impl Mailbox {
    /// Whether the domain is an address literal (`[192.0.2.1]`).
    pub fn is_literal(&self) -> bool {
        self.domain.starts_with('[')
    }
}

/// MAIL FROM and RCPT TO parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub size: Option<u64>,
    /// `BODY=7BIT` or `BODY=8BITMIME`.
    pub body: Option<String>,
    pub smtputf8: bool,
    /// DSN (RFC 3461): RET, ENVID on MAIL; NOTIFY, ORCPT on RCPT. Kept for delivery.
    pub ret: Option<String>,
    pub envid: Option<String>,
    pub notify: Option<String>,
    pub orcpt: Option<String>,
    pub auth: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// LMTP's greeting (RFC 2033); only the content filter's listener speaks LMTP.
    Lhlo(String),
    /// Postfix's XFORWARD: attribute names upper case, values xtext-decoded, and empty
    /// where Postfix says `[UNAVAILABLE]` or `[TEMPUNAVAIL]`. Only trusted listeners
    /// accept it.
    Xforward(Vec<(String, String)>),
    /// `None` is the null reverse path `<>`.
    Mail(Option<Mailbox>, Params),
    Rcpt(Mailbox, Params),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy(String),
    Expn(String),
    StartTls,
    Auth(String),
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub Reply);

fn syntax(status: EnhancedStatus, text: impl Into<String>) -> ParseError {
    ParseError(Reply::new(501, status, text))
}

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// Longest text line in DATA, CRLF included (RFC 5321 §4.5.3.1.6).
pub const MAX_TEXT_LINE: usize = 1000;

/// Parses one command line (without its CRLF). `utf8_ok` allows UTF-8 in paths (only
/// after the client asked for SMTPUTF8, which is checked again per command).
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    if line.contains(&0) {
        return Err(ParseError(Reply::new(
            500,
            EnhancedStatus::SYNTAX_ERROR,
            "Error: NUL byte in command",
        )));
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(ParseError(Reply::new(
            500,
            EnhancedStatus::SYNTAX_ERROR,
            "Error: command is not valid UTF-8",
        )));
    };
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ParseError(Reply::new(
            500,
            EnhancedStatus::SYNTAX_ERROR,
            "Error: control character in command",
        )));
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let arg = rest.trim();
    let no_arg = |c: Command| {
        if arg.is_empty() {
            Ok(c)
        } else {
            Err(syntax(
                EnhancedStatus::BAD_ARGUMENTS,
                format!("Syntax: {verb} takes no argument"),
            ))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" | "LHLO" => {
            if arg.is_empty() {
                return Err(syntax(
                    EnhancedStatus::BAD_ARGUMENTS,
                    format!("Syntax: {verb} hostname"),
                ));
            }
            let name = arg.split_whitespace().next().unwrap_or(arg);
            if !valid_helo(name) {
                return Err(syntax(
                    EnhancedStatus::SYNTAX_ERROR,
                    format!("Syntax: {verb}: invalid hostname {name:?}"),
                ));
            }
            Ok(match verb.as_str() {
                "EHLO" => Command::Ehlo(name.into()),
                "LHLO" => Command::Lhlo(name.into()),
                _ => Command::Helo(name.into()),
            })
        }
        "MAIL" => {
            let rest = strip_keyword(rest, "FROM:").ok_or_else(|| {
                syntax(EnhancedStatus::BAD_ARGUMENTS, "Syntax: MAIL FROM:<address>")
            })?;
            let (path, params) = split_path(rest)?;
            let params = parse_params(params, true)?;
            if path == "<>" {
                return Ok(Command::Mail(None, params));
            }
            Ok(Command::Mail(
                Some(parse_path(path, params.smtputf8)?),
                params,
            ))
        }
        "RCPT" => {
            let rest = strip_keyword(rest, "TO:").ok_or_else(|| {
                syntax(EnhancedStatus::BAD_ARGUMENTS, "Syntax: RCPT TO:<address>")
            })?;
            let (path, params) = split_path(rest)?;
            let params = parse_params(params, false)?;
            // Only here do we know nothing of SMTPUTF8; the session checks it against MAIL.
            let mailbox = if path.eq_ignore_ascii_case("<postmaster>") {
                Mailbox {
                    local: "postmaster".into(),
                    domain: String::new(),
                }
            } else {
                parse_path(path, true)?
            };
            Ok(Command::Rcpt(mailbox, params))
        }
        "DATA" => no_arg(Command::Data),
        "BDAT" => {
            let mut words = arg.split_ascii_whitespace();
            let size = words
                .next()
                .filter(|w| !w.is_empty() && w.len() <= 19 && w.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|w| w.parse::<u64>().ok())
                .ok_or_else(|| syntax(EnhancedStatus::BAD_ARGUMENTS, "Syntax: BDAT size [LAST]"))?;
            let last = match words.next() {
                None => false,
                Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                Some(_) => {
                    return Err(syntax(
                        EnhancedStatus::BAD_ARGUMENTS,
                        "Syntax: BDAT size [LAST]",
                    ));
                }
            };
            if words.next().is_some() {
                return Err(syntax(
                    EnhancedStatus::BAD_ARGUMENTS,
                    "Syntax: BDAT size [LAST]",
                ));
            }
            Ok(Command::Bdat { size, last })
        }
        "XFORWARD" => parse_xforward(arg),
        "RSET" => no_arg(Command::Rset),
        // NOOP may carry an argument, which is ignored (RFC 5321 §4.1.1.9).
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_arg(Command::Quit),
        "HELP" => Ok(Command::Help),
        "VRFY" if !arg.is_empty() => Ok(Command::Vrfy(arg.into())),
        "EXPN" if !arg.is_empty() => Ok(Command::Expn(arg.into())),
        "VRFY" | "EXPN" => Err(syntax(
            EnhancedStatus::BAD_ARGUMENTS,
            format!("Syntax: {verb} address"),
        )),
        "STARTTLS" => no_arg(Command::StartTls),
        "AUTH" if !arg.is_empty() => Ok(Command::Auth(arg.into())),
        "AUTH" => Err(syntax(
            EnhancedStatus::BAD_ARGUMENTS,
            "Syntax: AUTH mechanism [initial-response]",
        )),
        _ => Err(ParseError(Reply::new(
            502,
            EnhancedStatus::SYNTAX_ERROR,
            "Error: command not recognized",
        ))),
    }
}

/// `XFORWARD NAME=value ADDR=value ...` (Postfix's XFORWARD_README).
fn parse_xforward(arg: &str) -> Result<Command, ParseError> {
    let mut attrs = Vec::new();
    for attr in arg.split_ascii_whitespace() {
        let (name, value) = attr
            .split_once('=')
            .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphabetic()))
            .ok_or_else(|| {
                syntax(
                    EnhancedStatus::BAD_ARGUMENTS,
                    "Syntax: XFORWARD attribute=value ...",
                )
            })?;
        let value = xtext_decode(value);
        let value = if value == "[UNAVAILABLE]" || value == "[TEMPUNAVAIL]" {
            String::new()
        } else {
            value
        };
        attrs.push((name.to_ascii_uppercase(), value));
    }
    if attrs.is_empty() {
        return Err(syntax(
            EnhancedStatus::BAD_ARGUMENTS,
            "Syntax: XFORWARD attribute=value ...",
        ));
    }
    Ok(Command::Xforward(attrs))
}

/// Decodes xtext (RFC 3461 §4): `+XX` is the byte XX in hex; a `+` not followed by two
/// hex digits stays as it is. Bytes that do not form UTF-8 become U+FFFD.
pub fn xtext_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+'
            && let Some(n) = v
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(n);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn strip_keyword<'a>(rest: &'a str, kw: &str) -> Option<&'a str> {
    // RFC 5321 has no space before the path; many clients send one: accept it.
    let head = rest.get(..kw.len())?;
    head.eq_ignore_ascii_case(kw)
        .then(|| rest[kw.len()..].trim_start())
}

/// Splits `<path> params` (the path must be in angle brackets).
fn split_path(rest: &str) -> Result<(&str, &str), ParseError> {
    if !rest.starts_with('<') {
        return Err(syntax(
            EnhancedStatus::SYNTAX_ERROR,
            "Syntax: the address must be in angle brackets: <user@domain>",
        ));
    }
    // A quoted local part may contain '>'; find the closing bracket outside quotes.
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => {
                let after = &rest[i + 1..];
                if !after.is_empty() && !after.starts_with(' ') {
                    return Err(syntax(
                        EnhancedStatus::SYNTAX_ERROR,
                        "Syntax: garbage after the address",
                    ));
                }
                return Ok((&rest[..=i], after.trim()));
            }
            _ => {}
        }
    }
    Err(syntax(EnhancedStatus::SYNTAX_ERROR, "Syntax: missing '>'"))
}

/// Parses `<local@domain>` and refuses every routing trick.
pub fn parse_path(path: &str, utf8: bool) -> Result<Mailbox, ParseError> {
    let inner = path
        .strip_prefix('<')
        .and_then(|p| p.strip_suffix('>'))
        .ok_or_else(|| syntax(EnhancedStatus::BAD_ADDRESS, "Bad address syntax"))?;
    if inner.is_empty() {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: empty address",
        ));
    }
    if inner.starts_with('@') {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: source routes are not accepted",
        ));
    }
    if inner.len() > 254 {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: address longer than 254 characters",
        ));
    }
    if !utf8 && !inner.is_ascii() {
        return Err(ParseError(Reply::new(
            553,
            EnhancedStatus::new(5, 6, 7),
            "Non-ASCII address without SMTPUTF8",
        )));
    }
    let (local, domain) = split_local(inner)?;
    validate_local(local)?;
    let domain = parse_domain(domain)?;
    Ok(Mailbox {
        local: local.to_string(),
        domain,
    })
}

/// Splits at the `@` that ends the local part (the last one outside quotes).
fn split_local(addr: &str) -> Result<(&str, &str), ParseError> {
    if let Some(rest) = addr.strip_prefix('"') {
        // Quoted-string: find its end.
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    let end = i + 2; // both quotes
                    let after = &addr[end..];
                    let domain = after.strip_prefix('@').ok_or_else(|| {
                        syntax(
                            EnhancedStatus::BAD_ADDRESS,
                            "Bad address syntax: expected @ after the quoted local part",
                        )
                    })?;
                    return Ok((&addr[..end], domain));
                }
                _ => {}
            }
        }
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: unterminated quote",
        ));
    }
    let at = addr.find('@').ok_or_else(|| {
        syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: no domain (use user@domain)",
        )
    })?;
    let (local, domain) = (&addr[..at], &addr[at + 1..]);
    if domain.contains('@') {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: more than one @",
        ));
    }
    Ok((local, domain))
}

fn validate_local(local: &str) -> Result<(), ParseError> {
    if local.is_empty() || local.len() > 64 {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: the local part must be 1 to 64 characters",
        ));
    }
    if let Some(q) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        // A quoted local part that hides routing characters is a relay trick.
        if q.contains(['@', '%', '!']) {
            return Err(ParseError(Reply::new(
                553,
                EnhancedStatus::BAD_ADDRESS,
                "Quoted local part with routing characters refused",
            )));
        }
        if q.chars().any(|c| c.is_control()) {
            return Err(syntax(
                EnhancedStatus::BAD_ADDRESS,
                "Bad address syntax: control character",
            ));
        }
        return Ok(());
    }
    if local.contains(['%', '!']) {
        return Err(ParseError(Reply::new(
            553,
            EnhancedStatus::BAD_ADDRESS,
            "Routing characters (% !) in the address refused",
        )));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: misplaced dot in the local part",
        ));
    }
    let ok = local.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || "!#$&'*+-/=?^_`{|}~.".contains(c)
            || (!c.is_ascii() && !c.is_control())
    });
    if !ok {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: invalid character in the local part",
        ));
    }
    Ok(())
}

/// A domain or address literal, lowercased. Trailing dots and empty labels are refused.
fn parse_domain(d: &str) -> Result<String, ParseError> {
    if d.is_empty() {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: empty domain",
        ));
    }
    if let Some(lit) = d.strip_prefix('[') {
        let lit = lit
            .strip_suffix(']')
            .ok_or_else(|| syntax(EnhancedStatus::BAD_ADDRESS, "Bad address literal"))?;
        let ok = match lit
            .strip_prefix("IPv6:")
            .or_else(|| lit.strip_prefix("ipv6:"))
        {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => lit.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        if !ok {
            return Err(syntax(EnhancedStatus::BAD_ADDRESS, "Bad address literal"));
        }
        return Ok(format!(
            "[{}]",
            lit.to_ascii_lowercase().replace("ipv6:", "IPv6:")
        ));
    }
    if d.len() > 253 {
        return Err(syntax(
            EnhancedStatus::BAD_ADDRESS,
            "Bad address syntax: domain too long",
        ));
    }
    for label in d.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| {
                c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && c.is_alphanumeric())
            });
        if !ok {
            return Err(syntax(
                EnhancedStatus::BAD_ADDRESS,
                format!("Bad address syntax: invalid domain {d:?}"),
            ));
        }
    }
    Ok(d.to_lowercase())
}

fn valid_helo(name: &str) -> bool {
    if name.starts_with('[') {
        return parse_domain(name).is_ok();
    }
    // Be lenient with HELO names (many clients send bare words) but refuse junk.
    name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
}

fn parse_params(s: &str, mail: bool) -> Result<Params, ParseError> {
    let mut p = Params::default();
    for word in s.split_ascii_whitespace() {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
            None => (word.to_ascii_uppercase(), None),
        };
        let bad = || {
            ParseError(Reply::new(
                501,
                EnhancedStatus::BAD_ARGUMENTS,
                format!("Bad parameter {word:?}"),
            ))
        };
        match (mail, k.as_str(), v) {
            (true, "SIZE", Some(v)) => {
                if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                p.size = Some(v.parse().map_err(|_| bad())?);
            }
            (true, "BODY", Some(v)) => {
                let v = v.to_ascii_uppercase();
                if v != "7BIT" && v != "8BITMIME" {
                    return Err(ParseError(Reply::new(
                        555,
                        EnhancedStatus::BAD_ARGUMENTS,
                        format!("Unsupported BODY={v}"),
                    )));
                }
                p.body = Some(v);
            }
            (true, "SMTPUTF8", None) => p.smtputf8 = true,
            (true, "RET", Some(v))
                if v.eq_ignore_ascii_case("FULL") || v.eq_ignore_ascii_case("HDRS") =>
            {
                p.ret = Some(v.to_ascii_uppercase());
            }
            (true, "ENVID", Some(v)) if !v.is_empty() && v.len() <= 100 => {
                p.envid = Some(v.to_string())
            }
            (true, "AUTH", Some(v)) => p.auth = Some(v.to_string()),
            (false, "NOTIFY", Some(v)) => {
                let items: Vec<String> = v.split(',').map(str::to_ascii_uppercase).collect();
                let valid = items
                    .iter()
                    .all(|i| matches!(i.as_str(), "NEVER" | "SUCCESS" | "FAILURE" | "DELAY"));
                if !valid || (items.len() > 1 && items.iter().any(|i| i == "NEVER")) {
                    return Err(bad());
                }
                p.notify = Some(items.join(","));
            }
            (false, "ORCPT", Some(v)) if v.contains(';') && v.len() <= 500 => {
                p.orcpt = Some(v.to_string())
            }
            _ => {
                return Err(ParseError(Reply::new(
                    555,
                    EnhancedStatus::BAD_ARGUMENTS,
                    format!("Unsupported parameter {word:?}"),
                )));
            }
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Command {
        parse_command(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {}", e.0))
    }

    fn err(line: &str, code: u16) -> Reply {
        let r = parse_command(line.as_bytes()).expect_err(line).0;
        assert_eq!(r.code, code, "{line}: {r}");
        r
    }

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn commands() {
        assert_eq!(
            ok("EHLO client.example"),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(ok("helo [192.0.2.1]"), Command::Helo("[192.0.2.1]".into()));
        assert_eq!(ok("MAIL FROM:<>"), Command::Mail(None, Params::default()));
        assert_eq!(
            ok("mail from: <A.B@Example.ORG>"),
            Command::Mail(Some(mb("A.B", "example.org")), Params::default())
        );
        assert_eq!(
            ok("RCPT TO:<Postmaster>"),
            Command::Rcpt(mb("postmaster", ""), Params::default())
        );
        assert_eq!(
            ok("BDAT 100 LAST"),
            Command::Bdat {
                size: 100,
                last: true
            }
        );
        assert_eq!(
            ok("bdat 0"),
            Command::Bdat {
                size: 0,
                last: false
            }
        );
        assert_eq!(ok("NOOP anything"), Command::Noop);
        assert_eq!(ok("QUIT"), Command::Quit);
        assert_eq!(ok("VRFY root"), Command::Vrfy("root".into()));
        let Command::Mail(_, p) =
            ok("MAIL FROM:<a@b.example> SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=x1")
        else {
            panic!()
        };
        assert_eq!(
            (
                p.size,
                p.body.as_deref(),
                p.smtputf8,
                p.ret.as_deref(),
                p.envid.as_deref()
            ),
            (Some(1000), Some("8BITMIME"), true, Some("HDRS"), Some("x1"))
        );
        let Command::Rcpt(_, p) =
            ok("RCPT TO:<a@b.example> NOTIFY=success,failure ORCPT=rfc822;a@b.example")
        else {
            panic!()
        };
        assert_eq!(p.notify.as_deref(), Some("SUCCESS,FAILURE"));
        assert_eq!(p.orcpt.as_deref(), Some("rfc822;a@b.example"));
        assert_eq!(
            ok("MAIL FROM:<ü@bücher.example> SMTPUTF8"),
            Command::Mail(
                Some(mb("ü", "bücher.example")),
                Params {
                    smtputf8: true,
                    ..Default::default()
                }
            )
        );
    }

    #[test]
    fn command_errors() {
        err("FOO", 502);
        err("EHLO", 501);
        err("DATA now", 501);
        err("MAIL TO:<a@b.example>", 501);
        err("MAIL FROM:a@b.example", 501);
        err("MAIL FROM:<a@b.example>x", 501);
        err("MAIL FROM:<a@b.example> SIZE=abc", 501);
        err("MAIL FROM:<a@b.example> SIZE=99999999999999999999", 501);
        err("MAIL FROM:<a@b.example> BODY=BINARYMIME", 555);
        err("MAIL FROM:<a@b.example> FOO=1", 555);
        err("RCPT TO:<a@b.example> NOTIFY=NEVER,SUCCESS", 501);
        err("RCPT TO:<a@b.example> SIZE=10", 555);
        err("BDAT", 501);
        err("BDAT -1", 501);
        err("BDAT 10 FIRST", 501);
        err("BDAT 10 LAST extra", 501);
        err("MAIL FROM:<ü@b.example>", 553);
        assert_eq!(parse_command(b"NOOP\0").unwrap_err().0.code, 500);
        assert_eq!(parse_command(b"NOOP \xff").unwrap_err().0.code, 500);
        assert_eq!(parse_command(b"NOOP \x1b[1m").unwrap_err().0.code, 500);
    }

    /// Relay tricks: each must fail to parse, or parse to a domain that is not the
    /// served one (the session then refuses it as relaying).
    #[test]
    fn routing_tricks_are_refused_by_the_parser() {
        for path in [
            "<@relay.example:user@victim.example>",
            "<@a.example,@b.example:user@victim.example>",
            "<user%victim.example@served.example>",
            "<user!victim.example@served.example>",
            "<victim.example!user@served.example>",
            "<\"user@victim.example\"@served.example>",
            "<\"user%victim.example\"@served.example>",
            "<\"user!victim\"@served.example>",
            "<user@victim.example@served.example>",
            "<user@served.example.>",
            "<user@served..example>",
            "<user@.served.example>",
            "<user@-served.example>",
            "<user@[300.1.1.1]>",
            "<user@served.example >",
            "<user>",
            "<@served.example>",
            "<.user@served.example>",
            "<user.@served.example>",
            "<us..er@served.example>",
            "<user@served.example\\>",
            "<user(comment)@served.example>",
            "<user@served_example>",
        ] {
            let line = format!("RCPT TO:{path}");
            let r = parse_command(line.as_bytes());
            assert!(r.is_err(), "{path} was accepted as {r:?}");
        }
        // These parse, but to a domain the session will compare with smtp.domains.
        let Command::Rcpt(m, _) = ok("RCPT TO:<user@[192.0.2.1]>") else {
            panic!()
        };
        assert!(m.is_literal());
        let Command::Rcpt(m, _) = ok("RCPT TO:<USER@SERVED.EXAMPLE>") else {
            panic!()
        };
        assert_eq!(m.domain, "served.example");
        let Command::Rcpt(m, _) = ok("RCPT TO:<\"john smith\"@served.example>") else {
            panic!()
        };
        assert_eq!(m.local, "\"john smith\"");
    }

    #[test]
    fn replies_on_the_wire() {
        assert_eq!(
            Reply::new(250, EnhancedStatus::SENDER_OK, "Ok").to_wire(),
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(Reply::bare(250, "a\nb").to_wire(), "250-a\r\n250 b\r\n");
    }

    #[test]
    fn lmtp_greeting_and_xforward() {
        assert_eq!(ok("LHLO mx.example"), Command::Lhlo("mx.example".into()));
        assert_eq!(
            ok("XFORWARD NAME=mx.sender.example ADDR=IPV6:2001:db8::1 HELO=[UNAVAILABLE]"),
            Command::Xforward(vec![
                ("NAME".into(), "mx.sender.example".into()),
                ("ADDR".into(), "IPV6:2001:db8::1".into()),
                ("HELO".into(), String::new()),
            ])
        );
        assert_eq!(
            ok("xforward ident=AB+2BC+3d"),
            Command::Xforward(vec![("IDENT".into(), "AB+C=".into())])
        );
        // A '+' without two hex digits stays; "++1" is not the byte 1.
        assert_eq!(xtext_decode("a++1+zz+"), "a++1+zz+");
        for bad in [
            "XFORWARD",
            "XFORWARD NAME",
            "XFORWARD =x",
            "XFORWARD N4ME=x",
        ] {
            assert_eq!(
                err(bad, 501).status,
                Some(EnhancedStatus::BAD_ARGUMENTS),
                "{bad}"
            );
        }
    }
}
