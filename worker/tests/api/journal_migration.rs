//! The journal's move to monthly partitions (`migrations/20261205000002_webhook_events_by_month.sql`)
//! on a database the previous schema filled: every row is kept as it was, and the worker's journal
//! paths (redelivery, dedup, insert) work on the partitioned table.

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, Migrator};
use sqlx::{Connection, PgConnection, PgPool};
use std::future::Future;
use std::pin::Pin;

use crate::helpers::{PATIENCE, TestWorld, body};
use shared::delivery::DeliveryMeta;
use shared::testing::eventually;

/// The migration that partitions the journal.
const PARTITIONING: i64 = 20261205000002;

/// The worker's migrations older than a version: the schema as a previous release left it.
#[derive(Debug)]
struct Before(i64);

impl MigrationSource<'static> for Before {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send>> {
        Box::pin(
            async move { Ok(worker::db::MIGRATOR.iter().filter(|m| m.version < self.0).cloned().collect()) },
        )
    }
}

async fn relkind(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = 'webhook_events'::regclass")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every journal row as text, in id order.
async fn every_row(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT w::text FROM webhook_events AS w ORDER BY id").fetch_all(pool).await.unwrap()
}

async fn count(pool: &PgPool, query: &str) -> i64 {
    sqlx::query_scalar(query).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_journal_filled_by_the_previous_schema_keeps_every_row_and_the_worker_works_on_it(pool: PgPool) {
    Migrator::new(Before(PARTITIONING)).await.unwrap().run(&pool).await.unwrap();
    assert_eq!(relkind(&pool).await, "r", "the previous schema's journal is a plain table");
    // As the previous worker journaled them: ids ingest stamped (UUIDv7) over the last 83 days (within the retention), one
    // in ten dead, some with a body; ids it did not stamp (random, most far above any month); and
    // the copy of a body the worker is about to receive again.
    sqlx::query(
        "INSERT INTO webhook_events (id, event, account_id, body_sha256, received_at, status, attempts, payload,
                                     processed_at, first_attempt_at)
         SELECT (lpad(to_hex(floor(extract(epoch FROM t) * 1000)::bigint), 12, '0') || '7'
                 || substr(md5(n::text), 1, 19))::uuid,
                'mono.events.account_updated', 'acct-' || n % 50, md5(n::text), t,
                CASE WHEN n % 10 = 0 THEN 'dead' ELSE 'processed' END, 1 + n % 3,
                CASE WHEN n % 4 = 0 THEN jsonb_build_object('event', 'mono.events.account_updated') END,
                t + interval '1 second', CASE WHEN n % 10 = 0 THEN t END
         FROM generate_series(1, 3000) AS n, LATERAL (SELECT now() - n * interval '40 minutes') AS at(t)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO webhook_events (id, event, body_sha256, received_at, status, attempts)
         SELECT gen_random_uuid(), 'garbage', md5(random()::text), now() - n * interval '1 hour', 'dead', 1
         FROM generate_series(1, 50) AS n",
    )
    .execute(&pool)
    .await
    .unwrap();
    let repeated = body("mono.events.sync_failed", "acct-again");
    let copy = DeliveryMeta::stamp(&repeated);
    sqlx::query(
        "INSERT INTO webhook_events (id, event, account_id, body_sha256, received_at, status, attempts, processed_at)
         VALUES ($1, 'mono.events.sync_failed', 'acct-again', $2, $3, 'processed', 1, $3)",
    )
    .bind(copy.id.as_uuid())
    .bind(&copy.body_sha256)
    .bind(copy.received_at)
    .execute(&pool)
    .await
    .unwrap();
    let before = every_row(&pool).await;

    worker::db::MIGRATOR.run(&pool).await.unwrap();
    let after = every_row(&pool).await;
    // Running the migration's statements again (as after an interruption) changes nothing.
    let again = worker::db::MIGRATOR.iter().find(|m| m.version == PARTITIONING).unwrap();
    sqlx::raw_sql(&again.sql).execute(&pool).await.unwrap();

    assert_eq!(relkind(&pool).await, "p");
    assert_eq!(after.len(), 3051);
    assert_eq!(after, before, "every row kept as it was");
    assert_eq!(every_row(&pool).await, before);
    // The stamped rows stay where they were, in the old table, now the partition below next month.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM webhook_events_before WHERE event <> 'garbage'").await,
        3001
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM webhook_events WHERE tableoid = 'webhook_events_before'::regclass"
        )
        .await
            + count(
                &pool,
                "SELECT count(*) FROM webhook_events WHERE tableoid <> 'webhook_events_before'::regclass"
            )
            .await,
        3051
    );
    // `ON CONFLICT (id)` still finds an existing id, wherever its partition.
    let conflicting: u64 = sqlx::query(
        "INSERT INTO webhook_events (id, event, body_sha256, received_at, status, attempts)
         SELECT id, event, body_sha256, received_at, status, attempts FROM webhook_events
         ON CONFLICT (id) DO NOTHING",
    )
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(conflicting, 0);

    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;
    let redelivered = world.publish(&repeated).await;
    let fresh = world.publish(&body("mono.events.sync_failed", "acct-new")).await;
    world.publish_meta(&repeated, &copy).await;

    assert_eq!(world.settled(&redelivered).await.status, "duplicate", "the old copy is found");
    assert_eq!(world.settled(&fresh).await.status, "processed");
    let metrics = format!("http://{}/metrics", world.metrics_addrs[0]);
    eventually("the old id is taken for a redelivery", PATIENCE, || async {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        text.lines().any(|l| l.contains("outcome=\"redelivered\"") && l.ends_with(" 1"))
    })
    .await;
    assert_eq!(world.journal_count().await, 3053, "the redelivered id is journaled once");
}

#[sqlx::test(migrations = false)]
async fn a_migration_interrupted_after_its_first_steps_is_finished_by_running_it_again(pool: PgPool) {
    Migrator::new(Before(PARTITIONING)).await.unwrap().run(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO webhook_events (id, event, body_sha256, received_at, status, attempts)
         SELECT gen_random_uuid(), 'e', md5(n::text), now(), 'processed', 1 FROM generate_series(1, 200) AS n",
    )
    .execute(&pool)
    .await
    .unwrap();
    let before = every_row(&pool).await;
    // The steps up to the move of the rows above the boundary, as if the process died there.
    let migration = worker::db::MIGRATOR.iter().find(|m| m.version == PARTITIONING).unwrap();
    let first_steps = &migration.sql[..migration.sql.find("-- 3.").unwrap()];
    sqlx::raw_sql(first_steps).execute(&pool).await.unwrap();
    assert_eq!(relkind(&pool).await, "r");
    let moved = count(&pool, "SELECT count(*) FROM webhook_events_by_month").await;
    assert!(moved > 0, "random ids above the boundary were moved beside");

    worker::db::MIGRATOR.run(&pool).await.unwrap();

    assert_eq!(relkind(&pool).await, "p");
    assert_eq!(every_row(&pool).await, before);
}

#[sqlx::test(migrations = false)]
async fn a_long_reader_fails_the_migration_at_once_instead_of_queueing_the_worker_behind_it(pool: PgPool) {
    Migrator::new(Before(PARTITIONING)).await.unwrap().run(&pool).await.unwrap();
    // A dump or a report, reading the journal in a long transaction.
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM webhook_events").execute(&mut *reader).await.unwrap();

    // On a connection of its own, as a starting worker that exits when its migration fails: the
    // failed run leaves its session inside the aborted transaction and holding sqlx's lock.
    let mut migrating = PgConnection::connect_with(&pool.connect_options()).await.unwrap();
    let started = std::time::Instant::now();
    let refused = tokio::time::timeout(PATIENCE, worker::db::MIGRATOR.run(&mut migrating)).await;
    let waited = started.elapsed();
    let error =
        refused.expect("the migration waits for its lock no longer than its lock_timeout").unwrap_err();
    assert!(error.to_string().contains("lock timeout"), "{error}");
    assert!(waited < std::time::Duration::from_secs(10), "waited {waited:?}");
    migrating.close().await.unwrap();
    assert_eq!(relkind(&pool).await, "r", "nothing of the refused step is left");

    reader.rollback().await.unwrap();
    worker::db::MIGRATOR.run(&pool).await.unwrap();
    assert_eq!(relkind(&pool).await, "p");
}
