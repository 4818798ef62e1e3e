//! `outbox`: messages to publish, written in the transaction that decides them. Any producer may
//! write one (a replay's copy today); the worker's relay (`crate::relay`) publishes rows with
//! confirms and deletes each only after the broker confirmed it. A crash between the confirm and
//! the delete publishes the row again: consumers recognise the copy by its message id.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use serde_json::{Value, json};
use sqlx::PgConnection;

/// A message to publish.
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    /// Who wrote it (`replay`), for metrics and operators.
    pub producer: &'static str,
    /// `""` for the default exchange, whose routing key is a queue's name.
    pub exchange: String,
    pub routing_key: String,
    pub message_id: String,
    pub timestamp: Option<DateTime<Utc>>,
    /// String headers (name to text).
    pub headers: Value,
    pub body: Vec<u8>,
    /// The account the message is about, so an erasure finds it.
    pub account_id: Option<String>,
}

/// Writes the message; it is published once the transaction commits.
pub async fn insert(conn: &mut PgConnection, message: &OutboxMessage) -> sqlx::Result<()> {
    let properties = json!({
        "timestamp": message.timestamp.map(|t| t.timestamp()),
        "content_type": "application/json",
        "headers": message.headers,
    });
    sqlx::query(
        "INSERT INTO outbox (producer, exchange, routing_key, message_id, properties, body, account_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(message.producer)
    .bind(&message.exchange)
    .bind(&message.routing_key)
    .bind(&message.message_id)
    .bind(properties)
    .bind(&message.body)
    .bind(&message.account_id)
    .execute(conn)
    .await
    .map(drop)
}

/// A row waiting to be published.
#[derive(Debug, sqlx::FromRow)]
pub struct Pending {
    pub id: i64,
    pub producer: String,
    pub exchange: String,
    pub routing_key: String,
    pub message_id: String,
    pub properties: Value,
    pub body: Vec<u8>,
}

impl Pending {
    /// The AMQP properties: persistent, with the stored id, timestamp, content type and headers.
    pub fn amqp_properties(&self) -> BasicProperties {
        let headers: FieldTable = super::dead_letters::headers_from_json(&self.properties["headers"]);
        let mut properties = BasicProperties::default()
            .with_message_id(ShortString::from(self.message_id.clone()))
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(timestamp) = self.properties["timestamp"].as_i64().and_then(|t| u64::try_from(t).ok()) {
            properties = properties.with_timestamp(timestamp);
        }
        if let Some(content_type) = self.properties["content_type"].as_str() {
            properties = properties.with_content_type(content_type.into());
        }
        properties
    }
}

/// Takes up to `limit` rows, oldest first, locked for this transaction; rows another relay holds
/// are skipped, so many workers relay at once without publishing a row twice (short of a crash).
pub async fn take(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<Pending>> {
    sqlx::query_as(
        "SELECT id, producer, exchange, routing_key, message_id, properties, body FROM outbox
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Deletes rows whose message the broker confirmed.
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").bind(ids).execute(conn).await.map(drop)
}

/// Deletes the account's unpublished messages (erasure). Returns how many went.
pub async fn erase_account(conn: &mut PgConnection, account: &str) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM outbox WHERE account_id = $1")
        .bind(account)
        .execute(conn)
        .await?
        .rows_affected())
}
