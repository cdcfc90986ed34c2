//! RCPT TO (RFC 5321 §4.1.1.3): relay control, recipient limits, DSN parameters.

use super::*;

impl Session<'_> {
    pub(super) async fn rcpt(&mut self, rcpt: Mailbox, params: Params) -> Reply {
        let may_relay = self.may_relay();
        // <postmaster> without a domain is always accepted (RFC 5321 §4.5.1).
        let (rcpt, served) = if rcpt.domain.is_empty() {
            let domain = self
                .settings
                .domains
                .first()
                .cloned()
                .unwrap_or_else(|| self.settings.hostname.clone());
            (
                Mailbox {
                    local: "postmaster".into(),
                    domain,
                },
                true,
            )
        } else {
            let served = self.serves(&rcpt);
            (rcpt, served)
        };
        let esmtp = self.esmtp;
        let max = self.settings.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return Reply::new(
                503,
                EnhancedStatus::BAD_SEQUENCE,
                "Error: need MAIL command",
            );
        };
        if !esmtp && params != Params::default() {
            return Reply::new(
                555,
                EnhancedStatus::BAD_ARGUMENTS,
                "Error: RCPT parameters need EHLO",
            );
        }
        let ascii = rcpt.local.is_ascii() && rcpt.domain.is_ascii();
        if !tx.params.smtputf8 && !ascii {
            return Reply::new(
                553,
                EnhancedStatus::new(5, 6, 7),
                "Non-ASCII address without SMTPUTF8",
            );
        }
        if !served && !may_relay {
            self.summary.relay_denied += 1;
            tracing::info!(client = %self.client.ip, to = %rcpt, "relay access denied");
            let sender = tx
                .sender
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            self.event(
                "rejected",
                "reject",
                &sender,
                vec![rcpt.to_string()],
                0,
                String::new(),
                "relay access denied",
            );
            return Reply::new(
                554,
                EnhancedStatus::POLICY_REJECT,
                format!("<{rcpt}>: Relay access denied"),
            );
        }
        if let Some(reply) = self.insufficient_storage() {
            return reply;
        }
        let Some(tx) = self.tx.as_mut() else {
            return Reply::new(
                503,
                EnhancedStatus::BAD_SEQUENCE,
                "Error: need MAIL command",
            );
        };
        if tx.rcpts.len() >= max {
            return Reply::new(
                452,
                EnhancedStatus::new(4, 5, 3),
                "Error: too many recipients",
            );
        }
        if tx.rcpts.iter().any(|(r, _)| *r == rcpt) {
            return Reply::new(
                250,
                EnhancedStatus::RECIPIENT_OK,
                "Ok (duplicate recipient)",
            );
        }
        // Checks that may wait on mb-rpcd, Redis, LDAP or a next hop, cheapest refusal
        // first: an unknown user is refused before it costs the account's budget or a
        // greylist entry.
        if let Some(reply) = self.verify_recipient(&rcpt, served).await {
            // A temporary failure here is the directory (or the next hop) not answering,
            // not the client's error: counting it would end a session of valid
            // recipients with 421 while LDAP is down.
            self.own_tempfail = (400..500).contains(&reply.code);
            return reply;
        }
        if let Some(reply) = self.check_recipient_budget(&rcpt).await {
            return reply;
        }
        if let Some(reply) = self.greylist(&rcpt).await {
            return reply;
        }
        let Some(tx) = self.tx.as_mut() else {
            return Reply::new(
                503,
                EnhancedStatus::BAD_SEQUENCE,
                "Error: need MAIL command",
            );
        };
        tx.rcpts.push((rcpt, params));
        Reply::new(250, EnhancedStatus::RECIPIENT_OK, "Ok")
    }

    pub(super) fn serves(&self, m: &Mailbox) -> bool {
        !m.is_literal() && self.serves_domain(&m.domain)
    }

    pub(super) fn serves_domain(&self, domain: &str) -> bool {
        let domain = domain.to_lowercase();
        self.settings.domains.iter().any(|d| {
            let d = d.to_lowercase();
            match d.strip_prefix('.') {
                // ".example.com" serves every subdomain of example.com.
                Some(parent) => domain.ends_with(&format!(".{parent}")),
                None => d == domain,
            }
        })
    }
}
