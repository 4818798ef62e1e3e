//! Applying a batch of deliveries to PostgreSQL in one transaction: load and lock, decide in memory
//! (`batch::decide`), write, commit.
//!
//! Failure policy for the database, by whose fault an error is ([`db::classify`]):
//! - an outage (unreachable, restarting, failing over, credentials refused): the whole batch is
//!   retried with backoff until it commits or the worker stops; its deliveries are held, never acked
//!   or requeued, so the delivery limit is not touched;
//! - any other error of ours (a grant, a timeout, a trigger, a deadlock): the batch is retried the
//!   same way, but only [`TRIES_BEFORE_SPLIT`] times, since one row may cause it every time; then it
//!   is split and each delivery tried alone as often, and one that still fails is parked (the caller
//!   moves it to the first retry tier without spending an attempt), so the rest commit and the
//!   culprit keeps being retried, never dead-lettered;
//! - the event's own data refused (classes 22 and 23): the batch is split at once, and the culprit
//!   is refused (dead-lettered by the caller).
//!
//! No wait on the database outlasts its [`Hold`]: once a batch's oldest delivery has been held
//! `HOLD_MAX_SECS`, or the worker is stopping, its deliveries are parked instead (the broker closes a
//! channel that holds a delivery past its `consumer_timeout` and counts the return of every delivery
//! it held against the delivery limit).

use sqlx::PgPool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::batch::{self, Candidate, Decision};
use crate::db::notifications::{Subscriptions, Written};
use crate::db::{self, DbFault, batch::JournalEntry, events::EventStatus};
use crate::journal_payload::JournalPayload;
use crate::notify;
use shared::retry::{self, Failure, RetryError, RetryPolicy};

/// How long an attempt with no failure before it may still run once its [`Hold`] has ended (a
/// stopping worker): a database that answers commits a batch well within it.
const FIRST_ATTEMPT_ALLOWANCE: Duration = Duration::from_millis(500);

/// What became of one delivery of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Journaled and committed with this status: ack.
    Settled(EventStatus),
    /// Settled by an earlier delivery of the same id: ack.
    AlreadySettled,
    /// Needs a re-auth token from Mono first.
    NeedsToken,
    /// The database refuses this event for good.
    Refused { reason: String },
    /// The database keeps failing this event alone, for a reason of ours: try it again later.
    Parked { reason: String },
    /// The worker is stopping or lost its broker session before the batch committed.
    Abandoned,
}

/// How long deliveries may wait on the database before they leave through the first retry tier
/// (parked, no attempt spent), rather than stay unacked.
pub struct Hold<'a> {
    /// When the oldest delivery waiting has been held `HOLD_MAX_SECS`.
    pub until: tokio::time::Instant,
    /// Fired when the worker stops: a delivery returned to the queue would come back with its
    /// delivery count raised, a parked copy starts the count again.
    pub release: &'a CancellationToken,
}

impl Hold<'_> {
    /// Why a wait ended this way, for `x-last-error`.
    fn reason(&self, error: &dyn std::fmt::Display) -> String {
        if self.release.is_cancelled() {
            format!("the worker stopped while the database failed (ours, not the event's): {error}")
        } else {
            format!("held for HOLD_MAX_SECS while the database failed (ours, not the event's): {error}")
        }
    }
}

/// Why [`Processor::retry_held`] gave up.
enum Held<E> {
    /// As [`retry::retry`] ended.
    Retry(RetryError<E>),
    /// The [`Hold`] ended during an attempt that followed a failure; carries that failure.
    Ended(String),
}

/// Why a wait on the database ended without an answer.
pub enum Interrupted {
    /// The session is gone or the grace period is over: the delivery returns with the session.
    Abandoned,
    /// The [`Hold`] ended: park the delivery, for this reason.
    Park(String),
}

impl ItemOutcome {
    /// A short name for traces.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Settled(_) => "committed",
            Self::AlreadySettled => "already_settled",
            Self::NeedsToken => "needs_token",
            Self::Refused { .. } => "refused",
            Self::Parked { .. } => "parked",
            Self::Abandoned => "abandoned",
        }
    }
}

/// How many times a batch (or a lone delivery) meeting an error of ours that is not an outage is
/// tried before it is split (or the delivery parked): enough to ride out a deadlock or a brief lock
/// wait, few enough that one row failing every time holds the others for a second or so, plus the
/// statement's own time.
pub const TRIES_BEFORE_SPLIT: u32 = 3;

/// How long a worker's claim on an account's call to Mono holds off the others: longer than a call
/// with its retries (Mono's timeout, `MONO_RETRY_BUDGET_SECS`) and the batch that stores its token.
/// A claim this old belongs to a worker that died mid-call.
pub const TOKEN_CLAIM_TTL: Duration = Duration::from_secs(60);
/// How often a worker waiting on another's claim decides again.
const CLAIM_POLL: Duration = Duration::from_millis(200);

pub struct Processor {
    pool: PgPool,
    /// This process's id in `token_fetch_claims`.
    holder: uuid::Uuid,
    db_retry: RetryPolicy,
    dedup_window: Duration,
    /// What the journal keeps of each body (`JOURNAL_PAYLOAD`).
    journal_payload: JournalPayload,
    /// Which of the app's endpoints take which notifications (none: nothing is written).
    subscriptions: Subscriptions,
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A delivery of the batch was journaled by another transaction meanwhile; decide again.
    #[error("a delivery of the batch was settled concurrently")]
    Conflict,
}

impl Processor {
    pub fn new(pool: PgPool, dedup_window: Duration) -> Self {
        // The database is retried until it is back: 100 ms doubling to 5 s between attempts, each
        // ±50 % (so up to 7.5 s).
        let db_retry = RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(5));
        Self {
            pool,
            holder: uuid::Uuid::new_v4(),
            db_retry,
            dedup_window,
            journal_payload: JournalPayload::default(),
            subscriptions: Subscriptions::default(),
        }
    }

    /// Keeps `kept` of each body in the journal instead of the default (`minimal`).
    pub fn with_journal_payload(mut self, kept: JournalPayload) -> Self {
        self.journal_payload = kept;
        self
    }

    /// Notifications are written for these endpoints' kinds.
    pub fn with_subscriptions(mut self, subscriptions: Subscriptions) -> Self {
        self.subscriptions = subscriptions;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies `candidates` (in delivery order) and says what became of each, in the same order.
    pub async fn apply_batch(
        &self,
        candidates: &[Candidate<'_>],
        abandon: &CancellationToken,
        hold: &Hold<'_>,
    ) -> Vec<ItemOutcome> {
        // Failures of ours that are not an outage, counted so that one row cannot hold the batch.
        let ours = std::sync::atomic::AtomicU32::new(0);
        let attempt = || async {
            self.apply_once(candidates).await.map_err(|error| match &error {
                BatchError::Conflict => Failure::Transient { error, retry_after: None },
                BatchError::Database(db_error) => match db::classify(db_error) {
                    DbFault::Outage => Failure::Transient { error, retry_after: None },
                    DbFault::Ours if ours.fetch_add(1, Ordering::Relaxed) + 1 < TRIES_BEFORE_SPLIT => {
                        Failure::Transient { error, retry_after: None }
                    }
                    DbFault::Ours | DbFault::Event => Failure::Permanent(error),
                },
            })
        };
        let on_retry = |error: &BatchError, delay: Duration| {
            tracing::warn!(%error, retry_in = ?delay, deliveries = candidates.len(), "database error of ours; holding the deliveries");
        };
        match self.retry_held(abandon, hold, attempt, on_retry).await {
            Ok(outcomes) => outcomes,
            Err(Held::Retry(RetryError::Cancelled(_)) | Held::Ended(_)) if abandon.is_cancelled() => {
                vec![ItemOutcome::Abandoned; candidates.len()]
            }
            Err(Held::Retry(RetryError::Cancelled(error))) => {
                vec![ItemOutcome::Parked { reason: hold.reason(&error) }; candidates.len()]
            }
            Err(Held::Ended(error)) => {
                vec![ItemOutcome::Parked { reason: hold.reason(&error) }; candidates.len()]
            }
            Err(Held::Retry(RetryError::Permanent(error) | RetryError::Exhausted { last: error, .. })) => {
                let ours = match &error {
                    BatchError::Database(db_error) => db::classify(db_error) != DbFault::Event,
                    BatchError::Conflict => true,
                };
                if let [_single] = candidates {
                    return vec![if ours {
                        ItemOutcome::Parked {
                            reason: format!(
                                "the database failed the event {TRIES_BEFORE_SPLIT} times (ours, not the event's): {error}"
                            ),
                        }
                    } else {
                        ItemOutcome::Refused { reason: format!("the database refused the event: {error}") }
                    }];
                }
                tracing::warn!(%error, deliveries = candidates.len(), "a batch failed; retrying its deliveries one by one");
                let mut outcomes = Vec::with_capacity(candidates.len());
                for candidate in candidates {
                    outcomes.extend(
                        Box::pin(self.apply_batch(std::slice::from_ref(candidate), abandon, hold)).await,
                    );
                }
                outcomes
            }
        }
    }

    async fn apply_once(&self, candidates: &[Candidate<'_>]) -> Result<Vec<ItemOutcome>, BatchError> {
        let mut conn = self.pool.acquire().await?;
        let result = self.apply_on(&mut conn, candidates).await;
        if let Err(BatchError::Database(error)) = &result
            && db::poisons_connection(error)
        {
            // A session on a replica (or with stale credentials) would fail the same way forever.
            conn.close_on_drop();
        }
        result
    }

    async fn apply_on(
        &self,
        conn: &mut sqlx::pool::PoolConnection<sqlx::Postgres>,
        candidates: &[Candidate<'_>],
    ) -> Result<Vec<ItemOutcome>, BatchError> {
        let mut tx = db::begin(conn).await?;
        let mut state = db::batch::load(&mut tx, candidates, self.dedup_window).await?;
        let decisions = batch::decide(&mut state, candidates, self.dedup_window);
        let journal: Vec<JournalEntry<'_>> = decisions
            .iter()
            .zip(candidates)
            .filter_map(|(decision, candidate)| match decision {
                Decision::Journal { status, note } => {
                    Some(JournalEntry { record: &candidate.event.record, status: *status, note: *note })
                }
                _ => None,
            })
            .collect();
        if journal.is_empty() && !state.accounts.values().any(|a| a.changed) {
            // Nothing to write (redeliveries, or deliveries waiting for a token): leave no trace.
            tx.rollback().await?;
            return Ok(decisions
                .into_iter()
                .map(|d| match d {
                    Decision::NeedsToken => ItemOutcome::NeedsToken,
                    _ => ItemOutcome::AlreadySettled,
                })
                .collect());
        }
        let inserted = db::batch::write(&mut tx, &state, &journal, self.journal_payload).await?;
        if !self.subscriptions.is_empty() {
            // The app hears of a change in the transaction that makes it: both commit, or neither.
            let written: Vec<Written<'_>> = state
                .accounts
                .values()
                .filter(|after| after.changed)
                .filter_map(|after| {
                    let notices = notify::change::notices(state.loaded.get(&after.id)?, after);
                    (!notices.is_empty()).then_some(Written { account: after, notices })
                })
                .collect();
            db::notifications::write(&mut tx, &self.subscriptions, &written, state.now).await?;
        }
        // A delivery that brought its token and is journaled ends this process's claim on its
        // account's call, in the transaction that makes the outcome visible: a copy waiting on the
        // claim then decides "duplicate", never "call".
        let calls_done: Vec<&str> = decisions
            .iter()
            .zip(candidates)
            .filter(|(decision, candidate)| {
                matches!(decision, Decision::Journal { .. }) && candidate.token.is_some()
            })
            .filter_map(|(_, candidate)| candidate.event.account_id.as_ref().map(|a| a.as_str()))
            .collect();
        if !calls_done.is_empty() {
            sqlx::query("DELETE FROM token_fetch_claims WHERE account_id = ANY($1) AND holder = $2")
                .bind(&calls_done)
                .bind(self.holder)
                .execute(&mut *tx)
                .await?;
        }
        // An account event is decided under its row lock, so nobody else can journal it meanwhile; if
        // somebody did, the decision was made on stale state. (Other events change nothing: losing
        // the race just makes them redeliveries.)
        let lost_race = decisions.iter().zip(candidates).any(|(decision, candidate)| {
            matches!(decision, Decision::Journal { .. })
                && candidate.event.kind.needs_account()
                && !inserted.contains(&candidate.event.record.id)
        });
        if lost_race {
            return Err(BatchError::Conflict);
        }
        tx.commit().await?;
        Ok(decisions
            .into_iter()
            .zip(candidates)
            .map(|(decision, candidate)| match decision {
                Decision::Journal { status, .. } if inserted.contains(&candidate.event.record.id) => {
                    ItemOutcome::Settled(status)
                }
                Decision::Journal { .. } | Decision::AlreadySettled => ItemOutcome::AlreadySettled,
                Decision::NeedsToken => ItemOutcome::NeedsToken,
            })
            .collect())
    }

    /// Whether `event` still needs a re-auth token, decided again as its batch would decide it now
    /// (nothing is written but the claim). A copy may have settled the re-auth since the batch asked
    /// for a token: then Mono must not be asked for one that nobody will store. Across processes,
    /// the answer `true` comes with this process's claim on the account's call
    /// (`token_fetch_claims`): while another worker holds a live claim, this one waits, deciding
    /// again, until that worker's batch stores the token (a copy: no call), its call fails (the
    /// claim is released) or the claim expires ([`TOKEN_CLAIM_TTL`]). `true` if the database cannot
    /// say (the batch decides again anyway, with the token).
    pub async fn still_needs_token(
        &self,
        event: &crate::event::IncomingEvent,
        abandon: &CancellationToken,
    ) -> bool {
        let account = event.account_id.as_ref().map(|a| a.as_str()).unwrap_or_default();
        loop {
            match self.claim_token_call(account).await {
                Ok(true) => break,
                Ok(false) => tokio::select! {
                    () = tokio::time::sleep(CLAIM_POLL) => {}
                    () = abandon.cancelled() => return true,
                },
                Err(error) => {
                    tracing::debug!(%error, "cannot claim the call to Mono; calling");
                    return true;
                }
            }
        }
        match self.decide_alone(event).await {
            Ok(needed) => {
                if !needed {
                    self.release_token_call(account).await;
                }
                needed
            }
            Err(error) => {
                tracing::debug!(%error, "cannot decide again before calling Mono; calling");
                true
            }
        }
    }

    /// Whether `event`, decided alone now, needs a token (in a transaction that is rolled back).
    async fn decide_alone(&self, event: &crate::event::IncomingEvent) -> sqlx::Result<bool> {
        let candidate = [Candidate { event, token: None }];
        let mut conn = self.pool.acquire().await?;
        let mut tx = db::begin(&mut conn).await?;
        let mut state = db::batch::load(&mut tx, &candidate, self.dedup_window).await?;
        let decisions = batch::decide(&mut state, &candidate, self.dedup_window);
        tx.rollback().await?;
        Ok(decisions.first() == Some(&Decision::NeedsToken))
    }

    /// Claims the call to Mono for `account`: free, expired, or already this process's. `false`
    /// while another process holds a live claim.
    async fn claim_token_call(&self, account: &str) -> sqlx::Result<bool> {
        let ttl = chrono::Duration::from_std(TOKEN_CLAIM_TTL).unwrap_or(chrono::Duration::MAX);
        let claimed: Option<bool> = sqlx::query_scalar(
            "INSERT INTO token_fetch_claims (account_id, holder) VALUES ($1, $2)
             ON CONFLICT (account_id) DO UPDATE SET holder = EXCLUDED.holder, claimed_at = clock_timestamp()
                 WHERE token_fetch_claims.holder = EXCLUDED.holder
                    OR token_fetch_claims.claimed_at < clock_timestamp() - $3::interval
             RETURNING true",
        )
        .bind(account)
        .bind(self.holder)
        .bind(ttl)
        .fetch_optional(&self.pool)
        .await?;
        Ok(claimed.is_some())
    }

    /// Releases this process's claim on `account`'s call (the call failed, or was not needed), so
    /// that another worker's copy need not wait for it to expire. Best effort: it expires anyway.
    pub async fn release_token_call(&self, account: &str) {
        let released = sqlx::query("DELETE FROM token_fetch_claims WHERE account_id = $1 AND holder = $2")
            .bind(account)
            .bind(self.holder)
            .execute(&self.pool)
            .await;
        if let Err(error) = released {
            tracing::debug!(%error, "cannot release the claim on a call to Mono; it expires");
        }
    }

    /// Whether delivery `id` is journaled, retrying while the database fails for a reason of ours
    /// (anything but the event's own data, see [`db::classify`]); `None` if abandoned meanwhile.
    pub async fn is_journaled(
        &self,
        id: uuid::Uuid,
        abandon: &CancellationToken,
        hold: &Hold<'_>,
    ) -> Result<bool, Interrupted> {
        let attempt = || async {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM webhook_events WHERE id = $1)")
                .bind(id)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)
        };
        let on_retry = |error: &sqlx::Error, delay: Duration| {
            tracing::warn!(%error, retry_in = ?delay, "database error of ours; poison guard waiting");
        };
        match self.retry_held(abandon, hold, attempt, on_retry).await {
            Ok(journaled) => Ok(journaled),
            Err(Held::Retry(RetryError::Cancelled(_)) | Held::Ended(_)) if abandon.is_cancelled() => {
                Err(Interrupted::Abandoned)
            }
            Err(Held::Retry(RetryError::Cancelled(error))) => Err(Interrupted::Park(hold.reason(&error))),
            Err(Held::Ended(error)) => Err(Interrupted::Park(hold.reason(&error))),
            // Cannot know: the guard does its job (the dead letter can be replayed; its id is applied once).
            Err(_) => Ok(false),
        }
    }

    /// [`retry::retry`] with the database policy, whose waits end when `abandon` fires or `hold`
    /// ends (then `Cancelled`; `abandon` says which). When the hold ends during an attempt, that
    /// attempt is cut too (`Ended`): at once if it follows a failure, else after
    /// [`FIRST_ATTEMPT_ALLOWANCE`]. A pool acquire or a statement can take seconds on a database that
    /// does not answer (forever on a connection that went silent), longer than a stopping worker's
    /// grace. A cut attempt is rolled back with its connection, or was committed just before: the
    /// parked copy keeps its id and settles once.
    async fn retry_held<T, E, F, Fut>(
        &self,
        abandon: &CancellationToken,
        hold: &Hold<'_>,
        attempt: F,
        mut on_retry: impl FnMut(&E, Duration),
    ) -> Result<T, Held<E>>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure<E>>>,
    {
        // Shared by the two futures below, never across an await.
        let last_error = std::sync::Mutex::new(None::<String>);
        let on_retry = |error: &E, delay: Duration| {
            *last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
            on_retry(error, delay);
        };
        let stop = abandon.child_token();
        let ended = async {
            tokio::select! {
                () = tokio::time::sleep_until(hold.until) => {}
                () = hold.release.cancelled() => {}
            }
            stop.cancel();
            if last_error.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                tokio::time::sleep(FIRST_ATTEMPT_ALLOWANCE).await;
            }
        };
        tokio::select! {
            result = retry::retry(&self.db_retry, &stop, attempt, on_retry) => result.map_err(Held::Retry),
            () = ended => Err(Held::Ended(last_error.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default())),
        }
    }

    /// Stores a dead letter: its row (the whole message) and its journal status `dead`, in one
    /// transaction, retried while the database fails for a reason of ours and never past `hold`
    /// (then the caller parks the delivery: it comes back and is stored later). A body the journal's
    /// jsonb refuses is journaled without its payload; the row keeps the body whatever it holds.
    pub async fn bury(
        &self,
        record: &db::events::EventRecord,
        letter: &db::dead_letters::NewDeadLetter,
        abandon: &CancellationToken,
        hold: &Hold<'_>,
    ) -> Result<(), Interrupted> {
        let bare = db::events::EventRecord { payload: None, ..record.clone() };
        for record in [record, &bare] {
            match self.bury_once(record, letter, abandon, hold).await {
                Ok(()) => return Ok(()),
                Err(Held::Retry(RetryError::Cancelled(_)) | Held::Ended(_)) if abandon.is_cancelled() => {
                    return Err(Interrupted::Abandoned);
                }
                Err(Held::Retry(RetryError::Cancelled(error))) => {
                    return Err(Interrupted::Park(hold.reason(&error)));
                }
                Err(Held::Ended(error)) => return Err(Interrupted::Park(hold.reason(&error))),
                Err(Held::Retry(RetryError::Exhausted { last, .. })) => {
                    return Err(Interrupted::Park(format!(
                        "the dead letter could not be stored (ours, not the event's): {last}"
                    )));
                }
                Err(Held::Retry(RetryError::Permanent(error))) => {
                    tracing::warn!(%error, "the journal refused the body; journaling the dead letter without it");
                }
            }
        }
        Err(Interrupted::Park(
            "the database refuses the dead letter, even without its journal payload".into(),
        ))
    }

    async fn bury_once(
        &self,
        record: &db::events::EventRecord,
        letter: &db::dead_letters::NewDeadLetter,
        abandon: &CancellationToken,
        hold: &Hold<'_>,
    ) -> Result<(), Held<sqlx::Error>> {
        let attempt = || async {
            let mut conn = self.pool.acquire().await.map_err(classify)?;
            let written = async {
                let mut tx = db::begin(&mut conn).await?;
                db::events::record_dead(&mut tx, record, &letter.reason, self.journal_payload).await?;
                db::dead_letters::insert(&mut tx, letter).await?;
                tx.commit().await
            }
            .await;
            if let Err(error) = &written
                && db::poisons_connection(error)
            {
                conn.close_on_drop();
            }
            written.map_err(classify)
        };
        let on_retry = |error: &sqlx::Error, delay: Duration| {
            tracing::warn!(%error, retry_in = ?delay, "database error of ours; dead letter not stored yet");
        };
        self.retry_held(abandon, hold, attempt, on_retry).await
    }
}

/// For the statements about one delivery outside a batch: only the event's own data is permanent.
fn classify(error: sqlx::Error) -> Failure<sqlx::Error> {
    match db::classify(&error) {
        DbFault::Outage | DbFault::Ours => Failure::Transient { error, retry_after: None },
        DbFault::Event => Failure::Permanent(error),
    }
}
