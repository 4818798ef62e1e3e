//! The two database halves of a batch: load (and lock) what `batch::decide` needs, then write what it
//! decided, with one statement per table each way.
//!
//! Accounts are locked in id order (the new ones inserted in id order too), so that batches of
//! different workers sharing accounts queue behind each other instead of deadlocking.

use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

use crate::account::AccountState;
use crate::batch::{BatchState, Candidate};
use crate::db::accounts;
use crate::db::events::{EventRecord, EventStatus};
use crate::journal_payload::JournalPayload;
use sqlx::PgConnection;

/// Loads the batch's accounts (creating missing rows, locking them all), which of its deliveries are
/// journaled already, and the journaled copies of its bodies within the dedup window.
pub async fn load(
    conn: &mut PgConnection,
    candidates: &[Candidate<'_>],
    window: Duration,
) -> sqlx::Result<BatchState> {
    let mut state = BatchState { now: Utc::now(), ..BatchState::default() };
    let mut account_ids: Vec<&str> =
        candidates.iter().filter(|c| c.event.kind.needs_account()).map(|c| c.event.account()).collect();
    account_ids.sort_unstable();
    account_ids.dedup();
    if !account_ids.is_empty() {
        let created: Vec<String> = sqlx::query_scalar(
            "INSERT INTO accounts (id) SELECT id FROM unnest($1::text[]) AS t(id) ORDER BY id
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(&account_ids)
        .fetch_all(&mut *conn)
        .await?;
        state.created = created.into_iter().collect();
        let rows = accounts::load_states(&mut *conn, &account_ids, true).await?;
        state.accounts = rows.into_iter().map(|row| (row.id.clone(), row)).collect();
        state.loaded = state.accounts.clone();
    }

    let delivery_ids: Vec<Uuid> = candidates.iter().map(|c| c.event.record.id).collect();
    let settled: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM webhook_events WHERE id = ANY($1)")
        .bind(&delivery_ids)
        .fetch_all(&mut *conn)
        .await?;
    state.settled = settled.into_iter().collect();

    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::days(36_500));
    let bodies: Vec<&str> = candidates.iter().map(|c| c.event.record.body_sha256.as_str()).collect();
    // Stamps come from another machine's clock: bounded, never panicking, whatever they say.
    let earliest = candidates.iter().map(|c| c.event.received_at).min().unwrap_or_else(Utc::now);
    let earliest = earliest.checked_sub_signed(window).unwrap_or(earliest);
    let latest = candidates.iter().map(|c| c.event.received_at).max().unwrap_or_else(Utc::now);
    let latest = latest.checked_add_signed(window).unwrap_or(latest);
    let copies: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, body_sha256, received_at FROM webhook_events
         WHERE body_sha256 = ANY($1) AND status <> 'dead' AND received_at BETWEEN $2 AND $3",
    )
    .bind(&bodies)
    .bind(earliest)
    .bind(latest)
    .fetch_all(&mut *conn)
    .await?;
    for (id, body, received_at) in copies {
        state.bodies.entry(body).or_default().push((id, received_at));
    }

    // Whether a copy is a duplicate depends on what was applied to its account between the copies:
    // only the accounts whose bodies have copies, journaled or in this very batch, need that (none,
    // in the common case).
    let mut in_batch: HashMap<&str, usize> = HashMap::new();
    for candidate in candidates {
        *in_batch.entry(candidate.event.record.body_sha256.as_str()).or_default() += 1;
    }
    let mut with_copies: Vec<&str> = candidates
        .iter()
        .filter(|c| {
            let body = c.event.record.body_sha256.as_str();
            c.event.kind.needs_account() && (state.bodies.contains_key(body) || in_batch[body] > 1)
        })
        .map(|c| c.event.account())
        .collect();
    with_copies.sort_unstable();
    with_copies.dedup();
    if !with_copies.is_empty() {
        let applied: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT account_id, body_sha256, received_at FROM webhook_events
             WHERE account_id = ANY($1) AND status IN ('processed', 'duplicate')
               AND received_at BETWEEN $2 AND $3",
        )
        .bind(&with_copies)
        .bind(earliest)
        .bind(latest)
        .fetch_all(&mut *conn)
        .await?;
        for (account, body, received_at) in applied {
            state.applied.entry(account).or_default().push((received_at, body));
        }
    }
    Ok(state)
}

/// A journal row to write.
pub struct JournalEntry<'a> {
    pub record: &'a EventRecord,
    pub status: EventStatus,
    pub note: Option<&'a str>,
}

/// The journal rows of a batch, as arrays (`$1` ids … `$9` payloads); answers the ids inserted (an id
/// already journaled is left as it is). Public for the benchmark, which times this very statement.
pub const JOURNAL_INSERT: &str = "INSERT INTO webhook_events
             (id, event, account_id, body_sha256, received_at, status, attempts, last_error, payload, processed_at)
         SELECT id, event, account_id, body_sha256, received_at, status, attempts, last_error, payload::jsonb,
                clock_timestamp()
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::int4[],
                     $8::text[], $9::text[])
             AS v(id, event, account_id, body_sha256, received_at, status, attempts, last_error, payload)
         ON CONFLICT (id) DO NOTHING
         RETURNING id";

/// Writes the changed accounts and the journal rows, each body (journal payload and account
/// snapshot) cut down to what `kept` allows first. Returns the ids actually journaled: an id
/// journaled concurrently by another transaction is left out.
pub async fn write(
    conn: &mut PgConnection,
    state: &BatchState,
    journal: &[JournalEntry<'_>],
    kept: JournalPayload,
) -> sqlx::Result<HashSet<Uuid>> {
    // A row created only to be locked, for an event that then changed nothing (one still waiting
    // for its token), must not outlive the transaction.
    let untouched: Vec<&str> = state
        .accounts
        .values()
        .filter(|a| !a.changed && state.created.contains(&a.id))
        .map(|a| a.id.as_str())
        .collect();
    if !untouched.is_empty() {
        sqlx::query("DELETE FROM accounts WHERE id = ANY($1)").bind(&untouched).execute(&mut *conn).await?;
    }
    let changed: Vec<&AccountState> = state.accounts.values().filter(|a| a.changed).collect();
    if !changed.is_empty() {
        sqlx::query(
            "UPDATE accounts AS a SET
                 reauth_required = v.reauth_required, reauth_token = v.reauth_token,
                 reauth_token_issued_at = v.reauth_token_issued_at, reauth_token_expires_at = v.reauth_token_expires_at,
                 reauthorized_at = v.reauthorized_at, data_status = v.data_status,
                 account_snapshot = COALESCE(v.snapshot_body::jsonb -> 'data' -> 'account', a.account_snapshot),
                 data_updated_at = v.data_updated_at, last_sync_failed_at = v.last_sync_failed_at,
                 customer_id = v.customer_id, connected_at = v.connected_at, unlinked_at = v.unlinked_at,
                 reauth_state_received_at = v.reauth_state_received_at,
                 data_state_received_at = v.data_state_received_at, updated_at = clock_timestamp()
             FROM unnest($1::text[], $2::bool[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::timestamptz[],
                         $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::timestamptz[],
                         $13::timestamptz[], $14::timestamptz[], $15::timestamptz[])
                 AS v(id, reauth_required, reauth_token, reauth_token_issued_at, reauth_token_expires_at,
                      reauthorized_at, data_status, snapshot_body, data_updated_at, last_sync_failed_at, customer_id,
                      connected_at, unlinked_at, reauth_state_received_at, data_state_received_at)
             WHERE a.id = v.id",
        )
        .bind(changed.iter().map(|a| a.id.as_str()).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.reauth_required).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.reauth_token.as_ref().map(|t| t.0.as_str())).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.reauth_token_issued_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.reauth_token_expires_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.reauthorized_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.data_status.as_deref()).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.snapshot_body.as_deref().map(|b| kept.apply(b))).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.data_updated_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.last_sync_failed_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.customer_id.as_deref()).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.connected_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.unlinked_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.reauth_state_received_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|a| a.data_state_received_at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    if journal.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted: Vec<Uuid> = sqlx::query_scalar(JOURNAL_INSERT)
        .bind(journal.iter().map(|j| j.record.id).collect::<Vec<_>>())
        .bind(journal.iter().map(|j| j.record.event.as_str()).collect::<Vec<_>>())
        .bind(journal.iter().map(|j| j.record.account_id.as_deref()).collect::<Vec<_>>())
        .bind(journal.iter().map(|j| j.record.body_sha256.as_str()).collect::<Vec<_>>())
        .bind(journal.iter().map(|j| j.record.received_at).collect::<Vec<_>>())
        .bind(journal.iter().map(|j| j.status.as_str()).collect::<Vec<_>>())
        .bind(journal.iter().map(|j| j.record.attempts).collect::<Vec<_>>())
        .bind(journal.iter().map(|j| j.note).collect::<Vec<_>>())
        .bind(journal.iter().map(|j| j.record.payload.as_deref().map(|p| kept.apply(p))).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
    Ok(inserted.into_iter().collect())
}
