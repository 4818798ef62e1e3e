//! The worker's own broker link for what is not consuming work: the outbox relay and the dead-letter
//! conveyor, on a connection apart from the consuming session (a publisher blocked by a broker alarm
//! never holds up the session's acks, and the session's failover never waits on a publish).
//!
//! - **Relay**: publishes `outbox` rows (a replay's copy) with confirms, oldest first, and deletes
//!   each row only after its confirm, in the transaction that locked it (`FOR UPDATE SKIP LOCKED`,
//!   so many workers relay at once). A crash after the confirm publishes the row again: the copy
//!   keeps its message id, and the worker applies an id once.
//! - **Conveyor**: what RabbitMQ dead-letters by itself (the work queue's delivery limit), and what
//!   an earlier version left in `<prefix>.dead`, is stored as a dead letter row (idempotent by
//!   message id) and then acked. A message that cannot be stored yet is returned to the dead queue
//!   (whose delivery limit is a million) after a pause.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, Consumer, message::Delivery};
use secrecy::SecretString;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::db::{dead_letters, outbox};
use crate::event::IncomingEvent;
use crate::processor::{Hold, Interrupted, Processor};
use crate::republish::{CONFIRM_TIMEOUT, DeadClass};
use shared::amqp;
use shared::delivery::{
    AttemptHistory, DeliveryMeta, HEADER_DEAD_CLASS, HEADER_DEAD_REASON, HEADER_LAST_ERROR, header_str,
};
use shared::retry::RetryPolicy;
use shared::topology::Topology;

/// How often the relay looks for outbox rows when it found none.
const RELAY_INTERVAL: Duration = Duration::from_millis(200);
/// Outbox rows published per transaction.
const RELAY_BATCH: i64 = 200;
/// Bound on opening the relay's link: connecting, two channels and the conveyor's consumer.
const LINK_OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the conveyor keeps trying to store one message before returning it to the dead queue.
const CONVEYOR_HOLD: Duration = Duration::from_secs(30);

pub struct RelaySettings {
    pub amqp_url: SecretString,
    pub topology: Topology,
    pub processor: Arc<Processor>,
}

/// Runs the relay and the conveyor until `cancel` fires, reconnecting with backoff whenever the
/// link fails.
pub async fn run(settings: RelaySettings, cancel: CancellationToken) {
    let policy = RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(5));
    let mut schedule = policy.schedule();
    loop {
        match Link::open(&settings).await {
            Ok(link) => {
                schedule.reset();
                let lost = link.serve(&settings, &cancel).await;
                // The old connection goes in the background: closing a blocked one can take long.
                let connection = link.connection.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), connection.close(200, "done".into()))
                            .await;
                });
                match lost {
                    None => return,
                    Some(reason) => {
                        tracing::warn!(%reason, "the relay's RabbitMQ link was lost; reconnecting")
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "the relay cannot connect to RabbitMQ yet"),
        }
        let delay = schedule.next_delay().unwrap_or(policy.max_interval);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return,
        }
    }
}

struct Link {
    connection: Arc<Connection>,
    publish: Channel,
    dead: Consumer,
}

impl Link {
    /// Opens the link within [`LINK_OPEN_TIMEOUT`]: a node that accepts the connection but
    /// answers nothing more must not hold the relay forever.
    async fn open(settings: &RelaySettings) -> anyhow::Result<Self> {
        tokio::time::timeout(LINK_OPEN_TIMEOUT, Self::open_unbounded(settings))
            .await
            .map_err(|_| anyhow::anyhow!("the broker did not answer within {LINK_OPEN_TIMEOUT:?}"))?
    }

    async fn open_unbounded(settings: &RelaySettings) -> anyhow::Result<Self> {
        // No declaration here: the consuming session declared the topology before the relay
        // started, and declaring it again at any later moment would re-create a queue an operator
        // just deleted, under the session that is about to notice and declare it itself. A publish
        // the broker cannot route declares it again (below).
        let connection = amqp::connect(&settings.amqp_url, "monohook-worker-relay").await?;
        let publish = connection.create_channel().await?;
        publish.confirm_select(ConfirmSelectOptions::default()).await?;
        let consume = connection.create_channel().await?;
        consume.basic_qos(16, BasicQosOptions::default()).await?;
        let tag = format!("monohook-conveyor-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let dead = consume
            .basic_consume(
                settings.topology.dead_queue().as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self { connection: Arc::new(connection), publish, dead })
    }

    /// Serves until `cancel` (`None`) or until the link fails (`Some(why)`).
    async fn serve(&self, settings: &RelaySettings, cancel: &CancellationToken) -> Option<String> {
        let mut dead = self.dead.clone();
        let mut tick = tokio::time::interval(RELAY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return None,
                next = dead.next() => match next {
                    Some(Ok(delivery)) => {
                        if let Err(error) = convey(&settings.processor, delivery, cancel).await {
                            return Some(format!("acking a dead letter: {error}"));
                        }
                    }
                    Some(Err(error)) => return Some(error.to_string()),
                    None => return Some("the dead-letter consumer ended".into()),
                },
                _ = tick.tick() => {
                    // A consumer can go quiet after its connection drops: the status says so.
                    if !self.connection.status().connected() {
                        return Some(amqp::connection_lost(&self.connection).await);
                    }
                    // Cut when the worker stops: a database gone silent would hold the stop up
                    // (a query on a silent connection waits forever). A batch cut between its
                    // confirms and its delete is rolled back and published again (same ids).
                    tokio::select! {
                        () = cancel.cancelled() => return None,
                        lost = self.relay_pending(settings) => if lost.is_some() { return lost },
                    }
                }
            }
        }
    }

    /// Publishes outbox rows until none is left or the database fails (`None`), or until the
    /// broker fails (`Some(why)`).
    async fn relay_pending(&self, settings: &RelaySettings) -> Option<String> {
        loop {
            match relay_once(&settings.processor, &self.publish).await {
                Ok(published) if published == RELAY_BATCH as usize => continue,
                Ok(_) => return None,
                Err(RelayError::Database(error)) => {
                    tracing::warn!(%error, "the outbox cannot be read yet");
                    return None;
                }
                Err(RelayError::Broker(error)) => {
                    if let Err(error) = settings.topology.declare_on(&self.connection).await {
                        tracing::warn!(%error, "declaring the topology again failed");
                    }
                    return Some(error);
                }
            }
        }
    }
}

#[derive(Debug)]
enum RelayError {
    Database(sqlx::Error),
    Broker(String),
}

impl From<sqlx::Error> for RelayError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error)
    }
}

/// Publishes one batch of outbox rows and deletes those the broker confirmed. Returns how many.
async fn relay_once(processor: &Processor, channel: &Channel) -> Result<usize, RelayError> {
    use sqlx::Connection;
    let mut conn = processor.pool().acquire().await?;
    let mut tx = conn.begin().await?;
    let rows = outbox::take(&mut tx, RELAY_BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut pending = Vec::with_capacity(rows.len());
    let mut failure = None;
    for row in &rows {
        let published = channel
            .basic_publish(
                row.exchange.as_str().into(),
                row.routing_key.as_str().into(),
                BasicPublishOptions { mandatory: true, immediate: false },
                &row.body,
                row.amqp_properties(),
            )
            .await;
        match published {
            Ok(confirm) => pending.push((row, confirm)),
            Err(error) => {
                failure = Some(format!("publishing an outbox row: {error}"));
                break;
            }
        }
    }
    let mut confirmed = Vec::with_capacity(pending.len());
    for (row, confirm) in pending {
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {
                metrics::counter!("monohook_worker_outbox_published_total", "producer" => row.producer.clone())
                    .increment(1);
                confirmed.push(row.id);
            }
            Ok(Ok(other)) => {
                failure.get_or_insert(format!("the broker did not take an outbox row: {other:?}"));
            }
            Ok(Err(error)) => {
                failure.get_or_insert(format!("the broker did not confirm an outbox row: {error}"));
            }
            Err(_) => {
                failure.get_or_insert(format!("no confirm for an outbox row within {CONFIRM_TIMEOUT:?}"));
            }
        }
    }
    outbox::delete(&mut tx, &confirmed).await?;
    tx.commit().await?;
    match failure {
        Some(error) => Err(RelayError::Broker(error)),
        None => Ok(confirmed.len()),
    }
}

/// Stores one message of `<prefix>.dead` as a dead letter row, then acks it; one that cannot be
/// stored yet goes back to the dead queue after a pause. Err only if the broker refused the ack.
async fn convey(
    processor: &Processor,
    delivery: Delivery,
    cancel: &CancellationToken,
) -> Result<(), lapin::Error> {
    let meta = DeliveryMeta::from_properties(&delivery.properties, &delivery.data);
    let history = AttemptHistory::from_properties(&delivery.properties);
    let (mut record, _) = IncomingEvent::parse_with(&delivery.data, &meta, &history, false);
    // The copy's own attempt count (the broker's dead-lettering adds none).
    record.attempts = i32::try_from(history.previous_attempts.max(1)).unwrap_or(i32::MAX);
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let reason = header_str(&headers, HEADER_DEAD_REASON)
        .or_else(|| {
            header_str(&headers, "x-first-death-reason")
                .map(|why| format!("dead-lettered by the broker ({why}): handed out too many times"))
        })
        .or_else(|| header_str(&headers, HEADER_LAST_ERROR))
        .unwrap_or_else(|| "found in the dead-letter queue".to_owned());
    let class = match header_str(&headers, HEADER_DEAD_CLASS).as_deref() {
        Some("permanent") => DeadClass::Permanent,
        Some("exhausted") => DeadClass::Exhausted,
        _ => DeadClass::Poison,
    };
    let letter = dead_letters::NewDeadLetter {
        id: record.id,
        event: record.event.clone(),
        account_id: record.account_id.clone(),
        body: delivery.data.clone(),
        body_sha256: record.body_sha256.clone(),
        received_at: record.received_at,
        headers: dead_letters::carried_headers(&delivery.properties),
        reason,
        class: class.as_str(),
        attempts: record.attempts,
        first_attempt_at: record.first_attempt_at,
    };
    let hold = Hold { until: tokio::time::Instant::now() + CONVEYOR_HOLD, release: cancel };
    match processor.bury(&record, &letter, cancel, &hold).await {
        Ok(()) => {
            metrics::counter!("monohook_worker_dead_letters_conveyed_total").increment(1);
            metrics::counter!("monohook_worker_dead_letters_total", "class" => class.as_str()).increment(1);
            tracing::warn!(delivery_id = %record.id, reason = %letter.reason, "a message of the dead-letter queue is stored as a dead letter");
            delivery.acker.ack(BasicAckOptions::default()).await.map(drop)
        }
        Err(Interrupted::Abandoned) => Ok(()),
        Err(Interrupted::Park(why)) => {
            tracing::warn!(reason = %why, "a message of the dead-letter queue cannot be stored yet; returned to it");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = cancel.cancelled() => {}
            }
            delivery.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await.map(drop)
        }
    }
}
