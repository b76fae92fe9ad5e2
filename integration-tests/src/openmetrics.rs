//! Scrapes parsed by the Prometheus project's OpenMetrics parser (Python,
//! `integration-tests/python/openmetrics_check.py` in the virtualenv `make py-deps` makes).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// One parsed sample: (sample name, labels, value).
pub type Sample = (String, BTreeMap<String, String>, f64);

/// One family: its type and samples.
#[derive(Debug, Clone)]
pub struct Family {
    pub kind: String,
    pub samples: Vec<Sample>,
}

/// The virtualenv's python: `$LEASEHOLD_PYTHON`, else `$HOME/.cache/leasehold/venv`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("LEASEHOLD_PYTHON") {
        return p.into();
    }
    let cache = std::env::var("LEASEHOLD_CACHE").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/leasehold"),
        PathBuf::from,
    );
    let python = cache.join("venv/bin/python");
    assert!(
        python.exists(),
        "{} not found: run `make py-deps` (scripts/install-python-tools.sh)",
        python.display()
    );
    python
}

/// Parses `text` strictly; `Err` carries the parser's reason.
pub fn parse(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/openmetrics_check.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok(json["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, f)| {
            let samples = f["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let labels = s[1]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect();
                    (
                        s[0].as_str().unwrap().to_owned(),
                        labels,
                        s[2].as_f64().unwrap(),
                    )
                })
                .collect();
            (
                name.clone(),
                Family {
                    kind: f["type"].as_str().unwrap().to_owned(),
                    samples,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_rejects_a_repeated_family() {
        let repeated =
            "# TYPE a counter\na_total{x=\"1\"} 1\n# TYPE a counter\na_total{x=\"2\"} 1\n# EOF\n";
        assert!(parse(repeated)
            .unwrap_err()
            .contains("not valid OpenMetrics"));
        let good = "# TYPE a counter\na_total{x=\"1\"} 1\na_total{x=\"2\"} 2\n# EOF\n";
        let families = parse(good).unwrap();
        assert_eq!(families["a"].kind, "counter");
        assert_eq!(families["a"].samples.len(), 2);
    }
}
