//! The edges of a Leasehold instance: configuration, the admin surface, the gRPC server
//! and the shutdown order. `main.rs` only parses arguments and maps errors to exit codes.
//!
//! A Rust program can also run an instance with its own handler in process: see
//! [`Server::builder`].

pub mod admin;
pub mod config;
mod embedded;
pub mod failover;
pub mod gateway;
pub mod grpc_metrics;
pub mod security;
pub mod serve;
pub mod status;
pub mod telemetry;

pub use bytes::Bytes;
pub use futures::future::BoxFuture;
pub use leasehold_router::{
    CallSource, ErrorCode, HandleCall, HandleError, Handler, KafkaRecord, ShardEvent,
};
pub use leasehold_types::{Epoch, MemberId, ShardId};

pub use crate::config::ServeOptions;
pub use crate::embedded::{Server, ServerBuilder};
pub use crate::serve::ServeError;
