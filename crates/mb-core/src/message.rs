//! Editing a message's header section without reparsing it: the verdict's fields are
//! removed and added the same way wherever a message leaves the gateway (delivery,
//! quarantine, content-filter reinjection).

/// The message as it is delivered: the verdict's fields removed from the header
/// section (with their continuation lines) and its added fields at the top.
pub fn with_headers(message: &[u8], add: &[(String, String)], remove: &[String]) -> Vec<u8> {
    if add.is_empty() && remove.is_empty() {
        return message.to_vec();
    }
    let mut out = Vec::with_capacity(message.len() + 256);
    for (name, value) in add {
        out.extend_from_slice(format!("{name}: {}\r\n", fold_safe(value)).as_bytes());
    }
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2);
    let mut dropping = false;
    for line in message[..end].split_inclusive(|b| *b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            let name = line.split(|b| *b == b':').next().unwrap_or_default();
            dropping = remove
                .iter()
                .any(|r| r.as_bytes().eq_ignore_ascii_case(name));
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
