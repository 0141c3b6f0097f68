//! Counters for `/metrics` (Prometheus text format).

use crate::store::StateCounts;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Upper bounds (seconds) of the step latency histogram.
const STEP_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

#[derive(Debug, Default)]
struct Inner {
    requests: std::collections::BTreeMap<u16, u64>,
    step_buckets: [u64; STEP_BUCKETS.len()],
    step_count: u64,
    step_sum: f64,
    transitions: std::collections::BTreeMap<&'static str, u64>,
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Counts an answered request.
    pub fn request(&self, status: u16) {
        self.with(|m| *m.requests.entry(status).or_default() += 1);
    }

    /// Records the duration of one sampling step.
    pub fn step(&self, seconds: f64) {
        self.with(|m| {
            m.step_count += 1;
            m.step_sum += seconds;
            for (i, b) in STEP_BUCKETS.iter().enumerate() {
                if seconds <= *b {
                    m.step_buckets[i] += 1;
                }
            }
        });
    }

    /// Counts a job entering `state`.
    pub fn transition(&self, state: &'static str) {
        self.with(|m| *m.transitions.entry(state).or_default() += 1);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, counts: StateCounts, workers: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP flux_queue_depth Jobs waiting for a worker.\n# TYPE flux_queue_depth gauge\nflux_queue_depth {}",
            counts.queued
        );
        let _ = writeln!(
            out,
            "# HELP flux_jobs Jobs in the store by state.\n# TYPE flux_jobs gauge"
        );
        for (state, n) in [
            ("QUEUED", counts.queued),
            ("PROCESSING", counts.processing),
            ("COMPLETED", counts.completed),
            ("FAILED", counts.failed),
        ] {
            let _ = writeln!(out, "flux_jobs{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP flux_workers Worker threads, each with a loaded model.\n# TYPE flux_workers gauge\nflux_workers {workers}"
        );
        self.with(|m| {
            let _ = writeln!(
                out,
                "# HELP flux_job_transitions_total Job state changes since start.\n# TYPE flux_job_transitions_total counter"
            );
            for (state, n) in &m.transitions {
                let _ = writeln!(out, "flux_job_transitions_total{{state=\"{state}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "# HELP flux_http_requests_total Answered HTTP requests by status.\n# TYPE flux_http_requests_total counter"
            );
            for (status, n) in &m.requests {
                let _ = writeln!(out, "flux_http_requests_total{{status=\"{status}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "# HELP flux_step_seconds Duration of one sampling step.\n# TYPE flux_step_seconds histogram"
            );
            for (b, n) in STEP_BUCKETS.iter().zip(m.step_buckets) {
                let _ = writeln!(out, "flux_step_seconds_bucket{{le=\"{b}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "flux_step_seconds_bucket{{le=\"+Inf\"}} {}\nflux_step_seconds_sum {}\nflux_step_seconds_count {}",
                m.step_count, m.step_sum, m.step_count
            );
        });
        out
    }
}
