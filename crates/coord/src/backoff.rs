//! Exponential back-off between retries of the coordination loops.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Starts at `first`, doubles after every wait, at most `max`; `reset` after a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The delay the next [`Backoff::wait`] sleeps.
    pub(crate) fn peek(&self) -> Duration {
        self.next
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps for the next delay, then doubles it. False if `cancel` fired first.
    pub(crate) async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Like [`Backoff::wait`], but ends early when `wake` completes first (still doubling
    /// the next delay). False if `cancel` fired.
    pub(crate) async fn wait_or(
        &mut self,
        cancel: &CancellationToken,
        wake: impl std::future::Future<Output = ()>,
    ) -> bool {
        tokio::select! {
            go_on = self.wait(cancel) => go_on,
            () = wake => !cancel.is_cancelled(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubles_up_to_its_cap_resets_and_stops_on_cancel() {
        let cancel = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut waited = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            assert!(b.wait(&cancel).await);
            waited.push(t.elapsed().as_millis());
        }
        assert_eq!(waited, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
        cancel.cancel();
        let t = Instant::now();
        assert!(!b.wait(&cancel).await, "a cancelled wait says so");
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_ends_the_wait_early_and_the_next_delay_still_doubles() {
        let cancel = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let t = Instant::now();
        let wake = tokio::time::sleep(Duration::from_millis(30));
        assert!(b.wait_or(&cancel, wake).await);
        assert_eq!(t.elapsed().as_millis(), 30);
        assert_eq!(b.peek(), Duration::from_millis(200));
        let t = Instant::now();
        assert!(b.wait_or(&cancel, std::future::pending()).await);
        assert_eq!(t.elapsed().as_millis(), 200);
    }
}
