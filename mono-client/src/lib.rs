//! Mono's re-authorise endpoint (and its v2 re-auth link, `links`), as both the worker (on `reauthorisation_required`) and the app's API
//! (when a stored token is about to expire) call it: the client and how its answers are classified
//! (`client`), the circuit breaker shared by a process's calls (`circuit`), and the retries and single
//! flight around one call (`tokens`). Nothing here knows queues or the database.

pub mod circuit;
pub mod client;
pub mod links;
pub mod tokens;

/// The names a process exports its Mono metrics under: each binary has its own prefix, so
/// dashboards and alerts can tell a worker's calls from the API's.
#[derive(Clone, Copy, Debug)]
pub struct MetricNames {
    /// Histogram of call durations, labelled `status_class`.
    pub request_seconds: &'static str,
    /// Gauge: 0 closed, 1 half-open, 2 open.
    pub circuit_state: &'static str,
    /// Gauge: 1 while Mono refuses our secret key.
    pub key_refused: &'static str,
    /// Gauge: the HTTP status Mono refuses every account with (0 while it answers accounts apart).
    pub refusing_alike: &'static str,
    /// Counter of callers that took a concurrent call's outcome instead of calling.
    pub calls_shared: &'static str,
}

impl MetricNames {
    pub const WORKER: Self = Self {
        request_seconds: "monohook_worker_mono_request_seconds",
        circuit_state: "monohook_worker_mono_circuit_state",
        key_refused: "monohook_worker_mono_key_refused",
        refusing_alike: "monohook_worker_mono_refusing_alike",
        calls_shared: "monohook_worker_mono_calls_shared_total",
    };

    pub const API: Self = Self {
        request_seconds: "monohook_api_mono_request_seconds",
        circuit_state: "monohook_api_mono_circuit_state",
        key_refused: "monohook_api_mono_key_refused",
        refusing_alike: "monohook_api_mono_refusing_alike",
        calls_shared: "monohook_api_mono_calls_shared_total",
    };
}
