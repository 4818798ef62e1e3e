//! Polls the depth, consumers and oldest-message age of every queue, for the `monohook_queue_*`
//! gauges. Passive declarations change nothing on the broker; each poll uses a channel of its own,
//! because a failed declaration closes the channel it ran on.
//!
//! Unknown is not zero: a quorum queue whose leader cannot answer still answers a passive
//! declaration, with 0 messages and 0 consumers. While this worker consumes the work queue, 0
//! consumers cannot be true, so such an answer is unknown: `monohook_queue_depth_known` goes to 0
//! and the depth and age gauges read NaN (no alert compares true with NaN; `MonohookQueueDepthUnknown`
//! fires instead), rather than a 0 that would hide a backlog.
//!
//! Ages: a quorum queue does not report the age of its head message, so the work queue's age is
//! estimated from the newest delivery this worker received (the head was received after it, so the
//! estimate is an upper bound, and it keeps growing if the worker stops receiving). Retry queues are
//! bounded by their delays, and the dead-letter queue is a conveyor the worker drains: what waits
//! for an operator is counted from `dead_letters` (`monohook_dead_letters`, and the oldest's age),
//! beside the outbox rows not yet published (`monohook_outbox_pending`).

use lapin::Connection;
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::health::Health;
use shared::topology::Topology;

/// Bound on opening and closing the poll's channel (each declaration is bounded by the topology).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(
    connection: &Connection,
    topology: &Topology,
    pool: &PgPool,
    health: &Arc<Health>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        stored_dead_letters(pool).await;
        // Bounded: a node that stops answering must not hold the poll (the session's watch ends it).
        let Ok(Ok(channel)) = tokio::time::timeout(CALL_TIMEOUT, connection.create_channel()).await else {
            continue;
        };
        let depths = topology.depths(&channel).await;
        let _ = tokio::time::timeout(CALL_TIMEOUT, channel.close(200, "polled".into())).await;
        let Ok(depths) = depths else { continue };
        let work = topology.work_queue();
        for depth in depths {
            let label = depth
                .queue
                .strip_prefix(&format!("{}.", topology.exchange()))
                .unwrap_or(&depth.queue)
                .to_owned();
            let known = depth_is_known(depth.queue == work, depth.consumers, health.is_consuming());
            metrics::gauge!("monohook_queue_depth_known", "queue" => label.clone())
                .set(f64::from(u8::from(known)));
            if !known {
                metrics::gauge!("monohook_queue_messages", "queue" => label.clone()).set(f64::NAN);
                metrics::gauge!("monohook_queue_consumers", "queue" => label.clone()).set(f64::NAN);
                metrics::gauge!("monohook_queue_oldest_message_age_seconds", "queue" => label).set(f64::NAN);
                continue;
            }
            metrics::gauge!("monohook_queue_messages", "queue" => label.clone())
                .set(f64::from(depth.messages));
            metrics::gauge!("monohook_queue_consumers", "queue" => label.clone())
                .set(f64::from(depth.consumers));
            let age = if depth.messages == 0 {
                Some(0.0)
            } else if depth.queue == work {
                let newest = health.last_received_ms.load(Ordering::Relaxed);
                Some(((chrono::Utc::now().timestamp_millis() - newest).max(0) as f64) / 1000.0)
            } else {
                None
            };
            if let Some(age) = age {
                metrics::gauge!("monohook_queue_oldest_message_age_seconds", "queue" => label).set(age);
            }
        }
    }
}

/// Whether a passive declaration's answer can be believed: the work queue cannot have no consumer
/// while this worker consumes it (the answer came without the queue's leader).
fn depth_is_known(is_work_queue: bool, consumers: u32, consuming: bool) -> bool {
    !(is_work_queue && consumers == 0 && consuming)
}

/// Dead letters waiting for an operator (rows, not messages: the dead-letter queue is only a
/// conveyor) and outbox rows waiting for the relay.
async fn stored_dead_letters(pool: &PgPool) {
    let counted: Result<(i64, Option<chrono::DateTime<chrono::Utc>>, i64), _> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM dead_letters), (SELECT min(dead_at) FROM dead_letters),
                (SELECT count(*) FROM outbox)",
    )
    .fetch_one(pool)
    .await;
    let Ok((dead, oldest, outbox)) = counted else { return };
    metrics::gauge!("monohook_dead_letters").set(dead as f64);
    let age = oldest.map_or(0.0, |at| (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0);
    metrics::gauge!("monohook_dead_letters_oldest_age_seconds").set(age);
    metrics::gauge!("monohook_outbox_pending").set(outbox as f64);
}

#[cfg(test)]
mod tests {
    use super::depth_is_known;

    #[test]
    fn no_consumer_on_the_work_queue_we_consume_is_an_unknown_depth_not_zero() {
        assert!(!depth_is_known(true, 0, true), "the leader did not answer");
        assert!(depth_is_known(true, 0, false), "not consuming: 0 consumers may be true");
        assert!(depth_is_known(true, 2, true));
        assert!(depth_is_known(false, 0, true), "nobody consumes the other queues");
    }
}
