//! The exchange and queues monohook lives on, declared the same way by every process at start and
//! checked (passively) after every reconnect. Declarations are idempotent; a queue that already exists with different
//! arguments makes the broker refuse the declaration, and the error names the queue.
//!
//! ```text
//!  ingest ──publish(routing key = event)──▶ <prefix> (topic exchange)
//!                                              │ binding "#"
//!                                              ▼
//!                 ┌──────────────────── <prefix>.work (quorum) ◀──────────────── TTL expiry ─┐
//!                 │ delivery limit hit            │ worker consumes                           │
//!                 ▼ (broker dead-letters)         ├─ transient failure ─▶ <prefix>.retry.<n> ─┘
//!          <prefix>.dead (quorum) ◀───────────────┘ permanent failure / retries exhausted
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use std::time::Duration;

/// Names and arguments of every broker object, derived from one prefix.
#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    retry_delays: Vec<Duration>,
    delivery_limit: u32,
    /// Replicas of each quorum queue at declaration; `None` leaves it to the broker.
    initial_group_size: Option<u32>,
}

/// How long the broker may take to answer one declaration: a broker that accepts the connection
/// but never answers (a node stuck in an election) must not hang a process's start or reconnect.
pub const DECLARE_TIMEOUT: Duration = Duration::from_secs(15);

/// A declaration the broker refused or left unanswered.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("declaring {object} failed: {source}")]
    Refused {
        object: String,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker did not answer the declaration of {object} within {timeout:?}")]
    TimedOut { object: String, timeout: Duration },
    /// A reconnect found the node without our exchange: a broker that is not ours, or one that
    /// formed a cluster of its own. Taking webhooks there would lose them.
    #[error(
        "this RabbitMQ node has no {object}: it is not the broker monohook was started on (a node reset, or one \
         that formed a cluster of its own?); refusing it. If it was deleted on purpose, restart one process to declare it"
    )]
    Missing { object: String },
}

impl TopologyError {
    /// A refusal for "not found" (404) is a missing object; anything else stays as it is.
    fn missing_or_else(self) -> Self {
        match self {
            Self::Refused { object, source } if matches!(source.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404) => {
                Self::Missing { object }
            }
            other => other,
        }
    }

    /// Whether the broker refused `dead_queue` only for lacking the delivery limit an earlier
    /// version did not set (406, "inequivalent arg 'x-delivery-limit'").
    fn is_dead_queue_without_its_limit(&self, dead_queue: &str) -> bool {
        matches!(self, Self::Refused { object, source }
            if *object == format!("queue {dead_queue}")
                && matches!(source.kind(), lapin::ErrorKind::ProtocolError(e)
                    if e.get_id() == 406 && e.get_message().as_str().contains("'x-delivery-limit'")))
    }
}

/// `x-delivery-limit` of the dead-letter queue: explicit, so that RabbitMQ 4's default of 20 (which
/// drops a message at the limit when, as here, no dead-letter target is set) never applies. Every
/// look at a dead letter by `worker dlq` returns it to the queue and counts as a delivery. A positive
/// number, because RabbitMQ 3.x reads -1 as "drop at the first return".
pub const DEAD_QUEUE_DELIVERY_LIMIT: i64 = 1_000_000;

/// Depth and consumers of one queue, as a passive declaration reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueDepth {
    pub queue: String,
    pub messages: u32,
    pub consumers: u32,
}

impl Topology {
    pub fn new(prefix: &str, retry_delays: Vec<Duration>, delivery_limit: u32) -> Self {
        Self { prefix: prefix.to_owned(), retry_delays, delivery_limit, initial_group_size: None }
    }

    /// Declares each quorum queue with this many replicas (`x-quorum-initial-group-size`), e.g. 3
    /// on a three-node cluster.
    pub fn with_initial_group_size(mut self, replicas: Option<u32>) -> Self {
        self.initial_group_size = replicas;
        self
    }

    /// The topic exchange ingest publishes to.
    pub fn exchange(&self) -> &str {
        &self.prefix
    }

    /// The queue workers consume.
    pub fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// Where events that cannot succeed wait for an operator.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The delayed-retry queue of tier `tier` (1-based: tier 1 is the shortest delay).
    pub fn retry_queue(&self, tier: usize) -> String {
        format!("{}.retry.{tier}", self.prefix)
    }

    /// Delays of the retry tiers, shortest first.
    pub fn retry_delays(&self) -> &[Duration] {
        &self.retry_delays
    }

    pub fn delivery_limit(&self) -> u32 {
        self.delivery_limit
    }

    /// Every queue, in the order an operator reads them.
    pub fn queues(&self) -> Vec<String> {
        let mut queues = vec![self.work_queue()];
        queues.extend((1..=self.retry_delays.len()).map(|tier| self.retry_queue(tier)));
        queues.push(self.dead_queue());
        queues
    }

    /// Declares the exchange, the queues and the binding. Safe to call any number of times.
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
        // Durable: the exchange must survive a broker restart or publishes would be unroutable.
        self.answered(
            || format!("exchange {}", self.exchange()),
            channel.exchange_declare(
                self.exchange().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            ),
        )
        .await?;

        let work = self.work_queue();
        let mut work_args = self.quorum_args();
        // Poison guard: a message that keeps coming back (e.g. it crashes the worker) stops after
        // this many deliveries. Outages never count against it: the worker holds deliveries while
        // Postgres is down and moves Mono failures to a retry tier instead of requeueing them.
        work_args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(self.delivery_limit.into()));
        dead_letter_to(&mut work_args, &self.dead_queue());
        self.declare_queue(channel, &work, work_args).await?;
        self.answered(
            || format!("binding of {work}"),
            channel
                // "#" matches every event name, including ones Mono adds later.
                .queue_bind(
                    work.as_str().into(),
                    self.exchange().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
        )
        .await?;

        for (index, delay) in self.retry_delays.iter().enumerate() {
            let mut args = self.quorum_args();
            // Nobody consumes a retry queue: a message waits out the TTL, then the broker
            // dead-letters it back onto the work queue.
            let ttl_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
            dead_letter_to(&mut args, &work);
            self.declare_queue(channel, &self.retry_queue(index + 1), args).await?;
        }

        // Dead letters stay until an operator acts: no TTL, and a delivery limit no walk reaches.
        let mut dead_args = self.quorum_args();
        dead_args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DEAD_QUEUE_DELIVERY_LIMIT));
        self.declare_queue(channel, &self.dead_queue(), dead_args).await
    }

    /// [`Topology::declare`] on a channel of its own. A queue that exists with other arguments is an
    /// error naming the queue and, in the broker's words, the argument that differs (e.g. a retry
    /// delay or `QUORUM_INITIAL_GROUP_SIZE` changed over existing queues): starting "fine" on queues
    /// that do not do what the settings say would hide it. One exception: a dead-letter queue that an
    /// earlier version declared without its delivery limit is kept (it is declared last, so all else
    /// was declared), with a warning that says how to set the limit by policy.
    pub async fn declare_on(&self, connection: &lapin::Connection) -> Result<(), TopologyError> {
        let channel = self
            .answered(|| "a channel for the declarations".to_owned(), connection.create_channel())
            .await?;
        let declared = self.declare(&channel).await;
        let _ = channel.close(200, "declared".into()).await;
        match declared {
            Err(error) if error.is_dead_queue_without_its_limit(&self.dead_queue()) => {
                tracing::warn!(
                    queue = %self.dead_queue(),
                    "the dead-letter queue was declared by an earlier version without x-delivery-limit; on RabbitMQ 4 \
                     set it by policy (see docs/operations.md) or dead letters are dropped after 20 looks"
                );
                Ok(())
            }
            other => other,
        }
    }

    /// A reconnect's look at the topology: a node without our exchange knows nothing of monohook (a
    /// broker reset, or one that formed a cluster of its own) and is refused with
    /// [`TopologyError::Missing`]; declaring there would build the topology on it, and ingest would
    /// answer 200 for webhooks no worker ever sees. A node with the exchange but without a queue had
    /// that queue deleted by an operator: the topology is declared again. Passive declarations answer
    /// during a quorum queue's election, so the common case (all there) waits for no leader.
    pub async fn check_on(&self, connection: &lapin::Connection) -> Result<(), TopologyError> {
        let channel = self
            .answered(|| "a channel for the topology check".to_owned(), connection.create_channel())
            .await?;
        let checked = self.check(&channel).await;
        if channel.status().connected() {
            let _ = tokio::time::timeout(DECLARE_TIMEOUT, channel.close(200, "checked".into())).await;
        }
        match checked {
            Err(TopologyError::Missing { object }) if object != format!("exchange {}", self.exchange()) => {
                tracing::warn!(missing = %object, "part of the topology was deleted; declaring it again");
                self.declare_on(connection).await
            }
            other => other,
        }
    }

    async fn check(&self, channel: &Channel) -> Result<(), TopologyError> {
        let exchange = format!("exchange {}", self.exchange());
        let passive = ExchangeDeclareOptions { passive: true, durable: true, ..Default::default() };
        self.answered(
            || exchange.clone(),
            channel.exchange_declare(
                self.exchange().into(),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|error| error.missing_or_else())?;
        for queue in self.queues() {
            self.answered(
                || format!("queue {queue}"),
                channel.queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                ),
            )
            .await
            .map_err(|error| error.missing_or_else())?;
        }
        Ok(())
    }

    /// Reports depth and consumers of every queue without changing anything (passive declarations).
    pub async fn depths(&self, channel: &Channel) -> Result<Vec<QueueDepth>, TopologyError> {
        let mut depths = Vec::new();
        for queue in self.queues() {
            let declared = self
                .answered(
                    || format!("queue {queue}"),
                    channel.queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions { passive: true, ..Default::default() },
                        FieldTable::default(),
                    ),
                )
                .await?;
            depths.push(QueueDepth {
                queue,
                messages: declared.message_count(),
                consumers: declared.consumer_count(),
            });
        }
        Ok(depths)
    }

    /// Deletes every queue and the exchange (test clean-up and `dlq purge --all` style tooling).
    pub async fn delete(&self, channel: &Channel) -> Result<(), TopologyError> {
        for queue in self.queues() {
            self.answered(
                || format!("queue {queue}"),
                channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
            )
            .await?;
        }
        self.answered(
            || format!("exchange {}", self.exchange()),
            channel.exchange_delete(self.exchange().into(), Default::default()),
        )
        .await
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &str,
        args: FieldTable,
    ) -> Result<(), TopologyError> {
        self.answered(
            || format!("queue {queue}"),
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                args,
            ),
        )
        .await
        .map(drop)
    }

    /// Awaits one broker call about `object`, within [`DECLARE_TIMEOUT`].
    async fn answered<T>(
        &self,
        object: impl FnOnce() -> String,
        call: impl std::future::Future<Output = lapin::Result<T>>,
    ) -> Result<T, TopologyError> {
        match tokio::time::timeout(DECLARE_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(TopologyError::Refused { object: object(), source }),
            Err(_) => Err(TopologyError::TimedOut { object: object(), timeout: DECLARE_TIMEOUT }),
        }
    }
}

impl Topology {
    /// Quorum queues: replicated, and their messages survive a broker restart once confirmed.
    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), string("quorum"));
        if let Some(replicas) = self.initial_group_size {
            args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongUInt(replicas));
        }
        args
    }
}

/// Dead-letters into `queue` through the default exchange, at least once: the broker keeps a
/// dead-lettered message in the source queue until the target queue confirmed it. At-least-once
/// requires `reject-publish` overflow.
fn dead_letter_to(args: &mut FieldTable, queue: &str) {
    args.insert("x-dead-letter-exchange".into(), string(""));
    args.insert("x-dead-letter-routing-key".into(), string(queue));
    args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    args.insert("x-overflow".into(), string("reject-publish"));
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::new("t", vec![Duration::from_secs(1)], 10)
    }

    async fn broker() -> lapin::Connection {
        let url =
            std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        crate::amqp::connect(&url.into(), "monohook-test-topology").await.expect("the test broker answers")
    }

    #[tokio::test]
    async fn a_queue_with_other_arguments_is_an_error_naming_the_queue_and_the_argument() {
        let connection = broker().await;
        let prefix = format!("test.inequivalent.{}", uuid::Uuid::new_v4().simple());
        let first = Topology::new(&prefix, vec![Duration::from_secs(1)], 10);
        first.declare_on(&connection).await.expect("a new topology declares");
        // Another process (or a changed setting) wants the work queue with another delivery limit.
        let changed = Topology::new(&prefix, vec![Duration::from_secs(1)], 5);
        let error = changed.declare_on(&connection).await.expect_err("refused").to_string();
        assert!(error.contains(&format!("queue {prefix}.work")), "{error}");
        assert!(error.contains("x-delivery-limit"), "{error}");
        let cleanup = connection.create_channel().await.expect("a channel");
        first.delete(&cleanup).await.expect("clean up");
        connection.close(200, "done".into()).await.expect("closes");
    }

    #[tokio::test]
    async fn the_check_declares_a_deleted_queue_again_but_refuses_a_node_without_the_exchange() {
        let connection = broker().await;
        let prefix = format!("test.check.{}", uuid::Uuid::new_v4().simple());
        let topology = Topology::new(&prefix, vec![Duration::from_secs(1)], 10);
        topology.declare_on(&connection).await.expect("a new topology declares");
        topology.check_on(&connection).await.expect("a declared topology passes the check");
        let channel = connection.create_channel().await.expect("a channel");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let retry = topology.retry_queue(1);
        channel.queue_delete(retry.as_str().into(), QueueDeleteOptions::default()).await.expect("deleted");

        topology.check_on(&connection).await.expect("an operator's deletion is repaired");
        channel.queue_declare(retry.as_str().into(), passive, FieldTable::default()).await.expect("back");

        topology.delete(&channel).await.expect("everything goes, the exchange too");
        let error = topology.check_on(&connection).await.expect_err("a node without the exchange");
        assert!(
            matches!(&error, TopologyError::Missing { object } if *object == format!("exchange {prefix}")),
            "{error}"
        );
        let error = topology.check_on(&connection).await.expect_err("the check created nothing");
        assert!(matches!(error, TopologyError::Missing { .. }), "{error}");
        let cleanup = connection.create_channel().await.expect("a channel");
        let work = topology.work_queue();
        let declared = cleanup.queue_declare(work.as_str().into(), passive, FieldTable::default()).await;
        assert!(declared.is_err(), "the refused node got a work queue");
        connection.close(200, "done".into()).await.expect("closes");
    }

    #[test]
    fn the_replica_count_is_declared_only_when_set() {
        let unset = topology().quorum_args();
        assert!(!unset.inner().contains_key("x-quorum-initial-group-size"));
        let three = topology().with_initial_group_size(Some(3)).quorum_args();
        assert_eq!(three.inner().get("x-quorum-initial-group-size"), Some(&AMQPValue::LongUInt(3)));
        assert_eq!(three.inner().get("x-queue-type"), Some(&string("quorum")));
    }
}
