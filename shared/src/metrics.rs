//! The Prometheus recorder both binaries export from (`GET /metrics`).
//!
//! Every `metrics::counter!`/`gauge!`/`histogram!` call in the code lands here. Histograms are real
//! Prometheus histograms (not summaries) so dashboards can aggregate quantiles across processes.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Buckets of every `_seconds` histogram: from half a millisecond to two minutes.
const SECONDS_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle, so components
/// started in one process, as in tests, share it) and keeps its histograms trimmed.
pub fn recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&SECONDS_BUCKETS)
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("cannot start the metrics upkeep thread");
            handle
        })
        .clone()
}

/// Renders the current metrics in Prometheus's text format.
pub fn render() -> String {
    recorder().render()
}
