//! DATA and BDAT (RFC 5321 §4.1.1.4, RFC 3030): the message streamed to the spool,
//! the Received field, and the commit that precedes every 250.

use super::*;

impl<'a> Session<'a> {
    pub(super) fn ready_for_data(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(Reply::new(
                503,
                EnhancedStatus::BAD_SEQUENCE,
                "Error: need MAIL command",
            )),
            Some(tx) if tx.rcpts.is_empty() => Some(Reply::new(
                554,
                EnhancedStatus::BAD_SEQUENCE,
                "Error: no valid recipients",
            )),
            _ => None,
        }
    }

    /// The pacing of this session's messages (none: not paced, session/pace.rs).
    fn data_rate(&self) -> Option<&'a pace::DataRate> {
        let settings: &'a Settings = self.settings;
        settings.data_rate.as_ref().filter(|r| {
            r.applies(
                self.client.ip,
                self.auth_user.is_some(),
                &settings.mynetworks,
            )
        })
    }

    pub(super) async fn data(&mut self) -> bool {
        if let Some(r) = self.ready_for_data() {
            return self.error(r).await;
        }
        if self.tx.as_ref().is_some_and(|t| t.bdat.is_some()) {
            return self
                .error(Reply::new(
                    503,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: DATA after BDAT",
                ))
                .await;
        }
        // DATA ends a pipelined group (RFC 2920): input before 354 is not a message.
        if self.refuse_pipelined_input("DATA").await {
            return true;
        }
        let id = self.spool.new_id();
        let mut writer = match self.spool.create(&id).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(cause = %e, "cannot start a message in the spool");
                self.tx = None;
                return self
                    .error(Reply::new(
                        451,
                        EnhancedStatus::SYSTEM_TEMPORARY,
                        "Error: queue file write error",
                    ))
                    .await;
            }
        };
        let received = self.received_header(&id);
        if writer.write(received.as_bytes()).await.is_err() {
            self.tx = None;
            return self
                .error(Reply::new(
                    451,
                    EnhancedStatus::SYSTEM_TEMPORARY,
                    "Error: queue file write error",
                ))
                .await;
        }
        if self
            .conn
            .send("354 End data with <CR><LF>.<CR><LF>\r\n")
            .await
            .is_err()
        {
            return true;
        }
        let mut decoder = DataDecoder::default();
        let mut out = Vec::with_capacity(64 * 1024);
        let mut size: u64 = 0;
        let mut too_big = false;
        let mut write_failed = false;
        let mut pacer = pace::Pacer::new(self.data_rate());
        // Pushed back by the pacer's sleeps: the client is not slow when we are.
        let mut deadline = tokio::time::Instant::now() + self.settings.data_deadline;
        loop {
            if tokio::time::Instant::now() > deadline {
                self.close(
                    self.fatal(
                        421,
                        EnhancedStatus::new(4, 4, 2),
                        "Error: message took too long to send",
                    ),
                    "DATA deadline",
                )
                .await;
                return true;
            }
            if self.conn.buffered().is_empty()
                && let Err(e) = self.conn.fill().await
            {
                match e {
                    ReadError::Timeout => {
                        let r = self.fatal(
                            421,
                            EnhancedStatus::new(4, 4, 2),
                            "Error: timeout exceeded",
                        );
                        self.close(r, "timeout in DATA").await;
                    }
                    _ => self.summary.end = "lost in DATA",
                }
                return true;
            }
            out.clear();
            let (used, done) = match decoder.feed(self.conn.buffered(), &mut out) {
                Ok(r) => r,
                Err(e) => {
                    let what = if e == DataError::BareLf {
                        "bare <LF>"
                    } else {
                        "bare <CR>"
                    };
                    self.close(
                        self.fatal(
                            521,
                            EnhancedStatus::SYNTAX_ERROR,
                            &format!("Error: {what} received"),
                        ),
                        "smuggling attempt",
                    )
                    .await;
                    tracing::warn!(client = %self.client.ip, "{what} in DATA, session closed");
                    return true;
                }
            };
            self.conn.consume(used);
            size += out.len() as u64;
            if size > self.settings.max_size {
                too_big = true;
            }
            if !too_big && !write_failed && writer.write(&out).await.is_err() {
                write_failed = true;
            }
            if done {
                break;
            }
            if let Some(p) = pacer.as_mut() {
                deadline += p.pace(used as u64).await;
            }
        }
        let reply = if too_big {
            Reply::new(552, EnhancedStatus::TOO_BIG, "Error: message file too big")
        } else if write_failed {
            Reply::new(
                451,
                EnhancedStatus::SYSTEM_TEMPORARY,
                "Error: queue file write error",
            )
        } else if decoder.nul_seen {
            Reply::new(
                554,
                EnhancedStatus::BAD_CONTENT,
                "Error: message contains a NUL byte",
            )
        } else if decoder.longest_line > proto::MAX_TEXT_LINE {
            Reply::new(
                554,
                EnhancedStatus::BAD_CONTENT,
                "Error: message has a line longer than 998 characters",
            )
        } else {
            self.commit(writer, size).await
        };
        self.tx = None;
        if reply.is_error() {
            return self.error(reply).await;
        }
        self.reply(reply);
        false
    }

    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> bool {
        // The chunk follows whatever happens: read it before answering.
        let mut remaining = size;
        let mut chunk = Vec::new();
        let keep = self.ready_for_data().is_none()
            && self.tx.as_ref().is_some_and(|t| t.bdat_failed.is_none());
        let rate = self.data_rate();
        if keep && let Some(tx) = self.tx.as_mut().filter(|t| t.bdat_pacer.is_none()) {
            tx.bdat_pacer = pace::Pacer::new(rate);
        }
        // Pushed back by the pacer's sleeps: the client is not slow when we are.
        let mut deadline = tokio::time::Instant::now() + self.settings.data_deadline;
        while remaining > 0 {
            if tokio::time::Instant::now() > deadline {
                self.close(
                    self.fatal(
                        421,
                        EnhancedStatus::new(4, 4, 2),
                        "Error: message took too long to send",
                    ),
                    "DATA deadline",
                )
                .await;
                return true;
            }
            if self.conn.buffered().is_empty() && self.conn.fill().await.is_err() {
                self.summary.end = "lost in BDAT";
                return true;
            }
            let avail = self.conn.buffered();
            let n = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(avail.len());
            if keep {
                chunk.extend_from_slice(&avail[..n]);
            }
            self.conn.consume(n);
            remaining -= n as u64;
            if keep && chunk.len() >= 64 * 1024 {
                self.bdat_write(&chunk).await;
                chunk.clear();
            }
            if keep
                && (remaining > 0 || !last)
                && let Some(p) = self.tx.as_mut().and_then(|t| t.bdat_pacer.as_mut())
            {
                deadline += p.pace(n as u64).await;
            }
        }
        if let Some(r) = self.ready_for_data() {
            return self.error(r).await;
        }
        self.bdat_write(&chunk).await;
        let failed = self.tx.as_ref().and_then(|t| t.bdat_failed.clone());
        if !last {
            if let Some(r) = failed {
                return self.error(r).await;
            }
            let got = self
                .tx
                .as_ref()
                .and_then(|t| t.bdat.as_ref())
                .map_or(0, |(_, n)| *n);
            self.reply(Reply::new(
                250,
                EnhancedStatus::OK,
                format!("{got} octets received"),
            ));
            return false;
        }
        let writer = self.tx.as_mut().and_then(|t| t.bdat.take());
        let content = self.tx.as_mut().map(|t| {
            t.bdat_lines.finish();
            (
                t.bdat_lines.bare,
                t.bdat_lines.nul_seen,
                t.bdat_lines.longest_line,
            )
        });
        let failed = failed.or_else(|| match content {
            Some((true, _, _)) => Some(Reply::new(
                554,
                EnhancedStatus::BAD_CONTENT,
                "Error: message contains a bare CR or LF",
            )),
            Some((_, true, _)) => Some(Reply::new(
                554,
                EnhancedStatus::BAD_CONTENT,
                "Error: message contains a NUL byte",
            )),
            Some((_, _, n)) if n > proto::MAX_TEXT_LINE => Some(Reply::new(
                554,
                EnhancedStatus::BAD_CONTENT,
                "Error: message has a line longer than 998 characters",
            )),
            _ => None,
        });
        let reply = match (failed, writer) {
            (Some(r), _) => r,
            (None, Some((writer, total))) => self.commit(writer, total).await,
            (None, None) => Reply::new(
                451,
                EnhancedStatus::SYSTEM_TEMPORARY,
                "Error: queue file write error",
            ),
        };
        self.tx = None;
        if reply.is_error() {
            return self.error(reply).await;
        }
        self.reply(reply);
        false
    }

    pub(super) async fn bdat_write(&mut self, bytes: &[u8]) {
        let max = self.settings.max_size;
        let Some(tx) = self.tx.as_mut() else { return };
        if tx.bdat_failed.is_some() {
            return;
        }
        if tx.bdat.is_none() {
            let id = self.spool.new_id();
            match self.spool.create(&id).await {
                Ok(mut w) => {
                    let received = received_header(
                        &self.settings.hostname,
                        self.helo.as_deref().unwrap_or(""),
                        &self.client,
                        &protocol(
                            self.esmtp,
                            self.tls.is_some(),
                            self.auth_user.is_some(),
                            tx.params.smtputf8,
                        ),
                        self.tls.as_deref(),
                        &id,
                        // "for" names the recipient only when there is one: others may be Bcc.
                        (tx.rcpts.len() == 1).then(|| &tx.rcpts[0].0),
                    );
                    if w.write(received.as_bytes()).await.is_err() {
                        tx.bdat_failed = Some(Reply::new(
                            451,
                            EnhancedStatus::SYSTEM_TEMPORARY,
                            "Error: queue file write error",
                        ));
                        return;
                    }
                    tx.bdat = Some((w, 0));
                }
                Err(_) => {
                    tx.bdat_failed = Some(Reply::new(
                        451,
                        EnhancedStatus::SYSTEM_TEMPORARY,
                        "Error: queue file write error",
                    ));
                    return;
                }
            }
        }
        tx.bdat_lines.feed(bytes);
        if let Some((w, total)) = tx.bdat.as_mut() {
            *total += bytes.len() as u64;
            if *total > max {
                tx.bdat_failed = Some(Reply::new(
                    552,
                    EnhancedStatus::TOO_BIG,
                    "Error: message file too big",
                ));
                tx.bdat = None;
            } else if w.write(bytes).await.is_err() {
                tx.bdat_failed = Some(Reply::new(
                    451,
                    EnhancedStatus::SYSTEM_TEMPORARY,
                    "Error: queue file write error",
                ));
                tx.bdat = None;
            }
        }
    }

    pub(super) fn received_header(&self, id: &str) -> String {
        let tx = self.tx.as_ref();
        received_header(
            &self.settings.hostname,
            self.helo.as_deref().unwrap_or(""),
            &self.client,
            &protocol(
                self.esmtp,
                self.tls.is_some(),
                self.auth_user.is_some(),
                tx.is_some_and(|t| t.params.smtputf8),
            ),
            self.tls.as_deref(),
            id,
            tx.filter(|t| t.rcpts.len() == 1).map(|t| &t.rcpts[0].0),
        )
    }

    /// Makes the message durable; only then is 250 sent.
    pub(super) async fn commit(&mut self, mut writer: SpoolWriter, size: u64) -> Reply {
        let id = writer.id.clone();
        if writer.hops() > crate::spool::MAX_HOPS {
            tracing::warn!(client = %self.client.ip, hops = writer.hops(), "message refused: too many hops");
            return Reply::new(
                554,
                EnhancedStatus::new(5, 4, 6),
                "Error: too many hops (a mail loop?)",
            );
        }
        let Some(tx) = self.tx.as_ref() else {
            return Reply::new(
                451,
                EnhancedStatus::SYSTEM_TEMPORARY,
                "Error: no transaction",
            );
        };
        let mut envelope = Envelope {
            id: id.clone(),
            received_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            client_ip: self.client.ip.to_string(),
            client_name: "unknown".into(),
            helo: self.helo.clone().unwrap_or_default(),
            protocol: protocol(
                self.esmtp,
                self.tls.is_some(),
                self.auth_user.is_some(),
                tx.params.smtputf8,
            ),
            tls: self.tls.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone().unwrap_or_default(),
            sender: tx
                .sender
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            recipients: tx
                .rcpts
                .iter()
                .map(|(r, p)| Recipient {
                    address: r.to_string(),
                    notify: p.notify.clone().unwrap_or_default(),
                    orcpt: p.orcpt.clone().unwrap_or_default(),
                })
                .collect(),
            body: tx.params.body.clone().unwrap_or_default(),
            smtputf8: tx.params.smtputf8,
            ret: tx.params.ret.clone().unwrap_or_default(),
            envid: tx.params.envid.clone().unwrap_or_default(),
            listener: self.listener.name().into(),
            add_headers: Vec::new(),
            remove_headers: Vec::new(),
        };
        // The filter sees the envelope the spool will keep, and its header changes are
        // kept with it.
        if let Some(scanner) = self.settings.scanner.clone() {
            match self.scan(scanner.as_ref(), &mut writer, &envelope).await {
                Ok(Some((add, remove))) => {
                    envelope.add_headers = add;
                    envelope.remove_headers = remove;
                }
                Ok(None) => {}
                Err(reply) => return reply,
            }
        }
        match writer.commit(&envelope).await {
            Ok(()) => {
                tracing::info!(
                    client = %self.client.ip,
                    id = %id,
                    from = %envelope.sender,
                    nrcpt = envelope.recipients.len(),
                    size,
                    "message accepted"
                );
                self.summary.accepted.push(id.clone());
                let rcpts = envelope
                    .recipients
                    .iter()
                    .map(|r| r.address.clone())
                    .collect();
                let detail = format!(
                    "listener={} protocol={}",
                    envelope.listener, envelope.protocol
                );
                self.event(
                    "received",
                    "accept",
                    &envelope.sender,
                    rcpts,
                    size,
                    id.clone(),
                    &detail,
                );
                self.error_count = 0;
                self.summary.bytes += size;
                Reply::new(250, EnhancedStatus::OK, format!("Ok: queued as {id}"))
            }
            Err(e) => {
                tracing::error!(cause = %e, "cannot commit a message to the spool");
                Reply::new(
                    451,
                    EnhancedStatus::SYSTEM_TEMPORARY,
                    "Error: queue file write error",
                )
            }
        }
    }
}

fn protocol(esmtp: bool, tls: bool, auth: bool, utf8: bool) -> String {
    let base = match (utf8, esmtp) {
        (true, _) => "UTF8SMTP",
        (false, true) => "ESMTP",
        (false, false) => "SMTP",
    };
    format!(
        "{base}{}{}",
        if tls { "S" } else { "" },
        if auth { "A" } else { "" }
    )
}

/// The trace header (RFC 5321 §4.4), prepended to every accepted message.
pub fn received_header(
    hostname: &str,
    helo: &str,
    client: &Client,
    protocol: &str,
    tls: Option<&str>,
    id: &str,
    rcpt: Option<&Mailbox>,
) -> String {
    let literal = match client.ip {
        IpAddr::V4(ip) => format!("[{ip}]"),
        IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
    };
    let mut h = format!(
        "Received: from {} (unknown {literal})\r\n\tby {hostname} (Mailborder) with {protocol} id {id}",
        sanitize(helo)
    );
    if let Some(tls) = tls {
        h.push_str(&format!("\r\n\t(using {tls})"));
    }
    if let Some(r) = rcpt {
        h.push_str(&format!("\r\n\tfor <{r}>"));
    }
    h.push_str(&format!("; {}\r\n", rfc5322_date(SystemTime::now())));
    h
}

fn sanitize(helo: &str) -> String {
    if helo.is_empty() {
        return "unknown".into();
    }
    helo.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

/// `Sat, 21 Nov 2026 23:59:59 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let ts = mb_runtime::logging::timestamp(t);
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]
        [usize::try_from((secs / 86_400) % 7).unwrap_or(0)];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (date, time) = ts.split_once(' ').unwrap_or((&ts, ""));
    let mut parts = date.split('-');
    let (y, m, d) = (
        parts.next().unwrap_or("1970"),
        parts.next().unwrap_or("01"),
        parts.next().unwrap_or("01"),
    );
    let month = months[m.parse::<usize>().unwrap_or(1).clamp(1, 12) - 1];
    format!(
        "{weekday}, {} {month} {y} {time} +0000",
        d.trim_start_matches('0')
    )
}
