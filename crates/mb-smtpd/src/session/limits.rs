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
        let owned = match sender {
            Some(s) if self.settings.sender_binding => {
                match owns(&self.auth_addresses, s, &self.settings.recipient_delimiter) {
                    Ownership::Owned => true,
                    Ownership::NotOwned => false,
                    Ownership::Extension => match extension_owner(self.settings, s).await {
                        Ok(None) => true,
                        Ok(Some(owner)) => owner.eq_ignore_ascii_case(&login),
                        Err(e) => {
                            tracing::warn!(client = %self.client.ip, user = %login, from = %from, cause = %e, "sender binding: cannot tell who owns the address; deferred");
                            return Some(Reply::new(
                                451,
                                EnhancedStatus::new(4, 7, 1),
                                format!(
                                    "<{from}>: Sender address check unavailable, try again later"
                                ),
                            ));
                        }
                    },
                }
            }
            _ => true,
        };
        if !owned {
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

/// Who has `sender` itself as login or alias: asked before `user-ext@` is taken as
/// `user@`'s, as Postfix looks up the full address before the stripped one.
async fn extension_owner(
    settings: &Settings,
    sender: &Mailbox,
) -> Result<Option<String>, AuthError> {
    let auth = settings
        .auth
        .as_ref()
        .ok_or_else(|| AuthError::Check("no account store".into()))?;
    let address = sender.to_string();
    tokio::time::timeout(OWNER_TIMEOUT, auth.owner(&address))
        .await
        .map_err(|_| AuthError::Timeout)?
}

/// Longest wait for mb-rpcd's answer on who owns an address.
const OWNER_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether an account owns a sender address, as far as its own grants tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ownership {
    /// The address, or its whole domain, is granted.
    Owned,
    NotOwned,
    /// Only the address without its extension is granted: owned unless the full address
    /// is another account's login or alias (ask mb-rpcd).
    Extension,
}

/// Whether `sender` is one of `granted` (addresses, or `@domain` for a whole domain),
/// ignoring case, or is one of them with an address extension after any of `delimiters`.
pub(super) fn owns(granted: &[String], sender: &Mailbox, delimiters: &str) -> Ownership {
    let local = sender.local.to_ascii_lowercase();
    let domain = sender.domain.to_ascii_lowercase();
    let full = format!("{local}@{domain}");
    let base = local
        .find(|c| delimiters.contains(c))
        .filter(|i| *i > 0)
        .map(|i| format!("{}@{domain}", &local[..i]));
    let exact = granted.iter().any(|g| match g.strip_prefix('@') {
        Some(d) => d.eq_ignore_ascii_case(&domain),
        None => g.eq_ignore_ascii_case(&full),
    });
    if exact {
        Ownership::Owned
    } else if base
        .as_deref()
        .is_some_and(|b| granted.iter().any(|g| g.eq_ignore_ascii_case(b)))
    {
        Ownership::Extension
    } else {
        Ownership::NotOwned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(granted: &[&str], sender: &str, delimiters: &str, want: Ownership) {
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
        use Ownership::{Extension, NotOwned, Owned};
        let alice = [
            "alice@served.example",
            "sales@served.example",
            "@brand.example",
        ];
        check(&alice, "alice@served.example", "+", Owned);
        check(&alice, "Alice@SERVED.example", "+", Owned);
        check(&alice, "alice+news@served.example", "+", Extension);
        // Only an extension: the session asks whether alice-news@ is someone else's.
        check(&alice, "alice-news@served.example", "+-", Extension);
        check(&alice, "alice-news@served.example", "+", NotOwned);
        check(&alice, "alice+news@served.example", "", NotOwned);
        check(&alice, "sales@served.example", "+", Owned);
        check(&alice, "anyone@brand.example", "+", Owned);
        check(&alice, "any+one@brand.example", "+", Owned);
        check(&alice, "anyone@sub.brand.example", "+", NotOwned);
        check(&alice, "ceo@served.example", "+", NotOwned);
        check(&alice, "alice@elsewhere.example", "+", NotOwned);
        // A delimiter at the start is part of the name, not an extension.
        check(&alice, "+alice@served.example", "+", NotOwned);
        check(&[], "alice@served.example", "+", NotOwned);
    }
}
