//! What each Mono event does to the account record.

use sqlx::PgPool;

use crate::helpers::{ACCOUNT, TestWorld, body};
use shared::testing::fixture;

#[sqlx::test(migrations = "../migrations")]
async fn account_connected_creates_the_row_with_its_customer(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;

    let meta = world.publish(&fixture("account_connected.json")).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    let account = world.account("68c985839212c1cdb5d2c180").await;
    assert_eq!(account.customer_id.as_deref(), Some("67abe55f29135f8af8002cc0"));
    assert!(account.connected_at.is_some());
    assert!(!account.reauth_required);
}

#[sqlx::test(migrations = "../migrations")]
async fn account_updated_records_data_status_and_snapshot(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;

    let meta = world.publish(&fixture("account_updated.json")).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    let account = world.account("6631279bdedfbd0a1c2e0001").await;
    assert_eq!(account.data_status.as_deref(), Some("AVAILABLE"));
    assert_eq!(account.data_updated_at, Some(meta.received_at));
    let snapshot: serde_json::Value =
        sqlx::query_scalar("SELECT account_snapshot FROM accounts WHERE id = '6631279bdedfbd0a1c2e0001'")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(snapshot["institution"]["name"], "ALAT by WEMA");
}

#[sqlx::test(migrations = "../migrations")]
async fn account_unlinked_marks_the_account_and_clears_its_reauth_state(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let unlinked_account = "60770aa8c5878a2af69ed849";
    world.mono_issues_token(unlinked_account, "to-be-cleared").await;
    world.start_worker().await;

    let required = world.publish(&body("mono.events.reauthorisation_required", unlinked_account)).await;
    world.settled(&required).await;
    assert!(world.account(unlinked_account).await.reauth_required);
    let unlinked = world.publish(&fixture("account_unlinked.json")).await;

    assert_eq!(world.settled(&unlinked).await.status, "processed");
    let account = world.account(unlinked_account).await;
    assert!(account.unlinked_at.is_some());
    assert!(!account.reauth_required);
    assert_eq!(world.stored_token(unlinked_account).await, None);
}

#[sqlx::test(migrations = "../migrations")]
async fn sync_failed_is_recorded(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;

    let meta = world.publish(&fixture("sync_failed.json")).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    let account = world.account(ACCOUNT).await;
    assert_eq!(account.data_status.as_deref(), Some("FAILED"));
    assert_eq!(account.last_sync_failed_at, Some(meta.received_at));
}

#[sqlx::test(migrations = "../migrations")]
async fn unknown_events_are_recorded_as_ignored_and_acked(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;

    let meta = world.publish(&fixture("unknown_event.json")).await;

    let row = world.settled(&meta).await;
    assert_eq!(row.status, "ignored");
    assert_eq!(row.event, "mono.events.new_transaction");
    assert_eq!(row.account_id.as_deref(), Some(ACCOUNT));
    assert_eq!(world.broker.depth(&world.broker.topology.work_queue()).await, 0);
}
