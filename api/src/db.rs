//! The API's queries. Reading an account is one statement; so is reading a stored token (its record
//! is written in batches, `recorder`). Storing a fresh token is one short transaction whose row-lock
//! wait is bounded (`lock_timeout`). No query here is ever held open across a call to Mono: the
//! account's lock for a refresh lives on a connection of its own (`locks`), never the pool's.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

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

/// Longest the store waits for the account's row lock (a worker batch holding it), so that a
/// refresh never queues on the database for long.
const STORE_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

/// What became of a fresh token.
pub enum Store {
    Stored,
    /// The account changed while Mono answered, or holds a token Mono issued later: as it is now.
    NotStored(TokenState),
    Missing,
}

/// Stores a fresh token, under the row lock, only if the account still needs re-auth and no token
/// Mono issued later is stored; if not, reads the account as it is. One short transaction.
pub async fn store_fresh(
    pool: &PgPool,
    id: &str,
    token: &str,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<Store> {
    let mut tx = pool.begin().await?;
    sqlx::query(STORE_LOCK_TIMEOUT).execute(&mut *tx).await?;
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
    .execute(&mut *tx)
    .await?;
    let outcome = if updated.rows_affected() == 1 {
        Store::Stored
    } else {
        token_state(&mut *tx, id).await?.map_or(Store::Missing, Store::NotStored)
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Whether the schema the API needs is there (the worker applies migrations: `worker migrate`).
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("SELECT 1 FROM token_issuances LIMIT 0").execute(pool).await.map(drop).map_err(|_| {
        anyhow::anyhow!(
            "the database has no token_issuances table: apply the migrations first (`worker migrate`)"
        )
    })
}
