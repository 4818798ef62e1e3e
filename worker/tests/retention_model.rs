//! Retention against its rule, over generated journals (proptest, shrinking).
//!
//! The rule (docs/operations.md, "Retention"): a round at time `now` removes exactly the journal rows
//! received before `cutoff = now − max(JOURNAL_RETENTION_DAYS, DEDUP_WINDOW_SECS)` that are not
//! `dead`, and changes no other row; afterwards a delivery stamped now lands in a month's partition
//! (not the default), and a row of any id can still be written.
//!
//! The system under test is `retention::sweep` on the real PostgreSQL: the monthly partitions it
//! creates and drops whole (`partitions`) and its bounded row deletes, in whatever mix the journal
//! calls for, on a journal partitioned by month for the last 15 months (as one migrated that long
//! ago). Generated: rows of every status spread over 14 months, whose ids are UUIDv7 stamped
//! at receipt, stamped months apart from it (an id kept across a replay, a clock gone wrong) or
//! not UUIDv7 at all; the retention, the dedup window and the step size; and a second batch of
//! rows written after the first round (into months whose partition may be gone by then), then a
//! second round. Row ages stay at least 30 minutes away from the cutoff, so the milliseconds
//! between the test's clock and the round's cannot decide a row.
//!
//! `PROPTEST_CASES` raises the number of journals.

mod common;

use chrono::{DateTime, Duration as Span, SubsecRound, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::ScratchDatabase;
use worker::partitions::{self, Bounds, Month};
use worker::retention::{self, RetentionPolicy, Round, Swept};

const STATUSES: [&str; 5] = ["processed", "ignored", "duplicate", "stale", "dead"];

#[derive(Clone, Debug)]
enum IdKind {
    /// Stamped by ingest at receipt.
    AtReceipt,
    /// A UUIDv7 stamped this many days from the receipt (either way).
    Shifted(i64),
    /// Not a UUIDv7: any bits.
    Random(u128),
}

#[derive(Clone, Debug)]
struct Row {
    /// How long before the round it was received, in hours (plus 30 minutes).
    age_hours: i64,
    status: &'static str,
    id: IdKind,
}

#[derive(Clone, Debug)]
struct Journal {
    retention_days: u64,
    dedup_window_secs: u64,
    step_rows: i64,
    first: Vec<Row>,
    /// Written after the first round, before the second.
    second: Vec<Row>,
}

fn row() -> impl Strategy<Value = Row> {
    let id = prop_oneof![
        6 => Just(IdKind::AtReceipt),
        2 => (-120i64..120).prop_map(IdKind::Shifted),
        1 => any::<u128>().prop_map(IdKind::Random),
    ];
    // Up to about 14 months back, most within the last few.
    let age = prop_oneof![3 => 0i64..2_400, 2 => 0i64..10_000];
    (age, 0..STATUSES.len(), id).prop_map(|(age_hours, status, id)| Row {
        age_hours,
        status: STATUSES[status],
        id,
    })
}

fn journal() -> impl Strategy<Value = Journal> {
    (
        prop_oneof![Just(1u64), 1u64..30, 30u64..200],
        prop_oneof![Just(600u64), Just(3 * 86_400)],
        1i64..12,
        prop::collection::vec(row(), 0..40),
        prop::collection::vec(row(), 0..15),
    )
        .prop_map(|(retention_days, dedup_window_secs, step_rows, first, second)| Journal {
            retention_days,
            dedup_window_secs,
            step_rows,
            first,
            second,
        })
}

/// What the test knows of a row it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    status: String,
    received_at: DateTime<Utc>,
    body_sha256: String,
}

fn v7_at(at: DateTime<Utc>, salt: u128) -> Uuid {
    let millis = u128::try_from(at.timestamp_millis()).unwrap_or(0);
    // Version 7 and the RFC 4122 variant, as `Uuid::now_v7` sets them; the rest from `salt`.
    Uuid::from_u128(
        (millis << 80) | (0x7 << 76) | ((salt & 0x0fff) << 64) | (0b10 << 62) | (salt & ((1 << 62) - 1)),
    )
}

async fn write(
    pool: &PgPool,
    rows: &[Row],
    now: DateTime<Utc>,
    serial: &mut u128,
    written: &mut BTreeMap<Uuid, Written>,
) -> Result<(), TestCaseError> {
    for row in rows {
        *serial += 1;
        // PostgreSQL keeps microseconds.
        let received_at = (now - Span::hours(row.age_hours) - Span::minutes(30)).trunc_subsecs(6);
        let id = match row.id {
            IdKind::AtReceipt => v7_at(received_at, *serial),
            IdKind::Shifted(days) => v7_at(received_at + Span::days(days), *serial),
            IdKind::Random(bits) => Uuid::from_u128(bits ^ *serial),
        };
        if written.contains_key(&id) {
            continue;
        }
        let record =
            Written { status: row.status.to_owned(), received_at, body_sha256: format!("{:064x}", *serial) };
        sqlx::query(
            "INSERT INTO webhook_events (id, event, account_id, body_sha256, received_at, status, attempts, processed_at)
             VALUES ($1, 'mono.events.account_updated', 'acct', $2, $3, $4, 1, $3)",
        )
        .bind(id)
        .bind(&record.body_sha256)
        .bind(received_at)
        .bind(row.status)
        .execute(pool)
        .await
        .map_err(|e| TestCaseError::fail(format!("a row with id {id} cannot be written: {e}")))?;
        written.insert(id, record);
    }
    Ok(())
}

/// One round, then the rule checked against what is left.
async fn round_and_check(
    pool: &PgPool,
    policy: &RetentionPolicy,
    written: &mut BTreeMap<Uuid, Written>,
    swept: &Mutex<Swept>,
) -> Result<(), TestCaseError> {
    let round = retention::sweep(pool, policy, &CancellationToken::new())
        .await
        .map_err(|e| TestCaseError::fail(format!("the round failed: {e}")))?;
    let Round::Swept(this) = round else {
        return Err(TestCaseError::fail("nobody else holds the lock, yet the round was busy"));
    };
    {
        let mut swept = swept.lock().unwrap();
        swept.journal += this.journal;
        swept.journal_partitions += this.journal_partitions;
    }
    // The rule's own cutoff, not the code's: the longer of the retention and the dedup window.
    let kept_for = Span::from_std(policy.journal.max(policy.dedup_window)).expect("a retention that fits");
    let cutoff = Utc::now() - kept_for;
    written.retain(|_, row| row.status == "dead" || row.received_at >= cutoff);
    let left: Vec<(Uuid, String, DateTime<Utc>, String)> =
        sqlx::query_as("SELECT id, status, received_at, body_sha256 FROM webhook_events")
            .fetch_all(pool)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let left: BTreeMap<Uuid, Written> = left
        .into_iter()
        .map(|(id, status, received_at, body_sha256)| (id, Written { status, received_at, body_sha256 }))
        .collect();
    for (id, row) in written.iter() {
        prop_assert_eq!(left.get(id), Some(row), "kept by the rule but gone or changed: {}", id);
    }
    for (id, row) in &left {
        prop_assert!(
            written.contains_key(id),
            "removable by the rule but left: {id} {row:?} (cutoff {cutoff})"
        );
    }
    // A delivery stamped now has a month of its own, not the default partition.
    let now_id = Uuid::now_v7();
    let partition: String = sqlx::query_scalar(
        "WITH probe AS (INSERT INTO webhook_events (id, event, body_sha256, received_at, status, attempts)
                       VALUES ($1, 'probe', 'probe', now(), 'ignored', 1) RETURNING tableoid)
         SELECT tableoid::regclass::text FROM probe",
    )
    .bind(now_id)
    .fetch_one(pool)
    .await
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_ne!(partition.as_str(), "webhook_events_default", "a delivery stamped now has no month");
    sqlx::query("DELETE FROM webhook_events WHERE id = $1")
        .bind(now_id)
        .execute(pool)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

/// The journal as a database migrated 15 months ago has it: the partition the migration made ends
/// 15 months back, and every month since has its own partition, as the rounds created them.
/// Called before each journal: the months an earlier journal's rounds dropped come back.
async fn partitioned_since_15_months(pool: &PgPool) -> Result<(), TestCaseError> {
    let fail = |e: sqlx::Error| TestCaseError::fail(e.to_string());
    let mut conn = pool.acquire().await.map_err(fail)?;
    let start = Month::containing(Utc::now() - Span::days(15 * 31));
    let migrated_then = Bounds::Range { from: None, to: Some(start.ids().0) };
    let existing = partitions::list(&mut conn).await.map_err(fail)?;
    if existing.iter().any(|p| p.name == "webhook_events_before" && p.bounds != migrated_then) {
        sqlx::raw_sql(&format!(
            "ALTER TABLE webhook_events DETACH PARTITION webhook_events_before;
             DROP TABLE webhook_events_before;
             CREATE TABLE webhook_events_before PARTITION OF webhook_events FOR VALUES FROM (MINVALUE) TO ('{}')",
            start.ids().0
        ))
        .execute(&mut *conn)
        .await
        .map_err(fail)?;
    }
    let mut month = start;
    while month.start < Utc::now() + Span::days(62) {
        let (from, to) = month.ids();
        let existing = partitions::list(&mut conn).await.map_err(fail)?;
        let taken = existing.iter().any(|p| match p.bounds {
            Bounds::Range { from: f, to: t } => f.is_none_or(|f| f < to) && t.is_none_or(|t| from < t),
            Bounds::Default => false,
        });
        if !taken {
            partitions::create(&mut conn, &month, Some("webhook_events_default")).await.map_err(fail)?;
        }
        month = month.next();
    }
    Ok(())
}

async fn run_journal(pool: &PgPool, journal: &Journal, swept: &Mutex<Swept>) -> Result<(), TestCaseError> {
    sqlx::query("TRUNCATE webhook_events")
        .execute(pool)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    partitioned_since_15_months(pool).await?;
    let policy = RetentionPolicy {
        journal: Duration::from_secs(journal.retention_days * 86_400),
        audit: Duration::from_secs(400 * 86_400),
        dedup_window: Duration::from_secs(journal.dedup_window_secs),
        step_rows: journal.step_rows,
    };
    let (mut serial, mut written) = (0, BTreeMap::new());
    write(pool, &journal.first, Utc::now(), &mut serial, &mut written).await?;
    round_and_check(pool, &policy, &mut written, swept).await?;
    write(pool, &journal.second, Utc::now(), &mut serial, &mut written).await?;
    round_and_check(pool, &policy, &mut written, swept).await
}

#[test]
fn retention_removes_what_the_rule_removes_and_nothing_else_over_generated_journals() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let database = runtime.block_on(ScratchDatabase::create());
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64);
    // A failing case's seed is kept in `retention_model.proptest-regressions` and played first.
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        source_file: Some(file!()),
        ..Config::default()
    });
    let pool = database.pool.clone();
    let swept = Mutex::new(Swept::default());
    let result = runner.run(&journal(), |journal| runtime.block_on(run_journal(&pool, &journal, &swept)));
    runtime.block_on(database.drop_it());
    match result {
        Ok(()) => {
            // The journals called for both ways of removing rows, or the test proved less than it says.
            let swept = swept.into_inner().unwrap();
            assert!(
                swept.journal_partitions > 0 && swept.journal > 0,
                "not both ways were exercised: {swept:?}"
            );
            eprintln!(
                "{cases} journals: {} partitions dropped whole, {} rows deleted",
                swept.journal_partitions, swept.journal
            );
        }
        Err(TestError::Fail(reason, journal)) => {
            panic!("retention and its rule disagree: {reason}\nshrunk journal: {journal:#?}")
        }
        Err(error) => panic!("{error}"),
    }
}
