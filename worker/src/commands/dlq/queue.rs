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
//!
//! "Nothing ready" also holds for a message the broker has handed to one of our lanes that the walk
//! has not read yet (in flight on the socket, or buffered by the client). So before a walk calls
//! the queue quiet, and again before it is judged whole, it asks each lane for a reply: the broker
//! sends a lane's deliveries before its later replies, so once every lane has answered, whatever
//! the broker gave us is in the client's buffer and is read. A message found that way keeps the walk
//! going; it is never taken for "not in the queue".

use futures_util::FutureExt;
use futures_util::stream::{self, BoxStream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::collections::VecDeque;
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
    /// Each lane's prefetch, asked again to learn that the lane's earlier deliveries have arrived.
    prefetch: u16,
    deliveries: BoxStream<'static, (usize, lapin::Result<Delivery>)>,
    /// Deliveries already in our lanes, read by a check that found the walk was not over; `next`
    /// hands them out first.
    waiting: VecDeque<(usize, lapin::Result<Delivery>)>,
    /// How long `next` waits for a message while some present at the start are still unseen.
    idle: Duration,
    /// How long `next` waits once all were seen, and the pause between `fully_seen`'s two looks.
    settle: Duration,
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
        Ok(Self { connection, publish, topology, confirm_timeout: crate::republish::CONFIRM_TIMEOUT })
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
        let prefetch = u16::try_from(wanted.min(LANE_CAPACITY)).unwrap_or(u16::MAX);
        for lane in 0..lane_count {
            let channel = self.connection.create_channel().await?;
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
            prefetch,
            deliveries: stream::select_all(consumers).boxed(),
            waiting: VecDeque::new(),
            idle: IDLE,
            settle: SETTLE,
            remaining,
            highest_left,
            left: 0,
            seen: 0,
        })
    }

    /// Whether `walk` has seen the whole queue: nothing is ready, nobody but the walk consumes
    /// (asked while the walk still holds what it left), and nothing the broker handed to the walk's
    /// lanes is still unread. When it is `false` and [`Walk::has_waiting`], the walk is not over:
    /// keep calling `next`.
    pub async fn fully_seen(&self, walk: &mut Walk) -> anyhow::Result<bool> {
        // Messages another walk just returned reach the ready count a moment after it closed: ask
        // twice, a moment apart.
        for pause in [Duration::ZERO, walk.settle] {
            tokio::time::sleep(pause).await;
            let (ready, consumers) = self.counts().await?;
            if ready != 0 || consumers as usize != walk.lanes.len() {
                return Ok(false);
            }
        }
        // Nothing ready: every message is unacked, and only in our lanes; but the ones delivered
        // since `next` went quiet are not seen yet.
        Ok(walk.collect_waiting().await? == 0)
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
    /// seen, or none arriving for a while) and nothing the broker handed to our lanes is unread.
    pub async fn next(&mut self) -> anyhow::Result<Option<Seen>> {
        if let Some(waiting) = self.waiting.pop_front() {
            return self.accept(waiting).map(Some);
        }
        let idle = if self.remaining > 0 { self.idle } else { self.settle };
        match tokio::time::timeout(idle, self.deliveries.next()).await {
            Ok(Some(delivered)) => return self.accept(delivered).map(Some),
            Ok(None) => return Ok(None),
            Err(_) => {}
        }
        // Quiet for a while, but a message may be on its way to us, already out of the ready count.
        self.collect_waiting().await?;
        self.waiting.pop_front().map(|waiting| self.accept(waiting)).transpose()
    }

    /// Whether messages delivered to the walk are waiting to be read: the walk is not over.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    fn accept(&mut self, (lane, delivery): (usize, lapin::Result<Delivery>)) -> anyhow::Result<Seen> {
        self.remaining = self.remaining.saturating_sub(1);
        self.seen += 1;
        Ok(Seen { delivery: delivery?, lane })
    }

    /// Reads into `waiting` every message the broker handed to our lanes before now; returns how
    /// many are waiting. Each lane answers a `basic.qos` (same prefetch: nothing changes) after the
    /// deliveries it was sent before, so once all have answered those deliveries are buffered.
    async fn collect_waiting(&mut self) -> anyhow::Result<usize> {
        for lane in &self.lanes {
            lane.basic_qos(self.prefetch, BasicQosOptions::default()).await?;
        }
        while let Some(Some(delivered)) = self.deliveries.next().now_or_never() {
            self.waiting.push_back(delivered);
        }
        Ok(self.waiting.len())
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
    use shared::testing::{TcpProxy, TestBroker, amqp_url, eventually};

    fn cli_for(broker: &TestBroker, url: &str) -> crate::config::Cli {
        crate::config::Cli::parse_from([
            "worker",
            "--mono-secret-key",
            "test_sk_unused",
            "--amqp-url",
            url,
            "--queue-prefix",
            &broker.prefix,
            "--retry-delays-secs",
            &broker.retry_delays_arg(),
        ])
    }

    #[tokio::test]
    async fn a_walk_is_not_judged_whole_while_messages_wait_unread_in_its_own_lanes() {
        const SENT: u32 = 1_000;
        let broker = TestBroker::new().await;
        let queue = DeadQueue::open(&cli_for(&broker, amqp_url().expose_secret()).broker).await.unwrap();
        let dead = queue.topology.dead_queue();
        for n in 0..SENT {
            broker.publish_to_queue(&dead, n.to_string().as_bytes(), BasicProperties::default()).await;
        }
        assert_eq!(queue.depth().await.unwrap(), SENT);

        let mut walk = queue.walk().await.unwrap();
        // The walk stops waiting at once, while the broker is still handing it the queue.
        walk.idle = Duration::ZERO;
        walk.settle = Duration::ZERO;
        let mut read = 0;
        let whole = loop {
            while let Some(seen) = walk.next().await.unwrap() {
                walk.leave(&seen);
                read += 1;
            }
            // Every message has left the ready count: it sits in the walk's lane, read or not.
            eventually("the broker hands every message to the walk", Duration::from_secs(10), || async {
                queue.depth().await.unwrap() == 0
            })
            .await;
            if queue.fully_seen(&mut walk).await.unwrap() {
                break true;
            }
            if !walk.has_waiting() {
                break false;
            }
        };

        assert!(whole, "only the walk consumes and nothing is ready: it saw the whole queue");
        assert_eq!(read, SENT, "a walk judged whole has read every message of the queue");
        walk.finish().await.unwrap();
        // Returned messages reach the ready count a moment after the walk ends.
        eventually("the walk leaves every message in the queue", Duration::from_secs(10), || async {
            queue.depth().await.unwrap() == SENT
        })
        .await;
        queue.close().await;
    }

    #[tokio::test]
    async fn a_replayed_copy_the_broker_never_confirms_fails_after_the_confirm_timeout() {
        let broker = TestBroker::new().await;
        let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
        let url = amqp_url().expose_secret().replace("127.0.0.1:5672", &proxy.addr().to_string());
        let cli = cli_for(&broker, &url);
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
