//! The benchmark: monohook against the broker's own ceiling, measured in one run so that ratios hold
//! on a noisy machine. Each figure is the median of `runs` runs; see `scripts/bench`.

pub mod api_load;
pub mod broker;
pub mod ingest_load;
pub mod journal;
pub mod journal_report;
pub mod notify_latency;
pub mod report;
pub mod worker_drain;

use std::time::Duration;

/// Settings of one benchmark run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub runs: usize,
    /// Connections of the HTTP load, and messages in flight of the publish reference.
    pub connections: usize,
    pub load_duration: Duration,
    pub body_bytes: usize,
    /// Events of the worker drain and of the consume reference.
    pub drain_events: u64,
    pub drain_accounts: u64,
    pub reauth_events: u64,
    pub mono_latency_ms: u64,
    /// The worker's PREFETCH, also used by the consume reference.
    pub prefetch: u16,
    /// The worker's PREFETCH for the re-auth phase (Mono concurrency comes from in-flight deliveries).
    pub reauth_prefetch: u16,
    pub amqp_url: String,
    pub database_server: String,
    /// Where the monohook binaries under test are; `None`: next to the bench (`bin_dir`).
    pub binaries: Option<std::path::PathBuf>,
}

impl BenchConfig {
    /// The path of monohook binary `name` under test (an absolute path replaces `bin_dir` when
    /// the process spawns it).
    pub fn binary(&self, name: &str) -> String {
        match &self.binaries {
            Some(dir) => dir.join(name).display().to_string(),
            None => name.to_owned(),
        }
    }
}

/// The median of `values` (NaN when there are none: a phase that was not run).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}
