//! `accounts` as operators and tests read it. The worker changes rows in batches (`db::batch`),
//! always under the row lock.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

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
