//! `POST /v1/accounts/{id}/reauth-token`: every answer, stored against fresh tokens, single flight
//! within a process and across processes, and the record of who got a token.

use chrono::{Duration, Utc};
use sqlx::PgPool;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{Seed, WEB_KEY, issued_ago, json, mono_issues, spawn_app, spawn_app_with, stored_token};

#[sqlx::test(migrations = "../migrations")]
async fn a_stored_token_with_time_left_is_served_without_calling_mono(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).expect(0).mount(&mono).await;
    Seed::flagged("acct-1").with_token("stored-token", issued_ago(1)).insert(&pool).await;
    let app = spawn_app(pool.clone(), &mono).await;

    let response = app.reauth_token_with("acct-1", WEB_KEY).await;

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body = json(response).await;
    assert_eq!(body["token"], "stored-token");
    assert_eq!(body["source"], "stored");
    let (label, source): (String, String) =
        sqlx::query_as("SELECT key_label, source FROM token_issuances WHERE account_id = 'acct-1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((label.as_str(), source.as_str()), ("web", "stored"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_token_about_to_expire_is_replaced_by_a_fresh_one_from_mono(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("acct-1", "fresh-token", 0).expect(1).mount(&mono).await;
    // Issued 9 minutes ago: one minute left, less than TOKEN_MIN_REMAINING_SECS (120).
    Seed::flagged("acct-1").with_token("old-token", issued_ago(9)).insert(&pool).await;
    let app = spawn_app(pool.clone(), &mono).await;

    let body = json(app.reauth_token("acct-1").await).await;

    assert_eq!(body["token"], "fresh-token");
    assert_eq!(body["source"], "fresh");
    let expires: chrono::DateTime<Utc> = body["expires_at"].as_str().unwrap().parse().unwrap();
    assert!(expires > Utc::now() + Duration::minutes(9), "{expires}");
    assert_eq!(stored_token(&pool, "acct-1").await.as_deref(), Some("fresh-token"));
    // The next request is served the stored one.
    assert_eq!(json(app.reauth_token("acct-1").await).await["source"], "stored");
    let sources: Vec<String> =
        sqlx::query_scalar("SELECT source FROM token_issuances ORDER BY id").fetch_all(&pool).await.unwrap();
    assert_eq!(sources, ["fresh", "stored"]);
    let metrics = app.http.get(&app.metrics).send().await.unwrap().text().await.unwrap();
    // The recorder is per process, and other tests of this binary hand out fresh tokens too.
    let fresh_served = metrics
        .lines()
        .find_map(|line| line.strip_prefix("monohook_api_tokens_served_total{source=\"fresh\"} "))
        .and_then(|count| count.parse::<u64>().ok());
    assert!(fresh_served.is_some_and(|count| count >= 1), "{metrics}");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_fresh_token_never_expires_later_than_mono_s_even_when_mono_is_slow(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("acct-1", "slow-token", 600).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app(pool, &mono).await;
    let asked = Utc::now();

    let body = json(app.reauth_token("acct-1").await).await;

    // Mono issued it at some point during its 600 ms: only the time it was asked bounds its expiry.
    let expires: chrono::DateTime<Utc> = body["expires_at"].as_str().unwrap().parse().unwrap();
    let late = expires - (asked + Duration::minutes(10));
    assert!(late < Duration::milliseconds(300), "expires_at is {late} later than Mono's can be");
}

#[sqlx::test(migrations = "../migrations")]
async fn an_account_that_needs_nothing_is_unlinked_or_missing_gets_its_answer(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).expect(0).mount(&mono).await;
    Seed { reauth_required: false, ..Seed::flagged("fine") }.insert(&pool).await;
    Seed { unlinked: true, ..Seed::flagged("gone") }.insert(&pool).await;
    let app = spawn_app(pool.clone(), &mono).await;

    for (account, status, error) in
        [("fine", 409, "reauth_not_required"), ("gone", 409, "account_unlinked"), ("nope", 404, "not_found")]
    {
        let response = app.reauth_token(account).await;
        assert_eq!(response.status().as_u16(), status, "{account}");
        assert_eq!(json(response).await, serde_json::json!({ "error": error }), "{account}");
    }
    let issued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM token_issuances").fetch_one(&pool).await.unwrap();
    assert_eq!(issued, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn mono_refusing_the_account_is_422_remembered_for_a_while_without_asking_mono_again(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(serde_json::json!({ "message": "This account can not be re-authorised." })),
        )
        .expect(2)
        .mount(&mono)
        .await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &["--mono-refusal-memory-secs", "1"]).await;
    let refused =
        serde_json::json!({ "error": "mono_refused", "detail": "This account can not be re-authorised." });

    // The first asks Mono; the app retrying at once is answered from memory.
    for _ in 0..3 {
        let response = app.reauth_token("acct-1").await;
        assert_eq!(response.status().as_u16(), 422);
        assert_eq!(json(response).await, refused);
    }
    assert_eq!(mono.received_requests().await.unwrap().len(), 1, "Mono was asked once");
    // Once the memory lapses, Mono is asked again (the second of the two calls expected).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let response = app.reauth_token("acct-1").await;
    assert_eq!(response.status().as_u16(), 422);
}

#[sqlx::test(migrations = "../migrations")]
async fn mono_unavailable_or_refusing_our_key_is_503_with_retry_after(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(100)
        .mount(&mono)
        .await;
    Seed::flagged("acct-1").insert(&pool).await;
    Seed::flagged("acct-2").insert(&pool).await;
    let app = spawn_app(pool, &mono).await;

    let response = app.reauth_token("acct-1").await;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(json(response).await["error"], "mono_unavailable");

    mono.reset().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(serde_json::json!({ "message": "Invalid secret key" })),
        )
        .mount(&mono)
        .await;
    // A refused key is monohook's outage, not the account's: 503, never 502.
    let response = app.reauth_token("acct-2").await;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
}

#[sqlx::test(migrations = "../migrations")]
async fn while_mono_is_unavailable_a_stored_token_above_the_floor_is_served_instead_of_503(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&mono).await;
    // One minute left: under TOKEN_MIN_REMAINING_SECS (120), above the 30 s floor.
    Seed::flagged("acct-1").with_token("still-works", issued_ago(9)).insert(&pool).await;
    // 15 s left: under the floor.
    Seed::flagged("acct-2")
        .with_token("nearly-gone", Utc::now() - Duration::seconds(585))
        .insert(&pool)
        .await;
    let app = spawn_app(pool.clone(), &mono).await;

    let response = app.reauth_token("acct-1").await;
    assert_eq!(response.status().as_u16(), 200);
    let body = json(response).await;
    assert_eq!(body["token"], "still-works");
    assert_eq!(body["source"], "stored");
    let expires: chrono::DateTime<Utc> = body["expires_at"].as_str().unwrap().parse().unwrap();
    assert!(expires > Utc::now() + Duration::seconds(30) && expires < Utc::now() + Duration::seconds(61));

    let response = app.reauth_token("acct-2").await;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(json(response).await["error"], "mono_unavailable");
    let recorded: Vec<(String, String)> =
        sqlx::query_as("SELECT account_id, source FROM token_issuances ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(recorded, [("acct-1".to_owned(), "stored".to_owned())]);
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_requests_make_one_mono_call_and_get_the_same_token(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("acct-1", "one-call", 300).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app(pool.clone(), &mono).await;

    let answers = futures_util::future::join_all((0..8).map(|_| app.reauth_token("acct-1"))).await;

    for response in answers {
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(json(response).await["token"], "one-call");
    }
    let issued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM token_issuances").fetch_one(&pool).await.unwrap();
    assert_eq!(issued, 8, "every token handed out is recorded");
}

#[sqlx::test(migrations = "../migrations")]
async fn two_processes_make_one_mono_call_between_them(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("acct-1", "one-call", 300).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    // Two independent APIs (their own Mono client, breaker and locks), as two processes are.
    let first = spawn_app(pool.clone(), &mono).await;
    let second = spawn_app(pool.clone(), &mono).await;

    let (a, b) = tokio::join!(first.reauth_token("acct-1"), second.reauth_token("acct-1"));

    assert_eq!(json(a).await["token"], "one-call");
    assert_eq!(json(b).await["token"], "one-call");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_fresh_token_never_overwrites_one_issued_later(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("acct-1", "from-the-api", 500).mount(&mono).await;
    Seed::flagged("acct-1").with_token("expiring", issued_ago(9)).insert(&pool).await;
    let app = spawn_app(pool.clone(), &mono).await;

    let request = asked_in_background(&app, "acct-1");
    // While Mono answers, the worker stores a token Mono issued after the API's.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    sqlx::query(
        "UPDATE accounts SET reauth_token = 'from-the-worker', reauth_token_issued_at = now() + interval '1 second',
                             reauth_token_expires_at = now() + interval '601 seconds' WHERE id = 'acct-1'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let response = request.await.unwrap();

    assert_eq!(json(response).await["token"], "from-the-worker", "the later-issued token is handed out");
    assert_eq!(stored_token(&pool, "acct-1").await.as_deref(), Some("from-the-worker"));
}

#[sqlx::test(migrations = "../migrations")]
async fn an_account_reauthorised_while_mono_answers_gets_409_and_no_token_is_stored(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("acct-1", "too-late", 500).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app(pool.clone(), &mono).await;

    let request = asked_in_background(&app, "acct-1");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    sqlx::query("UPDATE accounts SET reauth_required = false WHERE id = 'acct-1'")
        .execute(&pool)
        .await
        .unwrap();
    let response = request.await.unwrap();

    assert_eq!(response.status().as_u16(), 409);
    assert_eq!(json(response).await["error"], "reauth_not_required");
    assert_eq!(stored_token(&pool, "acct-1").await, None);
}

/// A token request under way while the test changes the account.
fn asked_in_background(
    app: &crate::helpers::TestApp,
    account: &str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let http = app.http.clone();
    let url = format!("{}/v1/accounts/{account}/reauth-token", app.address);
    tokio::spawn(async move { http.post(url).bearer_auth(crate::helpers::MOBILE_KEY).send().await.unwrap() })
}
