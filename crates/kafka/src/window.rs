//! The commit watermark of one partition: the lowest offset not yet done.

use std::collections::BTreeSet;

/// Offsets of one partition that were consumed but are not done yet.
///
/// Done = handled or dead-lettered. The offset to commit is the lowest offset not done
/// (Kafka's "next offset to read"): a restart re-reads everything not done, and no
/// commit ever passes a message that is not done.
#[derive(Debug, Default)]
pub struct Window {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset consumed.
    next: Option<i64>,
    /// Last watermark handed out.
    committed: Option<i64>,
}

impl Window {
    pub fn start(&mut self, offset: i64) {
        self.in_flight.insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Marks `offset` done; returns the new watermark when it moved.
    pub fn finish(&mut self, offset: i64) -> Option<i64> {
        self.in_flight.remove(&offset);
        let watermark = self.watermark()?;
        if self.committed.is_some_and(|c| c >= watermark) {
            return None;
        }
        self.committed = Some(watermark);
        Some(watermark)
    }

    /// Lowest offset not done, or one past the highest consumed when all are done.
    pub fn watermark(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever order messages finish in, the watermark never passes an offset that
        /// is not done, and reaches the end once all are.
        #[test]
        fn watermark_never_passes_an_unfinished_offset(order in Just((0..200i64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut w = Window::default();
            for o in 0..200 {
                w.start(1000 + o);
            }
            let mut done = std::collections::BTreeSet::new();
            let mut last = 0;
            for o in order {
                done.insert(o);
                if let Some(wm) = w.finish(1000 + o) {
                    prop_assert!(wm > last);
                    last = wm;
                    // every offset below the watermark is done
                    prop_assert!((1000..wm).all(|x| done.contains(&(x - 1000))));
                    // and the watermark itself is not (or is the end)
                    prop_assert!(wm == 1200 || !done.contains(&(wm - 1000)));
                }
            }
            prop_assert_eq!(last, 1200);
            prop_assert_eq!(w.in_flight(), 0);
        }
    }
}
