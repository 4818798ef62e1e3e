//! `worker dlq show <id>`: everything known about one dead letter: its row (the whole message,
//! credential fields masked), its journal row, and what was done to it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use super::ShowArgs;
use super::filter::DeadLetter;
use crate::commands::output;

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

/// The dead letter's row as `show` prints it.
#[derive(Debug, Serialize)]
struct Letter {
    class: String,
    reason: Option<String>,
    attempts: i32,
    first_attempt_at: Option<DateTime<Utc>>,
    dead_at: Option<DateTime<Utc>>,
    /// The headers a replay carries on (trace context, an earlier replay's lineage).
    headers: Value,
    /// The body, credential fields masked; a body that is not JSON as `{"not_json": "<n> bytes"}`.
    body: Value,
    /// Taken over from the journal on upgrade: the body may lack fields of the original.
    rebuilt: bool,
    /// A notification to the app that this endpoint never took (`null`: a webhook from Mono).
    endpoint: Option<String>,
}

/// `worker dlq show <id> --json`.
#[derive(Debug, Serialize)]
struct Record {
    /// The delivery id asked about.
    id: uuid::Uuid,
    /// The dead letter, `null` if it is not one (any more).
    dead_letter: Option<Letter>,
    /// The journal row (`payload` with credential fields masked); `null` if the journal does not
    /// know it.
    journal: Option<JournalRow>,
    actions: Vec<ActionRow>,
}

pub async fn run(pool: &PgPool, args: &ShowArgs) -> anyhow::Result<()> {
    let mut journal: Option<JournalRow> = sqlx::query_as(
        "SELECT id, event, account_id, status, attempts, last_error, received_at, first_attempt_at, processed_at,
             body_sha256, payload
         FROM webhook_events WHERE id = $1",
    )
    .bind(args.id)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = &mut journal {
        row.payload = row.payload.take().map(mask_secrets);
    }
    let actions: Vec<ActionRow> = sqlx::query_as(
        "SELECT action, batch_id, actor, note, forced, started_at, completed_at FROM dead_letter_actions
         WHERE delivery_id = $1 ORDER BY started_at",
    )
    .bind(args.id)
    .fetch_all(pool)
    .await?;
    let dead_letter = DeadLetter::by_id(pool, args.id).await?.map(|letter| Letter {
        body: serde_json::from_slice::<Value>(&letter.body)
            .map(mask_secrets)
            .unwrap_or_else(|_| serde_json::json!({ "not_json": format!("{} bytes", letter.body.len()) })),
        class: letter.class,
        endpoint: letter.endpoint,
        reason: letter.reason,
        attempts: letter.attempts,
        first_attempt_at: letter.first_attempt_at,
        dead_at: letter.dead_at,
        headers: letter.headers,
        rebuilt: letter.rebuilt,
    });
    if journal.is_none() && dead_letter.is_none() && actions.is_empty() {
        anyhow::bail!("no dead letter, journal row or action has delivery id {}", args.id);
    }
    let record = Record { id: args.id, dead_letter, journal, actions };
    if args.json {
        return output::document(&record);
    }
    print_record(&record);
    Ok(())
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
    println!("delivery id      {}", record.id);
    match &record.dead_letter {
        Some(letter) => {
            println!("dead letter      {} ({})", letter.reason.as_deref().unwrap_or("-"), letter.class);
            if let Some(endpoint) = &letter.endpoint {
                println!("notification to  endpoint {endpoint}");
            }
            println!("attempts         {}", letter.attempts);
            println!("first attempt    {}", letter.first_attempt_at.map_or("-".into(), |t| t.to_rfc3339()));
            println!("dead at          {}", letter.dead_at.map_or("-".into(), |t| t.to_rfc3339()));
            if let Some(headers) = letter.headers.as_object().filter(|h| !h.is_empty()) {
                println!("headers:");
                for (name, value) in headers {
                    println!("  {name}: {}", value.as_str().unwrap_or_default());
                }
            }
            let rebuilt = if letter.rebuilt { " (rebuilt from the journal: may lack fields)" } else { "" };
            println!("body{rebuilt}             {}", letter.body);
        }
        None => println!("not a dead letter (now)"),
    }
    if let Some(row) = &record.journal {
        println!(
            "journal          {} ({} attempt(s), last at {})",
            row.status,
            row.attempts,
            row.processed_at.map_or("-".into(), |t| t.to_rfc3339())
        );
        println!("event            {}", row.event);
        println!("account          {}", row.account_id.as_deref().unwrap_or("-"));
        println!("received at      {}", row.received_at.to_rfc3339());
        println!("body sha256      {}", row.body_sha256);
    } else {
        println!("(not in the journal)");
    }
    for action in &record.actions {
        println!(
            "{} by {} at {} (batch {}){}{}",
            action.action,
            action.actor,
            action.started_at.to_rfc3339(),
            action.batch_id,
            action.note.as_deref().map(|n| format!(": {n}")).unwrap_or_default(),
            if action.completed_at.is_none() { " — unfinished (an earlier version's)" } else { "" }
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
