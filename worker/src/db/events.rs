//! `webhook_events`: the journal of every delivery the worker settled, written in the same
//! transaction as the delivery's effect (see `db::batch`). It is how a redelivery is recognised (same
//! id), how a duplicate is recognised (same body within the window), and where dead letters are
//! recorded.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::dead_letters::storable;
use crate::journal_payload::JournalPayload;

/// How a delivery was settled (the `status` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventStatus {
    /// Its effect was applied.
    Processed,
    /// An event monohook does not act on (recorded, acked).
    Ignored,
    /// The same body was already received within the dedup window; no effect.
    Duplicate,
    /// Received before the last event already applied to the account; no effect.
    Stale,
    /// Could not succeed; the message waits in `dead_letters`.
    Dead,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Ignored => "ignored",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Dead => "dead",
        }
    }
}

/// One row of the journal.
#[derive(Clone, Debug)]
pub struct EventRecord {
    pub id: Uuid,
    pub event: String,
    pub account_id: Option<String>,
    pub body_sha256: String,
    pub received_at: DateTime<Utc>,
    /// This attempt's number (1 for the first).
    pub attempts: i32,
    /// The body as JSON text, when it is JSON that PostgreSQL's jsonb can store.
    pub payload: Option<String>,
    /// When a worker first tried this delivery, if before this attempt.
    pub first_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Journals a dead letter (in the transaction that stores its `dead_letters` row, which keeps the
/// whole body), its payload cut down to what `kept` allows. A delivery that was already settled
/// otherwise keeps its status. Text is made storable (NUL replaced).
pub async fn record_dead(
    conn: &mut PgConnection,
    record: &EventRecord,
    reason: &str,
    kept: JournalPayload,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO webhook_events
             (id, event, account_id, body_sha256, received_at, status, attempts, last_error, payload, processed_at,
              first_attempt_at)
         VALUES ($1, $2, $3, $4, $5, 'dead', $6, $7, $8::jsonb, clock_timestamp(), COALESCE($9, clock_timestamp()))
         ON CONFLICT (id) DO UPDATE
             SET attempts = excluded.attempts, last_error = excluded.last_error, processed_at = excluded.processed_at
             WHERE webhook_events.status = 'dead'",
    )
    .bind(record.id)
    .bind(storable(&record.event))
    .bind(record.account_id.as_deref().map(storable))
    .bind(&record.body_sha256)
    .bind(record.received_at)
    .bind(record.attempts)
    .bind(storable(reason))
    .bind(record.payload.as_deref().map(|p| kept.apply(p)))
    .bind(record.first_attempt_at)
    .execute(conn)
    .await
    .map(drop)
}
