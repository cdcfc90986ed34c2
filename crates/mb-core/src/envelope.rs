//! The envelope kept with every spooled message and sent with every scan: who sent it,
//! to whom, how it arrived, and the header changes the verdict asked for. Serialized as
//! JSON with serde; a field missing from an older file takes its default, so files
//! written by earlier versions stay readable.

use serde::{Deserialize, Serialize};

/// What is kept with each message for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub id: String,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub received_at: u64,
    #[serde(default)]
    pub client_ip: String,
    #[serde(default)]
    pub client_name: String,
    #[serde(default)]
    pub helo: String,
    /// `ESMTP`, `ESMTPS`, `ESMTPSA`, ... as in the Received field.
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub tls: String,
    #[serde(default)]
    pub auth_user: String,
    /// Empty for the null sender.
    #[serde(default)]
    pub sender: String,
    /// Required: an envelope without recipients is torn, never a message to no one.
    pub recipients: Vec<Recipient>,
    /// The BODY parameter (`7BIT`, `8BITMIME`, `BINARYMIME`), empty when not given.
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub smtputf8: bool,
    /// DSN RET (`FULL`/`HDRS`) and ENVID, empty when not given.
    #[serde(default)]
    pub ret: String,
    #[serde(default)]
    pub envid: String,
    /// The listener it came in on (`smtp`, `submission`, `smtps`, `reinject`).
    #[serde(default)]
    pub listener: String,
    /// Header fields the filter's verdict adds at delivery (name, value), and the names
    /// of fields it removes; the message file itself is never rewritten.
    #[serde(default)]
    pub add_headers: Vec<(String, String)>,
    #[serde(default)]
    pub remove_headers: Vec<String>,
}

/// One recipient with its DSN parameters (RFC 3461).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    /// NOTIFY, empty when not given.
    #[serde(default)]
    pub notify: String,
    /// ORCPT, empty when not given.
    #[serde(default)]
    pub orcpt: String,
}

impl Recipient {
    /// A recipient without DSN parameters.
    pub fn plain(address: &str) -> Recipient {
        Recipient {
            address: address.to_string(),
            ..Recipient::default()
        }
    }
}

impl Envelope {
    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and lists cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Envelope, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An envelope exactly as the hand-written encoder of earlier versions wrote it
    /// (field order, every field present, headers as [name, value] pairs).
    const EARLIER: &str = r#"{"add_headers":[["X-Spam","no"]],"auth_user":"","body":"8BITMIME","client_ip":"192.0.2.7","client_name":"mx.sender.example","envid":"E1","helo":"mx.sender.example","id":"0001ABCD","listener":"smtp","protocol":"ESMTPS","received_at":1764590000,"recipients":[{"address":"a@served.example","notify":"FAILURE","orcpt":"rfc822;a@served.example"},{"address":"b@served.example","notify":"","orcpt":""}],"remove_headers":["X-Spam"],"ret":"HDRS","sender":"s@sender.example","smtputf8":false,"tls":"TLSv1.3"}"#;

    #[test]
    fn reads_what_earlier_versions_wrote_and_round_trips() {
        let e = Envelope::from_json(EARLIER).unwrap();
        assert_eq!(e.id, "0001ABCD");
        assert_eq!(e.received_at, 1_764_590_000);
        assert_eq!(e.recipients.len(), 2);
        assert_eq!(e.recipients[0].notify, "FAILURE");
        assert_eq!(e.add_headers, vec![("X-Spam".into(), "no".into())]);
        assert_eq!((e.ret.as_str(), e.envid.as_str()), ("HDRS", "E1"));
        assert_eq!(Envelope::from_json(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn missing_fields_default_but_recipients_are_required() {
        let e =
            Envelope::from_json(r#"{"id":"X","recipients":[{"address":"a@b.example"}]}"#).unwrap();
        assert_eq!(e.recipients, vec![Recipient::plain("a@b.example")]);
        assert!(e.add_headers.is_empty() && e.sender.is_empty());
        assert!(Envelope::from_json(r#"{"id":"X"}"#).is_err());
        assert!(Envelope::from_json("not json").is_err());
        assert!(Envelope::from_json(r#"{"recipients":"a@b.example"}"#).is_err());
    }
}
