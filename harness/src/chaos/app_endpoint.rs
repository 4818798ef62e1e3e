//! The app's endpoint under faults: down for a minute, slow (3 s an answer), failing at random, and a
//! worker killed while its tries are out. Every scenario's `finish` checks the app's side (see
//! `app_notices`): each state change told, none lost, one `webhook-id` per notification; these make
//! the endpoint itself misbehave, and check how the sender took it.

use std::time::{Duration, Instant};

use super::ScenarioReport;
use super::common::{all_kinds, finish};
use super::load::Load;
use crate::system::{AppAnswers, System, SystemConfig, metric_value};

/// The endpoint answers 503 for a minute under load, then recovers: the notifications wait, in
/// order, and all arrive once it is back (the retry schedule spans two minutes here).
pub async fn app_endpoint_down_a_minute(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(60, 40));
    tokio::time::sleep(Duration::from_secs(3)).await;
    system.set_app(AppAnswers { status: 503, ..AppAnswers::default() }).await?;
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let load = load.stop().await;
    let waiting = waiting(&system).await?;
    report
        .check(format!("notifications waited while the endpoint was down ({waiting} waiting)"), waiting > 0);
    let breakers = breakers_open(&system).await;
    report.check(format!("the endpoint's breaker opened ({breakers} worker(s))"), breakers > 0);
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(down.elapsed())).await;
    system.set_app(AppAnswers::default()).await?;
    let drained = drained_within(&system, Duration::from_secs(90)).await?;
    report.check("the backlog drained by itself once the endpoint was back", drained.is_some());
    if let Some(took) = drained {
        report.note(format!("the backlog drained {:.1} s after the endpoint came back", took.as_secs_f64()));
    }
    finish("app_endpoint_down_a_minute", started, system, load, report).await
}

/// The endpoint takes 3 s to answer every notification: slower, never lost, never tried twice
/// (the timeout is 10 s).
pub async fn app_endpoint_slow(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport::default();
    system.set_app(AppAnswers { latency_ms: 3_000, ..AppAnswers::default() }).await?;
    let load = Load::start(system.ingest_url(), all_kinds(30, 30));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let load = load.stop().await;
    let drained = drained_within(&system, Duration::from_secs(120)).await?;
    report.check("every notification was delivered at 3 s an answer", drained.is_some());
    let failed = failures(&system).await;
    report.check(format!("no try timed out or failed ({failed} failed)"), failed == 0);
    let (delivered, seconds) = lag_seconds(&system).await;
    report.check(
        format!(
            "each delivery waited the app's 3 s ({delivered} delivered, {:.1} s from commit on average)",
            seconds / delivered.max(1.0)
        ),
        delivered > 0.0 && seconds / delivered >= 2.9,
    );
    system.set_app(AppAnswers::default()).await?;
    finish("app_endpoint_slow", started, system, load, report).await
}

/// The endpoint answers 500 to one try in three at random (at most three times to one
/// notification): retried with the same id, in order per account, each eventually taken.
pub async fn app_endpoint_flaky(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport::default();
    // At most three failures in a row per notification: with the harness's schedule (1, 2, 4 s
    // first) each is taken within seconds, where unbounded dice would, now and then, fail one
    // seven times and dead-letter it (0.33^8 over ~400 notifications: a few runs in a hundred).
    system.set_app(AppAnswers { failure_rate: 0.33, most_failures_each: 3, ..AppAnswers::default() }).await?;
    let load = Load::start(system.ingest_url(), all_kinds(60, 40));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let load = load.stop().await;
    let drained = drained_within(&system, Duration::from_secs(120)).await?;
    report.check("every notification was eventually taken", drained.is_some());
    let failed = failures(&system).await;
    report.check(format!("the endpoint's 500s were retried ({failed} failed tries)"), failed > 0);
    system.set_app(AppAnswers::default()).await?;
    finish("app_endpoint_flaky", started, system, load, report).await
}

/// A worker is killed while its tries are out (the app takes 2 s to answer): its leased
/// notifications go out again from the other worker once the leases end, with the same id.
pub async fn worker_killed_mid_notification(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let mut system = System::start(base.clone(), 2).await?;
    // A killed worker's fetched tokens die with it.
    let mut report = ScenarioReport { extra_tokens_per_account: 1, ..ScenarioReport::default() };
    system.set_app(AppAnswers { latency_ms: 2_000, ..AppAnswers::default() }).await?;
    let load = Load::start(system.ingest_url(), all_kinds(40, 40));
    // Killed once it has delivered (so it is one of the senders) while tries are out (each takes
    // 2 s, and the load keeps every sender busy).
    let (mut leased, mut sent) = (0, 0.0);
    let waiting_since = Instant::now();
    while (leased == 0 || sent == 0.0) && waiting_since.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        leased = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM notification_deliveries WHERE leased_until > clock_timestamp()",
        )
        .fetch_one(&system.pool)
        .await?;
        sent = delivered_by(&system, 0).await;
    }
    system.workers[0].0.kill();
    report.check(
        format!(
            "a worker that had been sending died of SIGKILL while tries were out ({sent} delivered by it before, {leased} leased across the workers)"
        ),
        system.workers[0].0.died_of_sigkill() && sent > 0.0 && leased > 0,
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let load = load.stop().await;
    system.set_app(AppAnswers::default()).await?;
    let drained = drained_within(&system, Duration::from_secs(90)).await?;
    report.check("the killed worker's notifications went out from the other", drained.is_some());
    finish("worker_killed_mid_notification", started, system, load, report).await
}

async fn waiting(system: &System) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM notification_deliveries").fetch_one(&system.pool).await?)
}

/// How long until nothing is due any more, if within `patience`.
async fn drained_within(system: &System, patience: Duration) -> anyhow::Result<Option<Duration>> {
    let since = Instant::now();
    while since.elapsed() < patience {
        if waiting(system).await? == 0 {
            return Ok(Some(since.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(None)
}

/// Workers whose breaker for the app's endpoint is open now.
async fn breakers_open(system: &System) -> usize {
    app_metric(system, "monohook_worker_notify_breaker_open", &[])
        .await
        .iter()
        .filter(|open| **open == 1.0)
        .count()
}

/// Failed tries the workers counted, over every worker still running.
async fn failures(system: &System) -> u64 {
    app_metric(system, "monohook_worker_notifications_total", &[r#"outcome="failed""#])
        .await
        .iter()
        .sum::<f64>() as u64
}

/// Deliveries every worker made (`monohook_worker_notify_lag_seconds`, from the commit that wrote
/// each notification): how many, and their seconds in all.
async fn lag_seconds(system: &System) -> (f64, f64) {
    let count = app_metric(system, "monohook_worker_notify_lag_seconds_count", &[]).await;
    let sum = app_metric(system, "monohook_worker_notify_lag_seconds_sum", &[]).await;
    (count.iter().sum(), sum.iter().sum())
}

/// Notifications worker `index` delivered so far.
async fn delivered_by(system: &System, index: usize) -> f64 {
    let delivered =
        app_metric(system, "monohook_worker_notifications_total", &[r#"outcome="delivered""#]).await;
    delivered.get(index).copied().unwrap_or(0.0)
}

/// `name` for the app's endpoint (with `labels` too) of each worker: 0 where it cannot be read (a
/// killed worker).
async fn app_metric(system: &System, name: &str, labels: &[&str]) -> Vec<f64> {
    let wanted: Vec<&str> = [r#"endpoint="app""#].into_iter().chain(labels.iter().copied()).collect();
    let mut values = Vec::new();
    for index in 0..system.workers.len() {
        let text = system.worker_metrics(index).await.unwrap_or_default();
        values.push(metric_value(&text, name, &wanted).unwrap_or(0.0));
    }
    values
}
