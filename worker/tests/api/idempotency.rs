//! Delivery is at least once: a redelivery (same id) or a duplicate (same body within the window)
//! must never have a second effect.

use sqlx::PgPool;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{ACCOUNT, TestWorld, body};

const REAUTH: &str = "mono.events.reauthorisation_required";

async fn mono_expects_one_call(world: &TestWorld) {
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{ACCOUNT}/reauthorise")))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "only-once" })))
        .expect(1)
        .mount(&world.mono)
        .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_redelivered_message_has_one_effect(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    mono_expects_one_call(&world).await;
    world.start_worker().await;
    let published = body(REAUTH, ACCOUNT);

    let meta = world.publish(&published).await;
    assert_eq!(world.settled(&meta).await.status, "processed");
    // The same delivery again, as the broker would hand it out after a lost ack.
    world.publish_meta(&published, &meta).await;
    let marker = world.publish(&body("mono.events.account_updated", "marker")).await;
    world.settled(&marker).await;

    assert_eq!(world.journal_count().await, 2, "one row for the delivery, one for the marker");
    assert_eq!(world.broker.depth(&world.broker.topology.work_queue()).await, 0, "the redelivery was acked");
    world.stop_workers().await;
    // Dropping the mock server verifies Mono was called exactly once.
}

#[sqlx::test(migrations = "../migrations")]
async fn the_same_body_within_the_window_is_a_duplicate_and_changes_nothing(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    mono_expects_one_call(&world).await;
    world.start_worker().await;
    let published = body(REAUTH, ACCOUNT);

    let first = world.publish(&published).await;
    assert_eq!(world.settled(&first).await.status, "processed");
    let before = world.account(ACCOUNT).await;
    let second = world.publish(&published).await;

    assert_eq!(world.settled(&second).await.status, "duplicate");
    // Nothing the app reads changes (the re-auth guard moves up to the copy: see batch::decide).
    let after = world.account(ACCOUNT).await;
    assert!(after.reauth_required);
    assert_eq!(after.reauth_token_issued_at, before.reauth_token_issued_at);
    assert_eq!(after.reauthorized_at, before.reauthorized_at);
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("only-once"));
}

#[sqlx::test(migrations = "../migrations")]
async fn the_same_body_after_the_window_is_a_new_event(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker_with(&["--dedup-window-secs", "60"]).await;
    let published = body("mono.events.account_updated", ACCOUNT);
    let long_ago = chrono::Utc::now() - chrono::Duration::minutes(10);

    let first = world.publish_received_at(&published, long_ago).await;
    assert_eq!(world.settled(&first).await.status, "processed");
    let second = world.publish_received_at(&published, long_ago + chrono::Duration::seconds(61)).await;

    assert_eq!(world.settled(&second).await.status, "processed");
    let account = world.account(ACCOUNT).await;
    assert_eq!(
        account.data_updated_at.unwrap().timestamp(),
        (long_ago + chrono::Duration::seconds(61)).timestamp()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_dead_copy_does_not_make_a_later_copy_a_duplicate(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{ACCOUNT}/reauthorise")))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(serde_json::json!({ "message": "This account can not be re-authorised." })),
        )
        .up_to_n_times(1)
        .mount(&world.mono)
        .await;
    world.mono_issues_token(ACCOUNT, "second-time").await;
    world.start_worker().await;
    let published = body(REAUTH, ACCOUNT);

    let first = world.publish(&published).await;
    assert_eq!(world.settled(&first).await.status, "dead");
    let second = world.publish(&published).await;

    assert_eq!(world.settled(&second).await.status, "processed");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("second-time"));
}
