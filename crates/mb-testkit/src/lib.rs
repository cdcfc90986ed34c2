//! Test helpers: the built binaries, mb-rpcd on a temp directory, and private MariaDB,
//! PostgreSQL and Redis servers on loopback ports. A missing peer is a failure that says
//! which Debian package to install, never a skip.
//!
//! One module per peer or concern; everything is re-exported here, so callers name
//! `mb_testkit::Gateway`, `mb_testkit::free_port`, ... and never a module, except
//! `mb_testkit::cases`, the filter case files, whose names (`Case`, `parse`, `DIR`) read
//! well only with the module's, and `mb_testkit::mta` (`mta::smtp`, `mta::milter`: one
//! message the way an MTA in front of the gateway sends it).

mod account;
mod authdns;
pub mod browser;
pub mod cases;
mod clamd;
mod dnsmasq;
mod dovecot;
mod gateway;
mod link_proxy;
mod mariadb;
pub mod mta;
mod ports;
mod postfix;
mod postgres;
mod procs;
mod redis;
mod rspamd;
mod slapd;
mod tls;

pub use account::ensure_mailborder_account;
pub use authdns::{AuthDns, Rr, Zone};
pub use clamd::{Clamd, EICAR};
pub use dnsmasq::Dnsmasq;
pub use dovecot::Dovecot;
pub use gateway::Gateway;
pub use link_proxy::LinkProxy;
pub use mariadb::MariaDb;
pub use ports::free_port;
pub use postfix::{Postfix, SmtpSink};
pub use postgres::Postgres;
pub use procs::{Proc, bin, bin_dir, require, source_root, text, wait_until};
pub use redis::Redis;
pub use rspamd::Rspamd;
pub use slapd::Slapd;
pub use tls::{self_signed, self_signed_named};
