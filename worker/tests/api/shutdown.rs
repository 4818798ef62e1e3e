//! SIGTERM: stop taking deliveries, finish in-flight ones within the grace period, return the rest.

use sqlx::PgPool;
use std::time::Duration;
use wiremock::matchers::method;
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{ACCOUNT, PATIENCE, TestWorld, body};
use shared::testing::eventually;

async fn mono_answers_after(world: &TestWorld, delay: Duration) {
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "slow" })).set_delay(delay),
        )
        .mount(&world.mono)
        .await;
}

async fn wait_for_mono_call(world: &TestWorld) {
    eventually("the worker calls Mono", PATIENCE, || async {
        world.mono.received_requests().await.is_some_and(|r| !r.is_empty())
    })
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn an_in_flight_delivery_finishes_before_the_worker_exits(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    mono_answers_after(&world, Duration::from_millis(1500)).await;
    world.start_worker_with(&["--shutdown-grace-secs", "10"]).await;
    let meta = world.publish(&body("mono.events.reauthorisation_required", ACCOUNT)).await;
    wait_for_mono_call(&world).await;

    world.stop_workers().await;

    let row = world.journal(&meta).await.expect("the in-flight delivery was not finished");
    assert_eq!(row.status, "processed");
    assert_eq!(world.broker.depth(&world.broker.topology.work_queue()).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_delivery_unfinished_after_the_grace_period_returns_to_the_queue(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    mono_answers_after(&world, Duration::from_secs(20)).await;
    world.start_worker_with(&["--shutdown-grace-secs", "1", "--mono-timeout-ms", "30000"]).await;
    let meta = world.publish(&body("mono.events.reauthorisation_required", ACCOUNT)).await;
    wait_for_mono_call(&world).await;

    let stopping = std::time::Instant::now();
    world.stop_workers().await;

    assert!(stopping.elapsed() < Duration::from_secs(10), "shutdown took {:?}", stopping.elapsed());
    assert!(world.journal(&meta).await.is_none());
    let work = world.broker.topology.work_queue();
    eventually("the delivery is back in the work queue", PATIENCE, || async {
        world.broker.depth(&work).await == 1
    })
    .await;
}
