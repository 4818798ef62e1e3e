//! The app's side of a scenario: what mono-sim, playing the app, was told. The oracle: once every
//! notification is delivered, the app's view of each account (the state of the highest sequence it
//! took; nothing taken: not flagged, linked) is the account's final state in the database; every
//! sequence written reached it; each notification kept one `webhook-id` over all its tries; no
//! request failed the signature check, and PyPI's standardwebhooks (not our code) verifies every
//! request the app took, its body checked against api/openapi.json by jsonschema.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::ScenarioReport;
use crate::system::System;

/// Longest wait for the notifications still due (a worker killed mid-try hands its lease on after
/// 30 s; a retry may wait a minute).
const NOTIFY_PATIENCE: Duration = Duration::from_secs(120);

pub(super) async fn check(system: &System, report: &mut ScenarioReport) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut waiting: i64 = -1;
    while started.elapsed() < NOTIFY_PATIENCE {
        waiting = sqlx::query_scalar("SELECT count(*) FROM notification_deliveries")
            .fetch_one(&system.pool)
            .await?;
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.check(format!("every notification to the app was delivered ({waiting} still due)"), waiting == 0);

    let told = system.app_notifications().await?;
    let refused: u64 =
        told["refused"].as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0);
    report.check(
        format!("every notification's signature verified at the app ({refused} refused)"),
        refused == 0,
    );
    let notifications = told["notifications"].as_array().cloned().unwrap_or_default();
    let mut by_account: BTreeMap<String, BTreeMap<i64, &Value>> = BTreeMap::new();
    let (mut unstable_ids, mut again, mut tries) = (0, 0, 0);
    for notification in &notifications {
        let account = notification["account_id"].as_str().unwrap_or_default().to_owned();
        let sequence = notification["sequence"].as_i64().unwrap_or_default();
        if notification["taken"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        unstable_ids += usize::from(notification["ids"].as_array().map_or(0, Vec::len) != 1);
        again += usize::from(notification["taken"].as_u64().unwrap_or(0) > 1);
        tries += notification["tries"].as_u64().unwrap_or(0);
        by_account.entry(account).or_default().insert(sequence, notification);
    }
    report.check(
        format!("each notification kept one webhook-id over all its tries ({unstable_ids} did not)"),
        unstable_ids == 0,
    );

    let accounts: Vec<(String, bool, bool, i64)> = sqlx::query_as(
        "SELECT id, reauth_required, unlinked_at IS NOT NULL, notification_seq FROM accounts ORDER BY id",
    )
    .fetch_all(&system.pool)
    .await?;
    let (mut wrong_view, mut missing) = (Vec::new(), 0);
    for (id, flagged, unlinked, written) in &accounts {
        let taken = by_account.get(id);
        let view = taken
            .and_then(|t| t.values().next_back())
            .map(|n| (n["reauth_required"].as_bool() == Some(true), n["unlinked"].as_bool() == Some(true)))
            .unwrap_or((false, false));
        if view != (*flagged, *unlinked) {
            wrong_view.push(id.clone());
        }
        let sequences: BTreeSet<i64> = taken.map(|t| t.keys().copied().collect()).unwrap_or_default();
        missing += (1..=*written).filter(|n| !sequences.contains(n)).count();
    }
    report.check(
        format!(
            "the app's view of every account is its final state ({} of {} not{})",
            wrong_view.len(),
            accounts.len(),
            wrong_view.first().map(|id| format!(", e.g. {id}")).unwrap_or_default()
        ),
        wrong_view.is_empty(),
    );
    report.check(format!("every notification written reached the app ({missing} missing)"), missing == 0);
    let written: i64 = sqlx::query_scalar("SELECT coalesce(sum(notification_seq), 0)::int8 FROM accounts")
        .fetch_one(&system.pool)
        .await?;
    let (requests, verdicts) = system.app_requests_verified().await?;
    let verified = verdicts.iter().filter(|v| v.starts_with("ok ")).count();
    report.check(
        format!(
            "the Standard Webhooks reference library verified every request the app took ({verified} of {}{})",
            requests,
            verdicts.iter().find(|v| !v.starts_with("ok ")).map(|v| format!("; e.g. {v}")).unwrap_or_default()
        ),
        // None at all passes only where no notification was written (a scenario without changes).
        verified == requests && (requests > 0 || written == 0),
    );
    let count: usize = by_account.values().map(BTreeMap::len).sum();
    report.note(format!(
        "the app was told {count} state change(s) of {} account(s) in {tries} tries; {again} taken more than once",
        by_account.len()
    ));
    Ok(())
}
