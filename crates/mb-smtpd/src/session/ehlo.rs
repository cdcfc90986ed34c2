//! EHLO and HELO (RFC 5321 §4.1.1.1): the greeting and the extensions offered.

use super::*;

impl Session<'_> {
    /// EHLO: a new session state and the list of extensions (STARTTLS only before
    /// TLS, AUTH only after it).
    pub(super) fn ehlo(&mut self, name: String) {
        self.summary.ehlo += 1;
        self.helo = Some(name);
        self.esmtp = true;
        self.tx = None;
        let mut lines = vec![self.settings.hostname.clone(), "PIPELINING".into()];
        lines.push(format!("SIZE {}", self.settings.max_size));
        if self.settings.vrfy {
            lines.push("VRFY".into());
        }
        lines.extend(
            [
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING",
            ]
            .map(String::from),
        );
        if self.settings.auth.is_some() && self.tls.is_some() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        if self.tls.is_none()
            && self.settings.tls.is_some()
            && self.settings.tls_mode != TlsMode::None
        {
            lines.insert(2, "STARTTLS".into());
        }
        let text = lines.join("\n");
        self.reply(Reply::bare(250, text));
    }

    /// HELO: plain SMTP, no extensions.
    pub(super) fn helo(&mut self, name: String) {
        self.summary.helo += 1;
        self.helo = Some(name);
        self.esmtp = false;
        self.tx = None;
        self.reply(Reply::bare(250, self.settings.hostname.clone()));
    }
}
