//! ShardAcquired / ShardReleased delivered to the handler with a contract applications
//! can build on: per shard in epoch order, `acquired` before the ownership's first call,
//! `released` (of a planned move) before the shard key is deleted, so before the next
//! owner's `acquired`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use leasehold_coord::ShardListener;
use leasehold_metrics::{Counter, Histogram, Registry};
use leasehold_types::{Epoch, ShardId};

use crate::handler::{Handler, ShardEvent};

type Delivery = Shared<BoxFuture<'static, ()>>;

/// The last event queued for a shard.
struct Link {
    epoch: Epoch,
    acquired: bool,
    done: Delivery,
}

struct Metrics {
    acquired_failed: Arc<Counter>,
    released_failed: Arc<Counter>,
    acquired_timeout: Arc<Counter>,
    released_timeout: Arc<Counter>,
    duration: Arc<Histogram>,
}

/// Delivers shard events to the handler; the coordinator's [`ShardListener`].
pub struct ShardEvents {
    handler: Arc<dyn Handler>,
    timeout: Duration,
    chains: Mutex<HashMap<ShardId, Link>>,
    metrics: Arc<Metrics>,
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
    /// Delivers to `handler`, waiting at most `timeout` for each hook.
    pub fn new(handler: Arc<dyn Handler>, timeout: Duration, registry: &Registry) -> Arc<Self> {
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
            chains: Mutex::default(),
            metrics: Arc::new(metrics),
        })
    }

    /// The pending delivery of the `acquired` hook of this ownership, if it has not
    /// finished: calls of the ownership wait for it.
    pub fn acquiring(&self, shard: ShardId, epoch: Epoch) -> Option<Delivery> {
        let chains = self.chains.lock().expect("shard events lock");
        let link = chains.get(&shard)?;
        (link.acquired && link.epoch == epoch && link.done.peek().is_none())
            .then(|| link.done.clone())
    }

    /// Queues an event behind the shard's previous one and starts delivering it.
    fn chain(&self, shard: ShardId, epoch: Epoch, kind: Kind) -> Delivery {
        let mut chains = self.chains.lock().expect("shard events lock");
        if let Some(last) = chains.get(&shard) {
            // One release per ownership (a handoff cut short by a lost lease is also
            // reported lost).
            if kind != Kind::Acquired && !last.acquired && last.epoch == epoch {
                return last.done.clone();
            }
        }
        let previous = chains.get(&shard).map(|l| l.done.clone());
        let (handler, timeout, metrics) =
            (self.handler.clone(), self.timeout, self.metrics.clone());
        let done = async move {
            if let Some(previous) = previous {
                previous.await;
            }
            deliver(
                handler,
                kind,
                ShardEvent { shard, epoch },
                timeout,
                &metrics,
            )
            .await;
        }
        .boxed()
        .shared();
        chains.insert(
            shard,
            Link {
                epoch,
                acquired: kind == Kind::Acquired,
                done: done.clone(),
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
    let (name, hook) = match kind {
        Kind::Acquired => ("acquired", handler.shard_acquired(event)),
        Kind::Released | Kind::Lost => ("released", handler.shard_released(event)),
    };
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

    #[tokio::test]
    async fn hooks_run_in_order_and_calls_wait_for_acquired() {
        let recorder = Arc::new(Recorder::default());
        let events = ShardEvents::new(recorder.clone(), Duration::from_secs(1), &Registry::new());
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

    #[tokio::test]
    async fn a_stuck_hook_is_abandoned_at_the_timeout() {
        let events = ShardEvents::new(Arc::new(Stuck), Duration::from_millis(50), &Registry::new());
        let started = Instant::now();
        events.releasing(ShardId(3), Epoch(1)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(events.metrics.released_timeout.get(), 1);
    }
}
