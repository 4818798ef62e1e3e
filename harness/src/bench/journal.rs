//! The journal at 1 and 10 million rows (issue 22, point 5): the worker's journal queries and its
//! batch commit at each size, then one retention step of each kind (a bounded `DELETE` and
//! dropping a month's partition), timed and with their effect on a batch committing meanwhile, and
//! the table's size before and after. PostgreSQL only: no broker, no worker process.
//!
//! ```text
//! fill each size, a database each ─▶ batches on each in turns, round after round
//!   ─▶ at the largest: batches alone (baseline) ─▶ … during row-delete steps ─▶ … during one
//!      partition drop ─▶ the databases dropped
//! ```
//!
//! A fill makes the journal as a database partitioned long ago holds it: each size is a number of
//! rows spread evenly over a number of days before now (so the same rows over fewer days is the
//! same traffic for less time, and more rows over the same days more traffic, with as many
//! partitions). One partition per month (plus the months ahead and the default), UUIDv7 ids of their
//! receive time. Each month is filled as a table of its own with `INSERT … SELECT generate_series`
//! and then attached, which builds its indexes in one sort instead of row by row (minutes saved;
//! the indexes come out tighter than those of a journal written over months). The queries, the
//! retention step and the partition drop are the worker's own (`worker::db::batch`'s statements,
//! `worker::retention::JOURNAL_STEP`, `worker::partitions::drop_if_unneeded`).

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use worker::partitions::{self, Bounds, Expiry, Month};

const DATABASE: &str = "monohook_bench_journal";

/// Settings of the journal benchmark.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub database_server: String,
    /// The sizes measured; retention is measured at the last, whose days must pass the retention
    /// by a month (so its oldest month has expired).
    pub sizes: Vec<Size>,
    /// Samples of each query and commit at each size.
    pub samples: usize,
    /// Deliveries per batch (the worker's `BATCH_MAX` default).
    pub batch: usize,
    /// Rows per delete step (`RETENTION_STEP_ROWS` default) and steps timed.
    pub step_rows: i64,
    pub steps: usize,
    /// `JOURNAL_RETENTION_DAYS` default.
    pub retention_days: i64,
    /// `DEDUP_WINDOW_SECS` default.
    pub dedup_window_secs: i64,
}

/// A journal size: `rows` rows received over the last `days` days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub rows: u64,
    pub days: u32,
}

impl Size {
    /// The time the rows span, in ms.
    fn span_ms(self) -> i64 {
        i64::from(self.days) * 86_400_000
    }
}

impl std::str::FromStr for Size {
    type Err = String;

    /// `ROWS@DAYS`, e.g. `10000000@150`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (rows, days) = text.split_once('@').ok_or_else(|| format!("{text}: expected ROWS@DAYS"))?;
        let number = |v: &str| v.replace('_', "").parse::<u64>().map_err(|e| format!("{text}: {e}"));
        let days = u32::try_from(number(days)?).map_err(|e| format!("{text}: {e}"))?;
        Ok(Self { rows: number(rows)?, days })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.rows, self.days)
    }
}

/// Milliseconds at the 50th and 99th percentile and the longest.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub count: usize,
}

impl Latency {
    fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self { p50_ms: at(0.5), p99_ms: at(0.99), max_ms: at(1.0), count: samples.len() }
    }
}

/// The figures at one size.
#[derive(Clone, Debug)]
pub struct Scale {
    pub size: Size,
    pub fill_secs: f64,
    pub partitions: usize,
    /// `SELECT id … WHERE id = ANY($1)`: which of a batch's deliveries are journaled already.
    pub settled: Latency,
    /// The dedup lookup: journaled copies of a batch's bodies within the window.
    pub copies: Latency,
    /// One batch's journal insert (`ON CONFLICT (id) DO NOTHING`) and its commit.
    pub commit: Latency,
    pub size_bytes: i64,
}

/// One kind of retention step, and what batches committing meanwhile saw.
#[derive(Clone, Debug)]
pub struct Step {
    /// Rows the step removed (for a partition, its rows counted before).
    pub rows: u64,
    /// The step's time (for row deletes, the median of the steps).
    pub took_ms: f64,
    /// Batches (lookup + insert + commit) that ran while the steps ran.
    pub during: Latency,
    pub size_after: i64,
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct JournalResult {
    pub scales: Vec<Scale>,
    /// Batches alone, at the largest size, just before the steps.
    pub baseline: Latency,
    pub row_steps: Step,
    pub partition_drop: Step,
    pub size_before_steps: i64,
}

pub async fn run(config: &JournalConfig) -> anyhow::Result<JournalResult> {
    // One database per size, all filled first, then measured in turns (a batch on each, round
    // after round), so that the machine's other load falls on every size alike.
    let mut journals = Vec::new();
    for (i, &size) in config.sizes.iter().enumerate() {
        eprintln!("journal: filling {} rows over {} days", size.rows, size.days);
        let pool = prepare_database(config, &format!("{DATABASE}_{i}")).await?;
        let started = Instant::now();
        // The newest rows are received now, so a batch finds copies of its bodies in the window.
        let anchor = Utc::now();
        let partitions = fill(&pool, size, anchor).await?;
        journals.push((pool, size, anchor, partitions, started.elapsed().as_secs_f64()));
    }
    eprintln!("journal: {} batches on each size, in turns", config.samples);
    let mut samples = vec![(Vec::new(), Vec::new(), Vec::new()); journals.len()];
    for round in 0..config.samples as u64 {
        for ((pool, size, anchor, ..), (settled, copies, commits)) in journals.iter().zip(&mut samples) {
            let (s, c, w) = measure_batch(pool, config, *size, *anchor, round).await?;
            settled.push(s);
            copies.push(c);
            commits.push(w);
        }
    }
    let mut scales = Vec::new();
    for ((pool, size, _, partitions, fill_secs), (settled, copies, commits)) in journals.iter().zip(samples) {
        scales.push(Scale {
            size: *size,
            fill_secs: *fill_secs,
            partitions: *partitions,
            settled: Latency::of(settled),
            copies: Latency::of(copies),
            commit: Latency::of(commits),
            size_bytes: journal_size(pool).await?,
        });
    }
    for (pool, ..) in journals.iter().rev().skip(1) {
        pool.close().await;
    }
    let (pool, size, anchor, ..) = journals.pop().ok_or_else(|| anyhow::anyhow!("no size to measure"))?;
    let cutoff = anchor - chrono::Duration::days(config.retention_days);
    let size_before_steps = journal_size(&pool).await?;

    eprintln!("journal: batches alone");
    let baseline =
        batches_during(&pool, config, size, async { tokio::time::sleep(Duration::from_secs(3)).await })
            .await?
            .1;

    eprintln!("journal: {} row-delete steps", config.steps);
    let (step_times, during) = batches_during(&pool, config, size, async {
        let mut times = Vec::new();
        let mut deleted = 0;
        for _ in 0..config.steps {
            let started = Instant::now();
            let done = sqlx::query(worker::retention::JOURNAL_STEP)
                .bind(cutoff)
                .bind(config.step_rows)
                .execute(&pool)
                .await?
                .rows_affected();
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            deleted += done;
        }
        anyhow::Ok((times, deleted))
    })
    .await?;
    let (step_times, deleted) = step_times?;
    let row_steps = Step {
        rows: deleted / config.steps.max(1) as u64,
        took_ms: Latency::of(step_times).p50_ms,
        during,
        size_after: journal_size(&pool).await?,
    };

    let mut conn = pool.acquire().await?;
    let oldest = partitions::expired(&partitions::list(&mut conn).await?, cutoff)
        .first()
        .map(|p| p.name.clone())
        .ok_or_else(|| anyhow::anyhow!("no partition older than the cutoff: raise --days"))?;
    let partition_rows: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {oldest}")).fetch_one(&mut *conn).await?;
    eprintln!("journal: dropping {oldest} ({partition_rows} rows)");
    let (dropped, during) = batches_during(&pool, config, size, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let expiry = partitions::drop_if_unneeded(&mut conn, &oldest, cutoff).await?;
        anyhow::Ok((expiry, started.elapsed().as_secs_f64() * 1000.0))
    })
    .await?;
    let (expiry, took_ms) = dropped?;
    anyhow::ensure!(matches!(expiry, Expiry::Dropped { .. }), "{oldest} was kept: {expiry:?}");
    let partition_drop =
        Step { rows: partition_rows as u64, took_ms, during, size_after: journal_size(&pool).await? };
    pool.close().await;
    Ok(JournalResult { scales, baseline, row_steps, partition_drop, size_before_steps })
}

/// Drops the benchmark's databases (each holds gigabytes).
pub async fn drop_databases(config: &JournalConfig) -> anyhow::Result<()> {
    let admin = PgPool::connect(&format!("{}/postgres", config.database_server)).await?;
    for i in 0..config.sizes.len() {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE}_{i} WITH (FORCE)")).execute(&admin).await?;
    }
    Ok(())
}

async fn prepare_database(config: &JournalConfig, database: &str) -> anyhow::Result<PgPool> {
    let admin = PgPool::connect(&format!("{}/postgres", config.database_server)).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await?;
    admin.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        // Index builds at ATTACH sort in memory rather than on disk (the fill only, not a figure).
        .after_connect(|conn, _| {
            Box::pin(async move { conn.execute("SET maintenance_work_mem = '512MB'").await.map(drop) })
        })
        .connect(&format!("{}/{database}", config.database_server))
        .await?;
    worker::db::MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// The receive time of row `n` of `rows` spread evenly over `span_ms` before `anchor`, in Unix ms.
fn received_ms(n: u64, rows: u64, span_ms: i64, anchor: DateTime<Utc>) -> i64 {
    anchor.timestamp_millis() - (n as i64 * span_ms) / rows as i64
}

/// Row `n`'s id: a UUIDv7 of its receive time, `n` in the random bits (as the fill's SQL makes it).
fn row_id(n: u64, rows: u64, span_ms: i64, anchor: DateTime<Utc>) -> Uuid {
    let ms = received_ms(n, rows, span_ms, anchor) as u128;
    Uuid::from_u128((ms << 80) | (0x7000 << 64) | u128::from(n))
}

/// Row `n`'s body digest: sha256 of `n` in decimal (as the fill's SQL makes it).
fn row_digest(n: u64) -> String {
    hex::encode(Sha256::digest(n.to_string().as_bytes()))
}

/// Empties the journal and fills it with `rows` rows over their span before `anchor`, one
/// partition per month. Returns the partitions. No row is `dead`: a month is dropped only without.
async fn fill(pool: &PgPool, size: Size, anchor: DateTime<Utc>) -> anyhow::Result<usize> {
    let rows = size.rows;
    let mut conn = pool.acquire().await?;
    for partition in partitions::list(&mut conn).await? {
        if partition.bounds != Bounds::Default {
            conn.execute(
                format!("ALTER TABLE webhook_events DETACH PARTITION {0}; DROP TABLE {0}", partition.name)
                    .as_str(),
            )
            .await?;
        }
    }
    conn.execute("TRUNCATE webhook_events").await?;
    // The months of the rows, and those the worker keeps ahead.
    let last = (0..partitions::MONTHS_AHEAD).fold(Month::containing(anchor), |m, _| m.next());
    let span_ms = size.span_ms();
    let mut month = Month::containing(anchor - chrono::Duration::milliseconds(span_ms));
    let mut months = Vec::new();
    while month.start <= last.start {
        let next = month.next();
        months.push(month);
        month = next;
    }
    for month in &months {
        let (from, to) = month.ids();
        let name = month.name();
        conn.execute(
            format!("CREATE TABLE {name} (LIKE webhook_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
                .as_str(),
        )
        .await?;
        // Rows n = 1..=rows are received at anchor - n·span/rows: those of this month.
        let (start_ms, end_ms) = (month.start.timestamp_millis(), month.next().start.timestamp_millis());
        let anchor_ms = anchor.timestamp_millis();
        // A little wide either way; the WHERE below is exact.
        let n_at =
            |ms: i64| (i128::from(anchor_ms - ms) * i128::from(rows as i64) / i128::from(span_ms)) as i64;
        let (first_n, last) = ((n_at(end_ms) - 1).max(1), (n_at(start_ms) + 1).min(rows as i64));
        if first_n <= last {
            sqlx::query(&format!(
                "INSERT INTO {name} (id, event, account_id, body_sha256, received_at, status, attempts, payload, processed_at)
                 SELECT (lpad(to_hex(ms), 12, '0') || '7000' || lpad(to_hex(n), 16, '0'))::uuid,
                        'mono.events.account_updated', 'acct-' || n % 100000,
                        encode(sha256(n::text::bytea), 'hex'), to_timestamp(ms / 1000.0), 'processed', 1,
                        jsonb_build_object('event', 'mono.events.account_updated',
                            'data', jsonb_build_object('meta', jsonb_build_object('data_status', 'AVAILABLE'),
                                'account', jsonb_build_object('_id', 'acct-' || n % 100000)),
                            'monohook_journal', '{{\"payload\": \"minimal\", \"dropped\": [\"data.account.accountNumber\", \"data.account.balance\", \"data.account.bvn\", \"data.account.name\"]}}'::jsonb),
                        to_timestamp(ms / 1000.0)
                 FROM generate_series($1::bigint, $2::bigint) AS n,
                      LATERAL (SELECT $3::bigint - (n * $4::bigint) / $5::bigint AS ms) AS at
                 WHERE ms >= $6 AND ms < $7"
            ))
            .bind(first_n)
            .bind(last)
            .bind(anchor_ms)
            .bind(span_ms)
            .bind(rows as i64)
            .bind(start_ms)
            .bind(end_ms)
            .execute(&mut *conn)
            .await?;
        }
        conn.execute(
            format!(
                "ALTER TABLE webhook_events ATTACH PARTITION {name} FOR VALUES FROM ('{from}') TO ('{to}')"
            )
            .as_str(),
        )
        .await?;
    }
    conn.execute("ANALYZE webhook_events").await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events").fetch_one(&mut *conn).await?;
    anyhow::ensure!(count as u64 == rows, "filled {count} rows, not {rows}");
    Ok(partitions::list(&mut conn).await?.len())
}

/// A batch of the newest deliveries: half of them copies of rows received within the dedup window
/// (the ids are new: another delivery of the same body), half new bodies.
struct Batch {
    ids: Vec<Uuid>,
    digests: Vec<String>,
    received: DateTime<Utc>,
}

/// The receive time the bench's own rows are written with: a day ahead, outside every window the
/// lookups ask about. Thousands of batches inserted back to back would otherwise crowd the dedup
/// window with far more rows than the fill's traffic puts there, and the lookups would measure the
/// bench's burst instead of the journal.
fn written_at(batch: &Batch) -> DateTime<Utc> {
    batch.received + chrono::Duration::days(1)
}

fn batch(config: &JournalConfig, size: Size, round: u64) -> Batch {
    let rows = size.rows;
    let received = Utc::now();
    let mut ids = Vec::with_capacity(config.batch);
    let mut digests = Vec::with_capacity(config.batch);
    // Rows received within the window before the anchor: n with n·span/rows < window.
    let recent =
        ((config.dedup_window_secs as u128 * 1000 * rows as u128) / size.span_ms() as u128).max(1) as u64;
    for i in 0..config.batch as u64 {
        ids.push(Uuid::now_v7());
        let n = if i % 2 == 0 {
            1 + (round * 7 + i) % recent
        } else {
            rows + 1 + round * config.batch as u64 + i
        };
        digests.push(row_digest(n));
    }
    Batch { ids, digests, received }
}

/// The worker's two journal reads for a batch (`worker::db::batch::load`): returns their times.
async fn lookups(
    conn: &mut sqlx::PgConnection,
    config: &JournalConfig,
    b: &Batch,
    settled_ids: &[Uuid],
) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let _: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM webhook_events WHERE id = ANY($1)")
        .bind(settled_ids)
        .fetch_all(&mut *conn)
        .await?;
    let settled = started.elapsed().as_secs_f64() * 1000.0;
    let window = chrono::Duration::seconds(config.dedup_window_secs);
    let started = Instant::now();
    let _: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, body_sha256, received_at FROM webhook_events
         WHERE body_sha256 = ANY($1) AND status <> 'dead' AND received_at BETWEEN $2 AND $3",
    )
    .bind(&b.digests)
    .bind(b.received - window)
    .bind(b.received + window)
    .fetch_all(&mut *conn)
    .await?;
    Ok((settled, started.elapsed().as_secs_f64() * 1000.0))
}

/// The worker's journal write for a batch (`worker::db::batch::write`) and the commit.
async fn commit(pool: &PgPool, b: &Batch) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    let n = b.ids.len();
    let _: Vec<Uuid> = sqlx::query_scalar(worker::db::batch::JOURNAL_INSERT)
        .bind(&b.ids)
        .bind(vec!["mono.events.account_updated"; n])
        .bind((0..n).map(|i| format!("acct-{i}")).collect::<Vec<_>>())
        .bind(&b.digests)
        .bind(vec![written_at(b); n])
        .bind(vec!["processed"; n])
        .bind(vec![1i32; n])
        .bind(vec![None::<String>; n])
        .bind(vec![
            Some(
                r#"{"event": "mono.events.account_updated", "data": {"meta": {"data_status": "AVAILABLE"}}}"#
            );
            n
        ])
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// One batch on the journal of `size`: its two reads (which ids are journaled: half the batch's
/// own, half redeliveries of rows received in the last hour; the dedup lookup) and its write and
/// commit. Returns the three times in ms.
async fn measure_batch(
    pool: &PgPool,
    config: &JournalConfig,
    size: Size,
    anchor: DateTime<Utc>,
    round: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let rows = size.rows;
    let b = batch(config, size, round);
    let last_hour = ((3_600_000u128 * u128::from(rows)) / size.span_ms() as u128).max(1) as u64;
    let ids: Vec<Uuid> = (0..config.batch as u64)
        .map(|i| {
            if i % 2 == 0 {
                row_id(1 + (round * 7919 + i * 104_729) % last_hour, rows, size.span_ms(), anchor)
            } else {
                b.ids[i as usize]
            }
        })
        .collect();
    let mut conn = pool.acquire().await?;
    let (settled, copies) = lookups(&mut conn, config, &b, &ids).await?;
    drop(conn);
    Ok((settled, copies, commit(pool, &b).await?))
}

/// Runs batches (both lookups, then the write and commit) back to back while `work` runs; returns
/// its output and the batches' times.
async fn batches_during<T>(
    pool: &PgPool,
    config: &JournalConfig,
    size: Size,
    work: impl std::future::Future<Output = T>,
) -> anyhow::Result<(T, Latency)> {
    let stop = CancellationToken::new();
    let load = {
        let (pool, config, stop) = (pool.clone(), config.clone(), stop.clone());
        tokio::spawn(async move {
            let mut times = Vec::new();
            let mut conn = pool.acquire().await?;
            let mut round = 1_000_000;
            while !stop.is_cancelled() {
                round += 1;
                let b = batch(&config, size, round);
                let started = Instant::now();
                lookups(&mut conn, &config, &b, &b.ids).await?;
                commit(&pool, &b).await?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(times)
        })
    };
    // Let the load settle into its pace before the work starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let output = work.await;
    stop.cancel();
    let times = load.await??;
    Ok((output, Latency::of(times)))
}

/// The journal's size on disk: every partition, its indexes and TOAST.
async fn journal_size(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint FROM pg_partition_tree('webhook_events')",
    )
    .fetch_one(pool)
    .await?)
}
