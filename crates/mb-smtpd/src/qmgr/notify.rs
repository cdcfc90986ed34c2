//! What an attempt tells others. The sender: bounces, delay warnings and success notices,
//! built by `dsn.rs` and written into the spool as new null-sender messages. The message
//! log: one event per recipient state to mb-rpcd.
//!
//! The sender of mail from the internet (neither authenticated nor from mynetworks) is
//! usually forged: a notice to it is backscatter, which gets gateways blocklisted. Such
//! mail gets bounces only, with the headers of the message and never its body, and its
//! NOTIFY=SUCCESS and DELAY are ignored (here and when passed to the next hop).

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use mb_core::Config;

use super::{Delivery, Manager};
use crate::dsn::{self, Action, Report};
use crate::spool::{DeliveryState, Envelope, Recipient, RecipientState, RecipientStatus};

/// How this attempt handed a recipient over, which decides its success notice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Handoff {
    /// The next hop took the DSN parameters (it reports success itself).
    pub dsn_passed: bool,
    /// Final delivery (LMTP) rather than relaying.
    pub lmtp: bool,
}

impl Manager {
    /// Tells the sender what this attempt settled (bounces, success notices) and, once
    /// `queue.delay_warning` has passed, what is still waiting. Each notice is durable
    /// in the spool when this returns, before the state or completion that settles
    /// it is written: a crash can repeat a notice, never lose one. A bounce that cannot
    /// be queued leaves its recipients deferred (the message is kept and the bounce
    /// tried again), a delay warning that cannot be queued stays due. A success notice
    /// that cannot be queued is only logged: its recipients were delivered, and keeping
    /// them would deliver them twice.
    pub(super) async fn notify(
        &self,
        d: &Delivery<'_>,
        state: &mut DeliveryState,
        before: &[RecipientState],
        handoffs: &[Handoff],
    ) {
        let (failed, succeeded) = settled_reports(d.env, state, before, handoffs);
        if !self
            .notify_sender(d.cfg, d.env, d.message.original(), &failed, None)
            .await
        {
            for (r, was) in state.recipients.iter_mut().zip(before) {
                if r.state == RecipientState::Bounced && *was != RecipientState::Bounced {
                    r.state = RecipientState::Deferred;
                }
            }
        }
        self.notify_sender(d.cfg, d.env, d.message.original(), &succeeded, None)
            .await;
        let warning = d.cfg.duration("queue.delay_warning").as_secs();
        if warning > 0 && d.age >= warning && !state.delay_warned {
            let delayed = delay_reports(d.env, state);
            if state
                .recipients
                .iter()
                .any(|r| r.state == RecipientState::Deferred)
            {
                let until = SystemTime::UNIX_EPOCH + Duration::from_secs(d.expiry());
                state.delay_warned = self
                    .notify_sender(d.cfg, d.env, d.message.original(), &delayed, Some(until))
                    .await;
            }
        }
    }

    /// Writes a DSN about `env` into the spool (null sender, to the original sender)
    /// and waits until it is durable. Nothing goes to the null sender: a notice about a
    /// notice would loop. Returns false only when a notice was due and could not be
    /// queued.
    async fn notify_sender(
        &self,
        cfg: &Config,
        env: &Envelope,
        message: dsn::Original<'_>,
        reports: &[Report],
        until: Option<SystemTime>,
    ) -> bool {
        if reports.is_empty() || env.sender.is_empty() {
            return true;
        }
        let internet = from_internet(cfg, env);
        if internet && reports.iter().any(|r| r.action != Action::Failed) {
            tracing::info!(id = %env.id, to = %env.sender, action = ?reports[0].action,
                "no notice to the sender of mail from the internet (only failures are reported)");
            return true;
        }
        let headers_only;
        let env = if internet {
            headers_only = Envelope {
                ret: "HDRS".into(),
                ..env.clone()
            };
            &headers_only
        } else {
            env
        };
        let hostname = crate::server::hostname(cfg);
        let body = dsn::build(&hostname, env, message, reports, self.clock.now(), until);
        let id = self.spool.new_id();
        let notice = notice_envelope(&id, self.clock.unix(), &hostname, &env.sender);
        let written = async {
            let mut w = self.spool.create(&id).await?;
            w.write(&body).await?;
            w.commit_off_thread(&notice).await
        };
        let written: Result<(), crate::spool::Error> = written.await;
        match written {
            Ok(()) => {
                self.counters.notices.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id = %env.id, notice = %id, to = %env.sender, action = ?reports[0].action, "sender notified");
                true
            }
            Err(e) => {
                tracing::error!(id = %env.id, cause = %e, "cannot queue a delivery status notification");
                false
            }
        }
    }

    /// One message-log event per recipient state, with the recipients in it.
    pub(super) fn event(&self, env: &Envelope, state: &DeliveryState, size: u64) {
        let Some(sink) = &self.events else { return };
        for stage in [
            RecipientState::Delivered,
            RecipientState::Deferred,
            RecipientState::Bounced,
        ] {
            let rcpts: Vec<String> = state
                .recipients
                .iter()
                .filter(|r| r.state == stage)
                .map(|r| r.address.clone())
                .collect();
            if rcpts.is_empty() {
                continue;
            }
            let detail = state
                .recipients
                .iter()
                .find(|r| r.state == stage)
                .map(|r| {
                    if stage == RecipientState::Delivered {
                        r.remote.clone()
                    } else {
                        r.last_error.clone()
                    }
                })
                .unwrap_or_default();
            sink.send(mb_proto::v1::MessageEvent {
                daemon: "mb-smtpd".into(),
                queue_id: env.id.clone(),
                client_ip: env.client_ip.clone(),
                helo: env.helo.clone(),
                sender: env.sender.clone(),
                recipients: rcpts,
                size,
                stage: stage.as_str().into(),
                detail,
                ..Default::default()
            });
        }
    }
}

/// Whether `env` came from the internet: neither authenticated nor from `smtp.mynetworks`
/// (an unreadable client address counts as the internet; no client address at all is
/// mail made here).
pub(super) fn from_internet(cfg: &Config, env: &Envelope) -> bool {
    if !env.auth_user.is_empty() || env.client_ip.is_empty() {
        return false;
    }
    let Ok(ip) = env.client_ip.parse::<std::net::IpAddr>() else {
        return true;
    };
    !cfg.nets("smtp.mynetworks").iter().any(|n| n.contains(&ip))
}

/// NOTIFY as passed on to the next hop: for mail from the internet, without SUCCESS
/// and DELAY. What the sender asked for stays otherwise: `SUCCESS` alone (no failure
/// notices) becomes `NEVER`, not the default.
pub(super) fn effective_notify(internet: bool, notify: &str) -> String {
    if !internet || notify.is_empty() {
        return notify.to_string();
    }
    let kept: Vec<&str> = notify
        .split(',')
        .map(str::trim)
        .filter(|w| w.eq_ignore_ascii_case("FAILURE") || w.eq_ignore_ascii_case("NEVER"))
        .collect();
    if kept.is_empty() {
        "NEVER".into()
    } else {
        kept.join(",")
    }
}

/// The reports for recipients this attempt settled: (failures, successes), each as the
/// recipient's NOTIFY asks. A success the next hop reports itself is not reported twice.
fn settled_reports(
    env: &Envelope,
    state: &DeliveryState,
    before: &[RecipientState],
    handoffs: &[Handoff],
) -> (Vec<Report>, Vec<Report>) {
    let mut failed = Vec::new();
    let mut succeeded = Vec::new();
    for (i, r) in state.recipients.iter().enumerate() {
        if before[i] == r.state {
            continue;
        }
        let rcpt = &env.recipients[i];
        match r.state {
            RecipientState::Bounced if dsn::wanted(&rcpt.notify, Action::Failed) => {
                failed.push(report(r, rcpt, Action::Failed));
            }
            RecipientState::Delivered => {
                let action = if handoffs[i].lmtp {
                    Action::Delivered
                } else {
                    Action::Relayed
                };
                if !handoffs[i].dsn_passed && dsn::wanted(&rcpt.notify, action) {
                    let mut rep = report(r, rcpt, action);
                    rep.diagnostic = "250 2.0.0 delivered".into();
                    succeeded.push(rep);
                }
            }
            _ => {}
        }
    }
    (failed, succeeded)
}

/// The delay warning's reports: every deferred recipient whose NOTIFY asks for one.
fn delay_reports(env: &Envelope, state: &DeliveryState) -> Vec<Report> {
    state
        .recipients
        .iter()
        .zip(&env.recipients)
        .filter(|(r, e)| {
            r.state == RecipientState::Deferred && dsn::wanted(&e.notify, Action::Delayed)
        })
        .map(|(r, e)| report(r, e, Action::Delayed))
        .collect()
}

fn report(r: &RecipientStatus, rcpt: &Recipient, action: Action) -> Report {
    Report {
        address: r.address.clone(),
        orcpt: rcpt.orcpt.clone(),
        action,
        diagnostic: r.last_error.clone(),
        remote_mta: host_of(&r.remote),
    }
}

/// The envelope of a notice: from the null sender, to `sender`, never itself notified.
fn notice_envelope(id: &str, now: u64, hostname: &str, sender: &str) -> Envelope {
    Envelope {
        id: id.to_string(),
        received_at: now,
        client_ip: "127.0.0.1".into(),
        client_name: "localhost".into(),
        helo: hostname.to_string(),
        protocol: "local".into(),
        sender: String::new(),
        recipients: vec![Recipient {
            address: sender.to_string(),
            notify: "NEVER".into(),
            orcpt: String::new(),
        }],
        body: "8BITMIME".into(),
        smtputf8: !sender.is_ascii(),
        listener: "dsn".into(),
        ..Default::default()
    }
}

/// `dns; host` for the DSN's Remote-MTA, from `host[ip]:port`.
fn host_of(remote: &str) -> String {
    match remote.split('[').next() {
        Some(h) if !h.is_empty() => format!("dns; {h}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RecipientState::{Bounced, Deferred, Delivered, Queued};

    fn envelope(notify: &[&str]) -> Envelope {
        Envelope {
            sender: "alice@sender.example".into(),
            recipients: notify
                .iter()
                .enumerate()
                .map(|(i, n)| Recipient {
                    address: format!("r{i}@x.example"),
                    notify: n.to_string(),
                    orcpt: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn state(states: &[RecipientState]) -> DeliveryState {
        DeliveryState {
            recipients: states
                .iter()
                .enumerate()
                .map(|(i, s)| RecipientStatus {
                    address: format!("r{i}@x.example"),
                    state: *s,
                    last_error: format!("error {i}"),
                    remote: "mx.x.example[192.0.2.1]:25".into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_what_this_attempt_settled_is_reported_as_notify_asks() {
        let env = envelope(&["", "", "SUCCESS", "SUCCESS", "SUCCESS", "NEVER", ""]);
        let before = [Queued, Bounced, Queued, Queued, Deferred, Queued, Queued];
        let after = state(&[
            Bounced, Bounced, Delivered, Delivered, Delivered, Bounced, Deferred,
        ]);
        let handoffs = [
            Handoff::default(),
            Handoff::default(),
            Handoff::default(),
            Handoff {
                dsn_passed: true,
                lmtp: false,
            },
            Handoff {
                dsn_passed: false,
                lmtp: true,
            },
            Handoff::default(),
            Handoff::default(),
        ];
        let (failed, succeeded) = settled_reports(&env, &after, &before, &handoffs);
        // r1 bounced earlier, r5 asked for nothing, r6 still waits.
        let failed: Vec<(&str, &str)> = failed
            .iter()
            .map(|r| (r.address.as_str(), r.diagnostic.as_str()))
            .collect();
        assert_eq!(failed, [("r0@x.example", "error 0")]);
        // r3's next hop reports success itself.
        let succeeded: Vec<(&str, Action, &str)> = succeeded
            .iter()
            .map(|r| (r.address.as_str(), r.action, r.diagnostic.as_str()))
            .collect();
        assert_eq!(
            succeeded,
            [
                ("r2@x.example", Action::Relayed, "250 2.0.0 delivered"),
                ("r4@x.example", Action::Delivered, "250 2.0.0 delivered"),
            ]
        );

        let delayed = delay_reports(&env, &after);
        assert_eq!(delayed.len(), 1);
        assert_eq!(delayed[0].address, "r6@x.example");
        assert_eq!(delayed[0].remote_mta, "dns; mx.x.example");
    }

    #[test]
    fn remote_mta_is_the_host_name() {
        assert_eq!(host_of("mx.example[192.0.2.1]:25"), "dns; mx.example");
        assert_eq!(host_of(""), "");
        assert_eq!(host_of("[192.0.2.1]:25"), "");
    }
}
