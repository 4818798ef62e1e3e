//! Consuming the work queue: the broker session and its supervisor.
//!
//! A session is two connections: one consumes (prefetch = `PREFETCH`) and acks, the other holds a
//! confirm-mode channel for republishing, so that a memory or disk alarm, which blocks publishers,
//! never stops the acks. Every delivery goes through the session's [`Pipeline`] and is acked only
//! once its outcome is safe.
//!
//! lapin does not reconnect, and a consumer can go quiet after its connection drops, so the
//! supervisor watches both connections, the channels, the consumer stream and the broker's own count
//! of consumers, and opens a new session with backoff when any of them fails, or when the broker
//! takes no moved copy for too long (only nacks, or no confirm). A new session checks the topology
//! passively and refuses a node without it. Deliveries still in flight on the old session are
//! abandoned: they were never acked, so the broker hands them out again and the journal recognises
//! what was already applied.
//!
//! Shutdown: stop consuming (taking in what the broker sent before the cancel), park the deliveries
//! waiting on our database, give in-flight deliveries `SHUTDOWN_GRACE_SECS` to finish, abandon the
//! rest, close the connections (unacked deliveries return to the queue).

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use secrecy::SecretString;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::acks::AckTracker;
use crate::health::Health;
use crate::pipeline::{Pipeline, PipelineSettings};
use crate::republish::Republisher;
use shared::amqp::{self, ConnectError};
use shared::retry::RetryPolicy;
use shared::topology::{Topology, TopologyError};

/// What the consumer needs to (re)connect.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub amqp_url: SecretString,
    pub topology: Topology,
    pub prefetch: u16,
    pub shutdown_grace: Duration,
    pub queue_poll: Duration,
}

/// Answers in a row that list no consumer on the work queue before the session counts as lost.
const NO_CONSUMER_ANSWERS: u32 = 3;

/// Answers in a row that show ready messages while our consumer, with room for more, received
/// nothing, before the node counts as useless and is left (issue 21, point 1): a consumer that the
/// node keeps but never feeds (a stuck channel) does not end its connection, so only what it does
/// tells. (A node cut off from the queue's leader answers 0 messages and 0 consumers: the
/// no-consumer rule leaves that one.)
const STARVED_ANSWERS: u32 = 3;

/// Leaves the session's node (the next session starts at the next one), counted by `reason` in
/// `monohook_worker_node_moves_total`: the node answered but did not do its job.
fn leave_node(reason: &'static str) {
    metrics::counter!("monohook_worker_node_moves_total", "reason" => reason).increment(1);
    amqp::leave_node();
}

/// What one answer about the work queue says of our consumer's intake since the previous answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intake {
    /// Deliveries arrived, or nothing was ready to deliver.
    Fed,
    /// Messages were ready, but we hold a full prefetch (a slow database): the broker rightly
    /// sends nothing until we ack.
    Full,
    /// Messages were ready, we had room, and nothing arrived.
    Starved,
}

/// Judges one answer: `ready` messages in the queue, `received` deliveries since the previous
/// answer, `outstanding` deliveries held unacked, against the channel's `prefetch`.
pub fn judge_intake(ready: u32, received: u64, outstanding: usize, prefetch: u16) -> Intake {
    if received > 0 || ready == 0 {
        Intake::Fed
    } else if outstanding >= usize::from(prefetch) {
        Intake::Full
    } else {
        Intake::Starved
    }
}

/// What the session's watch needs to judge the consumer by its intake.
struct IntakeWatch<'a> {
    /// Deliveries received by the consuming loop (one relaxed increment each).
    received: &'a AtomicU64,
    pipeline: &'a Pipeline,
    prefetch: u16,
    health: &'a Health,
    /// Time between two looks at the queue (its passive declaration).
    every: Duration,
}

/// Why a broker session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("opening a channel failed: {0}")]
    Channel(#[source] lapin::Error),
    #[error("the broker did not answer {what} within {CALL_TIMEOUT:?}")]
    TimedOut { what: &'static str },
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

/// Bound on one AMQP call that waits for the broker's answer (opening a channel, setting its
/// prefetch, starting or cancelling the consumer, a look at a queue): a node that accepted the
/// connection may answer nothing more, and heartbeats take up to 30 s to say so.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Awaits one broker call within [`CALL_TIMEOUT`].
async fn answered<T>(
    what: &'static str,
    call: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, SessionError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| SessionError::TimedOut { what })?
        .map_err(SessionError::Channel)
}

/// What a new session does about the topology: declare it (the process's first session: queues
/// that are wrong stop the start) or check it passively (a reconnect: declaring would build it on
/// whatever node answered, a broker that formed a cluster of its own included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topo {
    Declare,
    Check,
}

/// One broker session: two connections, so that a memory or disk alarm, which blocks a connection
/// that publishes, never stops the acks (RabbitMQ's own advice: publish and consume apart).
pub struct Session {
    /// Consuming, acking and the passive looks at queues: it never publishes, so it is never blocked.
    consume_connection: Arc<Connection>,
    /// Republishing (moves to retry tiers, parks) and the declarations a move may need.
    publish_connection: Arc<Connection>,
    consume_channel: Channel,
    /// Passive declarations of the session's watch, on the consuming connection.
    watch_channel: Channel,
    republish_channel: Channel,
    /// Fired by the republisher when moves have failed (nacks, no confirm) for too long.
    moves_failing: CancellationToken,
}

impl Session {
    pub async fn open(settings: &ConsumerSettings, topology: Topo) -> Result<Self, SessionError> {
        let consume_connection = amqp::connect(&settings.amqp_url, "monohook-worker").await?;
        let checked = match topology {
            Topo::Declare => settings.topology.declare_on(&consume_connection).await,
            Topo::Check => settings.topology.check_on(&consume_connection).await,
        };
        if let Err(error) = checked {
            if matches!(error, TopologyError::Missing { .. }) {
                metrics::counter!("monohook_worker_nodes_refused_total").increment(1);
                amqp::leave_node();
            }
            let _ = tokio::time::timeout(CALL_TIMEOUT, consume_connection.close(200, "refused".into())).await;
            return Err(error.into());
        }
        let publish_connection = match amqp::connect(&settings.amqp_url, "monohook-worker-publish").await {
            Ok(connection) => connection,
            Err(error) => {
                let _ =
                    tokio::time::timeout(CALL_TIMEOUT, consume_connection.close(200, "no publisher".into()))
                        .await;
                return Err(error.into());
            }
        };
        let channels = async {
            let consume_channel =
                answered("a consuming channel", consume_connection.create_channel()).await?;
            // Prefetch bounds the deliveries this process holds unacked, hence the work in flight.
            answered(
                "the prefetch setting",
                consume_channel.basic_qos(settings.prefetch, BasicQosOptions::default()),
            )
            .await?;
            let watch_channel =
                answered("a channel for the watch", consume_connection.create_channel()).await?;
            let republish_channel =
                answered("a republishing channel", publish_connection.create_channel()).await?;
            answered("confirm mode", republish_channel.confirm_select(ConfirmSelectOptions::default()))
                .await?;
            Ok::<_, SessionError>((consume_channel, watch_channel, republish_channel))
        };
        match channels.await {
            Ok((consume_channel, watch_channel, republish_channel)) => Ok(Self {
                consume_connection: Arc::new(consume_connection),
                publish_connection: Arc::new(publish_connection),
                consume_channel,
                watch_channel,
                republish_channel,
                moves_failing: CancellationToken::new(),
            }),
            Err(error) => {
                for connection in [&consume_connection, &publish_connection] {
                    let _ =
                        tokio::time::timeout(CALL_TIMEOUT, connection.close(200, "not opened".into())).await;
                }
                Err(error)
            }
        }
    }

    pub fn is_connected(&self) -> bool {
        self.consume_connection.status().connected() && self.publish_connection.status().connected()
    }

    /// Resolves when the connection or one of the channels has failed, or when the broker no longer
    /// lists any consumer on `queue` although this session is consuming it (a consumer gone quiet),
    /// or when our consumer receives nothing while the queue has messages ready (a useless node,
    /// which is then left for the next).
    async fn lost(&self, queue: &str, intake: IntakeWatch<'_>) -> String {
        let starved = async {
            let options = QueueDeclareOptions { passive: true, ..Default::default() };
            let mut poll = tokio::time::interval(intake.every);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            poll.tick().await;
            let mut seen = intake.received.load(Ordering::Relaxed);
            let mut starved_answers: u32 = 0;
            loop {
                poll.tick().await;
                let answer = answered(
                    "a look at the work queue",
                    self.watch_channel.queue_declare(queue.into(), options, FieldTable::default()),
                )
                .await;
                // A failed look is the other watch's business (it asks the same channel).
                let Ok(state) = answer else { continue };
                let received = intake.received.load(Ordering::Relaxed);
                let since = received.wrapping_sub(seen);
                seen = received;
                match judge_intake(
                    state.message_count(),
                    since,
                    intake.pipeline.outstanding(),
                    intake.prefetch,
                ) {
                    Intake::Fed | Intake::Full => {
                        if starved_answers > 0 {
                            intake.health.set_consuming(true);
                        }
                        starved_answers = 0;
                    }
                    Intake::Starved => {
                        starved_answers += 1;
                        // Not ready from the first such answer: this node may not be serving us.
                        intake.health.set_consuming(false);
                        if starved_answers >= STARVED_ANSWERS {
                            leave_node("starved");
                            return format!(
                                "{queue} has {} messages ready but the consumer received nothing ({starved_answers} looks in a row); leaving the node",
                                state.message_count()
                            );
                        }
                        tracing::warn!(
                            queue,
                            ready = state.message_count(),
                            starved_answers,
                            "the work queue has messages ready but none reach the consumer"
                        );
                    }
                }
            }
        };
        let channels = async {
            let mut poll = tokio::time::interval(Duration::from_millis(500));
            let mut polls: u32 = 0;
            let mut silent_answers: u32 = 0;
            loop {
                poll.tick().await;
                polls = polls.wrapping_add(1);
                if !self.consume_channel.status().connected() {
                    return "the consuming channel closed".to_owned();
                }
                if !self.republish_channel.status().connected() {
                    return "the republishing channel closed".to_owned();
                }
                if !self.watch_channel.status().connected() {
                    return "the watch's channel closed".to_owned();
                }
                // Every 10 s, ask the broker itself (a passive declaration changes nothing). A
                // quorum queue whose leader cannot answer (an election, lost quorum) also says 0
                // consumers: only three answers in a row (30 s, longer than an election) mean our
                // consumer is gone, so a leader hiccup does not return every held delivery.
                if polls.is_multiple_of(20) {
                    let options = QueueDeclareOptions { passive: true, ..Default::default() };
                    match answered(
                        "a look at the work queue",
                        self.watch_channel.queue_declare(queue.into(), options, FieldTable::default()),
                    )
                    .await
                    {
                        Ok(state) if state.consumer_count() == 0 => {
                            silent_answers += 1;
                            if silent_answers >= NO_CONSUMER_ANSWERS {
                                // This node answers without the queue's leader: the next session
                                // starts at the next node, as ingest's does.
                                leave_node("no_consumer");
                                return format!(
                                    "the broker lists no consumer on {queue} ({silent_answers} times in a row)"
                                );
                            }
                            tracing::warn!(
                                queue,
                                silent_answers,
                                "the broker lists no consumer on the work queue (its leader may be unreachable); asking again"
                            );
                        }
                        Ok(_) => silent_answers = 0,
                        Err(error @ SessionError::TimedOut { .. }) => {
                            // A node that keeps the connection but answers nothing (frozen, or cut
                            // off behind a proxy that still holds the socket): heartbeats would take
                            // far longer to say so, and the next walk must not start here again.
                            leave_node("silent");
                            return format!("cannot inspect {queue}: {error}; leaving the node");
                        }
                        Err(error) => return format!("cannot inspect {queue}: {error}"),
                    }
                }
            }
        };
        tokio::select! {
            reason = amqp::connection_lost(&self.consume_connection) => reason,
            reason = amqp::connection_lost(&self.publish_connection) => format!("publishing: {reason}"),
            reason = channels => reason,
            reason = starved => reason,
            () = self.moves_failing.cancelled() => {
                // Only nacks and timeouts for the copies: a node cut off from the queues' leaders,
                // or channels that still address a leader that is gone. The next node may do.
                leave_node("moves_failing");
                format!(
                    "the broker took almost no moved copy for {:?} (nacks, or no confirm); leaving the node",
                    crate::republish::MOVES_FAILING_MAX
                )
            }
        }
    }

    /// Closes both connections, within a bound each (a node that answers nothing never says
    /// close-ok).
    async fn close(&self) {
        for connection in [&self.consume_connection, &self.publish_connection] {
            match tokio::time::timeout(CALL_TIMEOUT, connection.close(200, "worker shutting down".into()))
                .await
            {
                Ok(Err(error)) => tracing::debug!(%error, "closing a RabbitMQ connection"),
                Err(_) => tracing::debug!("closing a RabbitMQ connection: no answer"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// How a session ended.
enum SessionEnd {
    Stopped,
    Lost(String),
}

/// Consumes until `cancel` fires, replacing the session whenever it fails. `connected` follows the
/// session for `/readyz`.
pub async fn run(
    pipeline: Arc<PipelineSettings>,
    settings: ConsumerSettings,
    first_session: Session,
    cancel: CancellationToken,
) {
    let health = pipeline.health.clone();
    let policy = RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(5));
    let mut session = Some(first_session);
    let mut schedule = policy.schedule();
    loop {
        if let Some(current) = session.take() {
            schedule.reset();
            health.set_broker_connected(true);
            let end = consume(&pipeline, &settings, &current, &cancel).await;
            health.set_broker_connected(false);
            health.set_consuming(false);
            match end {
                SessionEnd::Stopped => return,
                SessionEnd::Lost(reason) => {
                    tracing::warn!(%reason, "lost the RabbitMQ session; in-flight deliveries will be redelivered");
                    // Whatever is left of the old connections goes, so they cannot linger half-open;
                    // beside the reconnect, never before it.
                    tokio::spawn(async move { current.close().await });
                }
            }
        }
        let delay = schedule.next_delay().unwrap_or(policy.max_interval);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return,
        }
        match Session::open(&settings, Topo::Check).await {
            Ok(fresh) => {
                tracing::info!("reconnected to RabbitMQ; consuming again");
                session = Some(fresh);
            }
            Err(SessionError::Topology(error @ TopologyError::Missing { .. })) => {
                tracing::error!(%error, retry_in = ?delay, "refused a RabbitMQ node without monohook's topology")
            }
            Err(error) => tracing::warn!(%error, retry_in = ?delay, "reconnecting to RabbitMQ failed"),
        }
    }
}

async fn consume(
    settings: &Arc<PipelineSettings>,
    consumer_settings: &ConsumerSettings,
    session: &Session,
    cancel: &CancellationToken,
) -> SessionEnd {
    let tag = format!("monohook-worker-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let work_queue = consumer_settings.topology.work_queue();
    let consumer = answered(
        "the start of the consumer",
        session.consume_channel.basic_consume(
            work_queue.as_str().into(),
            tag.as_str().into(),
            // Manual acks: a delivery is acked only once its outcome is safe.
            BasicConsumeOptions { no_ack: false, ..Default::default() },
            FieldTable::default(),
        ),
    )
    .await;
    let mut consumer = match consumer {
        Ok(consumer) => consumer,
        Err(error) => return SessionEnd::Lost(format!("cannot consume: {error}")),
    };
    tracing::info!(queue = %work_queue, prefetch = consumer_settings.prefetch, "consuming");

    let republisher = Arc::new(Republisher::new(
        session.publish_connection.clone(),
        session.republish_channel.clone(),
        consumer_settings.topology.clone(),
        session.moves_failing.clone(),
    ));
    let acks = Arc::new(AckTracker::new(session.consume_channel.clone()));
    let pipeline = Pipeline::start(settings.clone(), republisher, acks);
    let received = AtomicU64::new(0);
    let intake = IntakeWatch {
        received: &received,
        pipeline: &pipeline,
        prefetch: consumer_settings.prefetch,
        health: &settings.health,
        every: consumer_settings.queue_poll,
    };
    let lost = session.lost(&work_queue, intake);
    tokio::pin!(lost);
    let poll_queues = crate::queue_watch::run(
        &session.consume_connection,
        &consumer_settings.topology,
        settings.processor.pool(),
        &settings.health,
        consumer_settings.queue_poll,
    );
    tokio::pin!(poll_queues);
    settings.health.set_consuming(true);
    let end = loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break SessionEnd::Stopped,
            reason = &mut lost => break SessionEnd::Lost(reason),
            () = &mut poll_queues => {}
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    received.fetch_add(1, Ordering::Relaxed);
                    pipeline.accept(delivery);
                }
                Some(Err(error)) => break SessionEnd::Lost(format!("consumer failed: {error}")),
                None => break SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
            },
        }
    };
    if let SessionEnd::Lost(_) = end {
        pipeline.abandon_lost().await;
        return end;
    }

    let _ = answered(
        "the cancel of the consumer",
        session.consume_channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    // Deliveries the broker sent before the cancel are ours too: returned unread, each would come
    // back with its delivery count raised. The stream ends after them (bounded, in case it does not).
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
        pipeline.accept(delivery);
    }
    pipeline.release_held();
    if !pipeline.drain(consumer_settings.shutdown_grace).await {
        tracing::warn!(
            unfinished = pipeline.outstanding(),
            "grace period over; unfinished deliveries return to the queue"
        );
    }
    pipeline.abandon().await;
    session.close().await;
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_messages_with_room_to_take_them_and_nothing_received_is_starvation() {
        let prefetch = 4;
        assert_eq!(judge_intake(0, 0, 0, prefetch), Intake::Fed, "nothing to deliver");
        assert_eq!(judge_intake(10, 3, 0, prefetch), Intake::Fed, "deliveries arrived");
        assert_eq!(judge_intake(10, 0, 4, prefetch), Intake::Full, "a slow database holds the prefetch");
        assert_eq!(judge_intake(10, 0, 3, prefetch), Intake::Starved);
        assert_eq!(judge_intake(1, 0, 0, prefetch), Intake::Starved);
    }
}
