//! Moving a delivery to a retry tier (dead letters are rows: `db::dead_letters`).
//!
//! The worker republishes rather than nacking: a nack cannot carry the reason and attempt history,
//! and a requeue would count against the delivery limit. The copy keeps the body, the message id
//! and the stamp, gains the attempt headers, and is confirmed by the broker before the original is
//! acked, so a crash in between leaves two copies (the journal recognises the second), never none.

use chrono::Utc;
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::Arc;

use shared::delivery::{
    AttemptHistory, BROKER_HEADERS, HEADER_ATTEMPTS, HEADER_FIRST_ATTEMPT_AT, HEADER_LAST_ATTEMPT_AT,
    HEADER_LAST_ERROR, format_time, long_string,
};
use shared::topology::Topology;

/// Times the poison guard counted a delivery handed out without being settled, carried by a parked
/// copy: the copy is a new message, whose `x-delivery-count` starts again. Only parks carry it (a
/// move to a retry tier spends an attempt instead, and a dead letter is done).
pub const HEADER_HANDED_OUT: &str = "x-handed-out";

/// Why a delivery is dead (the `x-dead-class` header and the metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadClass {
    /// Not an event, or handed out too many times.
    Poison,
    /// Mono refused the account, or the database refused the event.
    Permanent,
    /// Every retry tier was used up.
    Exhausted,
}

impl DeadClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poison => "poison",
            Self::Permanent => "permanent",
            Self::Exhausted => "exhausted",
        }
    }
}

/// Longest reason kept in a header.
const MAX_REASON_CHARS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RepublishError {
    #[error("publishing to {queue} failed: {source}")]
    Broker {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker did not confirm the copy in {queue}")]
    NotConfirmed { queue: String },
    #[error("the broker did not confirm the copy in {queue} within {timeout:?}")]
    TimedOut { queue: String, timeout: std::time::Duration },
}

/// How long a copy may wait for the broker's confirm (a node in a leader election may never send it).
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long moves are watched, from the first failure, before the node is judged: three confirm
/// timeouts, longer than a quorum queue's election, so that the worker moves on within a minute.
pub const MOVES_FAILING_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Failed moves in a window that make the node useless, when fewer than one in ten was taken: a
/// quorum queue over its length limit still takes the odd copy once it has emptied (its limit is
/// checked lazily), which must not keep a worker whose moves almost all fail on the node.
const MOVES_FAILED_MIN: u32 = 3;

/// Moves watched since the first failure that opened the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveWindow {
    pub opened: std::time::Instant,
    pub failed: u32,
    pub taken: u32,
}

/// What the moves of a window say about the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveVerdict {
    /// No window open, or one not yet [`MOVES_FAILING_MAX`] old.
    Watching,
    /// A window closed with moves taken often enough: the node does its job.
    Fine,
    /// A window closed with at least [`MOVES_FAILED_MIN`] failures and fewer than one move in ten
    /// taken.
    Useless,
}

/// Adds one move's outcome (`taken`, at `now`) to `window`: a failure opens a window, a taken move
/// with none open opens nothing; a window [`MOVES_FAILING_MAX`] old is judged and closed.
pub fn judge_move(
    window: Option<MoveWindow>,
    taken: bool,
    now: std::time::Instant,
) -> (Option<MoveWindow>, MoveVerdict) {
    let Some(mut window) = window.or((!taken).then_some(MoveWindow { opened: now, failed: 0, taken: 0 }))
    else {
        return (None, MoveVerdict::Watching);
    };
    if taken {
        window.taken += 1;
    } else {
        window.failed += 1;
    }
    if now.duration_since(window.opened) < MOVES_FAILING_MAX {
        return (Some(window), MoveVerdict::Watching);
    }
    let useless = window.failed >= MOVES_FAILED_MIN && window.taken.saturating_mul(10) < window.failed;
    (None, if useless { MoveVerdict::Useless } else { MoveVerdict::Fine })
}

/// Publishes copies on a confirm-mode channel of the current session.
pub struct Republisher {
    /// The session's publishing connection, for declarations on channels of their own.
    connection: Arc<Connection>,
    channel: Channel,
    topology: Topology,
    /// The moves watched since a failure (nacks and missing confirms; not while blocked).
    window: std::sync::Mutex<Option<MoveWindow>>,
    /// Fired once moves have failed for [`MOVES_FAILING_MAX`]: the session ends and the next one
    /// starts at the next node.
    moves_failing: tokio_util::sync::CancellationToken,
}

impl Republisher {
    pub fn new(
        connection: Arc<Connection>,
        channel: Channel,
        topology: Topology,
        moves_failing: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self { connection, channel, topology, window: std::sync::Mutex::new(None), moves_failing }
    }

    /// Notes what one move's outcome says about the node; fires `moves_failing` when it is useless.
    /// A failed channel is the session's watch's business, and a blocked connection is an alarm,
    /// the whole cluster's: neither counts.
    fn note(&self, outcome: &Result<(), RepublishError>) {
        let taken = match outcome {
            Ok(()) => true,
            Err(RepublishError::NotConfirmed { .. } | RepublishError::TimedOut { .. })
                if !self.connection.status().blocked() =>
            {
                false
            }
            Err(_) => return,
        };
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let watched = *window;
        let (next, verdict) = judge_move(watched, taken, std::time::Instant::now());
        *window = next;
        if verdict == MoveVerdict::Useless && !self.moves_failing.is_cancelled() {
            let failed = watched.map_or(0, |w| w.failed + 1);
            tracing::warn!(failed, "the broker takes almost no moved copy; leaving the node");
            self.moves_failing.cancel();
        }
    }

    /// Sends the delivery to retry tier `tier` (1-based), where it waits out the tier's delay. This
    /// attempt counts.
    pub async fn to_retry_tier(
        &self,
        delivery: &Delivery,
        tier: usize,
        history: &AttemptHistory,
        reason: &str,
    ) -> Result<(), RepublishError> {
        let mut headers = attempt_headers(&delivery.properties, history, history.previous_attempts + 1);
        headers.insert(HEADER_LAST_ERROR.into(), long_string(&truncate(reason)));
        self.publish(&self.topology.retry_queue(tier), delivery, headers).await
    }

    /// Parks the delivery in the first retry tier because what failed is ours (Mono down for everyone,
    /// our key refused, our database failing this event): the attempt does not count, so an outage
    /// never uses up a delivery's attempts.
    pub async fn park(
        &self,
        delivery: &Delivery,
        history: &AttemptHistory,
        handed_out: u32,
        reason: &str,
    ) -> Result<(), RepublishError> {
        let mut headers = attempt_headers(&delivery.properties, history, history.previous_attempts);
        headers.insert(HEADER_LAST_ERROR.into(), long_string(&truncate(reason)));
        if handed_out > 0 {
            headers.insert(HEADER_HANDED_OUT.into(), AMQPValue::LongUInt(handed_out));
        }
        self.publish(&self.topology.retry_queue(1), delivery, headers).await
    }

    /// Declares the topology again, so that a queue an operator deleted exists again for the next
    /// try. On a channel of its own, never the republishing one: a refused declaration (406, a queue
    /// declared with other arguments) closes the channel it was made on, and losing the republishing
    /// channel would end the session, on every move that needed a second try. The dead-letter queue
    /// of an earlier version (without its delivery limit) is accepted, as at start.
    pub async fn redeclare(&self) -> Result<(), shared::topology::TopologyError> {
        self.topology.declare_on(&self.connection).await
    }

    async fn publish(
        &self,
        queue: &str,
        delivery: &Delivery,
        headers: FieldTable,
    ) -> Result<(), RepublishError> {
        let properties: BasicProperties =
            delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        let broker = |source| RepublishError::Broker { queue: queue.to_owned(), source };
        let published = async {
            self.channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions { mandatory: true, immediate: false },
                    &delivery.data,
                    properties,
                )
                .await
                .map_err(broker)?
                .await
                .map_err(broker)
        };
        let outcome = match tokio::time::timeout(CONFIRM_TIMEOUT, published).await {
            Err(_) => Err(RepublishError::TimedOut { queue: queue.to_owned(), timeout: CONFIRM_TIMEOUT }),
            Ok(Err(error)) => Err(error),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(_)) => Err(RepublishError::NotConfirmed { queue: queue.to_owned() }),
        };
        self.note(&outcome);
        outcome
    }
}

/// The original headers minus the broker's, plus the attempts made so far and their times. Everything
/// else stays, the trace context (`traceparent`) included: each attempt joins the webhook's trace.
fn attempt_headers(properties: &BasicProperties, history: &AttemptHistory, attempts: u32) -> FieldTable {
    let mut headers: FieldTable = properties.headers().clone().unwrap_or_default();
    let kept: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(name, _)| !BROKER_HEADERS.contains(&name.as_str()) && name.as_str() != HEADER_HANDED_OUT)
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    headers = FieldTable::from(kept);
    let now = format_time(Utc::now());
    let first = history.first_attempt_at.map(format_time).unwrap_or_else(|| now.clone());
    headers.insert(HEADER_ATTEMPTS.into(), AMQPValue::LongLongInt(attempts.into()));
    headers.insert(HEADER_FIRST_ATTEMPT_AT.into(), long_string(&first));
    headers.insert(HEADER_LAST_ATTEMPT_AT.into(), long_string(&now));
    headers
}

fn truncate(reason: &str) -> String {
    reason.chars().take(MAX_REASON_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::delivery::long_string;
    use shared::telemetry::propagation::{HEADER_TRACEPARENT, HEADER_TRACESTATE};

    #[test]
    fn a_window_of_moves_that_almost_all_failed_makes_the_node_useless() {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let feed = |outcomes: &[(u64, bool)]| {
            let mut window = None;
            let mut verdicts = Vec::new();
            for &(ms, taken) in outcomes {
                let (next, verdict) = judge_move(window, taken, at(ms));
                window = next;
                verdicts.push(verdict);
            }
            (window, verdicts)
        };
        let end = MOVES_FAILING_MAX.as_millis() as u64;

        assert_eq!(feed(&[(0, true), (end * 2, true)]).0, None, "taken moves open no window");
        let (_, verdicts) = feed(&[(0, false), (1_000, false), (end - 1, false), (end, false)]);
        assert_eq!(
            verdicts,
            [MoveVerdict::Watching; 3].into_iter().chain([MoveVerdict::Useless]).collect::<Vec<_>>()
        );
        // One copy taken among twenty failures (a quorum queue's lazy limit) is still useless.
        let mut lazy: Vec<(u64, bool)> = (0..20).map(|i| (i * 1_000, false)).collect();
        lazy.insert(10, (10_500, true));
        lazy.push((end, false));
        assert_eq!(feed(&lazy).1.last(), Some(&MoveVerdict::Useless));
        // Half taken: the node does its job, and the window closes.
        let half: Vec<(u64, bool)> = (0..10).map(|i| (i * 3_000, i % 2 == 1)).chain([(end, false)]).collect();
        let (window, verdicts) = feed(&half);
        assert_eq!((window, verdicts.last()), (None, Some(&MoveVerdict::Fine)));
        // Two failures a window apart are not enough to judge a node.
        assert_eq!(feed(&[(0, false), (end, false)]).1.last(), Some(&MoveVerdict::Fine));
    }

    #[test]
    fn a_moved_copy_keeps_the_trace_context_and_drops_the_brokers_headers() {
        let traceparent = long_string("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let mut original = FieldTable::default();
        original.insert(HEADER_TRACEPARENT.into(), traceparent.clone());
        original.insert(HEADER_TRACESTATE.into(), long_string("monohook=1"));
        original.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let properties = BasicProperties::default().with_headers(original);
        let history = AttemptHistory { previous_attempts: 1, first_attempt_at: None };

        let headers = attempt_headers(&properties, &history, 2);

        assert_eq!(headers.inner().get(HEADER_TRACEPARENT), Some(&traceparent));
        assert_eq!(headers.inner().get(HEADER_TRACESTATE), Some(&long_string("monohook=1")));
        assert!(!headers.inner().contains_key("x-delivery-count"));
        assert_eq!(headers.inner().get(HEADER_ATTEMPTS), Some(&AMQPValue::LongLongInt(2)));
    }
}
