//! The api recovers by itself (issue 28): once its Mono breaker has opened, the open period ends,
//! one request probes Mono, and its success closes the breaker again, for tokens and links alike.
//! `/readyz` says when Mono is unavailable to the api.

use sqlx::PgPool;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{Seed, TestApp, json, mono_issues, spawn_app_with};
use crate::reauth_link::{ask_link, mono_links};

/// The breaker's open period in these tests.
const OPEN_MS: u64 = 200;

async fn readyz(app: &TestApp) -> serde_json::Value {
    let ready = app.http.get(format!("{}/readyz", app.address)).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "Mono's state never takes the api out of service");
    json(ready).await
}

/// Mono refuses our key once (401), which opens the breaker at once.
async fn mono_refuses_our_key_once(mono: &MockServer) {
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(401)).up_to_n_times(1).mount(mono).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn after_a_refused_key_the_breaker_closes_again_and_fresh_tokens_flow(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_refuses_our_key_once(&mono).await;
    mono_issues("acct-1", "fresh-token", 0).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &["--mono-circuit-open-ms", &OPEN_MS.to_string()]).await;

    let refused = app.reauth_token("acct-1").await;
    assert_eq!(refused.status().as_u16(), 503);
    let ready = readyz(&app).await;
    assert_eq!((ready["mono"].as_str(), ready["mono_circuit"].as_str()), (Some("unavailable"), Some("open")));

    tokio::time::sleep(Duration::from_millis(OPEN_MS + 50)).await;
    let probe = app.reauth_token("acct-1").await;

    assert_eq!(probe.status().as_u16(), 200, "the open period is over: this request probes Mono");
    let body = json(probe).await;
    assert_eq!((body["token"].as_str(), body["source"].as_str()), (Some("fresh-token"), Some("fresh")));
    let ready = readyz(&app).await;
    assert_eq!((ready["mono"].as_str(), ready["mono_circuit"].as_str()), (Some("available"), Some("closed")));
}

#[sqlx::test(migrations = "../migrations")]
async fn after_a_refused_key_the_breaker_closes_again_and_links_flow(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_refuses_our_key_once(&mono).await;
    mono_links("acct-1", "https://link.mono.co/RI1", 0).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &["--mono-circuit-open-ms", &OPEN_MS.to_string()]).await;

    assert_eq!(ask_link(&app, "acct-1", None).await.status().as_u16(), 503);

    tokio::time::sleep(Duration::from_millis(OPEN_MS + 50)).await;
    let probe = ask_link(&app, "acct-1", None).await;

    assert_eq!(probe.status().as_u16(), 200, "the open period is over: this request probes Mono");
    assert_eq!(json(probe).await["url"], "https://link.mono.co/RI1");
    assert_eq!(readyz(&app).await["mono_circuit"], "closed");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_429_with_retry_after_zero_does_not_silence_the_api(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/accounts/acct-1/reauthorise"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "0"))
        .up_to_n_times(1)
        .mount(&mono)
        .await;
    mono_issues("acct-1", "fresh-token", 0).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &["--mono-circuit-open-ms", &OPEN_MS.to_string()]).await;

    let first = app.reauth_token("acct-1").await.status().as_u16();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = app.reauth_token("acct-1").await;

    // The first request may retry within its budget and get the token itself; either way, Mono's
    // "wait 0 s" never leaves the api answering 503 afterwards.
    assert!(matches!(first, 200 | 503), "{first}");
    assert_eq!(second.status().as_u16(), 200);
}
