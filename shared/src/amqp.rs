//! Opening RabbitMQ connections and noticing when they die.
//!
//! lapin does not reconnect by itself, and a consumer can go quiet after its connection drops without
//! ending its stream. So each binary runs a supervisor that opens a connection with [`connect`], then
//! waits on [`connection_lost`], and starts over (with backoff) when it returns.

use futures_util::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;

use crate::config::redact_url;

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

/// Opens a connection named `name` (visible in RabbitMQ's connection list).
pub async fn connect(url: &SecretString, name: &str) -> Result<Connection, ConnectError> {
    let raw = url.expose_secret();
    let shown = redact_url(raw);
    // AMQPUri's parse error can echo the input; never let it reach a log.
    let mut uri: AMQPUri = raw.parse().map_err(|_: String| ConnectError::InvalidUrl(shown.clone()))?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(ConnectError::Unreachable { url: shown, source }),
        Err(_) => Err(ConnectError::TimedOut { url: shown }),
    }
}

/// Resolves when the connection has failed or closed, with a description for the log.
pub async fn connection_lost(connection: &Connection) -> String {
    let mut events = connection.events_listener();
    let mut poll = tokio::time::interval(STATUS_POLL);
    loop {
        tokio::select! {
            event = events.next() => match event {
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
