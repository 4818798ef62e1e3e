//! Whose fault a database error is decides what becomes of the event: only what the event's own data
//! causes (classes 22 and 23) dead-letters it. Errors of ours, provoked here for real (a revoked
//! grant, a statement timeout that one row causes every time), are retried: the rest of the batch
//! commits, the culprit is parked without spending an attempt, and nothing is dead-lettered.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

use crate::helpers::{ACCOUNT, PATIENCE, TestWorld, body};
use shared::testing::eventually;

/// A login role of the test's own (roles are shared by the whole server), allowed everything in the
/// test's database, for a worker that is not a superuser and so can lose a grant.
async fn create_role(pool: &PgPool) -> String {
    let role = format!("monohook_test_{}", uuid::Uuid::new_v4().simple());
    pool.execute(format!(r#"CREATE ROLE "{role}" LOGIN"#).as_str()).await.unwrap();
    pool.execute(format!(r#"GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}""#).as_str()).await.unwrap();
    pool.execute(format!(r#"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}""#).as_str())
        .await
        .unwrap();
    role
}

async fn drop_role(pool: &PgPool, role: &str) {
    pool.execute(format!(r#"DROP OWNED BY "{role}""#).as_str()).await.unwrap();
    pool.execute(format!(r#"DROP ROLE "{role}""#).as_str()).await.unwrap();
}

/// Waits until the first retry tier holds `delivery`'s copy (tiers have no consumer; the copy waits
/// out the tier's delay there, then goes back to the work queue).
async fn wait_until_parked(world: &TestWorld, what: &str) {
    let tier = world.broker.topology.retry_queue(1);
    eventually(what, PATIENCE, || async { world.broker.depth(&tier).await == 1 }).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_revoked_grant_parks_the_events_it_stops_and_dead_letters_none(
    pool_options: PgPoolOptions,
    connect_options: PgConnectOptions,
) {
    let pool = pool_options.connect_with(connect_options.clone()).await.unwrap();
    let role = create_role(&pool).await;
    // Events for an account lock its row (`FOR UPDATE`, which needs UPDATE): they now fail with
    // 42501; an event the worker only journals does not.
    pool.execute(format!(r#"REVOKE UPDATE ON accounts FROM "{role}""#).as_str()).await.unwrap();
    let mut world = TestWorld::new(pool).await;
    // Both wait in the queue, so that the worker takes them in one batch.
    let stopped = world.publish(&body("mono.events.account_updated", ACCOUNT)).await;
    let unaffected = world.publish(br#"{"event":"mono.events.something_new","data":{}}"#).await;
    let worker_pool =
        PgPoolOptions::new().max_connections(4).connect_with(connect_options.username(&role)).await.unwrap();
    let cli = world.cli(&[]);
    world.start_worker_on(cli, worker_pool).await;

    assert_eq!(world.settled(&unaffected).await.status, "ignored", "the rest of the batch commits");
    wait_until_parked(&world, "the event the grant stops is parked in the first retry tier").await;
    assert_eq!(world.dead_letter_count().await, 0, "a grant of ours dead-letters nothing");
    assert!(world.journal(&stopped).await.is_none());

    world.pool.execute(format!(r#"GRANT UPDATE ON accounts TO "{role}""#).as_str()).await.unwrap();

    let row = world.settled(&stopped).await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.attempts, 1, "parking spends no attempt");
    assert_eq!(world.dead_letter_count().await, 0);
    world.stop_workers().await;
    drop_role(&world.pool, &role).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_row_that_times_out_every_time_is_parked_and_its_batch_commits(
    pool_options: PgPoolOptions,
    connect_options: PgConnectOptions,
) {
    let pool = pool_options.connect_with(connect_options.clone()).await.unwrap();
    // One account's journal row takes longer than the worker's statement timeout: 57014, every time,
    // for any batch that holds it.
    pool.execute(
        "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.account_id = 'slow-account' THEN PERFORM pg_sleep(1); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER slow_row BEFORE INSERT ON webhook_events FOR EACH ROW EXECUTE FUNCTION slow_row();",
    )
    .await
    .unwrap();
    let mut world = TestWorld::new(pool).await;
    let culprit = world.publish(&body("mono.events.account_updated", "slow-account")).await;
    let mut others = Vec::new();
    for n in 0..5 {
        others.push(world.publish(&body("mono.events.account_updated", &format!("acct-{n}"))).await);
    }
    let worker_pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect_options.options([("statement_timeout", "200ms")]))
        .await
        .unwrap();
    let cli = world.cli(&[]);
    world.start_worker_on(cli, worker_pool).await;

    for meta in &others {
        assert_eq!(world.settled(meta).await.status, "processed", "the culprit's batch commits without it");
    }
    wait_until_parked(&world, "the row that times out is parked in the first retry tier").await;
    assert_eq!(world.dead_letter_count().await, 0, "a timeout of ours dead-letters nothing");
    assert!(world.journal(&culprit).await.is_none());

    world.pool.execute("DROP TRIGGER slow_row ON webhook_events").await.unwrap();

    let row = world.settled(&culprit).await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.attempts, 1, "parking spends no attempt");
    assert_eq!(world.dead_letter_count().await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn one_locked_account_parks_only_its_own_delivery(pool: PgPool) {
    // Another session (an open psql transaction, a frozen api pod) holds one account's row and
    // never lets go. The worker's own pool, as in production: no timeout set on it by this test.
    pool.execute("INSERT INTO accounts (id) VALUES ('held-account')").await.unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM accounts WHERE id = 'held-account' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut world = TestWorld::new(pool).await;
    let held = world.publish(&body("mono.events.account_updated", "held-account")).await;
    let mut others = Vec::new();
    for n in 0..5 {
        others.push(world.publish(&body("mono.events.account_updated", &format!("acct-{n}"))).await);
    }
    world.start_worker().await;

    // Within the test's patience, far below HOLD_MAX_SECS (15 minutes): the batch that shares the
    // held row is not held with it.
    for meta in &others {
        assert_eq!(world.settled(meta).await.status, "processed", "a batch is not held by another's row");
    }
    wait_until_parked(&world, "the delivery that needs the held row is parked").await;
    assert!(world.journal(&held).await.is_none());
    assert_eq!(world.dead_letter_count().await, 0, "a lock held elsewhere dead-letters nothing");

    holder.rollback().await.unwrap();
    let row = world.settled(&held).await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.attempts, 1, "parking spends no attempt");
    world.stop_workers().await;
}
