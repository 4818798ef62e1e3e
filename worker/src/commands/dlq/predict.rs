//! `worker dlq replay --dry-run`: what replaying each dead letter would do to its account now,
//! worked out with the same handlers the worker runs, against the account as it is. Nothing is
//! changed and Mono is not called.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::Duration;

use super::ReplayArgs;
use super::filter::DeadLetter;
use crate::account::AccountState;
use crate::db::accounts;
use crate::event::IncomingEvent;
use crate::handlers::{self, HandlerOutcome};
use crate::mono::ReauthToken;
use shared::delivery::{AttemptHistory, DeliveryId, DeliveryMeta};
use shared::event::EventKind;

pub async fn run(pool: &PgPool, args: &ReplayArgs, dedup_window: Duration) -> anyhow::Result<()> {
    args.filter.require_selection()?;
    let dead = args.filter.select(pool).await?;
    let progress = super::progress::bar(dead.len() as u64);
    for letter in &dead {
        let prediction = predict(pool, letter, args.force, dedup_window).await?;
        progress.inc(1);
        // Lines go out between two draws of the bar, never through it.
        progress.suspend(|| {
            println!(
                "{}  {:<24}  {:<24}  {prediction}",
                letter.id,
                letter.event.trim_start_matches("mono.events."),
                letter.account_id.as_deref().unwrap_or("-")
            )
        });
    }
    progress.finish_and_clear();
    eprintln!("dry run: {} dead letter(s) examined, nothing changed", dead.len());
    Ok(())
}

/// One line saying what a replay of `letter` would do now.
pub async fn predict(
    pool: &PgPool,
    letter: &DeadLetter,
    force: bool,
    dedup_window: Duration,
) -> anyhow::Result<String> {
    let Some(payload) = &letter.payload else {
        return Ok(
            "would fail again: invalid payload, the body is not JSON (see `worker dlq show`)".to_owned()
        );
    };
    let body = serde_json::to_vec(payload)?;
    let mut meta = DeliveryMeta::stamp(&body);
    meta.id = DeliveryId::from(letter.id);
    meta.received_at = letter.received_at;
    let history = AttemptHistory { previous_attempts: 0, first_attempt_at: None };
    let event = match IncomingEvent::parse_with(&body, &meta, &history, force).1 {
        Ok(event) => event,
        Err(malformed) => return Ok(format!("would fail again: {malformed}")),
    };
    // The worker's duplicate rule: the same body (as received, not as re-serialised from jsonb)
    // journaled, not dead, within the dedup window, with no other event applied to the account
    // between the two copies.
    let window = chrono::Duration::from_std(dedup_window).unwrap_or(chrono::Duration::days(36_500));
    let account = event.kind.needs_account().then(|| event.account());
    let duplicate_of: Option<uuid::Uuid> = sqlx::query_scalar(
        "SELECT c.id FROM webhook_events c
         WHERE c.body_sha256 = $1 AND c.id <> $2 AND c.status <> 'dead' AND c.received_at BETWEEN $3 AND $4
           AND NOT EXISTS (
               SELECT 1 FROM webhook_events o
               WHERE $5::text IS NOT NULL AND o.account_id = $5 AND o.status = 'processed'
                 AND o.body_sha256 <> $1
                 AND o.received_at > LEAST(c.received_at, $6) AND o.received_at < GREATEST(c.received_at, $6))
         LIMIT 1",
    )
    .bind(&letter.body_sha256)
    .bind(letter.id)
    .bind(letter.received_at - window)
    .bind(letter.received_at + window)
    .bind(account)
    .bind(letter.received_at)
    .fetch_optional(pool)
    .await?;
    if let Some(original) = duplicate_of {
        return Ok(format!("no change: the same body was applied as {original}"));
    }
    let before: Option<AccountState> = match event.kind.needs_account() {
        true => {
            let stored = accounts::load_states(pool, &[event.account()], false).await?.pop();
            Some(stored.unwrap_or_else(|| AccountState::new(event.account())))
        }
        false => None,
    };
    let mut after = before.clone();
    let token = ReauthToken::placeholder(Utc::now());
    let asks_mono = event.kind == EventKind::ReauthorisationRequired;
    let outcome = handlers::apply(after.as_mut(), &event, Some(&token));
    let refused_before = letter.reason.as_deref().filter(|r| r.starts_with("Mono refused"));
    Ok(match outcome {
        HandlerOutcome::Applied => {
            let changes = diff(before.as_ref(), after.as_ref());
            let mono = match (asks_mono, refused_before) {
                (true, Some(reason)) => {
                    format!(" (after a token from Mono, which refused last time: {reason})")
                }
                (true, None) => " (after a token from Mono)".to_owned(),
                _ => String::new(),
            };
            format!("apply{mono}: {changes}")
        }
        HandlerOutcome::Stale => {
            let at = before.as_ref().and_then(|a| a.reauth_state_received_at.max(a.data_state_received_at));
            format!(
                "no change: stale, the account already applied an event received at {} (--force applies it)",
                time(at)
            )
        }
        HandlerOutcome::Ignored(why) => format!("no change: {why}"),
        HandlerOutcome::NeedsToken => "would ask Mono for a token".to_owned(),
    })
}

/// `reauth_required false → true, data_status - → AVAILABLE`, never showing a token.
fn diff(before: Option<&AccountState>, after: Option<&AccountState>) -> String {
    let (Some(before), Some(after)) = (before, after) else { return "nothing to change".to_owned() };
    let mut changes = Vec::new();
    let mut field = |name: &str, old: String, new: String| {
        if old != new {
            changes.push(format!("{name} {old} → {new}"));
        }
    };
    field("reauth_required", before.reauth_required.to_string(), after.reauth_required.to_string());
    let token =
        |t: &Option<crate::account::StoredToken>| if t.is_some() { "held" } else { "none" }.to_owned();
    let new_token =
        if after.reauth_token.is_some() && after.reauth_token_issued_at != before.reauth_token_issued_at {
            "new token".to_owned()
        } else {
            token(&after.reauth_token)
        };
    field("reauth_token", token(&before.reauth_token), new_token);
    field("data_status", opt(&before.data_status), opt(&after.data_status));
    field("unlinked_at", time(before.unlinked_at), time(after.unlinked_at));
    field("customer_id", opt(&before.customer_id), opt(&after.customer_id));
    field("last_sync_failed_at", time(before.last_sync_failed_at), time(after.last_sync_failed_at));
    if changes.is_empty() { "nothing to change".to_owned() } else { changes.join(", ") }
}

fn opt(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "-".to_owned())
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}
