//! MAIL FROM (RFC 5321 §4.1.1.2) with its parameters (SIZE, BODY, SMTPUTF8, RET, ENVID).

use super::*;

impl Session<'_> {
    pub(super) async fn mail(&mut self, sender: Option<Mailbox>, params: Params) -> Reply {
        if self.helo.is_none() && self.settings.helo_required {
            return Reply::new(
                503,
                EnhancedStatus::BAD_SEQUENCE,
                "Error: send HELO/EHLO first",
            );
        }
        if self.tx.is_some() {
            return Reply::new(
                503,
                EnhancedStatus::BAD_SEQUENCE,
                "Error: nested MAIL command",
            );
        }
        if !self.esmtp && (params != Params::default()) {
            return Reply::new(
                555,
                EnhancedStatus::BAD_ARGUMENTS,
                "Error: MAIL parameters need EHLO",
            );
        }
        if self.settings.require_tls && self.tls.is_none() {
            return Reply::new(
                530,
                EnhancedStatus::new(5, 7, 0),
                "Must issue a STARTTLS command first",
            );
        }
        if self.settings.require_auth && self.auth_user.is_none() {
            return Reply::new(530, EnhancedStatus::new(5, 7, 0), "Authentication required");
        }
        if params.size.is_some_and(|s| s > self.settings.max_size) {
            return Reply::new(
                552,
                EnhancedStatus::TOO_BIG,
                "Message size exceeds fixed limit",
            );
        }
        if let Some(reply) = self.insufficient_storage() {
            return reply;
        }
        // Sender binding and the per-account message limit (limits.rs).
        if let Some(reply) = self.check_sender(sender.as_ref()).await {
            return reply;
        }
        let from = sender.as_ref().map(ToString::to_string).unwrap_or_default();
        self.tx = Some(Box::new(Transaction {
            sender,
            params,
            rcpts: Vec::new(),
            bdat: None,
            bdat_failed: None,
            bdat_lines: mb_smtp::data::LineChecker::default(),
            bdat_pacer: None,
        }));
        tracing::debug!(client = %self.client.ip, from = %from, "mail");
        Reply::new(250, EnhancedStatus::SENDER_OK, "Ok")
    }

    /// Whether this client may send to any domain.
    pub(super) fn may_relay(&self) -> bool {
        self.auth_user.is_some()
            || self.listener == Listener::Reinject
            || self
                .settings
                .mynetworks
                .iter()
                .any(|n| n.contains(&self.client.ip))
    }
}
