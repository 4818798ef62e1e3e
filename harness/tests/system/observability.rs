//! What an operator sees: one event's story in the logs of every process, and metrics that move.

use harness::system::{System, SystemConfig, metric_value};
use std::time::Duration;

use crate::story::{self, ACCOUNT};

#[tokio::test]
async fn grepping_a_delivery_id_over_all_logs_tells_its_whole_story() {
    let system = System::start(SystemConfig::default(), 2).await.unwrap();

    let story = story::play(&system).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let logs = system.all_logs();
    for id in &story.ids {
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .filter(|line| line.contains(id.as_str()))
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON log line: {line}")))
            .collect();
        let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
        assert!(messages.contains(&"webhook queued"), "ingest's line is missing for {id}: {messages:?}");
        assert!(
            messages.contains(&"delivery settled"),
            "the worker's line is missing for {id}: {messages:?}"
        );
        for line in &lines {
            // The id is a field of the line's span, not only text somewhere in it.
            assert_eq!(line["span"]["delivery_id"].as_str(), Some(id.as_str()), "{line}");
        }
    }
    system.shut_down().await.unwrap();
}

#[tokio::test]
async fn metrics_move_as_the_story_is_played() {
    let system = System::start(SystemConfig::default(), 1).await.unwrap();
    let rejected = reqwest::Client::new()
        .post(format!("{}/webhooks/mono", system.ingest_url()))
        .header("mono-webhook-secret", "wrong")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status().as_u16(), 401);

    story::play(&system).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let ingest = system.ingest_metrics().await.unwrap();
    let requests = |outcome: &str| {
        metric_value(&ingest, "monohook_ingest_requests_total", &[&format!("outcome=\"{outcome}\"")])
    };
    assert_eq!(requests("accepted"), Some(3.0), "{ingest}");
    assert_eq!(requests("unauthorized"), Some(1.0));
    assert_eq!(requests("unavailable"), Some(0.0), "every outcome exists from the start");
    assert_eq!(metric_value(&ingest, "monohook_ingest_publish_confirm_seconds_count", &[]), Some(3.0));
    assert_eq!(metric_value(&ingest, "monohook_ingest_broker_connected", &[]), Some(1.0));
    assert_eq!(metric_value(&ingest, "monohook_ingest_requests_in_flight", &[]), Some(0.0));

    let worker = system.worker_metrics(0).await.unwrap();
    let deliveries = |event: &str| {
        metric_value(
            &worker,
            "monohook_worker_deliveries_total",
            &[&format!("event=\"{event}\""), "outcome=\"processed\""],
        )
    };
    assert_eq!(deliveries("reauthorisation_required"), Some(1.0), "{worker}");
    assert_eq!(deliveries("account_reauthorized"), Some(1.0));
    assert_eq!(deliveries("account_updated"), Some(1.0));
    assert_eq!(
        metric_value(&worker, "monohook_worker_mono_request_seconds_count", &["status_class=\"2xx\""]),
        Some(1.0)
    );
    assert_eq!(metric_value(&worker, "monohook_worker_end_to_end_lag_seconds_count", &[]), Some(3.0));
    assert_eq!(metric_value(&worker, "monohook_worker_mono_circuit_state", &[]), Some(0.0));
    assert_eq!(metric_value(&worker, "monohook_worker_broker_connected", &[]), Some(1.0));
    assert_eq!(metric_value(&worker, "monohook_worker_database_up", &[]), Some(1.0));
    assert_eq!(metric_value(&worker, "monohook_queue_messages", &["queue=\"work\""]), Some(0.0));
    assert_eq!(metric_value(&worker, "monohook_queue_consumers", &["queue=\"work\""]), Some(1.0));
    assert!(metric_value(&worker, "monohook_queue_messages", &["queue=\"dead\""]).is_some());
    let _ = ACCOUNT;
    system.shut_down().await.unwrap();
}

#[tokio::test]
async fn worker_readiness_reports_each_dependency() {
    let system = System::start(SystemConfig::default(), 1).await.unwrap();
    let port = system.workers[0].1;

    let ready: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.unwrap().json().await.unwrap();

    assert_eq!(
        ready,
        serde_json::json!({
            "status": "ready", "database": "up", "broker": "connected", "consumer": "alive", "mono_circuit": "closed",
            "mono_key": "accepted", "mono_refusing_alike": null
        })
    );
    system.shut_down().await.unwrap();
}
