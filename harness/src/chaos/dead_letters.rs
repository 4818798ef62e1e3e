//! A large batch of dead letters replayed while the workers run, with the replay command and a
//! worker killed midway: every letter is replayed exactly once (one action each), nothing is lost,
//! nothing takes effect twice, and the outbox and the dead letters end empty.

use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::ScenarioReport;
use super::common::{all_kinds, finish};
use super::load::{Kind, Load, LoadPlan};
use crate::process::Service;
use crate::system::{System, SystemConfig};

/// Accounts of the re-auths that die (Mono refuses them all at first).
const ACCOUNTS: u64 = 500;

async fn mono_refuses(system: &System, accounts: Vec<String>) -> anyhow::Result<()> {
    let knobs = json!({
        "latency_ms": 0, "failure_rate": 0.0, "failure_mode": "500", "retry_after_secs": 2,
        "reject_accounts": accounts,
    });
    reqwest::Client::new()
        .post(format!("{}/_sim/config", system.mono_url))
        .json(&knobs)
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

async fn count(system: &System, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&system.pool).await.unwrap_or(-1)
}

/// `worker dlq replay --all`, as an operator runs it against this system.
fn replay_command(system: &System, name: &str) -> anyhow::Result<Service> {
    let env = [
        ("DATABASE_URL", system.database_url()),
        ("AMQP_URL", system.config.amqp_url.clone()),
        ("QUEUE_PREFIX", system.prefix.clone()),
        ("RETRY_DELAYS_SECS", system.config.retry_delays_secs.clone()),
        ("LOG_FORMAT", "json".into()),
        ("USER", "chaos".into()),
    ];
    Service::spawn(
        name,
        "worker",
        &["dlq", "replay", "--all", "--reason-note", "Mono accepts the accounts again"],
        &env,
        &system.config.log_dir,
    )
}

pub async fn dead_letters_replayed_under_load(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let mut system = System::start(base.clone(), 2).await?;
    // A killed worker's fetched tokens die with it.
    let mut report = ScenarioReport { extra_tokens_per_account: 1, ..ScenarioReport::default() };
    mono_refuses(&system, (1..=ACCOUNTS).map(crate::bodies::account_id).collect()).await?;
    let plan = LoadPlan { per_second: 300, accounts: ACCOUNTS, kinds: vec![Kind::ReauthorisationRequired] };
    let refused = Load::start(system.ingest_url(), plan);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let refused = refused.stop().await;
    // Every 200 must die; a webhook answered 503 may have reached the queue anyway (its confirm
    // came too late) and then dies too, as the copy Mono would have retried. Nothing else may.
    let accepted: HashSet<String> = refused.accepted.keys().cloned().collect();
    let uncertain: HashSet<String> =
        refused.uncertain.iter().map(|posted| shared::delivery::body_digest(&posted.body)).collect();
    // Until every 200 has its letter and no more letters come for 3 s (a 503'd copy may still be
    // on its way when the last 200 dies).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut steady_since) = (usize::MAX, Instant::now());
    let letters = loop {
        let letters: Vec<(String, String)> =
            sqlx::query_as("SELECT id::text, body_sha256 FROM dead_letters").fetch_all(&system.pool).await?;
        if letters.len() != seen {
            (seen, steady_since) = (letters.len(), Instant::now());
        }
        let ids: HashSet<&String> = letters.iter().map(|(id, _)| id).collect();
        let all_died = accepted.iter().all(|id| ids.contains(id));
        if (all_died && steady_since.elapsed() >= Duration::from_secs(3)) || Instant::now() >= deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ids: HashSet<&String> = letters.iter().map(|(id, _)| id).collect();
    let missing = accepted.iter().filter(|id| !ids.contains(id)).count();
    report.check(
        format!("every accepted re-auth died while Mono refused it ({missing} of {} not)", accepted.len()),
        missing == 0,
    );
    let unexplained =
        letters.iter().filter(|(id, hash)| !accepted.contains(id) && !uncertain.contains(hash)).count();
    report.check(
        format!(
            "every other letter is a webhook answered 503 that reached the queue anyway ({} such, {unexplained} unexplained)",
            letters.len() - (accepted.len() - missing)
        ),
        unexplained == 0,
    );
    let dead = letters.len() as i64;

    // Mono accepts again; traffic goes on while the operator replays.
    mono_refuses(&system, Vec::new()).await?;
    let load = Load::start_at(system.ingest_url(), all_kinds(100, 40), 1_000_000);
    let mut first = replay_command(&system, "replay-1")?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let killed_midway = first.is_running();
    first.kill();
    let replayed_then = count(&system, "SELECT count(*) FROM dead_letter_actions").await;
    report.check(
        format!("the first replay was killed midway ({replayed_then} of {dead} replayed)"),
        killed_midway && replayed_then > 0 && replayed_then < dead,
    );
    system.workers[0].0.kill();
    report.check("a worker died of SIGKILL while its relay published", system.workers[0].0.died_of_sigkill());
    let mut second = replay_command(&system, "replay-2")?;
    let exit = second.wait_exit(Duration::from_secs(120));
    report.check("the second replay ends with exit 0", exit.is_some_and(|status| status.success()));
    system.start_worker().await?;

    let deadline = Instant::now() + Duration::from_secs(60);
    let waiting = "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM dead_letters)";
    while count(&system, waiting).await != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.check("the outbox emptied and no letter waits", count(&system, waiting).await == 0);
    let actions = count(&system, "SELECT count(*) FROM dead_letter_actions WHERE action = 'replay'").await;
    let letters = count(&system, "SELECT count(DISTINCT delivery_id) FROM dead_letter_actions").await;
    report.check(
        format!("every letter was replayed once ({letters} letters, {actions} actions)"),
        actions == dead && letters == dead,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = load.stop().await.merge(refused);
    let mut report = finish("dead_letters_replayed_under_load", started, system, load, report).await?;
    report.check("nothing is dead at the end", report.dead_lettered == 0);
    Ok(report)
}
