//! The `Queue` service on mb-smtpd.sock: list, show, hold, release and delete messages.

use std::sync::Arc;

use mb_proto::v1::queue_server::Queue;
use mb_proto::v1::{
    DeleteQueueRequest, DeleteQueueResponse, ListQueueRequest, ListQueueResponse, QueueEntry,
    QueueIdRequest, RecipientState, ShowQueueRequest, ShowQueueResponse,
};
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::spool::{self, Envelope, QUEUES, Spool};

pub struct QueueService {
    pub spool: Arc<Spool>,
}

fn entry(queue: &str, size: u64, env: &Envelope) -> QueueEntry {
    QueueEntry {
        id: env.id.clone(),
        queue: queue.into(),
        size,
        arrival_unix: i64::try_from(env.received_at).unwrap_or(0),
        sender: env.sender.clone(),
        recipients: env
            .recipients
            .iter()
            .map(|r| RecipientState {
                address: r.address.clone(),
                state: "queued".into(),
                last_error: String::new(),
            })
            .collect(),
        client_ip: env.client_ip.clone(),
        protocol: env.protocol.clone(),
    }
}

fn io_status(e: &std::io::Error, id: &str) -> Status {
    if e.kind() == std::io::ErrorKind::NotFound {
        Status::not_found(format!("no message {id} in the queue; see `mb-queue list`"))
    } else {
        Status::internal(e.to_string())
    }
}

impl QueueService {
    /// Reads one message's envelope off the disk without blocking the runtime.
    async fn read(&self, id: &str) -> Result<(&'static str, Vec<u8>, Envelope), Status> {
        let (queue, path) = self.spool.locate(id).ok_or_else(|| {
            Status::not_found(format!("no message {id} in the queue; see `mb-queue list`"))
        })?;
        let (msg, env) = tokio::task::spawn_blocking(move || spool::read_message(&path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| io_status(&e, id))?;
        Ok((queue, msg, env))
    }

    async fn moved(
        &self,
        id: &str,
        to: &'static str,
        by: &str,
    ) -> Result<Response<QueueEntry>, Status> {
        self.spool.move_to(id, to).map_err(|e| io_status(&e, id))?;
        tracing::info!(id, queue = to, by, "message moved");
        let (queue, msg, env) = self.read(id).await?;
        Ok(Response::new(entry(queue, msg.len() as u64, &env)))
    }
}

#[tonic::async_trait]
impl Queue for QueueService {
    async fn list(
        &self,
        req: Request<ListQueueRequest>,
    ) -> Result<Response<ListQueueResponse>, Status> {
        let wanted = req.into_inner().queue;
        if !wanted.is_empty() && !QUEUES.contains(&wanted.as_str()) {
            return Err(Status::invalid_argument(format!(
                "no queue {wanted:?}: use incoming, deferred or hold"
            )));
        }
        let mut entries = Vec::new();
        for q in QUEUES.iter().filter(|q| wanted.is_empty() || **q == wanted) {
            for id in self
                .spool
                .ids(q)
                .map_err(|e| Status::internal(e.to_string()))?
            {
                // A message can leave the queue while we list it.
                if let Ok((queue, msg, env)) = self.read(&id).await {
                    entries.push(entry(queue, msg.len() as u64, &env));
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
        let (queue, msg, env) = self.read(&id).await?;
        let end = msg
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(msg.len(), |p| p + 2);
        Ok(Response::new(ShowQueueResponse {
            entry: Some(entry(queue, msg.len() as u64, &env)),
            headers: String::from_utf8_lossy(&msg[..end]).into_owned(),
            helo: env.helo,
            tls: env.tls,
            auth_user: env.auth_user,
        }))
    }

    async fn hold(&self, req: Request<QueueIdRequest>) -> Result<Response<QueueEntry>, Status> {
        let by = caller(&req).name;
        self.moved(&req.into_inner().id, "hold", &by).await
    }

    async fn release(&self, req: Request<QueueIdRequest>) -> Result<Response<QueueEntry>, Status> {
        let by = caller(&req).name;
        let id = req.into_inner().id;
        match self.spool.locate(&id) {
            Some(("hold", _)) => self.moved(&id, "incoming", &by).await,
            Some((q, _)) => Err(Status::failed_precondition(format!(
                "{id} is not on hold (it is in {q})"
            ))),
            None => Err(Status::not_found(format!(
                "no message {id} in the queue; see `mb-queue list`"
            ))),
        }
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
            QUEUES
                .iter()
                .flat_map(|q| self.spool.ids(q).unwrap_or_default())
                .collect()
        } else if QUEUES.contains(&r.queue.as_str()) {
            self.spool
                .ids(&r.queue)
                .map_err(|e| Status::internal(e.to_string()))?
        } else {
            return Err(Status::invalid_argument(
                "name a message, or a queue: incoming, deferred, hold or all",
            ));
        };
        let single = ids.len() == 1;
        let mut deleted = 0;
        for id in ids {
            match self.spool.delete(&id) {
                Ok(()) => {
                    deleted += 1;
                    tracing::info!(id = %id, by = %by, "message deleted");
                }
                Err(e) if single => return Err(io_status(&e, &id)),
                Err(_) => {}
            }
        }
        Ok(Response::new(DeleteQueueResponse { deleted }))
    }
}
