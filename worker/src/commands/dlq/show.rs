//! `worker dlq show <id>`: everything known about one dead letter. The record is printed whatever
//! the walk saw; when the message was not found in a queue the walk could not see whole, the
//! command then fails (exit 1), as every incomplete `worker dlq` command does.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::BTreeMap;

use super::ShowArgs;
use super::queue::DeadQueue;
use crate::commands::output;
use lapin::types::AMQPValue;
use shared::config::BrokerArgs;
use shared::delivery::DeliveryMeta;

#[derive(Debug, Serialize, sqlx::FromRow)]
struct JournalRow {
    id: uuid::Uuid,
    event: String,
    account_id: Option<String>,
    status: String,
    attempts: i32,
    last_error: Option<String>,
    received_at: DateTime<Utc>,
    first_attempt_at: Option<DateTime<Utc>>,
    processed_at: Option<DateTime<Utc>>,
    body_sha256: String,
    payload: Option<Value>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct ActionRow {
    action: String,
    batch_id: uuid::Uuid,
    actor: String,
    note: Option<String>,
    forced: bool,
    started_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
}

/// `worker dlq show <id> --json`.
#[derive(Debug, Serialize)]
struct Record {
    /// The delivery id asked about.
    id: uuid::Uuid,
    /// The journal row (`payload` with credential fields masked); `null` if the journal does not
    /// know it.
    journal: Option<JournalRow>,
    /// Headers of the message in the dead-letter queue, if it is there.
    queue_headers: Option<BTreeMap<String, String>>,
    /// Whether the walk saw the whole queue: when it did not, a missing `queue_headers` proves nothing.
    queue_fully_seen: bool,
    actions: Vec<ActionRow>,
}

pub async fn run(pool: &PgPool, broker: &BrokerArgs, args: &ShowArgs) -> anyhow::Result<()> {
    let mut journal: Option<JournalRow> = sqlx::query_as(
        "SELECT id, event, account_id, status, attempts, last_error, received_at, first_attempt_at, processed_at,
             body_sha256, payload
         FROM webhook_events WHERE id = $1",
    )
    .bind(args.id)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = journal.as_mut() {
        row.payload = row.payload.take().map(mask_secrets);
    }
    let actions: Vec<ActionRow> = sqlx::query_as(
        "SELECT action, batch_id, actor, note, forced, started_at, completed_at
         FROM dead_letter_actions WHERE delivery_id = $1 ORDER BY started_at",
    )
    .bind(args.id)
    .fetch_all(pool)
    .await?;
    let (queue_headers, queue_fully_seen) = peek(broker, args.id).await?;
    if journal.is_none() && queue_headers.is_none() && actions.is_empty() && queue_fully_seen {
        anyhow::bail!("no dead letter {}", args.id);
    }
    let record = Record { id: args.id, journal, queue_headers, queue_fully_seen, actions };
    if args.json {
        output::document(&record)?;
    } else {
        print_record(&record);
    }
    // Not seen in a queue that could not be seen whole: the record may be missing its message, so
    // the command did not do what it was asked (exit 1, as an incomplete replay or purge).
    if record.queue_headers.is_none() && !record.queue_fully_seen {
        anyhow::bail!("the dead-letter queue could not be seen whole; run the same command again");
    }
    Ok(())
}

/// The headers of the message with delivery id `id` in the dead-letter queue, leaving it there, and
/// whether the walk saw the whole queue.
async fn peek(
    broker: &BrokerArgs,
    id: uuid::Uuid,
) -> anyhow::Result<(Option<BTreeMap<String, String>>, bool)> {
    let queue = DeadQueue::open(broker).await?;
    let mut walk = queue.walk().await?;
    let progress = super::progress::bar(u64::from(queue.depth().await?));
    progress.set_message("looking for it in the dead-letter queue");
    let mut found = None;
    // A message found waiting in the walk's own lanes when it is judged whole is looked at too.
    let fully_seen = 'walk: loop {
        while let Some(seen) = walk.next().await? {
            progress.inc(1);
            walk.leave(&seen);
            let delivery = &seen.delivery;
            if DeliveryMeta::from_properties(&delivery.properties, &delivery.data).id.as_uuid() == id {
                let headers = delivery.properties.headers().clone().unwrap_or_default();
                let mut shown: BTreeMap<String, String> =
                    headers.inner().iter().map(|(name, value)| (name.to_string(), display(value))).collect();
                if let Some(message_id) = delivery.properties.message_id() {
                    shown.insert("message_id".into(), message_id.to_string());
                }
                found = Some(shown);
                break 'walk true;
            }
        }
        if queue.fully_seen(&mut walk).await? {
            break true;
        }
        if !walk.has_waiting() {
            break false;
        }
    };
    progress.finish_and_clear();
    walk.finish().await?;
    queue.close().await;
    Ok((found, fully_seen))
}

/// A header value as text.
fn display(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        AMQPValue::ShortString(text) => text.to_string(),
        AMQPValue::Timestamp(seconds) => seconds.to_string(),
        other => shared::delivery::as_u32(other).map_or_else(|| format!("{other:?}"), |n| n.to_string()),
    }
}

/// Replaces the value of any field whose name suggests a credential.
fn mask_secrets(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, value)| {
                    let lower = key.to_lowercase();
                    let secret =
                        ["token", "secret", "password", "key"].iter().any(|word| lower.contains(word));
                    (key, if secret { Value::String("[REDACTED]".into()) } else { mask_secrets(value) })
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(mask_secrets).collect()),
        other => other,
    }
}

fn print_record(record: &Record) {
    if let Some(row) = &record.journal {
        println!("delivery id      {}", row.id);
        println!("event            {}", row.event);
        println!("account          {}", row.account_id.as_deref().unwrap_or("-"));
        println!("status           {}", row.status);
        println!("reason           {}", row.last_error.as_deref().unwrap_or("-"));
        println!("attempts         {}", row.attempts);
        println!("received at      {}", row.received_at.to_rfc3339());
        println!("first attempt    {}", row.first_attempt_at.map_or("-".into(), |t| t.to_rfc3339()));
        println!("last attempt     {}", row.processed_at.map_or("-".into(), |t| t.to_rfc3339()));
        println!("body sha256      {}", row.body_sha256);
        let body = row.payload.as_ref().map_or("(not JSON; see the queue)".into(), |p| p.to_string());
        println!("body             {body}");
    } else {
        println!("(not in the journal)");
    }
    match &record.queue_headers {
        Some(headers) => {
            println!("in the dead-letter queue, with headers:");
            for (name, value) in headers {
                println!("  {name}: {value}");
            }
        }
        None if record.queue_fully_seen => println!("not in the dead-letter queue"),
        None => println!(
            "not seen in the dead-letter queue, which could not be seen whole (another `worker dlq` holds messages?)"
        ),
    }
    for action in &record.actions {
        println!(
            "{} by {} at {} (batch {}){}{}",
            action.action,
            action.actor,
            action.started_at.to_rfc3339(),
            action.batch_id,
            action.note.as_deref().map(|n| format!(": {n}")).unwrap_or_default(),
            if action.completed_at.is_none() { " — unfinished" } else { "" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_fields_are_masked_at_any_depth() {
        let masked = mask_secrets(serde_json::json!({
            "event": "e", "data": { "token": "abc", "nested": [{ "apiKey": "k", "name": "n" }] }
        }));
        assert_eq!(masked["data"]["token"], "[REDACTED]");
        assert_eq!(masked["data"]["nested"][0]["apiKey"], "[REDACTED]");
        assert_eq!(masked["data"]["nested"][0]["name"], "n");
    }
}
