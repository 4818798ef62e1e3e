//! Turns one delivery into an `Outcome`: understand it, apply it in a transaction, and ask Mono for a
//! token when the effect needs one. It decides; the consumer acts on the decision (ack, move to a
//! retry tier, dead-letter, or leave the delivery to return to the queue).
//!
//! Failure policy, classified once here:
//! - a body that is not an event, or one handed out too often, is poison: dead-lettered at once;
//! - Mono refusing the account (4xx but 429) is permanent: dead-lettered with Mono's message;
//! - Mono unavailable (5xx, 429, timeout, connection) is retried in process with backoff, then the
//!   delivery goes to the next delayed-retry tier;
//! - the database unreachable is retried until it is back or the worker stops: the delivery is held,
//!   never acked, never dead-lettered, and its delivery count is not touched;
//! - any other database error is permanent (the event can never be stored as it is).

use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::db::{self, events::EventRecord, events::EventStatus};
use crate::event::IncomingEvent;
use crate::handlers::{self, Applied};
use crate::mono::{MonoClient, MonoError, ReauthToken};
use shared::delivery::{AttemptHistory, DeliveryMeta};
use shared::retry::{self, Failure, RetryError, RetryPolicy};

/// What should happen to a delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Settled and committed with this status: ack.
    Settled(EventStatus),
    /// Settled by an earlier delivery of the same id: ack.
    AlreadySettled,
    /// Could not succeed now but may later: move to the next retry tier.
    Retry { reason: String },
    /// Can never succeed: dead-letter.
    DeadLetter { reason: String, class: DeadClass },
    /// The worker is stopping or lost its broker session mid-way: leave it unacked.
    Abandoned,
}

/// Why a delivery is dead (the `x-dead-class` header, and the reason class of metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadClass {
    /// Not an event, or handed out too many times.
    Poison,
    /// Mono refused the account, or the database refused the event.
    Permanent,
    /// Every retry tier was used up.
    Exhausted,
}

impl DeadClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poison => "poison",
            Self::Permanent => "permanent",
            Self::Exhausted => "exhausted",
        }
    }
}

pub struct Processor {
    pool: PgPool,
    mono: MonoClient,
    mono_retry: RetryPolicy,
    db_retry: RetryPolicy,
    dedup_window: Duration,
    delivery_limit: u32,
}

impl Processor {
    pub fn new(
        pool: PgPool,
        mono: MonoClient,
        mono_retry: RetryPolicy,
        dedup_window: Duration,
        delivery_limit: u32,
    ) -> Self {
        // The database is retried until it is back: 100 ms doubling to 5 s between attempts.
        let db_retry = RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(5));
        Self {
            pool,
            mono,
            mono_retry,
            db_retry,
            dedup_window,
            delivery_limit,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Decides what to do with one delivery. `handed_out` is the broker's count of earlier deliveries
    /// of this message (`x-delivery-count`); `abandon` stops any waiting.
    pub async fn process(
        &self,
        body: &[u8],
        meta: &DeliveryMeta,
        history: &AttemptHistory,
        handed_out: u32,
        abandon: &CancellationToken,
    ) -> (EventRecord, Outcome) {
        let (record, parsed) = IncomingEvent::parse(body, meta, history);
        let event = match parsed {
            Ok(event) => event,
            Err(malformed) => {
                return (
                    record,
                    Outcome::DeadLetter {
                        reason: malformed.to_string(),
                        class: DeadClass::Poison,
                    },
                );
            }
        };
        let span = tracing::Span::current();
        span.record("event", event.record.event.as_str());
        if let Some(account) = &event.account_id {
            span.record("account", account.as_str());
        }
        // The broker dead-letters at the delivery limit on its own, but then nothing records why.
        // Stopping one short keeps the dead-letter queue and the journal in agreement.
        if handed_out + 1 >= self.delivery_limit {
            let reason = format!(
                "handed out {} times without being settled (does it crash the worker?)",
                handed_out + 1
            );
            return (
                record,
                Outcome::DeadLetter {
                    reason,
                    class: DeadClass::Poison,
                },
            );
        }
        let outcome = self.apply(&event, abandon).await;
        (record, outcome)
    }

    async fn apply(&self, event: &IncomingEvent, abandon: &CancellationToken) -> Outcome {
        let mut token: Option<ReauthToken> = None;
        loop {
            let applied = match self.apply_in_transaction(event, token.as_ref(), abandon).await {
                Ok(applied) => applied,
                Err(DbFailure::Abandoned) => return Outcome::Abandoned,
                Err(DbFailure::Permanent(error)) => {
                    let reason = format!("the database refused the event: {error}");
                    return Outcome::DeadLetter {
                        reason,
                        class: DeadClass::Permanent,
                    };
                }
            };
            match applied {
                Applied::Settled(status) => return Outcome::Settled(status),
                Applied::AlreadySettled => return Outcome::AlreadySettled,
                Applied::NeedsToken if token.is_some() => {
                    // Cannot happen: handlers ask for a token only when they have none.
                    let reason = "handler asked for a token it was given".to_owned();
                    return Outcome::DeadLetter {
                        reason,
                        class: DeadClass::Permanent,
                    };
                }
                Applied::NeedsToken => match self.fetch_token(event, abandon).await {
                    Ok(fresh) => token = Some(fresh),
                    Err(outcome) => return outcome,
                },
            }
        }
    }

    /// One transaction, retried while the database is unreachable.
    async fn apply_in_transaction(
        &self,
        event: &IncomingEvent,
        token: Option<&ReauthToken>,
        abandon: &CancellationToken,
    ) -> Result<Applied, DbFailure> {
        let attempt = || async {
            let mut tx = self.pool.begin().await.map_err(classify)?;
            let applied = handlers::apply(&mut tx, event, token, self.dedup_window)
                .await
                .map_err(classify)?;
            match applied {
                Applied::Settled(_) => tx.commit().await.map_err(classify)?,
                _ => tx.rollback().await.map_err(classify)?,
            }
            Ok(applied)
        };
        let on_retry = |error: &sqlx::Error, delay: Duration| {
            tracing::warn!(%error, retry_in = ?delay, "database unavailable; holding the delivery");
        };
        retry::retry(&self.db_retry, abandon, attempt, on_retry)
            .await
            .map_err(|error| match error {
                RetryError::Permanent(error) | RetryError::Exhausted { last: error, .. } => {
                    DbFailure::Permanent(error)
                }
                RetryError::Cancelled(_) => DbFailure::Abandoned,
            })
    }

    async fn fetch_token(
        &self,
        event: &IncomingEvent,
        abandon: &CancellationToken,
    ) -> Result<ReauthToken, Outcome> {
        let account = event
            .account_id
            .as_ref()
            .expect("reauth events carry an account id");
        let attempt = || async {
            self.mono.reauthorise(account).await.map_err(|error| match error {
                MonoError::Unavailable { retry_after, .. } => Failure::Transient { error, retry_after },
                MonoError::Rejected { .. } => Failure::Permanent(error),
            })
        };
        let on_retry = |error: &MonoError, delay: Duration| {
            tracing::warn!(%error, retry_in = ?delay, "Mono call failed; retrying");
        };
        retry::retry(&self.mono_retry, abandon, attempt, on_retry)
            .await
            .map_err(|error| match error {
                RetryError::Permanent(error) => Outcome::DeadLetter {
                    reason: error.to_string(),
                    class: DeadClass::Permanent,
                },
                RetryError::Exhausted { last, attempts } => Outcome::Retry {
                    reason: format!("{last} (after {attempts} calls)"),
                },
                RetryError::Cancelled(_) => Outcome::Abandoned,
            })
    }

    /// Journals a dead letter, retrying while the database is unreachable. `false` if abandoned.
    pub async fn record_dead(&self, record: &EventRecord, reason: &str, abandon: &CancellationToken) -> bool {
        let attempt = || async {
            let mut conn = self.pool.acquire().await.map_err(classify)?;
            db::events::record_dead(&mut conn, record, reason)
                .await
                .map_err(classify)
        };
        let on_retry = |error: &sqlx::Error, delay: Duration| {
            tracing::warn!(%error, retry_in = ?delay, "database unavailable; dead letter not journaled yet");
        };
        match retry::retry(&self.db_retry, abandon, attempt, on_retry).await {
            Ok(()) => true,
            Err(RetryError::Cancelled(_)) => false,
            Err(RetryError::Permanent(error) | RetryError::Exhausted { last: error, .. }) => {
                // The message is in the dead-letter queue either way; only the journal row is missing.
                tracing::error!(%error, "cannot journal the dead letter");
                true
            }
        }
    }
}

enum DbFailure {
    Permanent(sqlx::Error),
    Abandoned,
}

fn classify(error: sqlx::Error) -> Failure<sqlx::Error> {
    if db::is_transient(&error) {
        Failure::Transient {
            error,
            retry_after: None,
        }
    } else {
        Failure::Permanent(error)
    }
}
