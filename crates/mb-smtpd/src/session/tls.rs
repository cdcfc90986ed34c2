//! STARTTLS (RFC 3207): the upgrade, and input pipelined behind it refused.

use super::*;

impl Session<'_> {
    pub(super) async fn starttls(&mut self) -> bool {
        self.summary.starttls += 1;
        let Some(acceptor) = self
            .settings
            .tls
            .clone()
            .filter(|_| self.settings.tls_mode != TlsMode::None)
        else {
            return self
                .error(Reply::new(
                    502,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: STARTTLS is not offered",
                ))
                .await;
        };
        if self.tls.is_some() {
            return self
                .error(Reply::new(
                    503,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: TLS already active",
                ))
                .await;
        }
        // Anything pipelined after STARTTLS would cross into the TLS session (CVE-2011-0411).
        if self.refuse_pipelined_input("STARTTLS").await {
            return true;
        }
        if self
            .conn
            .send(&Reply::new(220, EnhancedStatus::OK, "Ready to start TLS").to_wire())
            .await
            .is_err()
        {
            return true;
        }
        let io = self.conn.take_io();
        match tokio::time::timeout(self.settings.tls_handshake_timeout, acceptor.accept(io)).await {
            Ok(Ok(tls)) => {
                let (_, state) = tls.get_ref();
                self.tls = Some(describe_tls(state));
                self.conn.set_io(Box::new(tls));
                // RFC 3207: forget everything learned before TLS.
                self.helo = None;
                self.esmtp = false;
                self.tx = None;
                self.summary.tls = true;
                false
            }
            _ => {
                self.summary.end = "TLS handshake failed";
                true
            }
        }
    }
}

fn describe_tls(state: &rustls::ServerConnection) -> String {
    let version = match state.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    let cipher = state
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".to_string(), |c| format!("{:?}", c.suite()));
    format!("{version} with cipher {cipher}")
}
