//! The one conversion between `Filter.Scan`'s gRPC messages and the domain types: the
//! scan client uses one direction, mb-filter's gRPC service the other.

use mb_core::EnhancedStatus;
use mb_core::verdict::{Action, Direction, Refusal, ScanRequest, Symbol, Verdict};
use mb_proto::v1::{ScanEnvelope, ScanHeader, ScanSymbol, ScanVerdict};

/// Why a worker's verdict cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Action(#[from] mb_core::verdict::BadAction),
}

pub fn request_to_wire(r: &ScanRequest) -> ScanEnvelope {
    ScanEnvelope {
        queue_id: r.queue_id.clone(),
        client_ip: r.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        client_name: r.client_name.clone(),
        helo: r.helo.clone(),
        sender: r.sender.clone(),
        recipients: r.recipients.clone(),
        auth_user: r.auth_user.clone(),
        tls: r.tls.clone(),
        direction: r.direction.as_str().into(),
        size: 0,
    }
}

/// A request as a worker reads it: an address that does not parse is unknown.
pub fn request_from_wire(e: &ScanEnvelope) -> ScanRequest {
    ScanRequest {
        queue_id: e.queue_id.clone(),
        client_ip: e.client_ip.parse().ok(),
        client_name: e.client_name.clone(),
        helo: e.helo.clone(),
        sender: e.sender.clone(),
        recipients: e.recipients.clone(),
        auth_user: e.auth_user.clone(),
        tls: e.tls.clone(),
        direction: Direction::from_wire(&e.direction),
    }
}

pub fn verdict_to_wire(v: &Verdict) -> ScanVerdict {
    ScanVerdict {
        action: v.action.as_str().into(),
        smtp_code: v.refusal.code.map_or(0, u32::from),
        smtp_status: v.refusal.status.map(|s| s.to_string()).unwrap_or_default(),
        smtp_text: v.refusal.text.clone(),
        add_headers: v
            .add_headers
            .iter()
            .map(|(name, value)| ScanHeader {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        remove_headers: v.remove_headers.clone(),
        score: v.score,
        symbols: v
            .symbols
            .iter()
            .map(|s| ScanSymbol {
                name: s.name.clone(),
                score: s.score,
                detail: s.detail.clone(),
            })
            .collect(),
        quarantine_id: v.quarantine_id.clone(),
    }
}

/// A worker's verdict. An unknown action is an error (never taken as accept); a reply
/// code outside 400-599 or a malformed enhanced status is dropped, so the action's
/// default applies.
pub fn verdict_from_wire(v: ScanVerdict) -> Result<Verdict, WireError> {
    let action: Action = v.action.parse()?;
    let code = u16::try_from(v.smtp_code)
        .ok()
        .filter(|c| (400..600).contains(c));
    Ok(Verdict {
        action,
        refusal: Refusal {
            code,
            status: v.smtp_status.parse::<EnhancedStatus>().ok(),
            text: v.smtp_text,
        },
        add_headers: v
            .add_headers
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect(),
        remove_headers: v.remove_headers,
        score: v.score,
        symbols: v
            .symbols
            .into_iter()
            .map(|s| Symbol {
                name: s.name,
                score: s.score,
                detail: s.detail,
            })
            .collect(),
        quarantine_id: v.quarantine_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_round_trip_and_bad_fields_fall_back() {
        let mut v = Verdict::refuse(
            Action::Reject,
            554,
            EnhancedStatus::POLICY_REJECT,
            "virus found",
        );
        v.add_headers.push(("X-Spam".into(), "yes".into()));
        v.remove_headers.push("X-Spam".into());
        v.symbols.push(Symbol {
            name: "VIRUS".into(),
            score: 100.0,
            detail: "Eicar".into(),
        });
        v.score = 100.0;
        assert_eq!(verdict_from_wire(verdict_to_wire(&v)).unwrap(), v);

        let odd = ScanVerdict {
            action: "reject".into(),
            smtp_code: 250,
            smtp_status: "5.7".into(),
            ..Default::default()
        };
        let v = verdict_from_wire(odd).unwrap();
        assert_eq!((v.refusal.code, v.refusal.status), (None, None));
        let unknown = ScanVerdict {
            action: "deliver-anyway".into(),
            ..Default::default()
        };
        assert!(verdict_from_wire(unknown).is_err());
    }

    #[test]
    fn requests_round_trip() {
        let r = ScanRequest {
            queue_id: "Q1".into(),
            client_ip: Some("192.0.2.1".parse().unwrap()),
            client_name: "unknown".into(),
            helo: "h".into(),
            sender: "s@x.example".into(),
            recipients: vec!["r@y.example".into()],
            auth_user: "u".into(),
            tls: "TLSv1.3".into(),
            direction: Direction::Outbound,
        };
        assert_eq!(request_from_wire(&request_to_wire(&r)), r);
        let unknown = ScanEnvelope {
            client_ip: "not an address".into(),
            direction: "sideways".into(),
            ..Default::default()
        };
        let r = request_from_wire(&unknown);
        assert_eq!((r.client_ip, r.direction), (None, Direction::Inbound));
    }
}
