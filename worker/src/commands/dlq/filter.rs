//! Which dead letters a command is about, as flags, in SQL and in memory.

use chrono::{DateTime, Duration, Utc};
use clap::Args;
use serde::Serialize;
use uuid::Uuid;

use crate::commands::output::UsageError;

#[derive(Clone, Debug, Default, Args)]
pub struct DeadFilter {
    /// Only this event (`account_updated` or `mono.events.account_updated`).
    #[arg(long)]
    pub event: Option<String>,
    /// Only this Mono account.
    #[arg(long)]
    pub account: Option<String>,
    /// Only dead letters whose reason contains this text (case-insensitive).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only dead-lettered at or after this time (RFC 3339, or an age such as 30m, 2h, 7d).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only dead-lettered before this time (RFC 3339, or an age such as 30m, 2h, 7d).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Only the app's notifications that were not delivered to this endpoint (its name in
    /// NOTIFY_ENDPOINTS).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub limit: Option<i64>,
    /// Every dead letter (replay and purge need a filter or this).
    #[arg(long)]
    pub all: bool,
}

/// A dead letter (a `dead_letters` row); an element of `worker dlq list --json`.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: Uuid,
    pub event: String,
    pub account_id: Option<String>,
    pub reason: Option<String>,
    /// `poison`, `permanent` or `exhausted`.
    pub class: String,
    pub attempts: i32,
    pub received_at: DateTime<Utc>,
    /// Digest of the body as received.
    #[serde(skip)]
    pub body_sha256: String,
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// When it was dead-lettered (its last attempt).
    pub dead_at: Option<DateTime<Utc>>,
    /// The body as received (for a row taken over from the journal on upgrade: its payload).
    #[serde(skip)]
    pub body: Vec<u8>,
    /// The string headers a replay carries on.
    #[serde(skip)]
    pub headers: serde_json::Value,
    /// Taken over from a journal row whose message was not found: the body may lack fields.
    pub rebuilt: bool,
    /// A notification to the app this endpoint never took (none: a webhook from Mono).
    pub endpoint: Option<String>,
}

const COLUMNS: &str = "id, event, account_id, reason, class, attempts, received_at, body_sha256, first_attempt_at, \
                       dead_at, body, headers, rebuilt, endpoint";

impl DeadFilter {
    /// The full event name the filter means.
    fn event_name(&self) -> Option<String> {
        self.event.as_ref().map(|e| if e.contains('.') { e.clone() } else { format!("mono.events.{e}") })
    }

    pub fn is_empty(&self) -> bool {
        self.event.is_none()
            && self.account.is_none()
            && self.reason.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.endpoint.is_none()
    }

    /// Refuses a bulk action with no filter at all (a usage error): `--all` must say so. `--all`
    /// only stands in for a filter: beside one, it never widens it.
    pub fn require_selection(&self) -> anyhow::Result<()> {
        if self.is_empty() && !self.all {
            return Err(UsageError::new(
                "give a filter (--event, --account, --reason, --since, --until, --endpoint) or --all",
            )
            .into());
        }
        Ok(())
    }

    /// The matching dead letters, oldest first (the order a replay applies them in).
    pub async fn select<'c, E>(&self, executor: E) -> sqlx::Result<Vec<DeadLetter>>
    where
        E: sqlx::PgExecutor<'c>,
    {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM dead_letters
             WHERE ($1::text IS NULL OR event = $1)
               AND ($2::text IS NULL OR account_id = $2)
               AND ($3::text IS NULL OR strpos(lower(reason), lower($3)) > 0)
               AND ($4::timestamptz IS NULL OR dead_at >= $4)
               AND ($5::timestamptz IS NULL OR dead_at < $5)
               AND ($7::text IS NULL OR endpoint = $7)
             ORDER BY dead_at, id
             LIMIT $6"
        ))
        .bind(self.event_name())
        .bind(&self.account)
        .bind(&self.reason)
        .bind(self.since)
        .bind(self.until)
        .bind(self.limit.unwrap_or(i64::MAX))
        .bind(&self.endpoint)
        .fetch_all(executor)
        .await
    }
}

impl DeadLetter {
    /// The dead letter `id`, if it is one.
    pub async fn by_id<'c, E>(executor: E, id: Uuid) -> sqlx::Result<Option<Self>>
    where
        E: sqlx::PgExecutor<'c>,
    {
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1"))
            .bind(id)
            .fetch_optional(executor)
            .await
    }

    /// The same, locked for the transaction that acts on it; `None` if another command took it.
    pub async fn lock(tx: &mut sqlx::PgConnection, id: Uuid) -> sqlx::Result<Option<Self>> {
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1 FOR UPDATE"))
            .bind(id)
            .fetch_optional(tx)
            .await
    }
}

/// RFC 3339, or an age (`90s`, `30m`, `2h`, `7d`) meaning that long ago.
fn parse_time(raw: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(raw) {
        return Ok(time.with_timezone(&Utc));
    }
    let (number, unit) = raw.split_at(raw.trim_end_matches(char::is_alphabetic).len());
    let amount: i64 =
        number.parse().map_err(|_| format!("{raw:?} is neither RFC 3339 nor an age like 2h"))?;
    let age = match unit {
        "s" => Duration::seconds(amount),
        "m" => Duration::minutes(amount),
        "h" => Duration::hours(amount),
        "d" => Duration::days(amount),
        _ => return Err(format!("{raw:?}: an age ends in s, m, h or d")),
    };
    Ok(Utc::now() - age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc_3339_or_ages() {
        assert_eq!(parse_time("2026-11-25T10:00:00Z").unwrap().to_rfc3339(), "2026-11-25T10:00:00+00:00");
        let two_hours_ago = parse_time("2h").unwrap();
        assert!((Utc::now() - two_hours_ago - Duration::hours(2)).num_seconds().abs() < 5);
        assert!(parse_time("soon").is_err());
        assert!(parse_time("5w").is_err());
    }

    #[test]
    fn short_event_names_get_monos_prefix() {
        let filter = DeadFilter { event: Some("account_updated".into()), ..Default::default() };
        assert_eq!(filter.event_name().as_deref(), Some("mono.events.account_updated"));
    }
}
