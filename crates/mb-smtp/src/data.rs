//! The DATA decoder: finds the end of the message only at `<CRLF>.<CRLF>`, removes dot
//! stuffing, and refuses bare CR and bare LF anywhere, so that no other line ending can
//! end the message early (the SMTP smuggling class, CVE-2023-51764/51765/51766).

/// Why a DATA stream was refused. Both end the session: the rest of the stream cannot
/// be trusted to be commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    BareLf,
    BareCr,
}

/// Decodes the DATA stream incrementally.
#[derive(Debug)]
pub struct DataDecoder {
    line_start: bool,
    after_cr: bool,
    /// The current line so far is a single ".".
    dot_line: bool,
    line_len: usize,
    /// Longest line seen, CRLF included.
    pub longest_line: usize,
    pub nul_seen: bool,
}

impl Default for DataDecoder {
    fn default() -> Self {
        DataDecoder {
            line_start: true,
            after_cr: false,
            dot_line: false,
            line_len: 0,
            longest_line: 0,
            nul_seen: false,
        }
    }
}

impl DataDecoder {
    /// Feeds input; decoded bytes go to `out`. Returns how much input was consumed and
    /// whether the end of data was reached (then the rest of `input` is the next command).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), DataError> {
        for (i, &b) in input.iter().enumerate() {
            self.line_len += 1;
            if self.after_cr {
                if b != b'\n' {
                    return Err(DataError::BareCr);
                }
                self.after_cr = false;
                self.longest_line = self.longest_line.max(self.line_len);
                self.line_len = 0;
                if self.dot_line {
                    return Ok((i + 1, true));
                }
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                continue;
            }
            match b {
                b'\r' => {
                    self.after_cr = true;
                    self.line_start = false;
                }
                b'\n' => return Err(DataError::BareLf),
                b'.' if self.line_start => {
                    // Either the end marker or a stuffed dot: decided by the next byte. A
                    // stuffed dot does not count towards the line limit (RFC 5321 §4.5.3.1.6).
                    self.dot_line = true;
                    self.line_start = false;
                    self.line_len -= 1;
                }
                _ => {
                    if b == 0 {
                        self.nul_seen = true;
                    }
                    self.dot_line = false;
                    self.line_start = false;
                    out.push(b);
                }
            }
        }
        Ok((input.len(), false))
    }
}

/// Checks BDAT content, which has no dot-stuffing but must have the same clean line
/// endings as DATA: a chunk with bare CR or LF could be split into two messages by a
/// next hop that accepts them.
#[derive(Debug, Default)]
pub struct LineChecker {
    after_cr: bool,
    line_len: usize,
    pub longest_line: usize,
    pub bare: bool,
    pub nul_seen: bool,
}

impl LineChecker {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.line_len += 1;
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    self.longest_line = self.longest_line.max(self.line_len);
                    self.line_len = 0;
                    continue;
                }
                self.bare = true;
            }
            match b {
                b'\r' => self.after_cr = true,
                b'\n' => self.bare = true,
                0 => self.nul_seen = true,
                _ => {}
            }
        }
    }

    /// At the end of the message: an unfinished CR is bare too.
    pub fn finish(&mut self) {
        if self.after_cr {
            self.bare = true;
        }
        self.longest_line = self.longest_line.max(self.line_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> Result<(Vec<u8>, Vec<u8>), DataError> {
        let mut d = DataDecoder::default();
        let mut out = Vec::new();
        for (n, chunk) in chunks.iter().enumerate() {
            let (used, done) = d.feed(chunk, &mut out)?;
            if done {
                let mut rest = chunk[used..].to_vec();
                for c in &chunks[n + 1..] {
                    rest.extend_from_slice(c);
                }
                return Ok((out, rest));
            }
        }
        panic!("no end of data in {chunks:?}");
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf() {
        let (msg, rest) = decode(&[b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"]).unwrap();
        assert_eq!(msg, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(rest, b"QUIT\r\n");
        // Split at every point, the result is the same.
        let whole = b"a\r\n..b\r\n.c\r\n\r\n.\r\nNEXT";
        for split in 0..whole.len() {
            let (msg, rest) = decode(&[&whole[..split], &whole[split..]]).unwrap();
            assert_eq!(msg, b"a\r\n.b\r\nc\r\n\r\n", "split at {split}");
            assert_eq!(rest, b"NEXT");
        }
        // An empty message.
        let (msg, _) = decode(&[b".\r\n"]).unwrap();
        assert!(msg.is_empty());
    }

    #[test]
    fn smuggling_probes_are_refused() {
        for probe in [
            &b"a\r\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n",
            b"a\rb\r\n.\r\n",
            b"a\nb\r\n.\r\n",
        ] {
            let mut d = DataDecoder::default();
            let mut out = Vec::new();
            let r = d.feed(probe, &mut out);
            assert!(
                r.is_err(),
                "{:?} gave {r:?}",
                String::from_utf8_lossy(probe)
            );
        }
    }

    #[test]
    fn a_stuffed_dot_does_not_count_towards_the_line_limit() {
        let mut d = DataDecoder::default();
        // The line "." + 997 characters, dot-stuffed on the wire to ".." + 997.
        let mut line = b"..".to_vec();
        line.extend(vec![b'x'; 997]);
        line.extend_from_slice(b"\r\n.\r\n");
        let mut out = Vec::new();
        assert!(d.feed(&line, &mut out).unwrap().1);
        assert_eq!(d.longest_line, 1000, "998 characters plus CRLF");
    }

    #[test]
    fn bdat_lines_are_checked() {
        let mut c = LineChecker::default();
        c.feed(b"Subject: x\r\n\r\nbody\r");
        c.feed(b"\n");
        c.finish();
        assert!(!c.bare && !c.nul_seen);
        for bad in [&b"a\nb\r\n"[..], b"a\rb\r\n", b"a\r"] {
            let mut c = LineChecker::default();
            c.feed(bad);
            c.finish();
            assert!(c.bare, "{bad:?}");
        }
    }

    #[test]
    fn records_long_lines_and_nul() {
        let mut d = DataDecoder::default();
        let mut line = vec![b'x'; 1200];
        line.extend_from_slice(b"\r\n\0\r\n.\r\n");
        let mut out = Vec::new();
        assert!(d.feed(&line, &mut out).unwrap().1);
        assert_eq!(d.longest_line, 1202);
        assert!(d.nul_seen);
    }
}
