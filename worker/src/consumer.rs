//! Consuming the work queue: the broker session, its supervisor, and settling each delivery.
//!
//! A session is one connection with a consuming channel (prefetch = `PREFETCH`) and a confirm-mode
//! channel for republishing. Each delivery runs as its own task, so up to `PREFETCH` are worked on
//! at once, and is acked only after its outcome is safe: its transaction committed, or its copy
//! confirmed in a retry tier or the dead-letter queue.
//!
//! lapin does not reconnect, and a consumer can go quiet after its connection drops, so the
//! supervisor watches the connection, both channels and the consumer stream, and opens a new session
//! (re-declaring the topology) with backoff when any of them fails. Deliveries still in flight on the
//! old session are abandoned: they were never acked, so the broker hands them out again.
//!
//! Shutdown: stop consuming, give in-flight deliveries `SHUTDOWN_GRACE_SECS` to finish, abandon the
//! rest, close the connection (unacked deliveries return to the queue).

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use secrecy::SecretString;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::dlq::Republisher;
use crate::processor::{DeadClass, Outcome, Processor};
use shared::amqp::{self, ConnectError};
use shared::delivery::{AttemptHistory, DeliveryMeta, as_u32};
use shared::retry::RetryPolicy;
use shared::topology::{Topology, TopologyError};

/// What the consumer needs to (re)connect.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub amqp_url: SecretString,
    pub topology: Topology,
    pub prefetch: u16,
    pub shutdown_grace: Duration,
}

/// Why a broker session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("opening a channel failed: {0}")]
    Channel(#[source] lapin::Error),
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

pub struct Session {
    connection: Connection,
    consume_channel: Channel,
    republisher: Arc<Republisher>,
    republish_channel: Channel,
}

impl Session {
    pub async fn open(settings: &ConsumerSettings) -> Result<Self, SessionError> {
        let connection = amqp::connect(&settings.amqp_url, "monohook-worker").await?;
        let consume_channel = connection.create_channel().await.map_err(SessionError::Channel)?;
        settings.topology.declare(&consume_channel).await?;
        // Prefetch bounds the deliveries this process holds unacked, hence the work in flight.
        consume_channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(SessionError::Channel)?;
        let republish_channel = connection.create_channel().await.map_err(SessionError::Channel)?;
        republish_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(SessionError::Channel)?;
        let republisher = Arc::new(Republisher::new(
            republish_channel.clone(),
            settings.topology.clone(),
        ));
        Ok(Self {
            connection,
            consume_channel,
            republisher,
            republish_channel,
        })
    }

    /// Resolves when the connection or one of the channels has failed, or when the broker no longer
    /// lists any consumer on `queue` although this session is consuming it (a consumer gone quiet).
    async fn lost(&self, queue: &str) -> String {
        let channels = async {
            let mut poll = tokio::time::interval(Duration::from_millis(500));
            let mut polls: u32 = 0;
            loop {
                poll.tick().await;
                polls = polls.wrapping_add(1);
                if !self.consume_channel.status().connected() {
                    return "the consuming channel closed".to_owned();
                }
                if !self.republish_channel.status().connected() {
                    return "the republishing channel closed".to_owned();
                }
                // Every 10 s, ask the broker itself (a passive declaration changes nothing).
                if polls.is_multiple_of(20) {
                    let declared = self
                        .republish_channel
                        .queue_declare(
                            queue.into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await;
                    match declared {
                        Ok(state) if state.consumer_count() == 0 => {
                            return format!("the broker lists no consumer on {queue}");
                        }
                        Ok(_) => {}
                        Err(error) => return format!("cannot inspect {queue}: {error}"),
                    }
                }
            }
        };
        tokio::select! {
            reason = amqp::connection_lost(&self.connection) => reason,
            reason = channels => reason,
        }
    }

    async fn close(&self) {
        if let Err(error) = self.connection.close(200, "worker shutting down".into()).await {
            tracing::debug!(%error, "closing the RabbitMQ connection");
        }
    }
}

/// How a session ended.
enum SessionEnd {
    Stopped,
    Lost(String),
}

/// Consumes until `cancel` fires, replacing the session whenever it fails.
pub async fn run(
    processor: Arc<Processor>,
    settings: ConsumerSettings,
    first_session: Session,
    cancel: CancellationToken,
) {
    let policy = RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(5));
    let mut session = Some(first_session);
    let mut schedule = policy.schedule();
    loop {
        if let Some(current) = session.take() {
            schedule.reset();
            match consume(&processor, &settings, &current, &cancel).await {
                SessionEnd::Stopped => return,
                SessionEnd::Lost(reason) => {
                    tracing::warn!(%reason, "lost the RabbitMQ session; in-flight deliveries will be redelivered");
                    // Whatever is left of the old connection goes, so it cannot linger half-open.
                    let _ = tokio::time::timeout(Duration::from_secs(1), current.close()).await;
                }
            }
        }
        let delay = schedule.next_delay().unwrap_or(policy.max_interval);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return,
        }
        match Session::open(&settings).await {
            Ok(fresh) => {
                tracing::info!("reconnected to RabbitMQ; consuming again");
                session = Some(fresh);
            }
            Err(error) => tracing::warn!(%error, retry_in = ?delay, "reconnecting to RabbitMQ failed"),
        }
    }
}

async fn consume(
    processor: &Arc<Processor>,
    settings: &ConsumerSettings,
    session: &Session,
    cancel: &CancellationToken,
) -> SessionEnd {
    let tag = format!(
        "monohook-worker-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let consumer = session
        .consume_channel
        .basic_consume(
            settings.topology.work_queue().as_str().into(),
            tag.as_str().into(),
            // Manual acks: a delivery is acked only once its outcome is safe.
            BasicConsumeOptions {
                no_ack: false,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let mut consumer = match consumer {
        Ok(consumer) => consumer,
        Err(error) => return SessionEnd::Lost(format!("cannot consume: {error}")),
    };
    tracing::info!(queue = %settings.topology.work_queue(), prefetch = settings.prefetch, "consuming");

    // Fired when in-flight work must stop waiting: the session is gone, or the grace period is over.
    let abandon = CancellationToken::new();
    let in_flight = TaskTracker::new();
    let work_queue = settings.topology.work_queue();
    let lost = session.lost(&work_queue);
    tokio::pin!(lost);
    let end = loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break SessionEnd::Stopped,
            reason = &mut lost => break SessionEnd::Lost(reason),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let task = settle(processor.clone(), session.republisher.clone(), settings.topology.clone(), delivery, abandon.clone());
                    in_flight.spawn(task);
                }
                Some(Err(error)) => break SessionEnd::Lost(format!("consumer failed: {error}")),
                None => break SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
            },
        }
    };
    in_flight.close();
    if let SessionEnd::Lost(_) = end {
        abandon.cancel();
        return end;
    }

    let _ = session
        .consume_channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    if tokio::time::timeout(settings.shutdown_grace, in_flight.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = in_flight.len(),
            "grace period over; unfinished deliveries return to the queue"
        );
        abandon.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), in_flight.wait()).await;
    }
    session.close().await;
    end
}

/// Runs one delivery to its outcome and settles it with the broker.
async fn settle(
    processor: Arc<Processor>,
    republisher: Arc<Republisher>,
    topology: Topology,
    delivery: Delivery,
    abandon: CancellationToken,
) {
    let meta = DeliveryMeta::from_properties(&delivery.properties, &delivery.data);
    let history = AttemptHistory::from_properties(&delivery.properties);
    let handed_out = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
        .and_then(as_u32)
        .unwrap_or(0);
    let span = tracing::info_span!(
        "delivery",
        delivery_id = %meta.id,
        event = tracing::field::Empty,
        account = tracing::field::Empty,
        attempt = history.previous_attempts + 1,
    );
    async move {
        let (record, outcome) = processor.process(&delivery.data, &meta, &history, handed_out, &abandon).await;
        let ack = match outcome {
            Outcome::Settled(status) => {
                tracing::info!(status = status.as_str(), "delivery settled");
                true
            }
            Outcome::AlreadySettled => {
                tracing::info!("delivery was settled before (redelivery); no effect");
                true
            }
            Outcome::Retry { reason } => {
                let tier = (history.previous_attempts + 1) as usize;
                if tier <= topology.retry_delays().len() {
                    match republisher.to_retry_tier(&delivery, tier, &history, &reason).await {
                        Ok(()) => {
                            let delay = topology.retry_delays()[tier - 1];
                            tracing::warn!(%reason, tier, retry_in = ?delay, "moved to a retry tier");
                            true
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot move to a retry tier; the delivery will come back");
                            false
                        }
                    }
                } else {
                    let reason = format!("retries exhausted: {reason}");
                    dead_letter(&processor, &republisher, &delivery, &history, &record, &reason, DeadClass::Exhausted, &abandon)
                        .await
                }
            }
            Outcome::DeadLetter { reason, class } => {
                dead_letter(&processor, &republisher, &delivery, &history, &record, &reason, class, &abandon).await
            }
            Outcome::Abandoned => {
                tracing::info!("delivery abandoned; it returns to the queue");
                false
            }
        };
        if ack && let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
            // The session is gone; the broker hands the delivery out again and the journal
            // recognises it.
            tracing::warn!(%error, "ack failed; the delivery will be redelivered");
        }
    }
    .instrument(span)
    .await
}

/// Copies the delivery into the dead-letter queue, then journals it. Returns whether to ack.
#[allow(clippy::too_many_arguments)]
async fn dead_letter(
    processor: &Processor,
    republisher: &Republisher,
    delivery: &Delivery,
    history: &AttemptHistory,
    record: &crate::db::events::EventRecord,
    reason: &str,
    class: DeadClass,
    abandon: &CancellationToken,
) -> bool {
    if let Err(error) = republisher
        .to_dead_letters(delivery, history, reason, class)
        .await
    {
        tracing::warn!(%error, "cannot dead-letter; the delivery will come back");
        return false;
    }
    tracing::warn!(%reason, class = class.as_str(), "dead-lettered");
    processor.record_dead(record, reason, abandon).await
}
