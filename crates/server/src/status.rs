//! What the status page (`GET /` on the admin port) and its endpoints show beyond the
//! routing table: recent shard moves as this instance saw them, and the Kafka sources'
//! group positions.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use leasehold_coord::{Coord, View};
use leasehold_kafka::{SourceStatus, StatusHandle};
use leasehold_types::ShardId;
use tokio_util::sync::CancellationToken;

/// The page: one file, no external assets.
pub const PAGE: &str = include_str!("status/index.html");

/// Moves kept for the page.
const MOVES_KEPT: usize = 100;

/// One change of a shard's owner in the routing table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Move {
    pub at_ms: u64,
    pub shard: u32,
    pub from: Option<String>,
    pub to: Option<String>,
    pub epoch: u64,
    /// How long the shard had no owner in between (a handoff releases, then the new
    /// owner acquires), in milliseconds.
    pub unowned_ms: Option<u64>,
}

/// State the admin surface reads.
#[derive(Default)]
pub struct Status {
    kafka: Mutex<Vec<StatusHandle>>,
    /// Sources with a standby cluster, by name (the admin surface switches them), with
    /// the members' times their switches read (see `failover::Remembered`).
    failover: Mutex<
        std::collections::BTreeMap<
            String,
            (leasehold_kafka::SourceOptions, crate::failover::Remembered),
        >,
    >,
    moves: Mutex<Moves>,
}

#[derive(Default)]
struct Moves {
    kept: VecDeque<Move>,
    /// Shards released and not yet taken: (last owner, when).
    released: std::collections::HashMap<u32, (String, u64)>,
}

impl Status {
    pub fn add_kafka(&self, source: StatusHandle) {
        self.kafka.lock().expect("status lock").push(source);
    }

    pub fn add_failover(
        &self,
        source: leasehold_kafka::SourceOptions,
        remembered: crate::failover::Remembered,
    ) {
        self.failover
            .lock()
            .expect("status lock")
            .insert(source.name.clone(), (source, remembered));
    }

    /// A source with a standby cluster, by name.
    pub fn failover(&self, name: &str) -> Option<leasehold_kafka::SourceOptions> {
        self.failover
            .lock()
            .expect("status lock")
            .get(name)
            .map(|(source, _)| source.clone())
    }

    /// The members' times a switch of source `name` reads.
    pub fn remembered(&self, name: &str) -> Option<crate::failover::Remembered> {
        self.failover
            .lock()
            .expect("status lock")
            .get(name)
            .map(|(_, remembered)| remembered.clone())
    }

    /// Names of the sources with a standby cluster.
    pub fn failover_names(&self) -> Vec<String> {
        self.failover
            .lock()
            .expect("status lock")
            .keys()
            .cloned()
            .collect()
    }

    pub fn kafka(&self) -> Vec<SourceStatus> {
        self.kafka
            .lock()
            .expect("status lock")
            .iter()
            .map(|s| s.lock().expect("source status lock").clone())
            .collect()
    }

    /// Newest first.
    pub fn moves(&self) -> Vec<Move> {
        self.moves
            .lock()
            .expect("status lock")
            .kept
            .iter()
            .cloned()
            .collect()
    }

    /// Keeps owner changes; a release followed by an acquisition is one move from the
    /// old owner to the new one (with the time in between), a release alone is kept
    /// back until the shard is taken.
    fn record(&self, moves: Vec<Move>) {
        let mut state = self.moves.lock().expect("status lock");
        for mut m in moves {
            match (&m.from, &m.to) {
                (Some(from), None) => {
                    state.released.insert(m.shard, (from.clone(), m.at_ms));
                    continue;
                }
                (None, Some(_)) => {
                    if let Some((from, at)) = state.released.remove(&m.shard) {
                        m.from = Some(from);
                        m.unowned_ms = Some(m.at_ms.saturating_sub(at));
                    }
                }
                _ => {
                    state.released.remove(&m.shard);
                }
            }
            state.kept.push_front(m);
        }
        state.kept.truncate(MOVES_KEPT);
    }
}

/// Shards whose owner differs between two routing tables.
pub fn diff(before: &View, after: &View, at_ms: u64) -> Vec<Move> {
    let count = after.shard_count().min(before.shard_count());
    (0..count)
        .map(ShardId)
        .filter(|shard| {
            // Entries are shared between views: an unchanged one is the same pointer.
            let i = shard.0 as usize;
            match (&before.shards[i], &after.shards[i]) {
                (Some(b), Some(a)) => !Arc::ptr_eq(b, a),
                (None, None) => false,
                _ => true,
            }
        })
        .filter_map(|shard| {
            let (b, a) = (before.owner(shard), after.owner(shard));
            let from = b.map(|o| o.owner.0.clone());
            let to = a.map(|o| o.owner.0.clone());
            (from != to).then(|| Move {
                at_ms,
                shard: shard.0,
                from,
                to,
                epoch: a.or(b).map_or(0, |o| o.epoch.0),
                unowned_ms: None,
            })
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records every owner change of the routing table until `cancel`. The first table
/// (all shards unowned before the instance synced) is not a move.
pub async fn record_moves(coord: Coord, status: Arc<Status>, cancel: CancellationToken) {
    let mut views = coord.subscribe_view();
    let mut last: Option<Arc<View>> = None;
    loop {
        let view = views.borrow_and_update().clone();
        if let Some(before) = &last {
            let moves = diff(before, &view, now_ms());
            if !moves.is_empty() {
                status.record(moves);
            }
        }
        // Only a synced table counts as the starting point.
        if last.is_some() || view.synced {
            last = Some(view);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_coord::ShardOwner;
    use leasehold_types::{Epoch, MemberId};

    fn owned(owner: &str, epoch: u64) -> Option<std::sync::Arc<ShardOwner>> {
        Some(std::sync::Arc::new(ShardOwner {
            owner: MemberId(owner.into()),
            address: String::new(),
            peer: Default::default(),
            epoch: Epoch(epoch),
            lease: 1,
        }))
    }

    #[test]
    fn moves_are_owner_changes() {
        let mut before = View::empty(4);
        before.shards = vec![owned("a", 1), owned("a", 2), None, owned("b", 4)];
        let mut after = before.clone();
        after.shards[1] = owned("b", 5); // moved
        after.shards[2] = owned("c", 6); // taken
        after.shards[3] = None; // lost
        let moves = diff(&before, &after, 7);
        let got: Vec<_> = moves
            .iter()
            .map(|m| (m.shard, m.from.as_deref(), m.to.as_deref(), m.epoch))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, Some("a"), Some("b"), 5),
                (2, None, Some("c"), 6),
                (3, Some("b"), None, 4)
            ]
        );
        let status = Status::default();
        status.record(moves);
        // Shard 3 was released (kept back); taken by c 5 ms later: one move b → c.
        let mut later = after.clone();
        later.shards[3] = owned("c", 9);
        status.record(diff(&after, &later, 12));
        let kept: Vec<_> = status
            .moves()
            .iter()
            .map(|m| (m.shard, m.from.clone(), m.to.clone(), m.unowned_ms))
            .collect();
        assert_eq!(
            kept,
            vec![
                (3, Some("b".into()), Some("c".into()), Some(5)),
                (2, None, Some("c".into()), None),
                (1, Some("a".into()), Some("b".into()), None),
            ],
            "newest first"
        );
    }
}
