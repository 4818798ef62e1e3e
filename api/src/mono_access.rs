//! What a call to Mono on the app's behalf needs, shared by fresh tokens (`refresh`) and re-auth
//! links (`links`).

use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

use crate::locks::AccountLocks;
use crate::refusals::RefusalMemory;
use mono_client::tokens::TokenFetcher;

/// `Retry-After` when Mono failed and the breaker gives no better estimate.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

pub struct MonoAccess {
    /// For single short statements and the store's short transaction, never held across Mono.
    pub pool: PgPool,
    /// The Mono client behind its breaker and single flight.
    pub tokens: Arc<TokenFetcher>,
    /// How long a request waits for the lock, a Mono slot and Mono (`TOKEN_DEADLINE_MS`).
    pub deadline: Duration,
    /// The cross-process account locks, on a connection of their own (never one of `pool`'s).
    pub account_locks: Arc<AccountLocks>,
    /// Bounds the calls under way (and so the locks held), taken before any database work.
    pub slots: Arc<Semaphore>,
    /// Accounts Mono refused lately: answered 422 without asking it again.
    pub refusals: RefusalMemory,
}

impl MonoAccess {
    /// How much longer the breaker refuses calls, while it is open; `None` once the opening's time
    /// is up (the next call is the probe that may close it) or while it is closed.
    pub fn circuit_open_for(&self) -> Option<Duration> {
        self.tokens.retry_in().filter(|left| !left.is_zero())
    }

    /// Whether Mono is unavailable to the api now: its breaker is open, or Mono refuses our key.
    pub fn unavailable(&self) -> bool {
        self.circuit_open_for().is_some() || self.tokens.key_refused()
    }

    /// `Retry-After` for a Mono that failed: the breaker's estimate, else a default.
    pub fn retry_after(&self) -> Duration {
        self.tokens.retry_in().filter(|d| !d.is_zero()).unwrap_or(DEFAULT_RETRY_AFTER)
    }
}
