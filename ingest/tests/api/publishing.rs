use futures_util::future::join_all;
use lapin::options::QueueDeleteOptions;
use sha2::{Digest, Sha256};
use std::collections::HashSet;

use crate::helpers::{json, spawn_app};
use shared::delivery::{HEADER_BODY_SHA256, HEADER_RECEIVED_AT, header_str};
use shared::testing::fixture;

#[tokio::test]
async fn an_accepted_webhook_is_queued_byte_for_byte_with_its_stamp() {
    let app = spawn_app().await;
    let body = fixture("account_updated.json");
    let before = chrono::Utc::now();

    let response = app.post_webhook(body.clone()).await;

    assert_eq!(response.status().as_u16(), 200);
    let id = json(response).await["id"].as_str().expect("no id").to_owned();
    let uuid = uuid::Uuid::parse_str(&id).expect("id is not a UUID");
    assert_eq!(uuid.get_version_num(), 7);

    let queued = app.queued().await;
    assert_eq!(queued.len(), 1);
    let message = &queued[0];
    assert_eq!(message.data, body, "the body must be published unchanged");
    assert_eq!(message.routing_key.as_str(), "mono.events.account_updated");
    let properties = &message.properties;
    assert_eq!(properties.message_id().as_ref().map(|m| m.as_str()), Some(id.as_str()));
    assert_eq!(properties.delivery_mode(), &Some(2), "must be persistent");
    let timestamp = properties.timestamp().expect("no AMQP timestamp");
    assert!(timestamp.abs_diff(before.timestamp() as u64) <= 2);
    let headers = properties.headers().as_ref().expect("no headers");
    let received_at = header_str(headers, HEADER_RECEIVED_AT).expect("no receive time header");
    let parsed = chrono::DateTime::parse_from_rfc3339(&received_at).expect("receive time is not RFC 3339");
    assert!(received_at.contains('.') && received_at.ends_with('Z'), "{received_at}");
    assert!((parsed.timestamp_millis() - before.timestamp_millis()).abs() < 5_000);
    assert_eq!(header_str(headers, HEADER_BODY_SHA256).unwrap(), hex::encode(Sha256::digest(&body)));
}

#[tokio::test]
async fn a_200_means_the_message_is_already_in_the_queue() {
    let app = spawn_app().await;

    for expected in 1..=5 {
        let response = app.post_webhook(fixture("reauthorisation_required.json")).await;
        assert_eq!(response.status().as_u16(), 200);
        // No waiting: the broker confirmed before ingest answered.
        assert_eq!(app.queue_depth().await, expected);
    }
}

#[tokio::test]
async fn concurrent_webhooks_are_all_confirmed_and_queued_once() {
    let app = spawn_app().await;
    let body = fixture("account_updated.json");

    let responses = join_all((0..200).map(|_| app.post_webhook(body.clone()))).await;

    let mut ids = HashSet::new();
    for response in responses {
        assert_eq!(response.status().as_u16(), 200);
        ids.insert(json(response).await["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 200);
    let queued: HashSet<String> =
        app.queued().await.iter().map(|m| m.properties.message_id().as_ref().unwrap().to_string()).collect();
    assert_eq!(queued, ids);
}

#[tokio::test]
async fn an_unroutable_publish_gets_503_not_200() {
    let app = spawn_app().await;
    // Without its queue the exchange routes nowhere: the broker returns the mandatory message.
    app.broker
        .channel
        .queue_delete(app.broker.topology.work_queue().as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();

    let response = app.post_webhook(fixture("account_updated.json")).await;

    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json(response).await, serde_json::json!({ "error": "unavailable" }));
}
