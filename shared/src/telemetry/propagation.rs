//! Carrying a trace across RabbitMQ: the W3C trace context (`traceparent`, and `tracestate` when there
//! is one) as long-string AMQP headers of the message.
//!
//! ingest injects the context of its `publish` span; the worker extracts it and makes it the remote
//! parent of its `delivery` span, so one webhook is one trace across both processes. Retry tiers and
//! the dead-letter queue keep the headers, so every attempt joins the same trace. The headers are a
//! contract between monohook's own binaries, so the W3C propagator is used here directly, whatever
//! global propagator a deployment sets. Everything here does nothing while tracing is off.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C headers, under the names the specification gives them.
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";

/// `properties` with the trace context of `span` in their headers; unchanged while tracing is off or
/// if `span` is not traced.
pub fn inject(span: &tracing::Span, properties: BasicProperties) -> BasicProperties {
    if !super::tracing_enabled() {
        return properties;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return properties;
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    inject_context(&cx, &mut headers);
    properties.with_headers(headers)
}

/// Makes the trace context carried in `headers`, if any, the parent of `span`. Call it right after
/// creating the span, before it is entered: a started span cannot change parent.
pub fn set_parent(span: &tracing::Span, headers: Option<&FieldTable>) {
    if !super::tracing_enabled() {
        return;
    }
    let Some(headers) = headers else { return };
    let cx = extract_context(headers);
    if cx.span().span_context().is_valid()
        && let Err(error) = span.set_parent(cx)
    {
        tracing::debug!(%error, "the delivery's span cannot join the webhook's trace");
    }
}

/// Writes `cx` as W3C headers.
pub fn inject_context(cx: &Context, headers: &mut FieldTable) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// Reads W3C headers; an empty context if there are none or they are malformed.
pub fn extract_context(headers: &FieldTable) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
}

struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            AMQPValue::ShortString(value) => Some(value.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|key| key.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn remote_context() -> Context {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("monohook", "1")]).unwrap(),
        );
        Context::new().with_remote_span_context(span)
    }

    #[test]
    fn a_context_travels_as_long_string_headers_and_comes_back_whole() {
        let mut headers = FieldTable::default();
        inject_context(&remote_context(), &mut headers);

        assert_eq!(
            headers.inner().get(HEADER_TRACEPARENT),
            Some(&AMQPValue::LongString(LongString::from(TRACEPARENT)))
        );
        assert_eq!(
            headers.inner().get(HEADER_TRACESTATE),
            Some(&AMQPValue::LongString(LongString::from("monohook=1")))
        );
        let extracted = extract_context(&headers);
        assert_eq!(extracted.span().span_context(), remote_context().span().span_context());
    }

    #[test]
    fn headers_without_a_valid_traceparent_give_no_parent() {
        let mut headers = FieldTable::default();
        assert!(!extract_context(&headers).span().span_context().is_valid());
        headers.insert(HEADER_TRACEPARENT.into(), AMQPValue::LongString(LongString::from("garbage")));
        assert!(!extract_context(&headers).span().span_context().is_valid());
        headers.insert(HEADER_TRACEPARENT.into(), AMQPValue::LongLongInt(7));
        assert!(!extract_context(&headers).span().span_context().is_valid());
    }

    #[test]
    fn an_empty_context_writes_nothing() {
        let mut headers = FieldTable::default();
        inject_context(&Context::new(), &mut headers);
        assert!(headers.inner().is_empty());
    }

    #[test]
    fn nothing_is_injected_while_tracing_is_off() {
        // No test of this crate installs a trace pipeline, so tracing is off here.
        assert!(!crate::telemetry::tracing_enabled());
        let properties = inject(&tracing::info_span!("publish"), BasicProperties::default());
        assert_eq!(properties.headers(), &None);
    }
}
