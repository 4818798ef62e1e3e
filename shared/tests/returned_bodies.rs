//! lapin logs a message the broker returned (an unroutable publish) at WARN with its `Debug` form,
//! body and all; a webhook's body is bank data. Under the default `RUST_LOG`, and under `debug`, that
//! line never reaches the logs, while lapin's other warnings still do. (A binary of its own: lapin
//! logs from its I/O thread, so the subscriber must be the process-wide one.)

use clap::Args;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use std::sync::{Arc, Mutex};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use shared::config::{LogFormat, TelemetryArgs};
use shared::telemetry;

/// What the log layer wrote.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// `RUST_LOG`'s default as `--help` states it, whatever this test process's environment says.
fn default_log_filter() -> String {
    let command = TelemetryArgs::augment_args(clap::Command::new("any"));
    let argument = command.get_arguments().find(|a| a.get_id() == "log_filter").expect("a log filter");
    argument.get_default_values()[0].to_str().expect("utf-8").to_owned()
}

/// Whether `logs` hold `body`, as text or as lapin's `Debug` of its bytes (`[123, 34, ...]`).
fn holds(logs: &str, body: &str) -> bool {
    let bytes = format!("{:?}", body.as_bytes());
    logs.contains(body) || logs.contains(&bytes[1..bytes.len() - 1])
}

/// Publishes `body` mandatory to a routing key nothing is bound to, and waits until the broker
/// has returned it and confirmed (the return comes first, so lapin has logged by then).
async fn publish_unroutable(connection: &Connection, body: &str) {
    let channel = connection.create_channel().await.expect("a channel");
    channel.confirm_select(Default::default()).await.expect("confirms");
    let routing_key = format!("monohook-test-unroutable-{}", uuid::Uuid::new_v4());
    let confirm = channel
        .basic_publish(
            "amq.direct".into(),
            routing_key.as_str().into(),
            BasicPublishOptions { mandatory: true, immediate: false },
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("a confirm");
    assert!(matches!(confirm, Confirmation::Ack(Some(_))), "the broker returned the message: {confirm:?}");
    let _ = channel.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_message_never_puts_its_body_in_the_logs() {
    let captured = Captured::default();
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(EnvFilter::new("off"));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().json().with_writer(captured.clone()))
        .init();
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let connection = Connection::connect(&url, ConnectionProperties::default()).await.expect("RabbitMQ");

    // The control: a bare `info` lets lapin's line through, body included. Should lapin rename
    // its target, this fails rather than the rest passing for want of anything to filter.
    handle.reload(EnvFilter::new("info")).expect("reload");
    publish_unroutable(&connection, "control-body-7d1f").await;
    assert!(
        holds(&captured.text(), "control-body-7d1f"),
        "lapin no longer logs returned bodies under lapin::returned_messages: {}",
        captured.text()
    );

    for given in [default_log_filter(), "debug".to_owned()] {
        let args =
            TelemetryArgs { log_format: LogFormat::Json, log_filter: given.clone(), otlp_endpoint: None };
        handle.reload(telemetry::log_filter(&args).expect("a valid filter")).expect("reload");
        let body = format!("{{\"account\":\"bank-data-{}\"}}", uuid::Uuid::new_v4().simple());
        publish_unroutable(&connection, &body).await;
        let other = format!("another lapin warning under {given}");
        tracing::warn!(target: "lapin::channels", "{other}");
        let text = captured.text();
        assert!(!holds(&text, &body), "RUST_LOG={given}: a returned body reached the logs");
        assert!(text.contains(&other), "RUST_LOG={given}: lapin's other warnings must still be logged");
    }
    let _ = connection.close(200, "done".into()).await;
}
