//! The domain model shared by every binary: the configuration registry, typed values and
//! the effective configuration. Pure: no sockets, no async.

pub mod config;
pub mod message;
pub mod policy;
pub mod registry;
pub mod route;
pub mod value;

pub use config::{Config, FileError, KeyError, Source};
pub use registry::{Apply, KeyDef};
pub use value::{Kind, Value};

/// The version of the suite, shown by `Control.Version` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
