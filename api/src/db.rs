//! The API's queries. Reading an account is one statement; so is reading a stored token (its record
//! is written in batches, `recorder`). A fresh token is fetched and stored in
//! one transaction holding the account's advisory lock, so concurrent requests for one account, in any
//! number of processes, make one call to Mono and hand out the same token. The advisory lock is not
//! the row lock: the worker's batches never wait on a call to Mono.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// An account as the app sees it: never the token.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AccountView {
    pub id: String,
    pub reauth_required: bool,
    pub reauth_token_expires_at: Option<DateTime<Utc>>,
    pub reauthorized_at: Option<DateTime<Utc>>,
    pub data_status: Option<String>,
    pub data_updated_at: Option<DateTime<Utc>>,
    pub connected_at: Option<DateTime<Utc>>,
    pub unlinked_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

const VIEW_COLUMNS: &str = "id, reauth_required, reauth_token_expires_at, reauthorized_at, data_status, \
                            data_updated_at, connected_at, unlinked_at, updated_at";

pub async fn account(pool: &PgPool, id: &str) -> sqlx::Result<Option<AccountView>> {
    sqlx::query_as(&format!("SELECT {VIEW_COLUMNS} FROM accounts WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Up to `limit` accounts after `after` in id order (keyset pagination: a page never repeats or skips
/// a row that stays, whatever changes meanwhile), optionally only those whose flag is `reauth_required`.
pub async fn accounts_page(
    pool: &PgPool,
    reauth_required: Option<bool>,
    after: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<AccountView>> {
    sqlx::query_as(&format!(
        "SELECT {VIEW_COLUMNS} FROM accounts
         WHERE ($1::bool IS NULL OR reauth_required = $1) AND ($2::text IS NULL OR id > $2)
         ORDER BY id LIMIT $3"
    ))
    .bind(reauth_required)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// What decides whether a token can be handed out.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TokenState {
    pub reauth_required: bool,
    pub unlinked: bool,
    pub reauth_token: Option<String>,
    pub reauth_token_issued_at: Option<DateTime<Utc>>,
    pub reauth_token_expires_at: Option<DateTime<Utc>>,
}

impl TokenState {
    /// The stored token, if it still works at `until`.
    pub fn token_working_until(&self, until: DateTime<Utc>) -> Option<(&str, DateTime<Utc>, DateTime<Utc>)> {
        match (&self.reauth_token, self.reauth_token_issued_at, self.reauth_token_expires_at) {
            (Some(token), Some(issued), Some(expires)) if expires >= until => Some((token, issued, expires)),
            _ => None,
        }
    }
}

/// Who asked for a token, recorded with it.
pub struct Issuance<'a> {
    pub account: &'a str,
    pub key_label: &'a str,
    pub request_id: &'a str,
}

/// Takes the account's advisory lock until the transaction ends.
pub async fn lock_account(conn: &mut PgConnection, id: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('monohook.reauth-token:' || $1, 0))")
        .bind(id)
        .execute(conn)
        .await
        .map(drop)
}

pub async fn token_state<'e>(conn: impl sqlx::PgExecutor<'e>, id: &str) -> sqlx::Result<Option<TokenState>> {
    sqlx::query_as(
        "SELECT reauth_required, unlinked_at IS NOT NULL AS unlinked, reauth_token, reauth_token_issued_at,
                reauth_token_expires_at
         FROM accounts WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Stores a fresh token, under the row lock, only if the account still needs re-auth and no token
/// Mono issued later is stored. Whether it was stored.
pub async fn store_fresh(
    conn: &mut PgConnection,
    id: &str,
    token: &str,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let updated = sqlx::query(
        "UPDATE accounts SET reauth_token = $2, reauth_token_issued_at = $3, reauth_token_expires_at = $4,
                             updated_at = clock_timestamp()
         WHERE id = $1 AND reauth_required AND unlinked_at IS NULL
           AND (reauth_token_issued_at IS NULL OR reauth_token_issued_at < $3)",
    )
    .bind(id)
    .bind(token)
    .bind(issued_at)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Records a token handed out.
pub async fn record_issuance(
    conn: &mut PgConnection,
    issuance: &Issuance<'_>,
    source: &str,
    token_issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO token_issuances (account_id, key_label, source, token_issued_at, expires_at, request_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(issuance.account)
    .bind(issuance.key_label)
    .bind(source)
    .bind(token_issued_at)
    .bind(expires_at)
    .bind(issuance.request_id)
    .execute(conn)
    .await
    .map(drop)
}

/// Whether the schema the API needs is there (the worker applies migrations: `worker migrate`).
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("SELECT 1 FROM token_issuances LIMIT 0").execute(pool).await.map(drop).map_err(|_| {
        anyhow::anyhow!(
            "the database has no token_issuances table: apply the migrations first (`worker migrate`)"
        )
    })
}
