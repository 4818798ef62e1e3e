//! The references: what RabbitMQ does for a bare lapin client on this machine, right now.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use secrecy::SecretString;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::bodies;

pub async fn connect(url: &str) -> anyhow::Result<Connection> {
    Ok(shared::amqp::connect(&SecretString::from(url), "monohook-bench").await?)
}

/// A fresh durable quorum queue, like monohook's work queue.
pub async fn declare_quorum(channel: &Channel, name: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    channel
        .queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await?;
    Ok(())
}

pub async fn delete_queue(channel: &Channel, name: &str) {
    let _ = channel.queue_delete(name.into(), QueueDeleteOptions::default()).await;
}

/// Publishes persistent 1 KiB bodies with confirms for `duration`, keeping `in_flight` publishes
/// outstanding over `channels` channels (as ingest does). Returns confirmed messages per second.
/// What a reference publish looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishShape {
    /// Straight to the queue through the default exchange, persistent, nothing else: the ceiling.
    Bare,
    /// What ingest publishes: through a topic exchange bound with `#`, routing key = event name,
    /// with ingest's properties and headers. Separates the broker's share of ingest's cost from
    /// ingest's own.
    LikeIngest,
}

pub async fn publish_reference(
    url: &str,
    in_flight: usize,
    channels: usize,
    duration: Duration,
    body_bytes: usize,
    shape: PublishShape,
) -> anyhow::Result<f64> {
    let connection = connect(url).await?;
    let setup = connection.create_channel().await?;
    let queue = format!("bench.publish.{}", uuid::Uuid::new_v4().simple());
    declare_quorum(&setup, &queue).await?;
    let exchange = match shape {
        PublishShape::Bare => String::new(),
        PublishShape::LikeIngest => {
            let exchange = format!("{queue}.topic");
            let options = lapin::options::ExchangeDeclareOptions { durable: true, ..Default::default() };
            setup
                .exchange_declare(
                    exchange.as_str().into(),
                    lapin::ExchangeKind::Topic,
                    options,
                    FieldTable::default(),
                )
                .await?;
            setup
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "#".into(),
                    Default::default(),
                    FieldTable::default(),
                )
                .await?;
            exchange
        }
    };
    let mut pool = Vec::new();
    for _ in 0..channels {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        pool.push(channel);
    }
    let confirmed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..in_flight {
        let channel = pool[worker % channels].clone();
        let (queue, exchange, confirmed) = (queue.clone(), exchange.clone(), confirmed.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = worker as u64;
            while Instant::now() < deadline {
                let body = bodies::account_updated(&bodies::account_id(n % 10_000), n, body_bytes);
                let (properties, routing_key) = match shape {
                    PublishShape::Bare => (BasicProperties::default().with_delivery_mode(2), queue.as_str()),
                    PublishShape::LikeIngest => (
                        shared::delivery::DeliveryMeta::stamp(&body).to_properties(),
                        "mono.events.account_updated",
                    ),
                };
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.into(),
                        BasicPublishOptions { mandatory: true, immediate: false },
                        &body,
                        properties,
                    )
                    .await?
                    .await?;
                if confirm.is_ack() {
                    confirmed.fetch_add(1, Ordering::Relaxed);
                }
                n += in_flight as u64;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    delete_queue(&setup, &queue).await;
    if !exchange.is_empty() {
        let _ = setup.exchange_delete(exchange.as_str().into(), Default::default()).await;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(confirmed.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Fills `queue` with `messages` using pipelined confirms (fast, not measured).
pub async fn prefill(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    messages: impl Iterator<Item = (Vec<u8>, BasicProperties)>,
) -> anyhow::Result<u64> {
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut count = 0;
    for (body, properties) in messages {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        count += 1;
        if count % 2000 == 0 {
            channel.wait_for_confirms().await?;
        }
    }
    channel.wait_for_confirms().await?;
    Ok(count)
}

/// Consumes a pre-filled quorum queue of `messages` with manual acks (one per message) and
/// `prefetch` deliveries outstanding. Returns messages per second.
pub async fn consume_reference(
    url: &str,
    messages: u64,
    prefetch: u16,
    body_bytes: usize,
) -> anyhow::Result<f64> {
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    let queue = format!("bench.consume.{}", uuid::Uuid::new_v4().simple());
    declare_quorum(&channel, &queue).await?;
    let fill = connection.create_channel().await?;
    let bodies = (0..messages).map(|n| {
        (
            bodies::account_updated(&bodies::account_id(n % 10_000), n, body_bytes),
            BasicProperties::default().with_delivery_mode(2),
        )
    });
    prefill(&fill, "", &queue, bodies).await?;

    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = 0;
    while received < messages {
        let delivery = consumer.next().await.ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        delivery.ack(BasicAckOptions::default()).await?;
        received += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    delete_queue(&fill, &queue).await;
    let _ = connection.close(200, "done".into()).await;
    Ok(messages as f64 / elapsed)
}
