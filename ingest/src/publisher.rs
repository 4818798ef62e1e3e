//! Publishing webhooks to RabbitMQ with confirms, and keeping the connection alive.
//!
//! A `Publisher` holds the current broker session (a connection and a few confirm-mode channels)
//! behind a lock that is only ever held to clone an `Arc`: many requests publish at once on shared
//! channels and each awaits its own confirm. A supervisor task replaces the session when the
//! connection dies, with backoff. On shutdown the connection is closed cleanly.
//!
//! A session is judged by what it does, not by its TCP connection: one whose channel fails under a
//! publish, or that confirms nothing for three confirm timeouts in a row (a frozen node, a node cut
//! off from the queue's leader, channels that still address a queue's old leader: only nacks and
//! timeouts), is condemned; readiness says not ready and the supervisor moves to
//! the next node at once. A node is condemned for silence, never for latency: every copy's confirm
//! is kept until the request's deadline, and whichever the broker acks first answers. A copy that
//! can no longer be confirmed (nacked, its channel failed, its session condemned or replaced) is
//! published again (same message id: the worker's journal takes one copy) until the request's
//! deadline (`PUBLISH_DEADLINE_MS`), so a node that dies under a request costs Mono no retry; past
//! the deadline the request gets 503.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use secrecy::SecretString;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use shared::amqp::{self, ConnectError};
use shared::retry::RetryPolicy;
use shared::topology::Topology;

/// Why a publish was not confirmed. Every variant means the webhook is not safely queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No broker session right now (reconnecting).
    #[error("not connected to RabbitMQ")]
    NotConnected,
    /// The broker refused to take responsibility for the message.
    #[error("the broker nacked the publish")]
    Nacked,
    /// No queue is bound for the routing key (the message was returned).
    #[error("the message was unroutable: {0}")]
    Unroutable(String),
    /// No confirm arrived in time; the message may or may not be queued.
    #[error("no confirm within {0:?}")]
    TimedOut(Duration),
    /// The channel or connection failed during the publish.
    #[error("publish failed: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker blocks publishers (a memory or disk alarm): it is busy, not a bad node.
    #[error("the broker blocks publishing (a memory or disk alarm)")]
    Blocked,
}

impl PublishError {
    /// A label for metrics.
    fn label(&self) -> &'static str {
        match self {
            Self::NotConnected => "not_connected",
            Self::Nacked => "nacked",
            Self::Unroutable(_) => "unroutable",
            Self::TimedOut(_) => "timed_out",
            Self::Broker(_) => "broker_error",
            Self::Blocked => "blocked",
        }
    }
}

/// What the publisher needs to (re)connect.
#[derive(Clone, Debug)]
pub struct PublisherSettings {
    pub amqp_url: SecretString,
    pub topology: Topology,
    pub channels: usize,
    /// How long one publish waits for its confirm.
    pub confirm_timeout: Duration,
    /// How long a request may take in all, publishing again after each failed try.
    pub deadline: Duration,
}

/// Bound on opening one channel (a node that accepted the connection may answer nothing more).
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a publish that failed waits before trying again (for a new session, mostly).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Confirm timeouts of failed publishes only (nacks and timeouts, none taken), counted from the first
/// failure since the broker last took one, after which a session is condemned.
const SILENT_CONFIRM_TIMEOUTS: u32 = 3;

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PublisherSettings,
    session: RwLock<Option<Arc<Session>>>,
}

struct Session {
    /// Shared with the task that closes it once the supervisor has moved on.
    connection: Arc<Connection>,
    channels: Vec<Channel>,
    next_channel: AtomicUsize,
    opened: std::time::Instant,
    /// When the broker last took a publish (an ack, or an unroutable message returned), in ms
    /// after `opened`.
    last_heard_ms: AtomicU64,
    /// When the first publish that failed since then was sent, in ms after `opened` (`u64::MAX`:
    /// none failed). Counted from there, not from the last ack: after a quiet spell one nack is
    /// not three timeouts of failure.
    failing_since_ms: AtomicU64,
    /// Fired when the session is judged useless by what it does: the supervisor moves on.
    condemned: CancellationToken,
}

impl Publisher {
    /// Connects and declares the topology once; fails if the broker cannot be reached now, so a
    /// misconfigured process stops at start with a clear error.
    pub async fn connect(settings: PublisherSettings) -> Result<Self, SessionError> {
        let session = open_session(&settings, Declare::First).await?;
        metrics::gauge!("monohook_ingest_broker_connected").set(1.0);
        metrics::gauge!("monohook_ingest_broker_blocked").set(0.0);
        Ok(Self { inner: Arc::new(Inner { settings, session: RwLock::new(Some(Arc::new(session))) }) })
    }

    /// Publishes `body` to the exchange with `routing_key`, persistent and mandatory, and waits for
    /// the broker's confirm. `Ok` means the broker has the message on disk in a queue.
    ///
    /// Every copy's confirm is kept until the request's deadline: whichever the broker acks first
    /// answers, however late, so a slow node (quorum commits at about the confirm timeout) costs a
    /// wait, not a 503, a node move and copies of the message. Each confirm timeout without an ack is
    /// silence, judged against the session (condemned after [`SILENT_CONFIRM_TIMEOUTS`] in a row);
    /// a new copy is sent only when the last one cannot be confirmed any more: nacked, its channel
    /// failed, or its session condemned or replaced (then on the next session). An unroutable
    /// message is not sent again.
    pub async fn publish_confirmed(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let deadline = tokio::time::Instant::now() + self.inner.settings.deadline;
        let confirm_timeout = self.inner.settings.confirm_timeout;
        let mut pending = futures_util::stream::FuturesUnordered::new();
        // The session the last copy went to, and when (ms after it opened).
        let mut last_copy: Option<(Arc<Session>, u64)> = None;
        let mut last_error = PublishError::NotConnected;
        loop {
            let copy_alive = last_copy.as_ref().is_some_and(|(session, _)| {
                !session.condemned.is_cancelled() && self.current().is_some_and(|c| Arc::ptr_eq(&c, session))
            });
            if !copy_alive {
                if last_copy.is_some() {
                    metrics::counter!("monohook_ingest_publish_retries_total", "reason" => last_error.label())
                        .increment(1);
                    tracing::debug!(error = %last_error, "publishing again before the request's deadline");
                }
                match self.send_copy(routing_key, body, properties.clone(), deadline).await {
                    Ok((session, sent_ms, confirm)) => {
                        pending.push(settle(session.clone(), sent_ms, confirm, confirm_timeout));
                        last_copy = Some((session, sent_ms));
                    }
                    Err(PublishError::Blocked) if pending.is_empty() => return Err(PublishError::Blocked),
                    Err(error) => {
                        last_error = error;
                        last_copy = None;
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(last_error);
            }
            // Waits for the next confirm, a confirm timeout of silence, or (no copy out: no session
            // right now) a pause.
            let wait = if last_copy.is_some() { confirm_timeout } else { RETRY_PAUSE };
            let wake = (now + wait).min(deadline);
            tokio::select! {
                Some((session, sent_ms, settled)) = futures_util::StreamExt::next(&mut pending) => match settled {
                    Ok(()) => return Ok(()),
                    Err(error @ PublishError::Unroutable(_)) => return Err(error),
                    Err(error) => {
                        // That copy can no longer be confirmed: if it was the last one, the next
                        // round sends another, after a pause (a new session, mostly).
                        let was_last = last_copy
                            .as_ref()
                            .is_some_and(|(last, sent)| Arc::ptr_eq(last, &session) && *sent == sent_ms);
                        last_error = error;
                        if was_last {
                            last_copy = None;
                            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                            tokio::time::sleep(RETRY_PAUSE.min(left)).await;
                        }
                    }
                },
                () = tokio::time::sleep_until(wake) => {
                    if let Some((session, sent_ms)) = &last_copy {
                        if session.connection.status().blocked() {
                            // Busy, not silent: its confirm may still come when the alarm clears.
                            last_error = PublishError::Blocked;
                            continue;
                        }
                        last_error = PublishError::TimedOut(confirm_timeout);
                        let failing_for = session.failed(*sent_ms);
                        if failing_for >= confirm_timeout * SILENT_CONFIRM_TIMEOUTS {
                            session.condemn(format!("the node confirmed no publish for {failing_for:?}"));
                        }
                    }
                }
            }
        }
    }

    /// Sends one copy on the current session; its confirm is waited for by [`settle`].
    async fn send_copy(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        deadline: tokio::time::Instant,
    ) -> Result<(Arc<Session>, u64, lapin::PublisherConfirm), PublishError> {
        let session =
            self.current().filter(|s| !s.condemned.is_cancelled()).ok_or(PublishError::NotConnected)?;
        if session.connection.status().blocked() {
            // Nothing is written until the alarm clears: the request gets its 503 now, and the node
            // is not left (every node of the cluster shares the alarm).
            return Err(PublishError::Blocked);
        }
        let channel = session.pick_channel();
        let exchange = self.inner.settings.topology.exchange();
        let sent_ms = session.opened.elapsed().as_millis() as u64;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let sent = tokio::time::timeout(
            left,
            channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                // Mandatory: an unroutable message comes back instead of vanishing.
                BasicPublishOptions { mandatory: true, immediate: false },
                body,
                properties,
            ),
        )
        .await;
        match sent {
            Ok(Ok(confirm)) => Ok((session, sent_ms, confirm)),
            Ok(Err(error)) => {
                session.condemn(format!("a publish failed: {error}"));
                Err(PublishError::Broker(error))
            }
            Err(_) => Err(PublishError::TimedOut(left)),
        }
    }

    /// Whether a broker session is up and not condemned (what `/readyz` reports).
    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|s| s.connection.status().connected() && !s.condemned.is_cancelled())
    }

    /// Whether the broker blocks this session's publishes (a memory or disk alarm).
    pub fn is_blocked(&self) -> bool {
        self.current().is_some_and(|s| s.connection.status().blocked())
    }

    /// Keeps the session alive until `cancel` fires: waits for the connection to die, then reconnects
    /// with backoff (0.2 s doubling up to 5 s), checking the topology each time.
    pub async fn supervise(&self, cancel: CancellationToken) {
        let policy = RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            if let Some(session) = self.current() {
                let lost = session.lost();
                tokio::pin!(lost);
                let mut look = tokio::time::interval(Duration::from_millis(500));
                let mut blocked = false;
                let reason = loop {
                    tokio::select! {
                        reason = &mut lost => break reason,
                        _ = look.tick() => blocked = note_blocked(&session, blocked),
                        () = cancel.cancelled() => return,
                    }
                };
                metrics::gauge!("monohook_ingest_broker_blocked").set(0.0);
                tracing::warn!(%reason, "lost the RabbitMQ connection; publishes wait for the next one until their deadline");
                if let Some(old) = self.replace(None) {
                    // Whatever is left of the old connection goes, so it cannot linger half-open;
                    // beside the move, never before it (a node that answers nothing never says
                    // close-ok).
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            old.connection.close(200, "reconnecting".into()),
                        )
                        .await;
                    });
                }
            }
            let mut schedule = policy.schedule();
            loop {
                let delay = schedule.next_delay().unwrap_or(policy.max_interval);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
                match open_session(&self.inner.settings, Declare::Check).await {
                    Ok(session) => {
                        tracing::info!("reconnected to RabbitMQ");
                        self.replace(Some(Arc::new(session)));
                        break;
                    }
                    Err(SessionError::Topology(error @ shared::topology::TopologyError::Missing { .. })) => {
                        tracing::error!(%error, retry_in = ?delay, "refused a RabbitMQ node without monohook's topology")
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, retry_in = ?delay, "reconnecting to RabbitMQ failed")
                    }
                }
            }
        }
    }

    /// Closes the connection; publishes in flight fail and their requests get 503.
    pub async fn close(&self) {
        if let Some(session) = self.replace(None)
            && let Err(error) = session.connection.close(200, "ingest shutting down".into()).await
        {
            tracing::debug!(%error, "closing the RabbitMQ connection");
        }
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.inner.session.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, session: Option<Arc<Session>>) -> Option<Arc<Session>> {
        metrics::gauge!("monohook_ingest_broker_connected").set(if session.is_some() { 1.0 } else { 0.0 });
        std::mem::replace(&mut *self.inner.session.write().unwrap_or_else(|e| e.into_inner()), session)
    }
}

impl Session {
    fn heard_from(&self) {
        self.last_heard_ms.fetch_max(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.failing_since_ms.store(u64::MAX, Ordering::Relaxed);
    }

    /// Notes a failed publish sent at `sent_ms`; returns how long publishes have failed with none
    /// taken: since the first failed one sent after the broker last took a publish.
    fn failed(&self, sent_ms: u64) -> Duration {
        let sent_ms = sent_ms.max(self.last_heard_ms.load(Ordering::Relaxed));
        let since = self.failing_since_ms.fetch_min(sent_ms, Ordering::Relaxed).min(sent_ms);
        self.opened.elapsed().saturating_sub(Duration::from_millis(since))
    }

    fn condemn(&self, reason: String) {
        if !self.condemned.is_cancelled() {
            tracing::warn!(%reason, "leaving this RabbitMQ node: it does not do its job");
            self.condemned.cancel();
        }
    }

    /// Leaves this session's node although its connection may stand. Counted as a move only when it
    /// does: a publish that failed because the connection dropped is an ordinary loss.
    fn leave_node(&self) {
        if self.connection.status().connected() {
            metrics::counter!("monohook_ingest_node_moves_total").increment(1);
        }
        amqp::leave_node();
    }

    fn pick_channel(&self) -> &Channel {
        let index = self.next_channel.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        &self.channels[index]
    }

    /// Resolves when the connection or any of its channels has failed.
    async fn lost(&self) -> String {
        let channels_alive = async {
            let mut poll = tokio::time::interval(Duration::from_millis(500));
            loop {
                poll.tick().await;
                if let Some(channel) = self.channels.iter().find(|c| !c.status().connected()) {
                    return format!("channel {} closed", channel.id());
                }
            }
        };
        tokio::select! {
            reason = amqp::connection_lost(&self.connection) => reason,
            reason = channels_alive => { self.leave_node(); reason }
            () = self.condemned.cancelled() => {
                self.leave_node();
                "the node was judged useless".to_owned()
            }
        }
    }
}

/// Reports a change of whether the broker blocks `session` (log and `monohook_ingest_broker_blocked`);
/// returns the state now.
fn note_blocked(session: &Session, was: bool) -> bool {
    let now = session.connection.status().blocked();
    if now != was {
        metrics::gauge!("monohook_ingest_broker_blocked").set(if now { 1.0 } else { 0.0 });
        if now {
            tracing::warn!(
                "the broker blocks publishing (a memory or disk alarm): webhooks get 503 until it clears; \
                 the node is not left"
            );
        } else {
            tracing::info!("the broker takes publishes again");
        }
    }
    now
}

/// Waits for one copy's confirm (no time limit: the request's deadline ends the wait) and notes on
/// its session what it said: an ack or a return is the node heard from, a nack counts as silence,
/// a failed channel condemns the session. Answers with the copy (its session and when it was sent).
async fn settle(
    session: Arc<Session>,
    sent_ms: u64,
    confirm: lapin::PublisherConfirm,
    confirm_timeout: Duration,
) -> (Arc<Session>, u64, Result<(), PublishError>) {
    let result = match confirm.await {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => {
            Err(PublishError::Unroutable(returned.reply_text.to_string()))
        }
        Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => Err(PublishError::Nacked),
        Err(error) => Err(PublishError::Broker(error)),
    };
    match &result {
        Ok(()) | Err(PublishError::Unroutable(_)) => session.heard_from(),
        // A nack is no better than silence: a channel opened on a node while a quorum queue
        // elects a leader can keep sending to the old one, cut off or dead, and gets only nacks
        // and timeouts until that node returns (RabbitMQ 3.10; seen for 25 s in the partition
        // scenario). A new session, after the election, reaches the new leader.
        Err(PublishError::Nacked) => {
            let failing_for = session.failed(sent_ms);
            if failing_for >= confirm_timeout * SILENT_CONFIRM_TIMEOUTS {
                session.condemn(format!("the node confirmed no publish for {failing_for:?}"));
            }
        }
        Err(PublishError::Broker(error)) => session.condemn(format!("a publish failed: {error}")),
        Err(PublishError::NotConnected | PublishError::TimedOut(_) | PublishError::Blocked) => {}
    }
    (session, sent_ms, result)
}

/// Why a broker session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("opening a publish channel failed: {0}")]
    Channel(#[source] lapin::Error),
    #[error("the broker did not open a publish channel within {0:?}")]
    ChannelTimedOut(Duration),
    #[error(transparent)]
    Topology(#[from] shared::topology::TopologyError),
}

/// What a session does about the topology: declare it before it publishes (at start: a process
/// whose queues are wrong must not start), or check it (on a reconnect: passively, so that a node
/// without our exchange is refused, never built on; see [`shared::topology::Topology::check_on`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Declare {
    First,
    Check,
}

async fn open_session(settings: &PublisherSettings, declare: Declare) -> Result<Session, SessionError> {
    let connection = Arc::new(amqp::connect(&settings.amqp_url, "monohook-ingest").await?);
    let checked = match declare {
        Declare::First => settings.topology.declare_on(&connection).await,
        Declare::Check => settings.topology.check_on(&connection).await,
    };
    if let Err(error) = checked {
        if matches!(error, shared::topology::TopologyError::Missing { .. }) {
            metrics::counter!("monohook_ingest_nodes_refused_total").increment(1);
            amqp::leave_node();
        }
        let _ = tokio::time::timeout(CHANNEL_TIMEOUT, connection.close(200, "refused".into())).await;
        return Err(error.into());
    }
    let mut channels = Vec::with_capacity(settings.channels.max(1));
    for _ in 0..settings.channels.max(1) {
        let opened = async {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = tokio::time::timeout(CHANNEL_TIMEOUT, opened)
            .await
            .map_err(|_| SessionError::ChannelTimedOut(CHANNEL_TIMEOUT))?
            .map_err(SessionError::Channel)?;
        channels.push(channel);
    }
    Ok(Session {
        connection,
        channels,
        next_channel: AtomicUsize::new(0),
        opened: std::time::Instant::now(),
        last_heard_ms: AtomicU64::new(0),
        failing_since_ms: AtomicU64::new(u64::MAX),
        condemned: CancellationToken::new(),
    })
}
