//! Scanning at the end of DATA/BDAT: before it answers, mb-smtpd asks an mb-filter
//! worker (`Filter.Scan`) for a verdict, so a reject is an SMTP reply in the session (no
//! backscatter). Calls go to the live worker with the fewest scans outstanding; a worker
//! that fails mid-call is skipped and the scan retried on the next one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mb_proto::v1::filter_client::FilterClient;
use mb_proto::v1::{ScanChunk, ScanEnvelope, ScanVerdict};
use tonic::transport::Channel;

/// Bytes per streamed chunk.
const CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
pub trait Scanner: Send + Sync {
    /// A verdict, or why no worker could give one.
    async fn scan(&self, envelope: ScanEnvelope, message: Vec<u8>) -> Result<ScanVerdict, String>;
}

/// The mb-filter workers `mb-filter-1.sock` .. `mb-filter-N.sock`.
pub struct Workers {
    run_dir: PathBuf,
    timeout: Duration,
    in_flight: Vec<AtomicUsize>,
    channels: Mutex<HashMap<usize, Channel>>,
}

impl Workers {
    pub fn new(run_dir: PathBuf, workers: usize, timeout: Duration) -> Workers {
        Workers {
            run_dir,
            timeout,
            in_flight: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            channels: Mutex::default(),
        }
    }

    async fn channel(&self, n: usize) -> Result<Channel, String> {
        if let Some(c) = self.channels.lock().ok().and_then(|m| m.get(&n).cloned()) {
            return Ok(c);
        }
        let socket = self.run_dir.join(format!("mb-filter-{n}.sock"));
        let c = mb_runtime::uds::connect(&socket, &format!("mb-filter@{n}"))
            .await
            .map_err(|e| e.to_string())?;
        if let Ok(mut m) = self.channels.lock() {
            m.insert(n, c.clone());
        }
        Ok(c)
    }

    fn forget(&self, n: usize) {
        if let Ok(mut m) = self.channels.lock() {
            m.remove(&n);
        }
    }
}

/// Whether a failed call says nothing about the message (the worker died, is gone or
/// too slow), so another worker may be asked.
fn worker_failed(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
    )
}

#[tonic::async_trait]
impl Scanner for Workers {
    async fn scan(&self, envelope: ScanEnvelope, message: Vec<u8>) -> Result<ScanVerdict, String> {
        let mut order: Vec<usize> = (0..self.in_flight.len()).collect();
        order.sort_by_key(|i| self.in_flight[*i].load(Ordering::Relaxed));
        let mut last = String::from("no mb-filter worker configured");
        for i in order {
            let n = i + 1;
            let channel = match self.channel(n).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let mut chunks: Vec<ScanChunk> = message
                .chunks(CHUNK)
                .map(|c| ScanChunk {
                    envelope: None,
                    data: c.to_vec(),
                })
                .collect();
            if chunks.is_empty() {
                chunks.push(ScanChunk::default());
            }
            chunks[0].envelope = Some(envelope.clone());
            self.in_flight[i].fetch_add(1, Ordering::Relaxed);
            let mut client = FilterClient::new(channel);
            let call = client.scan(tokio_stream::iter(chunks));
            let result = tokio::time::timeout(self.timeout, call).await;
            self.in_flight[i].fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(Ok(v)) => return Ok(v.into_inner()),
                Ok(Err(status)) if worker_failed(&status) => {
                    tracing::warn!(worker = n, cause = %status.message(), "mb-filter worker failed; trying the next");
                    self.forget(n);
                    last = format!("mb-filter@{n}: {}", status.message());
                }
                Ok(Err(status)) => return Err(format!("mb-filter@{n}: {}", status.message())),
                Err(_) => {
                    tracing::warn!(worker = n, "mb-filter worker timed out; trying the next");
                    self.forget(n);
                    last = format!("mb-filter@{n} did not answer within {:?}", self.timeout);
                }
            }
        }
        Err(last)
    }
}

/// The enhanced status of a verdict as a static string (replies carry `&'static str`).
pub fn status_of(code: u32, status: &str) -> &'static str {
    const KNOWN: [&str; 8] = [
        "5.7.1", "5.6.0", "5.3.4", "5.7.0", "4.7.1", "4.7.0", "4.3.0", "5.4.6",
    ];
    KNOWN
        .iter()
        .find(|k| **k == status)
        .copied()
        .unwrap_or(if code >= 500 { "5.7.1" } else { "4.7.1" })
}
