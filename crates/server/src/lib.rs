//! The edges of a Leasehold instance: configuration, the admin surface, the gRPC server
//! and the shutdown order. `main.rs` only parses arguments and maps errors to exit codes.

pub mod admin;
pub mod config;
pub mod grpc_metrics;
pub mod security;
pub mod serve;
pub mod status;
pub mod telemetry;
