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
        out.reserve(input.len());
        let mut i = 0;
        while i < input.len() {
            // Inside a line, everything up to the next CR, LF or NUL is copied as it is:
            // one scan and one copy instead of a branch and a push per byte (a 20 MB
            // message spent most of the daemon's CPU here).
            if !self.after_cr && !self.line_start && !self.dot_line {
                let run = find_special(&input[i..]);
                out.extend_from_slice(&input[i..i + run]);
                self.line_len += run;
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            self.line_len += 1;
            if self.after_cr {
                if b != b'\n' {
                    return Err(DataError::BareCr);
                }
                self.after_cr = false;
                self.longest_line = self.longest_line.max(self.line_len);
                self.line_len = 0;
                if self.dot_line {
                    return Ok((i, true));
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

/// Index of the first CR, LF or NUL in `s` (its length when there is none), eight bytes
/// at a time.
fn find_special(s: &[u8]) -> usize {
    find_bytes(s, [b'\r', b'\n', 0])
}

/// Index of the first byte of `s` equal to one of `set` (its length when there is none),
/// eight bytes at a time: a byte of `x ^ c` is zero exactly where `x` holds `c`, and
/// `(v - 0x01..) & !v & 0x80..` is non-zero exactly when `v` has a zero byte.
pub(crate) fn find_bytes(s: &[u8], set: [u8; 3]) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(LO) & !v & HI;
    let mut i = 0;
    while i + 8 <= s.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&s[i..i + 8]);
        let x = u64::from_le_bytes(word);
        let hit = has_zero(x ^ (LO * u64::from(set[0])))
            | has_zero(x ^ (LO * u64::from(set[1])))
            | has_zero(x ^ (LO * u64::from(set[2])));
        if hit != 0 {
            break;
        }
        i += 8;
    }
    s[i..]
        .iter()
        .position(|b| set.contains(b))
        .map_or(s.len(), |p| i + p)
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
        let mut i = 0;
        while i < bytes.len() {
            if !self.after_cr {
                // Skip to the next CR, LF or NUL in one scan (see `DataDecoder::feed`).
                let run = find_special(&bytes[i..]);
                self.line_len += run;
                i += run;
                if i == bytes.len() {
                    break;
                }
            }
            let b = bytes[i];
            i += 1;
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

    /// The byte-at-a-time decoder the fast one replaced: the reference it must match.
    fn bytewise(
        d: &mut DataDecoder,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, bool), DataError> {
        for (i, &b) in input.iter().enumerate() {
            d.line_len += 1;
            if d.after_cr {
                if b != b'\n' {
                    return Err(DataError::BareCr);
                }
                d.after_cr = false;
                d.longest_line = d.longest_line.max(d.line_len);
                d.line_len = 0;
                if d.dot_line {
                    return Ok((i + 1, true));
                }
                out.extend_from_slice(b"\r\n");
                d.line_start = true;
                continue;
            }
            match b {
                b'\r' => {
                    d.after_cr = true;
                    d.line_start = false;
                }
                b'\n' => return Err(DataError::BareLf),
                b'.' if d.line_start => {
                    d.dot_line = true;
                    d.line_start = false;
                    d.line_len -= 1;
                }
                _ => {
                    if b == 0 {
                        d.nul_seen = true;
                    }
                    d.dot_line = false;
                    d.line_start = false;
                    out.push(b);
                }
            }
        }
        Ok((input.len(), false))
    }

    /// Inputs with long runs of plain bytes (the fast path) between the bytes that
    /// matter (CR, LF, NUL, dots), cut into random chunks: the fast decoder and line
    /// checker decide exactly as the byte-at-a-time ones, at every step.
    #[test]
    fn the_fast_paths_match_the_bytewise_reference() {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move |n: usize| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
        };
        const SPECIAL: &[u8] = b"\r\n\r\n\r\n..\0\x80";
        for round in 0..20_000 {
            let mut input = Vec::new();
            for _ in 0..next(12) {
                let run = [0, 1, 7, 8, 9, 15, 16, 17, 40][next(9)];
                input.extend((0..run).map(|k| b'a' + (k % 26) as u8));
                input.push(SPECIAL[next(SPECIAL.len())]);
            }
            if round % 3 == 0 {
                input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
            }
            let mut cuts: Vec<usize> = (0..next(5)).map(|_| next(input.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(input.len());
            let (mut fast, mut slow) = (DataDecoder::default(), DataDecoder::default());
            let (mut fast_out, mut slow_out) = (Vec::new(), Vec::new());
            let (mut fast_lines, mut slow_lines) = (LineChecker::default(), LineChecker::default());
            let mut from = 0;
            for &cut in &cuts {
                let chunk = &input[from..cut];
                from = cut;
                fast_lines.feed(chunk);
                for &b in chunk {
                    // The checker's reference: one byte at a time never takes the run.
                    slow_lines.feed(&[b]);
                }
                let got = fast.feed(chunk, &mut fast_out);
                let want = bytewise(&mut slow, chunk, &mut slow_out);
                assert_eq!(got, want, "input {input:?} cut at {cuts:?}");
                assert_eq!(fast_out, slow_out, "input {input:?} cut at {cuts:?}");
                assert_eq!(
                    (fast.longest_line, fast.nul_seen, fast.line_len),
                    (slow.longest_line, slow.nul_seen, slow.line_len),
                    "input {input:?} cut at {cuts:?}"
                );
                if !matches!(got, Ok((_, false))) {
                    break;
                }
            }
            fast_lines.finish();
            slow_lines.finish();
            assert_eq!(
                (
                    fast_lines.bare,
                    fast_lines.nul_seen,
                    fast_lines.longest_line
                ),
                (
                    slow_lines.bare,
                    slow_lines.nul_seen,
                    slow_lines.longest_line
                ),
                "input {input:?}"
            );
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
