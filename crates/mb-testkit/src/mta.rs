//! What an MTA in front of the gateway sends, for tests that drive one message the three
//! ways a site deploys it: an SMTP transaction (mb-smtpd standalone, or Postfix's content
//! filter client with XFORWARD into mb-filter's port) and a milter conversation (Postfix's
//! `smtpd_milters` side of mb-milter, protocol 6). Both return errors instead of
//! panicking, so one case's broken session fails that case alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

/// Who sends, and to whom.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The queue id the MTA gives the message (XFORWARD IDENT, the milter's `i` macro);
    /// mb-smtpd makes its own.
    pub queue_id: String,
    /// The client the MTA saw (XFORWARD ADDR, the milter's connect); mb-smtpd sees the
    /// test's own address.
    pub client_ip: Option<IpAddr>,
    pub helo: String,
    /// Empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
}

/// An SMTP reply, or a milter's final answer put as the SMTP reply Postfix would give.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub code: u16,
    /// The enhanced status as written, empty when there is none.
    pub status: String,
    /// The lines' texts, joined by spaces.
    pub text: String,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.code, self.status, self.text)
    }
}

impl Reply {
    /// Parses one reply line set's joined form (`550 5.7.1 text`).
    fn parse_line(line: &str) -> Option<Reply> {
        let code = line.get(..3)?.parse().ok()?;
        let rest = line.get(4..).unwrap_or_default();
        let (first, after) = rest.split_once(' ').unwrap_or((rest, ""));
        let is_status =
            first.split('.').count() == 3 && first.split('.').all(|p| p.parse::<u16>().is_ok());
        Some(if is_status {
            Reply {
                code,
                status: first.to_string(),
                text: after.to_string(),
            }
        } else {
            Reply {
                code,
                status: String::new(),
                text: rest.to_string(),
            }
        })
    }
}

/// What came of one SMTP transaction: the reply to the message (or to the command that
/// ended the transaction early) and which command that was.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `DATA` for the reply to the message itself, else the command refused
    /// (`MAIL`, `RCPT`, `DATA` before the message was sent).
    pub at: &'static str,
    pub reply: Reply,
}

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connect to 127.0.0.1:{port}"))?;
        // Scanning a few megabytes in a debug build takes a while.
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Client {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    fn reply(&mut self) -> Result<(Reply, Vec<String>)> {
        let mut lines = Vec::new();
        let mut texts = Vec::new();
        let mut status = String::new();
        loop {
            let mut line = String::new();
            ensure!(
                self.r.read_line(&mut line)? > 0,
                "the connection closed (after {lines:?})"
            );
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            let one = Reply::parse_line(&line).with_context(|| format!("not a reply: {line:?}"))?;
            if !one.status.is_empty() {
                status = one.status.clone();
            }
            texts.push(one.text);
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return Ok((
                    Reply {
                        code: one.code,
                        status,
                        text: texts.join(" "),
                    },
                    lines,
                ));
            }
        }
    }

    fn cmd(&mut self, line: &str) -> Result<Reply> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        Ok(self.reply()?.0)
    }
}

/// One SMTP transaction: EHLO as the envelope's HELO, then (when `xforward` is set and
/// the server offers it) XFORWARD with the queue id, client address and HELO as
/// Postfix's content filter client says them, MAIL, RCPT, DATA with `message` dot-stuffed.
/// `message` is sent as it is, so it must have CRLF line endings.
pub fn smtp(port: u16, env: &Envelope, message: &[u8], xforward: bool) -> Result<Outcome> {
    let mut c = Client::connect(port)?;
    let (greeting, _) = c.reply()?;
    ensure!(greeting.code == 220, "greeting {greeting}");
    let helo = if env.helo.is_empty() {
        "client.test"
    } else {
        &env.helo
    };
    c.w.write_all(format!("EHLO {helo}\r\n").as_bytes())?;
    let (ehlo, lines) = c.reply()?;
    ensure!(ehlo.code == 250, "EHLO {helo}: {ehlo}");
    if xforward {
        ensure!(
            lines
                .iter()
                .any(|l| l.get(4..).is_some_and(|k| k.starts_with("XFORWARD"))),
            "the server does not offer XFORWARD: {lines:?}"
        );
        let mut x = String::from("XFORWARD");
        if !env.queue_id.is_empty() {
            x.push_str(&format!(" IDENT={}", env.queue_id));
        }
        match env.client_ip {
            Some(IpAddr::V6(ip)) => x.push_str(&format!(" ADDR=IPV6:{ip}")),
            Some(ip) => x.push_str(&format!(" ADDR={ip}")),
            None => x.push_str(" ADDR=[UNAVAILABLE]"),
        }
        if !env.helo.is_empty() {
            x.push_str(&format!(" HELO={}", env.helo));
        }
        let r = c.cmd(&x)?;
        ensure!(r.code == 250, "{x}: {r}");
    }
    let r = c.cmd(&format!("MAIL FROM:<{}>", env.sender))?;
    if r.code != 250 {
        return Ok(Outcome {
            at: "MAIL",
            reply: r,
        });
    }
    for rcpt in &env.recipients {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"))?;
        if r.code != 250 {
            // A test's envelope names recipients the gateway must take: one refused
            // ends the transaction, so the test sees it rather than a partial delivery.
            let _ = c.cmd("QUIT");
            return Ok(Outcome {
                at: "RCPT",
                reply: r,
            });
        }
    }
    let r = c.cmd("DATA")?;
    if r.code != 354 {
        return Ok(Outcome {
            at: "DATA",
            reply: r,
        });
    }
    c.w.write_all(&dot_stuffed(message))?;
    let (reply, _) = c.reply()?;
    let _ = c.cmd("QUIT");
    Ok(Outcome { at: "DATA", reply })
}

/// The message as DATA sends it: dot-stuffed and ended by `.` on a line of its own
/// (after a line break of its own when the message has none at its end).
fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(message.len() + 64);
    for line in message.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b".") {
            data.push(b'.');
        }
        data.extend_from_slice(line);
    }
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(b".\r\n");
    data
}

/// What a milter answered for one message: the final answer as the SMTP reply Postfix
/// would give (`250` for continue/accept, the REPLYCODE's reply, 550/451 for a plain
/// reject/tempfail; discard is `250` with `discarded` set), and the header changes it
/// asked for.
#[derive(Debug, Clone)]
pub struct MilterOutcome {
    /// `eom` for the answer to the whole message, else the step that ended it early.
    pub at: &'static str,
    pub reply: Reply,
    pub discarded: bool,
    /// Fields added (ADDHEADER or INSHEADER), as (name, value).
    pub added: Vec<(String, String)>,
    /// Fields removed (CHGHEADER with an empty value), as (name, index from 1).
    pub removed: Vec<(String, u32)>,
}

fn packet(s: &mut TcpStream, cmd: u8, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len() + 1)?;
    let mut p = len.to_be_bytes().to_vec();
    p.push(cmd);
    p.extend_from_slice(data);
    s.write_all(&p)?;
    Ok(())
}

fn read_packet(s: &mut TcpStream) -> Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).context("a milter reply")?;
    let len = u32::from_be_bytes(len) as usize;
    ensure!((1..=1 << 24).contains(&len), "milter packet of {len} bytes");
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok((data[0], data[1..].to_vec()))
}

/// A milter's answer to a step before the end of the message: None to go on, or the
/// outcome that ends the message there.
fn step(s: &mut TcpStream, at: &'static str) -> Result<Option<MilterOutcome>> {
    let (cmd, data) = read_packet(s)?;
    Ok(match cmd {
        b'c' => None,
        other => Some(final_answer(at, other, &data, Vec::new(), Vec::new())?),
    })
}

fn final_answer(
    at: &'static str,
    cmd: u8,
    data: &[u8],
    added: Vec<(String, String)>,
    removed: Vec<(String, u32)>,
) -> Result<MilterOutcome> {
    let plain = |code: u16| Reply {
        code,
        status: String::new(),
        text: String::new(),
    };
    let (reply, discarded) = match cmd {
        b'c' | b'a' => (plain(250), false),
        b'd' => (plain(250), true),
        b'r' => (plain(550), false),
        b't' => (plain(451), false),
        b'y' => {
            let text = String::from_utf8_lossy(data)
                .trim_end_matches('\0')
                .replace("%%", "%");
            // A multi-line REPLYCODE joins its lines with CRLF: one reply, as SMTP's.
            let joined = text
                .split("\r\n")
                .map(|l| l.get(4..).unwrap_or(l))
                .collect::<Vec<_>>();
            let first = text.split("\r\n").next().unwrap_or_default();
            let code = first.get(..3).unwrap_or_default();
            let mut reply = Reply::parse_line(&format!("{code} {}", joined.join(" ")))
                .with_context(|| format!("REPLYCODE {text:?}"))?;
            if reply.status.is_empty() {
                reply.text = joined.join(" ");
            }
            (reply, false)
        }
        other => bail!("unexpected milter answer {:?} at {at}", char::from(other)),
    };
    Ok(MilterOutcome {
        at,
        reply,
        discarded,
        added,
        removed,
    })
}

/// A header field as a milter is handed it: (name, value), bytes as they are.
pub type Field = (Vec<u8>, Vec<u8>);

/// The header fields of `message` as a milter is handed them (name without the white
/// space before the colon, value without the white space after it, continuation lines
/// joined by LF as Postfix passes them) and the body after the empty line. A line that
/// is not a field starts the body, as Postfix treats it.
pub fn split_message(message: &[u8]) -> (Vec<Field>, &[u8]) {
    let mut fields: Vec<Field> = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let end = message[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(message.len(), |i| at + i);
        let line = &message[at..end];
        let next = (end + 2).min(message.len());
        if line.is_empty() {
            return (fields, &message[next..]);
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some((_, value)) = fields.last_mut() {
                value.push(b'\n');
                value.extend_from_slice(line);
                at = next;
                continue;
            }
            return (fields, &message[at..]);
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return (fields, &message[at..]);
        };
        let name = line[..colon].trim_ascii_end();
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return (fields, &message[at..]);
        }
        let value = line[colon + 1..].trim_ascii_start();
        fields.push((name.to_vec(), value.to_vec()));
        at = next;
    }
    (fields, &message[message.len()..])
}

/// One message through a milter as Postfix hands it over: protocol 6 with every step
/// answered, the connection from the envelope's client, HELO, the `i` macro (queue id)
/// before MAIL, MAIL, RCPT, each header field, end of headers, the body in 60 KB chunks,
/// end of message.
pub fn milter(port: u16, env: &Envelope, message: &[u8]) -> Result<MilterOutcome> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connect to the milter on 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut opt = 6u32.to_be_bytes().to_vec();
    opt.extend_from_slice(&0x1ffu32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    packet(&mut s, b'O', &opt)?;
    ensure!(read_packet(&mut s)?.0 == b'O', "no option negotiation");
    let mut connect = b"client.test\0".to_vec();
    match env.client_ip {
        Some(IpAddr::V4(ip)) => {
            connect.push(b'4');
            connect.extend_from_slice(&2525u16.to_be_bytes());
            connect.extend_from_slice(format!("{ip}\0").as_bytes());
        }
        Some(IpAddr::V6(ip)) => {
            connect.push(b'6');
            connect.extend_from_slice(&2525u16.to_be_bytes());
            connect.extend_from_slice(format!("{ip}\0").as_bytes());
        }
        None => connect.push(b'U'),
    }
    packet(&mut s, b'C', &connect)?;
    if let Some(o) = step(&mut s, "connect")? {
        return Ok(o);
    }
    let helo = if env.helo.is_empty() {
        "client.test"
    } else {
        &env.helo
    };
    packet(&mut s, b'H', format!("{helo}\0").as_bytes())?;
    if let Some(o) = step(&mut s, "helo")? {
        return Ok(o);
    }
    if !env.queue_id.is_empty() {
        packet(&mut s, b'D', format!("Mi\0{}\0", env.queue_id).as_bytes())?;
    }
    packet(&mut s, b'M', format!("<{}>\0", env.sender).as_bytes())?;
    if let Some(o) = step(&mut s, "mail")? {
        return Ok(o);
    }
    for rcpt in &env.recipients {
        packet(&mut s, b'R', format!("<{rcpt}>\0").as_bytes())?;
        if let Some(o) = step(&mut s, "rcpt")? {
            return Ok(o);
        }
    }
    let (fields, body) = split_message(message);
    for (name, value) in &fields {
        let mut data = name.clone();
        data.push(0);
        data.extend_from_slice(value);
        data.push(0);
        packet(&mut s, b'L', &data)?;
        if let Some(o) = step(&mut s, "header")? {
            return Ok(o);
        }
    }
    packet(&mut s, b'N', &[])?;
    if let Some(o) = step(&mut s, "end of headers")? {
        return Ok(o);
    }
    for chunk in body.chunks(60_000) {
        packet(&mut s, b'B', chunk)?;
        if let Some(o) = step(&mut s, "body")? {
            return Ok(o);
        }
    }
    packet(&mut s, b'E', &[])?;
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    loop {
        let (cmd, data) = read_packet(&mut s)?;
        let strings = |d: &[u8]| -> Vec<String> {
            d.split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect()
        };
        match cmd {
            // Progress, quarantine and body changes come before the final answer.
            b'p' | b'q' | b'b' => continue,
            b'h' => {
                let p = strings(&data);
                added.push((p[0].clone(), p.get(1).cloned().unwrap_or_default()));
            }
            b'i' | b'm' if data.len() >= 4 => {
                let index = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let p = strings(&data[4..]);
                let (name, value) = (p[0].clone(), p.get(1).cloned().unwrap_or_default());
                match cmd {
                    b'm' if value.is_empty() => removed.push((name, index)),
                    b'm' => {
                        removed.push((name.clone(), index));
                        added.push((name, value));
                    }
                    _ => added.push((name, value)),
                }
            }
            other => return final_answer("eom", other, &data, added, removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_split_into_fields_and_body_as_postfix_hands_them_over() {
        let (fields, body) = split_message(
            b"Subject:  hi\r\nX-Long: a\r\n\tb\r\nAuthentication-Results : x\r\n\r\nbody\r\n",
        );
        let fields: Vec<(String, String)> = fields
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            fields,
            [
                ("Subject".into(), "hi".into()),
                ("X-Long".into(), "a\n\tb".into()),
                ("Authentication-Results".into(), "x".into()),
            ]
        );
        assert_eq!(body, b"body\r\n");
        // A line that is not a field starts the body; no fields at all is an empty list.
        let (fields, body) = split_message(b"From: a@b\r\nnot a field\r\nrest\r\n");
        assert_eq!(fields.len(), 1);
        assert_eq!(body, b"not a field\r\nrest\r\n");
        let (fields, body) = split_message(b"\r\nonly body\r\n");
        assert!(fields.is_empty());
        assert_eq!(body, b"only body\r\n");
    }

    #[test]
    fn data_is_dot_stuffed_and_terminated() {
        assert_eq!(dot_stuffed(b".a\r\nb"), b"..a\r\nb\r\n.\r\n");
        assert_eq!(dot_stuffed(b"x\r\n"), b"x\r\n.\r\n");
    }

    #[test]
    fn replycode_texts_become_replies() {
        let o = final_answer("eom", b'y', b"550 5.7.1 Message refused\0", vec![], vec![]).unwrap();
        assert_eq!(
            o.reply,
            Reply {
                code: 550,
                status: "5.7.1".into(),
                text: "Message refused".into()
            }
        );
        let o = final_answer("eom", b'd', b"", vec![], vec![]).unwrap();
        assert!(o.discarded);
        assert!(final_answer("eom", b'z', b"", vec![], vec![]).is_err());
    }
}
