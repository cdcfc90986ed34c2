//! The SMTP protocol both sides of the gateway share, as one library (as Postfix's
//! `smtp_stream.c` serves its server and client alike). Its core is free of I/O:
//! commands and paths (`proto`), the DATA/BDAT decoders (`data`), replies and their one
//! wire encoder, the reply parser and EHLO capabilities (`reply`). With the `io`
//! feature: buffered connections with limits and timeouts (`conn`) and the outbound
//! SMTP/LMTP client with reinjection (`client`).

#[cfg(feature = "io")]
pub mod client;
#[cfg(feature = "io")]
pub mod conn;
pub mod data;
pub mod proto;
pub mod reply;

pub use reply::{EnhancedStatus, Reply};
