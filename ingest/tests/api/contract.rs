//! The OpenAPI document served at /openapi.json agrees with the routes: every documented operation
//! exists, nothing else does, and the webhook's answers are the documented ones.

use std::collections::BTreeSet;

use crate::helpers::{json, spawn_app};

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

#[tokio::test]
async fn the_served_document_is_the_contract_and_matches_the_routes() {
    let app = spawn_app().await;
    let spec = json(app.get("/openapi.json").await).await;
    assert_eq!(spec["openapi"], "3.1.0");

    let mut documented = BTreeSet::new();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for method in METHODS {
            let status = app
                .http
                .request(method.to_uppercase().parse().unwrap(), format!("{}{path}", app.address))
                .header("mono-webhook-secret", crate::helpers::SECRET)
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            if operations.get(method).is_some() {
                documented.insert(format!("{method} {path}"));
                assert!(status != 404 && status != 405, "{method} {path} is documented but answers {status}");
            } else {
                assert_eq!(status, 405, "{method} {path} is not documented but answers {status}");
            }
        }
    }
    assert_eq!(
        documented,
        BTreeSet::from(
            ["post /webhooks/mono", "get /healthz", "get /readyz", "get /openapi.json"].map(String::from)
        )
    );
    assert_eq!(app.get("/nowhere").await.status().as_u16(), 404);
}

#[tokio::test]
async fn every_answer_of_the_webhook_is_documented() {
    let app = spawn_app().await;
    let spec = json(app.get("/openapi.json").await).await;
    let documented: BTreeSet<String> =
        spec["paths"]["/webhooks/mono"]["post"]["responses"].as_object().unwrap().keys().cloned().collect();

    // The answers the tests of this crate provoke (401, 400, 413, 408 and 503 elsewhere too).
    let answers = [
        app.post_webhook(shared::testing::fixture("account_updated.json")).await.status(),
        app.post_webhook(shared::testing::fixture("bad/truncated.json")).await.status(),
        app.post_webhook_with_secret("{}", Some("wrong")).await.status(),
        app.post_webhook(vec![b'x'; 300_000]).await.status(),
    ];
    for status in answers {
        assert!(documented.contains(status.as_str()), "{status} is not documented");
    }
    for status in ["200", "400", "401", "408", "413", "503"] {
        assert!(documented.contains(status), "{status} is missing from the document");
    }
}

#[tokio::test]
async fn metrics_are_served_on_their_own_address_and_not_on_the_webhook_port() {
    let app = spawn_app().await;
    app.post_webhook(shared::testing::fixture("account_updated.json")).await;

    assert_eq!(app.get("/metrics").await.status().as_u16(), 404, "the public port serves no metrics");
    let metrics = app.http.get(&app.metrics).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("monohook_ingest_requests_total{outcome=\"accepted\"}"), "{metrics}");
}
