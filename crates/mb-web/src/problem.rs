//! Errors as RFC 9457 problem details (`application/problem+json`), the one shape every
//! failing route answers with. gRPC errors keep the daemon's message, in the words the
//! CLIs print (`mb_runtime::uds::describe_status`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The media type of a problem document.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"type": "about:blank", "title": "Service Unavailable", "status": 503,
    "detail": "mb-rpcd is not running (no socket at /run/mailborder/mb-rpcd.sock); start it with `systemctl start mb-rpcd` (or `cargo xtask up` in a source checkout)"}))]
pub struct Problem {
    /// A URI naming the kind of problem; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status code's reason phrase.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Seconds before a retry makes sense (the `Retry-After` header, not in the body).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        let detail = detail.into();
        Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: (!detail.is_empty()).then_some(detail),
            retry_after: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, detail)
    }

    pub fn unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, detail)
    }

    pub fn internal(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, detail)
    }

    /// 429 with `Retry-After`.
    pub fn too_many_requests(retry_after: u64) -> Problem {
        Problem {
            retry_after: Some(retry_after),
            ..Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many requests from this address; retry in {retry_after}s"),
            )
        }
    }

    /// A gRPC error from `daemon`, worded as the CLIs word it.
    pub fn grpc(daemon: &str, status: &tonic::Status) -> Problem {
        Problem::new(
            http_status(status.code()),
            mb_runtime::uds::describe_status(daemon, status),
        )
    }

    /// The HTTP status code.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// The HTTP status for a gRPC code: the request's fault is 4xx, a daemon's is 5xx.
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::BAD_GATEWAY
        }
    }
}

/// Keeps the message text: the daemon already worded it for an administrator.
impl From<tonic::Status> for Problem {
    fn from(status: tonic::Status) -> Problem {
        Problem::new(http_status(status.code()), status.message())
    }
}

/// A daemon that cannot be reached, in the CLIs' words ("mb-rpcd is not running ...").
impl From<mb_runtime::uds::ConnectError> for Problem {
    fn from(e: mb_runtime::uds::ConnectError) -> Problem {
        let status = match e {
            mb_runtime::uds::ConnectError::Denied { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Problem::new(status, e.to_string())
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.detail {
            Some(d) => write!(f, "{} {}: {d}", self.status, self.title),
            None => write!(f, "{} {}", self.status, self.title),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_keep_the_daemons_words_and_map_to_http() {
        let check = |code: tonic::Code, http: u16| {
            let p = Problem::from(tonic::Status::new(code, "no such policy: 7"));
            assert_eq!(p.status, http, "{code:?}");
            assert_eq!(p.detail.as_deref(), Some("no such policy: 7"));
        };
        check(tonic::Code::NotFound, 404);
        check(tonic::Code::InvalidArgument, 400);
        check(tonic::Code::FailedPrecondition, 409);
        check(tonic::Code::PermissionDenied, 403);
        check(tonic::Code::Unavailable, 503);
        check(tonic::Code::Internal, 502);
        // Through describe_status, as mb-config prints it.
        let p = Problem::grpc("mb-rpcd", &tonic::Status::unavailable("database is down"));
        assert_eq!(
            p.detail.as_deref(),
            Some("mb-rpcd is unavailable: database is down")
        );
    }

    #[test]
    fn a_problem_is_problem_json_with_retry_after() {
        let resp = Problem::too_many_requests(3).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        let v = serde_json::to_value(Problem::not_found("no such message")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "about:blank", "title": "Not Found", "status": 404,
                               "detail": "no such message"})
        );
    }
}
