use crate::helpers::{SECRET, json, spawn_app, spawn_app_with};
use shared::testing::fixture;

#[tokio::test]
async fn missing_secret_is_rejected_and_nothing_is_published() {
    let app = spawn_app().await;

    let response = app.post_webhook_with_secret(fixture("reauthorisation_required.json"), None).await;

    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(json(response).await, serde_json::json!({ "error": "unauthorized" }));
    assert_eq!(app.queue_depth().await, 0);
}

#[tokio::test]
async fn wrong_secret_is_rejected_and_nothing_is_published() {
    let app = spawn_app().await;

    for wrong in ["", "test-webhook-secre", "test-webhook-secret-2", "TEST-WEBHOOK-SECRET"] {
        let response =
            app.post_webhook_with_secret(fixture("reauthorisation_required.json"), Some(wrong)).await;
        assert_eq!(response.status().as_u16(), 401, "secret {wrong:?}");
    }
    assert_eq!(app.queue_depth().await, 0);
}

#[tokio::test]
async fn unauthenticated_requests_are_rejected_before_the_body_is_judged() {
    let app = spawn_app().await;

    let response = app.post_webhook_with_secret(fixture("bad/truncated.json"), Some("wrong")).await;

    assert_eq!(response.status().as_u16(), 401);
}

#[tokio::test]
async fn every_configured_secret_is_accepted_during_a_rotation() {
    let app = spawn_app_with(|config| {
        config.mono_webhook_secret = format!("{SECRET},next-secret").parse().unwrap();
    })
    .await;

    for secret in [SECRET, "next-secret"] {
        let response = app.post_webhook_with_secret(fixture("account_updated.json"), Some(secret)).await;
        assert_eq!(response.status().as_u16(), 200, "secret {secret}");
    }
    assert_eq!(app.queue_depth().await, 2);
}
