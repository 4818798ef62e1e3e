//! Retention: expired rows go in bounded steps, one worker at a time, never a row the dedup window
//! or a waiting dead letter needs; old dead letters are reported, not deleted. Rows are dated in the
//! past by hand.

use chrono::Utc;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::helpers::{PATIENCE, TestWorld, body};
use shared::testing::eventually;
use worker::partitions::{self, Month};
use worker::retention::{self, RETENTION_LOCK, RetentionPolicy, Round, Swept};

const DAY: u64 = 86_400;

fn policy(journal_days: u64, dedup_window_secs: u64) -> RetentionPolicy {
    RetentionPolicy {
        journal: Duration::from_secs(journal_days * DAY),
        audit: Duration::from_secs(400 * DAY),
        dedup_window: Duration::from_secs(dedup_window_secs),
        step_rows: 10,
    }
}

/// `count` journal rows with `status`, received and processed `days_ago`, with random (v4) ids, whose
/// bits say nothing of their receive time.
async fn journal_rows(pool: &PgPool, count: i32, status: &str, days_ago: i32) {
    insert_rows(pool, "gen_random_uuid()", count, status, days_ago).await;
}

/// `count` journal rows whose id is `id_sql` (SQL over the receive time `t`).
async fn insert_rows(pool: &PgPool, id_sql: &str, count: i32, status: &str, days_ago: i32) {
    sqlx::query(&format!(
        "INSERT INTO webhook_events (id, event, account_id, body_sha256, received_at, status, attempts, processed_at)
         SELECT {id_sql}, 'mono.events.account_updated', 'acct-' || n, md5(random()::text), t, $2, 1, t
         FROM generate_series(1, $1) AS n, LATERAL (SELECT now() - make_interval(days => $3)) AS at(t)"
    ))
    .bind(count)
    .bind(status)
    .bind(days_ago)
    .execute(pool)
    .await
    .unwrap();
}

async fn count(pool: &PgPool, query: &str) -> i64 {
    sqlx::query_scalar(query).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_round_deletes_expired_rows_in_steps_and_keeps_dead_letters_and_unfinished_actions(pool: PgPool) {
    journal_rows(&pool, 25, "processed", 100).await;
    journal_rows(&pool, 1, "dead", 100).await;
    journal_rows(&pool, 3, "processed", 10).await;
    sqlx::query(
        "INSERT INTO token_issuances (account_id, served_at, key_label, source, token_issued_at, expires_at)
         VALUES ('a', now() - interval '500 days', 'app', 'stored', now(), now()),
                ('a', now() - interval '100 days', 'app', 'stored', now(), now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dead_letter_actions (batch_id, action, delivery_id, event, attempts, actor, started_at, completed_at)
         VALUES (gen_random_uuid(), 'purge', gen_random_uuid(), 'e', 1, 'ops', now() - interval '500 days', now() - interval '500 days'),
                (gen_random_uuid(), 'replay', gen_random_uuid(), 'e', 1, 'ops', now() - interval '500 days', NULL),
                (gen_random_uuid(), 'purge', gen_random_uuid(), 'e', 1, 'ops', now() - interval '10 days', now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO account_erasures (account_id, actor, reason, removed, erased_at)
         VALUES ('a', 'ops', 'request', '{}', now() - interval '500 days'), ('b', 'ops', 'request', '{}', now())",
    )
    .execute(&pool)
    .await
    .unwrap();

    let round = retention::sweep(&pool, &policy(90, 600), &CancellationToken::new()).await.unwrap();

    // 25 expired journal rows at 10 a step take 3 steps; each audit table one.
    let swept = Swept {
        journal: 25,
        token_issuances: 1,
        dead_letter_actions: 1,
        account_erasures: 1,
        journal_partitions: 0,
        reauth_link_handouts: 0,
        reauth_links: 0,
        steps: 8,
    };
    assert_eq!(round, Round::Swept(swept));
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_events WHERE status = 'dead'").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_events WHERE status = 'processed'").await, 3);
    assert_eq!(count(&pool, "SELECT count(*) FROM token_issuances").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM dead_letter_actions WHERE completed_at IS NULL").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM dead_letter_actions").await, 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM account_erasures").await, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_row_the_dedup_window_needs_outlives_the_retention_and_still_makes_a_duplicate(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let window_secs = 3 * DAY;
    world.start_worker_with(&["--dedup-window-secs", &window_secs.to_string()]).await;
    let sent = body("mono.events.sync_failed", "acct-window");
    let first = world.publish_received_at(&sent, Utc::now() - chrono::Duration::days(2)).await;
    assert_eq!(world.settled(&first).await.status, "processed");
    journal_rows(&world.pool, 1, "processed", 4).await;

    // The retention is one day, the window three: the two-day-old row stays, the four-day-old goes.
    let round =
        retention::sweep(&world.pool, &policy(1, window_secs), &CancellationToken::new()).await.unwrap();
    let again = world.publish(&sent).await;

    assert!(matches!(round, Round::Swept(Swept { journal: 1, .. })), "{round:?}");
    assert!(world.journal(&first).await.is_some());
    assert_eq!(world.settled(&again).await.status, "duplicate");
}

#[sqlx::test(migrations = "../migrations")]
async fn one_worker_at_a_time_does_a_round(pool: PgPool) {
    journal_rows(&pool, 2, "processed", 100).await;
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)").bind(RETENTION_LOCK).execute(&mut *holder).await.unwrap();

    let while_held = retention::sweep(&pool, &policy(90, 600), &CancellationToken::new()).await.unwrap();
    let rows_while_held = count(&pool, "SELECT count(*) FROM webhook_events").await;
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(RETENTION_LOCK).execute(&mut *holder).await.unwrap();
    let after = retention::sweep(&pool, &policy(90, 600), &CancellationToken::new()).await.unwrap();

    assert_eq!(while_held, Round::Busy);
    assert_eq!(rows_while_held, 2);
    assert!(matches!(after, Round::Swept(Swept { journal: 2, .. })), "{after:?}");
    // The round's connection was closed, so its lock is free again: once the server has ended that
    // session, which the close does not wait for.
    let mut free = false;
    for _ in 0..250 {
        free = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RETENTION_LOCK)
            .fetch_one(&mut *holder)
            .await
            .unwrap();
        if free {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(free, "the round's lock is still held 5 s after it ended");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_worker_deletes_expired_rows_by_itself_and_counts_them(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    journal_rows(&world.pool, 3, "processed", 100).await;

    world.start_worker_with(&["--retention-interval-secs", "1", "--journal-retention-days", "90"]).await;

    eventually("the expired rows are deleted", PATIENCE, || async {
        count(&world.pool, "SELECT count(*) FROM webhook_events").await == 0
    })
    .await;
    let metrics = world.metrics().await;
    assert!(
        metrics.contains("monohook_worker_retention_rows_deleted_total{table=\"webhook_events\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("monohook_worker_retention_step_seconds"), "{metrics}");
}

#[sqlx::test(migrations = "../migrations")]
async fn status_check_reports_dead_letters_older_than_the_setting(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    journal_rows(&world.pool, 1, "dead", 40).await;
    // Its dead letter row, dead as long: the age is the row's.
    sqlx::query(
        "INSERT INTO dead_letters (id, event, account_id, body, body_sha256, received_at, reason, class, attempts,
                                   dead_at)
         SELECT id, event, account_id, convert_to('{}', 'UTF8'), body_sha256, received_at, 'seeded', 'permanent',
                attempts, processed_at
         FROM webhook_events WHERE status = 'dead'",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    let status = |max_age: &'static str| {
        let world = &world;
        async move {
            let output = world
                .run_cli(
                    &[
                        "status",
                        "--check",
                        "--json",
                        "--worker-url",
                        "http://127.0.0.1:9",
                        "--dead-letter-max-age-days",
                        max_age,
                    ],
                    "",
                )
                .await;
            assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
            let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            status["problems"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["check"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };

    let at_30_days = status("30").await;
    let at_60_days = status("60").await;

    assert!(at_30_days.contains(&"dead_letters_old".to_owned()), "{at_30_days:?}");
    assert!(!at_60_days.contains(&"dead_letters_old".to_owned()), "{at_60_days:?}");
    assert!(at_60_days.contains(&"dead_letters_waiting".to_owned()), "{at_60_days:?}");
}

/// A re-auth link made `days_ago` for `account`, handed out at each of `handed_out_days_ago`.
async fn reauth_link(
    pool: &PgPool,
    reference: &str,
    account: &str,
    days_ago: i32,
    handed_out_days_ago: &[i32],
) {
    sqlx::query(
        "INSERT INTO reauth_links (ref, account_id, url, created_at, key_label)
         VALUES ($1, $2, 'https://connect.mono.co/' || $1, now() - make_interval(days => $3), 'app')",
    )
    .bind(reference)
    .bind(account)
    .bind(days_ago)
    .execute(pool)
    .await
    .unwrap();
    for days in handed_out_days_ago {
        sqlx::query(
            "INSERT INTO reauth_link_handouts (ref, account_id, served_at, key_label, source)
             VALUES ($1, $2, now() - make_interval(days => $3), 'app', 'fresh')",
        )
        .bind(reference)
        .bind(account)
        .bind(days)
        .execute(pool)
        .await
        .unwrap();
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn old_reauth_links_and_their_handouts_go_under_the_audit_retention(pool: PgPool) {
    // Made and handed out long ago; made long ago but handed out within the retention; recent.
    reauth_link(&pool, "old", "a", 500, &[500, 499]).await;
    reauth_link(&pool, "old-but-handed-out-lately", "a", 500, &[500, 10]).await;
    reauth_link(&pool, "recent", "b", 10, &[10]).await;

    let round = retention::sweep(&pool, &policy(90, 600), &CancellationToken::new()).await.unwrap();

    assert!(
        matches!(round, Round::Swept(Swept { reauth_link_handouts: 3, reauth_links: 1, .. })),
        "{round:?}"
    );
    let links: Vec<String> =
        sqlx::query_scalar("SELECT ref FROM reauth_links ORDER BY ref").fetch_all(&pool).await.unwrap();
    assert_eq!(links, ["old-but-handed-out-lately", "recent"]);
    assert_eq!(count(&pool, "SELECT count(*) FROM reauth_link_handouts").await, 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM reauth_links WHERE url LIKE '%/old'").await, 0);
}

/// Gives the journal monthly partitions from `months_back` months ago to the current month and no
/// other (the default aside), as on a database partitioned that long ago: what the migration made
/// goes (empty in a fresh test database), and the months are made as the worker makes them.
async fn partitioned_since(pool: &PgPool, months_back: u32) {
    let mut conn = pool.acquire().await.unwrap();
    for partition in partitions::list(&mut conn).await.unwrap() {
        if partition.bounds != partitions::Bounds::Default {
            sqlx::raw_sql(&format!(
                "ALTER TABLE webhook_events DETACH PARTITION {0}; DROP TABLE {0}",
                partition.name
            ))
            .execute(&mut *conn)
            .await
            .unwrap();
        }
    }
    let now = Utc::now();
    let mut month = Month::containing(now.checked_sub_months(chrono::Months::new(months_back)).unwrap());
    while month.start <= now {
        partitions::create(&mut conn, &month, Some("webhook_events_default")).await.unwrap();
        month = month.next();
    }
}

/// `count` journal rows with `status`, stamped (id and receive time) `days_ago` as ingest stamps
/// them: a UUIDv7 of that millisecond.
async fn stamped_rows(pool: &PgPool, count: i32, status: &str, days_ago: i32) {
    let v7_of_t = "(substr(replace(journal_id_floor(t)::text, '-', ''), 1, 12) || '7'
                    || substr(md5(random()::text), 1, 19))::uuid";
    insert_rows(pool, v7_of_t, count, status, days_ago).await;
}

async fn partition_names(pool: &PgPool) -> Vec<String> {
    let mut conn = pool.acquire().await.unwrap();
    partitions::list(&mut conn).await.unwrap().into_iter().map(|p| p.name).collect()
}

fn month_name(days_ago: i64) -> String {
    Month::containing(Utc::now() - chrono::Duration::days(days_ago)).name()
}

#[sqlx::test(migrations = "../migrations")]
async fn an_expired_month_goes_with_its_partition_not_row_by_row(pool: PgPool) {
    partitioned_since(&pool, 7).await;
    stamped_rows(&pool, 30, "processed", 160).await;
    stamped_rows(&pool, 3, "processed", 10).await;
    assert!(partition_names(&pool).await.contains(&month_name(160)));

    let round = retention::sweep(&pool, &policy(90, 600), &CancellationToken::new()).await.unwrap();

    let Round::Swept(swept) = round else { panic!("{round:?}") };
    assert!(swept.journal_partitions >= 1, "{swept:?}");
    assert_eq!(swept.journal, 0, "no row was deleted one by one");
    let left = partition_names(&pool).await;
    assert!(!left.contains(&month_name(160)), "{left:?}");
    assert!(left.contains(&month_name(10)), "{left:?}");
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_events").await, 3);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_expired_month_holding_a_waiting_dead_letter_keeps_its_partition(pool: PgPool) {
    partitioned_since(&pool, 7).await;
    stamped_rows(&pool, 30, "processed", 160).await;
    stamped_rows(&pool, 1, "dead", 160).await;

    let round = retention::sweep(&pool, &policy(90, 600), &CancellationToken::new()).await.unwrap();

    let Round::Swept(swept) = round else { panic!("{round:?}") };
    // The month stays for its dead letter; its other rows go by the bounded deletes.
    assert_eq!(swept.journal, 30, "{swept:?}");
    assert!(partition_names(&pool).await.contains(&month_name(160)));
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_events WHERE status = 'dead'").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_events").await, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_round_creates_the_months_ahead_and_takes_their_rows_out_of_the_default(pool: PgPool) {
    partitioned_since(&pool, 1).await;
    // Stamped by a clock 35 days ahead: no month holds them yet.
    stamped_rows(&pool, 2, "processed", -35).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_events_default").await, 2);

    retention::sweep(&pool, &policy(90, 600), &CancellationToken::new()).await.unwrap();

    let names = partition_names(&pool).await;
    let now = Utc::now();
    for ahead in 1..=partitions::MONTHS_AHEAD {
        let month = Month::containing(now.checked_add_months(chrono::Months::new(ahead)).unwrap());
        assert!(names.contains(&month.name()), "{} missing from {names:?}", month.name());
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_events_default").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_events").await, 2);
}
