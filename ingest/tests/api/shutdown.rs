use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::helpers::{SECRET, spawn_app};
use shared::testing::{eventually, fixture};

#[tokio::test]
async fn shutdown_under_load_lets_requests_finish_and_every_200_is_queued() {
    let mut app = spawn_app().await;
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let url = format!("{}/webhooks/mono", app.address);

    // Eight clients post back to back until the server stops answering them.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (http, url, accepted) = (app.http.clone(), url.clone(), accepted.clone());
            tokio::spawn(async move {
                loop {
                    let sent = http
                        .post(&url)
                        .header("mono-webhook-secret", SECRET)
                        .body(fixture("account_updated.json"))
                        .send()
                        .await;
                    let Ok(response) = sent else { return };
                    let status = response.status().as_u16();
                    assert!(status == 200 || status == 503, "unexpected status {status}");
                    if status != 200 {
                        return;
                    }
                    let body: serde_json::Value = response.json().await.unwrap();
                    accepted.lock().unwrap().insert(body["id"].as_str().unwrap().to_owned());
                }
            })
        })
        .collect();
    eventually("some webhooks are accepted", Duration::from_secs(10), || async {
        accepted.lock().unwrap().len() >= 50
    })
    .await;

    app.stop().await.expect("ingest did not stop cleanly");
    for client in clients {
        tokio::time::timeout(Duration::from_secs(10), client).await.expect("a client hung").unwrap();
    }

    let accepted = accepted.lock().unwrap().clone();
    let queued: HashSet<String> =
        app.queued().await.iter().map(|m| m.properties.message_id().as_ref().unwrap().to_string()).collect();
    let lost: Vec<_> = accepted.difference(&queued).collect();
    assert!(lost.is_empty(), "webhooks answered 200 but not queued: {lost:?}");
}

#[tokio::test]
async fn after_shutdown_no_new_connection_is_accepted() {
    let mut app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);

    app.stop().await.expect("ingest did not stop cleanly");

    let fresh = reqwest::Client::new();
    assert!(fresh.get(format!("{}/healthz", app.address)).send().await.is_err());
}

#[tokio::test]
async fn a_node_that_dies_during_the_drain_is_left_for_the_next_and_the_request_answered_200() {
    let mut proxied = crate::helpers::spawn_app_behind_proxy_with(|config| {
        config.publish_timeout_ms = 300;
        config.publish_deadline_ms = Some(shared::config::OptionalCount(Some(8_000)));
        config.shutdown_grace_secs = 15;
    })
    .await;
    assert_eq!(proxied.app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);

    // A request in flight on a node that stops answering, then the shutdown signal.
    proxied.proxy.stall();
    let request = {
        let (http, url) = (proxied.app.http.clone(), format!("{}/webhooks/mono", proxied.app.address));
        tokio::spawn(async move {
            let sent =
                http.post(url).header("mono-webhook-secret", SECRET).body(fixture("account_updated.json"));
            sent.send().await.map(|response| response.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxied.app.fire_shutdown();
    // The node dies during the drain and comes back: the request's copy must go to a new session.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxied.proxy.cut();
    proxied.proxy.restore().await;

    let status = tokio::time::timeout(Duration::from_secs(15), request).await.expect("answered").unwrap();
    assert_eq!(status.expect("the drain answers the request in flight"), 200);
    proxied.app.stop().await.expect("ingest stops after the drain");
    assert_eq!(proxied.app.queued().await.len(), 2, "both webhooks are queued");
}
