//! Leasehold's metrics, on the Prometheus project's `prometheus-client`.
//!
//! A thin layer that keeps call sites short: metrics are registered by name, help and
//! label pairs; every name is one family (one `# TYPE` line however many label sets
//! register under it, the mistake a hand-written registry made); `render()` produces
//! OpenMetrics text with process metrics and the build info included.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter as PCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge as PGauge;
use prometheus_client::metrics::histogram::Histogram as PHistogram;

mod process;

/// Content type of [`Registry::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets in seconds, from 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

type Labels = Vec<(String, String)>;

/// Label pairs with their values escaped as the text format requires (the library
/// writes values as given, so a `"` in one would end it early and void the scrape).
fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), escape(v)))
        .collect()
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A monotonically increasing count.
#[derive(Debug, Clone, Default)]
pub struct Counter(PCounter);

impl Counter {
    pub fn inc(&self) {
        self.0.inc();
    }

    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A value that goes up and down.
#[derive(Debug, Clone, Default)]
pub struct Gauge(PGauge<f64, AtomicU64>);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.set(v);
    }

    pub fn add(&self, v: i64) {
        self.0.inc_by(v as f64);
    }

    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

/// A latency histogram over [`LATENCY_BUCKETS`].
#[derive(Debug, Clone)]
pub struct Histogram(PHistogram);

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

fn new_histogram() -> PHistogram {
    PHistogram::new(LATENCY_BUCKETS)
}

type PHistogramFamily = Family<Labels, PHistogram, fn() -> PHistogram>;

/// One counter name with any number of label sets.
#[derive(Debug, Clone)]
pub struct CounterFamily(Family<Labels, PCounter>);

impl CounterFamily {
    pub fn with(&self, pairs: &[(&str, &str)]) -> Counter {
        Counter(self.0.get_or_create_owned(&labels(pairs)))
    }

    /// Drops one label set's series (e.g. a shard this instance no longer owns).
    pub fn remove(&self, pairs: &[(&str, &str)]) {
        self.0.remove(&labels(pairs));
    }
}

/// One gauge name with any number of label sets.
#[derive(Debug, Clone)]
pub struct GaugeFamily(Family<Labels, PGauge<f64, AtomicU64>>);

impl GaugeFamily {
    pub fn with(&self, pairs: &[(&str, &str)]) -> Gauge {
        Gauge(self.0.get_or_create_owned(&labels(pairs)))
    }
}

/// One histogram name with any number of label sets.
#[derive(Debug, Clone)]
pub struct HistogramFamily(PHistogramFamily);

impl HistogramFamily {
    pub fn with(&self, pairs: &[(&str, &str)]) -> Histogram {
        Histogram(self.0.get_or_create_owned(&labels(pairs)))
    }
}

#[derive(Clone)]
enum Registered {
    Counter(CounterFamily),
    Gauge(GaugeFamily),
    Histogram(HistogramFamily),
}

impl Registered {
    fn kind(&self) -> &'static str {
        match self {
            Registered::Counter(_) => "counter",
            Registered::Gauge(_) => "gauge",
            Registered::Histogram(_) => "histogram",
        }
    }
}

/// One counter per index of a fixed range (e.g. per shard), lock-free on the hot path:
/// a `Family` would allocate a label set per increment. Indices at zero are not rendered,
/// so [`IndexedCounter::clear`] drops a series (e.g. a shard no longer owned here).
#[derive(Debug)]
pub struct IndexedCounter {
    values: Box<[std::sync::atomic::AtomicU64]>,
}

impl IndexedCounter {
    pub fn inc(&self, index: usize) {
        if let Some(v) = self.values.get(index) {
            v.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn clear(&self, index: usize) {
        if let Some(v) = self.values.get(index) {
            v.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn get(&self, index: usize) -> u64 {
        self.values
            .get(index)
            .map_or(0, |v| v.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[derive(Debug)]
struct IndexedCollector {
    name: String,
    help: String,
    label: String,
    counter: Arc<IndexedCounter>,
}

impl prometheus_client::collector::Collector for IndexedCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let mut family = encoder.encode_descriptor(
            &self.name,
            &self.help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for i in 0..self.counter.len() {
            let v = self.counter.get(i);
            if v > 0 {
                let index = i.to_string();
                let labels = [(self.label.as_str(), index.as_str())];
                ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
enum Plain {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
    Indexed,
}

impl Plain {
    fn kind(&self) -> &'static str {
        match self {
            Plain::Counter(_) => "counter",
            Plain::Gauge(_) => "gauge",
            Plain::Histogram(_) => "histogram",
            Plain::Indexed => "indexed counter",
        }
    }
}

struct Inner {
    registry: prometheus_client::registry::Registry,
    families: HashMap<String, Registered>,
    plain: HashMap<String, Plain>,
}

/// The set of metrics one process exposes. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry with the process metrics (`process_*`) and no others.
    pub fn new() -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(process::ProcessCollector));
        Self {
            inner: Arc::new(Mutex::new(Inner {
                registry,
                families: HashMap::new(),
                plain: Default::default(),
            })),
        }
    }

    /// `leasehold_build_info{version, …} 1`.
    pub fn build_info(&self, pairs: &[(&str, &str)]) {
        self.gauge(
            "leasehold_build_info",
            "Build of this process (value 1; the labels carry the information).",
            pairs,
        )
        .set(1.0);
    }

    fn family(&self, name: &str, help: &str, make: impl FnOnce() -> Registered) -> Registered {
        let mut inner = self.inner.lock().expect("metrics lock");
        if let Some(f) = inner.families.get(name) {
            return f.clone();
        }
        assert!(
            !inner.plain.contains_key(name),
            "{name} is registered unlabelled"
        );
        let f = make();
        // The library appends `_total` to counters and the final full stop to help.
        let help = help.strip_suffix('.').unwrap_or(help);
        match &f {
            Registered::Counter(c) => {
                let base = name.strip_suffix("_total").unwrap_or(name);
                inner.registry.register(base, help, c.0.clone());
            }
            Registered::Gauge(g) => inner.registry.register(name, help, g.0.clone()),
            Registered::Histogram(h) => inner.registry.register(name, help, h.0.clone()),
        }
        inner.families.insert(name.to_owned(), f.clone());
        f
    }

    /// The counter family `name` (must end in `_total`).
    ///
    /// # Panics
    /// If `name` is registered as another kind: a programming error.
    pub fn counter_family(&self, name: &str, help: &str) -> CounterFamily {
        debug_assert!(
            name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        match self.family(name, help, || {
            Registered::Counter(CounterFamily(Family::default()))
        }) {
            Registered::Counter(c) => c,
            other => panic!("{name} is registered as a {}", other.kind()),
        }
    }

    /// The gauge family `name`.
    ///
    /// # Panics
    /// If `name` is registered as another kind.
    pub fn gauge_family(&self, name: &str, help: &str) -> GaugeFamily {
        match self.family(name, help, || {
            Registered::Gauge(GaugeFamily(Family::default()))
        }) {
            Registered::Gauge(g) => g,
            other => panic!("{name} is registered as a {}", other.kind()),
        }
    }

    /// The histogram family `name` (buckets: [`LATENCY_BUCKETS`]).
    ///
    /// # Panics
    /// If `name` is registered as another kind.
    pub fn histogram_family(&self, name: &str, help: &str) -> HistogramFamily {
        match self.family(name, help, || {
            Registered::Histogram(HistogramFamily(Family::new_with_constructor(
                new_histogram as fn() -> PHistogram,
            )))
        }) {
            Registered::Histogram(h) => h,
            other => panic!("{name} is registered as a {}", other.kind()),
        }
    }

    /// A counter; the same name and labels twice give the same series. Without labels
    /// the metric is registered alone (no family, no empty `{}` on its line).
    pub fn counter(&self, name: &str, help: &str, pairs: &[(&str, &str)]) -> Arc<Counter> {
        if !pairs.is_empty() {
            return Arc::new(self.counter_family(name, help).with(pairs));
        }
        match self.plain(name, help, || Plain::Counter(Counter::default())) {
            Plain::Counter(c) => Arc::new(c),
            other => panic!("{name} is registered as a {}", other.kind()),
        }
    }

    pub fn gauge(&self, name: &str, help: &str, pairs: &[(&str, &str)]) -> Arc<Gauge> {
        if !pairs.is_empty() {
            return Arc::new(self.gauge_family(name, help).with(pairs));
        }
        match self.plain(name, help, || Plain::Gauge(Gauge::default())) {
            Plain::Gauge(g) => Arc::new(g),
            other => panic!("{name} is registered as a {}", other.kind()),
        }
    }

    pub fn histogram(&self, name: &str, help: &str, pairs: &[(&str, &str)]) -> Arc<Histogram> {
        if !pairs.is_empty() {
            return Arc::new(self.histogram_family(name, help).with(pairs));
        }
        match self.plain(name, help, || Plain::Histogram(Histogram(new_histogram()))) {
            Plain::Histogram(h) => Arc::new(h),
            other => panic!("{name} is registered as a {}", other.kind()),
        }
    }

    /// The unlabelled metric `name`, registered on first use.
    fn plain(&self, name: &str, help: &str, make: impl FnOnce() -> Plain) -> Plain {
        let mut inner = self.inner.lock().expect("metrics lock");
        if let Some(p) = inner.plain.get(name) {
            return p.clone();
        }
        assert!(
            !inner.families.contains_key(name),
            "{name} is registered with labels"
        );
        let p = make();
        let help = help.strip_suffix('.').unwrap_or(help);
        match &p {
            Plain::Counter(c) => {
                let base = name.strip_suffix("_total").unwrap_or(name);
                inner.registry.register(base, help, c.0.clone());
            }
            Plain::Gauge(g) => inner.registry.register(name, help, g.0.clone()),
            Plain::Histogram(h) => inner.registry.register(name, help, h.0.clone()),
            Plain::Indexed => unreachable!("registered by indexed_counter"),
        }
        inner.plain.insert(name.to_owned(), p.clone());
        p
    }

    /// `name{label="i"}` for `i` in `0..len`; see [`IndexedCounter`].
    ///
    /// # Panics
    /// If `name` is already registered.
    pub fn indexed_counter(
        &self,
        name: &str,
        help: &str,
        label: &str,
        len: usize,
    ) -> Arc<IndexedCounter> {
        let counter = Arc::new(IndexedCounter {
            values: (0..len).map(|_| Default::default()).collect(),
        });
        let mut inner = self.inner.lock().expect("metrics lock");
        assert!(
            !inner.plain.contains_key(name) && !inner.families.contains_key(name),
            "{name} is registered twice"
        );
        inner.plain.insert(name.to_owned(), Plain::Indexed);
        inner
            .registry
            .register_collector(Box::new(IndexedCollector {
                name: name.strip_suffix("_total").unwrap_or(name).to_owned(),
                help: help.to_owned(),
                label: label.to_owned(),
                counter: counter.clone(),
            }));
        counter
    }

    /// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]), ending in `# EOF`.
    pub fn render(&self) -> String {
        let inner = self.inner.lock().expect("metrics lock");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &inner.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_family_per_name_whatever_the_label_sets() {
        let r = Registry::new();
        r.counter("calls_total", "Calls.", &[("result", "ok")])
            .add(3);
        r.counter("calls_total", "Calls.", &[("result", "error")])
            .inc();
        // Registering the same series again adds to it, not beside it.
        r.counter("calls_total", "Calls.", &[("result", "ok")])
            .inc();
        r.gauge("slack_seconds", "Slack.", &[]).set(1.5);
        let h = r.histogram("latency_seconds", "Latency.", &[]);
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let text = r.render();
        assert_eq!(text.matches("# TYPE calls counter").count(), 1, "{text}");
        assert!(text.contains("calls_total{result=\"ok\"} 4\n"), "{text}");
        assert!(text.contains("calls_total{result=\"error\"} 1\n"), "{text}");
        assert!(text.contains("slack_seconds 1.5\n"), "{text}");
        assert!(!text.contains("{}"), "{text}");
        assert!(
            text.contains("latency_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("latency_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("latency_seconds_count 2\n"), "{text}");
        assert!(text.contains("# HELP calls Calls.\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let r = Registry::new();
        r.counter("odd_total", "Odd.", &[("source", "a\"b\\c\nd")])
            .inc();
        let text = r.render();
        assert!(
            text.contains(r#"odd_total{source="a\"b\\c\nd"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn removed_series_disappear() {
        let r = Registry::new();
        let f = r.counter_family("shard_calls_total", "Calls per shard.");
        f.with(&[("shard", "1")]).inc();
        f.with(&[("shard", "2")]).inc();
        f.remove(&[("shard", "1")]);
        let text = r.render();
        assert!(!text.contains("shard=\"1\""), "{text}");
        assert!(
            text.contains("shard_calls_total{shard=\"2\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn indexed_counters_render_only_nonzero_indices() {
        let r = Registry::new();
        let c = r.indexed_counter("shard_calls_total", "Calls per shard.", "shard", 8);
        c.inc(3);
        c.inc(3);
        c.inc(5);
        c.inc(99); // out of range: ignored
        c.clear(5);
        let text = r.render();
        assert_eq!(
            text.matches("# TYPE shard_calls counter").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("shard_calls_total{shard=\"3\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("shard=\"5\""), "{text}");
    }

    #[test]
    fn process_metrics_are_present() {
        let text = Registry::new().render();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing from {text}");
        }
    }

    #[test]
    #[should_panic(expected = "registered as a counter")]
    fn one_name_one_kind() {
        let r = Registry::new();
        r.counter("x_total", "X.", &[]);
        r.gauge("x_total", "X.", &[]);
    }
}
