//! A quarantined message's index entry: what the filter workers write beside the message
//! (`ID.json`, see `mb_runtime::quarantine`) and what mb-rpcd keeps in its database index.

use serde::{Deserialize, Deserializer, Serialize};

/// One quarantined message. Its serde form is the `ID.json` file, whose field names are
/// the file's own (`at_ms`), not the gRPC message's. Every field but the time may be
/// missing, so files written before a field existed stay readable; a file without a time
/// is not an entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(default)]
    pub id: String,
    /// The node holding the message's files.
    #[serde(default)]
    pub node: String,
    /// When the message was quarantined, in milliseconds since the epoch.
    #[serde(rename = "at_ms")]
    pub at_unix_ms: i64,
    #[serde(default)]
    pub queue_id: String,
    /// Empty when unknown.
    #[serde(default)]
    pub client_ip: String,
    /// Empty for the null sender.
    #[serde(default)]
    pub sender: String,
    #[serde(default)]
    pub recipients: Vec<String>,
    #[serde(default)]
    pub subject: String,
    /// Why the message was quarantined (the verdict's text).
    #[serde(default)]
    pub reason: String,
    /// A score that was not a finite number was written as `null`; it reads as 0.
    #[serde(default, deserialize_with = "number_or_zero")]
    pub score: f64,
    #[serde(default)]
    pub symbols: Vec<String>,
    /// The stored message's size in bytes.
    #[serde(default)]
    pub size: u64,
    /// Relative to the quarantine directory: `YYYY/MM/DD/ID.eml`.
    #[serde(default)]
    pub path: String,
}

fn number_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, expected: Option<Entry>) {
        assert_eq!(serde_json::from_str::<Entry>(json).ok(), expected, "{json}");
    }

    #[test]
    fn missing_fields_take_their_defaults_but_the_time_is_required() {
        check(
            r#"{"at_ms":5,"id":"Q1"}"#,
            Some(Entry {
                id: "Q1".into(),
                at_unix_ms: 5,
                ..Entry::default()
            }),
        );
        check(
            r#"{"at_ms":5,"score":null,"future_field":[1]}"#,
            Some(Entry {
                at_unix_ms: 5,
                ..Entry::default()
            }),
        );
        check(r#"{"id":"Q1","path":"2026/11/22/Q1.eml"}"#, None);
        check(r#"{"at_ms":1.5}"#, None);
    }
}
