//! Greylisting at RCPT (`greylist.*`): a recipient of a triplet (client network, sender,
//! recipient) not seen before is deferred with 451 4.7.1, as Postfix with postgrey
//! answers; a real MTA retries after `greylist.delay` and passes. Runs after recipient
//! verification and the account's budget, so that an unknown user or an account over
//! its limit never costs a greylist entry. Trusted clients (mynetworks, authenticated
//! sessions, reinjection) are never greylisted, nor are senders a policy allows (with an
//! SPF pass where the policy needs an authenticated sender). When the store cannot
//! answer, the recipient passes: greylisting must never cost mail.

use super::*;

use mb_core::greylist::{Decision, Triplet};

/// What greylisting remembers within one transaction (one MAIL FROM).
#[derive(Debug, Default)]
pub(super) struct TxState {
    /// `summary.mail` when this state was made: a new MAIL starts a new state.
    mail: u32,
    /// The SPF result for the exemption (client, HELO and sender do not change within
    /// a transaction), once asked.
    spf_passed: Option<bool>,
    /// Recipients deferred so far in this transaction.
    deferred: u32,
}

impl Session<'_> {
    /// `Some(reply)` defers the recipient (451 4.7.1). Only the transaction's first
    /// deferral counts against `smtp.max_errors` and is written to the message log: a
    /// first-time sender with many recipients is deferred on each, which is greylisting
    /// working, not the client misbehaving.
    pub(super) async fn greylist(&mut self, rcpt: &Mailbox) -> Option<Reply> {
        let g = self.settings.greylist.as_ref()?;
        if self.listener == Listener::Reinject
            || self.auth_user.is_some()
            || self
                .settings
                .mynetworks
                .iter()
                .any(|n| n.contains(&self.client.ip))
        {
            return None;
        }
        let sender = self
            .tx
            .as_ref()?
            .sender
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let recipient = rcpt.to_string();
        let helo = self.helo.clone().unwrap_or_default();
        if self.greylist_tx.mail != self.summary.mail {
            self.greylist_tx = TxState {
                mail: self.summary.mail,
                ..TxState::default()
            };
        }
        let mut spf_memo = self.greylist_tx.spf_passed;
        let exempt = g
            .greylist
            .exempt(
                self.client.ip,
                &helo,
                &self.settings.hostname,
                &sender,
                &recipient,
                &g.delimiter,
                &mut spf_memo,
            )
            .await;
        self.greylist_tx.spf_passed = spf_memo;
        if let Some(why) = exempt {
            tracing::debug!(client = %self.client.ip, from = %sender, to = %recipient, ?why, "not greylisted: allowed by policy");
            return None;
        }
        let triplet = Triplet::new(self.client.ip, g.ipv6_prefix, &sender, &recipient);
        match g.greylist.store.check(&g.timing, &triplet).await {
            Ok(Decision::Defer { retry_in }) => {
                tracing::info!(client = %self.client.ip, network = %triplet.network, from = %sender, to = %recipient, retry_in, "greylisted");
                self.greylist_tx.deferred += 1;
                if self.greylist_tx.deferred > 1 {
                    self.own_tempfail = true;
                    return Some(deferral(&recipient, retry_in));
                }
                self.event(
                    "greylisted",
                    "tempfail",
                    &sender,
                    vec![recipient.clone()],
                    0,
                    String::new(),
                    &format!(
                        "greylisted: triplet {} <{}> <{}>, retry in {retry_in}s",
                        triplet.network, triplet.sender, triplet.recipient
                    ),
                );
                Some(deferral(&recipient, retry_in))
            }
            Ok(Decision::Pass | Decision::Whitelisted) => None,
            Err(e) => {
                tracing::warn!(cause = %e, client = %self.client.ip, to = %recipient, "greylisting skipped: its store cannot answer; the recipient passes");
                None
            }
        }
    }
}

fn deferral(recipient: &str, retry_in: i64) -> Reply {
    Reply::new(
        451,
        EnhancedStatus::new(4, 7, 1),
        format!(
            "<{recipient}>: Recipient address rejected: Greylisted, please try again in {retry_in} seconds"
        ),
    )
}
