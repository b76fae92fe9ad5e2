//! Claims of Kafka partitions: each new assignment of a partition to a consumer claims
//! it in etcd before dispatching any of its records; the claim's revision is its
//! *fence*, and owners refuse records read under a fence older than the latest they know.

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
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

/// Claims `key` with `value` (see [`claim_value`]), attached to `lease`, unless a claim
/// that sorts after it holds the key. Claims therefore commit in the group's generation
/// order even when one is delayed (a slow etcd, a retry): a consumer that lost the
/// partition cannot take the fence back from the member the group gave it to.
pub async fn claim(
    client: &mut Client,
    key: String,
    value: String,
    lease: i64,
) -> Result<Claim, etcd_client::Error> {
    let put = || {
        TxnOp::put(
            key.clone(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
    };
    // etcd fails every value comparison on a missing key, hence the outer branch.
    let held = Txn::new()
        .when([Compare::value(
            key.clone(),
            CompareOp::Greater,
            value.clone(),
        )])
        .and_then([TxnOp::get(key.clone(), None)])
        .or_else([put()]);
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([put()])
        .or_else([TxnOp::txn(held)]);
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
