//! Walking the dead-letter queue once: every message present at the start is seen exactly once,
//! taken (acked, after the caller has made it safe elsewhere) or left (returned to the queue when
//! the walk ends, interrupted or not).

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::time::Duration;

use shared::amqp;
use shared::config::BrokerArgs;
use shared::topology::Topology;

/// Most messages held unacked while walking: a filtered walk over a larger dead-letter queue
/// leaves the rest for the next run.
const MAX_HELD: u16 = u16::MAX;

pub struct DeadQueue {
    connection: Connection,
    publish: Channel,
    pub topology: Topology,
}

pub struct Walk {
    channel: Channel,
    consumer: lapin::Consumer,
    remaining: u32,
    highest_left: Option<u64>,
    pub left: u32,
}

impl DeadQueue {
    pub async fn open(broker: &BrokerArgs) -> anyhow::Result<Self> {
        let connection = amqp::connect(&broker.amqp_url, "monohook-dlq").await?;
        let publish = connection.create_channel().await?;
        publish.confirm_select(Default::default()).await?;
        let topology = broker.topology();
        topology.declare(&publish).await?;
        Ok(Self { connection, publish, topology })
    }

    /// Messages in the dead-letter queue now.
    pub async fn depth(&self) -> anyhow::Result<u32> {
        let channel = self.connection.create_channel().await?;
        let depths = self.topology.depths(&channel).await?;
        let _ = channel.close(200, "done".into()).await;
        let dead = self.topology.dead_queue();
        Ok(depths.into_iter().find(|d| d.queue == dead).map_or(0, |d| d.messages))
    }

    /// Starts a walk over the messages in the dead-letter queue now.
    pub async fn walk(&self) -> anyhow::Result<Walk> {
        let remaining = self.depth().await?;
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(u16::try_from(remaining).unwrap_or(MAX_HELD).max(1), BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.topology.dead_queue().as_str().into(),
                "monohook-dlq".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Walk { channel, consumer, remaining, highest_left: None, left: 0 })
    }

    /// Publishes a copy of `properties`/`body` onto the work queue and waits for the confirm.
    pub async fn publish_to_work(&self, body: &[u8], properties: BasicProperties) -> anyhow::Result<()> {
        let queue = self.topology.work_queue();
        let confirm = self
            .publish
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions { mandatory: true, immediate: false },
                body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            other => anyhow::bail!("the broker did not confirm the copy on {queue}: {other:?}"),
        }
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

impl Walk {
    /// The next message present when the walk started, or `None` when all were seen.
    pub async fn next(&mut self) -> anyhow::Result<Option<Delivery>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        // Messages that arrive during the walk may be among those seen; a quiet queue ends it.
        match tokio::time::timeout(Duration::from_secs(3), self.consumer.next()).await {
            Ok(Some(delivery)) => {
                self.remaining -= 1;
                Ok(Some(delivery?))
            }
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// Removes the message from the dead-letter queue for good.
    pub async fn take(&mut self, delivery: &Delivery) -> anyhow::Result<()> {
        self.channel.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: false }).await?;
        Ok(())
    }

    /// Leaves the message in the dead-letter queue.
    pub fn leave(&mut self, delivery: &Delivery) {
        self.highest_left = Some(delivery.delivery_tag);
        self.left += 1;
    }

    /// Returns every left message to the queue and closes the walk.
    pub async fn finish(self) -> anyhow::Result<()> {
        if let Some(tag) = self.highest_left {
            self.channel.basic_nack(tag, BasicNackOptions { multiple: true, requeue: true }).await?;
        }
        let _ = self.channel.close(200, "walk done".into()).await;
        Ok(())
    }
}
