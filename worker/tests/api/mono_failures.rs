//! How the worker treats Mono's failures: transient ones are retried (in process, then through the
//! delayed-retry tiers), permanent ones are dead-lettered with Mono's message.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wiremock::matchers::{method, path};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

use crate::helpers::{ACCOUNT, PATIENCE, TestWorld, body};
use shared::testing::eventually;

const REAUTH: &str = "mono.events.reauthorisation_required";

fn reauthorise_path() -> wiremock::matchers::PathExactMatcher {
    path(format!("/accounts/{ACCOUNT}/reauthorise"))
}

#[sqlx::test(migrations = "../migrations")]
async fn three_500s_then_a_token_stores_the_token(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(3)
        .expect(3)
        .mount(&world.mono)
        .await;
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "after-500s" })))
        .expect(1)
        .mount(&world.mono)
        .await;
    world.start_worker().await;

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    let row = world.settled(&meta).await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.attempts, 1, "in-process retries are one attempt");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("after-500s"));
    assert!(world.account(ACCOUNT).await.reauth_required);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_400_is_dead_lettered_with_monos_message_and_changes_nothing(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(serde_json::json!({ "message": "This account can not be re-authorised." })),
        )
        .expect(1)
        .mount(&world.mono)
        .await;
    world.start_worker().await;

    let published = body(REAUTH, ACCOUNT);
    let meta = world.publish(&published).await;

    let dead = world.dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, published, "the dead letter keeps the body unchanged");
    assert_eq!(dead[0].id, meta.id.as_uuid());
    let reason = &dead[0].reason;
    assert!(reason.contains("This account can not be re-authorised."), "{reason}");
    assert!(reason.contains("400"), "{reason}");
    assert_eq!((dead[0].class.as_str(), dead[0].attempts), ("permanent", 1));

    let row = world.settled(&meta).await;
    assert_eq!(row.status, "dead");
    assert!(row.last_error.unwrap().contains("This account can not be re-authorised."));
    assert!(world.find_account(ACCOUNT).await.is_none(), "a dead-lettered event must change nothing");
}

/// Answers 429 with `Retry-After: 1` first, then a token, and records when each call came.
struct RateLimitedOnce {
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl Respond for RateLimitedOnce {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let mut calls = self.calls.lock().unwrap();
        calls.push(Instant::now());
        if calls.len() == 1 {
            ResponseTemplate::new(429).insert_header("retry-after", "1")
        } else {
            ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "after-429" }))
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_429_is_retried_no_sooner_than_retry_after(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(RateLimitedOnce { calls: calls.clone() })
        .mount(&world.mono)
        .await;
    world.start_worker().await;

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let waited = calls[1] - calls[0];
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}, before Retry-After");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("after-429"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_long_outage_moves_the_delivery_through_a_retry_tier_and_it_succeeds_later(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    // With no in-process budget, one failed call ends the first attempt.
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&world.mono)
        .await;
    world.mono_issues_token(ACCOUNT, "after-tier").await;
    world.start_worker_with(&["--mono-retry-budget-secs", "0"]).await;

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    let row = world.settled(&meta).await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.attempts, 2, "the second attempt came from retry tier 1");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("after-tier"));
    assert_eq!(world.dead_letter_count().await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_delivery_that_fails_through_every_tier_is_dead_lettered_as_exhausted(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(ResponseTemplate::new(502))
        .mount(&world.mono)
        .await;
    world.start_worker_with(&["--mono-retry-budget-secs", "0"]).await;

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    let dead = world.dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    // Attempt 1, then one attempt after each of the two tiers.
    assert_eq!((dead[0].class.as_str(), dead[0].attempts), ("exhausted", 3));
    assert_eq!(dead[0].data, body(REAUTH, ACCOUNT), "the dead letter keeps the body unchanged");
    let row = world.settled(&meta).await;
    assert_eq!(row.status, "dead");
    assert_eq!(row.attempts, 3);
    assert!(row.last_error.unwrap().contains("502"));
    assert!(world.find_account(ACCOUNT).await.is_none(), "a dead-lettered event must change nothing");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_mono_that_hangs_times_out_and_counts_as_transient(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .up_to_n_times(1)
        .mount(&world.mono)
        .await;
    world.mono_issues_token(ACCOUNT, "after-timeout").await;
    world.start_worker_with(&["--mono-timeout-ms", "300"]).await;

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("after-timeout"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_delivery_whose_retry_tier_was_deleted_is_not_stuck(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(ResponseTemplate::new(503))
        .mount(&world.mono)
        .await;
    world.start_worker_with(&["--mono-retry-budget-secs", "0"]).await;
    // An operator deleted the first retry tier: moving there fails.
    let tier = world.broker.topology.retry_queue(1);
    world.broker.channel.queue_delete(tier.as_str().into(), Default::default()).await.unwrap();

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    // The broker returns the copy; the worker holds the delivery, declares the tier again and moves
    // it there, so it goes through every tier as usual (never requeued into a poison loop).
    let row = world.settled(&meta).await;
    assert_eq!(row.status, "dead");
    let reason = row.last_error.unwrap();
    assert!(reason.starts_with("retries exhausted"), "{reason}");
}

/// Calls Mono received for `account`'s re-authorisation so far.
async fn calls_for(mono: &wiremock::MockServer, account: &str) -> usize {
    let path = format!("/accounts/{account}/reauthorise");
    mono.received_requests().await.unwrap_or_default().iter().filter(|r| r.url.path() == path).count()
}

#[sqlx::test(migrations = "../migrations")]
async fn one_account_mono_always_fails_is_dead_lettered_and_parks_nobody_else(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let sick = "sick-account-1";
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{sick}/reauthorise")))
        .respond_with(ResponseTemplate::new(500))
        .mount(&world.mono)
        .await;
    let healthy: Vec<String> = (0..5).map(|n| format!("healthy-account-{n}")).collect();
    for account in &healthy {
        Mock::given(method("POST"))
            .and(path(format!("/accounts/{account}/reauthorise")))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": account })))
            .expect(1)
            .mount(&world.mono)
            .await;
    }
    // The default breaker: 5 failures in a row open it. The sick account's first attempt alone
    // (2 s of in-process retries from 20 ms) makes that many calls.
    world.start_worker().await;

    let sick_meta = world.publish(&body(REAUTH, sick)).await;
    eventually("Mono failed the sick account 5 times", PATIENCE, || async {
        calls_for(&world.mono, sick).await >= 5
    })
    .await;
    let healthy_metas = {
        let mut metas = Vec::new();
        for account in &healthy {
            metas.push(world.publish(&body(REAUTH, account)).await);
        }
        metas
    };

    // The others are not parked behind the sick account (a park costs a retry tier and the
    // breaker's 5 s): each is applied at once, in its first attempt.
    eventually("every healthy account is processed on time", Duration::from_secs(3), || async {
        for meta in &healthy_metas {
            if world.journal(meta).await.is_none() {
                return false;
            }
        }
        true
    })
    .await;
    for (meta, account) in healthy_metas.iter().zip(&healthy) {
        let row = world.settled(meta).await;
        assert_eq!((row.status.as_str(), row.attempts), ("processed", 1), "{account}");
        assert_eq!(world.stored_token(account).await.as_deref(), Some(account.as_str()));
    }
    // The sick account's delivery spends its attempts (1, then one after each of the two tiers)
    // and is dead-lettered with its reason, not parked forever.
    let dead = world.dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].class.as_str(), dead[0].attempts), ("exhausted", 3));
    assert_eq!(dead[0].account_id.as_deref(), Some(sick));
    let row = world.settled(&sick_meta).await;
    assert_eq!((row.status.as_str(), row.attempts), ("dead", 3));
    let reason = row.last_error.unwrap();
    assert!(reason.contains("500"), "{reason}");
    assert!(world.find_account(sick).await.is_none(), "a dead-lettered event must change nothing");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_move_beside_an_older_dead_letter_queue_keeps_the_session(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    // The dead-letter queue as an earlier version declared it: without x-delivery-limit, so every
    // declaration of today's topology is refused on it (406).
    let dead = world.dead_queue();
    world.broker.channel.queue_delete(dead.as_str().into(), Default::default()).await.unwrap();
    let mut older = FieldTable::default();
    older.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    world
        .broker
        .channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            older,
        )
        .await
        .unwrap();
    Mock::given(method("POST"))
        .and(reauthorise_path())
        .respond_with(ResponseTemplate::new(503))
        .mount(&world.mono)
        .await;
    world.start_worker_with(&["--mono-retry-budget-secs", "0"]).await;
    let readyz = format!("http://{}/readyz", world.metrics_addrs[0]);
    eventually("the worker is ready", PATIENCE, || async {
        reqwest::get(&readyz).await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    // A move fails once (its tier is gone), so the worker declares the topology again.
    let tier = world.broker.topology.retry_queue(1);
    world.broker.channel.queue_delete(tier.as_str().into(), Default::default()).await.unwrap();

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    // Watched until the delivery has gone through every tier into the older dead-letter queue: the
    // refused declaration of that queue never costs the session (the consumer stays, the held
    // delivery is not returned).
    let deadline = Instant::now() + PATIENCE;
    let row = loop {
        let ready = reqwest::get(&readyz).await.unwrap();
        assert!(ready.status().is_success(), "the session was lost: {}", ready.text().await.unwrap());
        if let Some(row) = world.journal(&meta).await {
            break row;
        }
        assert!(Instant::now() < deadline, "the delivery was not settled in {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(row.status, "dead");
    assert!(row.last_error.unwrap().starts_with("retries exhausted"));
    assert_eq!(world.broker.depth(&tier).await, 0, "the tier was declared again and drained");
}
