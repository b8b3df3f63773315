//! In-process metrics: labelled counters and gauges rendered in the Prometheus text
//! format for `/metrics`. Never holds secrets: labels are connector names and classes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Whether a metric only goes up or may go anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic.
    Counter,
    /// Any value.
    Gauge,
}

/// Every metric crmbridge exports, with its kind and help text.
pub const METRICS: &[(&str, MetricKind, &str)] = &[
    (
        "crmbridge_records_read_total",
        MetricKind::Counter,
        "Records read from a connector.",
    ),
    (
        "crmbridge_records_merged_total",
        MetricKind::Counter,
        "Records read that changed the canonical store.",
    ),
    (
        "crmbridge_records_pushed_total",
        MetricKind::Counter,
        "Records written to a connector.",
    ),
    (
        "crmbridge_records_skipped_total",
        MetricKind::Counter,
        "Queued pushes skipped because the target already held the content.",
    ),
    (
        "crmbridge_records_rejected_total",
        MetricKind::Counter,
        "Records a connector rejected (sent to dead letters).",
    ),
    (
        "crmbridge_errors_total",
        MetricKind::Counter,
        "Failed connector operations by class.",
    ),
    (
        "crmbridge_http_calls_total",
        MetricKind::Counter,
        "HTTP calls made to a vendor API.",
    ),
    (
        "crmbridge_limit_rejections_total",
        MetricKind::Counter,
        "Vendor rate-limit rejections (429/606/615) received.",
    ),
    (
        "crmbridge_limiter_wait_seconds_total",
        MetricKind::Counter,
        "Time spent waiting for the local rate limiter.",
    ),
    (
        "crmbridge_quota_used",
        MetricKind::Gauge,
        "Vendor calls counted against today's daily budget.",
    ),
    (
        "crmbridge_quota_left",
        MetricKind::Gauge,
        "Calls left in today's daily budget.",
    ),
    (
        "crmbridge_lag_seconds",
        MetricKind::Gauge,
        "Seconds since the connector last completed a poll cycle.",
    ),
    (
        "crmbridge_last_successful_poll_timestamp_seconds",
        MetricKind::Gauge,
        "Unix time of the last completed poll cycle.",
    ),
    (
        "crmbridge_outbox_depth",
        MetricKind::Gauge,
        "Pushes queued for a connector.",
    ),
    (
        "crmbridge_dead_letters",
        MetricKind::Gauge,
        "Records in the dead-letter table.",
    ),
    (
        "crmbridge_suspended",
        MetricKind::Gauge,
        "1 while a connector is suspended (ban, quota), else 0.",
    ),
    (
        "crmbridge_suspended_until_timestamp_seconds",
        MetricKind::Gauge,
        "Unix time until which a connector is suspended.",
    ),
];

type Labels = Vec<(String, String)>;

/// A registry of labelled values.
#[derive(Debug, Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<(String, Labels), f64>>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by` to a counter.
    pub fn inc(&self, name: &str, label_pairs: &[(&str, &str)], by: f64) {
        *self
            .values
            .lock()
            .unwrap()
            .entry((name.to_string(), labels(label_pairs)))
            .or_default() += by;
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, label_pairs: &[(&str, &str)], value: f64) {
        self.values
            .lock()
            .unwrap()
            .insert((name.to_string(), labels(label_pairs)), value);
    }

    /// The current value of a metric, if set.
    pub fn get(&self, name: &str, label_pairs: &[(&str, &str)]) -> Option<f64> {
        self.values
            .lock()
            .unwrap()
            .get(&(name.to_string(), labels(label_pairs)))
            .copied()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let values = self.values.lock().unwrap();
        let mut out = String::new();
        for (name, kind, help) in METRICS {
            let kind = match kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for ((n, l), v) in values.range((name.to_string(), Vec::new())..) {
                if n != name {
                    break;
                }
                let l: Vec<String> = l
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                if l.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{}}} {v}", l.join(","));
                }
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_labels() {
        let m = Metrics::new();
        m.inc(
            "crmbridge_records_read_total",
            &[("connector", "rally")],
            3.0,
        );
        m.inc(
            "crmbridge_records_read_total",
            &[("connector", "rally")],
            2.0,
        );
        m.set("crmbridge_outbox_depth", &[("connector", "a\"b")], 7.0);
        let text = m.render();
        assert!(
            text.contains("# TYPE crmbridge_records_read_total counter"),
            "{text}"
        );
        assert!(
            text.contains("crmbridge_records_read_total{connector=\"rally\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("crmbridge_outbox_depth{connector=\"a\\\"b\"} 7"),
            "{text}"
        );
    }
}
