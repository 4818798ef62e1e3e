//! `worker dlq replay --dry-run`: what replaying each dead letter would do to its account now,
//! worked out by the worker's own decision code (`db::batch::load` and `batch::decide`) in a
//! transaction that is rolled back, against the account as it is. Nothing is changed and Mono is not
//! called.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

use super::ReplayArgs;
use super::filter::DeadLetter;
use crate::account::AccountState;
use crate::batch::{self, Candidate, Decision};
use crate::commands::output;
use crate::db::{
    self,
    events::{EventRecord, EventStatus},
};
use crate::event::IncomingEvent;
use crate::mono::ReauthToken;
use shared::delivery::{AttemptHistory, DeliveryId, DeliveryMeta};
use shared::event::EventKind;

/// What a replay of one dead letter would do now: a line of `worker dlq replay --dry-run --json`
/// (JSON lines, one per dead letter, printed as each is worked out).
#[derive(Debug, Serialize)]
pub struct Prediction {
    pub id: Uuid,
    pub event: String,
    pub account_id: Option<String>,
    pub outcome: Outcome,
    /// Whether the replay would call Mono (for a re-auth token).
    pub calls_mono: bool,
    /// The account's columns that would change (`apply` only; never a token's value).
    pub changes: Vec<Change>,
    /// The sentence the table prints.
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The event would be applied to its account.
    Apply,
    /// No change: the account already applied a later event (`--force` applies it).
    Stale,
    /// No change: the same body was applied since.
    Duplicate,
    /// No change: the handler ignores it for this account as it is.
    Ignored,
    /// It would be dead-lettered again (not JSON, not a Mono event).
    WouldFail,
}

/// One changed column: `from` and `to` as the table shows them (`-` for none).
#[derive(Debug, Serialize)]
pub struct Change {
    pub field: &'static str,
    pub from: String,
    pub to: String,
}

pub async fn run(pool: &PgPool, args: &ReplayArgs, dedup_window: Duration) -> anyhow::Result<()> {
    args.filter.require_selection()?;
    let dead = args.filter.select(pool).await?;
    let progress = super::progress::bar(dead.len() as u64);
    for letter in &dead {
        let prediction = predict(pool, letter, args.force, dedup_window).await?;
        progress.inc(1);
        // Lines go out between two draws of the bar, never through it.
        progress.suspend(|| {
            if args.json {
                output::line(&prediction)
            } else {
                println!(
                    "{}  {:<24}  {:<24}  {}",
                    letter.id,
                    letter.event.trim_start_matches("mono.events."),
                    letter.account_id.as_deref().unwrap_or("-"),
                    prediction.detail
                );
                Ok(())
            }
        })?;
    }
    progress.finish_and_clear();
    eprintln!("dry run: {} dead letter(s) examined, nothing changed", dead.len());
    Ok(())
}

/// What a replay of `letter` would do now.
pub async fn predict(
    pool: &PgPool,
    letter: &DeadLetter,
    force: bool,
    dedup_window: Duration,
) -> anyhow::Result<Prediction> {
    let prediction = |outcome: Outcome, calls_mono: bool, changes: Vec<Change>, detail: String| Prediction {
        id: letter.id,
        event: letter.event.clone(),
        account_id: letter.account_id.clone(),
        outcome,
        calls_mono,
        changes,
        detail,
    };
    let Some(payload) = &letter.payload else {
        return Ok(prediction(
            Outcome::WouldFail,
            false,
            Vec::new(),
            "would fail again: invalid payload, the body is not JSON (see `worker dlq show`)".to_owned(),
        ));
    };
    let body = serde_json::to_vec(payload)?;
    let mut meta = DeliveryMeta::stamp(&body);
    meta.id = DeliveryId::from(letter.id);
    meta.received_at = letter.received_at;
    let history = AttemptHistory { previous_attempts: 0, first_attempt_at: None };
    let event = match IncomingEvent::parse_with(&body, &meta, &history, force).1 {
        Ok(event) => event,
        Err(malformed) => {
            let detail = format!("would fail again: {malformed}");
            return Ok(prediction(Outcome::WouldFail, false, Vec::new(), detail));
        }
    };
    // The body's digest as received (the payload column holds re-serialised JSON): dedup uses it.
    let event = IncomingEvent {
        record: EventRecord { body_sha256: letter.body_sha256.clone(), ..event.record },
        ..event
    };
    let token = ReauthToken::placeholder(Utc::now());
    let decided = decide_as_the_worker(pool, &event, &token, dedup_window).await?;
    let asks_mono = event.kind == EventKind::ReauthorisationRequired;
    let refused_before = letter.reason.as_deref().filter(|r| r.starts_with("Mono refused"));
    Ok(match decided.status {
        EventStatus::Processed => {
            let changes = diff(decided.before.as_ref(), decided.after.as_ref());
            let mono = match (asks_mono, refused_before) {
                (true, Some(reason)) => {
                    format!(" (after a token from Mono, which refused last time: {reason})")
                }
                (true, None) => " (after a token from Mono)".to_owned(),
                _ => String::new(),
            };
            let detail = format!("apply{mono}: {}", describe(&changes));
            prediction(Outcome::Apply, asks_mono, changes, detail)
        }
        EventStatus::Duplicate => {
            let detail = match decided.copy {
                Some(original) => format!("no change: the same body was applied as {original}"),
                None => "no change: the same body was applied within the dedup window".to_owned(),
            };
            prediction(Outcome::Duplicate, false, Vec::new(), detail)
        }
        EventStatus::Stale => {
            let before = decided.before.as_ref();
            let at = before.and_then(|a| a.reauth_state_received_at.max(a.data_state_received_at));
            let detail = format!(
                "no change: stale, the account already applied an event received at {} (--force applies it)",
                time(at)
            );
            prediction(Outcome::Stale, false, Vec::new(), detail)
        }
        EventStatus::Ignored | EventStatus::Dead => {
            let why = decided.note.unwrap_or("nothing to do for this event");
            prediction(Outcome::Ignored, false, Vec::new(), format!("no change: {why}"))
        }
    })
}

/// What the worker would decide for the replayed copy now.
struct Decided {
    status: EventStatus,
    note: Option<&'static str>,
    /// A journaled copy of the same body within the window (a duplicate's original).
    copy: Option<Uuid>,
    before: Option<AccountState>,
    after: Option<AccountState>,
}

/// Runs the replay's own steps (the dead row goes) and the worker's own decision code (load under
/// the row lock, `batch::decide` with a token) in a transaction that is rolled back: the prediction
/// cannot drift from what the worker does. A lock held elsewhere makes it fail, never wait long.
async fn decide_as_the_worker(
    pool: &PgPool,
    event: &IncomingEvent,
    token: &ReauthToken,
    dedup_window: Duration,
) -> anyhow::Result<Decided> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM webhook_events WHERE id = $1 AND status = 'dead'")
        .bind(event.record.id)
        .execute(&mut *tx)
        .await?;
    let candidate = [Candidate { event, token: Some(token) }];
    let mut state = db::batch::load(&mut tx, &candidate, dedup_window).await?;
    tx.rollback().await?;
    let account = event.kind.needs_account().then(|| event.account().to_owned());
    let before = account.as_ref().and_then(|id| state.accounts.get(id).cloned());
    let copy = state
        .bodies
        .get(&event.record.body_sha256)
        .and_then(|copies| copies.iter().find(|(id, _)| *id != event.record.id).map(|(id, _)| *id));
    let decision = batch::decide(&mut state, &candidate, dedup_window).pop();
    let after = account.as_ref().and_then(|id| state.accounts.get(id).cloned());
    let (status, note) = match decision {
        Some(Decision::Journal { status, note }) => (status, note),
        // With a token in hand and the dead row gone, neither can come back.
        other => anyhow::bail!("unexpected decision for a replay: {other:?}"),
    };
    Ok(Decided { status, note, copy, before, after })
}

/// The columns a handler changed, never showing a token.
fn diff(before: Option<&AccountState>, after: Option<&AccountState>) -> Vec<Change> {
    let (Some(before), Some(after)) = (before, after) else { return Vec::new() };
    let mut changes = Vec::new();
    let mut field = |field: &'static str, from: String, to: String| {
        if from != to {
            changes.push(Change { field, from, to });
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
    changes
}

/// `reauth_required false → true, data_status - → AVAILABLE`.
fn describe(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "nothing to change".to_owned();
    }
    changes.iter().map(|c| format!("{} {} → {}", c.field, c.from, c.to)).collect::<Vec<_>>().join(", ")
}

fn opt(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "-".to_owned())
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}
