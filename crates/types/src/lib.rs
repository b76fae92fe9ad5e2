//! The vocabulary shared by every Leasehold crate: shard ids, epochs (fencing tokens),
//! member ids and the stable key-to-shard hash. No I/O lives here.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of [`shard_for_key`]. Stored in etcd's `config` key so that instances built with
/// a different hash refuse to join a cluster.
pub const HASH_VERSION: u32 = 1;

/// Index of a shard, `0..shard_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Fencing token of a shard's ownership: the etcd `create_revision` of the shard key.
///
/// etcd revisions only grow, so every new owner of a shard has a larger epoch than every
/// earlier owner. Zero means "no owner".
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    pub const NONE: Epoch = Epoch(0);
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identity of an instance (the pod name on Kubernetes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemberId(pub String);

impl MemberId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a member id (or cluster name) is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidId {
    /// Empty, or longer than 128 characters.
    Length(usize),
    /// A character outside `[A-Za-z0-9._-]`.
    Character(char),
}

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidId::Length(n) => write!(f, "must be 1 to 128 characters, got {n}"),
            InvalidId::Character(c) => write!(
                f,
                "contains {c:?}; allowed are letters, digits, '.', '_' and '-'"
            ),
        }
    }
}

impl std::error::Error for InvalidId {}

/// Checks a member id: 1 to 128 characters of `[A-Za-z0-9._-]`, so it is safe inside an
/// etcd key and a URL path.
pub fn validate_member_id(id: &str) -> Result<(), InvalidId> {
    if id.is_empty() || id.len() > 128 {
        return Err(InvalidId::Length(id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(InvalidId::Character(c));
    }
    Ok(())
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The stable 64-bit hash of a key (hash version 1).
///
/// FNV-1a 64 over the key's UTF-8 bytes, then the MurmurHash3 `fmix64` finaliser so that
/// the low bits (used by the modulo) depend on every input bit. Both steps are a few lines
/// in any language; the test vectors below pin the result.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The shard of a key: `key_hash(key) % shard_count`.
///
/// # Panics
/// If `shard_count` is zero; configuration validation rejects that long before.
pub fn shard_for_key(key: &[u8], shard_count: u32) -> ShardId {
    assert!(shard_count > 0, "shard_count must be positive");
    ShardId((key_hash(key) % u64::from(shard_count)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors for clients in other languages. Changing any of these is a breaking
    /// change that needs a new [`HASH_VERSION`].
    const VECTORS: &[(&str, u64, u32)] = &[
        ("", 0xefd0_1f60_ba99_2926, 294),
        ("a", 0x82a2_a958_a9be_ce5b, 603),
        ("account-1", 0x4ea9_6e94_7d43_b847, 71),
        ("user:42", 0x9988_17be_e671_8248, 584),
        ("ключ", 0x5905_20d7_1827_5ed5, 725),
    ];

    #[test]
    fn hash_matches_published_vectors() {
        for &(key, hash, shard) in VECTORS {
            assert_eq!(key_hash(key.as_bytes()), hash, "hash of {key:?}");
            assert_eq!(
                shard_for_key(key.as_bytes(), 1024),
                ShardId(shard),
                "shard of {key:?}"
            );
        }
    }

    #[test]
    fn keys_spread_evenly_over_shards() {
        let shards = 64u32;
        let mut counts = vec![0u32; shards as usize];
        for i in 0..64_000 {
            counts[shard_for_key(format!("key-{i}").as_bytes(), shards).0 as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // Expected 1000 per shard; a binomial spread stays well inside ±15 %.
        assert!(*min > 850 && *max < 1150, "min {min} max {max}");
    }

    #[test]
    fn member_ids_are_checked() {
        assert!(validate_member_id("leasehold-0").is_ok());
        assert!(validate_member_id("").is_err());
        assert_eq!(validate_member_id("a/b"), Err(InvalidId::Character('/')));
        assert!(validate_member_id("a/b")
            .unwrap_err()
            .to_string()
            .contains("'/'"));
    }

    #[test]
    fn epochs_serialise_as_numbers() {
        assert_eq!(serde_json::to_string(&Epoch(7)).unwrap(), "7");
    }
}
