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

impl Session<'_> {
    /// `Some(reply)` defers the recipient (451 4.7.1).
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
        if let Some(why) = g
            .greylist
            .exempt(
                self.client.ip,
                &helo,
                &self.settings.hostname,
                &sender,
                &recipient,
                &g.delimiter,
            )
            .await
        {
            tracing::debug!(client = %self.client.ip, from = %sender, to = %recipient, ?why, "not greylisted: allowed by policy");
            return None;
        }
        let triplet = Triplet::new(self.client.ip, g.ipv6_prefix, &sender, &recipient);
        match g.greylist.store.check(&g.timing, &triplet).await {
            Ok(Decision::Defer { retry_in }) => {
                tracing::info!(client = %self.client.ip, network = %triplet.network, from = %sender, to = %recipient, retry_in, "greylisted");
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
                Some(Reply::new(
                    451,
                    EnhancedStatus::new(4, 7, 1),
                    format!(
                        "<{recipient}>: Recipient address rejected: Greylisted, please try again in {retry_in} seconds"
                    ),
                ))
            }
            Ok(Decision::Pass | Decision::Whitelisted) => None,
            Err(e) => {
                tracing::warn!(cause = %e, client = %self.client.ip, to = %recipient, "greylisting skipped: its store cannot answer; the recipient passes");
                None
            }
        }
    }
}
