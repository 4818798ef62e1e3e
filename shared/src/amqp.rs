//! Opening RabbitMQ connections and noticing when they die.
//!
//! lapin does not reconnect by itself, and a consumer can go quiet after its connection drops without
//! ending its stream. So each binary runs a supervisor that opens a connection with [`connect`], then
//! waits on [`connection_lost`], and starts over (with backoff) when it returns. On a cluster,
//! `AMQP_URL` lists the nodes and a reconnect moves on to the next node. `amqps://` connections trust
//! the bundled webpki roots plus the private CA of `AMQP_CA_FILE`, if set ([`trust_ca`]).

use futures_util::StreamExt;
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connect, Connection, ConnectionProperties, Event};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use secrecy::{ExposeSecret, SecretString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use crate::amqp_tls::TrustedCa;
use crate::redact::redact_url;

/// Heartbeat asked of the broker unless the URL sets one: a dead peer is noticed within ~2 intervals.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Bound on TCP connect plus the AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`connection_lost`] looks at the connection state besides listening for errors.
const STATUS_POLL: Duration = Duration::from_millis(500);

/// Why a connection could not be opened. Displays the URL without its password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse.
    #[error("AMQP_URL is not a valid AMQP URL ({0})")]
    InvalidUrl(String),
    /// The broker refused or could not be reached.
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: lapin::Error,
    },
    /// TCP connect plus handshake took longer than the timeout.
    #[error("cannot connect to RabbitMQ at {url}: no answer within {CONNECT_TIMEOUT:?}")]
    TimedOut { url: String },
}

/// Where this process starts its next walk over a cluster's nodes (a position in its own order),
/// and where its last connection landed. Process-wide, like the order itself.
static NEXT_NODE: AtomicUsize = AtomicUsize::new(0);
static CONNECTED_NODE: AtomicUsize = AtomicUsize::new(0);

/// The private CA every `amqps://` connection of this process trusts besides the webpki roots.
/// Process-wide like the node order: set once at start from `AMQP_CA_FILE`, so that every
/// connection (ingest, the worker, its commands) trusts it without each caller passing it along.
static TRUSTED_CA: OnceLock<TrustedCa> = OnceLock::new();

/// Makes every later [`connect`] of this process trust `ca` (the first call wins; the setting is
/// read once, at start, by [`crate::config::parse_or_exit`]).
pub fn trust_ca(ca: TrustedCa) {
    let _ = TRUSTED_CA.set(ca);
}

/// Opens a connection named `name` (visible in RabbitMQ's connection list). `urls` is one URL or a
/// comma-separated list of a cluster's nodes: they are tried in this process's own order, starting
/// after the node it last lost, and the first that answers is used.
pub async fn connect(urls: &SecretString, name: &str) -> Result<Connection, ConnectError> {
    connect_trusting(urls, TRUSTED_CA.get(), name).await
}

/// [`connect`] with the private CA given rather than the process's own (for tests).
pub async fn connect_trusting(
    urls: &SecretString,
    ca: Option<&TrustedCa>,
    name: &str,
) -> Result<Connection, ConnectError> {
    let nodes = node_urls(urls.expose_secret());
    if nodes.is_empty() {
        return Err(ConnectError::InvalidUrl("no URL given".to_owned()));
    }
    let order = process_order(nodes.len());
    let start = NEXT_NODE.load(Ordering::Relaxed);
    let mut last_error = None;
    for step in 0..nodes.len() {
        let position = (start + step) % nodes.len();
        match connect_one(nodes[order[position]], ca, name).await {
            Ok(connection) => {
                NEXT_NODE.store(position, Ordering::Relaxed);
                CONNECTED_NODE.store(position, Ordering::Relaxed);
                return Ok(connection);
            }
            Err(error @ ConnectError::InvalidUrl(_)) => return Err(error),
            Err(error) => {
                if nodes.len() > 1 {
                    tracing::warn!(error = %error, "RabbitMQ node did not answer; trying the next one");
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.expect("at least one node was tried"))
}

/// The nodes of an `AMQP_URL`: comma-separated, blanks ignored (checked at start by
/// [`crate::config::amqp_node_list`]).
fn node_urls(raw: &str) -> Vec<&str> {
    raw.split(',').map(str::trim).filter(|url| !url.is_empty()).collect()
}

/// This process's order over `count` nodes: shuffled once per process, so that many processes
/// given the same list spread over the cluster instead of all landing on its first node.
fn process_order(count: usize) -> Vec<usize> {
    static SEED: LazyLock<u64> = LazyLock::new(rand::random);
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(&mut StdRng::seed_from_u64(*SEED));
    order
}

/// Leaves the node of this process's last connection although the connection itself still
/// stands (it does not do its job: a channel failed, or it confirms nothing): the next walk starts
/// at the node after it.
pub fn leave_node() {
    move_past_lost_node();
}

/// After a lost connection, the next walk starts at the node after the one lost (unless another
/// connection of this process already moved on).
fn move_past_lost_node() {
    let lost = CONNECTED_NODE.load(Ordering::Relaxed);
    let _ = NEXT_NODE.compare_exchange(lost, lost + 1, Ordering::Relaxed, Ordering::Relaxed);
}

async fn connect_one(url: &str, ca: Option<&TrustedCa>, name: &str) -> Result<Connection, ConnectError> {
    let shown = redact_url(url);
    // AMQPUri's parse error can echo the input; never let it reach a log.
    let mut uri: AMQPUri = url.parse().map_err(|_: String| ConnectError::InvalidUrl(shown.clone()))?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    // lapin adds `cert_chain` to the webpki roots rather than replacing them.
    let tls = OwnedTLSConfig { identity: None, cert_chain: ca.map(|ca| ca.pem().to_owned()) };
    let runtime = lapin::runtime::default_runtime()
        .map_err(|source| ConnectError::Unreachable { url: shown.clone(), source })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, uri.connect_with_config(properties, tls, runtime)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(ConnectError::Unreachable { url: shown, source }),
        Err(_) => Err(ConnectError::TimedOut { url: shown }),
    }
}

/// Resolves when the connection has failed or closed, with a description for the log. A channel's
/// error (a soft one: a refused declaration, a queue not found) closes that channel only; lapin
/// reports it among the connection's events too, but the connection is fine, and whoever owns the
/// channel watches it (a declaration on a channel of its own never ends a session).
pub async fn connection_lost(connection: &Connection) -> String {
    let reason = watch_until_lost(connection).await;
    move_past_lost_node();
    reason
}

async fn watch_until_lost(connection: &Connection) -> String {
    let mut events = connection.events_listener();
    let mut poll = tokio::time::interval(STATUS_POLL);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Event::Error(error)) if error.is_amqp_soft_error() => {}
                Some(Event::Error(error)) => return format!("connection error: {error}"),
                Some(_) => {}
                None => return "connection event stream ended".to_owned(),
            },
            _ = poll.tick() => {
                let status = connection.status();
                if !status.connected() {
                    let state = if status.errored() { "errored" } else if status.closed() { "closed" } else { "not connected" };
                    return format!("connection is {state}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_nodes_is_split_on_commas_and_blanks_are_ignored() {
        assert_eq!(node_urls("amqp://a, amqp://b ,,amqp://c"), ["amqp://a", "amqp://b", "amqp://c"]);
        assert_eq!(node_urls("amqp://only"), ["amqp://only"]);
        assert!(node_urls(" , ").is_empty());
    }

    #[test]
    fn the_process_order_is_a_stable_permutation() {
        let order = process_order(5);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 3, 4]);
        assert_eq!(order, process_order(5), "one order per process");
    }

    #[tokio::test]
    async fn a_node_that_does_not_answer_is_skipped_for_the_next() {
        // Two closed ports around the real broker: whatever this process's order, it lands there.
        let closed = |port| format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        let broker =
            std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let list = SecretString::from(format!("{},{broker},{}", closed(1), closed(2)));
        let connection = connect(&list, "monohook-test-node-list").await.expect("the live node answers");
        assert!(connection.status().connected());
        connection.close(200, "done".into()).await.expect("closes");
    }

    #[tokio::test]
    async fn no_node_answering_names_the_last_one_tried_without_its_password() {
        let list = SecretString::from(
            "amqp://guest:hunter2@127.0.0.1:1/%2f,amqp://guest:hunter2@127.0.0.1:2/%2f".to_owned(),
        );
        let error = connect(&list, "monohook-test").await.expect_err("nothing listens there").to_string();
        assert!(error.contains("cannot connect to RabbitMQ at amqp://guest:"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
