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
/// the generations' order, then the member. A source with failover prefixes the epoch of
/// the side it reads (`KafkaSideValue::epoch`, which grows with every switch): each
/// cluster's consumer group counts its own generations, so the new side's first
/// assignment (generation 1 on the standby) must still supersede the old side's claims —
/// else each of its partitions would stay fenced for a session timeout. Epoch 0 (no
/// switch yet, or no failover) keeps the plain format, which every epoch sorts after.
pub fn claim_value(epoch: u64, generation: i32, member: &MemberId) -> String {
    if epoch == 0 {
        format!("{:010}/{}", generation.max(0), member)
    } else {
        format!("{}{:010}/{member}", epoch_prefix(epoch), generation.max(0))
    }
}

/// What every claim of `epoch` (≥ 1) starts with: after every digit, so it sorts after
/// every claim of an earlier epoch (epoch 0 included), whatever their generations.
fn epoch_prefix(epoch: u64) -> String {
    format!("s{epoch:020}/")
}

/// How a claim treats a claim already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimMode {
    /// Refused when the held claim sorts after ours (a later generation): a consumer that
    /// lost the partition cannot take the fence back with a delayed claim.
    Ordered,
    /// Taken whatever is held *within the claimant's epoch or an earlier one*: for a
    /// consumer that librdkafka still shows as the partition's assignee a whole session
    /// timeout after its claim was superseded (the group's member in fact; a lost
    /// consumer learns it within that time). Also ends the wedge of a group recreated at
    /// generation 1 while old claims remain. A claim of a later epoch (the source
    /// switched clusters since) is never taken: the old side's consumer, still draining,
    /// must not take the partition back from the new side.
    Force,
}

/// Claims `key` with `value` (see [`claim_value`]; `epoch` is the one in `value`).
/// Claims are not leased: they outlive their claimant, so a restarted instance's lost
/// lease cannot make room for a delayed claim of a consumer that lost the partition.
pub async fn claim(
    client: &mut Client,
    key: String,
    epoch: u64,
    value: String,
    mode: ClaimMode,
) -> Result<Claim, etcd_client::Error> {
    let put = || TxnOp::put(key.clone(), value.clone(), None);
    let read = || TxnOp::get(key.clone(), None);
    // What to do when a claim is held: put ours, or read the holder's (refused).
    let held = match mode {
        // Taken while what is held sorts before the next epoch's first claim.
        ClaimMode::Force => Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Less,
                epoch_prefix(epoch + 1),
            )])
            .and_then([put()])
            .or_else([read()]),
        ClaimMode::Ordered => Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Greater,
                value.clone(),
            )])
            .and_then([read()])
            .or_else([put()]),
    };
    // etcd fails every value comparison on a missing key, hence the outer branch.
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([put()])
        .or_else([TxnOp::txn(held)]);
    let resp = client.txn(txn).await?;
    let fence = resp.header().map(|h| h.revision() as u64);
    // Refused exactly when the inner transaction read the held claim instead of putting.
    let superseded = resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Txn(inner) => inner.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => Some(
                get.kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .unwrap_or_default(),
            ),
            _ => None,
        }),
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
        assert!(claim_value(0, 9, &a) < claim_value(0, 10, &b));
        assert!(claim_value(0, -1, &a) < claim_value(0, 1, &b));
        assert_eq!(claim_value(0, 7, &a), "0000000007/zeta");
        // A later epoch (the source switched clusters, whose groups count generations
        // apart) wins over any generation of an earlier one, and within an epoch the
        // generation orders as before.
        assert!(claim_value(0, i32::MAX, &a) < claim_value(1, 1, &b));
        assert!(claim_value(1, 99, &a) < claim_value(2, 1, &b));
        assert!(claim_value(9, 1, &a) < claim_value(10, 1, &b));
        assert!(claim_value(2, 9, &a) < claim_value(2, 10, &b));
        assert_eq!(
            claim_value(3, 7, &a),
            "s00000000000000000003/0000000007/zeta"
        );
        // What a forced claim of an epoch may take: everything below the next epoch.
        assert!(claim_value(3, i32::MAX, &a) < epoch_prefix(4));
        assert!(claim_value(0, i32::MAX, &a) < epoch_prefix(1));
        assert!(claim_value(4, 0, &b) > epoch_prefix(4));
    }
}
