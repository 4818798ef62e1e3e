//! `accounts`: the app's record of each linked Mono account.
//!
//! Every change happens with the row locked (`lock` first, in the delivery's transaction), so two
//! deliveries for one account, in one worker or in several, apply one after the other. Each change
//! also moves an ordering guard forward: the receive time of the last event applied to the re-auth
//! state or to the data state.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

/// Mono's re-auth tokens expire this long after they are issued.
pub const REAUTH_TOKEN_LIFETIME: chrono::Duration = chrono::Duration::minutes(10);

/// What the handlers need to know about an account before they change it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AccountGuards {
    pub reauth_state_received_at: Option<DateTime<Utc>>,
    pub data_state_received_at: Option<DateTime<Utc>>,
    pub unlinked_at: Option<DateTime<Utc>>,
}

impl AccountGuards {
    /// An event received before the last one applied to the re-auth state must change nothing.
    pub fn reauth_is_newer_than(&self, received_at: DateTime<Utc>) -> bool {
        self.reauth_state_received_at
            .is_some_and(|applied| received_at < applied)
    }

    /// An event received before the last one applied to the data state must change nothing.
    pub fn data_is_newer_than(&self, received_at: DateTime<Utc>) -> bool {
        self.data_state_received_at
            .is_some_and(|applied| received_at < applied)
    }
}

/// Creates the account row if it is new and locks it until the transaction ends.
pub async fn lock(conn: &mut PgConnection, id: &str) -> sqlx::Result<AccountGuards> {
    sqlx::query("INSERT INTO accounts (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query_as(
        "SELECT reauth_state_received_at, data_state_received_at, unlinked_at
         FROM accounts WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_one(conn)
    .await
}

/// `reauthorisation_required` applied: the customer must re-authorise with `token`.
pub async fn require_reauth(
    conn: &mut PgConnection,
    id: &str,
    token: &str,
    issued_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE accounts SET reauth_required = true, reauth_token = $2, reauth_token_issued_at = $3,
             reauth_token_expires_at = $4, reauth_state_received_at = $5, updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(id)
    .bind(token)
    .bind(issued_at)
    .bind(issued_at + REAUTH_TOKEN_LIFETIME)
    .bind(received_at)
    .execute(conn)
    .await
    .map(drop)
}

/// `account_reauthorized` applied: the customer re-authorised; the token is spent.
pub async fn complete_reauth(
    conn: &mut PgConnection,
    id: &str,
    received_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE accounts SET reauth_required = false, reauth_token = NULL, reauth_token_issued_at = NULL,
             reauth_token_expires_at = NULL, reauthorized_at = $2, reauth_state_received_at = $2,
             updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(id)
    .bind(received_at)
    .execute(conn)
    .await
    .map(drop)
}

/// `account_unlinked` applied: the account is gone from Mono. Its re-auth state is cleared unless a
/// later event already decided it (`clear_reauth = false`).
pub async fn mark_unlinked(
    conn: &mut PgConnection,
    id: &str,
    received_at: DateTime<Utc>,
    clear_reauth: bool,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE accounts SET unlinked_at = LEAST(COALESCE(unlinked_at, $2), $2),
             reauth_required = CASE WHEN $3 THEN false ELSE reauth_required END,
             reauth_token = CASE WHEN $3 THEN NULL ELSE reauth_token END,
             reauth_token_issued_at = CASE WHEN $3 THEN NULL ELSE reauth_token_issued_at END,
             reauth_token_expires_at = CASE WHEN $3 THEN NULL ELSE reauth_token_expires_at END,
             reauth_state_received_at = CASE WHEN $3 THEN $2 ELSE reauth_state_received_at END,
             updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(id)
    .bind(received_at)
    .bind(clear_reauth)
    .execute(conn)
    .await
    .map(drop)
}

/// `account_updated` applied: Mono's view of the account and its data status.
pub async fn record_data(
    conn: &mut PgConnection,
    id: &str,
    data_status: Option<&str>,
    snapshot: Option<&Value>,
    received_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE accounts SET data_status = COALESCE($2, data_status), account_snapshot = COALESCE($3, account_snapshot),
             data_updated_at = $4, data_state_received_at = $4, updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(id)
    .bind(data_status)
    .bind(snapshot)
    .bind(received_at)
    .execute(conn)
    .await
    .map(drop)
}

/// `sync_failed` applied: Mono's automatic sync of the account failed.
pub async fn record_sync_failure(
    conn: &mut PgConnection,
    id: &str,
    data_status: &str,
    received_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE accounts SET data_status = $2, last_sync_failed_at = $3, data_state_received_at = $3,
             updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(id)
    .bind(data_status)
    .bind(received_at)
    .execute(conn)
    .await
    .map(drop)
}

/// `account_connected` applied: the account is linked (the row exists once `lock` ran).
pub async fn record_connection(
    conn: &mut PgConnection,
    id: &str,
    customer_id: Option<&str>,
    received_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE accounts SET customer_id = COALESCE($2, customer_id),
             connected_at = LEAST(COALESCE(connected_at, $3), $3), updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(id)
    .bind(customer_id)
    .bind(received_at)
    .execute(conn)
    .await
    .map(drop)
}

/// An account as operators and tests see it: everything but the token itself.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct AccountView {
    pub id: String,
    pub reauth_required: bool,
    pub has_reauth_token: bool,
    pub reauth_token_issued_at: Option<DateTime<Utc>>,
    pub reauth_token_expires_at: Option<DateTime<Utc>>,
    pub reauthorized_at: Option<DateTime<Utc>>,
    pub data_status: Option<String>,
    pub data_updated_at: Option<DateTime<Utc>>,
    pub last_sync_failed_at: Option<DateTime<Utc>>,
    pub customer_id: Option<String>,
    pub connected_at: Option<DateTime<Utc>>,
    pub unlinked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn find(pool: &PgPool, id: &str) -> sqlx::Result<Option<AccountView>> {
    sqlx::query_as(
        "SELECT id, reauth_required, reauth_token IS NOT NULL AS has_reauth_token, reauth_token_issued_at,
             reauth_token_expires_at, reauthorized_at, data_status, data_updated_at, last_sync_failed_at,
             customer_id, connected_at, unlinked_at, created_at, updated_at
         FROM accounts WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}
