//! Sending message events to mb-rpcd's message log (`Events.Publish`), in batches, off the
//! mail path: `send` never blocks; a full buffer drops the event and counts it.
//!
//! A batch is resent until acknowledged; events carry unique ids, so mb-rpcd stores a
//! resent event once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_proto::v1::events_client::EventsClient;
use mb_proto::v1::{EventBatch, MessageEvent};
use tokio::sync::mpsc;

use crate::lifecycle::Shutdown;

/// Events waiting to be sent, at most.
const BUFFER: usize = 20_000;
/// Events in one batch, at most.
const BATCH: usize = 500;

/// Why a batch of events did not reach mb-rpcd (it is sent again).
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error(transparent)]
    Connect(#[from] crate::uds::ConnectError),
    /// mb-rpcd refused the stream or failed while acknowledging.
    #[error("{}", .0.message())]
    Rpc(Box<tonic::Status>),
    /// The acknowledgements ended before every batch was acknowledged.
    #[error("mb-rpcd closed the event stream")]
    Closed,
}

impl From<tonic::Status> for PublishError {
    fn from(s: tonic::Status) -> Self {
        PublishError::Rpc(Box::new(s))
    }
}

/// A cloneable handle for recording events.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<MessageEvent>,
    prefix: Arc<str>,
    seq: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
    pub sent: Arc<AtomicU64>,
}

impl EventSink {
    /// Starts the sender task for `daemon`, publishing to the mb-rpcd socket.
    pub fn start(daemon: &str, rpcd_socket: PathBuf, shutdown: Shutdown) -> EventSink {
        let (tx, rx) = mpsc::channel(BUFFER);
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let sink = EventSink {
            tx,
            prefix: Arc::from(format!("{daemon}-{}-{started:x}", std::process::id())),
            seq: Arc::default(),
            dropped: Arc::default(),
            sent: Arc::default(),
        };
        let sent = sink.sent.clone();
        tokio::spawn(run(rx, rpcd_socket, shutdown, sent));
        sink
    }

    /// Records an event; the id and time are filled in when empty.
    pub fn send(&self, mut e: MessageEvent) {
        if e.event_id.is_empty() {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            e.event_id = format!("{}-{n}", self.prefix);
        }
        if e.at_unix_ms == 0 {
            e.at_unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
        }
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<MessageEvent>,
    socket: PathBuf,
    shutdown: Shutdown,
    sent: Arc<AtomicU64>,
) {
    let mut sequence = 0u64;
    let mut pending: Vec<MessageEvent> = Vec::new();
    let mut warned = false;
    loop {
        if pending.is_empty() {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => pending.push(e),
                    None => return,
                },
                () = shutdown.requested() => return,
            }
            // Gather what else is waiting, briefly, to send it as one batch.
            let deadline = tokio::time::sleep(Duration::from_millis(200));
            tokio::pin!(deadline);
            while pending.len() < BATCH {
                tokio::select! {
                    e = rx.recv() => match e {
                        Some(e) => pending.push(e),
                        None => break,
                    },
                    () = &mut deadline => break,
                }
            }
        }
        sequence += 1;
        match publish(&socket, sequence, &pending).await {
            Ok(()) => {
                sent.fetch_add(pending.len() as u64, Ordering::Relaxed);
                pending.clear();
                warned = false;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(cause = %e, "cannot send message events to mb-rpcd; will retry");
                    warned = true;
                }
                // Keep the newest events if the buffer overflows while mb-rpcd is away.
                while pending.len() < BUFFER {
                    match rx.try_recv() {
                        Ok(e) => pending.push(e),
                        Err(_) => break,
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    () = shutdown.requested() => return,
                }
            }
        }
    }
}

/// Sends the pending events in batches over one stream and waits for every ack.
async fn publish(
    socket: &std::path::Path,
    first_seq: u64,
    events: &[MessageEvent],
) -> Result<(), PublishError> {
    let channel = crate::uds::connect(socket, "mb-rpcd").await?;
    let batches: Vec<EventBatch> = events
        .chunks(BATCH)
        .enumerate()
        .map(|(i, c)| EventBatch {
            sequence: first_seq + i as u64,
            events: c.to_vec(),
        })
        .collect();
    let expected = batches.len();
    let mut acks = EventsClient::new(channel)
        .publish(tokio_stream::iter(batches))
        .await?
        .into_inner();
    for _ in 0..expected {
        match acks.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(PublishError::Closed),
            Err(s) => return Err(s.into()),
        }
    }
    Ok(())
}
