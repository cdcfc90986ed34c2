//! The gRPC API of the gateway, generated from `proto/mailborder/v1`.
//!
//! Only these types cross a process boundary; daemons convert to and from
//! their own types at the edge.

#![allow(clippy::all, clippy::pedantic)]

/// Version 1 of the API (`package mailborder.v1`).
pub mod v1 {
    tonic::include_proto!("mailborder.v1");

    /// The protobuf package the daemons speak, reported by `Control.Version`.
    pub const API: &str = "mailborder.v1";
}
