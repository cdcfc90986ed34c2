//! Sender binding for authenticated sessions and per-account outbound limits: an AUTH
//! client may send only as an address its account owns (Postfix's
//! reject_sender_login_mismatch), and only so many messages and recipients an hour.
//! Clients without AUTH (port 25, mynetworks, reinjection) are neither bound nor counted.

use super::*;
use crate::account_limits::Counter;

impl Session<'_> {
    /// At MAIL: `Some(reply)` refuses the sender (553 5.7.1 not yours, 450 4.7.1 over the limit).
    pub(super) async fn check_sender(&mut self, sender: Option<&Mailbox>) -> Option<Reply> {
        let login = self.auth_user.clone()?;
        let from = sender.map(ToString::to_string).unwrap_or_default();
        // The null sender is a bounce or a notice: it claims no address, so it is allowed.
        if self.settings.sender_binding
            && let Some(s) = sender
            && !owns(&self.auth_addresses, s, &self.settings.recipient_delimiter)
        {
            tracing::warn!(client = %self.client.ip, user = %login, from = %from, "sender address not owned by the authenticated user");
            self.event(
                "rejected",
                "reject",
                &from,
                Vec::new(),
                0,
                String::new(),
                &format!("sender address not owned by user {login}"),
            );
            return Some(Reply::new(
                553,
                EnhancedStatus::new(5, 7, 1),
                format!("<{from}>: Sender address rejected: not owned by user {login}"),
            ));
        }
        self.over_budget(Counter::Messages, &login, &from, Vec::new())
            .await
    }

    /// At RCPT: `Some(reply)` refuses a recipient over the account's hourly budget.
    pub(super) async fn check_recipient_budget(&mut self, rcpt: &Mailbox) -> Option<Reply> {
        let login = self.auth_user.clone()?;
        let from = self
            .tx
            .as_ref()
            .and_then(|t| t.sender.as_ref())
            .map(ToString::to_string)
            .unwrap_or_default();
        self.over_budget(Counter::Recipients, &login, &from, vec![rcpt.to_string()])
            .await
    }

    /// Counts one unit against the account; the 450 and the message-log event when the
    /// hour's budget is spent.
    async fn over_budget(
        &mut self,
        counter: Counter,
        login: &str,
        from: &str,
        rcpts: Vec<String>,
    ) -> Option<Reply> {
        let limits = self.settings.account_limits.as_ref()?;
        let crate::account_limits::Exceeded(limit) = limits.take(counter, login).await.err()?;
        let what = match counter {
            Counter::Messages => "messages",
            Counter::Recipients => "recipients",
        };
        tracing::warn!(client = %self.client.ip, user = %login, limit, "account sending limit exceeded: {} ({limit} {what} per hour)", counter.config_key());
        self.event(
            "deferred",
            "tempfail",
            from,
            rcpts,
            0,
            String::new(),
            &format!(
                "account {login} over its sending limit: {limit} {what} per hour ({})",
                counter.config_key()
            ),
        );
        Some(Reply::new(
            450,
            EnhancedStatus::new(4, 7, 1),
            format!(
                "<{login}>: account sending limit exceeded ({limit} {what} per hour), try again later"
            ),
        ))
    }
}

/// Whether `sender` is one of `granted` (addresses, or `@domain` for a whole domain),
/// ignoring case and an address extension after any of `delimiters`.
pub(super) fn owns(granted: &[String], sender: &Mailbox, delimiters: &str) -> bool {
    let local = sender.local.to_ascii_lowercase();
    let domain = sender.domain.to_ascii_lowercase();
    let full = format!("{local}@{domain}");
    let base = local
        .find(|c| delimiters.contains(c))
        .filter(|i| *i > 0)
        .map(|i| format!("{}@{domain}", &local[..i]));
    granted.iter().any(|g| match g.strip_prefix('@') {
        Some(d) => d.eq_ignore_ascii_case(&domain),
        None => {
            g.eq_ignore_ascii_case(&full)
                || base.as_deref().is_some_and(|b| g.eq_ignore_ascii_case(b))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(granted: &[&str], sender: &str, delimiters: &str, want: bool) {
        let (local, domain) = sender.rsplit_once('@').unwrap();
        let m = Mailbox {
            local: local.into(),
            domain: domain.into(),
        };
        let g: Vec<String> = granted.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            owns(&g, &m, delimiters),
            want,
            "{granted:?} {sender} {delimiters:?}"
        );
    }

    #[test]
    fn an_account_owns_its_login_its_aliases_and_their_extensions() {
        let alice = [
            "alice@served.example",
            "sales@served.example",
            "@brand.example",
        ];
        check(&alice, "alice@served.example", "+", true);
        check(&alice, "Alice@SERVED.example", "+", true);
        check(&alice, "alice+news@served.example", "+", true);
        check(&alice, "alice-news@served.example", "+-", true);
        check(&alice, "alice-news@served.example", "+", false);
        check(&alice, "alice+news@served.example", "", false);
        check(&alice, "sales@served.example", "+", true);
        check(&alice, "anyone@brand.example", "+", true);
        check(&alice, "anyone@sub.brand.example", "+", false);
        check(&alice, "ceo@served.example", "+", false);
        check(&alice, "alice@elsewhere.example", "+", false);
        // A delimiter at the start is part of the name, not an extension.
        check(&alice, "+alice@served.example", "+", false);
        check(&[], "alice@served.example", "+", false);
    }
}
