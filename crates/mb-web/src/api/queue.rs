//! `/api/v1/queue`: the mail queue as `mb-queue` shows and changes it, through the same
//! `Queue` RPCs on mb-smtpd's socket. Administrators only: the queue holds every
//! domain's mail.

use axum::Json;
use axum::extract::{Path, Query, State};
use mb_proto::v1::queue_client::QueueClient;
use mb_proto::v1::{
    DeleteQueueRequest, FlushQueueRequest, ListQueueRequest, QueueIdRequest, ShowQueueRequest,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::problem::Problem;
use crate::state::AppState;

const SMTPD: &str = "mb-smtpd";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, delete_all))
        .routes(routes!(show, delete))
        .routes(routes!(hold))
        .routes(routes!(release))
        .routes(routes!(requeue))
        .routes(routes!(flush))
}

/// Which queue.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Which {
    /// incoming, deferred or hold (for a delete of a whole queue also `all`)
    pub queue: Option<String>,
}

/// A flush of one message or of every deferred one.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FlushQuery {
    /// Only this message (default: every deferred message)
    pub id: Option<String>,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Recipient {
    pub address: String,
    /// queued, deferred, delivered or bounced.
    pub state: String,
    pub last_error: String,
    /// The server that answered last, as name[ip]:port.
    pub remote: String,
}

/// A queued message, as `mb-queue list --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Entry {
    pub id: String,
    /// incoming, deferred or hold.
    pub queue: String,
    pub size: u64,
    /// Arrival, seconds since the epoch.
    pub arrival: i64,
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub client_ip: String,
    pub protocol: String,
    pub attempts: u32,
    /// The next attempt, seconds since the epoch; 0 when none is scheduled.
    pub next_attempt: i64,
}

/// One message in detail (`mb-queue show --json`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Detail {
    #[serde(flatten)]
    pub entry: Entry,
    pub headers: String,
    pub helo: String,
    pub tls: String,
    pub auth_user: String,
    /// Delivery attempts, oldest first.
    pub history: Vec<String>,
}

/// What a change did: the message's id and the queue it is in now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Changed {
    pub id: String,
    pub queue: String,
}

/// How many messages a delete removed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub deleted: u32,
}

/// How many messages a flush scheduled.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Flushed {
    pub flushed: u32,
}

impl From<mb_proto::v1::QueueEntry> for Changed {
    fn from(e: mb_proto::v1::QueueEntry) -> Changed {
        Changed {
            id: e.id,
            queue: e.queue,
        }
    }
}

fn entry(e: mb_proto::v1::QueueEntry) -> Entry {
    Entry {
        id: e.id,
        queue: e.queue,
        size: e.size,
        arrival: e.arrival_unix,
        sender: e.sender,
        recipients: e
            .recipients
            .into_iter()
            .map(|r| Recipient {
                address: r.address,
                state: r.state,
                last_error: r.last_error,
                remote: r.remote,
            })
            .collect(),
        client_ip: e.client_ip,
        protocol: e.protocol,
        attempts: e.attempts,
        next_attempt: e.next_attempt_unix,
    }
}

/// Queued messages (`mb-queue list`).
#[utoipa::path(
    get,
    path = "/api/v1/queue",
    tag = "queue",
    params(Which),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The queued messages", body = Vec<Entry>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-smtpd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list(
    _admin: Admin,
    State(state): State<AppState>,
    Query(w): Query<Which>,
) -> Result<Json<Vec<Entry>>, Problem> {
    let req = ListQueueRequest {
        queue: w.queue.unwrap_or_default(),
    };
    let r = state
        .call(
            SMTPD,
            |ch| async move { QueueClient::new(ch).list(req).await },
        )
        .await?;
    Ok(Json(r.entries.into_iter().map(entry).collect()))
}

/// Envelope, headers and history of one message (`mb-queue show`).
#[utoipa::path(
    get,
    path = "/api/v1/queue/{id}",
    tag = "queue",
    params(("id" = String, Path, description = "The queue id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The message", body = Detail),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-smtpd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn show(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Detail>, Problem> {
    let r = state
        .call(SMTPD, |ch| async move {
            QueueClient::new(ch).show(ShowQueueRequest { id }).await
        })
        .await?;
    Ok(Json(Detail {
        entry: entry(r.entry.unwrap_or_default()),
        headers: r.headers,
        helo: r.helo,
        tls: r.tls,
        auth_user: r.auth_user,
        history: r.history,
    }))
}

/// Keeps a message without delivering it (`mb-queue hold`).
#[utoipa::path(
    post,
    path = "/api/v1/queue/{id}/hold",
    tag = "queue",
    params(("id" = String, Path, description = "The queue id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "On hold", body = Changed),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-smtpd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn hold(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Changed>, Problem> {
    let e = state
        .call(SMTPD, |ch| async move {
            QueueClient::new(ch)
                .hold(super::acting(&p, QueueIdRequest { id }))
                .await
        })
        .await?;
    Ok(Json(Changed::from(e)))
}

/// Lets a held message be delivered again (`mb-queue release`).
#[utoipa::path(
    post,
    path = "/api/v1/queue/{id}/release",
    tag = "queue",
    params(("id" = String, Path, description = "The queue id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Released from hold", body = Changed),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-smtpd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn release(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Changed>, Problem> {
    let e = state
        .call(SMTPD, |ch| async move {
            QueueClient::new(ch)
                .release(super::acting(&p, QueueIdRequest { id }))
                .await
        })
        .await?;
    Ok(Json(Changed::from(e)))
}

/// Starts a message over with fresh retry counters (`mb-queue requeue`).
#[utoipa::path(
    post,
    path = "/api/v1/queue/{id}/requeue",
    tag = "queue",
    params(("id" = String, Path, description = "The queue id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Requeued", body = Changed),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-smtpd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn requeue(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Changed>, Problem> {
    let e = state
        .call(SMTPD, |ch| async move {
            QueueClient::new(ch)
                .requeue(super::acting(&p, QueueIdRequest { id }))
                .await
        })
        .await?;
    Ok(Json(Changed::from(e)))
}

/// Tries deferred messages now: all, or one (`mb-queue flush`).
#[utoipa::path(
    post,
    path = "/api/v1/queue/flush",
    tag = "queue",
    params(FlushQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Scheduled", body = Flushed),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-smtpd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn flush(
    Admin(p): Admin,
    State(state): State<AppState>,
    Query(q): Query<FlushQuery>,
) -> Result<Json<Flushed>, Problem> {
    let req = FlushQueueRequest {
        id: q.id.unwrap_or_default(),
    };
    let r = state
        .call(SMTPD, |ch| async move {
            QueueClient::new(ch).flush(super::acting(&p, req)).await
        })
        .await?;
    Ok(Json(Flushed { flushed: r.flushed }))
}

/// Deletes one message (`mb-queue delete ID`).
#[utoipa::path(
    delete,
    path = "/api/v1/queue/{id}",
    tag = "queue",
    params(("id" = String, Path, description = "The queue id")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such message", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-smtpd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn delete(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, Problem> {
    let req = DeleteQueueRequest {
        id,
        queue: String::new(),
    };
    let r = state
        .call(SMTPD, |ch| async move {
            QueueClient::new(ch).delete(super::acting(&p, req)).await
        })
        .await?;
    Ok(Json(Deleted { deleted: r.deleted }))
}

/// Deletes every message of a queue (`mb-queue delete --deferred|--hold|--all`).
#[utoipa::path(
    delete,
    path = "/api/v1/queue",
    tag = "queue",
    params(Which),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "No queue named", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-smtpd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
async fn delete_all(
    Admin(p): Admin,
    State(state): State<AppState>,
    Query(w): Query<Which>,
) -> Result<Json<Deleted>, Problem> {
    let Some(queue) = w.queue.filter(|q| !q.is_empty()) else {
        return Err(Problem::bad_request(
            "name a message, or use queue=deferred, queue=hold or queue=all",
        ));
    };
    let req = DeleteQueueRequest {
        id: String::new(),
        queue,
    };
    let r = state
        .call(SMTPD, |ch| async move {
            QueueClient::new(ch).delete(super::acting(&p, req)).await
        })
        .await?;
    Ok(Json(Deleted { deleted: r.deleted }))
}
