//! What the client is told about a verdict: the one mapping, used by mb-smtpd's
//! sessions, the content filter and the milter, so the three modes answer alike.
//! Reject is 550 5.7.1 and tempfail 451 4.7.1 unless the verdict carries its own code
//! of the right class (a virus keeps 554 5.7.1).

use mb_core::EnhancedStatus;
use mb_core::verdict::{Action, Verdict};
use mb_smtp::Reply;

/// The default reply code of a reject.
pub const REJECT_CODE: u16 = 550;
/// The default reply code of a tempfail.
pub const TEMPFAIL_CODE: u16 = 451;

/// What becomes of the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition<'a> {
    /// The message goes on, with these header changes.
    Deliver {
        add_headers: &'a [(String, String)],
        remove_headers: &'a [String],
    },
    /// Kept in the quarantine under this id; the client is told it was accepted.
    Quarantined(&'a str),
    /// Accepted and dropped.
    Discard,
    /// Refused with this reply (reject or tempfail).
    Refuse(Reply),
}

pub fn disposition(v: &Verdict) -> Disposition<'_> {
    match v.action {
        Action::Accept | Action::Tag => Disposition::Deliver {
            add_headers: &v.add_headers,
            remove_headers: &v.remove_headers,
        },
        Action::Quarantine => Disposition::Quarantined(&v.quarantine_id),
        Action::Discard => Disposition::Discard,
        Action::Reject | Action::Tempfail => Disposition::Refuse(refusal(v)),
    }
}

/// The reply for a reject or tempfail verdict (any other action is taken as reject).
pub fn refusal(v: &Verdict) -> Reply {
    let (class, default_code, default_status, default_text) = if v.action == Action::Tempfail {
        (
            4,
            TEMPFAIL_CODE,
            EnhancedStatus::POLICY_TEMPFAIL,
            "Error: message deferred by content policy, try again later",
        )
    } else {
        (
            5,
            REJECT_CODE,
            EnhancedStatus::POLICY_REJECT,
            "Error: message rejected by content policy",
        )
    };
    let code = v
        .refusal
        .code
        .filter(|c| c / 100 == class)
        .unwrap_or(default_code);
    let status = v
        .refusal
        .status
        .filter(|s| s.fits(code))
        .unwrap_or(default_status);
    // The filter's words on one line: a reply's text never adds lines of its own.
    let text: String = v
        .refusal
        .text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = if text.trim().is_empty() {
        default_text.to_string()
    } else {
        text
    };
    Reply::new(code, status, text)
}

/// The reply when no worker gave a verdict and the mode's `unavailable_action` is
/// tempfail.
pub fn unavailable() -> Reply {
    Reply::new(
        TEMPFAIL_CODE,
        EnhancedStatus::POLICY_TEMPFAIL,
        "Error: content scanner unavailable, try again later",
    )
}

/// The reply when every worker is full (`filter.max_inflight_bytes`): 451 4.7.1 in
/// every mode, so that the sender's MTA tries again once the large messages in flight
/// are done.
pub fn busy() -> Reply {
    Reply::new(
        TEMPFAIL_CODE,
        EnhancedStatus::POLICY_TEMPFAIL,
        "Error: content scanner busy, try again later",
    )
}

#[cfg(test)]
mod tests {
    use mb_core::verdict::Refusal;

    use super::*;

    fn check(action: Action, code: Option<u16>, status: &str, text: &str, want: &str) {
        let v = Verdict {
            action,
            refusal: Refusal {
                code,
                status: status.parse().ok(),
                text: text.into(),
            },
            ..Verdict::default()
        };
        let Disposition::Refuse(r) = disposition(&v) else {
            panic!("{action} is not a refusal");
        };
        assert_eq!(r.to_wire(), want, "{action} {code:?} {status} {text}");
    }

    #[test]
    fn refusals_default_to_550_and_451_and_keep_codes_of_their_class() {
        check(Action::Reject, None, "", "spam", "550 5.7.1 spam\r\n");
        check(
            Action::Reject,
            Some(554),
            "5.7.1",
            "virus",
            "554 5.7.1 virus\r\n",
        );
        check(
            Action::Reject,
            Some(552),
            "5.3.4",
            "big",
            "552 5.3.4 big\r\n",
        );
        check(Action::Tempfail, None, "", "later", "451 4.7.1 later\r\n");
        check(Action::Tempfail, Some(451), "4.3.0", "x", "451 4.3.0 x\r\n");
        // A code of the wrong class never turns a reject into a tempfail or back.
        check(Action::Reject, Some(451), "4.7.1", "x", "550 5.7.1 x\r\n");
        check(Action::Tempfail, Some(554), "5.7.1", "x", "451 4.7.1 x\r\n");
        // A status that disagrees with the code falls back to the default.
        check(Action::Reject, Some(554), "4.7.1", "x", "554 5.7.1 x\r\n");
        // Empty text gets words; control characters cannot forge a line.
        check(
            Action::Reject,
            None,
            "",
            " ",
            "550 5.7.1 Error: message rejected by content policy\r\n",
        );
        check(
            Action::Reject,
            None,
            "",
            "a\r\n250 ok",
            "550 5.7.1 a  250 ok\r\n",
        );
        assert_eq!(
            unavailable().to_wire(),
            "451 4.7.1 Error: content scanner unavailable, try again later\r\n"
        );
    }

    #[test]
    fn other_actions() {
        let mut v = Verdict::accept();
        v.add_headers.push(("X-Spam".into(), "no".into()));
        assert!(
            matches!(disposition(&v), Disposition::Deliver { add_headers, .. } if add_headers.len() == 1)
        );
        v.action = Action::Quarantine;
        v.quarantine_id = "Q1".into();
        assert_eq!(disposition(&v), Disposition::Quarantined("Q1"));
        v.action = Action::Discard;
        assert_eq!(disposition(&v), Disposition::Discard);
    }
}
