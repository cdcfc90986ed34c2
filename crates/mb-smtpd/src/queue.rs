//! The `Queue` service on mb-smtpd.sock: list, show, hold, release, delete, flush and
//! requeue messages. The spool's own types (`Queue`, `RecipientState`) become the
//! service's strings here, at its edge, and nowhere else.

use std::sync::Arc;

use mb_proto::v1 as proto;
use mb_proto::v1::{
    DeleteQueueRequest, DeleteQueueResponse, FlushQueueRequest, FlushQueueResponse,
    ListQueueRequest, ListQueueResponse, QueueEntry, QueueIdRequest, ShowQueueRequest,
    ShowQueueResponse,
};
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::spool::{self, Change, Envelope, Queue, RecipientState, Spool};

pub struct QueueService {
    pub spool: Arc<Spool>,
    pub manager: Option<Arc<crate::qmgr::Manager>>,
}

/// A queued message as read from the spool: its queue, size, header section, envelope
/// and delivery state.
struct Queued {
    queue: Queue,
    size: u64,
    /// The message's first bytes, enough for its header section.
    head: Vec<u8>,
    env: Envelope,
    state: spool::DeliveryState,
}

/// Bytes of a message `show` reads for its header section.
const HEAD: u64 = 64 * 1024;

fn entry(q: &Queued) -> QueueEntry {
    let (queue, env, state) = (q.queue, &q.env, &q.state);
    let size = q.size;
    QueueEntry {
        id: env.id.clone(),
        queue: queue.as_str().into(),
        size,
        arrival_unix: i64::try_from(env.received_at).unwrap_or(0),
        sender: env.sender.clone(),
        recipients: state
            .recipients
            .iter()
            .map(|r| proto::RecipientState {
                address: r.address.clone(),
                state: r.state.as_str().into(),
                last_error: r.last_error.clone(),
                remote: r.remote.clone(),
            })
            .collect(),
        client_ip: env.client_ip.clone(),
        protocol: env.protocol.clone(),
        attempts: state.attempts,
        next_attempt_unix: if queue == Queue::Deferred {
            i64::try_from(state.next_attempt).unwrap_or(0)
        } else {
            0
        },
    }
}

fn spool_status(e: &spool::Error, id: &str) -> Status {
    if e.is_not_found() {
        not_found(id)
    } else {
        Status::unavailable(e.to_string())
    }
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no message {id} in the queue; see `mb-queue list`"))
}

impl QueueService {
    fn manager(&self) -> Result<&Arc<crate::qmgr::Manager>, Status> {
        self.manager
            .as_ref()
            .ok_or_else(|| Status::unavailable("the queue manager is not running"))
    }

    fn poke(&self) {
        if let Some(m) = &self.manager {
            m.poke();
        }
    }

    /// Reads one message and its delivery state from the spool without blocking the
    /// runtime.
    async fn read(&self, id: &str) -> Result<Queued, Status> {
        let (spool, idc) = (self.spool.clone(), id.to_string());
        tokio::task::spawn_blocking(move || {
            let q = spool.read(&idc)?;
            let mut head = vec![0u8; usize::try_from(q.body.len().min(HEAD)).unwrap_or(0)];
            q.body.read_exact_at(&mut head, 0)?;
            Ok::<_, spool::Error>(Queued {
                queue: q.queue,
                size: q.body.len(),
                head,
                env: q.envelope,
                state: q.state,
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| spool_status(&e, id))
    }

    /// Moves a message to `to` (a durable state change), when `allowed` accepts the
    /// queue it is in now (else the error `allowed` gave).
    async fn moved(
        &self,
        id: &str,
        to: Queue,
        by: &str,
        allowed: impl FnOnce(Queue) -> Result<(), Status>,
    ) -> Result<Response<QueueEntry>, Status> {
        self.spool
            .update(id, |from, _| match allowed(from) {
                Ok(()) => (Change::Set(to, None), Ok(())),
                Err(e) => (Change::Keep, Err(e)),
            })
            .await
            .map_err(|e| spool_status(&e, id))??;
        tracing::info!(id, queue = to.as_str(), by, "message moved");
        Ok(Response::new(entry(&self.read(id).await?)))
    }
}

#[tonic::async_trait]
impl proto::queue_server::Queue for QueueService {
    async fn list(
        &self,
        req: Request<ListQueueRequest>,
    ) -> Result<Response<ListQueueResponse>, Status> {
        let wanted = req.into_inner().queue;
        let queues: Vec<Queue> = if wanted.is_empty() {
            Queue::ALL.to_vec()
        } else {
            let q = Queue::from_name(&wanted).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "no queue {wanted:?}: use incoming, deferred or hold"
                ))
            })?;
            vec![q]
        };
        let mut entries = Vec::new();
        for q in queues {
            for id in self.spool.ids(q) {
                // A message can leave the queue while we list it.
                if let Ok(q) = self.read(&id).await {
                    entries.push(entry(&q));
                }
            }
        }
        Ok(Response::new(ListQueueResponse { entries }))
    }

    async fn show(
        &self,
        req: Request<ShowQueueRequest>,
    ) -> Result<Response<ShowQueueResponse>, Status> {
        let id = req.into_inner().id;
        let q = self.read(&id).await?;
        let end = q
            .head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(q.head.len(), |p| p + 2);
        Ok(Response::new(ShowQueueResponse {
            entry: Some(entry(&q)),
            headers: String::from_utf8_lossy(&q.head[..end]).into_owned(),
            history: q.state.history,
            helo: q.env.helo,
            tls: q.env.tls,
            auth_user: q.env.auth_user,
        }))
    }

    async fn hold(&self, req: Request<QueueIdRequest>) -> Result<Response<QueueEntry>, Status> {
        let by = caller(&req).name;
        self.moved(&req.into_inner().id, Queue::Hold, &by, |_| Ok(()))
            .await
    }

    async fn release(&self, req: Request<QueueIdRequest>) -> Result<Response<QueueEntry>, Status> {
        let by = caller(&req).name;
        let id = req.into_inner().id;
        let r = self
            .moved(&id, Queue::Incoming, &by, |q| {
                if q == Queue::Hold {
                    Ok(())
                } else {
                    Err(Status::failed_precondition(format!(
                        "{id} is not on hold (it is in {q})"
                    )))
                }
            })
            .await;
        if r.is_ok() {
            self.poke();
        }
        r
    }

    async fn flush(
        &self,
        req: Request<FlushQueueRequest>,
    ) -> Result<Response<FlushQueueResponse>, Status> {
        let id = req.into_inner().id;
        let manager = self.manager()?;
        if !id.is_empty() {
            match self.spool.locate(&id) {
                Some(Queue::Deferred) => {}
                Some(q) => {
                    return Err(Status::failed_precondition(format!(
                        "{id} is not deferred (it is in {q}); `mb-queue requeue {id}` starts it over"
                    )));
                }
                None => return Err(not_found(&id)),
            }
        }
        let flushed = manager.flush((!id.is_empty()).then_some(id.as_str()));
        Ok(Response::new(FlushQueueResponse {
            flushed: u32::try_from(flushed).unwrap_or(u32::MAX),
        }))
    }

    async fn requeue(&self, req: Request<QueueIdRequest>) -> Result<Response<QueueEntry>, Status> {
        let by = caller(&req).name;
        let id = req.into_inner().id;
        let manager = self.manager()?;
        // The envelope's recipients give a message never tried its fresh state.
        let fresh = self.read(&id).await?.state;
        let note = format!(
            "{} requeued by {by}",
            mb_runtime::logging::timestamp(std::time::SystemTime::now())
        );
        // A requeue during an attempt would be undone by the attempt's own outcome (its
        // deferral writes the state it started from): refused, to be asked again.
        let busy = || {
            Status::failed_precondition(format!(
                "{id} is being delivered now; try `mb-queue requeue {id}` again when the attempt ends"
            ))
        };
        if manager.is_active(&id) {
            return Err(busy());
        }
        let requeued = self
            .spool
            .update(&id, |_, stored| {
                if manager.is_active(&id) {
                    return (Change::Keep, false);
                }
                let mut state = stored
                    .filter(|s| s.recipients.len() == fresh.recipients.len())
                    .unwrap_or(fresh);
                for r in state
                    .recipients
                    .iter_mut()
                    .filter(|r| r.state != RecipientState::Delivered)
                {
                    r.state = RecipientState::Queued;
                    r.last_error.clear();
                }
                state.attempts = 0;
                state.next_attempt = 0;
                state.delay_warned = false;
                state.note(note);
                (Change::Set(Queue::Incoming, Some(state)), true)
            })
            .await
            .map_err(|e| spool_status(&e, &id))?;
        if !requeued {
            return Err(busy());
        }
        tracing::info!(id, queue = Queue::Incoming.as_str(), by, "message moved");
        let r = self.read(&id).await.map(|q| Response::new(entry(&q)));
        manager.poke();
        r
    }

    async fn delete(
        &self,
        req: Request<DeleteQueueRequest>,
    ) -> Result<Response<DeleteQueueResponse>, Status> {
        let by = caller(&req).name;
        let r = req.into_inner();
        let ids: Vec<String> = if !r.id.is_empty() {
            vec![r.id]
        } else if r.queue == "all" {
            Queue::ALL
                .into_iter()
                .flat_map(|q| self.spool.ids(q))
                .collect()
        } else if let Some(q) = Queue::from_name(&r.queue) {
            self.spool.ids(q)
        } else {
            return Err(Status::invalid_argument(
                "name a message, or a queue: incoming, deferred, hold or all",
            ));
        };
        let single = ids.len() == 1;
        let mut deleted = 0;
        // Every deletion is queued first, so that they share the log's fsyncs.
        let mut pending = Vec::new();
        for id in ids {
            match self.spool.change(&id, |_, _| (Change::Complete, ())) {
                Ok((p, ())) => pending.extend(p.map(|p| (id, p))),
                Err(e) if single => return Err(spool_status(&e, &id)),
                Err(_) => {}
            }
        }
        for (id, p) in pending {
            match p.await {
                Ok(()) => {
                    deleted += 1;
                    tracing::info!(id = %id, by = %by, "message deleted");
                }
                Err(e) if single => return Err(spool_status(&e.into(), &id)),
                Err(_) => {}
            }
        }
        Ok(Response::new(DeleteQueueResponse { deleted }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{DeliveryState, RecipientStatus};

    #[test]
    fn entries_carry_the_queue_and_states_as_the_service_names_them() {
        let status = |address: &str, state| RecipientStatus {
            address: address.into(),
            state,
            last_error: String::new(),
            remote: String::new(),
        };
        let q = Queued {
            queue: Queue::Deferred,
            size: 20,
            head: b"Subject: x\r\n\r\nbody\r\n".to_vec(),
            env: Envelope {
                id: "ABC".into(),
                ..Default::default()
            },
            state: DeliveryState {
                attempts: 3,
                next_attempt: 1_700_000_000,
                recipients: vec![
                    status("a@x.example", RecipientState::Delivered),
                    status("b@x.example", RecipientState::Deferred),
                    status("c@x.example", RecipientState::Bounced),
                    status("d@x.example", RecipientState::Queued),
                ],
                ..Default::default()
            },
        };
        let e = entry(&q);
        assert_eq!(e.queue, "deferred");
        let states: Vec<&str> = e.recipients.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["delivered", "deferred", "bounced", "queued"]);
        assert_eq!((e.attempts, e.next_attempt_unix), (3, 1_700_000_000));
        // Only a deferred message has a next attempt to show.
        let held = Queued {
            queue: Queue::Hold,
            ..q
        };
        let e = entry(&held);
        assert_eq!((e.queue.as_str(), e.next_attempt_unix), ("hold", 0));
    }
}
