//! Claims of Kafka partitions: each new assignment of a partition to a consumer claims
//! it in etcd before dispatching any of its records; the claim's revision is its
//! *fence*, and owners refuse records read under a fence older than the latest they know.

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use leasehold_types::MemberId;

/// Outcome of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Claimed: records read under this assignment carry `fence`.
    Claimed { fence: u64 },
    /// A claim from a later generation of the group (or the same generation by another
    /// member) holds the partition: this consumer lost it, whether it knows yet or not.
    Superseded { holder: String },
}

/// The value of a claim: the group generation, zero-padded so that etcd's byte order is
/// the generations' order, then the member.
pub fn claim_value(generation: i32, member: &MemberId) -> String {
    format!("{:010}/{}", generation.max(0), member)
}

/// How a claim treats a claim already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimMode {
    /// Refused when the held claim sorts after ours (a later generation): a consumer that
    /// lost the partition cannot take the fence back with a delayed claim.
    Ordered,
    /// Taken whatever is held: for a consumer that librdkafka still shows as the
    /// partition's assignee a whole session timeout after its claim was superseded (the
    /// group's member in fact; a lost consumer learns it within that time). Also ends the
    /// wedge of a group recreated at generation 1 while old claims remain.
    Force,
}

/// Claims `key` with `value` (see [`claim_value`]). Claims are not leased: they outlive
/// their claimant, so a restarted instance's lost lease cannot make room for a delayed
/// claim of a consumer that lost the partition.
pub async fn claim(
    client: &mut Client,
    key: String,
    value: String,
    mode: ClaimMode,
) -> Result<Claim, etcd_client::Error> {
    let put = || TxnOp::put(key.clone(), value.clone(), None);
    let txn = match mode {
        ClaimMode::Force => Txn::new().and_then([put()]),
        ClaimMode::Ordered => {
            // etcd fails every value comparison on a missing key, hence the outer branch.
            let held = Txn::new()
                .when([Compare::value(
                    key.clone(),
                    CompareOp::Greater,
                    value.clone(),
                )])
                .and_then([TxnOp::get(key.clone(), None)])
                .or_else([put()]);
            Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([put()])
                .or_else([TxnOp::txn(held)])
        }
    };
    let resp = client.txn(txn).await?;
    let fence = resp.header().map(|h| h.revision() as u64);
    let superseded = resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Txn(inner) if inner.succeeded() => Some(
            inner
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(get) => get
                        .kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                    _ => None,
                })
                .unwrap_or_default(),
        ),
        _ => None,
    });
    Ok(match (superseded, fence) {
        (Some(holder), _) => Claim::Superseded { holder },
        (None, Some(fence)) if fence > 0 => Claim::Claimed { fence },
        (None, _) => {
            return Err(etcd_client::Error::InvalidArgs(
                "claim answered without a revision".into(),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_values_sort_by_generation() {
        let a = MemberId::new("zeta");
        let b = MemberId::new("alpha");
        assert!(claim_value(9, &a) < claim_value(10, &b));
        assert!(claim_value(-1, &a) < claim_value(1, &b));
        assert_eq!(claim_value(7, &a), "0000000007/zeta");
    }
}
