//! What this instance owns, and whether its lease lets it act on that.
//!
//! The router asks [`ShardTable::try_start`] before every handler call; the coordinator
//! flips shards between owned, moving and not owned. A call that started is counted until
//! its guard drops, so a handoff can wait for in-flight work before releasing the shard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_types::{Epoch, ShardId};
use tokio::sync::{watch, Notify};

/// Validity of this instance's lease on the monotonic clock.
///
/// `valid_until` = send time of the last answered keepalive + granted TTL − safety margin.
#[derive(Debug)]
pub struct LeaseClock {
    base: Instant,
    /// Nanoseconds after `base`; 0 = not valid.
    valid_until: AtomicU64,
}

impl Default for LeaseClock {
    fn default() -> Self {
        Self {
            base: now(),
            valid_until: AtomicU64::new(0),
        }
    }
}

/// The monotonic clock, read through tokio so that tests can pause and advance it; the
/// same instant as `Instant::now()` otherwise.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl LeaseClock {
    pub fn set_valid_until(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.valid_until.fetch_max(nanos, Ordering::AcqRel);
    }

    pub fn invalidate(&self) {
        self.valid_until.store(0, Ordering::Release);
    }

    /// `Some(valid_until)` while the lease is valid.
    pub fn valid_until(&self) -> Option<Instant> {
        let nanos = self.valid_until.load(Ordering::Acquire);
        let until = self.base + Duration::from_nanos(nanos);
        (nanos > 0 && now() < until).then_some(until)
    }

    /// The last validity deadline, also once passed (`None`: never valid, or invalidated).
    pub fn last_deadline(&self) -> Option<Instant> {
        let nanos = self.valid_until.load(Ordering::Acquire);
        (nanos > 0).then(|| self.base + Duration::from_nanos(nanos))
    }

    /// Seconds of validity left (negative once expired), for the lease-slack metric.
    pub fn slack(&self) -> f64 {
        let nanos = self.valid_until.load(Ordering::Acquire);
        let until = self.base + Duration::from_nanos(nanos);
        let now = now();
        if until >= now {
            (until - now).as_secs_f64()
        } else {
            -(now - until).as_secs_f64()
        }
    }
}

/// Local state of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalState {
    NotOwned,
    Owned(Epoch),
    /// Handing off: no new work starts, in-flight work finishes, then the key is deleted.
    Moving(Epoch),
}

#[derive(Debug)]
struct Slot {
    state: LocalState,
    in_flight: u32,
}

/// Why a handler call cannot start on this instance now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    NotOwned,
    /// The shard is being handed off; the caller waits and re-routes.
    Moving,
    /// The lease is past `valid_until`; the caller waits for a keepalive or the deadline.
    LeaseInvalid,
    /// The routing table has not caught up with this instance's own acquisition of the
    /// shard yet (what it knows of earlier owners' work may be incomplete).
    Behind,
}

/// Ownership and in-flight counts for every shard of this instance.
#[derive(Debug)]
pub struct ShardTable {
    slots: Vec<Mutex<Slot>>,
    idle: Vec<Notify>,
    lease: Arc<LeaseClock>,
    changed: watch::Sender<u64>,
    /// Grows on every [`ShardTable::drop_all`], so an acquisition that raced a lease loss
    /// is not recorded.
    generation: AtomicU64,
}

/// Proof that a handler call started on an owned shard; dropping it ends the call.
/// Owned (not borrowed) so it can move into the task that runs the handler.
#[derive(Debug)]
pub struct CallGuard {
    table: Arc<ShardTable>,
    shard: ShardId,
    pub epoch: Epoch,
    /// The call must end before this instant.
    pub valid_until: Instant,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut slot = self.table.slot(self.shard);
        slot.in_flight -= 1;
        if slot.in_flight == 0 {
            self.table.idle[self.shard.0 as usize].notify_waiters();
        }
    }
}

impl ShardTable {
    pub fn new(shard_count: u32, lease: Arc<LeaseClock>) -> Self {
        Self {
            slots: (0..shard_count)
                .map(|_| {
                    Mutex::new(Slot {
                        state: LocalState::NotOwned,
                        in_flight: 0,
                    })
                })
                .collect(),
            idle: (0..shard_count).map(|_| Notify::new()).collect(),
            lease,
            changed: watch::channel(0).0,
            generation: AtomicU64::new(0),
        }
    }

    fn slot(&self, shard: ShardId) -> std::sync::MutexGuard<'_, Slot> {
        self.slots[shard.0 as usize]
            .lock()
            .expect("shard slot lock")
    }

    pub fn shard_count(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn lease(&self) -> &LeaseClock {
        &self.lease
    }

    /// Starts a handler call if this instance owns `shard` and its lease is valid.
    pub fn try_start(self: &Arc<Self>, shard: ShardId) -> Result<CallGuard, Blocked> {
        let mut slot = self.slot(shard);
        let (epoch, valid_until) = Self::startable(&slot, &self.lease)?;
        slot.in_flight += 1;
        Ok(CallGuard {
            table: self.clone(),
            shard,
            epoch,
            valid_until,
        })
    }

    /// Whether a handler call could start on `shard` now, without starting one.
    pub fn check(&self, shard: ShardId) -> Result<(), Blocked> {
        Self::startable(&self.slot(shard), &self.lease).map(|_| ())
    }

    fn startable(slot: &Slot, lease: &LeaseClock) -> Result<(Epoch, Instant), Blocked> {
        match slot.state {
            LocalState::NotOwned => Err(Blocked::NotOwned),
            LocalState::Moving(_) => Err(Blocked::Moving),
            LocalState::Owned(epoch) => {
                Ok((epoch, lease.valid_until().ok_or(Blocked::LeaseInvalid)?))
            }
        }
    }

    pub fn state(&self, shard: ShardId) -> LocalState {
        self.slot(shard).state
    }

    pub fn in_flight(&self, shard: ShardId) -> u32 {
        self.slot(shard).in_flight
    }

    /// Shards this instance owns or is handing off.
    pub fn held(&self) -> Vec<(ShardId, LocalState)> {
        (0..self.shard_count())
            .map(ShardId)
            .map(|s| (s, self.state(s)))
            .filter(|(_, st)| *st != LocalState::NotOwned)
            .collect()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Records an acquisition made under `generation`; refused when every shard was
    /// dropped since (the lease it was acquired with is gone).
    pub fn set_owned(&self, generation: u64, shard: ShardId, epoch: Epoch) -> bool {
        let mut slot = self.slot(shard);
        if self.generation() != generation {
            return false;
        }
        slot.state = LocalState::Owned(epoch);
        drop(slot);
        self.bump();
        true
    }

    /// Stops new work on `shard`; returns its epoch if it was owned.
    pub fn begin_move(&self, shard: ShardId) -> Option<Epoch> {
        let mut slot = self.slot(shard);
        let LocalState::Owned(epoch) = slot.state else {
            return None;
        };
        slot.state = LocalState::Moving(epoch);
        drop(slot);
        self.bump();
        Some(epoch)
    }

    /// Waits until no handler call runs on `shard`.
    pub async fn wait_idle(&self, shard: ShardId) {
        loop {
            let notified = self.idle[shard.0 as usize].notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight(shard) == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn set_not_owned(&self, shard: ShardId) {
        self.slot(shard).state = LocalState::NotOwned;
        self.bump();
    }

    /// Forgets every shard at once (the lease is gone, so etcd already released them).
    pub fn drop_all(&self) -> Vec<(ShardId, Epoch)> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut dropped = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let mut slot = slot.lock().expect("shard slot lock");
            if let LocalState::Owned(e) | LocalState::Moving(e) = slot.state {
                dropped.push((ShardId(i as u32), e));
            }
            slot.state = LocalState::NotOwned;
        }
        self.bump();
        dropped
    }

    /// Signals waiters (held requests) that ownership, the view or the lease changed.
    pub fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Arc<ShardTable> {
        let lease = Arc::new(LeaseClock::default());
        lease.set_valid_until(Instant::now() + Duration::from_secs(60));
        Arc::new(ShardTable::new(4, lease))
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_holds_until_its_deadline_and_an_older_answer_does_not_shorten_it() {
        let lease = Arc::new(LeaseClock::default());
        let table = ShardTable::new(4, lease.clone());
        assert!(table.set_owned(0, ShardId(1), Epoch(3)));
        let table = Arc::new(table);
        assert_eq!(
            table.try_start(ShardId(1)).unwrap_err(),
            Blocked::LeaseInvalid
        );
        lease.set_valid_until(now() + Duration::from_secs(3));
        tokio::time::advance(Duration::from_millis(2900)).await;
        assert!(
            table.try_start(ShardId(1)).is_ok(),
            "valid before its deadline"
        );
        assert!(lease.slack() > 0.0 && lease.slack() <= 0.1);
        // An answer to an older keepalive arrives late: validity does not move back.
        lease.set_valid_until(now() - Duration::from_secs(1));
        assert!(lease.valid_until().is_some());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(
            table.try_start(ShardId(1)).unwrap_err(),
            Blocked::LeaseInvalid,
            "no call starts once the deadline passed"
        );
        assert!(lease.slack() < 0.0);
        lease.set_valid_until(now() + Duration::from_secs(3));
        assert!(
            table.try_start(ShardId(1)).is_ok(),
            "a new keepalive answer"
        );
        lease.invalidate();
        assert!(lease.valid_until().is_none());
    }

    #[test]
    fn calls_start_only_on_owned_shards_with_a_valid_lease() {
        let t = table();
        assert_eq!(t.try_start(ShardId(1)).unwrap_err(), Blocked::NotOwned);
        assert!(t.set_owned(0, ShardId(1), Epoch(9)));
        assert_eq!(t.try_start(ShardId(1)).unwrap().epoch, Epoch(9));
        t.lease().invalidate();
        assert_eq!(t.try_start(ShardId(1)).unwrap_err(), Blocked::LeaseInvalid);
    }

    #[test]
    fn acquisitions_racing_a_lease_loss_are_refused() {
        let t = table();
        let generation = t.generation();
        t.drop_all();
        assert!(!t.set_owned(generation, ShardId(2), Epoch(5)));
        assert_eq!(t.state(ShardId(2)), LocalState::NotOwned);
    }

    #[tokio::test]
    async fn a_move_waits_for_in_flight_calls() {
        let t = table();
        assert!(t.set_owned(0, ShardId(0), Epoch(3)));
        let guard = t.try_start(ShardId(0)).unwrap();
        assert_eq!(t.begin_move(ShardId(0)), Some(Epoch(3)));
        assert_eq!(t.try_start(ShardId(0)).unwrap_err(), Blocked::Moving);
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_idle(ShardId(0)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
