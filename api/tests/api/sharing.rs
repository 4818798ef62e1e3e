//! Requests for one account's fresh token share one call to Mono, its success and its failure, within
//! a process and across processes; every wait is bounded, and a request whose client went away makes
//! no call (issue 20, point 2).

use sqlx::PgPool;
use std::time::Duration;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{MOBILE_KEY, Seed, json, mono_issues, spawn_app_with};

/// One call to Mono, no retries: every call the test sees was a request's own.
const NO_RETRIES: &[&str] = &["--mono-retry-budget-ms", "0"];

fn mono_fails_after(delay_ms: u64) -> Mock {
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_delay(Duration::from_millis(delay_ms)))
}

async fn calls(mono: &MockServer) -> usize {
    mono.received_requests().await.unwrap().len()
}

async fn until_mono_is_asked(mono: &MockServer) {
    while calls(mono).await == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Holds the account's cross-process lock, as another process refreshing it would.
async fn hold_lock(pool: &PgPool, account: &str) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('monohook.reauth-token:' || $1, 0))")
        .bind(account)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

#[sqlx::test(migrations = "../migrations")]
async fn requests_waiting_behind_a_failing_call_share_its_failure_instead_of_calling_again(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_fails_after(300).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, NO_RETRIES).await;

    let answers = futures_util::future::join_all((0..8).map(|_| app.reauth_token("acct-1"))).await;

    for response in answers {
        assert_eq!(response.status().as_u16(), 503);
        assert_eq!(json(response).await["error"], "mono_unavailable");
    }
    assert_eq!(calls(&mono).await, 1, "the 7 waiting requests took the first one's failure");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_request_in_another_process_behind_a_failing_call_does_not_call_again(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_fails_after(500).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let first = spawn_app_with(pool.clone(), &mono, NO_RETRIES).await;
    let second = spawn_app_with(pool.clone(), &mono, NO_RETRIES).await;

    let (a, b) = tokio::join!(first.reauth_token("acct-1"), async {
        // The first process holds the lock and is waiting for Mono.
        until_mono_is_asked(&mono).await;
        second.reauth_token("acct-1").await
    });

    assert_eq!(a.status().as_u16(), 503);
    assert_eq!(b.status().as_u16(), 503);
    assert!(b.headers().contains_key("retry-after"));
    assert_eq!(calls(&mono).await, 1, "the second process took the first one's failure");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_lock_held_elsewhere_is_waited_for_only_until_the_deadline(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).expect(0).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, &["--token-deadline-ms", "500"]).await;
    let _holder = hold_lock(&pool, "acct-1").await;

    let answered = tokio::time::timeout(Duration::from_secs(5), app.reauth_token("acct-1")).await;

    let response = answered.expect("a request waiting for a lock that is never released must end");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(json(response).await["error"], "mono_unavailable");
    // Reads go on meanwhile.
    assert_eq!(app.get("/v1/accounts/acct-1").await.status().as_u16(), 200);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_request_whose_client_went_away_makes_no_mono_call(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("busy", "for-busy", 1000).expect(1).mount(&mono).await;
    mono_issues("left", "for-nobody", 0).expect(0).mount(&mono).await;
    Seed::flagged("busy").insert(&pool).await;
    Seed::flagged("left").insert(&pool).await;
    // One call to Mono at a time: "left" waits for "busy"'s slot.
    let app = spawn_app_with(pool.clone(), &mono, &["--mono-max-in-flight", "1"]).await;

    let (busy, gave_up) = tokio::join!(app.reauth_token("busy"), async {
        until_mono_is_asked(&mono).await;
        app.http
            .post(format!("{}/v1/accounts/left/reauth-token", app.address))
            .bearer_auth(MOBILE_KEY)
            .timeout(Duration::from_millis(300))
            .send()
            .await
    });

    assert!(gave_up.is_err_and(|e| e.is_timeout()), "the client gives up while waiting for a slot");
    assert_eq!(json(busy).await["token"], "for-busy");
    // The slot is free now: a request still alive would take it and call Mono at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls(&mono).await, 1, "nobody was waiting for a token for \"left\"");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_request_behind_a_holder_that_went_without_calling_calls_mono_itself(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("acct-1", "fresh-token", 0).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, NO_RETRIES).await;
    // Another process holds the lock, then lets it go without calling Mono (its client hung up, its
    // lock session ended): nothing failed, so the request waiting for it must not answer as if.
    let mut holder = hold_lock(&pool, "acct-1").await;

    let (answer, ()) = tokio::join!(app.reauth_token("acct-1"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query("SELECT pg_advisory_unlock(hashtextextended('monohook.reauth-token:' || $1, 0))")
            .bind("acct-1")
            .execute(&mut *holder)
            .await
            .unwrap();
    });

    assert_eq!(answer.status().as_u16(), 200, "nothing failed: the waiting request calls Mono");
    let body = json(answer).await;
    assert_eq!(body["token"], "fresh-token");
    assert_eq!(body["source"], "fresh");
}
