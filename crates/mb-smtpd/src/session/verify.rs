//! Recipient verification at RCPT (`smtp.recipient_verification`): after relay control,
//! for recipients at served domains only (mail that mynetworks or authenticated clients
//! relay elsewhere is not verified). An unknown user gets Postfix's
//! `550 5.1.1 <addr>: Recipient address rejected: User unknown`, which counts against the
//! session's error limit (so a dictionary attack ends with 421), and an event in the
//! message log; an answer that cannot be had gets 450 4.1.1. Refusing here, before the
//! message is taken, is what keeps the gateway from bouncing to forged senders later.
//! The reinjection port is not verified.

use super::*;
use crate::recipients::{Answer, Mode};

impl Session<'_> {
    /// `Some(reply)` refuses the recipient (550 5.1.1 unknown, 450 4.1.1 cannot tell).
    pub(super) async fn verify_recipient(&mut self, rcpt: &Mailbox, served: bool) -> Option<Reply> {
        let mode = self.settings.recipient_verification;
        // Reinjected mail (quarantine releases, content-filter returns) was taken once
        // already; refusing it now would only turn into a failed release.
        if !served || mode == Mode::None || rcpt.is_literal() || self.listener == Listener::Reinject
        {
            return None;
        }
        // RFC 5321 §4.5.1: postmaster of a served domain is always accepted.
        if rcpt.local.eq_ignore_ascii_case("postmaster") {
            return None;
        }
        let verifier = self.settings.verifier.clone()?;
        let address = format!("{}@{}", canonical_local(&rcpt.local), rcpt.domain);
        let answer = verifier
            .check(mode, &address, &self.settings.recipient_delimiter)
            .await;
        match answer {
            Answer::Accept => None,
            Answer::Unknown(why) => {
                tracing::info!(client = %self.client.ip, to = %address, reason = %why, "recipient rejected: user unknown");
                let sender = self
                    .tx
                    .as_ref()
                    .and_then(|t| t.sender.as_ref())
                    .map(ToString::to_string)
                    .unwrap_or_default();
                self.event(
                    "rejected",
                    "reject",
                    &sender,
                    vec![address.clone()],
                    0,
                    String::new(),
                    "recipient address rejected: user unknown",
                );
                Some(Reply::new(
                    550,
                    EnhancedStatus::new(5, 1, 1),
                    format!("<{address}>: Recipient address rejected: User unknown"),
                ))
            }
            Answer::TryLater(why) => {
                tracing::warn!(client = %self.client.ip, to = %address, reason = %why, "recipient verification could not answer: 450");
                Some(Reply::new(
                    450,
                    EnhancedStatus::new(4, 1, 1),
                    format!(
                        "<{address}>: Recipient address rejected: unverified address: recipient verification failed, try again later"
                    ),
                ))
            }
        }
    }
}

/// The local part as verification compares it: `"bob"` is `bob` (RFC 5321 §4.1.2: a
/// quoted string that needs no quoting is the same mailbox), so the list, LDAP and the
/// callout cache see one spelling. A local part that needs its quotes keeps them.
pub(crate) fn canonical_local(local: &str) -> std::borrow::Cow<'_, str> {
    let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) else {
        return local.into();
    };
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_atom = !inner.is_empty()
        && inner
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext));
    if dot_atom { inner.into() } else { local.into() }
}

#[cfg(test)]
mod canonical_tests {
    use super::canonical_local;

    #[test]
    fn quoted_local_parts_that_need_no_quotes_lose_them() {
        for (local, want) in [
            ("bob", "bob"),
            ("\"bob\"", "bob"),
            ("\"bob.smith+tag\"", "bob.smith+tag"),
            ("\"john smith\"", "\"john smith\""),
            ("\"bob..x\"", "\"bob..x\""),
            ("\".bob\"", "\".bob\""),
            ("\"\"", "\"\""),
            ("\"a\\\\b\"", "\"a\\\\b\""),
        ] {
            assert_eq!(canonical_local(local), want, "{local}");
        }
    }
}
