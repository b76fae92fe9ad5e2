//! The commit watermark of one partition: the lowest offset not yet done.

use std::collections::BTreeMap;

/// Offsets of one partition that were consumed but are not done yet.
///
/// Done = handled or dead-lettered. The offset to commit is the lowest offset not done
/// (Kafka's "next offset to read"): a restart re-reads everything not done, and no
/// commit ever passes a message that is not done.
#[derive(Debug, Default)]
pub struct Window {
    /// Offset → the record's timestamp (Unix ms), if it has one.
    in_flight: BTreeMap<i64, Option<i64>>,
    /// One past the highest offset consumed.
    next: Option<i64>,
    /// The timestamp of the record at the highest offset consumed.
    last_timestamp: Option<i64>,
    /// Last watermark handed out.
    committed: Option<i64>,
}

impl Window {
    /// A window whose first record, not started yet (it may wait for room), has
    /// `timestamp`: until one starts, it is the first unfinished.
    pub fn read_from(timestamp: Option<i64>) -> Self {
        Self {
            last_timestamp: timestamp.filter(|t| *t > 0),
            ..Self::default()
        }
    }

    pub fn start(&mut self, offset: i64, timestamp: Option<i64>) {
        let timestamp = timestamp.filter(|t| *t > 0);
        self.in_flight.insert(offset, timestamp);
        if self.next.is_none_or(|n| offset + 1 >= n) {
            self.next = Some(offset + 1);
            self.last_timestamp = timestamp;
        }
    }

    /// The timestamp of the first record not done (the oldest one in flight, or, when
    /// none is, the last one consumed: what follows it was not read yet): every record
    /// of the partition this consumer read and did not finish is at or after it in the
    /// partition, and what it did not read yet follows the last one read, so reading
    /// from the first record at or after this time (Kafka's offsets for times) misses
    /// none of them, as long as the records after it are no older than it. `None`
    /// before the first record, or when that record has no timestamp.
    pub fn first_unfinished_time(&self) -> Option<i64> {
        match self.in_flight.first_key_value() {
            Some((_, timestamp)) => *timestamp,
            None => self.last_timestamp,
        }
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
        self.in_flight
            .first_key_value()
            .map(|(o, _)| *o)
            .or(self.next)
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
                w.start(1000 + o, Some(o));
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

    #[test]
    fn the_first_unfinished_time_is_the_oldest_record_in_flight_else_the_last_read() {
        let mut w = Window::default();
        assert_eq!(w.first_unfinished_time(), None);
        // Read, waiting for room: the first unfinished already.
        let mut w2 = Window::read_from(Some(90));
        assert_eq!(w2.first_unfinished_time(), Some(90));
        w2.start(9, Some(90));
        assert_eq!(w2.first_unfinished_time(), Some(90));
        w.start(10, Some(100));
        w.start(11, Some(105));
        w.start(12, Some(103));
        assert_eq!(w.first_unfinished_time(), Some(100));
        w.finish(11);
        assert_eq!(
            w.first_unfinished_time(),
            Some(100),
            "offset 10 is not done"
        );
        w.finish(10);
        assert_eq!(w.first_unfinished_time(), Some(103));
        w.finish(12);
        // All done: what comes next was not read; it follows the last record read.
        assert_eq!(w.first_unfinished_time(), Some(103));
        w.start(13, None);
        assert_eq!(w.first_unfinished_time(), None, "a record without a time");
        w.finish(13);
        assert_eq!(w.first_unfinished_time(), None);
        w.start(14, Some(110));
        w.finish(14);
        assert_eq!(w.first_unfinished_time(), Some(110));
    }
}
