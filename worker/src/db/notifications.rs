//! `notifications` and `notification_deliveries`: the app's notifications, written in the batch's
//! transaction, taken by the sender one account's head at a time per endpoint, and deleted once
//! delivered (or moved to `dead_letters` once no try is left).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

use crate::account::AccountState;
use crate::notify::change::{self, Notice};

/// The dead letter's headers that keep a notification's `webhook-id` and sequence for a replay.
pub const HEADER_NOTIFICATION_ID: &str = "notification-id";
pub const HEADER_SEQUENCE: &str = "notification-sequence";

/// One notification to write: the account as the batch leaves it, and what it calls for.
pub struct Written<'a> {
    pub account: &'a AccountState,
    pub notices: Vec<Notice>,
}

/// Which endpoints take which kinds (names only: the sender holds the secrets).
#[derive(Clone, Debug, Default)]
pub struct Subscriptions {
    pub endpoints: Vec<(String, Vec<change::NoticeKind>)>,
}

impl Subscriptions {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    fn takers(&self, kind: change::NoticeKind) -> impl Iterator<Item = &str> {
        self.endpoints.iter().filter(move |(_, kinds)| kinds.contains(&kind)).map(|(name, _)| name.as_str())
    }
}

/// Numbers the notices of each account on from its last sequence and writes them, with one delivery
/// row per endpoint that takes the kind. Notices no endpoint takes are not written at all.
pub async fn write(
    conn: &mut PgConnection,
    subscriptions: &Subscriptions,
    written: &[Written<'_>],
    now: DateTime<Utc>,
) -> sqlx::Result<()> {
    let wanted: Vec<(&AccountState, Vec<&Notice>)> = written
        .iter()
        .map(|w| {
            (w.account, w.notices.iter().filter(|n| subscriptions.takers(n.kind).next().is_some()).collect())
        })
        .filter(|(_, notices): &(_, Vec<&Notice>)| !notices.is_empty())
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let last: Vec<(String, i64)> = sqlx::query_as(
        "UPDATE accounts AS a SET notification_seq = a.notification_seq + v.n
         FROM unnest($1::text[], $2::int8[]) AS v(id, n)
         WHERE a.id = v.id
         RETURNING a.id, a.notification_seq",
    )
    .bind(wanted.iter().map(|(a, _)| a.id.as_str()).collect::<Vec<_>>())
    .bind(wanted.iter().map(|(_, n)| n.len() as i64).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let last: HashMap<String, i64> = last.into_iter().collect();

    let (mut ids, mut accounts, mut sequences, mut kinds, mut bodies) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut d_ids, mut d_endpoints, mut d_accounts, mut d_sequences) = (vec![], vec![], vec![], vec![]);
    for (account, notices) in &wanted {
        let Some(&top) = last.get(&account.id) else { continue };
        let first = top - notices.len() as i64 + 1;
        for (offset, notice) in notices.iter().enumerate() {
            let id = Uuid::now_v7();
            let sequence = first + offset as i64;
            for endpoint in subscriptions.takers(notice.kind) {
                d_ids.push(id);
                d_endpoints.push(endpoint.to_owned());
                d_accounts.push(account.id.clone());
                d_sequences.push(sequence);
            }
            ids.push(id);
            accounts.push(account.id.clone());
            sequences.push(sequence);
            kinds.push(notice.kind.as_str());
            bodies.push(change::body(notice, account, sequence, now));
        }
    }
    sqlx::query(
        "INSERT INTO notifications (id, account_id, sequence, kind, body)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::bytea[])",
    )
    .bind(&ids)
    .bind(&accounts)
    .bind(&sequences)
    .bind(&kinds)
    .bind(&bodies)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO notification_deliveries (notification_id, endpoint, account_id, sequence)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[])",
    )
    .bind(&d_ids)
    .bind(&d_endpoints)
    .bind(&d_accounts)
    .bind(&d_sequences)
    .execute(&mut *conn)
    .await?;
    // Wakes the senders at commit (PostgreSQL delivers a notification only then); they also poll.
    sqlx::query("SELECT pg_notify($1, '')").bind(WAKE_CHANNEL).execute(&mut *conn).await?;
    for kind in kinds {
        metrics::counter!("monohook_worker_notifications_written_total", "type" => kind).increment(1);
    }
    Ok(())
}

/// The PostgreSQL channel a batch that wrote notifications signals at its commit.
pub const WAKE_CHANNEL: &str = "notifications_due";

/// A delivery the sender took.
#[derive(Debug, sqlx::FromRow)]
pub struct Taken {
    pub notification_id: Uuid,
    pub endpoint: String,
    pub account_id: String,
    pub sequence: i64,
    pub kind: String,
    pub body: Vec<u8>,
    /// This try's number (1 for the first).
    pub attempts: i32,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// Takes up to `limit` due deliveries of `endpoint`, each the lowest sequence its account has left
/// for the endpoint (so an account's notifications go out in order), leasing each for `lease`.
pub async fn take(
    conn: &mut PgConnection,
    endpoint: &str,
    limit: i64,
    lease: Duration,
) -> sqlx::Result<Vec<Taken>> {
    sqlx::query_as(
        "WITH due AS (
             SELECT h.notification_id FROM notification_deliveries h
             WHERE h.endpoint = $1 AND h.next_attempt_at <= clock_timestamp()
               AND (h.leased_until IS NULL OR h.leased_until < clock_timestamp())
               AND NOT EXISTS (SELECT 1 FROM notification_deliveries e
                               WHERE e.endpoint = h.endpoint AND e.account_id = h.account_id
                                 AND e.sequence < h.sequence)
             ORDER BY h.next_attempt_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), taken AS (
             UPDATE notification_deliveries d
             SET attempts = d.attempts + 1, leased_until = clock_timestamp() + $3::interval,
                 first_attempt_at = coalesce(d.first_attempt_at, clock_timestamp())
             FROM due WHERE d.notification_id = due.notification_id AND d.endpoint = $1
             RETURNING d.*
         )
         SELECT t.notification_id, t.endpoint, t.account_id, t.sequence, n.kind, n.body, t.attempts,
                t.first_attempt_at, n.created_at
         FROM taken t JOIN notifications n ON n.id = t.notification_id",
    )
    .bind(endpoint)
    .bind(limit)
    .bind(format!("{} milliseconds", lease.as_millis()))
    .fetch_all(conn)
    .await
}

/// The endpoint took it: the delivery goes, and the notification with its last delivery. (A late
/// answer of a try whose lease ran out deletes it too: it was delivered.)
pub async fn delivered(conn: &mut PgConnection, taken: &Taken) -> sqlx::Result<()> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    lock_notification(&mut tx, taken.notification_id).await?;
    sqlx::query("DELETE FROM notification_deliveries WHERE notification_id = $1 AND endpoint = $2")
        .bind(taken.notification_id)
        .bind(&taken.endpoint)
        .execute(&mut *tx)
        .await?;
    drop_if_done(&mut tx, taken.notification_id).await?;
    tx.commit().await
}

/// Locks the notification's row: the deliveries of one notification to several endpoints, and a
/// replay of one of them, end one after another, so the last one out sees that it is the last.
async fn lock_notification(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT 1 FROM notifications WHERE id = $1 FOR UPDATE").bind(id).execute(conn).await.map(drop)
}

/// Deletes the notification once no delivery of it is left (a statement of its own, so it sees what
/// the others committed while this transaction waited for the lock).
async fn drop_if_done(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM notifications WHERE id = $1
         AND NOT EXISTS (SELECT 1 FROM notification_deliveries WHERE notification_id = $1)",
    )
    .bind(id)
    .execute(conn)
    .await
    .map(drop)
}

/// The try failed; the next one is due after `wait`. Only if the row is still this try's (its lease
/// may have run out and another worker taken it since): a late failure never cuts a newer lease.
pub async fn failed(conn: &mut PgConnection, taken: &Taken, wait: Duration, error: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE notification_deliveries
         SET next_attempt_at = clock_timestamp() + $3::interval, leased_until = NULL, last_error = $4
         WHERE notification_id = $1 AND endpoint = $2 AND attempts = $5",
    )
    .bind(taken.notification_id)
    .bind(&taken.endpoint)
    .bind(format!("{} milliseconds", wait.as_millis()))
    .bind(error)
    .bind(taken.attempts)
    .execute(conn)
    .await
    .map(drop)
}

/// No try is left: the delivery becomes a dead letter (its own id; the notification's id rides in
/// its headers, so a replay sends the same `webhook-id`), in one transaction. Nothing happens if the
/// row is no longer this try's (another worker took it after this lease ran out). Returns the dead
/// letter's id, if one was made.
pub async fn bury(conn: &mut PgConnection, taken: &Taken, error: &str) -> sqlx::Result<Option<Uuid>> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    lock_notification(&mut tx, taken.notification_id).await?;
    let gone = sqlx::query(
        "DELETE FROM notification_deliveries WHERE notification_id = $1 AND endpoint = $2 AND attempts = $3",
    )
    .bind(taken.notification_id)
    .bind(&taken.endpoint)
    .bind(taken.attempts)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if gone == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    let id = Uuid::now_v7();
    let headers = serde_json::json!({
        HEADER_NOTIFICATION_ID: taken.notification_id.to_string(),
        HEADER_SEQUENCE: taken.sequence.to_string(),
    });
    crate::db::dead_letters::insert(
        &mut tx,
        &crate::db::dead_letters::NewDeadLetter {
            id,
            event: taken.kind.clone(),
            account_id: Some(taken.account_id.clone()),
            body: taken.body.clone(),
            body_sha256: shared::delivery::body_digest(&taken.body),
            received_at: taken.created_at,
            headers,
            reason: format!("not delivered to endpoint {}: {error}", taken.endpoint),
            class: "exhausted",
            attempts: taken.attempts,
            first_attempt_at: taken.first_attempt_at,
        },
    )
    .await?;
    sqlx::query("UPDATE dead_letters SET endpoint = $2 WHERE id = $1")
        .bind(id)
        .bind(&taken.endpoint)
        .execute(&mut *tx)
        .await?;
    drop_if_done(&mut tx, taken.notification_id).await?;
    tx.commit().await?;
    Ok(Some(id))
}

/// Puts a buried notification back for its endpoint (an operator's replay), with the same id and
/// body: due now, its tries counted afresh. The upsert locks a notification still there, so a
/// delivery to another endpoint ending meanwhile cannot take it away under the revived one.
pub async fn revive(
    conn: &mut PgConnection,
    notification_id: Uuid,
    endpoint: &str,
    account_id: &str,
    sequence: i64,
    kind: &str,
    body: &[u8],
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO notifications (id, account_id, sequence, kind, body) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET kind = EXCLUDED.kind",
    )
    .bind(notification_id)
    .bind(account_id)
    .bind(sequence)
    .bind(kind)
    .bind(body)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO notification_deliveries (notification_id, endpoint, account_id, sequence)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(notification_id)
    .bind(endpoint)
    .bind(account_id)
    .bind(sequence)
    .execute(&mut *conn)
    .await
    .map(drop)
}

/// Per endpoint: deliveries waiting, and the age of the oldest notification among them.
pub async fn backlog(conn: &mut PgConnection) -> sqlx::Result<Vec<(String, i64, f64)>> {
    sqlx::query_as(
        "SELECT d.endpoint, count(*), coalesce(extract(epoch FROM clock_timestamp() - min(n.created_at)), 0)::float8
         FROM notification_deliveries d JOIN notifications n ON n.id = d.notification_id
         GROUP BY d.endpoint",
    )
    .fetch_all(conn)
    .await
}
