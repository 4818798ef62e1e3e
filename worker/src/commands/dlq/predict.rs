//! `worker dlq replay --dry-run`: what replaying the selected dead letters would do to their
//! accounts now, worked out together by the worker's own decision code (`db::batch::load` and
//! `batch::decide`) in a transaction that is rolled back, against the accounts as they are. Nothing
//! is changed and Mono is not called.

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
use crate::db::{self, events::EventStatus};
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
    /// A notification to the app: it would be sent to its endpoint again, with its webhook-id.
    Resend,
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
    let predictions = predict_all(pool, &dead, args.force, dedup_window).await?;
    for (letter, prediction) in dead.iter().zip(&predictions) {
        if args.json {
            output::line(prediction)?;
        } else {
            println!(
                "{}  {:<24}  {:<24}  {}",
                letter.id,
                letter.event.trim_start_matches("mono.events."),
                letter.account_id.as_deref().unwrap_or("-"),
                prediction.detail
            );
        }
    }
    eprintln!("dry run: {} dead letter(s) examined, nothing changed", dead.len());
    Ok(())
}

/// What replaying `letters` would do now, letter by letter: decided together, in the order given
/// (the order a replay applies them), so two copies of one body show one `apply` and one
/// `duplicate`. The replay's own steps (the dead journal rows go) and the worker's own decision
/// code (load under the row locks, `batch::decide` with a token) run in one transaction that is
/// rolled back: the prediction cannot drift from what the worker does, and nothing changes. A lock
/// held elsewhere makes it fail, never wait long.
pub async fn predict_all(
    pool: &PgPool,
    letters: &[DeadLetter],
    force: bool,
    dedup_window: Duration,
) -> anyhow::Result<Vec<Prediction>> {
    let history = AttemptHistory { previous_attempts: 0, first_attempt_at: None };
    let parsed: Vec<Result<IncomingEvent, String>> = letters
        .iter()
        .map(|letter| {
            if letter.endpoint.is_some() {
                return Err(String::new());
            }
            let meta = DeliveryMeta {
                id: DeliveryId::from(letter.id),
                received_at: letter.received_at,
                body_sha256: letter.body_sha256.clone(),
            };
            IncomingEvent::parse_with(&letter.body, &meta, &history, force).1.map_err(|e| e.to_string())
        })
        .collect();
    let candidates: Vec<Candidate<'_>> =
        parsed.iter().flatten().map(|event| Candidate { event, token: None }).collect();
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *tx).await?;
    let ids: Vec<Uuid> = letters.iter().map(|l| l.id).collect();
    sqlx::query("DELETE FROM webhook_events WHERE id = ANY($1) AND status = 'dead'")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    let mut state = db::batch::load(&mut tx, &candidates, dedup_window).await?;
    tx.rollback().await?;
    // The token a replay would fetch: issued now, so after every re-authorisation received (the
    // latest stamp stands for now should this clock be behind ingest's).
    let issued_at = state.accounts.values().filter_map(|a| a.reauthorized_at).fold(state.now, DateTime::max);
    let token = ReauthToken::placeholder(issued_at);
    let candidates: Vec<Candidate<'_>> =
        candidates.iter().map(|c| Candidate { token: Some(&token), ..*c }).collect();

    let mut predictions = Vec::with_capacity(letters.len());
    let mut candidates = candidates.iter();
    for (letter, event) in letters.iter().zip(&parsed) {
        let prediction =
            |outcome: Outcome, calls_mono: bool, changes: Vec<Change>, detail: String| Prediction {
                id: letter.id,
                event: letter.event.clone(),
                account_id: letter.account_id.clone(),
                outcome,
                calls_mono,
                changes,
                detail,
            };
        if let Some(endpoint) = &letter.endpoint {
            let detail =
                format!("send again to endpoint {endpoint} (the same webhook-id; no account changes)");
            predictions.push(prediction(Outcome::Resend, false, Vec::new(), detail));
            continue;
        }
        let event = match event {
            Ok(event) => event,
            Err(malformed) => {
                let detail = format!("would fail again: {malformed}");
                predictions.push(prediction(Outcome::WouldFail, false, Vec::new(), detail));
                continue;
            }
        };
        let candidate = candidates.next().expect("one candidate per parsed letter");
        let account = event.kind.needs_account().then(|| event.account().to_owned());
        let before = account.as_ref().and_then(|id| state.accounts.get(id).cloned());
        let copy = state
            .bodies
            .get(&event.record.body_sha256)
            .and_then(|copies| copies.iter().find(|(id, _)| *id != event.record.id).map(|(id, _)| *id));
        let decision = batch::decide(&mut state, std::slice::from_ref(candidate), dedup_window).pop();
        let after = account.as_ref().and_then(|id| state.accounts.get(id).cloned());
        let (status, note) = match decision {
            Some(Decision::Journal { status, note }) => (status, note),
            Some(Decision::AlreadySettled) => {
                let detail = "no change: this delivery id was settled already".to_owned();
                predictions.push(prediction(Outcome::Duplicate, false, Vec::new(), detail));
                continue;
            }
            // With a token in hand and the dead rows gone, nothing else can come back.
            other => anyhow::bail!("unexpected decision for a replay: {other:?}"),
        };
        let asks_mono = event.kind == EventKind::ReauthorisationRequired;
        let refused_before = letter.reason.as_deref().filter(|r| r.starts_with("Mono refused"));
        predictions.push(match status {
            EventStatus::Processed => {
                let changes = diff(before.as_ref(), after.as_ref());
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
                let detail = match copy {
                    Some(original) => format!("no change: the same body was applied as {original}"),
                    None => "no change: the same body was applied within the dedup window".to_owned(),
                };
                prediction(Outcome::Duplicate, false, Vec::new(), detail)
            }
            EventStatus::Stale => {
                let at = before.as_ref().and_then(|a| a.reauth_state_received_at.max(a.data_state_received_at));
                let detail = format!(
                    "no change: stale, the account already applied an event received at {} (--force applies it)",
                    time(at)
                );
                prediction(Outcome::Stale, false, Vec::new(), detail)
            }
            EventStatus::Ignored | EventStatus::Dead => {
                let why = note.unwrap_or("nothing to do for this event");
                prediction(Outcome::Ignored, false, Vec::new(), format!("no change: {why}"))
            }
        });
    }
    Ok(predictions)
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
