//! Logging and tracing set-up shared by every binary.
//!
//! Logs: `tracing` with JSON lines (production) or pretty output (a terminal), filtered by `RUST_LOG`.
//! Each line is written to stderr by the thread that logs it, in one `write`. A background writer
//! thread (tracing-appender) was measured to cost more: under load it spent a tenth of ingest's CPU
//! handing lines over and yielding (bench/results).
//!
//! Traces (OpenTelemetry) are off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Off, the subscriber is
//! exactly the logging one: no OpenTelemetry layer, and [`propagation`] does nothing, so ingest's hot
//! path pays nothing for the feature. On, monohook's own spans (INFO and above, whatever `RUST_LOG`
//! says: quiet logs must not mean no traces) also go to an OTLP/HTTP collector, batched by the SDK on
//! a thread of its own; the [`TelemetryGuard`] flushes what is left when the process ends.

pub mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, TelemetryArgs};

/// The crates whose spans are exported. Libraries' spans are left out: lapin, for one, opens a span
/// for each connection's I/O loop that lives as long as the connection and says nothing per webhook.
const OWN_CRATES: [&str; 5] = ["ingest", "worker", "api", "mono_client", "shared"];

/// Whether an OpenTelemetry layer is installed; read on hot paths, hence an atomic, not a lookup.
static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OpenTelemetry layer is installed and not shut down).
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Why logging or tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    // Each message leaves its cause to the source chain, which `main` prints after it.
    #[error("RUST_LOG is not a valid filter")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// Another subscriber is installed already.
    #[error("cannot install the log subscriber")]
    Install(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot set up the OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT)")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps the trace pipeline alive; dropping it exports the spans still buffered (waiting up to 5 s)
/// and stops tracing. Without tracing it holds nothing.
#[must_use = "dropping the guard stops tracing: keep it until the process ends"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span now, blocking until the exporter has them (tests use it; an
    /// orderly exit flushes on drop).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.force_flush()
        {
            tracing::warn!(%error, "flushing spans failed");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            TRACING.store(false, Ordering::Relaxed);
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "spans may not all have been exported at exit");
            }
        }
    }
}

/// Installs the global subscriber, with an OpenTelemetry layer exporting to
/// `OTEL_EXPORTER_OTLP_ENDPOINT` if it is set. `service` names the process in traces unless
/// `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) does. Call once, first
/// thing in `main`, and keep the guard until the end.
pub fn init(args: &TelemetryArgs, service: &'static str) -> Result<TelemetryGuard, TelemetryError> {
    let Some(base) = otlp_base(args) else {
        install_logging_only(args)?;
        return Ok(TelemetryGuard { provider: None });
    };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    // The standard per-signal variable wins over the base URL; the exporter reads it itself.
    if std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").map_or(true, |v| v.is_empty()) {
        exporter = exporter.with_endpoint(traces_url(base));
    }
    // Headers (OTEL_EXPORTER_OTLP_HEADERS, e.g. a collector's API key) and the timeout are read by
    // the exporter itself; nothing here sees or logs them.
    let exporter = exporter.build()?;
    init_with_exporter(args, service, exporter)
}

/// [`init`] with tracing on, exporting through `exporter` (the OTLP one in production, the SDK's
/// in-memory one in tests), batched on the SDK's own thread as in production.
pub fn init_with_exporter<E: SpanExporter + 'static>(
    args: &TelemetryArgs,
    service: &'static str,
    exporter: E,
) -> Result<TelemetryGuard, TelemetryError> {
    let log_filter = log_filter(args)?;
    let provider =
        SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource(service)).build();
    let traces =
        tracing_opentelemetry::layer().with_tracer(provider.tracer("monohook")).with_filter(own_spans());
    tracing_subscriber::registry()
        .with(log_layer(args).with_filter(log_filter))
        .with(traces)
        .try_init()
        .map_err(|e| TelemetryError::Install(e.into()))?;
    // W3C trace context for anything that asks the global propagator (monohook's own AMQP headers
    // use it directly, see `propagation`).
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    TRACING.store(true, Ordering::Relaxed);
    Ok(TelemetryGuard { provider: Some(provider) })
}

/// The collector's base URL, if tracing is on: set, not empty, and the SDK not disabled by the
/// standard `OTEL_SDK_DISABLED=true`.
fn otlp_base(args: &TelemetryArgs) -> Option<&str> {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    args.otlp_endpoint.as_deref().filter(|base| !base.is_empty() && !disabled)
}

/// Where traces go for a base URL, as the OTLP specification says: `<base>/v1/traces`. (The
/// exporter would use an endpoint given to it in code as it is, path and all.)
fn traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

fn resource(service: &'static str) -> opentelemetry_sdk::Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself.
    let builder = opentelemetry_sdk::Resource::builder();
    if named { builder.build() } else { builder.with_service_name(service).build() }
}

/// monohook's spans and the events inside them, at INFO and above.
fn own_spans() -> Targets {
    OWN_CRATES.iter().fold(Targets::new(), |targets, name| targets.with_target(*name, LevelFilter::INFO))
}

/// The target where lapin logs, at WARN, a message the broker returned (an unroutable publish) with
/// its `Debug` form: the whole body, a webhook's bank data.
const RETURNED_MESSAGES: &str = "lapin::returned_messages";

/// `RUST_LOG` as given, with lapin's returned messages kept to errors unless the filter names that
/// target itself (a more specific directive wins, so `RUST_LOG=debug` keeps them out too). Publishers
/// count a returned message on their own, without its body.
pub fn log_filter(args: &TelemetryArgs) -> Result<EnvFilter, TelemetryError> {
    let given = args.log_filter.trim();
    if given.is_empty() || given.contains(RETURNED_MESSAGES) {
        return Ok(EnvFilter::try_new(given)?);
    }
    Ok(EnvFilter::try_new(format!("{given},{RETURNED_MESSAGES}=error"))?)
}

fn json_logs(args: &TelemetryArgs) -> bool {
    match args.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    }
}

/// The same log lines as [`install_logging_only`] writes, as a layer beside the trace layer.
fn log_layer(args: &TelemetryArgs) -> Box<dyn Layer<Registry> + Send + Sync> {
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json_logs(args) {
        layer.json().flatten_event(true).with_current_span(true).with_span_list(false).boxed()
    } else {
        layer.boxed()
    }
}

/// The subscriber as it was before tracing existed, unchanged: tracing off costs nothing.
fn install_logging_only(args: &TelemetryArgs) -> Result<(), TelemetryError> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(args)?)
        // Colour codes only where a person reads them, never into log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json_logs(args) {
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.try_init()
    }
    .map_err(TelemetryError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoint: Option<&str>) -> TelemetryArgs {
        TelemetryArgs {
            log_format: LogFormat::Json,
            log_filter: "info".into(),
            otlp_endpoint: endpoint.map(str::to_owned),
        }
    }

    #[test]
    fn tracing_is_on_only_with_an_endpoint() {
        assert_eq!(otlp_base(&args(None)), None);
        assert_eq!(otlp_base(&args(Some(""))), None, "empty, as Compose passes an unset variable");
        assert_eq!(otlp_base(&args(Some("http://jaeger:4318"))), Some("http://jaeger:4318"));
    }

    #[test]
    fn traces_go_to_the_signal_path_under_the_base_url() {
        assert_eq!(traces_url("http://jaeger:4318"), "http://jaeger:4318/v1/traces");
        assert_eq!(traces_url("http://jaeger:4318/"), "http://jaeger:4318/v1/traces");
        assert_eq!(traces_url("https://otel.example/prefix"), "https://otel.example/prefix/v1/traces");
    }
}
