//! Greylisting at RCPT (`greylist.*`).
//! SCAFFOLD: owned by the greylisting engineer; replace this placeholder.

use super::*;

impl Session<'_> {
    /// `Some(reply)` defers the recipient (451 4.7.1).
    pub(super) async fn greylist(&mut self, _rcpt: &Mailbox) -> Option<Reply> {
        None
    }
}
