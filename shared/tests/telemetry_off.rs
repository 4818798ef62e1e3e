//! Tracing is off by default: without `OTEL_EXPORTER_OTLP_ENDPOINT`, `telemetry::init` installs the
//! logging subscriber alone, and nothing travels in AMQP headers. (A binary of its own: `init`
//! installs the process-wide subscriber.)

use lapin::BasicProperties;
use lapin::types::FieldTable;
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use shared::config::{LogFormat, TelemetryArgs};
use shared::telemetry::{self, propagation};

#[test]
fn without_an_endpoint_there_is_no_trace_layer_and_no_header() {
    let args = TelemetryArgs { log_format: LogFormat::Json, log_filter: "off".into(), otlp_endpoint: None };
    let guard = telemetry::init(&args, "monohook-test").expect("logging alone installs");

    assert!(!telemetry::tracing_enabled());
    let span = tracing::info_span!(target: "ingest", "publish");
    assert!(!span.context().span().span_context().is_valid(), "no OpenTelemetry layer made a span");
    let properties = propagation::inject(&span, BasicProperties::default());
    assert_eq!(properties.headers(), &None, "no traceparent, not even an empty header table");

    // A traceparent that did arrive is ignored: nothing to join.
    let mut headers = FieldTable::default();
    headers.insert(
        propagation::HEADER_TRACEPARENT.into(),
        shared::delivery::long_string("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let delivery = tracing::info_span!(target: "worker", "delivery");
    propagation::set_parent(&delivery, Some(&headers));
    assert!(!delivery.context().span().span_context().is_valid());
    drop(guard);
}
