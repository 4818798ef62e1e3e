//! Walking the dead-letter queue once: every message present at the start is seen at most once,
//! taken (acked, after the caller has made it safe elsewhere) or left (returned to the queue when
//! the walk ends, interrupted or not).
//!
//! A walk holds what it leaves unacked until it ends, and one AMQP channel can hold at most 65,535
//! unacked messages, so a walk consumes on as many channels ("lanes") as the queue's depth needs.
//! Whether a walk saw the whole queue is asked of the broker at its end, while it still holds what
//! it left: nothing ready and no consumer but its own lanes. A walk that cannot say so (another
//! walker holds messages, new ones arrived, it was interrupted) is incomplete, and callers must not
//! act on what it did not see.

use futures_util::stream::{self, BoxStream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::time::Duration;

use shared::amqp;
use shared::config::BrokerArgs;
use shared::topology::Topology;

/// Most messages one channel holds unacked (AMQP's prefetch is 16 bits).
const LANE_CAPACITY: u32 = u16::MAX as u32;
/// Room for dead letters that arrive while a walk runs.
const LANE_SLACK: u32 = 1_000;
/// How long a walk waits for the next message before it stops: a quiet queue ends it.
const IDLE: Duration = Duration::from_secs(3);
/// Once every message present at the start was seen, how long it waits for late arrivals.
const SETTLE: Duration = Duration::from_millis(300);

pub struct DeadQueue {
    connection: Connection,
    publish: Channel,
    pub topology: Topology,
    /// How long a replayed copy waits for the broker's confirm: the worker's own bound on a move,
    /// so a broker that stops answering never hangs an operator's command.
    confirm_timeout: Duration,
}

/// One message of the walk.
pub struct Seen {
    pub delivery: Delivery,
    lane: usize,
}

pub struct Walk {
    lanes: Vec<Channel>,
    deliveries: BoxStream<'static, (usize, lapin::Result<Delivery>)>,
    remaining: u32,
    highest_left: Vec<Option<u64>>,
    pub left: u32,
    /// Messages seen so far.
    pub seen: u32,
}

impl DeadQueue {
    pub async fn open(broker: &BrokerArgs) -> anyhow::Result<Self> {
        let connection = amqp::connect(&broker.amqp_url, "monohook-dlq").await?;
        let topology = broker.topology();
        topology.declare_on(&connection).await?;
        let publish = connection.create_channel().await?;
        publish.confirm_select(Default::default()).await?;
        Ok(Self { connection, publish, topology, confirm_timeout: crate::dlq::CONFIRM_TIMEOUT })
    }

    /// Ready messages and consumers of the dead-letter queue now.
    async fn counts(&self) -> anyhow::Result<(u32, u32)> {
        let channel = self.connection.create_channel().await?;
        let dead = self.topology.dead_queue();
        let declared = channel
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "done".into()).await;
        let declared = declared?;
        Ok((declared.message_count(), declared.consumer_count()))
    }

    /// Messages in the dead-letter queue now.
    pub async fn depth(&self) -> anyhow::Result<u32> {
        Ok(self.counts().await?.0)
    }

    /// Starts a walk over the messages in the dead-letter queue now.
    pub async fn walk(&self) -> anyhow::Result<Walk> {
        let remaining = self.depth().await?;
        let wanted = remaining.saturating_add(LANE_SLACK);
        let lane_count = wanted.div_ceil(LANE_CAPACITY).max(1);
        let mut lanes = Vec::new();
        let mut consumers = Vec::new();
        for lane in 0..lane_count {
            let channel = self.connection.create_channel().await?;
            let prefetch = u16::try_from(wanted.min(LANE_CAPACITY)).unwrap_or(u16::MAX);
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    self.topology.dead_queue().as_str().into(),
                    format!("monohook-dlq-{lane}").as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let index = lanes.len();
            consumers.push(consumer.map(move |delivery| (index, delivery)).boxed());
            lanes.push(channel);
        }
        let highest_left = vec![None; lanes.len()];
        Ok(Walk {
            lanes,
            deliveries: stream::select_all(consumers).boxed(),
            remaining,
            highest_left,
            left: 0,
            seen: 0,
        })
    }

    /// Whether `walk` has seen the whole queue: nothing is ready and nobody but the walk consumes
    /// (asked while the walk still holds what it left).
    pub async fn fully_seen(&self, walk: &Walk) -> anyhow::Result<bool> {
        // Messages another walk just returned reach the ready count a moment after it closed: ask
        // twice, a moment apart.
        for pause in [Duration::ZERO, SETTLE] {
            tokio::time::sleep(pause).await;
            let (ready, consumers) = self.counts().await?;
            if ready != 0 || consumers as usize != walk.lanes.len() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Publishes a copy of `properties`/`body` onto the work queue and waits for the confirm, at most
    /// the confirm timeout: then it fails, and the action stays unfinished for the next run to finish
    /// (a copy that reached the queue after all has one effect: same delivery id).
    pub async fn publish_to_work(&self, body: &[u8], properties: BasicProperties) -> anyhow::Result<()> {
        let queue = self.topology.work_queue();
        let published = async {
            self.publish
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions { mandatory: true, immediate: false },
                    body,
                    properties,
                )
                .await?
                .await
        };
        let Ok(confirm) = tokio::time::timeout(self.confirm_timeout, published).await else {
            anyhow::bail!("the broker did not confirm the copy on {queue} within {:?}", self.confirm_timeout);
        };
        match confirm? {
            Confirmation::Ack(None) => Ok(()),
            other => anyhow::bail!("the broker did not confirm the copy on {queue}: {other:?}"),
        }
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

impl Walk {
    /// The next message, or `None` once the queue has gone quiet (every message present at the start
    /// seen, or none arriving for a while).
    pub async fn next(&mut self) -> anyhow::Result<Option<Seen>> {
        let idle = if self.remaining > 0 { IDLE } else { SETTLE };
        match tokio::time::timeout(idle, self.deliveries.next()).await {
            Ok(Some((lane, delivery))) => {
                self.remaining = self.remaining.saturating_sub(1);
                self.seen += 1;
                Ok(Some(Seen { delivery: delivery?, lane }))
            }
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// Removes the message from the dead-letter queue for good.
    pub async fn take(&mut self, seen: &Seen) -> anyhow::Result<()> {
        self.lanes[seen.lane]
            .basic_ack(seen.delivery.delivery_tag, BasicAckOptions { multiple: false })
            .await?;
        Ok(())
    }

    /// Leaves the message in the dead-letter queue.
    pub fn leave(&mut self, seen: &Seen) {
        self.highest_left[seen.lane] = Some(seen.delivery.delivery_tag);
        self.left += 1;
    }

    /// Returns every left message to the queue and closes the walk.
    pub async fn finish(self) -> anyhow::Result<()> {
        for (channel, highest) in self.lanes.iter().zip(&self.highest_left) {
            if let Some(tag) = highest {
                channel.basic_nack(*tag, BasicNackOptions { multiple: true, requeue: true }).await?;
            }
            let _ = channel.close(200, "walk done".into()).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use secrecy::ExposeSecret;
    use shared::testing::{TcpProxy, TestBroker, amqp_url};

    #[tokio::test]
    async fn a_replayed_copy_the_broker_never_confirms_fails_after_the_confirm_timeout() {
        let broker = TestBroker::new().await;
        let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
        let url = amqp_url().expose_secret().replace("127.0.0.1:5672", &proxy.addr().to_string());
        let cli = crate::config::Cli::parse_from([
            "worker",
            "--mono-secret-key",
            "test_sk_unused",
            "--amqp-url",
            &url,
            "--queue-prefix",
            &broker.prefix,
            "--retry-delays-secs",
            &broker.retry_delays_arg(),
        ]);
        let mut queue = DeadQueue::open(&cli.broker).await.unwrap();
        queue.confirm_timeout = Duration::from_millis(300);
        // The broker stops answering without failing: the confirm never comes.
        proxy.stall();

        let published = tokio::time::timeout(
            Duration::from_secs(5),
            queue.publish_to_work(b"{}", BasicProperties::default()),
        )
        .await
        .expect("the publish hangs on a broker that never confirms");

        let error = published.expect_err("an unconfirmed copy is a failure").to_string();
        assert!(error.contains("did not confirm"), "{error}");
    }
}
