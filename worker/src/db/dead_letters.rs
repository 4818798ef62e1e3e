//! `dead_letters`: the only store of dead letters. A row holds the whole message (the body as
//! received and the headers a replay carries on), the account and event, and why it died. The
//! worker writes it in the same transaction as the journal's `dead` status; an operator's replay or
//! purge deletes it in the transaction that records the action (a replay's copy goes to the outbox
//! in that same transaction).

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value};
use sqlx::PgConnection;
use std::borrow::Cow;
use uuid::Uuid;

use shared::delivery::{
    ATTEMPT_HEADERS, BROKER_HEADERS, HEADER_BODY_SHA256, HEADER_RECEIVED_AT, long_string,
};

/// A dead letter as the worker stores it.
#[derive(Clone, Debug)]
pub struct NewDeadLetter {
    pub id: Uuid,
    pub event: String,
    pub account_id: Option<String>,
    pub body: Vec<u8>,
    pub body_sha256: String,
    pub received_at: DateTime<Utc>,
    /// The message's string headers a replay carries on ([`carried_headers`]).
    pub headers: Value,
    pub reason: String,
    /// `poison`, `permanent` or `exhausted`.
    pub class: &'static str,
    pub attempts: i32,
    pub first_attempt_at: Option<DateTime<Utc>>,
}

/// Writes the dead letter; one that died on its first attempt (no attempt history yet) was first
/// attempted now, as its journal row says. The same id dead again (a replay that died again, a
/// message drained twice, a row taken over from the journal on upgrade) keeps one row, with the
/// latest death and the whole body.
pub async fn insert(conn: &mut PgConnection, letter: &NewDeadLetter) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dead_letters
             (id, event, account_id, body, body_sha256, received_at, headers, reason, class, attempts, first_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, COALESCE($11, clock_timestamp()))
         ON CONFLICT (id) DO UPDATE
             SET body = excluded.body, headers = excluded.headers, reason = excluded.reason,
                 class = excluded.class, attempts = excluded.attempts,
                 first_attempt_at = coalesce(dead_letters.first_attempt_at, excluded.first_attempt_at),
                 dead_at = clock_timestamp(), rebuilt = false",
    )
    .bind(letter.id)
    .bind(storable(&letter.event))
    .bind(letter.account_id.as_deref().map(storable))
    .bind(&letter.body)
    .bind(&letter.body_sha256)
    .bind(letter.received_at)
    .bind(&letter.headers)
    .bind(storable(&letter.reason))
    .bind(letter.class)
    .bind(letter.attempts)
    .bind(letter.first_attempt_at)
    .execute(conn)
    .await
    .map(drop)
}

/// Text PostgreSQL can store: `text` refuses NUL, which a body's strings or Mono's error text may
/// hold. Replaced, never a reason to hold a dead letter forever.
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') { Cow::Owned(text.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(text) }
}

/// The message's string headers that a replay carries on: all but the broker's, the attempt
/// history and the stamp (rebuilt from the row's own columns). NUL made storable.
pub fn carried_headers(properties: &BasicProperties) -> Value {
    let mut kept = Map::new();
    if let Some(headers) = properties.headers() {
        for (name, value) in headers.inner() {
            let name = name.as_str();
            if BROKER_HEADERS.contains(&name)
                || ATTEMPT_HEADERS.contains(&name)
                || [HEADER_RECEIVED_AT, HEADER_BODY_SHA256, crate::republish::HEADER_HANDED_OUT]
                    .contains(&name)
            {
                continue;
            }
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => continue,
            };
            kept.insert(storable(name).into_owned(), Value::String(storable(&text).into_owned()));
        }
    }
    Value::Object(kept)
}

/// [`carried_headers`] back as AMQP headers.
pub fn headers_from_json(headers: &Value) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(map) = headers.as_object() {
        for (name, value) in map {
            if let Some(text) = value.as_str() {
                table.insert(name.as_str().into(), long_string(text));
            }
        }
    }
    table
}

/// Deletes the account's dead letters (erasure). Returns how many went.
pub async fn erase_account(conn: &mut PgConnection, account: &str) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM dead_letters WHERE account_id = $1")
        .bind(account)
        .execute(conn)
        .await?
        .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_made_storable_and_other_text_is_untouched() {
        assert_eq!(storable("a\0b"), "a\u{FFFD}b");
        assert!(matches!(storable("plain"), Cow::Borrowed("plain")));
    }

    #[test]
    fn a_replay_carries_the_trace_context_but_not_the_attempts_or_the_brokers_headers() {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), long_string("00-abc-def-01"));
        headers.insert("x-attempts".into(), AMQPValue::LongLongInt(3));
        headers.insert("x-dead-reason".into(), long_string("refused"));
        headers.insert("x-first-death-queue".into(), long_string("monohook.work"));
        headers.insert(HEADER_RECEIVED_AT.into(), long_string("2026-12-07T00:00:00.000Z"));
        let carried = carried_headers(&BasicProperties::default().with_headers(headers));
        assert_eq!(carried, serde_json::json!({ "traceparent": "00-abc-def-01" }));
        let back = headers_from_json(&carried);
        assert_eq!(back.inner().get("traceparent"), Some(&long_string("00-abc-def-01")));
    }
}
