use std::time::{Duration, Instant};

use crate::helpers::{json, spawn_app, spawn_app_behind_proxy};
use ingest::config::IngestConfig;
use ingest::startup::Application;
use shared::testing::{eventually, fixture};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn health_and_readiness_report_ok_with_a_connected_broker() {
    let app = spawn_app().await;

    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 200);
    assert_eq!(json(ready).await["status"], "ready");
}

#[tokio::test]
async fn broker_down_gives_a_fast_503_and_ingest_recovers_by_itself() {
    let proxied = spawn_app_behind_proxy().await;
    let app = &proxied.app;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);

    proxied.proxy.cut();
    eventually("readyz reports the broker down", Duration::from_secs(5), || async {
        app.get("/readyz").await.status().as_u16() == 503
    })
    .await;
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200, "the process itself is fine");

    let started = Instant::now();
    let response = app.post_webhook(fixture("account_updated.json")).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(elapsed < Duration::from_secs(1), "503 took {elapsed:?}");

    proxied.proxy.restore().await;
    eventually("ingest reconnects", Duration::from_secs(15), || async {
        app.get("/readyz").await.status().as_u16() == 200
    })
    .await;
    let response = app.post_webhook(fixture("account_updated.json")).await;
    assert_eq!(response.status().as_u16(), 200);
    // The first and the last webhook are queued; the one answered 503 is not.
    assert_eq!(app.queued().await.len(), 2);
}

#[tokio::test]
async fn a_broker_that_stops_answering_gives_503_within_the_publish_timeout() {
    let proxy = shared::testing::TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = crate::helpers::proxied_amqp_url(&proxy);
    let app = crate::helpers::spawn_app_with(|config| {
        config.broker.amqp_url = url.into();
        config.publish_timeout_ms = 500;
    })
    .await;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);

    // Connections stay open but nothing comes back: no error, no confirm.
    proxy.stall();
    let started = Instant::now();
    let response = app.post_webhook(fixture("account_updated.json")).await;
    let elapsed = started.elapsed();

    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(elapsed < Duration::from_secs(1), "503 took {elapsed:?}");
}

#[tokio::test]
async fn start_fails_fast_with_one_clear_line_when_the_broker_is_unreachable() {
    use clap::Parser;
    let config = IngestConfig::parse_from([
        "ingest",
        "--mono-webhook-secret",
        "s",
        "--listen-addr",
        "127.0.0.1:0",
        "--amqp-url",
        "amqp://guest:hunter2@127.0.0.1:1/%2f",
    ]);

    let error = match Application::build(config, CancellationToken::new()).await {
        Ok(_) => panic!("ingest started without a broker"),
        Err(error) => format!("{error:#}"),
    };

    assert!(error.starts_with("cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");
}
