//! One webhook is one trace across the queue: ingest's request and publish, then, through the
//! `traceparent` in the message's AMQP headers, the worker's delivery, its Mono call and its database
//! transaction.
//!
//! A binary of its own: the trace pipeline is installed process-wide (the global subscriber), once.
//! It exports to the SDK's in-memory exporter through the same batch processor as production. Both
//! sides run in this process, against the real RabbitMQ and PostgreSQL, with Mono simulated.

use clap::Parser;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use ingest::config::IngestConfig;
use ingest::startup::Application;
use shared::config::{LogFormat, TelemetryArgs};
use shared::telemetry::{self, TelemetryGuard};
use shared::testing::{TestBroker, amqp_url, eventually, fixture};
use worker::config::Cli;
use worker::startup::Worker;

const WEBHOOK_SECRET: &str = "tracing-webhook-secret";
const MONO_KEY: &str = "test_sk_tracing_0123456789";
/// The token in `tests/fixtures/reauthorise_response.json`.
const FIXTURE_TOKEN: &str = "VwxcfeLRZvq1UlD5WiuN";
/// The account of the re-auth fixtures.
const ACCOUNT: &str = "5fbcde8f8699984153e65537";
const PATIENCE: Duration = Duration::from_secs(20);

/// Tracing on, into `exporter`; logs only with `TEST_LOG` set, as in the other tests.
fn install(exporter: &InMemorySpanExporter) -> TelemetryGuard {
    let log_filter = match std::env::var_os("TEST_LOG") {
        Some(_) => std::env::var("RUST_LOG").unwrap_or_else(|_| "debug,lapin=info".into()),
        None => "off".into(),
    };
    let args = TelemetryArgs { log_format: LogFormat::Pretty, log_filter, otlp_endpoint: None };
    telemetry::init_with_exporter(&args, "monohook-test", exporter.clone())
        .expect("the trace pipeline cannot be installed")
}

async fn start_worker(broker: &TestBroker, mono: &MockServer, pool: PgPool) -> CancellationToken {
    let cli = Cli::parse_from([
        "worker",
        "--mono-secret-key",
        MONO_KEY,
        "--mono-api-url",
        &mono.uri(),
        "--queue-prefix",
        &broker.prefix,
        "--retry-delays-secs",
        &broker.retry_delays_arg(),
        "--amqp-url",
        amqp_url().expose_secret(),
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let worker = Worker::build(&cli.broker, &cli.run, pool).await.expect("worker failed to build");
    let cancel = CancellationToken::new();
    tokio::spawn(worker.run(cancel.clone()));
    cancel
}

async fn start_ingest(broker: &TestBroker) -> (String, CancellationToken) {
    let config = IngestConfig::parse_from([
        "ingest",
        "--mono-webhook-secret",
        WEBHOOK_SECRET,
        "--listen-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--queue-prefix",
        &broker.prefix,
        "--retry-delays-secs",
        &broker.retry_delays_arg(),
        "--http-workers",
        "1",
        "--amqp-url",
        amqp_url().expose_secret(),
    ]);
    let cancel = CancellationToken::new();
    let app = Application::build(config, cancel.clone()).await.expect("ingest failed to build");
    let url = format!("http://127.0.0.1:{}/webhooks/mono", app.port());
    tokio::spawn(app.run_until_stopped());
    (url, cancel)
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

/// The one finished span called `name` (with `attribute` = `value`, if given).
fn the_span<'a>(spans: &'a [SpanData], name: &str, filter: Option<(&str, &str)>) -> &'a SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| filter.is_none_or(|(key, value)| attribute(s, key).as_deref() == Some(value)))
        .collect();
    assert_eq!(found.len(), 1, "expected one {name} span {filter:?}, got {found:#?}");
    found[0]
}

#[sqlx::test(migrations = "../migrations")]
async fn one_webhook_is_one_trace_from_ingest_through_the_worker(pool: PgPool) {
    let exporter = InMemorySpanExporter::default();
    let telemetry = install(&exporter);
    assert!(telemetry::tracing_enabled());

    let broker = TestBroker::new().await;
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{ACCOUNT}/reauthorise")))
        .and(header("mono-sec-key", MONO_KEY))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(fixture("reauthorise_response.json"), "application/json"),
        )
        .expect(1)
        .mount(&mono)
        .await;
    let stop_worker = start_worker(&broker, &mono, pool.clone()).await;
    let (ingest, stop_ingest) = start_ingest(&broker).await;

    let response = reqwest::Client::new()
        .post(&ingest)
        .header("mono-webhook-secret", WEBHOOK_SECRET)
        .body(fixture("reauthorisation_required.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    eventually("the account is flagged", PATIENCE, || async {
        sqlx::query_scalar::<_, bool>("SELECT reauth_required FROM accounts WHERE id = $1")
            .bind(ACCOUNT)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .unwrap_or(false)
    })
    .await;
    // The delivery's span ends once its ack is sent and the pipeline lets go of it.
    eventually("the delivery's span is exported", PATIENCE, || async {
        telemetry.flush();
        exporter.get_finished_spans().unwrap().iter().any(|s| s.name == "delivery")
    })
    .await;
    stop_ingest.cancel();
    stop_worker.cancel();
    telemetry.flush();
    let spans = exporter.get_finished_spans().unwrap();

    let request = the_span(&spans, "webhook", None);
    let publish = the_span(&spans, "publish", None);
    let delivery = the_span(&spans, "delivery", None);
    let mono_call = the_span(&spans, "mono.reauthorise", None);
    // A re-auth leaves its first batch for the token (nothing written), then comes back and commits.
    let waiting = the_span(&spans, "db.transaction", Some(("outcome", "needs_token")));
    let commit = the_span(&spans, "db.transaction", Some(("outcome", "committed")));

    let trace: TraceId = request.span_context.trace_id();
    for span in [publish, delivery, mono_call, waiting, commit] {
        assert_eq!(span.span_context.trace_id(), trace, "{} is in another trace", span.name);
    }
    assert_eq!(request.parent_span_id, SpanId::INVALID, "the request starts the trace");
    assert_eq!(publish.parent_span_id, request.span_context.span_id());
    assert_eq!(delivery.parent_span_id, publish.span_context.span_id(), "the worker continues the publish");
    assert!(delivery.parent_span_is_remote, "the parent came through the queue");
    assert_eq!(mono_call.parent_span_id, delivery.span_context.span_id());
    assert_eq!(waiting.parent_span_id, delivery.span_context.span_id());
    assert_eq!(commit.parent_span_id, delivery.span_context.span_id());
    assert!(waiting.end_time <= mono_call.start_time && mono_call.end_time <= commit.start_time);

    assert_eq!(attribute(delivery, "account").as_deref(), Some(ACCOUNT));
    assert_eq!(attribute(delivery, "event").as_deref(), Some("mono.events.reauthorisation_required"));
    assert_eq!(attribute(mono_call, "http.response.status_code").as_deref(), Some("200"));
    assert!(attribute(commit, "batch.size").is_some_and(|size| size.parse::<u32>().is_ok_and(|n| n >= 1)));

    // No secret, token or body in any span of the trace, attributes or events.
    for span in spans.iter().filter(|s| s.span_context.trace_id() == trace) {
        let mut values: Vec<String> = span.attributes.iter().map(|kv| kv.value.to_string()).collect();
        for event in span.events.iter() {
            values.push(event.name.to_string());
            values.extend(event.attributes.iter().map(|kv| kv.value.to_string()));
        }
        for value in values {
            for secret in [WEBHOOK_SECRET, MONO_KEY, FIXTURE_TOKEN, "\"data\""] {
                assert!(!value.contains(secret), "span {} carries {secret:?}: {value}", span.name);
            }
        }
    }
}
