//! The gRPC services of mb-rpcd: Config, Events, and its Control hooks. The message
//! log's and the audit trail's conversions between gRPC messages and `db` records live
//! here, once (the `Replica` service uses them too).

use std::sync::Arc;
use std::time::Duration;

use mb_proto::v1::config_server::Config as ConfigApi;
use mb_proto::v1::events_server::Events;
use mb_proto::v1::{
    AuditEntry, ComponentStatus, ConfigChange, EventBatch, EventQuery, EventQueryResponse,
    GetRequest, GetResponse, HistoryRequest, HistoryResponse, ListRequest, ListResponse,
    MessageEvent, PublishAck, ReloadResponse, SetRequest, SetResponse, StatusRequest,
    StatusResponse, UnsetRequest, UnsetResponse, ValidateRequest, ValidateResponse,
    ValidationError, WatchRequest,
};
use mb_runtime::control::{DaemonHooks, DaemonInfo};
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::uds::caller;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::db::{AuditRecord, EventFilter, EventRecord};
use crate::store::{Store, StoreError};

/// Largest event batch accepted in one message.
const MAX_BATCH: usize = 10_000;

/// The one place store errors become gRPC statuses.
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::Key(k @ mb_core::KeyError::Unknown { .. }) => Status::not_found(k.to_string()),
        StoreError::Key(k @ mb_core::KeyError::FileOnly { .. }) => {
            Status::failed_precondition(k.to_string())
        }
        StoreError::Key(k) => Status::invalid_argument(k.to_string()),
        StoreError::File(msg) | StoreError::Child(msg) => Status::failed_precondition(msg),
        StoreError::Db(d) => {
            tracing::error!(cause = %d, "database operation failed");
            Status::unavailable(d.to_string())
        }
    }
}

#[derive(Clone)]
pub struct Rpcd {
    pub store: Arc<Store>,
    pub info: Arc<DaemonInfo>,
    pub shutdown: Shutdown,
}

#[tonic::async_trait]
impl ConfigApi for Rpcd {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let who = caller(&req);
        let value = self.store.get(&req.get_ref().key, &who).map_err(status)?;
        Ok(Response::new(GetResponse { value: Some(value) }))
    }

    async fn set(&self, req: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let out = self
            .store
            .set(&r.key, &r.value, &who)
            .await
            .map_err(status)?;
        self.info.counters.add("config_sets", 1);
        let restart_required = out.changed
            && out
                .value
                .info
                .as_ref()
                .is_some_and(|i| i.apply == mb_proto::v1::Apply::Restart as i32);
        Ok(Response::new(SetResponse {
            previous: Some(out.previous),
            value: Some(out.value),
            restart_required,
            generation: out.generation,
            warnings: out.warnings,
        }))
    }

    async fn unset(&self, req: Request<UnsetRequest>) -> Result<Response<UnsetResponse>, Status> {
        let who = caller(&req);
        let out = self
            .store
            .unset(&req.get_ref().key, &who)
            .await
            .map_err(status)?;
        self.info.counters.add("config_unsets", 1);
        let restart_required = out.changed
            && out
                .value
                .info
                .as_ref()
                .is_some_and(|i| i.apply == mb_proto::v1::Apply::Restart as i32);
        Ok(Response::new(UnsetResponse {
            previous: Some(out.previous),
            value: Some(out.value),
            restart_required,
            generation: out.generation,
            removed: out.changed,
        }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let who = caller(&req);
        let values = self
            .store
            .list(&req.get_ref().prefix, &who)
            .map_err(status)?;
        Ok(Response::new(ListResponse {
            values,
            generation: self.store.generation(),
        }))
    }

    async fn validate(
        &self,
        req: Request<ValidateRequest>,
    ) -> Result<Response<ValidateResponse>, Status> {
        let r = req.into_inner();
        let errors: Vec<ValidationError> = if r.toml.is_empty() {
            self.store
                .effective()
                .check()
                .into_iter()
                .map(|message| ValidationError {
                    message,
                    ..Default::default()
                })
                .collect()
        } else {
            let name = if r.filename.is_empty() {
                "<request>"
            } else {
                &r.filename
            };
            match mb_core::Config::from_toml_str(&r.toml, name) {
                Ok(cfg) => cfg
                    .check()
                    .into_iter()
                    .map(|message| ValidationError {
                        file: name.to_string(),
                        message,
                        ..Default::default()
                    })
                    .collect(),
                Err(errors) => errors
                    .into_iter()
                    .map(|e| ValidationError {
                        file: e.file,
                        line: e.line,
                        column: e.column,
                        key: e.key.unwrap_or_default(),
                        message: e.message,
                    })
                    .collect(),
            }
        };
        Ok(Response::new(ValidateResponse {
            valid: errors.is_empty(),
            errors,
        }))
    }

    type WatchStream = ReceiverStream<Result<ConfigChange, Status>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = caller(&req);
        let prefix = req.into_inner().prefix;
        let mut changes = self.store.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tracing::debug!(user = %who.name, prefix, "configuration watcher connected");
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    () = shutdown.requested() => break,
                    () = tx.closed() => break,
                    c = changes.recv() => c,
                };
                let item = match change {
                    Ok(mut c) => {
                        if !c.reloaded && !prefix.is_empty() && !c.key.starts_with(&prefix) {
                            continue;
                        }
                        if mb_core::registry::find(&c.key)
                            .is_some_and(|d| !crate::secrets::reveals(d, &who))
                        {
                            c.old_value = mb_core::config::REDACTED.into();
                            c.new_value = mb_core::config::REDACTED.into();
                        }
                        Ok(c)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::data_loss(format!(
                            "watcher fell {n} changes behind; list the configuration again and re-watch"
                        )))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn history(
        &self,
        req: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let r = req.into_inner();
        if !r.key.is_empty() {
            mb_core::config::lookup(&r.key).map_err(|e| status(e.into()))?;
        }
        let limit = if r.limit == 0 { 100 } else { r.limit };
        let entries = self
            .store
            .db
            .history(&r.key, limit)
            .await
            .map_err(|e| status(e.into()))?
            .into_iter()
            .map(AuditEntry::from)
            .collect();
        Ok(Response::new(HistoryResponse { entries }))
    }
}

#[tonic::async_trait]
impl Events for Rpcd {
    type PublishStream = ReceiverStream<Result<PublishAck, Status>>;

    async fn publish(
        &self,
        req: Request<Streaming<EventBatch>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let mut batches = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    () = this.shutdown.requested() => break,
                    b = batches.message() => b,
                };
                let batch = match batch {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(cause = %e, "event stream ended");
                        break;
                    }
                };
                let ack = if batch.events.len() > MAX_BATCH {
                    Err(Status::invalid_argument(format!(
                        "a batch holds at most {MAX_BATCH} events"
                    )))
                } else if let Some(e) = batch
                    .events
                    .iter()
                    .find(|e| e.event_id.is_empty() || e.event_id.len() > 191)
                {
                    Err(Status::invalid_argument(format!(
                        "event id {:?} must be 1 to 191 bytes",
                        e.event_id
                    )))
                } else {
                    let events: Vec<EventRecord> =
                        batch.events.into_iter().map(EventRecord::from).collect();
                    match this
                        .store
                        .db
                        .store_events(&events, this.store.cluster_main().is_some())
                        .await
                    {
                        Ok((stored, duplicates)) => {
                            this.info.counters.add("events_stored", u64::from(stored));
                            this.info
                                .counters
                                .add("events_duplicate", u64::from(duplicates));
                            Ok(PublishAck {
                                sequence: batch.sequence,
                                stored,
                                duplicates,
                            })
                        }
                        Err(e) => Err(status(e.into())),
                    }
                };
                let stop = ack.is_err();
                if tx.send(ack).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn query(
        &self,
        req: Request<EventQuery>,
    ) -> Result<Response<EventQueryResponse>, Status> {
        let events = self
            .store
            .db
            .query_events(&EventFilter::from(req.into_inner()))
            .await
            .map_err(|e| status(e.into()))?
            .into_iter()
            .map(MessageEvent::from)
            .collect();
        Ok(Response::new(EventQueryResponse { events }))
    }
}

impl From<AuditRecord> for AuditEntry {
    fn from(r: AuditRecord) -> Self {
        AuditEntry {
            id: r.id,
            key: r.key,
            action: r.action,
            old_value: r.old_value.unwrap_or_default(),
            new_value: r.new_value.unwrap_or_default(),
            // The wire has no "none": a caller without a uid shows as u32::MAX.
            uid: r.uid.unwrap_or(u32::MAX),
            user: r.user,
            at_unix: r.at,
        }
    }
}

impl From<MessageEvent> for EventRecord {
    fn from(e: MessageEvent) -> Self {
        EventRecord {
            event_id: e.event_id,
            node: e.node,
            daemon: e.daemon,
            at_unix_ms: e.at_unix_ms,
            queue_id: e.queue_id,
            message_id: e.message_id,
            client_ip: e.client_ip,
            client_name: e.client_name,
            helo: e.helo,
            sender: e.sender,
            recipients: e.recipients,
            size: e.size,
            stage: e.stage,
            verdict: e.verdict,
            score: e.score,
            symbols: e.symbols,
            detail: e.detail,
            subject: e.subject,
            direction: e.direction,
        }
    }
}

impl From<EventRecord> for MessageEvent {
    fn from(e: EventRecord) -> Self {
        MessageEvent {
            event_id: e.event_id,
            node: e.node,
            daemon: e.daemon,
            at_unix_ms: e.at_unix_ms,
            queue_id: e.queue_id,
            message_id: e.message_id,
            client_ip: e.client_ip,
            client_name: e.client_name,
            helo: e.helo,
            sender: e.sender,
            recipients: e.recipients,
            size: e.size,
            stage: e.stage,
            verdict: e.verdict,
            score: e.score,
            symbols: e.symbols,
            detail: e.detail,
            subject: e.subject,
            direction: e.direction,
        }
    }
}

/// The wire's "unset" is an empty string, a zero time or a zero limit.
impl From<EventQuery> for EventFilter {
    fn from(q: EventQuery) -> Self {
        let set = |s: String| (!s.is_empty()).then_some(s);
        EventFilter {
            since_ms: q.since_unix_ms,
            until_ms: (q.until_unix_ms > 0).then_some(q.until_unix_ms),
            queue_id: set(q.queue_id),
            sender: set(q.sender),
            recipient: set(q.recipient),
            verdict: set(q.verdict),
            stage: set(q.stage),
            newest_first: q.newest_first,
            limit: (q.limit > 0).then_some(q.limit),
            subject: set(q.subject),
            client_ip: set(q.client_ip.trim().to_string()),
            // Stored as the header gives it between its angle brackets.
            message_id: set(q
                .message_id
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()),
            scope: crate::message_log::Scope::from_wire(q.scoped, q.domains, q.addresses),
        }
    }
}

#[tonic::async_trait]
impl DaemonHooks for Rpcd {
    async fn status(&self, req: &StatusRequest, resp: &mut StatusResponse) {
        resp.config_generation = self.store.generation();
        let db = match self.store.db.ping().await {
            Ok(latency) => ComponentStatus {
                name: "database".into(),
                state: "ok".into(),
                address: self.store.db.url.clone(),
                detail: format!("{:?}", self.store.db.dialect).to_lowercase(),
                latency_micros: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            },
            Err(e) => ComponentStatus {
                name: "database".into(),
                state: "down".into(),
                address: self.store.db.url.clone(),
                detail: e.to_string(),
                latency_micros: 0,
            },
        };
        let cfg = self.store.effective();
        let redis =
            mb_runtime::probe::redis_ping(&cfg.text("redis.url"), Duration::from_secs(2)).await;
        resp.components = vec![db, redis];
        if req.include_daemons {
            let mut daemons = mb_runtime::probe::probe_all(&cfg, Duration::from_secs(2)).await;
            daemons.retain(|d| d.name != self.info.name);
            resp.daemons = daemons;
        }
    }

    async fn reload(&self) -> Result<ReloadResponse, Status> {
        let restart_required = self.store.reload(&self.info.name).await.map_err(status)?;
        Ok(ReloadResponse {
            reloaded: true,
            config_generation: self.store.generation(),
            detail: if restart_required.is_empty() {
                String::new()
            } else {
                format!(
                    "restart {} to apply: {}",
                    self.info.name,
                    restart_required.join(", ")
                )
            },
            restart_required,
        })
    }
}
