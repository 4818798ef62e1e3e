//! Retention: what the database keeps, and for how long (issue 22). Old rows go by themselves, in
//! bounded steps, with one worker at a time doing the work.
//!
//! ```text
//! every RETENTION_INTERVAL_SECS, in each worker:
//!   pg_try_advisory_lock(RETENTION_LOCK) ── taken by another worker ──▶ skip this round
//!        │ held
//!        ▼
//!   journal partitions   the months ahead created; each partition whose ids all predate the
//!                        journal's cutoff dropped whole, unless it holds a row kept below
//!                        (`partitions`)
//!   webhook_events       received before now − max(JOURNAL_RETENTION_DAYS, DEDUP_WINDOW_SECS),
//!                        never `dead` (its letter still waits; `status --check` reports old ones)
//!   token_issuances      served before now − AUDIT_RETENTION_DAYS
//!   dead_letter_actions  started before it and completed (an unfinished one is the next run's work)
//!   account_erasures     erased before it
//!   reauth_link_handouts served before it
//!   reauth_links         created before it, once none of its hand-outs is left (a link's url is
//!                        the customer's way in: it goes with the audit of its hand-outs)
//!        each: DELETE … LIMIT RETENTION_STEP_ROWS, again until a step deletes less;
//!        a metric and a log line per step
//!        ▼
//!   the connection is closed, which releases the lock whatever happened
//! ```
//!
//! Each step is its own short statement, so it holds the row locks of at most one step's rows and
//! never blocks a batch for long. On a database error the round ends (logged once) and the next
//! round tries again; on shutdown a round stops between steps.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::partitions;

/// The advisory lock whose holder does the retention work ("monoret" in ASCII).
pub const RETENTION_LOCK: i64 = 0x006d_6f6e_6f72_6574;

/// How long each kind of row is kept.
#[derive(Clone, Debug)]
pub struct RetentionPolicy {
    /// `JOURNAL_RETENTION_DAYS`.
    pub journal: Duration,
    /// `AUDIT_RETENTION_DAYS`: token issuances, dead-letter actions, erasures, the api's re-auth
    /// links and their hand-outs.
    pub audit: Duration,
    /// `DEDUP_WINDOW_SECS`: a journal row inside it may still be the copy a new delivery matches.
    pub dedup_window: Duration,
    /// Most rows one step deletes.
    pub step_rows: i64,
}

impl RetentionPolicy {
    /// Journal rows received before this go: the retention, but never inside the dedup window.
    pub fn journal_cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - to_chrono(self.journal.max(self.dedup_window))
    }

    /// Audit rows recorded before this go.
    pub fn audit_cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - to_chrono(self.audit)
    }
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::days(36_500))
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub journal: u64,
    pub token_issuances: u64,
    pub dead_letter_actions: u64,
    pub account_erasures: u64,
    /// Journal partitions dropped whole (their rows are not counted in `journal`).
    pub journal_partitions: u32,
    pub reauth_link_handouts: u64,
    pub reauth_links: u64,
    pub steps: u32,
}

/// How a round ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Round {
    /// This worker held the lock and deleted what had expired (or stopped between steps on shutdown).
    Swept(Swept),
    /// Another worker holds the lock: it does the work.
    Busy,
}

/// One step of the journal's row deletes: `$1` the cutoff, `$2` the step size. Public for the
/// benchmark, which times it against dropping a partition.
pub const JOURNAL_STEP: &str = "DELETE FROM webhook_events WHERE id IN (
     SELECT id FROM webhook_events WHERE received_at < $1 AND status <> 'dead'
     ORDER BY received_at LIMIT $2)";

/// The tables retention keeps short, each with the statement of one step: `$1` the cutoff, `$2` the
/// step size.
const TABLES: [(&str, Cutoff, &str); 6] = [
    ("webhook_events", Cutoff::Journal, JOURNAL_STEP),
    (
        "token_issuances",
        Cutoff::Audit,
        "DELETE FROM token_issuances WHERE id IN (
             SELECT id FROM token_issuances WHERE served_at < $1 ORDER BY served_at LIMIT $2)",
    ),
    (
        "dead_letter_actions",
        Cutoff::Audit,
        "DELETE FROM dead_letter_actions WHERE id IN (
             SELECT id FROM dead_letter_actions WHERE started_at < $1 AND completed_at IS NOT NULL
             ORDER BY started_at LIMIT $2)",
    ),
    (
        "account_erasures",
        Cutoff::Audit,
        "DELETE FROM account_erasures WHERE id IN (
             SELECT id FROM account_erasures WHERE erased_at < $1 ORDER BY erased_at LIMIT $2)",
    ),
    (
        "reauth_link_handouts",
        Cutoff::Audit,
        "DELETE FROM reauth_link_handouts WHERE id IN (
             SELECT id FROM reauth_link_handouts WHERE served_at < $1 ORDER BY served_at LIMIT $2)",
    ),
    // After the hand-outs: a link still handed out within the retention stays with its record
    // (deleting it would cascade to that record).
    (
        "reauth_links",
        Cutoff::Audit,
        "DELETE FROM reauth_links WHERE ref IN (
             SELECT ref FROM reauth_links AS l WHERE created_at < $1
                 AND NOT EXISTS (SELECT 1 FROM reauth_link_handouts AS h WHERE h.ref = l.ref)
             ORDER BY created_at LIMIT $2)",
    ),
];

#[derive(Clone, Copy)]
enum Cutoff {
    Journal,
    Audit,
}

/// One round: takes the lock if no other worker holds it, deletes what expired, step by step.
pub async fn sweep(
    pool: &PgPool,
    policy: &RetentionPolicy,
    cancel: &CancellationToken,
) -> sqlx::Result<Round> {
    let mut conn = pool.acquire().await?;
    // A session lock lives as long as its connection: closing it (not returning it to the pool)
    // releases the lock on every path, errors and shutdown included.
    conn.close_on_drop();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RETENTION_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(Round::Busy);
    }
    let now = Utc::now();
    // Whole months first: what they take, the row deletes need not.
    let journal_partitions = partitions::maintain(&mut conn, now, policy.journal_cutoff(now)).await?;
    let mut swept = Swept { journal_partitions, ..Swept::default() };
    for (table, cutoff, statement) in TABLES {
        let cutoff = match cutoff {
            Cutoff::Journal => policy.journal_cutoff(now),
            Cutoff::Audit => policy.audit_cutoff(now),
        };
        let deleted = delete_in_steps(&mut conn, table, statement, cutoff, policy.step_rows, cancel).await?;
        swept.steps += deleted.1;
        match table {
            "webhook_events" => swept.journal = deleted.0,
            "token_issuances" => swept.token_issuances = deleted.0,
            "dead_letter_actions" => swept.dead_letter_actions = deleted.0,
            "account_erasures" => swept.account_erasures = deleted.0,
            "reauth_link_handouts" => swept.reauth_link_handouts = deleted.0,
            _ => swept.reauth_links = deleted.0,
        }
    }
    Ok(Round::Swept(swept))
}

/// Deletes `table`'s rows older than `cutoff`, `step_rows` at a time, until a step finds fewer or
/// the worker stops. Returns the rows deleted and the steps taken.
async fn delete_in_steps(
    conn: &mut PgConnection,
    table: &'static str,
    statement: &'static str,
    cutoff: DateTime<Utc>,
    step_rows: i64,
    cancel: &CancellationToken,
) -> sqlx::Result<(u64, u32)> {
    let (mut total, mut steps) = (0, 0);
    while !cancel.is_cancelled() {
        let started = Instant::now();
        let rows =
            sqlx::query(statement).bind(cutoff).bind(step_rows).execute(&mut *conn).await?.rows_affected();
        let took = started.elapsed();
        steps += 1;
        total += rows;
        metrics::counter!("monohook_worker_retention_rows_deleted_total", "table" => table).increment(rows);
        metrics::histogram!("monohook_worker_retention_step_seconds", "table" => table)
            .record(took.as_secs_f64());
        tracing::info!(table, rows, took_ms = took.as_millis() as u64, %cutoff, "retention step");
        if rows < u64::try_from(step_rows).unwrap_or(u64::MAX) {
            break;
        }
    }
    Ok((total, steps))
}

/// Runs a round every `interval` until `cancel` fires (the first one at once).
pub async fn run(pool: PgPool, policy: RetentionPolicy, interval: Duration, cancel: CancellationToken) {
    loop {
        match sweep(&pool, &policy, &cancel).await {
            Ok(Round::Swept(swept)) => tracing::debug!(?swept, "retention round done"),
            Ok(Round::Busy) => tracing::debug!("another worker does the retention round"),
            Err(error) => tracing::warn!(%error, "retention round failed; the next one tries again"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(journal_days: u64, dedup_secs: u64) -> RetentionPolicy {
        RetentionPolicy {
            journal: Duration::from_secs(journal_days * 86_400),
            audit: Duration::from_secs(400 * 86_400),
            dedup_window: Duration::from_secs(dedup_secs),
            step_rows: 10,
        }
    }

    #[test]
    fn the_journal_cutoff_never_falls_inside_the_dedup_window() {
        let now = Utc::now();
        assert_eq!(policy(90, 600).journal_cutoff(now), now - chrono::Duration::days(90));
        // A dedup window longer than the retention wins: those rows may still be matched.
        assert_eq!(policy(1, 3 * 86_400).journal_cutoff(now), now - chrono::Duration::days(3));
        assert_eq!(policy(90, 600).audit_cutoff(now), now - chrono::Duration::days(400));
    }
}
