//! The filter's verdict before the 250: the scan request, and the verdict turned
//! into the reply through `mb_scan::reply` (the same in every mode). A large message is
//! streamed to the worker from its body file (`SpoolWriter::scan_body`), so mb-smtpd
//! never holds a whole message in memory for a scan.

use super::*;

impl Session<'_> {
    /// Asks the filter for a verdict before the message is committed. `Ok` carries the
    /// header changes to keep with the envelope; `Err` is the reply that ends the
    /// transaction instead (reject, tempfail, discard, or no scanner and tempfail).
    pub(super) async fn scan(
        &mut self,
        scanner: &dyn mb_scan::Scanner,
        writer: &mut SpoolWriter,
        envelope: &Envelope,
    ) -> Result<Option<(Vec<(String, String)>, Vec<String>)>, Reply> {
        let id = envelope.id.as_str();
        let message = writer.scan_body().await.map_err(|_| {
            Reply::new(
                451,
                EnhancedStatus::SYSTEM_TEMPORARY,
                "Error: queue file read error",
            )
        })?;
        let direction = Direction::of(
            self.auth_user.is_some(),
            Some(self.client.ip),
            &self.settings.mynetworks,
        );
        let request = ScanRequest::from_envelope(envelope, Some(self.client.ip), direction);
        let v = match scanner.scan(&request, message).await {
            Ok(v) => v,
            // Checked before `accept_unscanned`: full workers must not switch scanning
            // off for whoever sends large messages fastest.
            Err(e) if e.is_busy() => {
                tracing::warn!(id, cause = %e, "every mb-filter worker is full (filter.max_inflight_bytes); message tempfailed");
                return Err(mb_scan::reply::busy());
            }
            Err(e) if self.settings.accept_unscanned => {
                tracing::warn!(id, cause = %e, "no mb-filter worker answered; accepting unscanned (filter.unavailable_action = accept)");
                // Unscanned is not unfiltered: the sender's forged verdict fields go.
                let forged = mb_core::message::FORGEABLE.iter().map(|n| (*n).to_string());
                return Ok(Some((Vec::new(), forged.collect())));
            }
            Err(e) => {
                tracing::warn!(id, cause = %e, "no mb-filter worker answered; message tempfailed");
                return Err(mb_scan::reply::unavailable());
            }
        };
        match mb_scan::reply::disposition(&v) {
            Disposition::Refuse(reply) => {
                tracing::info!(
                    client = %self.client.ip,
                    id,
                    action = %v.action,
                    score = v.score,
                    "message refused by the filter: {}",
                    v.refusal.text
                );
                Err(reply)
            }
            // The filter logs the verdict in the message log; the sender is not told
            // (a quarantined message is safe on disk before this 250).
            Disposition::Discard => {
                tracing::info!(client = %self.client.ip, id, "message discarded by the filter");
                Err(Reply::new(
                    250,
                    EnhancedStatus::OK,
                    format!("Ok: queued as {id}"),
                ))
            }
            Disposition::Quarantined(qid) => {
                tracing::info!(client = %self.client.ip, id, quarantine_id = %qid, from = %request.sender, nrcpt = request.recipients.len(), "message quarantined by the filter");
                self.summary.accepted.push(id.to_string());
                Err(Reply::new(
                    250,
                    EnhancedStatus::OK,
                    format!("Ok: queued as {id}"),
                ))
            }
            Disposition::Deliver {
                add_headers,
                remove_headers,
            } => Ok(Some((add_headers.to_vec(), remove_headers.to_vec()))),
        }
    }
}
