//! `worker dlq list`: dead letters, their causes grouped, or the replays and purges done.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;

use super::{GroupBy, ListArgs};
use crate::commands::output;

pub async fn run(pool: &PgPool, args: &ListArgs) -> anyhow::Result<()> {
    if args.actions {
        return list_actions(pool, args).await;
    }
    let reading = super::progress::spinner("reading the dead letters");
    let dead = args.filter.select(pool).await?;
    reading.finish_and_clear();
    if let Some(GroupBy::Reason) = args.group_by {
        let groups = group_by_reason(&dead);
        if args.json {
            output::document(&groups)?;
        } else {
            println!("{:>7}  {:<25}  {:<25}  reason", "count", "first", "last");
            for group in &groups {
                println!(
                    "{:>7}  {:<25}  {:<25}  {}",
                    group.count,
                    time(group.first),
                    time(group.last),
                    group.reason
                );
            }
        }
        return Ok(());
    }
    if args.json {
        return output::document(&dead);
    }
    println!(
        "{:<36}  {:<26}  {:<24}  {:>8}  {:<20}  {:<20}  {:>7}  reason",
        "delivery id", "event", "account", "attempts", "first attempt", "last attempt", "age"
    );
    for letter in &dead {
        println!(
            "{:<36}  {:<26}  {:<24}  {:>8}  {:<20}  {:<20}  {:>7}  {}",
            letter.id,
            letter.event.trim_start_matches("mono.events."),
            letter.account_id.as_deref().unwrap_or("-"),
            letter.attempts,
            short_time(letter.first_attempt_at),
            short_time(letter.dead_at),
            age(letter.dead_at),
            letter.reason.as_deref().unwrap_or("-"),
        );
    }
    eprintln!("{} dead letter(s)", dead.len());
    Ok(())
}

/// Dead letters with the same cause; an element of `worker dlq list --group-by reason --json`.
#[derive(Debug, Serialize, PartialEq)]
pub struct ReasonGroup {
    pub reason: String,
    pub count: usize,
    pub first: Option<DateTime<Utc>>,
    pub last: Option<DateTime<Utc>>,
}

fn group_by_reason(dead: &[super::filter::DeadLetter]) -> Vec<ReasonGroup> {
    let mut groups: BTreeMap<String, ReasonGroup> = BTreeMap::new();
    for letter in dead {
        let reason = cause(letter.reason.as_deref().unwrap_or("(no reason recorded)"));
        let group =
            groups.entry(reason.clone()).or_insert(ReasonGroup { reason, count: 0, first: None, last: None });
        group.count += 1;
        group.first = group.first.min(letter.dead_at).or(letter.dead_at);
        group.last = group.last.max(letter.dead_at);
    }
    let mut groups: Vec<ReasonGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    groups
}

/// A reason without what differs between deliveries of one cause: call counts, positions and
/// long hexadecimal ids.
fn cause(reason: &str) -> String {
    let reason = match reason.rfind(" (after ") {
        Some(at) if reason.ends_with(" calls)") => &reason[..at],
        _ => reason,
    };
    let reason = reason.split(" at line ").next().unwrap_or(reason);
    reason
        .split(' ')
        .map(|word| {
            let hex = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
            if hex.len() >= 16 && hex.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                "<id>"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A replay or purge of one dead letter; an element of `worker dlq list --actions --json`.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct ActionRow {
    batch_id: uuid::Uuid,
    action: String,
    delivery_id: uuid::Uuid,
    event: String,
    account_id: Option<String>,
    actor: String,
    note: Option<String>,
    forced: bool,
    started_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
}

async fn list_actions(pool: &PgPool, args: &ListArgs) -> anyhow::Result<()> {
    let rows: Vec<ActionRow> = sqlx::query_as(
        "SELECT batch_id, action, delivery_id, event, account_id, actor, note, forced, started_at, completed_at
         FROM dead_letter_actions
         WHERE ($1::timestamptz IS NULL OR started_at >= $1) AND ($2::text IS NULL OR account_id = $2)
         ORDER BY started_at DESC, id DESC LIMIT $3",
    )
    .bind(args.filter.since)
    .bind(&args.filter.account)
    .bind(args.filter.limit.unwrap_or(1000))
    .fetch_all(pool)
    .await?;
    if args.json {
        return output::document(&rows);
    }
    println!(
        "{:<20}  {:<7}  {:<36}  {:<26}  {:<12}  {:<36}  note",
        "when", "action", "delivery id", "event", "by", "batch"
    );
    for row in &rows {
        let action = if row.forced { format!("{}!", row.action) } else { row.action.clone() };
        let state = if row.completed_at.is_none() { " (unfinished)" } else { "" };
        println!(
            "{:<20}  {:<7}  {:<36}  {:<26}  {:<12}  {:<36}  {}{state}",
            short_time(Some(row.started_at)),
            action,
            row.delivery_id,
            row.event.trim_start_matches("mono.events."),
            row.actor,
            row.batch_id,
            row.note.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn short_time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// `3m`, `5h`, `2d`: how long ago.
pub fn age(at: Option<DateTime<Utc>>) -> String {
    let Some(at) = at else { return "-".to_owned() };
    let seconds = (Utc::now() - at).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86_400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_outage_is_one_cause() {
        let a =
            cause("retries exhausted: Mono is unavailable: 503 Service Unavailable: down (after 3 calls)");
        let b =
            cause("retries exhausted: Mono is unavailable: 503 Service Unavailable: down (after 1 calls)");
        assert_eq!(a, b);
        assert_eq!(a, "retries exhausted: Mono is unavailable: 503 Service Unavailable: down");
        assert_eq!(
            cause("invalid payload: body is not valid JSON: expected value at line 1 column 1"),
            "invalid payload: body is not valid JSON: expected value"
        );
        assert_eq!(cause("account 5fbcde8f8699984153e65537 refused"), "account <id> refused");
    }
}
