//! AUTH PLAIN and LOGIN (RFC 4954, RFC 4616), only over TLS on the submission ports.

use super::*;

impl Session<'_> {
    /// AUTH PLAIN and LOGIN (RFC 4954), only under TLS.
    pub(super) async fn auth(&mut self, arg: &str) -> bool {
        if self.tls.is_none() {
            return self
                .error(Reply::new(
                    538,
                    EnhancedStatus::new(5, 7, 11),
                    "Encryption required for requested authentication mechanism",
                ))
                .await;
        }
        let Some(auth) = self.settings.auth.clone() else {
            return self
                .error(Reply::new(
                    503,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: authentication not enabled",
                ))
                .await;
        };
        if self.auth_user.is_some() {
            return self
                .error(Reply::new(
                    503,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: already authenticated",
                ))
                .await;
        }
        if self.tx.is_some() {
            return self
                .error(Reply::new(
                    503,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: MAIL transaction in progress",
                ))
                .await;
        }
        let mut words = arg.split_ascii_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let creds = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => Some(r),
                    None => self.challenge("").await,
                };
                match response.as_deref().map(decode_plain) {
                    Some(Ok(c)) => Some(c),
                    Some(Err(r)) => return self.error(r).await,
                    None => None,
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(r) => Some(r),
                    None => self.challenge("VXNlcm5hbWU6").await,
                };
                let user = match user.as_deref().map(base64_text) {
                    Some(Ok(u)) => u,
                    Some(Err(r)) => return self.error(r).await,
                    None => {
                        return self
                            .error(Reply::new(
                                501,
                                EnhancedStatus::new(5, 7, 0),
                                "Authentication aborted",
                            ))
                            .await;
                    }
                };
                match self
                    .challenge("UGFzc3dvcmQ6")
                    .await
                    .as_deref()
                    .map(base64_text)
                {
                    Some(Ok(p)) => Some((user, p)),
                    Some(Err(r)) => return self.error(r).await,
                    None => None,
                }
            }
            _ => {
                return self
                    .error(Reply::new(
                        504,
                        EnhancedStatus::BAD_ARGUMENTS,
                        "Unrecognized authentication type",
                    ))
                    .await;
            }
        };
        let Some((user, password)) = creds else {
            return self
                .error(Reply::new(
                    501,
                    EnhancedStatus::new(5, 7, 0),
                    "Authentication aborted",
                ))
                .await;
        };
        let verdict = tokio::time::timeout(
            self.settings.timeout,
            auth.verify(&user, &password, self.client.ip),
        )
        .await
        .unwrap_or(Err(AuthError::Timeout));
        match verdict {
            Ok(Some(addresses)) => {
                tracing::info!(client = %self.client.ip, user = %loggable(&user), mechanism = %mechanism, "authenticated");
                self.auth_user = Some(user);
                self.auth_addresses = addresses;
                self.reply(Reply::new(
                    235,
                    EnhancedStatus::new(2, 7, 0),
                    "Authentication successful",
                ));
                false
            }
            Ok(None) => {
                self.summary.auth_failed += 1;
                // One stable line per failure: etc/fail2ban/filter.d/mailborder-auth.conf matches it.
                tracing::warn!(
                    "authentication failed client={} user={} service=mb-smtpd mechanism={mechanism}",
                    self.client.ip,
                    loggable(&user)
                );
                // Each failure costs the client more time.
                let pause = Duration::from_millis(500 * u64::from(self.summary.auth_failed))
                    .min(Duration::from_secs(5));
                let _ = self.conn.flush().await;
                tokio::time::sleep(pause).await;
                if self.summary.auth_failed >= MAX_AUTH_FAILURES {
                    self.close(
                        self.fatal(
                            421,
                            EnhancedStatus::new(4, 7, 0),
                            "Error: too many failed authentications",
                        ),
                        "too many auth failures",
                    )
                    .await;
                    return true;
                }
                self.error(Reply::new(
                    535,
                    EnhancedStatus::new(5, 7, 8),
                    "Error: authentication failed",
                ))
                .await
            }
            Err(e) => {
                tracing::error!(client = %self.client.ip, cause = %e, "cannot check a password");
                self.error(Reply::new(
                    454,
                    EnhancedStatus::new(4, 7, 0),
                    "Temporary authentication failure",
                ))
                .await
            }
        }
    }

    /// Sends a 334 challenge and reads the answer; `None` when the client cancels ("*")
    /// or goes away.
    pub(super) async fn challenge(&mut self, text: &str) -> Option<String> {
        self.conn.queue(&format!("334 {text}\r\n"));
        let line = self
            .conn
            .read_line(proto::MAX_COMMAND_LINE * 24)
            .await
            .ok()?;
        let line = String::from_utf8(line).ok()?;
        (line != "*").then_some(line)
    }
}

/// `authzid NUL authcid NUL password`, base64-encoded (RFC 4616).
fn decode_plain(b64: &str) -> Result<(String, String), Reply> {
    let bad = || {
        Reply::new(
            501,
            EnhancedStatus::SYNTAX_ERROR,
            "Error: invalid AUTH PLAIN response",
        )
    };
    let raw = base64_decode(b64).ok_or_else(bad)?;
    let mut parts = raw.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad());
    let (authz, user, pass) = (text(authz)?, text(user)?, text(pass)?);
    if !authz.is_empty() && authz != user {
        return Err(Reply::new(
            535,
            EnhancedStatus::new(5, 7, 8),
            "Error: authorization identity differs",
        ));
    }
    Ok((user, pass))
}

fn base64_text(b64: &str) -> Result<String, Reply> {
    base64_decode(b64)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| Reply::new(501, EnhancedStatus::SYNTAX_ERROR, "Error: invalid base64"))
}

/// Standard base64 with padding (RFC 4648 §4), strict.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.is_empty() || s == "=" {
        return Some(Vec::new());
    }
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for (j, c) in chunk.iter().enumerate() {
            let v = if j >= 4 - pad { 0 } else { val(*c)? };
            n = (n << 6) | v;
        }
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Some(out)
}

/// A user name fit for a log line: printable, no spaces, at most 64 characters.
fn loggable(user: &str) -> String {
    user.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}
