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
//! Cancellation: a request's future can be dropped at any await (its client hung up, its deadline
//! came). Every statement on the session therefore runs in a task of its own, which the request only
//! waits for: a `pg_try_advisory_lock` that PostgreSQL has taken is always turned into an
//! [`AccountLock`] by that task, so a guard exists for it whatever happened to the request, and a
//! guard nobody receives is dropped, which unlocks. [`AccountLock::release`] hands its unlock to such a
//! task before its first await, so dropping the release cannot lose it. A lock of the session that
//! outlived its request would be held by this process for hours (session locks are re-entrant: the
//! process itself never notices) while every other process waits out its deadline on that account.
//!
//! Failure: a statement that fails or takes longer than [`STATEMENT_TIMEOUT`] closes the session (a
//! new one is opened on the next try). The locks it held die with it; their holders are not told.
//! At worst another process then calls Mono for an account already being refreshed, and the guard on
//! the store (`db::store_fresh`) still never lets an earlier-issued token replace a later one. A new
//! session is opened outside the statements' mutex, one attempt at a time: callers that queued
//! behind an attempt that failed share its failure at once instead of each trying again in turn
//! (which made the k-th caller wait k connection timeouts), and callers bound every wait by their
//! own deadline (`refresh`, `links`).

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
    /// The attempt to open a session this caller waited for failed.
    #[error("the lock session could not be opened")]
    Unreachable,
    /// The runtime is stopping.
    #[error("the process is stopping")]
    Stopped,
}

struct Session {
    /// Bumped each time a session is opened: a guard from an older session has nothing to unlock.
    generation: u64,
    connection: Option<PgConnection>,
    /// Attempts to open a session so far: a caller that waited for another's attempt and sees it
    /// failed takes that failure as its own.
    connect_attempts: u64,
}

/// The process's lock session.
pub struct AccountLocks {
    options: PgConnectOptions,
    session: tokio::sync::Mutex<Session>,
    /// Held while a session is being opened, never together with a statement: statements of a live
    /// session never wait for a connection attempt.
    connecting: tokio::sync::Mutex<()>,
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
            session: tokio::sync::Mutex::new(Session {
                generation: 0,
                connection: None,
                connect_attempts: 0,
            }),
            connecting: tokio::sync::Mutex::new(()),
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

    /// In a task of its own (see the module's doc): the caller may go away at any await, the lock
    /// the statement takes never goes without a guard.
    async fn try_lock_key(self: &Arc<Self>, key: String) -> Result<Option<AccountLock>, LockError> {
        let locks = self.clone();
        let task = tokio::spawn(async move {
            let (taken, generation) =
                locks.run("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &key, None).await?;
            Ok(taken.then(|| AccountLock { locks, account: key, generation, released: false }))
        });
        task.await.unwrap_or_else(|_| Err(LockError::Stopped))
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
        // A session found broken when used (its backend ended: a failover, an operator) took its
        // locks with it: the statement is run once more on a new one, rather than failing the
        // request that happened to notice.
        let mut retried = false;
        loop {
            let attempts_seen = {
                let mut session = self.session.lock().await;
                if let Some(generation) = on_generation
                    && (session.generation != generation || session.connection.is_none())
                {
                    return Ok((false, generation));
                }
                if let Some(connection) = session.connection.as_mut() {
                    let answer = tokio::time::timeout(
                        STATEMENT_TIMEOUT,
                        sqlx::query_scalar::<_, bool>(statement).bind(account).fetch_one(connection),
                    )
                    .await;
                    return match answer {
                        Ok(Ok(value)) => Ok((value, session.generation)),
                        Ok(Err(error)) if !retried && on_generation.is_none() && session_ended(&error) => {
                            session.connection = None;
                            retried = true;
                            continue;
                        }
                        Ok(Err(error)) => {
                            session.connection = None;
                            Err(error.into())
                        }
                        Err(_) => {
                            session.connection = None;
                            Err(LockError::Stalled)
                        }
                    };
                }
                session.connect_attempts
            };
            self.open_session(attempts_seen).await?;
        }
    }

    /// Opens a session unless one was opened (or failed to open) since the caller saw
    /// `attempts_seen` attempts; then the caller runs its statement, or shares that failure.
    async fn open_session(&self, attempts_seen: u64) -> Result<(), LockError> {
        let _connecting = self.connecting.lock().await;
        {
            let session = self.session.lock().await;
            if session.connect_attempts != attempts_seen {
                return if session.connection.is_some() { Ok(()) } else { Err(LockError::Unreachable) };
            }
        }
        let opened = tokio::time::timeout(STATEMENT_TIMEOUT, PgConnection::connect_with(&self.options)).await;
        let mut session = self.session.lock().await;
        session.connect_attempts += 1;
        match opened {
            Ok(Ok(connection)) => {
                session.generation += 1;
                session.connection = Some(connection);
                Ok(())
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(LockError::Stalled),
        }
    }
}

/// Whether the error says the session itself is gone (its connection closed, its backend ended by
/// an administrator or a failover), not that the statement failed on a live one.
fn session_ended(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|code| code.starts_with("57P") || code.starts_with("08"))
        }
        _ => false,
    }
}

impl AccountLock {
    /// Releases the lock now. The unlock runs in a task of its own, handed over before the first
    /// await: dropping this future (the request went away) cannot keep the lock held.
    pub async fn release(mut self) {
        self.released = true;
        let task = spawn_unlock(self.locks.clone(), std::mem::take(&mut self.account), self.generation);
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for AccountLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        spawn_unlock(self.locks.clone(), std::mem::take(&mut self.account), self.generation);
    }
}

/// Unlocks `key` in the background; `None` if there is no runtime left (the process is ending, and
/// the session with it).
fn spawn_unlock(
    locks: Arc<AccountLocks>,
    key: String,
    generation: u64,
) -> Option<tokio::task::JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    Some(runtime.spawn(async move {
        if let Err(error) = locks.unlock(&key, generation).await {
            tracing::warn!(error = %error, "releasing an account lock failed; it ends with its session");
        }
    }))
}
