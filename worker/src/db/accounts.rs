//! `accounts`: loading rows for the handlers, and reading them as operators and tests do. The
//! worker changes rows in batches (`db::batch`), always under the row lock.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::account::AccountState;

/// The accounts `ids` as the handlers change them, in id order; with `lock`, each row stays locked
/// until the transaction ends (in id order, so that transactions sharing accounts never deadlock).
pub async fn load_states<'e>(
    conn: impl PgExecutor<'e>,
    ids: &[&str],
    lock: bool,
) -> sqlx::Result<Vec<AccountState>> {
    macro_rules! select_states {
        ($tail:literal) => {
            concat!(
                "SELECT id, reauth_required, reauth_token, reauth_token_issued_at, reauth_token_expires_at,
                     reauthorized_at, data_status, data_updated_at, last_sync_failed_at, customer_id, connected_at,
                     unlinked_at, reauth_state_received_at, data_state_received_at
                 FROM accounts WHERE id = ANY($1) ORDER BY id",
                $tail
            )
        };
    }
    let query = if lock { select_states!(" FOR UPDATE") } else { select_states!("") };
    sqlx::query_as(query).bind(ids).fetch_all(conn).await
}

/// An account as operators and tests see it: everything but the token itself. Also the document of
/// `worker account --json`, whose shape docs/operations.md promises: add fields, never rename them.
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
