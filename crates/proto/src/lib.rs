//! Code generated from `proto/leasehold/v1`. Wire types stay at the edges; the other
//! crates map them to the domain types of `leasehold-types`.

#![allow(clippy::all, missing_docs, rust_2018_idioms)]

pub mod v1 {
    tonic::include_proto!("leasehold.v1");
}

/// Encoded `FileDescriptorSet` of every Leasehold proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("leasehold_descriptor");
