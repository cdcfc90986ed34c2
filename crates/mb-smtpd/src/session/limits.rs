//! Sender binding for authenticated sessions and per-account outbound limits.
//! SCAFFOLD: owned by the sender-binding engineer; replace this placeholder.

use super::*;

impl Session<'_> {
    /// At MAIL: `Some(reply)` refuses the sender (553 5.7.1 not yours, 450 4.7.1 over the limit).
    pub(super) async fn check_sender(&mut self, _sender: Option<&Mailbox>) -> Option<Reply> {
        None
    }

    /// At RCPT: `Some(reply)` refuses a recipient over the account's hourly budget.
    pub(super) async fn check_recipient_budget(&mut self, _rcpt: &Mailbox) -> Option<Reply> {
        None
    }
}
