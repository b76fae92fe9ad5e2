//! ShardAcquired / ShardReleased delivered to the handler with a contract applications
//! can build on: per shard in epoch order, `acquired` before the ownership's first call,
//! `released` (of a planned move) before the shard key is deleted, so before the next
//! owner's `acquired`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use leasehold_coord::ShardListener;
use leasehold_metrics::{Counter, Histogram, Registry};
use leasehold_types::{Epoch, ShardId};
use tokio::sync::{oneshot, Notify};

use crate::handler::{HandleError, Handler, ShardEvent};

type Delivery = Shared<BoxFuture<'static, ()>>;

/// The hooks queued for a shard.
struct Link {
    /// The last hook queued (the next one waits for it).
    epoch: Epoch,
    acquired: bool,
    done: Delivery,
    /// The last `acquired` hook: calls of its ownership wait for it, also when a `lost`
    /// was queued behind it meanwhile.
    acquire: Option<Acquire>,
    /// Names that hook's queuing: only its delivery may mark the shard announced.
    acquire_token: u64,
    /// The last hook queued's urging and hand-over (see [`Handover`]).
    handover: Arc<Handover>,
}

/// Between a queued hook and the shard's next one.
struct Handover {
    /// Notified by calls that wait for the hook (for an `acquired` hook, through
    /// [`ShardEvents::acquiring`]) or by the shard's next hook while that one is urged and
    /// waits for this one: the hook then takes the next free hook slot before hooks
    /// nobody waits for, and urges the shard's hook before it in turn.
    urge: Notify,
    /// Set by the shard's next hook when it was urged while waiting for this one: this
    /// hook hands it its slot when it ends, so an urged chain keeps one slot from step to
    /// step instead of queuing again at each.
    pass_to: Mutex<Option<oneshot::Sender<HookSlot>>>,
}

/// An `acquired` hook queued for a shard, as calls of its ownership see it.
#[derive(Clone)]
struct Acquire {
    epoch: Epoch,
    done: Delivery,
    /// Urged by calls that wait for it (see [`Handover`]).
    handover: Arc<Handover>,
}

struct Metrics {
    acquired_failed: Arc<Counter>,
    released_failed: Arc<Counter>,
    acquired_timeout: Arc<Counter>,
    released_timeout: Arc<Counter>,
    duration: Arc<Histogram>,
}

/// Hooks delivered at once, across shards (a sidecar gets at most this many
/// `ShardAcquired` at a time when an instance takes a thousand shards).
const CONCURRENT_HOOKS: usize = 32;

/// The hook slots: at most [`CONCURRENT_HOOKS`] hooks run at once; a hook waiting for a
/// slot gets one in queuing order, except that hooks a call waits for (urged) go first,
/// and that an urged hook takes the slot of the shard's hook before it as that one ends
/// (see [`Handover`]), ahead of any queued hook.
///
/// After an instance takes many shards at once (a failover), their `acquired` hooks
/// queue for the slots; a call for one of them waits for its hook, and without the
/// urging it would wait for every hook queued before it (hundreds of shards, one slow
/// hook each) although nobody waits for those yet.
struct HookSlots {
    queue: Mutex<SlotQueue>,
}

struct SlotQueue {
    free: usize,
    /// Waiting hooks by (not urged, queued at): urged ones first, each kind in order.
    waiting: BTreeMap<(bool, u64), oneshot::Sender<HookSlot>>,
    next: u64,
}

/// A hook slot, given back when dropped (also when it is dropped unreceived, inside the
/// channel of a waiter that went away).
struct HookSlot(Option<Arc<HookSlots>>);

impl Drop for HookSlot {
    fn drop(&mut self) {
        if let Some(slots) = self.0.take() {
            slots.release();
        }
    }
}

impl HookSlots {
    fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(SlotQueue {
                free: slots,
                waiting: BTreeMap::new(),
                next: 0,
            }),
        })
    }

    /// Waits for a slot; ahead of the hooks not urged if `urged`, or from the moment
    /// `urge` is notified (before or while waiting).
    async fn acquire(self: &Arc<Self>, urge: &Notify, urged: bool) -> HookSlot {
        let (rx, at) = {
            let mut q = self.queue.lock().expect("hook slots lock");
            if q.free > 0 {
                q.free -= 1;
                return HookSlot(Some(self.clone()));
            }
            let at = q.next;
            q.next += 1;
            let (tx, rx) = oneshot::channel();
            q.waiting.insert((!urged, at), tx);
            (rx, at)
        };
        let mut rx = std::pin::pin!(rx);
        if !urged {
            tokio::select! {
                slot = &mut rx => return slot.unwrap_or(HookSlot(None)),
                _ = urge.notified() => {
                    let mut q = self.queue.lock().expect("hook slots lock");
                    // Not there: a slot was sent to it meanwhile.
                    if let Some(tx) = q.waiting.remove(&(true, at)) {
                        q.waiting.insert((false, at), tx);
                    }
                }
            }
        }
        // The sender is dropped unsent only with the queue, which this future keeps
        // alive; should it happen, the hook runs without a slot rather than never.
        rx.await.unwrap_or(HookSlot(None))
    }

    /// A slot given back: to the first waiting hook still waiting, or to the free ones.
    fn release(self: &Arc<Self>) {
        let mut q = self.queue.lock().expect("hook slots lock");
        while let Some((_, tx)) = q.waiting.pop_first() {
            match tx.send(HookSlot(Some(self.clone()))) {
                Ok(()) => return,
                // Its waiter went away: defused (dropping it would come back here under
                // the lock), and the next one gets it.
                Err(mut slot) => {
                    slot.0 = None;
                }
            }
        }
        q.free += 1;
    }
}

/// Delivers shard events to the handler; the coordinator's [`ShardListener`].
pub struct ShardEvents {
    handler: Arc<dyn Handler>,
    timeout: Duration,
    chains: Arc<Mutex<HashMap<ShardId, Link>>>,
    next_token: AtomicU64,
    slots: Arc<HookSlots>,
    metrics: Arc<Metrics>,
    /// Per shard, the epoch whose `acquired` hook has finished: every call checks its
    /// ownership's hook, and this answers the usual case (long done) without the lock.
    /// Written only under `chains`' lock: cleared when an `acquired` is queued, set when
    /// the latest queued one was delivered.
    announced: Arc<[AtomicU64]>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Acquired,
    /// A planned release: awaited before the shard key goes.
    Released,
    /// Lost without a release (lease expired, key gone): after the fact.
    Lost,
}

impl ShardEvents {
    /// Delivers to `handler`, waiting at most `timeout` for each hook. `shards`: the
    /// cluster's shard count (a shard past it is served, through the lock).
    pub fn new(
        handler: Arc<dyn Handler>,
        timeout: Duration,
        shards: u32,
        registry: &Registry,
    ) -> Arc<Self> {
        let failures = |event, reason| {
            registry.counter(
                "leasehold_shard_event_failures_total",
                "Shard hooks (ShardAcquired / ShardReleased) that failed or timed out; Leasehold went on without them.",
                &[("event", event), ("reason", reason)],
            )
        };
        let metrics = Metrics {
            acquired_failed: failures("acquired", "error"),
            released_failed: failures("released", "error"),
            acquired_timeout: failures("acquired", "timeout"),
            released_timeout: failures("released", "timeout"),
            duration: registry.histogram(
                "leasehold_shard_event_duration_seconds",
                "Time the handler took for a shard hook (ShardAcquired / ShardReleased).",
                &[],
            ),
        };
        Arc::new(Self {
            handler,
            timeout,
            chains: Arc::default(),
            next_token: AtomicU64::new(1),
            slots: HookSlots::new(CONCURRENT_HOOKS),
            metrics: Arc::new(metrics),
            // Epochs are etcd revisions, never 0.
            announced: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The pending delivery of the `acquired` hook of this ownership, if it has not
    /// finished: calls of the ownership wait for it, so it is urged (it takes the next
    /// free hook slot before hooks nobody waits for).
    pub fn acquiring(&self, shard: ShardId, epoch: Epoch) -> Option<Delivery> {
        let done = self.announced.get(shard.0 as usize);
        if done.is_some_and(|e| e.load(Ordering::Acquire) == epoch.0) {
            return None;
        }
        let chains = self.chains.lock().expect("shard events lock");
        let acquire = chains.get(&shard)?.acquire.as_ref()?;
        if acquire.epoch != epoch || acquire.done.peek().is_some() {
            return None;
        }
        acquire.handover.urge.notify_one();
        Some(acquire.done.clone())
    }

    /// Queues an event behind the shard's previous one and starts delivering it.
    fn chain(&self, shard: ShardId, epoch: Epoch, kind: Kind) -> Delivery {
        let mut chains = self.chains.lock().expect("shard events lock");
        if let Some(last) = chains.get(&shard) {
            // One release per ownership (a handoff cut short by a lost lease is also
            // reported lost), and none for an ownership older than the last acquired
            // one (a handoff that outlived its lease and a re-acquisition).
            let stale = last.acquire.as_ref().is_some_and(|a| epoch < a.epoch);
            let repeated = !last.acquired && last.epoch == epoch;
            if kind != Kind::Acquired && (stale || repeated) {
                return last.done.clone();
            }
        }
        // The shard's last hook: this one waits for it, and may urge it and take its slot.
        let previous = chains
            .get(&shard)
            .map(|l| (l.done.clone(), l.handover.clone()));
        let last_acquire = chains.get(&shard).and_then(|l| l.acquire.clone());
        let last_token = chains.get(&shard).map_or(0, |l| l.acquire_token);
        let token = match kind {
            Kind::Acquired => {
                if let Some(done) = self.announced.get(shard.0 as usize) {
                    done.store(0, Ordering::Release);
                }
                self.next_token.fetch_add(1, Ordering::Relaxed)
            }
            _ => last_token,
        };
        let links = Arc::downgrade(&self.chains);
        let (handler, timeout, metrics, slots, announced) = (
            self.handler.clone(),
            self.timeout,
            self.metrics.clone(),
            self.slots.clone(),
            self.announced.clone(),
        );
        let event = ShardEvent {
            shard,
            epoch,
            lost: kind == Kind::Lost,
        };
        let handover = Arc::new(Handover {
            urge: Notify::new(),
            pass_to: Mutex::new(None),
        });
        let own = handover.clone();
        let done = async move {
            let mut urged = false;
            let mut handed = None;
            if let Some((mut previous, earlier)) = previous {
                tokio::select! {
                    _ = &mut previous => {}
                    // Urged while it waits for the shard's previous hook: that one is
                    // urged too (and, through it, the rest of the shard's chain), and
                    // hands its slot on here when it ends.
                    _ = own.urge.notified() => {
                        urged = true;
                        let (tx, mut rx) = oneshot::channel();
                        *earlier.pass_to.lock().expect("handover lock") = Some(tx);
                        earlier.urge.notify_one();
                        previous.await;
                        // Sent before the previous hook's delivery completed, if at all
                        // (it had ended already when the sender was set: queue instead).
                        handed = rx.try_recv().ok();
                    }
                }
            }
            let slot = match handed {
                Some(slot) => slot,
                None => slots.acquire(&own.urge, urged).await,
            };
            deliver(handler, kind, event, timeout, &metrics).await;
            // The shard's next hook, urged, takes the slot as it is; else it is given
            // back.
            let next = own.pass_to.lock().expect("handover lock").take();
            match next {
                Some(next) => drop(next.send(slot)),
                None => drop(slot),
            }
            if kind == Kind::Acquired {
                if let Some(links) = links.upgrade() {
                    let links = links.lock().expect("shard events lock");
                    let latest = links.get(&shard).is_some_and(|l| l.acquire_token == token);
                    if let Some(done) = announced.get(shard.0 as usize).filter(|_| latest) {
                        done.store(epoch.0, Ordering::Release);
                    }
                }
            }
        }
        .boxed()
        .shared();
        let acquire = match kind {
            Kind::Acquired => Some(Acquire {
                epoch,
                done: done.clone(),
                handover: handover.clone(),
            }),
            _ => last_acquire,
        };
        chains.insert(
            shard,
            Link {
                epoch,
                acquired: kind == Kind::Acquired,
                done: done.clone(),
                acquire,
                acquire_token: token,
                handover,
            },
        );
        // Delivered whether or not anyone waits for it.
        tokio::spawn(done.clone());
        done
    }
}

async fn deliver(
    handler: Arc<dyn Handler>,
    kind: Kind,
    event: ShardEvent,
    timeout: Duration,
    metrics: &Metrics,
) {
    let started = Instant::now();
    let name = match kind {
        Kind::Acquired => "acquired",
        Kind::Released | Kind::Lost => "released",
    };
    // Made inside the bound too: a hook may do work before its first await. A hook that
    // panics (an embedded handler's) fails like one that returned an error: its panic
    // must not poison the shard's chain, which later hooks and every call of the
    // ownership await.
    let hook = std::panic::AssertUnwindSafe(async move {
        match kind {
            Kind::Acquired => handler.shard_acquired(event).await,
            Kind::Released | Kind::Lost => handler.shard_released(event).await,
        }
    })
    .catch_unwind()
    .map(|r| r.unwrap_or_else(|_| Err(HandleError::internal("the shard hook panicked"))));
    let result = tokio::time::timeout(timeout, hook).await;
    metrics.duration.observe(started.elapsed());
    let (shard, epoch) = (event.shard, event.epoch);
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            match kind {
                Kind::Acquired => metrics.acquired_failed.inc(),
                _ => metrics.released_failed.inc(),
            }
            tracing::warn!(%shard, %epoch, event = name, error = %e, "shard hook failed; going on without it");
        }
        Err(_) => {
            match kind {
                Kind::Acquired => metrics.acquired_timeout.inc(),
                _ => metrics.released_timeout.inc(),
            }
            tracing::warn!(%shard, %epoch, event = name, ?timeout, "shard hook did not return within shard_event_timeout; going on without it");
        }
    }
}

impl ShardListener for ShardEvents {
    fn acquired(&self, shard: ShardId, epoch: Epoch) {
        // Delivered by its own task; calls find it through `acquiring`.
        drop(self.chain(shard, epoch, Kind::Acquired));
    }

    fn releasing(&self, shard: ShardId, epoch: Epoch) -> BoxFuture<'static, ()> {
        self.chain(shard, epoch, Kind::Released).boxed()
    }

    fn lost(&self, shard: ShardId, epoch: Epoch) {
        drop(self.chain(shard, epoch, Kind::Lost));
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::handler::{HandleCall, HandleError};

    /// Records hooks; `acquired` of shard 1 takes 50 ms.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(bool, u32, u64)>>);

    impl Handler for Recorder {
        fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
            Box::pin(futures::future::ready(Ok(call.payload)))
        }
        fn shard_acquired(&self, e: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
            self.0.lock().unwrap().push((true, e.shard.0, e.epoch.0));
            let slow = e.shard.0 == 1;
            Box::pin(async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(())
            })
        }
        fn shard_released(&self, e: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
            self.0.lock().unwrap().push((false, e.shard.0, e.epoch.0));
            Box::pin(futures::future::ready(Err(HandleError::internal(
                "flush failed",
            ))))
        }
    }

    /// Events delivered to a fresh [`Recorder`] (1 s hook timeout, 16 shards).
    fn recorded() -> (Arc<Recorder>, Arc<ShardEvents>) {
        let recorder = Arc::new(Recorder::default());
        let events = ShardEvents::new(
            recorder.clone(),
            Duration::from_secs(1),
            16,
            &Registry::new(),
        );
        (recorder, events)
    }

    #[tokio::test]
    async fn hooks_run_in_order_and_calls_wait_for_acquired() {
        let (recorder, events) = recorded();
        events.acquired(ShardId(1), Epoch(10));
        let waiting = events.acquiring(ShardId(1), Epoch(10)).expect("pending");
        assert!(
            events.acquiring(ShardId(1), Epoch(9)).is_none(),
            "another epoch"
        );
        // The release is queued behind the slow acquire and waits for it.
        let released = events.releasing(ShardId(1), Epoch(10));
        events.acquired(ShardId(1), Epoch(12));
        waiting.await;
        released.await;
        let second = events.acquiring(ShardId(1), Epoch(12));
        if let Some(s) = second {
            s.await;
        }
        assert!(
            events.acquiring(ShardId(1), Epoch(12)).is_none(),
            "delivered"
        );
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [(true, 1, 10), (false, 1, 10), (true, 1, 12)]
        );
    }

    #[tokio::test]
    async fn a_hook_queued_again_for_an_announced_epoch_gates_calls_again() {
        let (recorder, events) = recorded();
        events.acquired(ShardId(1), Epoch(10)); // slow: 50 ms
        events
            .acquiring(ShardId(1), Epoch(10))
            .expect("pending")
            .await;
        assert!(
            events.acquiring(ShardId(1), Epoch(10)).is_none(),
            "announced"
        );
        // Not something the coordinator does (each acquisition has a new epoch), but
        // the lock-free answer must not outlive a hook queued again.
        events.lost(ShardId(1), Epoch(10));
        events.acquired(ShardId(1), Epoch(10));
        let again = events
            .acquiring(ShardId(1), Epoch(10))
            .expect("the new hook is pending");
        again.await;
        assert!(events.acquiring(ShardId(1), Epoch(10)).is_none());
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [(true, 1, 10), (false, 1, 10), (true, 1, 10)]
        );
    }

    #[tokio::test]
    async fn a_release_of_an_older_ownership_is_not_delivered() {
        let (recorder, events) = recorded();
        events.acquired(ShardId(2), Epoch(10));
        events.lost(ShardId(2), Epoch(10));
        events.acquired(ShardId(2), Epoch(12));
        // A handoff of epoch 10 that outlived its lease ends only now.
        events.releasing(ShardId(2), Epoch(10)).await;
        if let Some(w) = events.acquiring(ShardId(2), Epoch(12)) {
            w.await;
        }
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [(true, 2, 10), (false, 2, 10), (true, 2, 12)]
        );
    }

    #[tokio::test]
    async fn a_loss_queued_behind_a_pending_acquire_still_gates_its_calls() {
        let (_recorder, events) = recorded();
        events.acquired(ShardId(1), Epoch(10)); // slow: 50 ms
        events.lost(ShardId(1), Epoch(10));
        let waiting = events
            .acquiring(ShardId(1), Epoch(10))
            .expect("still pending");
        waiting.await;
        assert!(events.acquiring(ShardId(1), Epoch(10)).is_none());
    }

    /// `acquired` panics for epoch 10 (before its future, or in it for shard 2);
    /// records what it delivered otherwise.
    #[derive(Default)]
    struct Panicky(Mutex<Vec<(bool, u32, u64)>>);

    impl Handler for Panicky {
        fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
            Box::pin(futures::future::ready(Ok(call.payload)))
        }
        fn shard_acquired(&self, e: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
            if e.epoch == Epoch(10) && e.shard != ShardId(2) {
                panic!("hook of shard {} panics before its future", e.shard);
            }
            self.0.lock().unwrap().push((true, e.shard.0, e.epoch.0));
            Box::pin(async move {
                if e.epoch == Epoch(10) {
                    panic!("hook of shard {} panics in its future", e.shard);
                }
                Ok(())
            })
        }
        fn shard_released(&self, e: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
            self.0.lock().unwrap().push((false, e.shard.0, e.epoch.0));
            Box::pin(futures::future::ready(Ok(())))
        }
    }

    #[tokio::test]
    async fn a_hook_that_panics_fails_alone_and_the_shards_next_hooks_and_calls_go_on() {
        let handler = Arc::new(Panicky::default());
        let events = ShardEvents::new(
            handler.clone(),
            Duration::from_secs(5),
            16,
            &Registry::new(),
        );
        for shard in [ShardId(1), ShardId(2)] {
            events.acquired(shard, Epoch(10));
            // A call of the ownership waits for the hook: it ends (failed), not panics.
            if let Some(hook) = events.acquiring(shard, Epoch(10)) {
                tokio::time::timeout(Duration::from_secs(5), hook)
                    .await
                    .expect("the failed hook ends");
            }
            assert!(events.acquiring(shard, Epoch(10)).is_none(), "announced");
            // The shard's next hooks run.
            events.releasing(shard, Epoch(10)).await;
            events.acquired(shard, Epoch(12));
            if let Some(hook) = events.acquiring(shard, Epoch(12)) {
                hook.await;
            }
        }
        assert_eq!(events.metrics.acquired_failed.get(), 2);
        assert_eq!(
            *handler.0.lock().unwrap(),
            [
                (false, 1, 10),
                (true, 1, 12),
                (true, 2, 10),
                (false, 2, 10),
                (true, 2, 12)
            ]
        );
    }

    /// A hook that never returns holds nothing up past the timeout.
    struct Stuck;

    impl Handler for Stuck {
        fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
            Box::pin(futures::future::ready(Ok(call.payload)))
        }
        fn shard_released(&self, _: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
            Box::pin(futures::future::pending())
        }
    }

    /// `acquired` hooks that wait for the test to let one end, `released` hooks that end
    /// at once; records the order in which they started (acquired or not, shard) and
    /// how many ran at once.
    struct Gated {
        gate: Arc<tokio::sync::Semaphore>,
        started: Mutex<Vec<(bool, u32)>>,
        running: Arc<AtomicU64>,
        most: AtomicU64,
    }

    impl Gated {
        fn new() -> Arc<Self> {
            Arc::new(Gated {
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
                started: Mutex::new(Vec::new()),
                running: Arc::new(AtomicU64::new(0)),
                most: AtomicU64::new(0),
            })
        }

        fn start(&self, acquired: bool, shard: ShardId) {
            self.started.lock().unwrap().push((acquired, shard.0));
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
        }

        fn order(&self) -> Vec<(bool, u32)> {
            self.started.lock().unwrap().clone()
        }

        async fn started(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.started.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "{n} hooks never started");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    impl Handler for Gated {
        fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
            Box::pin(futures::future::ready(Ok(call.payload)))
        }
        fn shard_acquired(&self, e: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
            self.start(true, e.shard);
            let (gate, running) = (self.gate.clone(), self.running.clone());
            Box::pin(async move {
                gate.acquire().await.expect("open").forget();
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        }
        fn shard_released(&self, e: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
            self.start(false, e.shard);
            self.running.fetch_sub(1, Ordering::SeqCst);
            Box::pin(futures::future::ready(Ok(())))
        }
    }

    fn gated_events(handler: &Arc<Gated>) -> Arc<ShardEvents> {
        ShardEvents::new(
            handler.clone(),
            Duration::from_secs(30),
            64,
            &Registry::new(),
        )
    }

    #[tokio::test]
    async fn a_hook_a_call_waits_for_takes_the_next_slot_before_earlier_queued_ones() {
        let handler = Gated::new();
        let events = gated_events(&handler);
        let total = CONCURRENT_HOOKS as u32 + 8;
        for shard in 0..total {
            events.acquired(ShardId(shard), Epoch(10));
        }
        handler.started(CONCURRENT_HOOKS).await;
        // The last one queued; a call of its ownership now waits for it.
        let last = ShardId(total - 1);
        let waited = events.acquiring(last, Epoch(10)).expect("pending");
        // One running hook ends: its slot goes to the hook the call waits for, not to the
        // first one queued.
        handler.gate.add_permits(1);
        handler.started(CONCURRENT_HOOKS + 1).await;
        let order = handler.order();
        assert_eq!(
            order[CONCURRENT_HOOKS],
            (true, last.0),
            "started in this order: {order:?}"
        );
        handler.gate.add_permits(total as usize);
        tokio::time::timeout(Duration::from_secs(5), waited)
            .await
            .expect("the waited-for hook was delivered");
        handler.started(total as usize).await;
        // Never more than the bound, urged or not.
        assert_eq!(handler.most.load(Ordering::SeqCst), CONCURRENT_HOOKS as u64);
        for shard in 0..total {
            if let Some(d) = events.acquiring(ShardId(shard), Epoch(10)) {
                tokio::time::timeout(Duration::from_secs(5), d)
                    .await
                    .expect("delivered");
            }
        }
    }

    #[tokio::test]
    async fn urging_an_acquired_hook_urges_the_earlier_hooks_of_its_shard_it_waits_behind() {
        let handler = Gated::new();
        let events = gated_events(&handler);
        for shard in 0..CONCURRENT_HOOKS as u32 {
            events.acquired(ShardId(shard), Epoch(10)); // every slot taken
        }
        handler.started(CONCURRENT_HOOKS).await;
        // Eight shards lost (an expired lease), nobody waiting for their hooks; the last
        // of them taken again: its `acquired` waits behind its own loss.
        let (first, last) = (CONCURRENT_HOOKS as u32, CONCURRENT_HOOKS as u32 + 7);
        for shard in first..=last {
            events.lost(ShardId(shard), Epoch(5));
        }
        events.acquired(ShardId(last), Epoch(10));
        let waited = events.acquiring(ShardId(last), Epoch(10)).expect("pending");
        // The urge reaches the loss queued for a slot.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !events
            .slots
            .queue
            .lock()
            .unwrap()
            .waiting
            .keys()
            .any(|(not_urged, _)| !not_urged)
        {
            assert!(Instant::now() < deadline, "the loss was never urged");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        handler.gate.add_permits(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let at = loop {
            if let Some(at) = handler.order().iter().position(|e| *e == (true, last)) {
                break at;
            }
            assert!(
                Instant::now() < deadline,
                "the waited-for hook never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let order = handler.order();
        let losses_before = order[..at].iter().filter(|(acquired, _)| !acquired).count();
        // Without the urge reaching its loss, all eight losses (queued first) run before
        // it; with it, only its own loss, which hands it its slot.
        assert_eq!(
            losses_before, 1,
            "losses ran before the waited-for hook: {order:?}"
        );
        assert_eq!(order[CONCURRENT_HOOKS], (false, last), "{order:?}");
        assert_eq!(handler.most.load(Ordering::SeqCst), CONCURRENT_HOOKS as u64);
        handler.gate.add_permits(64);
        tokio::time::timeout(Duration::from_secs(5), waited)
            .await
            .expect("delivered");
    }

    #[tokio::test]
    async fn a_stuck_hook_is_abandoned_at_the_timeout() {
        let events = ShardEvents::new(
            Arc::new(Stuck),
            Duration::from_millis(50),
            16,
            &Registry::new(),
        );
        let started = Instant::now();
        events.releasing(ShardId(3), Epoch(1)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(events.metrics.released_timeout.get(), 1);
    }
}
