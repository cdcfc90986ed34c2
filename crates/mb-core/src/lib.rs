//! The domain model shared by every binary: the configuration registry, typed values,
//! the effective configuration, envelopes and verdicts. Pure: no sockets, no async.

pub mod config;
pub mod envelope;
pub mod greylist;
pub mod message;
pub mod policy;
pub mod quarantine;
pub mod recipients;
pub mod registry;
pub mod route;
pub mod schedule;
pub mod value;
pub mod verdict;

pub use config::{Config, FileError, KeyError, Source};
pub use envelope::{Envelope, Recipient};
pub use registry::{Apply, KeyDef};
pub use value::{Kind, Value};
pub use verdict::{Action, Direction, EnhancedStatus, Verdict};

/// The version of the suite, shown by `Control.Version` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
