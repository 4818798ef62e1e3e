//! The account's cross-process locks for a token refresh and for a re-auth link, taken so that they
//! cost no connection of the pool that serves reads.
//!
//! A lock is PostgreSQL's session-level advisory lock on `monohook.reauth-token:<account>` (the key
//! older api processes take with `pg_advisory_xact_lock`, so both exclude each other during a rolling
//! deploy), or for a link on `monohook.reauth-link:<account>\n<redirect>`. Every lock a process
//! holds lives on one dedicated connection, the *lock session*, opened beside the pool: a session
//! can hold any number of advisory locks, and each statement on it (`pg_try_advisory_lock`,
//! `pg_advisory_unlock`) takes well under a millisecond, so one connection serves every account of
//! the process. Nobody ever blocks on the session: a lock is *tried*, and a caller that finds it
//! taken waits in its own task (`refresh`, `links`), polling, within its deadline.
//!
//! Failure: a statement that fails or takes longer than [`STATEMENT_TIMEOUT`] closes the session (a
//! new one is opened on the next try). The locks it held die with it; their holders are not told.
//! At worst another process then calls Mono for an account already being refreshed, and the guard on
//! the store (`db::store_fresh`) still never lets an earlier-issued token replace a later one.

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::sync::Arc;
use std::time::Duration;

/// The token lock's key is this and the account id (what older api processes lock, too).
const TOKEN_LOCK_PREFIX: &str = "monohook.reauth-token:";
/// The link lock's key is this, the account id, a newline and the redirect.
const LINK_LOCK_PREFIX: &str = "monohook.reauth-link:";

/// Longest a statement on the lock session may take before the session is considered broken.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock session could not be opened, or a statement on it failed.
    #[error("the lock session failed: {0}")]
    Session(#[from] sqlx::Error),
    /// A statement on the lock session took longer than its timeout.
    #[error("the lock session did not answer within {STATEMENT_TIMEOUT:?}")]
    Stalled,
}

struct Session {
    /// Bumped each time a session is opened: a guard from an older session has nothing to unlock.
    generation: u64,
    connection: Option<PgConnection>,
}

/// The process's lock session.
pub struct AccountLocks {
    options: PgConnectOptions,
    session: tokio::sync::Mutex<Session>,
}

/// A held account lock; released by [`AccountLock::release`], or in the background when dropped.
pub struct AccountLock {
    locks: Arc<AccountLocks>,
    /// The whole lock key (prefix and account).
    account: String,
    generation: u64,
    released: bool,
}

impl AccountLocks {
    /// A lock session connecting with `options` (the pool's), opened on first use.
    pub fn new(options: PgConnectOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            session: tokio::sync::Mutex::new(Session { generation: 0, connection: None }),
        })
    }

    /// Takes the account's token lock if nobody holds it (`None` if another session does).
    pub async fn try_lock(self: &Arc<Self>, account: &str) -> Result<Option<AccountLock>, LockError> {
        self.try_lock_key(format!("{TOKEN_LOCK_PREFIX}{account}")).await
    }

    /// Takes the lock on asking Mono for a re-auth link for `account` to `redirect` (a lock of its
    /// own: a link request never makes a token request take it that its refresh failed).
    pub async fn try_lock_link(
        self: &Arc<Self>,
        account: &str,
        redirect: &str,
    ) -> Result<Option<AccountLock>, LockError> {
        self.try_lock_key(format!("{LINK_LOCK_PREFIX}{account}\n{redirect}")).await
    }

    async fn try_lock_key(self: &Arc<Self>, key: String) -> Result<Option<AccountLock>, LockError> {
        let (taken, generation) =
            self.run("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &key, None).await?;
        Ok(taken.then(|| AccountLock { locks: self.clone(), account: key, generation, released: false }))
    }

    async fn unlock(&self, key: &str, generation: u64) -> Result<(), LockError> {
        self.run("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key, Some(generation)).await.map(drop)
    }

    /// Runs one boolean statement on the session, opening it if needed, and returns the session's
    /// generation. With `on_generation`, only on that session: a lock taken on a session that is gone
    /// went with it, so there is nothing to run.
    async fn run(
        &self,
        statement: &'static str,
        account: &str,
        on_generation: Option<u64>,
    ) -> Result<(bool, u64), LockError> {
        let mut session = self.session.lock().await;
        if let Some(generation) = on_generation
            && (session.generation != generation || session.connection.is_none())
        {
            return Ok((false, generation));
        }
        let answer = tokio::time::timeout(STATEMENT_TIMEOUT, async {
            if session.connection.is_none() {
                let connection = PgConnection::connect_with(&self.options).await?;
                session.generation += 1;
                session.connection = Some(connection);
            }
            let connection = session.connection.as_mut().expect("opened above");
            sqlx::query_scalar::<_, bool>(statement).bind(account).fetch_one(connection).await
        })
        .await;
        match answer {
            Ok(Ok(value)) => Ok((value, session.generation)),
            Ok(Err(error)) => {
                session.connection = None;
                Err(error.into())
            }
            Err(_) => {
                session.connection = None;
                Err(LockError::Stalled)
            }
        }
    }
}

impl AccountLock {
    /// Releases the lock now.
    pub async fn release(mut self) {
        self.released = true;
        if let Err(error) = self.locks.unlock(&self.account, self.generation).await {
            tracing::warn!(error = %error, "releasing an account lock failed; it ends with its session");
        }
    }
}

impl Drop for AccountLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (locks, account, generation) =
            (self.locks.clone(), std::mem::take(&mut self.account), self.generation);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = locks.unlock(&account, generation).await {
                    tracing::warn!(error = %error, "releasing an account lock failed; it ends with its session");
                }
            });
        }
    }
}
