//! The client side of `Filter.Scan` and the one place a verdict becomes a reply.
//!
//! mb-smtpd (at the end of DATA/BDAT) and mb-milter (at end of message) ask an mb-filter
//! worker for a verdict through `Workers`: the message (`Body`, in memory or in a file)
//! is streamed in 64 KiB chunks to the live worker with the fewest scans outstanding; a
//! worker that is gone, dies mid-call or times out is skipped and the next one asked.
//! `wire` converts between the gRPC messages and the domain types of `mb_core::verdict`
//! (nothing else here sees a gRPC type), and `reply` turns a `Verdict` into what the
//! client is told, the same in every mode: standalone, content filter and milter.

pub mod reply;
pub mod wire;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mb_core::verdict::{ScanRequest, Verdict};
use mb_proto::v1::filter_client::FilterClient;
use mb_proto::v1::{ScanChunk, ScanEnvelope};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Bytes per streamed chunk.
const CHUNK: usize = 64 * 1024;

/// A message to scan: in memory, or in a file (the milter spills large messages to an
/// anonymous temporary file, and mb-smtpd scans a large message from its spool file, so
/// that a connection holds a bounded amount of memory however large the message).
/// Either can be streamed several times, once per worker asked: a file is read in
/// `CHUNK`s as the worker takes them, never whole.
#[derive(Clone)]
pub enum Body {
    Memory(Arc<Vec<u8>>),
    File { file: Arc<std::fs::File>, len: u64 },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Memory(m) => m.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole message in memory (for tests and small callers).
    pub fn read_all(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Body::Memory(m) => Ok(m.to_vec()),
            Body::File { file, len } => {
                let mut buf = vec![0; usize::try_from(*len).unwrap_or(0)];
                file.read_exact_at(&mut buf, 0)?;
                Ok(buf)
            }
        }
    }

    /// The scan request: the envelope (with the size) on the first chunk. A message in
    /// memory is cut into chunks as the client takes them, all ready at once: no task
    /// and channel per scan, and the request's head and body can leave together rather
    /// than waking the worker once for each. A file is read
    /// chunk by chunk as the worker takes them; should a read fail, the stream ends short
    /// and the worker refuses it by the announced size.
    fn stream(&self, mut envelope: ScanEnvelope) -> ChunkStream {
        envelope.size = self.len();
        match self {
            Body::Memory(m) => ChunkStream::Memory(Box::new(tokio_stream::iter(MemoryChunks {
                message: m.clone(),
                at: 0,
                envelope: Some(envelope),
            }))),
            Body::File { file, len } => {
                let (tx, rx) = mpsc::channel(4);
                let (file, len) = (file.clone(), *len);
                tokio::task::spawn_blocking(move || {
                    let mut envelope = Some(envelope);
                    let mut at = 0u64;
                    loop {
                        let want = usize::try_from((len - at).min(CHUNK as u64)).unwrap_or(CHUNK);
                        let mut data = vec![0; want];
                        if let Err(e) = file.read_exact_at(&mut data, at) {
                            tracing::error!(cause = %e, "cannot read a spilled message back");
                            return;
                        }
                        at += want as u64;
                        let chunk = ScanChunk {
                            envelope: envelope.take(),
                            data,
                        };
                        if tx.blocking_send(chunk).is_err() || at >= len {
                            return;
                        }
                    }
                });
                ChunkStream::File(ReceiverStream::new(rx))
            }
        }
    }
}

/// The chunks of one scan request.
enum ChunkStream {
    Memory(Box<tokio_stream::Iter<MemoryChunks>>),
    File(ReceiverStream<ScanChunk>),
}

impl tokio_stream::Stream for ChunkStream {
    type Item = ScanChunk;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ScanChunk>> {
        match self.get_mut() {
            ChunkStream::Memory(s) => std::pin::Pin::new(&mut **s).poll_next(cx),
            ChunkStream::File(s) => std::pin::Pin::new(s).poll_next(cx),
        }
    }
}

/// A message in memory as chunks; the first carries the envelope (an empty message is
/// that one chunk).
struct MemoryChunks {
    message: Arc<Vec<u8>>,
    at: usize,
    envelope: Option<ScanEnvelope>,
}

impl Iterator for MemoryChunks {
    type Item = ScanChunk;

    fn next(&mut self) -> Option<ScanChunk> {
        if self.at >= self.message.len() && self.envelope.is_none() {
            return None;
        }
        let end = self.message.len().min(self.at + CHUNK);
        let data = self.message.get(self.at..end).unwrap_or_default().to_vec();
        self.at = end;
        Some(ScanChunk {
            envelope: self.envelope.take(),
            data,
        })
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Body {
        Body::Memory(Arc::new(v))
    }
}

/// Why no verdict could be had. Every variant says nothing about the message itself:
/// callers follow `filter.unavailable_action` / `milter.unavailable_action`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScanError {
    #[error("no mb-filter worker configured")]
    NoWorkers,
    #[error("mb-filter@{worker}: {cause}")]
    Unreachable { worker: usize, cause: String },
    #[error("mb-filter@{worker}: {cause}")]
    Failed { worker: usize, cause: String },
    #[error("mb-filter@{worker} did not answer within {after:?}")]
    Timeout { worker: usize, after: Duration },
    #[error("mb-filter@{worker} answered with an unusable verdict: {cause}")]
    BadVerdict {
        worker: usize,
        cause: wire::WireError,
    },
    /// Every worker that answered holds `filter.max_inflight_bytes` of messages already.
    /// Not a failure of the filter: the message is tempfailed (never accepted unscanned,
    /// whatever `unavailable_action` says, or a flood of large messages would switch
    /// scanning off) and the sender tries again later.
    #[error("mb-filter@{worker} has no room for the message now ({cause})")]
    Busy { worker: usize, cause: String },
}

impl ScanError {
    /// The workers are full (`filter.max_inflight_bytes`): tempfail with
    /// `reply::busy()`, whatever `unavailable_action` says.
    pub fn is_busy(&self) -> bool {
        matches!(self, ScanError::Busy { .. })
    }
}

#[tonic::async_trait]
pub trait Scanner: Send + Sync {
    /// A verdict, or why no worker could give one.
    async fn scan(&self, request: &ScanRequest, message: Body) -> Result<Verdict, ScanError>;
}

/// The mb-filter workers `mb-filter-1.sock` .. `mb-filter-N.sock`.
pub struct Workers {
    run_dir: PathBuf,
    /// The longest wait for one worker's verdict, asked at each scan (a live
    /// `filter.scan_timeout` takes effect at the next message).
    timeout: Box<dyn Fn() -> Duration + Send + Sync>,
    in_flight: Vec<AtomicUsize>,
    /// Where the search for the least loaded worker starts, moved on at every scan, so
    /// that idle workers take turns instead of the first one taking every message.
    next: AtomicUsize,
    channels: Mutex<HashMap<usize, Channel>>,
}

impl Workers {
    pub fn new(run_dir: PathBuf, workers: usize, timeout: Duration) -> Workers {
        Workers {
            run_dir,
            timeout: Box::new(move || timeout),
            in_flight: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            next: AtomicUsize::new(0),
            channels: Mutex::default(),
        }
    }

    /// Takes the timeout from `timeout` at every scan instead (the daemons pass their
    /// configuration follower, so `mb-config set filter.scan_timeout` is live).
    #[must_use]
    pub fn live_timeout(mut self, timeout: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        self.timeout = Box::new(timeout);
        self
    }

    async fn channel(&self, n: usize) -> Result<Channel, ScanError> {
        if let Some(c) = self.channels.lock().ok().and_then(|m| m.get(&n).cloned()) {
            return Ok(c);
        }
        let socket = self.run_dir.join(format!("mb-filter-{n}.sock"));
        let c = mb_runtime::uds::connect(&socket, &format!("mb-filter@{n}"))
            .await
            .map_err(|e| ScanError::Unreachable {
                worker: n,
                cause: e.to_string(),
            })?;
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
    async fn scan(&self, request: &ScanRequest, message: Body) -> Result<Verdict, ScanError> {
        let envelope = wire::request_to_wire(request);
        // The least loaded first; among equally loaded ones, in turn from `next`.
        let n = self.in_flight.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        order.sort_by_key(|i| self.in_flight[*i].load(Ordering::Relaxed));
        let mut last = ScanError::NoWorkers;
        // A worker that said "busy" makes the whole scan busy even if a later one is
        // unreachable: the message is then tempfailed, never accepted unscanned.
        let mut busy = None;
        let timeout = (self.timeout)();
        for i in order {
            let n = i + 1;
            let channel = match self.channel(n).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            self.in_flight[i].fetch_add(1, Ordering::Relaxed);
            let mut client = FilterClient::new(channel);
            let call = client.scan(message.stream(envelope.clone()));
            let result = tokio::time::timeout(timeout, call).await;
            self.in_flight[i].fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(Ok(v)) => {
                    return wire::verdict_from_wire(v.into_inner())
                        .map_err(|cause| ScanError::BadVerdict { worker: n, cause });
                }
                Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                    tracing::info!(worker = n, cause = %status.message(), "mb-filter worker busy; trying the next");
                    busy = Some(ScanError::Busy {
                        worker: n,
                        cause: status.message().to_string(),
                    });
                }
                Ok(Err(status)) if worker_failed(&status) => {
                    tracing::warn!(worker = n, cause = %status.message(), "mb-filter worker failed; trying the next");
                    self.forget(n);
                    last = ScanError::Failed {
                        worker: n,
                        cause: status.message().to_string(),
                    };
                }
                Ok(Err(status)) => {
                    return Err(ScanError::Failed {
                        worker: n,
                        cause: status.message().to_string(),
                    });
                }
                Err(_) => {
                    tracing::warn!(worker = n, "mb-filter worker timed out; trying the next");
                    self.forget(n);
                    last = ScanError::Timeout {
                        worker: n,
                        after: timeout,
                    };
                }
            }
        }
        Err(busy.unwrap_or(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    async fn collect(body: &Body) -> (Option<ScanEnvelope>, Vec<u8>, usize) {
        let mut stream = body.stream(ScanEnvelope {
            queue_id: "Q".into(),
            ..Default::default()
        });
        let (mut env, mut data, mut n) = (None, Vec::new(), 0);
        while let Some(chunk) = stream.next().await {
            if n == 0 {
                env = chunk.envelope;
            } else {
                assert!(chunk.envelope.is_none(), "the envelope comes once");
            }
            assert!(chunk.data.len() <= CHUNK);
            data.extend_from_slice(&chunk.data);
            n += 1;
        }
        (env, data, n)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_stream_whole_from_memory_and_from_a_file_with_their_size() {
        use std::io::Write;
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&message).unwrap();
        for body in [
            Body::from(message.clone()),
            Body::File {
                file: Arc::new(f),
                len: message.len() as u64,
            },
        ] {
            let (env, data, n) = collect(&body).await;
            let env = env.unwrap();
            assert_eq!((env.queue_id.as_str(), env.size), ("Q", 200_000));
            assert!(data == message);
            assert_eq!(n, 200_000usize.div_ceil(CHUNK));
            // And again, as for a second worker.
            assert!(collect(&body).await.1 == message);
        }
        // An empty message is one chunk carrying the envelope.
        let (env, data, n) = collect(&Body::from(Vec::new())).await;
        assert_eq!((env.unwrap().size, data.len(), n), (0, 0, 1));
    }

    /// A worker that drains the stream and then says "full", or accepts.
    struct Fake {
        full: bool,
        seen: Arc<AtomicUsize>,
        delay: Duration,
    }

    #[tonic::async_trait]
    impl mb_proto::v1::filter_server::Filter for Fake {
        async fn scan(
            &self,
            req: tonic::Request<tonic::Streaming<ScanChunk>>,
        ) -> Result<tonic::Response<mb_proto::v1::ScanVerdict>, tonic::Status> {
            let mut stream = req.into_inner();
            while stream.next().await.is_some() {}
            tokio::time::sleep(self.delay).await;
            self.seen.fetch_add(1, Ordering::Relaxed);
            if self.full {
                return Err(tonic::Status::resource_exhausted("50M in flight"));
            }
            Ok(tonic::Response::new(wire::verdict_to_wire(
                &Verdict::accept(),
            )))
        }
    }

    fn serve(dir: &std::path::Path, n: usize, full: bool) -> Arc<AtomicUsize> {
        serve_slow(dir, n, full, Duration::ZERO)
    }

    fn serve_slow(
        dir: &std::path::Path,
        n: usize,
        full: bool,
        delay: Duration,
    ) -> Arc<AtomicUsize> {
        let seen = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::UnixListener::bind(dir.join(format!("mb-filter-{n}.sock")))
            .expect("bind a worker socket");
        let service = mb_proto::v1::filter_server::FilterServer::new(Fake {
            full,
            seen: seen.clone(),
            delay,
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        seen
    }

    /// A full worker is skipped for the next; when all are full the scan is `Busy`
    /// (451 4.7.1 whatever `unavailable_action` says), even if another is unreachable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_workers_are_skipped_and_all_full_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let first = serve(dir.path(), 1, true);
        let second = serve(dir.path(), 2, false);
        let request = ScanRequest::default();
        let body = Body::from(vec![b'x'; 100_000]);
        let workers = Workers::new(dir.path().into(), 2, Duration::from_secs(10));
        // Both idle: worker 1 is asked first, is full, and worker 2 answers.
        let v = workers.scan(&request, body.clone()).await.unwrap();
        assert_eq!(v.action, Verdict::accept().action);
        assert_eq!(
            (
                first.load(Ordering::Relaxed),
                second.load(Ordering::Relaxed)
            ),
            (1, 1)
        );

        // Worker 1 full, worker 3 configured but not running: still busy, not a failure.
        let dir = tempfile::tempdir().unwrap();
        serve(dir.path(), 1, true);
        serve(dir.path(), 2, true);
        let workers = Workers::new(dir.path().into(), 3, Duration::from_secs(10));
        let e = workers.scan(&request, body).await.unwrap_err();
        assert!(e.is_busy(), "{e}");
        let reply = reply::busy();
        assert_eq!(
            (reply.code, reply.to_string().contains("4.7.1")),
            (451, true),
            "{reply:?}"
        );
    }

    /// Messages one after another (every worker idle at each scan) are spread over the
    /// workers in turn, not all given to the first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_workers_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let first = serve(dir.path(), 1, false);
        let second = serve(dir.path(), 2, false);
        let workers = Workers::new(dir.path().into(), 2, Duration::from_secs(10));
        let body = Body::from(b"Subject: x\r\n\r\nx\r\n".to_vec());
        for _ in 0..6 {
            workers
                .scan(&ScanRequest::default(), body.clone())
                .await
                .unwrap();
        }
        assert_eq!(
            (
                first.load(Ordering::Relaxed),
                second.load(Ordering::Relaxed)
            ),
            (3, 3)
        );
    }

    /// A live timeout is read at each scan: a worker that answers in 300 ms is waited
    /// for under 10 s, and timed out once the setting drops to 100 ms, without a new
    /// `Workers`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_scan_timeout_is_read_at_each_scan() {
        let dir = tempfile::tempdir().unwrap();
        serve_slow(dir.path(), 1, false, Duration::from_millis(300));
        let millis = Arc::new(std::sync::atomic::AtomicU64::new(10_000));
        let setting = millis.clone();
        let workers = Workers::new(dir.path().into(), 1, Duration::from_secs(10))
            .live_timeout(move || Duration::from_millis(setting.load(Ordering::Relaxed)));
        let request = ScanRequest::default();
        let body = Body::from(b"Subject: x\r\n\r\nx\r\n".to_vec());
        assert!(workers.scan(&request, body.clone()).await.is_ok());
        millis.store(100, Ordering::Relaxed);
        let e = workers.scan(&request, body).await.unwrap_err();
        assert!(
            matches!(e, ScanError::Timeout { after, .. } if after == Duration::from_millis(100)),
            "{e}"
        );
    }
}
