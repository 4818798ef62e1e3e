//! Retries reorder anything: an event received before the last one applied changes nothing.

use chrono::{Duration, Utc};
use sqlx::PgPool;
use wiremock::matchers::method;
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{ACCOUNT, TestWorld, body};

#[sqlx::test(migrations = "../migrations")]
async fn a_late_reauthorisation_required_never_reflags_a_reauthorised_account(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    // Mono must not even be asked for a token that would be thrown away.
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).expect(0).mount(&world.mono).await;
    world.start_worker().await;
    let t = Utc::now() - Duration::seconds(30);

    // Received in this order: required (t), reauthorized (t+1s); delivered in the other order.
    let reauthorized = world
        .publish_received_at(&body("mono.events.account_reauthorized", ACCOUNT), t + Duration::seconds(1))
        .await;
    assert_eq!(world.settled(&reauthorized).await.status, "processed");
    let required = world.publish_received_at(&body("mono.events.reauthorisation_required", ACCOUNT), t).await;

    assert_eq!(world.settled(&required).await.status, "stale");
    let account = world.account(ACCOUNT).await;
    assert!(!account.reauth_required);
    assert!(!account.has_reauth_token);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_late_account_update_does_not_overwrite_newer_data(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;
    let t = Utc::now() - Duration::seconds(30);
    let update = |status: &str| {
        serde_json::to_vec(&serde_json::json!({
            "event": "mono.events.account_updated",
            "data": { "meta": { "data_status": status }, "account": { "_id": ACCOUNT } }
        }))
        .unwrap()
    };

    let newer = world.publish_received_at(&update("AVAILABLE"), t + Duration::seconds(5)).await;
    assert_eq!(world.settled(&newer).await.status, "processed");
    let older = world.publish_received_at(&update("PROCESSING"), t).await;

    assert_eq!(world.settled(&older).await.status, "stale");
    assert_eq!(world.account(ACCOUNT).await.data_status.as_deref(), Some("AVAILABLE"));
}

#[sqlx::test(migrations = "../migrations")]
async fn in_order_events_apply_in_order(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "second-flag").await;
    world.start_worker().await;
    let t = Utc::now() - Duration::seconds(30);

    let reauthorized = world.publish_received_at(&body("mono.events.account_reauthorized", ACCOUNT), t).await;
    world.settled(&reauthorized).await;
    // A new loss of access after the re-auth: flagged again.
    let required = world
        .publish_received_at(&body("mono.events.reauthorisation_required", ACCOUNT), t + Duration::seconds(1))
        .await;

    assert_eq!(world.settled(&required).await.status, "processed");
    assert!(world.account(ACCOUNT).await.reauth_required);
}

/// The worker's `monohook_worker_stamps_ahead_total`, 0 until it is first counted.
async fn stamps_ahead(world: &TestWorld) -> u64 {
    let metrics = world.metrics().await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("monohook_worker_stamps_ahead_total "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[sqlx::test(migrations = "../migrations")]
async fn a_stamp_far_ahead_of_the_workers_clock_is_parked_and_moves_no_guard(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "fresh").await;
    world.start_worker().await;

    // An ingest whose clock jumped an hour ahead, and a stamp at the end of time (a hand-published
    // message stamped in milliseconds): neither may order the account's events, nor panic a batch.
    let ahead = world
        .publish_received_at(
            &body("mono.events.account_reauthorized", ACCOUNT),
            Utc::now() + Duration::hours(1),
        )
        .await;
    let end_of_time = world
        .publish_received_at(
            &body("mono.events.account_reauthorized", "acct-far"),
            chrono::DateTime::<Utc>::MAX_UTC,
        )
        .await;
    shared::testing::eventually("the stamp an hour ahead is handled", crate::helpers::PATIENCE, || async {
        stamps_ahead(&world).await >= 1 || world.journal(&ahead).await.is_some()
    })
    .await;

    // A correct loss of access now is applied, not stale behind the stamp from the future.
    let required = world.publish(&body("mono.events.reauthorisation_required", ACCOUNT)).await;
    assert_eq!(world.settled(&required).await.status, "processed");
    let account = world.account(ACCOUNT).await;
    assert!(account.reauth_required && account.has_reauth_token);
    assert!(world.journal(&ahead).await.is_none(), "parked, not journaled");
    assert!(world.journal(&end_of_time).await.is_none(), "parked, not journaled");
    assert_eq!(world.dead_letter_count().await, 0, "a clock of ours dead-letters nothing");
    shared::testing::eventually("both stamps are counted as ahead", crate::helpers::PATIENCE, || async {
        stamps_ahead(&world).await >= 2
    })
    .await;
    world.stop_workers().await;
}
