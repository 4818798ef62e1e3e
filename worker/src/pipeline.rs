//! The path of every delivery of one broker session, from the consumer to its ack.
//!
//! ```text
//! consumer ─▶ accept ─┬─ poison ─────────────────────────────────────────────▶ dead letters ─▶ ack
//!                     └─▶ batcher ─▶ processor (one transaction per batch) ─┬─ settled ───────▶ ack
//!                            ▲                                              ├─ refused ─▶ dead ─▶ ack
//!                            │                                              ├─ parked ─▶ tier 1 ─▶ ack
//!                            └──────── token ◀── tokens (Mono, breaker) ◀───┴─ needs token
//!                                                      └─ park / retry / refused ─▶ tier or dead ─▶ ack
//! ```
//!
//! The batcher takes whatever deliveries are waiting (up to `BATCH_MAX`) as soon as one of
//! `BATCH_CONCURRENCY` transaction slots is free, so batches grow under load and a lone delivery
//! waits for nobody. Deliveries that need a token leave the batch, get it outside any transaction,
//! and come back to the batcher with it.
//!
//! A delivery leaves this process only settled, moved (a confirmed copy, then the ack) or with its
//! session. One waiting on our database is parked after `HOLD_MAX_SECS`, and at shutdown, so our
//! own outage never meets RabbitMQ's `consumer_timeout` nor raises its delivery count.

use lapin::message::Delivery;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::acks::AckTracker;
use crate::batch::Candidate;
use crate::db::dead_letters::{self, NewDeadLetter};
use crate::db::events::EventRecord;
use crate::event::IncomingEvent;
use crate::mono::ReauthToken;
use crate::processor::{Hold, Interrupted, ItemOutcome, Processor};
use crate::republish::{DeadClass, Republisher};
use crate::token_path::{self, TokenStep};
use crate::tokens::{Flight, TokenFetcher, TokenOutcome};
use shared::delivery::{AttemptHistory, DeliveryMeta, HEADER_REPLAY_FORCE, as_u32, header_str};
use shared::event::EventKind;
use shared::retry::RetryPolicy;
use shared::telemetry::{self, propagation};
use shared::topology::Topology;

/// Spacing of the tries to move a delivery whose copy the broker did not take: 1 s doubling to 10 s,
/// each ±50 %, so 0.5 s to 15 s apart. Tries close enough that even one held move shows the
/// republisher's judge a node that takes no copy within a minute (`republish::MOVES_FAILING_MAX`).
static MOVE_RETRY: std::sync::LazyLock<RetryPolicy> =
    std::sync::LazyLock::new(|| RetryPolicy::forever(Duration::from_secs(1), Duration::from_secs(10)));

/// How far ahead of this worker's clock a receive stamp may be. A stamp orders an account's events:
/// one an hour ahead (an ingest clock that jumped, a hand-published message stamped in
/// milliseconds) would make every correct event of that hour stale. Clocks kept by NTP differ by
/// milliseconds; a stamp further ahead is ours to fix, so its delivery is parked (it comes back,
/// and is applied once the clocks agree) and counted in `monohook_worker_stamps_ahead_total`.
pub const STAMP_AHEAD_MAX: Duration = Duration::from_secs(10);

/// Whether `received_at` is further ahead of `now` than [`STAMP_AHEAD_MAX`].
pub fn stamp_too_far_ahead(
    received_at: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    received_at.signed_duration_since(now).to_std().is_ok_and(|ahead| ahead > STAMP_AHEAD_MAX)
}

/// What every session's pipeline shares.
pub struct PipelineSettings {
    pub processor: Arc<Processor>,
    pub health: Arc<crate::health::Health>,
    pub tokens: Arc<TokenFetcher>,
    pub topology: Topology,
    pub batch_max: usize,
    pub batch_concurrency: usize,
    /// Deliveries this process held when a broker session was lost.
    pub returns: ReturnsOnLoss,
    /// Longest a delivery is held waiting on our database before it is parked (`HOLD_MAX_SECS`).
    pub hold_max: Duration,
}

/// How many times each delivery went back to the queue because this process lost its broker session
/// while holding it. RabbitMQ counts those returns in `x-delivery-count` like any other, so the poison
/// guard takes them off: several broker restarts must not make a healthy delivery look like poison.
#[derive(Default)]
pub struct ReturnsOnLoss {
    counts: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, u32>>,
}

impl ReturnsOnLoss {
    /// Ids remembered at most; past that the memory starts over (bounded memory through any number
    /// of outages, at the price of counting older returns again).
    const CAPACITY: usize = 200_000;

    pub fn note(&self, ids: &[uuid::Uuid]) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() + ids.len() > Self::CAPACITY {
            counts.clear();
        }
        for id in ids {
            *counts.entry(*id).or_default() += 1;
        }
    }

    fn of(&self, id: uuid::Uuid) -> u32 {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(&id).copied().unwrap_or(0)
    }
}

/// What the poison guard makes of a delivery's hand-outs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handout {
    /// On its way, `counted` times handed out before without being settled.
    Pass { counted: u32 },
    /// Handed out too often: dead-lettered unless the journal has it.
    Suspect { counted: u32 },
    /// Not suspect by our count, but the broker's own count is one return short of its
    /// `x-delivery-limit`, where it would dead-letter the message without a journal row: parked (a
    /// copy starts the broker's count again, and carries ours).
    Park { counted: u32 },
}

/// Judges a delivery that the broker handed out `broker_count` times before (`x-delivery-count`),
/// `lost` of them returns of a session this process lost, after `carried` counted returns of
/// earlier copies (`x-handed-out`).
pub fn judge_handout(broker_count: u32, lost: u32, carried: u32, limit: u32) -> Handout {
    let counted = carried.saturating_add(broker_count.saturating_sub(lost));
    if counted.saturating_add(1) >= limit {
        Handout::Suspect { counted }
    } else if broker_count.saturating_add(1) >= limit {
        Handout::Park { counted }
    } else {
        Handout::Pass { counted }
    }
}

/// One delivery on its way through the pipeline.
struct Work {
    delivery: Delivery,
    history: AttemptHistory,
    event: IncomingEvent,
    token: Option<ReauthToken>,
    /// Times the poison guard counted it handed out before; a parked copy carries it on.
    handed_out: u32,
    /// Keeps the token's fetch on offer to copies of this delivery until it is settled.
    flight: Option<Flight>,
    span: tracing::Span,
    started: Instant,
}

pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<PipelineSettings>,
    republisher: Arc<Republisher>,
    acks: Arc<AckTracker>,
    input: mpsc::UnboundedSender<Work>,
    /// Fired when in-flight work must stop waiting: the session is gone or the grace period is over.
    abandon: CancellationToken,
    /// Fired at shutdown: deliveries waiting on our database are parked rather than returned.
    release: CancellationToken,
    tasks: TaskTracker,
}

impl Pipeline {
    pub fn start(
        settings: Arc<PipelineSettings>,
        republisher: Arc<Republisher>,
        acks: Arc<AckTracker>,
    ) -> Self {
        let (input, output) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            settings,
            republisher,
            acks,
            input,
            abandon: CancellationToken::new(),
            release: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        inner.tasks.spawn(run_batcher(inner.clone(), output));
        Self { inner }
    }

    /// Takes one delivery from the consumer.
    pub fn accept(&self, delivery: Delivery) {
        let inner = &self.inner;
        let meta = DeliveryMeta::from_properties(&delivery.properties, &delivery.data);
        inner.acks.received(delivery.delivery_tag, meta.id.as_uuid());
        let history = AttemptHistory::from_properties(&delivery.properties);
        let header = |name: &str| {
            delivery.properties.headers().as_ref().and_then(|h| h.inner().get(name)).and_then(as_u32)
        };
        let broker_count = header("x-delivery-count").unwrap_or(0);
        let carried = header(crate::republish::HEADER_HANDED_OUT).unwrap_or(0);
        let forced = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| header_str(h, HEADER_REPLAY_FORCE))
            .is_some_and(|v| v == "true");
        let (record, parsed) = IncomingEvent::parse_with(&delivery.data, &meta, &history, forced);
        let now = chrono::Utc::now();
        let ahead = stamp_too_far_ahead(meta.received_at, now);
        inner
            .settings
            .health
            .last_received_ms
            .fetch_max(meta.received_at.min(now).timestamp_millis(), Ordering::Relaxed);
        let span = tracing::info_span!(
            "delivery",
            delivery_id = %meta.id,
            event = record.event.as_str(),
            account = record.account_id.as_deref().unwrap_or_default(),
            attempt = history.previous_attempts + 1,
        );
        // The webhook's trace, begun by ingest, continues here (a no-op while tracing is off).
        propagation::set_parent(&span, delivery.properties.headers().as_ref());
        let started = Instant::now();
        let event = match parsed {
            Ok(event) => event,
            Err(malformed) => {
                let task = inner.clone().dead_letter(
                    delivery,
                    history,
                    record,
                    malformed.to_string(),
                    DeadClass::Poison,
                    started,
                );
                inner.tasks.spawn(task.instrument(span));
                return;
            }
        };
        // The broker dead-letters at the delivery limit on its own, but then nothing records why.
        // Stopping one short keeps the dead-letter queue and the journal in agreement. Returns this
        // process saw its own broker session lose do not count: they say nothing about the delivery.
        // A first delivery (the common case) has nothing to discount: no lock taken for it.
        let lost = match broker_count {
            0 => 0,
            _ => inner.settings.returns.of(meta.id.as_uuid()),
        };
        let handout = judge_handout(broker_count, lost, carried, inner.settings.topology.delivery_limit());
        let work = |handed_out, span| Work {
            delivery,
            history,
            event,
            token: None,
            handed_out,
            flight: None,
            span,
            started,
        };
        if ahead {
            let counted = match handout {
                Handout::Pass { counted } | Handout::Suspect { counted } | Handout::Park { counted } => {
                    counted
                }
            };
            metrics::counter!("monohook_worker_stamps_ahead_total").increment(1);
            let reason = format!(
                "received at {} by its stamp, more than {}s ahead of this worker's clock ({now}): \
                 parked until the clocks agree (ours, not the event's: check ingest's clock)",
                meta.received_at,
                STAMP_AHEAD_MAX.as_secs(),
            );
            span.in_scope(|| tracing::error!(%reason, "receive stamp ahead of this worker's clock"));
            let task = inner.clone().park(work(counted, span.clone()), reason);
            inner.tasks.spawn(task.instrument(span));
            return;
        }
        match handout {
            Handout::Pass { counted } => {
                let _ = inner.input.send(work(counted, span));
            }
            Handout::Suspect { counted } => {
                let task = inner.clone().poison_guard(work(counted, span.clone()), counted + 1);
                inner.tasks.spawn(task.instrument(span));
            }
            Handout::Park { counted } => {
                let reason = format!(
                    "handed out {broker_count} times by the broker, {lost} of them returns of a lost \
                     session: parked before the broker's delivery limit drops it"
                );
                let task = inner.clone().park(work(counted, span.clone()), reason);
                inner.tasks.spawn(task.instrument(span));
            }
        }
    }

    /// Deliveries received and not yet settled.
    pub fn outstanding(&self) -> usize {
        self.inner.acks.outstanding()
    }

    /// Waits until every received delivery is settled, or `grace` is over. Returns whether all were.
    pub async fn drain(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        while self.outstanding() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops all work of this session after it was lost; unsettled deliveries return to the queue, and
    /// the poison guard is told they did so through no fault of theirs.
    pub async fn abandon_lost(&self) {
        self.inner.settings.returns.note(&self.inner.acks.unsettled_ids());
        self.abandon().await;
    }

    /// Parks the deliveries waiting on our database at once (the worker is stopping): returned to
    /// the queue, they would come back with their delivery count raised.
    pub fn release_held(&self) {
        self.inner.release.cancel();
    }

    /// Stops all work of this session; unsettled deliveries return to the queue when it closes.
    pub async fn abandon(&self) {
        self.inner.abandon.cancel();
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.tasks.wait()).await;
    }
}

async fn run_batcher(inner: Arc<Inner>, mut output: mpsc::UnboundedReceiver<Work>) {
    let slots = Arc::new(Semaphore::new(inner.settings.batch_concurrency.max(1)));
    loop {
        let first = tokio::select! {
            work = output.recv() => match work { Some(work) => work, None => return },
            () = inner.abandon.cancelled() => return,
        };
        // Waiting for a free slot lets the next batch grow meanwhile.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = inner.abandon.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < inner.settings.batch_max {
            match output.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        let inner = inner.clone();
        inner.tasks.clone().spawn(async move {
            inner.run_batch(batch).await;
            drop(slot);
        });
    }
}

impl Inner {
    async fn run_batch(self: &Arc<Self>, batch: Vec<Work>) {
        let candidates: Vec<Candidate<'_>> =
            batch.iter().map(|work| Candidate { event: &work.event, token: work.token.as_ref() }).collect();
        let transaction_spans = transaction_spans(&batch);
        let applying = Instant::now();
        let oldest = batch.iter().map(|work| work.started).min().unwrap_or(applying);
        let hold = self.hold_from(oldest);
        let outcomes = self.settings.processor.apply_batch(&candidates, &self.abandon, &hold).await;
        let elapsed_ms = applying.elapsed().as_millis() as u64;
        for (span, outcome) in transaction_spans.iter().zip(&outcomes) {
            span.record("outcome", outcome.as_str());
            if matches!(outcome, ItemOutcome::Refused { .. }) {
                span.record("otel.status_code", "ERROR");
            }
        }
        drop(transaction_spans);
        tracing::debug!(deliveries = candidates.len(), elapsed_ms, "batch applied");
        drop(candidates);
        // A re-authorisation spends the token on offer for its account (the customer used it): a
        // re-auth needed after it must get a fresh one, even while the delivery that fetched the
        // token is still held. Ended before any delivery of this batch goes for a token.
        token_path::spend_offers(&self.settings.tokens, batch.iter().map(|work| &work.event).zip(&outcomes));
        let committed_at = chrono::Utc::now();
        let mut acks = Vec::with_capacity(batch.len());
        for (work, outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                ItemOutcome::Settled(status) => {
                    work.span.in_scope(|| tracing::info!(status = status.as_str(), "delivery settled"));
                    let lag = (committed_at - work.event.received_at).to_std().unwrap_or_default();
                    metrics::histogram!("monohook_worker_end_to_end_lag_seconds").record(lag.as_secs_f64());
                    finished(&work.event, status.as_str(), work.started);
                    acks.push(work.delivery.delivery_tag);
                }
                ItemOutcome::AlreadySettled => {
                    work.span
                        .in_scope(|| tracing::info!("delivery was settled before (redelivery); no effect"));
                    finished(&work.event, "redelivered", work.started);
                    acks.push(work.delivery.delivery_tag);
                }
                ItemOutcome::NeedsToken => {
                    let span = work.span.clone();
                    self.tasks.spawn(self.clone().fetch_token(work).instrument(span));
                }
                ItemOutcome::Refused { reason } => {
                    let span = work.span.clone();
                    let task = self.clone().dead_letter_work(work, reason, DeadClass::Permanent);
                    self.tasks.spawn(task.instrument(span));
                }
                ItemOutcome::Parked { reason } => {
                    let span = work.span.clone();
                    self.tasks.spawn(self.clone().park(work, reason).instrument(span));
                }
                ItemOutcome::Abandoned => {
                    work.span.in_scope(|| tracing::info!("delivery abandoned; it returns to the queue"));
                    finished(&work.event, "abandoned", work.started);
                }
            }
        }
        self.acks.settle(&acks).await;
    }

    /// A delivery handed out too often: one already journaled was applied (its ack was lost), so it
    /// is acked; any other is dead-lettered as poison.
    async fn poison_guard(self: Arc<Self>, work: Work, handed_out: u32) {
        let hold = self.hold_from(work.started);
        match self.settings.processor.is_journaled(work.event.record.id, &self.abandon, &hold).await {
            Err(Interrupted::Abandoned) => finished(&work.event, "abandoned", work.started),
            Err(Interrupted::Park(reason)) => self.park(work, reason).await,
            Ok(true) => {
                tracing::info!(handed_out, "delivery was settled before (redelivery); no effect");
                finished(&work.event, "redelivered", work.started);
                self.acks.settle(&[work.delivery.delivery_tag]).await;
            }
            Ok(false) => {
                let reason = format!(
                    "handed out {handed_out} times without being settled (does it crash the worker?)"
                );
                self.dead_letter_work(work, reason, DeadClass::Poison).await;
            }
        }
    }

    /// How long work received at `received` may wait on the database.
    fn hold_from(&self, received: Instant) -> Hold<'_> {
        Hold {
            until: tokio::time::Instant::from_std(received + self.settings.hold_max),
            release: &self.release,
        }
    }

    async fn fetch_token(self: Arc<Self>, mut work: Work) {
        let held = work.token.take().map(|token| (token, work.flight.take()));
        let step = token_path::next_step(
            &self.settings.tokens,
            &self.settings.processor,
            &work.event,
            held,
            &self.abandon,
        )
        .await;
        let (outcome, flight) = match step {
            TokenStep::Answer(outcome, flight) => (outcome, flight),
            // A copy settled the re-auth meanwhile: the batcher settles this one, without Mono.
            TokenStep::Settled => {
                let _ = self.input.send(work);
                return;
            }
            TokenStep::Park(reason) => return self.park(work, reason).await,
        };
        work.flight = flight;
        match outcome {
            TokenOutcome::Token(token) => {
                work.token = Some(token);
                let _ = self.input.send(work);
            }
            TokenOutcome::Park { reason } => self.park(work, reason).await,
            TokenOutcome::Retry { reason } => {
                let tier = (work.history.previous_attempts + 1) as usize;
                if tier <= self.settings.topology.retry_delays().len() {
                    let moved = self
                        .patiently(|| {
                            self.republisher.to_retry_tier(&work.delivery, tier, &work.history, &reason)
                        })
                        .await;
                    metrics::counter!("monohook_worker_retries_total", "tier" => tier.to_string())
                        .increment(1);
                    self.settle_move(work, moved.then_some("retried"), &reason, tier).await;
                } else {
                    let reason = format!("retries exhausted: {reason}");
                    self.dead_letter_work(work, reason, DeadClass::Exhausted).await;
                }
            }
            TokenOutcome::Refused { reason, .. } => {
                self.dead_letter_work(work, reason, DeadClass::Permanent).await
            }
            TokenOutcome::Abandoned => {
                tracing::info!("delivery abandoned; it returns to the queue");
                finished(&work.event, "abandoned", work.started);
            }
        }
    }

    /// Moves a delivery to the first retry tier without spending an attempt: what failed is ours (an
    /// outage of Mono, our key, our database), not the delivery's.
    async fn park(self: Arc<Self>, work: Work, reason: String) {
        let moved = self
            .patiently(|| self.republisher.park(&work.delivery, &work.history, work.handed_out, &reason))
            .await;
        self.settle_move(work, moved.then_some("parked"), &reason, 1).await;
    }

    /// Acks a delivery moved to a retry tier; one whose move was abandoned stays unacked and returns
    /// to the queue with the session.
    async fn settle_move(&self, work: Work, moved: Option<&'static str>, reason: &str, tier: usize) {
        match moved {
            Some(outcome) => {
                let delay = self.settings.topology.retry_delays().get(tier - 1).copied().unwrap_or_default();
                tracing::warn!(%reason, tier, retry_in = ?delay, outcome, "moved to a retry tier");
                finished(&work.event, outcome, work.started);
                self.acks.settle(&[work.delivery.delivery_tag]).await;
            }
            None => {
                tracing::info!("delivery abandoned before it could be moved; it returns to the queue");
                finished(&work.event, "abandoned", work.started);
            }
        }
    }

    /// Publishes a delivery's copy, holding the delivery and trying again with backoff (declaring the
    /// topology again in between) while the move fails. A nack instead would send it straight back,
    /// burning its delivery limit in milliseconds. `false` once the session is abandoned.
    async fn patiently<F, Fut>(&self, mut publish: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), crate::republish::RepublishError>>,
    {
        let mut schedule = MOVE_RETRY.schedule();
        loop {
            let error = match publish().await {
                Ok(()) => return true,
                Err(error) => error,
            };
            let delay = schedule.next_delay().unwrap_or(MOVE_RETRY.max_interval);
            tracing::warn!(%error, retry_in = ?delay, "cannot move the delivery; holding it and trying again");
            metrics::counter!("monohook_worker_move_failures_total").increment(1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.abandon.cancelled() => return false,
            }
            if let Err(error) = self.republisher.redeclare().await {
                tracing::warn!(%error, "declaring the topology again failed");
            }
        }
    }

    /// [`Inner::dead_letter`] for a delivery that was understood as an event.
    async fn dead_letter_work(self: Arc<Self>, work: Work, reason: String, class: DeadClass) {
        self.dead_letter(work.delivery, work.history, work.event.record, reason, class, work.started).await;
    }

    /// Stores the delivery as a dead letter (its row and its journal status, one transaction), then
    /// acks it. While the database fails it is held like any other delivery, never past
    /// `HOLD_MAX_SECS`: then it is parked and comes back to be stored later.
    async fn dead_letter(
        self: Arc<Self>,
        delivery: Delivery,
        history: AttemptHistory,
        record: EventRecord,
        reason: String,
        class: DeadClass,
        started: Instant,
    ) {
        let letter = NewDeadLetter {
            id: record.id,
            event: record.event.clone(),
            account_id: record.account_id.clone(),
            body: delivery.data.clone(),
            body_sha256: record.body_sha256.clone(),
            received_at: record.received_at,
            headers: dead_letters::carried_headers(&delivery.properties),
            reason: reason.clone(),
            class: class.as_str(),
            attempts: i32::try_from(history.previous_attempts + 1).unwrap_or(i32::MAX),
            first_attempt_at: history.first_attempt_at,
        };
        let hold = self.hold_from(started);
        match self.settings.processor.bury(&record, &letter, &self.abandon, &hold).await {
            Ok(()) => {}
            Err(Interrupted::Abandoned) => {
                tracing::info!(
                    "delivery abandoned before it could be dead-lettered; it returns to the queue"
                );
                return;
            }
            Err(Interrupted::Park(why)) => {
                let moved = self.patiently(|| self.republisher.park(&delivery, &history, 0, &why)).await;
                if moved {
                    tracing::warn!(reason = %why, "the dead letter could not be stored; parked to be stored later");
                    self.acks.settle(&[delivery.delivery_tag]).await;
                }
                return;
            }
        }
        tracing::warn!(%reason, class = class.as_str(), "dead-lettered");
        metrics::counter!("monohook_worker_dead_letters_total", "class" => class.as_str()).increment(1);
        let label =
            event_label(&shared::event::EventKind::from_name(&record.event), !record.event.is_empty());
        metrics::counter!("monohook_worker_deliveries_total", "event" => label, "outcome" => "dead_lettered")
            .increment(1);
        metrics::histogram!("monohook_worker_processing_seconds", "event" => label)
            .record(started.elapsed().as_secs_f64());
        self.acks.settle(&[delivery.delivery_tag]).await;
    }
}

/// One span per delivery over the batch's shared transaction (load, decide, write, commit), each a
/// child of its delivery's span: a batch holds deliveries of many traces, and a span has one parent.
/// Each says how big the batch was and what became of its delivery. None while tracing is off.
fn transaction_spans(batch: &[Work]) -> Vec<tracing::Span> {
    if !telemetry::tracing_enabled() {
        return Vec::new();
    }
    batch
        .iter()
        .map(|work| {
            tracing::info_span!(
                parent: &work.span,
                "db.transaction",
                otel.kind = "client",
                db.system.name = "postgresql",
                batch.size = batch.len(),
                outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        })
        .collect()
}

/// Counts a delivery's outcome and how long it took.
fn finished(event: &IncomingEvent, outcome: &'static str, started: Instant) {
    let label = event_label(&event.kind, true);
    metrics::counter!("monohook_worker_deliveries_total", "event" => label, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("monohook_worker_processing_seconds", "event" => label)
        .record(started.elapsed().as_secs_f64());
}

/// A low-cardinality label for an event: its short name, `other`, or `invalid`.
fn event_label(kind: &EventKind, parsed: bool) -> &'static str {
    if !parsed {
        return "invalid";
    }
    match kind {
        EventKind::ReauthorisationRequired => "reauthorisation_required",
        EventKind::AccountReauthorized => "account_reauthorized",
        EventKind::AccountUpdated => "account_updated",
        EventKind::AccountConnected => "account_connected",
        EventKind::AccountUnlinked => "account_unlinked",
        EventKind::SyncFailed => "sync_failed",
        EventKind::Other(_) => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_of_lost_sessions_never_let_the_brokers_limit_drop_a_delivery() {
        // Nine hand-outs, five of them returns of sessions this process lost: not poison by our
        // count, but one more return and the broker dead-letters it with no journal row.
        assert_eq!(judge_handout(9, 5, 0, 10), Handout::Park { counted: 4 });
        // The parked copy starts the broker's count again and carries ours on.
        assert_eq!(judge_handout(0, 0, 4, 10), Handout::Pass { counted: 4 });
        assert_eq!(judge_handout(5, 0, 4, 10), Handout::Suspect { counted: 9 });
        assert_eq!(judge_handout(9, 0, 0, 10), Handout::Suspect { counted: 9 });
        assert_eq!(judge_handout(8, 8, 0, 10), Handout::Pass { counted: 0 });
    }

    #[test]
    fn counts_near_their_maximum_saturate_instead_of_wrapping() {
        // A hand-made `x-handed-out` of u32::MAX is poison by its own count, not a first delivery.
        assert_eq!(judge_handout(0, 0, u32::MAX, 10), Handout::Suspect { counted: u32::MAX });
        assert_eq!(judge_handout(u32::MAX, 0, u32::MAX, 10), Handout::Suspect { counted: u32::MAX });
        assert_eq!(judge_handout(u32::MAX, u32::MAX, 0, 10), Handout::Park { counted: 0 });
    }

    #[test]
    fn a_stamp_is_trusted_up_to_ten_seconds_ahead() {
        let now = chrono::Utc::now();
        assert!(!stamp_too_far_ahead(now + chrono::Duration::seconds(10), now));
        assert!(stamp_too_far_ahead(now + chrono::Duration::seconds(11), now));
        assert!(!stamp_too_far_ahead(now - chrono::Duration::days(400), now));
        assert!(stamp_too_far_ahead(chrono::DateTime::<chrono::Utc>::MAX_UTC, now));
    }
}
