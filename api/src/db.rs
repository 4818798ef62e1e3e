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

/// What decides whether a re-auth link can be handed out, and which episode it belongs to.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LinkState {
    pub reauth_required: bool,
    pub unlinked: bool,
    /// `reauth_state_received_at`: moves with every re-auth event applied (required, reauthorized,
    /// unlinked), so a link asked for in one episode is never handed out in the next.
    pub episode: Option<DateTime<Utc>>,
}

pub async fn link_state(pool: &PgPool, id: &str) -> sqlx::Result<Option<LinkState>> {
    sqlx::query_as(
        "SELECT reauth_required, unlinked_at IS NOT NULL AS unlinked, reauth_state_received_at AS episode
         FROM accounts WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// A link Mono created. `Debug` never shows the URL.
#[derive(Clone, sqlx::FromRow)]
pub struct StoredLink {
    #[sqlx(rename = "ref")]
    pub reference: String,
    pub url: String,
    pub created_at: DateTime<Utc>,
}

impl std::fmt::Debug for StoredLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredLink")
            .field("ref", &self.reference)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// The latest link for `account` and `redirect` created since `since` in the episode `episode`.
pub async fn reusable_link(
    pool: &PgPool,
    account: &str,
    redirect: Option<&str>,
    episode: Option<DateTime<Utc>>,
    since: DateTime<Utc>,
) -> sqlx::Result<Option<StoredLink>> {
    sqlx::query_as(
        "SELECT ref, url, created_at FROM reauth_links
         WHERE account_id = $1 AND redirect_url IS NOT DISTINCT FROM $2 AND episode IS NOT DISTINCT FROM $3
           AND created_at >= $4
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(account)
    .bind(redirect)
    .bind(episode)
    .bind(since)
    .fetch_optional(pool)
    .await
}

/// A link Mono created, as stored.
pub struct NewLink<'a> {
    pub reference: &'a str,
    pub account: &'a str,
    pub redirect: Option<&'a str>,
    pub url: &'a str,
    pub created_at: DateTime<Utc>,
    pub episode: Option<DateTime<Utc>>,
    pub key_label: &'a str,
    pub request_id: &'a str,
}

pub async fn store_link(pool: &PgPool, link: &NewLink<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO reauth_links (ref, account_id, redirect_url, url, created_at, episode, key_label, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(link.reference)
    .bind(link.account)
    .bind(link.redirect)
    .bind(link.url)
    .bind(link.created_at)
    .bind(link.episode)
    .bind(link.key_label)
    .bind(link.request_id)
    .execute(pool)
    .await
    .map(drop)
}

/// Records that `reference` was handed out to the key labelled `key_label`.
pub async fn record_link_handout(
    pool: &PgPool,
    reference: &str,
    account: &str,
    key_label: &str,
    source: &str,
    request_id: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO reauth_link_handouts (ref, account_id, key_label, source, request_id)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(reference)
    .bind(account)
    .bind(key_label)
    .bind(source)
    .bind(request_id)
    .execute(pool)
    .await
    .map(drop)
}

/// Whether the schema the API needs is there (the worker applies migrations: `worker migrate`).
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    for table in ["token_issuances", "reauth_links", "reauth_link_handouts"] {
        sqlx::query(&format!("SELECT 1 FROM {table} LIMIT 0")).execute(pool).await.map_err(|_| {
            anyhow::anyhow!(
                "the database has no {table} table: apply the migrations first (`worker migrate`)"
            )
        })?;
    }
    sqlx::query("SELECT token_call_failed_at, link_call_failed_at FROM accounts LIMIT 0")
        .execute(pool)
        .await
        .map_err(|_| {
            anyhow::anyhow!("the database's accounts table is older than this api: apply the migrations first (`worker migrate`)")
        })?;
    Ok(())
}

/// What the api asks Mono for, under the account's lock.
#[derive(Clone, Copy, Debug)]
pub enum MonoCall {
    Token,
    Link,
}

impl MonoCall {
    fn column(self) -> &'static str {
        match self {
            Self::Token => "token_call_failed_at",
            Self::Link => "link_call_failed_at",
        }
    }
}

/// Notes, under the account's lock and before it is released, that this process's call to Mono
/// failed: a request of another process waiting for the lock answers as this one did. Best effort:
/// if the database cannot say so, the waiters call Mono themselves.
pub async fn note_call_failed(pool: &PgPool, id: &str, call: MonoCall) {
    let noted = sqlx::query(&format!("UPDATE accounts SET {} = $2 WHERE id = $1", call.column()))
        .bind(id)
        .bind(Utc::now())
        .execute(pool)
        .await;
    if let Err(error) = noted {
        tracing::warn!(error = %error, "could not note a failed Mono call for the account's waiters");
    }
}

/// Whether a call to Mono of this kind for the account failed at `since` or later.
pub async fn call_failed_since(
    pool: &PgPool,
    id: &str,
    call: MonoCall,
    since: DateTime<Utc>,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(&format!(
        "SELECT COALESCE({} >= $2, false) FROM accounts WHERE id = $1",
        call.column()
    ))
    .bind(id)
    .bind(since)
    .fetch_optional(pool)
    .await
    .map(|failed| failed.unwrap_or(false))
}
