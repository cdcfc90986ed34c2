//! Editing a message's header section without reparsing it: the verdict's fields are
//! removed and added the same way wherever a message leaves the gateway (delivery,
//! quarantine, content-filter reinjection).

/// Fields a sender could write to pass for a verdict of ours or of a checker at the
/// border. The filter (`mb-filter`'s engine) removes every copy from every message the
/// gateway passes on or quarantines, whatever its direction, whether its sender was
/// authenticated and whichever step decided; it is here so that a path that passes
/// mail on unscanned can remove the same fields. Downstream filters and mail clients
/// act on them (Sieve rules on X-Spam-Flag or on X-Spam-Level's stars, which
/// SpamAssassin writes and many sites still match, clients showing
/// Authentication-Results).
/// RFC 8601 5 asks a border MTA to remove results claiming its own authserv-id; results
/// from before the border are not ours to trust either, so every Authentication-Results
/// goes and ours alone is added. ARC-Authentication-Results stay: their sealer signed
/// them, and the ARC chain is verified, not believed.
pub const FORGEABLE: &[&str] = &[
    "X-Spam",
    "X-Spam-Score",
    "X-Spam-Status",
    "X-Spam-Flag",
    "X-Spam-Level",
    "Authentication-Results",
];

/// The message as it is delivered: the verdict's fields removed from the header
/// section (with their continuation lines) and its added fields at the top.
///
/// Names match as RFC 5322 has them: without regard to case, and with the obsolete
/// syntax's white space before the colon (4.5.x, `Authentication-Results :`) taken as
/// the same field, as mail-parser and Postfix read it. Otherwise such a spelling would
/// slip a forged field past its removal while the readers downstream still see it.
pub fn with_headers(message: &[u8], add: &[(String, String)], remove: &[String]) -> Vec<u8> {
    if add.is_empty() && remove.is_empty() {
        return message.to_vec();
    }
    let mut out = Vec::with_capacity(message.len() + 256);
    for (name, value) in add {
        out.extend_from_slice(format!("{name}: {}\r\n", fold_safe(value)).as_bytes());
    }
    // A message that starts with the empty line has no header fields: a blank line
    // further down is in its body, and so is anything that looks like a field there.
    let end = if message.starts_with(b"\r\n") {
        0
    } else {
        message
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(message.len(), |p| p + 2)
    };
    let mut dropping = false;
    for line in message[..end].split_inclusive(|b| *b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            dropping = field_name(line).is_some_and(|name| {
                remove
                    .iter()
                    .any(|r| r.as_bytes().eq_ignore_ascii_case(name))
            });
        }
        if !dropping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&message[end..]);
    out
}

/// A header value that cannot start a new field: a line break is kept only as a fold
/// (CRLF followed by a space or tab); any other CR or LF becomes a space.
pub fn fold_safe(value: &str) -> String {
    let b = value.as_bytes();
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\r'
            && b.get(i + 1) == Some(&b'\n')
            && matches!(b.get(i + 2), Some(b' ' | b'\t'))
        {
            out.push_str("\r\n");
            i += 2;
            continue;
        }
        let c = value[i..].chars().next().unwrap_or(' ');
        out.push(if c == '\r' || c == '\n' { ' ' } else { c });
        i += c.len_utf8();
    }
    out
}

/// Base64 (RFC 4648, with padding): AUTH, MIME parts, DKIM public keys.
pub fn base64_encode(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The name of the field a header line starts, without the white space the obsolete
/// syntax allows before the colon (RFC 5322 4.5.x); none for a line without a colon.
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|b| *b == b':')?;
    let name = &line[..colon];
    let len = name
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |p| p + 1);
    Some(&name[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header section of `message` after removing `remove`, nothing added.
    fn check(message: &str, remove: &[&str], want: &str) {
        let remove: Vec<String> = remove.iter().map(|r| r.to_string()).collect();
        let out = with_headers(message.as_bytes(), &[], &remove);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            want,
            "{message:?} less {remove:?}"
        );
    }

    #[test]
    fn removals_match_names_as_rfc_5322_does() {
        let forged = "Authentication-Results : gw.test; dmarc=pass\r\n\
                      authentication-results:gw.test;\r\n\tspf=pass\r\n\
                      X-Spam\t: No\r\n\
                      X-Spam-Status:No\r\n\
                      X-Spammy: kept\r\n\
                      Subject: s\r\n\r\n\
                      X-Spam: in the body\r\n";
        check(
            forged,
            &["Authentication-Results", "X-SPAM"],
            "X-Spam-Status:No\r\nX-Spammy: kept\r\nSubject: s\r\n\r\nX-Spam: in the body\r\n",
        );
        // A line without a colon is no field of that name, even spelt like one.
        check(
            "X-Spam\r\nSubject: s\r\n\r\nb\r\n",
            &["X-Spam"],
            "X-Spam\r\nSubject: s\r\n\r\nb\r\n",
        );
        // No header section at all: the body is left alone.
        check(
            "\r\nX-Spam: body\r\n\r\nmore\r\n",
            &["X-Spam"],
            "\r\nX-Spam: body\r\n\r\nmore\r\n",
        );
    }

    #[test]
    fn field_names_lose_the_obsolete_space_before_the_colon() {
        assert_eq!(field_name(b"A-R \t: v\r\n"), Some(&b"A-R"[..]));
        assert_eq!(field_name(b"Subject: a: b\r\n"), Some(&b"Subject"[..]));
        assert_eq!(field_name(b"no colon\r\n"), None);
    }
}
