//! Recipient verification at RCPT (`smtp.recipient_verification`).
//! SCAFFOLD: owned by the recipient-verification engineer; replace this placeholder.

use super::*;

impl Session<'_> {
    /// `Some(reply)` refuses the recipient (550 5.1.1 unknown, 450 4.1.1 cannot tell).
    pub(super) async fn verify_recipient(
        &mut self,
        _rcpt: &Mailbox,
        _served: bool,
    ) -> Option<Reply> {
        None
    }
}
