//! A minimal metrics registry rendered in the Prometheus text format.
//!
//! Leasehold needs a dozen metrics with at most one label each; lock-free atomics on the
//! hot path and a `render()` for `/metrics` are all it takes, so no metrics framework is
//! pulled in.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down. Stored as thousandths so fractional seconds fit.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store((v * 1000.0) as i64, Ordering::Relaxed);
    }

    pub fn add(&self, v: i64) {
        self.0.fetch_add(v * 1000, Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// Latency buckets in seconds, from 100 µs to 10 s.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

struct Entry {
    name: String,
    help: String,
    labels: String,
    metric: Metric,
}

/// The set of metrics one process exposes. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a counter; `labels` is either empty or `key="value"` pairs.
    pub fn counter(&self, name: &str, help: &str, labels: &str) -> Arc<Counter> {
        let c = Arc::new(Counter::default());
        self.push(name, help, labels, Metric::Counter(c.clone()));
        c
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &str) -> Arc<Gauge> {
        let g = Arc::new(Gauge::default());
        self.push(name, help, labels, Metric::Gauge(g.clone()));
        g
    }

    pub fn histogram(&self, name: &str, help: &str, labels: &str) -> Arc<Histogram> {
        let h = Arc::new(Histogram::default());
        self.push(name, help, labels, Metric::Histogram(h.clone()));
        h
    }

    fn push(&self, name: &str, help: &str, labels: &str, metric: Metric) {
        self.entries.lock().expect("metrics lock").push(Entry {
            name: name.to_owned(),
            help: help.to_owned(),
            labels: labels.to_owned(),
            metric,
        });
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let entries = self.entries.lock().expect("metrics lock");
        let mut out = String::new();
        let mut last_name = "";
        for e in entries.iter() {
            let kind = match e.metric {
                Metric::Counter(_) => "counter",
                Metric::Gauge(_) => "gauge",
                Metric::Histogram(_) => "histogram",
            };
            if e.name != last_name {
                let _ = writeln!(out, "# HELP {} {}", e.name, e.help);
                let _ = writeln!(out, "# TYPE {} {}", e.name, kind);
                last_name = &e.name;
            }
            let braces = |extra: &str| -> String {
                let parts: Vec<&str> = [e.labels.as_str(), extra]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect();
                if parts.is_empty() {
                    String::new()
                } else {
                    format!("{{{}}}", parts.join(","))
                }
            };
            match &e.metric {
                Metric::Counter(c) => {
                    let _ = writeln!(out, "{}{} {}", e.name, braces(""), c.get());
                }
                Metric::Gauge(g) => {
                    let _ = writeln!(out, "{}{} {}", e.name, braces(""), g.get());
                }
                Metric::Histogram(h) => {
                    let mut cumulative = 0;
                    for (i, b) in BUCKETS.iter().enumerate() {
                        cumulative += h.buckets[i].load(Ordering::Relaxed);
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {}",
                            e.name,
                            braces(&format!("le=\"{b}\"")),
                            cumulative
                        );
                    }
                    let count = h.count();
                    let _ = writeln!(out, "{}_bucket{} {}", e.name, braces("le=\"+Inf\""), count);
                    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
                    let _ = writeln!(out, "{}_sum{} {}", e.name, braces(""), sum);
                    let _ = writeln!(out, "{}_count{} {}", e.name, braces(""), count);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::new();
        r.counter("calls_total", "Calls.", "result=\"ok\"").add(3);
        r.counter("calls_total", "Calls.", "result=\"error\"").inc();
        r.gauge("slack_seconds", "Slack.", "").set(1.5);
        let h = r.histogram("latency_seconds", "Latency.", "");
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let text = r.render();
        assert_eq!(text.matches("# TYPE calls_total counter").count(), 1);
        assert!(text.contains("calls_total{result=\"ok\"} 3\n"));
        assert!(text.contains("calls_total{result=\"error\"} 1\n"));
        assert!(text.contains("slack_seconds 1.5\n"));
        assert!(text.contains("latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("latency_seconds_count 2\n"));
    }
}
