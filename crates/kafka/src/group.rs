//! The consumer group's generation, which rust-rdkafka does not expose.

use rdkafka::consumer::{Consumer, ConsumerContext};

/// The generation of the group this consumer is a member of now (−1 when it has not
/// joined). It grows with every rebalance of the group, so a partition assigned in a
/// later generation was assigned after one assigned in an earlier generation.
#[allow(unsafe_code)]
pub(crate) fn generation<C: ConsumerContext>(consumer: &impl Consumer<C>) -> i32 {
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live consumer handle `consumer` owns (borrowed for this call).
    // librdkafka returns a new metadata object (or NULL without a group id), which is
    // read once and destroyed here, never shared.
    unsafe {
        let metadata = rdkafka::bindings::rd_kafka_consumer_group_metadata(rk);
        if metadata.is_null() {
            return -1;
        }
        let generation =
            rdkafka::bindings::rd_kafka_consumer_group_metadata_generation_id(metadata);
        rdkafka::bindings::rd_kafka_consumer_group_metadata_destroy(metadata);
        generation
    }
}
