//! What the scenarios on one node and on the cluster share: the usual load, waiting for a
//! component to be ready, and the end of a scenario (drain, verify against the model, fill the
//! common columns, shut down). Its own module so that neither scenario file imports the other.

use anyhow::Context;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::load::{Kind, LoadPlan, LoadResult};
use super::model::{self, Verdict};
use super::{DRAIN_PATIENCE, ScenarioReport};
use crate::system::System;

/// Every event kind, at `per_second` over `accounts` accounts: mostly the re-auth cycle and data
/// updates, with sync failures, connections and (for every eighth account) unlinks among them.
pub(super) fn all_kinds(per_second: u32, accounts: u64) -> LoadPlan {
    use Kind::*;
    LoadPlan {
        per_second,
        accounts,
        kinds: vec![
            ReauthorisationRequired,
            AccountReauthorized,
            AccountUpdated,
            ReauthorisationRequired,
            AccountReauthorized,
            AccountUpdated,
            SyncFailed,
            AccountConnected,
            AccountUnlinked,
        ],
    }
}

/// Whether `url` answers 2xx now.
pub(super) async fn ready(url: &str) -> bool {
    reqwest::get(url).await.is_ok_and(|r| r.status().is_success())
}

pub(super) async fn wait_ready(url: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ready(url).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Dead letters at the end: rows (the worker writes one with each `dead` journal row, the relay one
/// for each message the broker dead-lettered) and `dead` journal rows without one, which would be a
/// bug of their own. A query that fails fails the scenario, never counts as none.
async fn dead_total(system: &System) -> anyhow::Result<usize> {
    let total: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM dead_letters)
              + (SELECT count(*) FROM webhook_events w WHERE w.status = 'dead'
                   AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.id = w.id))",
    )
    .fetch_one(&system.pool)
    .await
    .context("cannot count the dead letters")?;
    Ok(usize::try_from(total).unwrap_or(usize::MAX))
}

/// The worker's dedup window in every scenario (its default).
pub(super) const MODEL_DEDUP_WINDOW: Duration = Duration::from_secs(600);

/// The times (ms) of the tokens Mono issued to the workers, account by account: the api's on-demand
/// fetches are its own (the simulator records who called, by `User-Agent`).
async fn worker_tokens_by_account(system: &System) -> anyhow::Result<HashMap<String, Vec<i64>>> {
    let calls: Vec<serde_json::Value> =
        reqwest::get(format!("{}/_sim/calls", system.mono_url)).await?.error_for_status()?.json().await?;
    let mut issued: HashMap<String, Vec<i64>> = HashMap::new();
    for call in &calls {
        if call["outcome"] == "token" && call["caller"] == "monohook-worker" {
            let account = call["account"].as_str().unwrap_or_default().to_owned();
            issued.entry(account).or_default().push(call["at_ms"].as_i64().unwrap_or_default());
        }
    }
    Ok(issued)
}

/// Accounts [`explain_extra_tokens`] prints at most: where extra tokens are expected (a process
/// killed mid-call) there can be hundreds, and the first few say enough.
const EXPLAINED_ACCOUNTS: usize = 3;

/// Prints, for the first [`EXPLAINED_ACCOUNTS`] accounts Mono issued more tokens to than the
/// model counts re-auths (more than `allowed` extra), its journal and Mono's token times, so that an
/// extra token can be understood from the log alone.
async fn explain_extra_tokens(
    system: &System,
    issued: &HashMap<String, Vec<i64>>,
    counted: &HashMap<String, usize>,
    allowed: usize,
) {
    let mut extra: Vec<(&String, &Vec<i64>, usize)> = issued
        .iter()
        .filter_map(|(account, at_ms)| {
            let counted = counted.get(account).copied().unwrap_or(0);
            (at_ms.len() > counted + allowed).then_some((account, at_ms, counted))
        })
        .collect();
    extra.sort();
    for (account, at_ms, counted) in extra.into_iter().take(EXPLAINED_ACCOUNTS) {
        eprintln!(
            "  account {account}: {} token(s) from Mono at {at_ms:?} (ms), {counted} re-auth(s) in the model",
            at_ms.len()
        );
        type Row =
            (String, String, String, chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT event, status, left(body_sha256, 8), received_at, processed_at FROM webhook_events
                 WHERE account_id = $1 ORDER BY received_at, id",
        )
        .bind(account)
        .fetch_all(&system.pool)
        .await
        .unwrap_or_default();
        for (event, status, body, received, processed) in rows {
            let received = received.timestamp_millis();
            let processed = processed.map(|p| p.timestamp_millis());
            eprintln!("    received {received} processed {processed:?} {status:9} body {body} {event}");
        }
    }
}

/// Drains, verifies, fills the common columns and shuts the system down.
pub(super) async fn finish(
    name: &str,
    started: Instant,
    system: System,
    load: LoadResult,
    mut report: ScenarioReport,
) -> anyhow::Result<ScenarioReport> {
    let verdict: Verdict = model::settle_and_verify(
        &system.pool,
        &load.accepted,
        &load.uncertain,
        DRAIN_PATIENCE,
        MODEL_DEDUP_WINDOW,
    )
    .await?;
    // Every state change the database committed was told to the app, whatever the scenario did.
    super::app_notices::check(&system, &mut report).await?;
    report.name = name.to_owned();
    report.posted = load.posted;
    report.accepted_share = load.accepted_share();
    report.accepted = load.accepted.len();
    report.check(
        format!("ingest gave every accepted webhook an id of its own ({} reused)", load.reused_ids.len()),
        load.reused_ids.is_empty(),
    );
    if load.reposts > 0 {
        report.note(format!(
            "{} webhook(s) posted again after no 200, as Mono would; {} never accepted",
            load.reposts, load.given_up
        ));
    }
    // The token bound, account by account: a sum over accounts would let one account's extra
    // token hide behind another's shared fetch.
    let issued = worker_tokens_by_account(&system).await?;
    let counted = model::model_reauths_by_account(&system.pool, MODEL_DEDUP_WINDOW).await?;
    let tokens: usize = issued.values().map(Vec::len).sum();
    report.mono_tokens = Some((tokens as u64, counted.values().sum()));
    let allowed = report.extra_tokens_per_account;
    let extra_on = |account: &String, at_ms: &Vec<i64>| {
        at_ms.len().saturating_sub(counted.get(account).copied().unwrap_or(0))
    };
    let over = issued.iter().filter(|(account, at_ms)| extra_on(account, at_ms) > allowed).count();
    let most = issued.iter().map(|(account, at_ms)| extra_on(account, at_ms)).max().unwrap_or(0);
    let bound = if allowed == 0 {
        "its re-auths in the model".to_owned()
    } else {
        format!("its re-auths in the model + {allowed} (calls the scenario's kills may cut short)")
    };
    report.check(
        format!("no account got more tokens from Mono than {bound} ({over} over; most extra on one account: {most})"),
        over == 0,
    );
    if most > 0 {
        explain_extra_tokens(&system, &issued, &counted, allowed).await;
    }
    report.check(
        format!(
            "every journal status is one some order of processing gives ({} not{})",
            verdict.wrong_statuses.len(),
            verdict.wrong_statuses.first().map(|first| format!(", e.g. {first}")).unwrap_or_default()
        ),
        verdict.wrong_statuses.is_empty(),
    );
    report.processed = verdict.processed;
    report.lost = verdict.lost.len();
    report.double_effects = verdict.wrong_accounts.len();
    if verdict.delivered_without_200 > 0 {
        report.note(format!(
            "{} webhook(s) answered 503 reached the queue anyway and were processed (counted, not lost)",
            verdict.delivered_without_200
        ));
    }
    report.dead_lettered = dead_total(&system).await?;
    if report.dead_lettered != report.expected_dead {
        eprintln!(
            "  {name}: {} dead letter(s), {} expected (logs in {})",
            report.dead_lettered,
            report.expected_dead,
            system.config.log_dir.display()
        );
    }
    if !verdict.lost.is_empty() {
        eprintln!(
            "  {name}: lost {:?} (logs in {})",
            &verdict.lost[..verdict.lost.len().min(5)],
            system.config.log_dir.display()
        );
    }
    if !verdict.wrong_accounts.is_empty() {
        eprintln!(
            "  {name}: accounts not as one-by-one processing leaves them: {:?}",
            &verdict.wrong_accounts[..verdict.wrong_accounts.len().min(5)]
        );
    }
    report.seconds = started.elapsed().as_secs_f64();
    if report.passed() {
        system.shut_down().await?;
    } else {
        eprintln!("  {name}: logs kept in {}", system.config.log_dir.display());
    }
    Ok(report)
}
