//! What the administrator's tools share: exit statuses, turning gRPC errors into words,
//! reaching mb-rpcd, and running on a small runtime.

use std::future::Future;
use std::process::ExitCode;

use mb_core::Config;
use tonic::transport::Channel;

use crate::uds::ConnectError;

/// A failure with the exit status it maps to: 1 refused, 69 unreachable, 77 denied.
pub struct Failure(pub u8, pub anyhow::Error);

impl Failure {
    pub fn refused(e: impl Into<anyhow::Error>) -> Failure {
        Failure(1, e.into())
    }
}

impl From<ConnectError> for Failure {
    fn from(e: ConnectError) -> Self {
        let code = if matches!(e, ConnectError::Denied { .. }) {
            77
        } else {
            69
        };
        Failure(code, e.into())
    }
}

/// A gRPC error from `daemon` as a failure: the request refused (1), the caller denied
/// (77), or the daemon unavailable (69).
pub fn grpc(daemon: &str, e: &tonic::Status) -> Failure {
    let code = match e.code() {
        tonic::Code::NotFound
        | tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::AlreadyExists => 1,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => 77,
        _ => 69,
    };
    Failure(
        code,
        anyhow::anyhow!(crate::uds::describe_status(daemon, e)),
    )
}

/// A channel to mb-rpcd's socket.
pub async fn rpcd(cfg: &Config) -> Result<Channel, Failure> {
    Ok(crate::uds::connect(&cfg.socket("mb-rpcd"), "mb-rpcd").await?)
}

/// Runs a tool's work on a single-threaded runtime; prints `tool: error` and exits
/// with the failure's status.
pub fn run<F: Future<Output = Result<(), Failure>>>(tool: &str, work: F) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{tool}: {e}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("{tool}: {e:#}");
            ExitCode::from(code)
        }
    }
}
