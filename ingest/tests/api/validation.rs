use crate::helpers::{json, spawn_app};
use shared::testing::fixture;

#[tokio::test]
async fn each_malformed_body_gets_400_with_what_is_wrong_and_nothing_is_published() {
    let app = spawn_app().await;
    let cases = [
        ("bad/array_body.json", "body must be a JSON object"),
        ("bad/data_not_object.json", "`data` must be a JSON object"),
        ("bad/event_not_string.json", "`event` must be a string"),
        ("bad/missing_event.json", "`event` is missing"),
        ("bad/not_utf8.bin", "body is not valid JSON"),
        ("bad/truncated.json", "body is not valid JSON"),
    ];

    for (file, detail) in cases {
        let response = app.post_webhook(fixture(file)).await;
        assert_eq!(response.status().as_u16(), 400, "{file}");
        let body = json(response).await;
        assert_eq!(body["error"], "invalid_payload", "{file}");
        let got = body["detail"].as_str().unwrap_or_default();
        assert!(got.starts_with(detail), "{file}: detail {got:?} should start with {detail:?}");
    }
    assert_eq!(app.queue_depth().await, 0);
}

#[tokio::test]
async fn an_empty_body_gets_400() {
    let app = spawn_app().await;

    let response = app.post_webhook(Vec::new()).await;

    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(app.queue_depth().await, 0);
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_and_nothing_is_published() {
    let app = spawn_app().await;
    let padding = "x".repeat(262_144);
    let body = format!(r#"{{"event":"mono.events.account_updated","data":{{"pad":"{padding}"}}}}"#);

    let response = app.post_webhook(body).await;

    assert_eq!(response.status().as_u16(), 413);
    assert_eq!(json(response).await["error"], "payload_too_large");
    assert_eq!(app.queue_depth().await, 0);
}

#[tokio::test]
async fn a_body_just_under_the_limit_is_accepted() {
    let app = spawn_app().await;
    let skeleton = r#"{"event":"mono.events.account_updated","data":{"pad":""}}"#;
    let padding = "x".repeat(262_144 - skeleton.len());
    let body = format!(r#"{{"event":"mono.events.account_updated","data":{{"pad":"{padding}"}}}}"#);
    assert_eq!(body.len(), 262_144);

    let response = app.post_webhook(body).await;

    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn unknown_event_names_are_accepted() {
    let app = spawn_app().await;

    let response = app.post_webhook(fixture("unknown_event.json")).await;

    assert_eq!(response.status().as_u16(), 200);
    let queued = app.queued().await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].routing_key.as_str(), "mono.events.new_transaction");
}

#[tokio::test]
async fn the_body_decides_not_the_content_type() {
    let app = spawn_app().await;
    let url = format!("{}/webhooks/mono", app.address);
    let send = |content_type: &'static str, body: Vec<u8>| {
        app.http
            .post(&url)
            .header("mono-webhook-secret", crate::helpers::SECRET)
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    let good_as_text = send("text/plain", fixture("account_updated.json")).await.unwrap();
    let bad_as_json = send("application/json", fixture("bad/truncated.json")).await.unwrap();

    assert_eq!(good_as_text.status().as_u16(), 200);
    assert_eq!(bad_as_json.status().as_u16(), 400);
}

#[tokio::test]
async fn other_methods_on_the_webhook_path_get_405() {
    let app = spawn_app().await;

    let response = app.get("/webhooks/mono").await;

    assert_eq!(response.status().as_u16(), 405);
}
