//! The scenarios, each with its own system (database, queue prefix, processes) and one fault.

use serde_json::json;
use std::time::{Duration, Instant};

use super::common::{all_kinds, finish, ready, wait_ready};
use super::load::{Kind, Load, LoadPlan, LoadResult};
use super::model;
use super::services::{self, RestoreServices};
use super::{DRAIN_PATIENCE, ScenarioReport};
use crate::system::{System, SystemConfig, metric_value};

pub const ALL: [&str; 26] = [
    "rabbitmq_restart",
    "postgres_restart",
    "worker_sigkill",
    "ingest_sigterm",
    "mono_500_for_30s",
    "mono_429_retry_after",
    "mono_hangs",
    "three_workers_interleaved",
    "duplicates_and_reordering",
    "poison_messages",
    "database_read_only",
    "mono_key_revoked",
    "rabbitmq_restarted_5_times",
    "database_errors_of_ours",
    "postgres_outage_past_consumer_timeout",
    "mono_slow_at_sign_in_peak",
    "dead_letters_replayed_under_load",
    "mono_key_refused_at_sign_in",
    "memory_alarm_under_load",
    "broker_confirms_slowed",
    "republish_target_nacks",
    "copies_without_kills",
    "app_endpoint_down_a_minute",
    "app_endpoint_slow",
    "app_endpoint_flaky",
    "worker_killed_mid_notification",
];

pub async fn run(name: &str, base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    match name {
        "rabbitmq_restart" => rabbitmq_restart(base).await,
        "postgres_restart" => postgres_restart(base).await,
        "worker_sigkill" => worker_sigkill(base).await,
        "ingest_sigterm" => ingest_sigterm(base).await,
        "mono_500_for_30s" => mono_500_for_30s(base).await,
        "mono_429_retry_after" => mono_429_retry_after(base).await,
        "mono_hangs" => mono_hangs(base).await,
        "three_workers_interleaved" => three_workers_interleaved(base).await,
        "duplicates_and_reordering" => duplicates_and_reordering(base).await,
        "poison_messages" => poison_messages(base).await,
        "database_read_only" => database_read_only(base).await,
        "mono_key_revoked" => mono_key_revoked(base).await,
        "rabbitmq_restarted_5_times" => rabbitmq_restarted_5_times(base).await,
        "database_errors_of_ours" => database_errors_of_ours(base).await,
        "postgres_outage_past_consumer_timeout" => postgres_outage_past_consumer_timeout(base).await,
        "mono_slow_at_sign_in_peak" => mono_slow_at_sign_in_peak(base).await,
        "dead_letters_replayed_under_load" => {
            super::dead_letters::dead_letters_replayed_under_load(base).await
        }
        "mono_key_refused_at_sign_in" => super::api_recovery::mono_key_refused_at_sign_in(base).await,
        "memory_alarm_under_load" => memory_alarm_under_load(base).await,
        "broker_confirms_slowed" => broker_confirms_slowed(base).await,
        "republish_target_nacks" => republish_target_nacks(base).await,
        "copies_without_kills" => copies_without_kills(base).await,
        "app_endpoint_down_a_minute" => super::app_endpoint::app_endpoint_down_a_minute(base).await,
        "app_endpoint_slow" => super::app_endpoint::app_endpoint_slow(base).await,
        "app_endpoint_flaky" => super::app_endpoint::app_endpoint_flaky(base).await,
        "worker_killed_mid_notification" => super::app_endpoint::worker_killed_mid_notification(base).await,
        "cluster_node_partitioned" => super::useless_node::node_partitioned(base).await,
        "cluster_consumer_starved" => super::useless_node::consumer_starved(base).await,
        other => super::on_cluster::run(other, base).await,
    }
}

fn with_worker_env(base: &SystemConfig, env: &[(&'static str, &str)]) -> SystemConfig {
    let mut config = base.clone();
    config.worker_env.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    config
}

pub(super) async fn set_mono(
    system: &System,
    failure_rate: f64,
    mode: &str,
    latency_ms: u64,
) -> anyhow::Result<()> {
    let knobs = json!({
        "latency_ms": latency_ms,
        "failure_rate": failure_rate,
        "failure_mode": mode,
        "retry_after_secs": 2,
        "reject_accounts": [],
    });
    reqwest::Client::new()
        .post(format!("{}/_sim/config", system.mono_url))
        .json(&knobs)
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// Posts `plan`'s load while Mono fails in `mode` for `fault` (after `lead` of normal traffic), then
/// two more seconds of normal traffic.
async fn load_through_mono_fault(
    system: &System,
    plan: LoadPlan,
    mode: &str,
    lead: Duration,
    fault: Duration,
) -> anyhow::Result<LoadResult> {
    let load = Load::start(system.ingest_url(), plan);
    tokio::time::sleep(lead).await;
    set_mono(system, 1.0, mode, 0).await?;
    tokio::time::sleep(fault).await;
    set_mono(system, 0.0, mode, 0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(load.stop().await)
}

/// Re-auth traffic: what Mono's failures are about.
fn reauth_kinds() -> LoadPlan {
    LoadPlan {
        per_second: 30,
        accounts: 30,
        kinds: vec![Kind::ReauthorisationRequired, Kind::AccountReauthorized],
    }
}

async fn rabbitmq_restart(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let _restore = RestoreServices;
    let system = System::start(base.clone(), 2).await?;
    // A worker's session dies mid-call: a copy may be fetched again by the next session.
    let mut report = ScenarioReport { extra_tokens_per_account: 1, ..ScenarioReport::default() };
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(4)).await;

    services::stop_rabbitmq()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probe_started = Instant::now();
    let (status, _) =
        system.post(&crate::bodies::reauthorisation_required("0000000000000000000000aa")).await?;
    report.check("ingest answers 503 while the broker is down", status == 503);
    report.check("and answers it within 1 s", probe_started.elapsed() < Duration::from_secs(1));
    report.check(
        "ingest reports not ready while down",
        !ready(&format!("{}/readyz", system.ingest_url())).await,
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    services::start_rabbitmq()?;

    report.check(
        "ingest reconnects by itself",
        wait_ready(&format!("{}/readyz", system.ingest_url()), Duration::from_secs(30)).await,
    );
    for (_, port) in &system.workers {
        let consuming = wait_ready(&format!("http://127.0.0.1:{port}/readyz"), Duration::from_secs(30)).await;
        report.check(format!("worker on :{port} reconnects and consumes again"), consuming);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let load = load.stop().await;
    report.check(
        "some webhooks got 503 during the outage",
        load.statuses.get(&503).copied().unwrap_or(0) > 0 || load.no_answer > 0,
    );
    finish("rabbitmq_restart", started, system, load, report).await
}

async fn postgres_restart(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let _restore = RestoreServices;
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(4)).await;

    services::stop_postgres()?;
    // A connection of its own: the pool would retry a refused connect for its 30 s acquire timeout.
    let url = system.database_url();
    let refused = !matches!(
        tokio::time::timeout(Duration::from_secs(3), <sqlx::PgConnection as sqlx::Connection>::connect(&url))
            .await,
        Ok(Ok(_))
    );
    report.check("the database refused connections while stopped", refused);
    let (status, _) =
        system.post(&crate::bodies::account_updated("0000000000000000000000bb", 1, 512)).await?;
    report.check("ingest keeps accepting while the database is down", status == 200);
    tokio::time::sleep(Duration::from_secs(5)).await;
    services::start_postgres()?;

    tokio::time::sleep(Duration::from_secs(4)).await;
    let load = load.stop().await;
    let retried: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE attempts > 1")
        .fetch_one(&system.pool)
        .await
        .unwrap_or(-1);
    let report = finish("postgres_restart", started, system, load, report).await?;
    let mut report = report;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    report.check("no delivery spent a retry attempt on the outage", retried <= 0);
    Ok(report)
}

async fn worker_sigkill(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let mut system = System::start(base.clone(), 2).await?;
    // A killed worker's fetched tokens die with it.
    let mut report = ScenarioReport { extra_tokens_per_account: 1, ..ScenarioReport::default() };
    let load = Load::start(system.ingest_url(), all_kinds(150, 40));
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Killed the moment it reports deliveries not yet acked (its batches settle in milliseconds).
    let mut in_flight = 0.0;
    let watching = Instant::now();
    while in_flight == 0.0 && watching.elapsed() < Duration::from_secs(10) {
        in_flight = worker_in_flight(&system, 0).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    system.workers[0].0.kill();
    report.check(
        format!("the worker died of SIGKILL holding deliveries ({in_flight} in flight just before)"),
        system.workers[0].0.died_of_sigkill() && in_flight > 0.0,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    system.start_worker().await?;

    tokio::time::sleep(Duration::from_secs(4)).await;
    let load = load.stop().await;
    let mut report = finish("worker_sigkill", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

async fn ingest_sigterm(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let mut system = System::start(base.clone(), 1).await?;
    // No worker dies: the token bound is exact, account by account.
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(200, 40));
    tokio::time::sleep(Duration::from_secs(4)).await;

    let ingest = system.ingest.as_mut().expect("ingest runs");
    ingest.terminate();
    let exit = ingest.wait_exit(Duration::from_secs(20));
    report.check("ingest exits 0 after SIGTERM", exit.is_some_and(|status| status.success()));
    let after_stop = system.post(&crate::bodies::reauthorisation_required("0000000000000000000000cc")).await;
    report.check("a webhook posted after the stop gets no answer (connection refused)", after_stop.is_err());
    // A deploy: the next ingest comes up on the same address, and Mono's retries reach it.
    system.start_ingest().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = load.stop().await;
    finish("ingest_sigterm", started, system, load, report).await
}

async fn mono_500_for_30s(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let config = with_worker_env(base, &[("MONO_RETRY_BUDGET_SECS", "2"), ("MONO_CIRCUIT_OPEN_SECS", "1")]);
    let system = System::start(config, 2).await?;
    let mut report = ScenarioReport::default();
    let load = load_through_mono_fault(
        &system,
        all_kinds(40, 60),
        "500",
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .await?;
    let breaker_opened = system.all_logs().contains("Mono circuit opened");
    let mut parked = 0.0;
    for index in 0..system.workers.len() {
        let metrics = system.worker_metrics(index).await.unwrap_or_default();
        parked += metric_value(
            &metrics,
            "monohook_worker_deliveries_total",
            &["event=\"reauthorisation_required\"", "outcome=\"parked\""],
        )
        .unwrap_or(0.0);
    }
    report.check("the circuit breaker opened", breaker_opened);
    report.check("re-auth deliveries were parked instead of spending attempts", parked > 0.0);
    let mut report = finish("mono_500_for_30s", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

async fn mono_429_retry_after(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 1).await?;
    let mut report = ScenarioReport::default();
    let load = load_through_mono_fault(
        &system,
        reauth_kinds(),
        "429",
        Duration::from_secs(1),
        Duration::from_secs(6),
    )
    .await?;

    let calls: Vec<serde_json::Value> =
        reqwest::get(format!("{}/_sim/calls", system.mono_url)).await?.json().await?;
    let limited = calls.iter().filter(|c| c["outcome"] == "failed_429").count();
    let mut too_soon = 0;
    for (index, call) in calls.iter().enumerate() {
        if call["outcome"] != "failed_429" {
            continue;
        }
        let at = call["at_ms"].as_i64().unwrap_or_default();
        let next = calls[index + 1..].iter().find(|c| c["account"] == call["account"]);
        if next.is_some_and(|n| n["at_ms"].as_i64().unwrap_or_default() < at + 2000) {
            too_soon += 1;
        }
    }
    report.check(format!("Mono answered 429 ({limited} times)"), limited > 0);
    report.check(format!("no account was called again within Retry-After ({too_soon} were)"), too_soon == 0);
    let mut report = finish("mono_429_retry_after", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

async fn mono_hangs(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let config = with_worker_env(base, &[("MONO_TIMEOUT_MS", "1000"), ("MONO_CIRCUIT_OPEN_SECS", "1")]);
    let system = System::start(config, 1).await?;
    let mut report = ScenarioReport::default();
    let load = load_through_mono_fault(
        &system,
        reauth_kinds(),
        "hang",
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .await?;
    let metrics = system.worker_metrics(0).await.unwrap_or_default();
    let timeouts =
        metric_value(&metrics, "monohook_worker_mono_request_seconds_count", &["status_class=\"timeout\""])
            .unwrap_or(0.0);
    report.check(format!("calls to a hanging Mono timed out ({timeouts})"), timeouts > 0.0);
    let mut report = finish("mono_hangs", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

async fn three_workers_interleaved(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 3).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(200, 5));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let load = load.stop().await;
    let _ = model::settle_and_verify(
        &system.pool,
        &load.accepted,
        &load.uncertain,
        DRAIN_PATIENCE,
        super::common::MODEL_DEDUP_WINDOW,
    )
    .await?;
    for index in 0..system.workers.len() {
        let metrics = system.worker_metrics(index).await.unwrap_or_default();
        let handled: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("monohook_worker_deliveries_total{"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum();
        report.check(format!("worker {} shared the work ({handled} deliveries)", index + 1), handled > 0.0);
    }
    finish("three_workers_interleaved", started, system, load, report).await
}

async fn duplicates_and_reordering(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 1).await?;
    let mut report = ScenarioReport::default();
    // Four webhooks, each posted by hand once.
    let mut load = LoadResult { posted: 4, ..LoadResult::default() };
    let plan = all_kinds(1, 1);

    // The same body twice within the dedup window.
    let update = super::load::Posted::new(2, &plan);
    let mut answers = Vec::new();
    for _ in 0..2 {
        let (status, id) = system.post(&update.body).await?;
        answers.push(status);
        load.accept(id.unwrap_or_default(), update.clone());
    }
    report.check("ingest accepts both copies (it does no business work)", answers == [200, 200]);
    // Received in this order: required, then reauthorized; Mono's slowness makes the worker apply
    // them in the other order.
    set_mono(&system, 0.0, "500", 1500).await?;
    let required =
        super::load::Posted::new(0, &LoadPlan { kinds: vec![Kind::ReauthorisationRequired], ..plan.clone() });
    let reauthorized =
        super::load::Posted::new(1, &LoadPlan { kinds: vec![Kind::AccountReauthorized], ..plan.clone() });
    let (_, required_id) = system.post(&required.body).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (_, reauthorized_id) = system.post(&reauthorized.body).await?;
    let (required_id, reauthorized_id) =
        (required_id.unwrap_or_default(), reauthorized_id.unwrap_or_default());
    load.accept(required_id.clone(), required);
    load.accept(reauthorized_id.clone(), reauthorized);

    let settled =
        system.wait_for_count("SELECT count(*) FROM webhook_events", 4, Duration::from_secs(30)).await?;
    let status_of = |id: String| {
        let pool = system.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM webhook_events WHERE id::text = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
        }
    };
    // Which copy is applied is the worker's choice (two batches may decide them in either order);
    // that one is, and only one, is the rule. The account's state is checked by the model.
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM webhook_events WHERE event = 'mono.events.account_updated' ORDER BY status",
    )
    .fetch_all(&system.pool)
    .await?;
    report.check("all four deliveries settled", settled == 4);
    report.check("one copy is applied, the other a duplicate", statuses == ["duplicate", "processed"]);
    report.check("the late reauthorisation_required is stale", status_of(required_id).await == "stale");
    report.check("account_reauthorized was applied", status_of(reauthorized_id).await == "processed");
    finish("duplicates_and_reordering", started, system, load, report).await
}

async fn poison_messages(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 2).await?;
    // The three poison messages, and nothing else, end as dead letters (counted after the drain).
    let mut report = ScenarioReport { expected_dead: 3, ..ScenarioReport::default() };
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let connection = crate::bench::broker::connect(&system.config.amqp_url).await?;
    let channel = connection.create_channel().await?;
    let topology = system.topology();
    let poison: [Vec<u8>; 3] = [
        b"not json at all".to_vec(),
        br#"{"event":"mono.events.reauthorisation_required","data":"wrong shape"}"#.to_vec(),
        vec![0xAB; 1024 * 1024],
    ];
    let messages =
        poison.iter().map(|body| (body.clone(), lapin::BasicProperties::default().with_delivery_mode(2)));
    crate::bench::broker::prefill(&channel, "", &topology.work_queue(), messages).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let load = load.stop().await;

    // Each dead letter's reason, once the three are there (or 30 s have passed).
    let mut reasons: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        reasons = sqlx::query_scalar("SELECT reason FROM dead_letters").fetch_all(&system.pool).await?;
        if reasons.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.check(
        format!(
            "each of the 3 poison messages became a dead letter with its reason ({} letters)",
            reasons.len()
        ),
        reasons.len() == 3 && reasons.iter().all(|reason| reason.starts_with("invalid payload")),
    );
    let _ = connection.close(200, "done".into()).await;
    finish("poison_messages", started, system, load, report).await
}

/// Turns the system's database read-only (or back) and ends its sessions, as a failover that lands
/// the workers on a replica does.
async fn set_read_only(system: &System, read_only: bool) -> anyhow::Result<()> {
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", system.config.database_server)).await?;
    let setting = if read_only {
        "SET default_transaction_read_only = on"
    } else {
        "RESET default_transaction_read_only"
    };
    sqlx::query(&format!("ALTER DATABASE {} {setting}", system.database)).execute(&admin).await?;
    if read_only {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(&system.database)
            .execute(&admin)
            .await?;
    }
    admin.close().await;
    Ok(())
}

async fn database_read_only(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(3)).await;

    set_read_only(&system, true).await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    set_read_only(&system, false).await?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let load = load.stop().await;
    report.check(
        "the workers held deliveries while read-only",
        system.all_logs().contains("read-only transaction"),
    );
    let mut report = finish("database_read_only", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

async fn mono_key_revoked(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let config = with_worker_env(base, &[("MONO_CIRCUIT_OPEN_SECS", "1")]);
    let system = System::start(config, 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), reauth_kinds());
    tokio::time::sleep(Duration::from_secs(2)).await;

    set_mono(&system, 1.0, "401", 0).await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut refused = 0.0;
    let mut readyz_says_so = true;
    for (index, (_, port)) in system.workers.iter().enumerate() {
        let metrics = system.worker_metrics(index).await.unwrap_or_default();
        refused += metric_value(&metrics, "monohook_worker_mono_key_refused", &[]).unwrap_or(0.0);
        let body: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await?.json().await?;
        readyz_says_so &= body["mono_key"] == "refused";
    }
    report.check("every worker reports the refused key (metric)", refused == system.workers.len() as f64);
    report.check("every worker reports the refused key (/readyz)", readyz_says_so);
    tokio::time::sleep(Duration::from_secs(4)).await;
    set_mono(&system, 0.0, "401", 0).await?;

    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = load.stop().await;
    let mut report = finish("mono_key_revoked", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

async fn rabbitmq_restarted_5_times(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let _restore = RestoreServices;
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport { extra_tokens_per_account: 5, ..ScenarioReport::default() };
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(3)).await;

    for _ in 0..5 {
        services::stop_rabbitmq()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        services::start_rabbitmq()?;
        // Long enough for every process to reconnect and take deliveries again.
        let mut back = wait_ready(&format!("{}/readyz", system.ingest_url()), Duration::from_secs(30)).await;
        for (_, port) in &system.workers {
            back &= wait_ready(&format!("http://127.0.0.1:{port}/readyz"), Duration::from_secs(30)).await;
        }
        report.check("every process reconnects after each restart", back);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Each stop reached the workers: each lost its session and came back, five times.
    let reconnects: Vec<usize> = system
        .workers
        .iter()
        .map(|(worker, _)| worker.logs().matches("reconnected to RabbitMQ; consuming again").count())
        .collect();
    report.check(
        format!("every worker lost its session and reconnected after each stop ({reconnects:?} times)"),
        reconnects.iter().all(|count| *count >= 5),
    );
    let load = load.stop().await;
    let mut report = finish("rabbitmq_restarted_5_times", started, system, load, report).await?;
    report.check("no healthy delivery was dead-lettered as poison", report.dead_lettered == 0);
    Ok(report)
}

/// Makes every write to the journal fail with `sqlstate` (or stop failing, with `None`), as a
/// connection pooler's failover (`26000`, `42P05`: prepared statements gone) or an operator's
/// credential rotation (`42501`: a grant lost) makes the worker's statements fail.
async fn journal_writes_fail_with(system: &System, sqlstate: Option<&str>) -> anyhow::Result<()> {
    match sqlstate {
        Some(code) => {
            sqlx::query(&format!(
                "CREATE OR REPLACE FUNCTION chaos_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION 'chaos: injected %', '{code}' USING ERRCODE = '{code}'; END $$"
            ))
            .execute(&system.pool)
            .await?;
            sqlx::query(
                "CREATE OR REPLACE TRIGGER chaos_refuse BEFORE INSERT ON webhook_events
                 FOR EACH STATEMENT EXECUTE FUNCTION chaos_refuse()",
            )
            .execute(&system.pool)
            .await?;
        }
        None => {
            sqlx::query("DROP TRIGGER IF EXISTS chaos_refuse ON webhook_events")
                .execute(&system.pool)
                .await?;
        }
    }
    Ok(())
}

/// Database errors that are ours, not the events': prepared statements gone after a pooler failover
/// (`26000`, `42P05`), a lost grant (`42501`), and an administrator ending the worker's sessions
/// (`57P01`). Each lasts a few seconds under load; nothing may be dead-lettered.
async fn database_errors_of_ours(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(60, 40));
    tokio::time::sleep(Duration::from_secs(2)).await;

    for code in ["26000", "42P05", "42501"] {
        journal_writes_fail_with(&system, Some(code)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        journal_writes_fail_with(&system, None).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", system.config.database_server)).await?;
    let mut ended = 0;
    for _ in 0..3 {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name NOT LIKE 'chaos%'",
        )
        .bind(&system.database)
        .fetch_all(&admin)
        .await?;
        ended += killed.len();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    admin.close().await;
    report.check(format!("an administrator ended the database sessions ({ended})"), ended > 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = load.stop().await;
    let logs = system.all_logs();
    report.check(
        "the workers met the injected errors",
        ["26000", "42P05", "42501"].iter().all(|code| logs.contains(&format!("chaos: injected {code}"))),
    );
    let mut report = finish("database_errors_of_ours", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// A PostgreSQL outage longer than RabbitMQ's `consumer_timeout` (lowered to 10 s here; 30 min by
/// default), with a worker stopped while it holds deliveries: the workers park what they held past
/// `HOLD_MAX_SECS` (5 s here) instead of letting the broker close their channel and count the
/// returns, so nothing is dead-lettered by the broker or by the poison guard. The workers reach
/// PostgreSQL through a proxy the scenario cuts, so the outage is theirs alone.
async fn postgres_outage_past_consumer_timeout(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let _timeout = services::RestoreConsumerTimeout;
    services::set_consumer_timeout(Duration::from_secs(10))?;
    // A control that the lowered timeout is in force: without it the check that no worker's channel
    // was timed out would pass on a broker that kept its 30 minutes.
    let held = services::HeldDelivery::start(&base.amqp_url).await?;
    let proxy = shared::testing::TcpProxy::start(postgres_address(&base.database_server)?).await;
    let mut config = with_worker_env(base, &[("HOLD_MAX_SECS", "5"), ("SHUTDOWN_GRACE_SECS", "2")]);
    config.worker_database_server = Some(format!("postgres://postgres@{}", proxy.addr()));
    let mut system = System::start(config, 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(40, 40));
    tokio::time::sleep(Duration::from_secs(3)).await;

    proxy.cut();
    // RabbitMQ looks at held deliveries about once a minute: the outage outlasts that and the timeout.
    tokio::time::sleep(Duration::from_secs(45)).await;
    // A worker stopped while it holds deliveries it cannot settle.
    let stopping = &mut system.workers[0].0;
    stopping.terminate();
    let stopped = stopping.wait_exit(Duration::from_secs(20));
    report.check("a worker stopped cleanly during the outage", stopped.is_some_and(|s| s.success()));
    tokio::time::sleep(Duration::from_secs(30)).await;
    proxy.restore().await;
    system.start_worker().await?;

    tokio::time::sleep(Duration::from_secs(4)).await;
    let load = load.stop().await;
    let logs = system.all_logs();
    report.check(
        "the workers parked what they held past HOLD_MAX_SECS",
        logs.contains("held for HOLD_MAX_SECS")
            || logs.contains("the worker stopped while the database failed"),
    );
    report.check(
        "the broker never timed out a delivery (its channel stayed open)",
        !logs.contains("acknowledgement") && !logs.contains("consumer_timeout"),
    );
    report.check(
        "RabbitMQ's consumer_timeout of 10 s took effect (it closed a control channel holding a delivery)",
        held.timed_out_within(Duration::from_secs(45)).await,
    );
    held.close().await;
    let mut report = finish("postgres_outage_past_consumer_timeout", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// `127.0.0.1:5432` from `postgres://user@127.0.0.1:5432`.
fn postgres_address(server: &str) -> anyhow::Result<std::net::SocketAddr> {
    let authority = server.rsplit('@').next().unwrap_or(server).trim_start_matches("postgres://");
    let authority = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:5432") };
    let authority = authority.replace("localhost", "127.0.0.1");
    authority.parse().map_err(|e| anyhow::anyhow!("cannot proxy PostgreSQL at {authority}: {e}"))
}

/// What the app's clients saw of the api during a peak.
#[derive(Default)]
struct ApiPeak {
    /// Milliseconds of each `GET /v1/accounts/{id}`.
    reads: Vec<f64>,
    /// Milliseconds of each re-auth token answered from the store.
    stored: Vec<f64>,
    fresh: usize,
    /// Milliseconds of the slowest token that came fresh from Mono.
    fresh_slowest: f64,
    /// Answers other than 200, to reads and token requests.
    errors: usize,
    readyz_failures: usize,
    readyz_checks: usize,
}

fn p99(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 * 0.99).ceil() as usize).clamp(1, samples.len()) - 1]
}

/// Mono answering in 3 s while the app's customers sign in: 40 clients ask the api for re-auth
/// tokens (fresh from the slow Mono once a token is 5 s old, else stored), 10 read accounts, and a
/// probe checks `/readyz`, while webhooks keep coming. No read or stored token waits behind a Mono call (p99 far
/// below Mono's 3 s: under 1 s; the figure itself is printed) and the api stays ready: no Mono call
/// holds a connection of the pool that serves them.
async fn mono_slow_at_sign_in_peak(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let mut system = System::start(base.clone(), 2).await?;
    // Tokens count as stored for their first 5 s, then the api asks Mono for a fresh one.
    let api = system.start_api_with(&[("TOKEN_MIN_REMAINING_SECS", "595")]).await?;
    // The api's own Mono calls are its own: only the workers' tokens are held to the model.
    let mut report = ScenarioReport::default();
    // Accounts flagged once and left so (Mono repeats the body: duplicates), so that their tokens age.
    let plan = LoadPlan { per_second: 20, accounts: 30, kinds: vec![Kind::ReauthorisationRequired] };
    let load = Load::start(system.ingest_url(), plan.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    set_mono(&system, 0.0, "500", 3000).await?;

    let peak = std::sync::Arc::new(tokio::sync::Mutex::new(ApiPeak::default()));
    let until = Instant::now() + Duration::from_secs(10);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
    let mut clients = tokio::task::JoinSet::new();
    // 40 clients ask for tokens (fresh once a token is 5 s old), 10 read accounts.
    for client in 0..50u64 {
        let (http, api, peak) = (http.clone(), api.clone(), peak.clone());
        let accounts = plan.accounts;
        clients.spawn(async move {
            let mut n = client;
            let auth = format!("Bearer {}", crate::system::APP_API_KEY);
            while Instant::now() < until {
                let account = crate::bodies::account_id(1 + n % accounts);
                n += 7;
                let asked = Instant::now();
                if client < 10 {
                    let read = http
                        .get(format!("{api}/v1/accounts/{account}"))
                        .header("authorization", &auth)
                        .send()
                        .await;
                    let took = asked.elapsed().as_secs_f64() * 1000.0;
                    let mut peak = peak.lock().await;
                    match read {
                        Ok(r) if r.status().is_success() => peak.reads.push(took),
                        _ => peak.errors += 1,
                    }
                    continue;
                }
                let token = http
                    .post(format!("{api}/v1/accounts/{account}/reauth-token"))
                    .header("authorization", &auth)
                    .send()
                    .await;
                let took = asked.elapsed().as_secs_f64() * 1000.0;
                let body: Option<serde_json::Value> = match token {
                    Ok(r) if r.status().is_success() => r.json().await.ok(),
                    _ => None,
                };
                let mut peak = peak.lock().await;
                match body {
                    Some(body) if body["source"] == "stored" => peak.stored.push(took),
                    Some(_) => {
                        peak.fresh += 1;
                        peak.fresh_slowest = peak.fresh_slowest.max(took);
                    }
                    None => peak.errors += 1,
                }
            }
        });
    }
    while Instant::now() < until {
        let ready = ready(&format!("{api}/readyz")).await;
        let mut peak = peak.lock().await;
        peak.readyz_checks += 1;
        peak.readyz_failures += usize::from(!ready);
        drop(peak);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while clients.join_next().await.is_some() {}
    set_mono(&system, 0.0, "500", 0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = load.stop().await;

    let mut peak =
        std::sync::Arc::try_unwrap(peak).map_err(|_| anyhow::anyhow!("clients still running"))?.into_inner();
    let (reads, stored) = (peak.reads.len(), peak.stored.len());
    let (reads_p99, stored_p99) = (p99(&mut peak.reads), p99(&mut peak.stored));
    report.note(format!(
        "api during the peak: {reads} reads p99 {reads_p99:.1} ms, {stored} stored tokens p99 {stored_p99:.1} ms, \
         {} fresh tokens from the slow Mono, {} errors, /readyz failed {} of {} checks",
        peak.fresh, peak.errors, peak.readyz_failures, peak.readyz_checks
    ));
    report.check(
        format!("no read waited for Mono (p99 {reads_p99:.1} ms, under 1 s)"),
        reads > 0 && reads_p99 < 1000.0,
    );
    report.check(
        format!("no stored token waited for Mono (p99 {stored_p99:.1} ms, under 1 s)"),
        stored > 0 && stored_p99 < 1000.0,
    );
    report.check(
        format!(
            "fresh tokens came from the slow Mono ({}, the slowest after {:.0} ms)",
            peak.fresh, peak.fresh_slowest
        ),
        peak.fresh > 0 && peak.fresh_slowest >= 2_900.0,
    );
    report.check(format!("the api answered every request ({} errors)", peak.errors), peak.errors == 0);
    report.check("the api stayed ready throughout", peak.readyz_failures == 0 && peak.readyz_checks > 0);
    let mut report = finish("mono_slow_at_sign_in_peak", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// A memory alarm for 20 s under load: RabbitMQ blocks every connection that publishes. ingest must
/// call that busy, not broken: a 503 at once, `/readyz` saying so, and no move to a new connection
/// (each would be left behind, blocked, on a broker already short of memory). Mono is down through
/// the alarm, so the workers have parks to publish: their publishing connections are blocked, their
/// consuming connections never (the acks go on), and everything accepted is processed once.
async fn memory_alarm_under_load(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    const ALARM: Duration = Duration::from_secs(20);
    let started = Instant::now();
    let _restore = RestoreServices;
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Mono answers 500 after 3 s from just before the alarm: the re-auths then in Mono's hands fail
    // inside the alarm, and the workers park them (and, once their breakers open, every re-auth that
    // comes back from the retry tiers), so they have copies to publish while the broker blocks
    // publishers. (Mono down earlier opens the breakers early: the parked copies reach their last
    // attempt, and become dead letters, which publish nothing, before the alarm.)
    set_mono(&system, 1.0, "500", 3_000).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ingest_connections = services::connections_named("monohook-ingest")?;

    let alarm = services::raise_memory_alarm()?;
    let alarm_started = Instant::now();
    let mut raised = false;
    while !raised && alarm_started.elapsed() < Duration::from_secs(5) {
        raised = services::memory_alarm_in_force();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.check("the memory alarm was raised", raised);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let probe_started = Instant::now();
    let (status, _) =
        system.post(&crate::bodies::account_updated("0000000000000000000000cc", 1, 512)).await?;
    let probe_took = probe_started.elapsed();
    report.check("ingest answers 503 while the broker blocks it", status == 503);
    report.check(format!("and answers within 1 s ({probe_took:?})"), probe_took < Duration::from_secs(1));
    let readyz: serde_json::Value =
        reqwest::get(format!("{}/readyz", system.ingest_url())).await?.json().await.unwrap_or_default();
    report.check("ingest's /readyz says the broker blocks it", readyz["status"] == "broker_blocked");
    let mut most_connections = ingest_connections;
    let mut workers_ready = true;
    let (mut publishing_blocked, mut consuming_blocked) = (false, false);
    while alarm_started.elapsed() < ALARM {
        most_connections = most_connections.max(services::connections_named("monohook-ingest")?);
        for (_, port) in &system.workers {
            workers_ready &= ready(&format!("http://127.0.0.1:{port}/readyz")).await;
        }
        let blocked = |name| services::connection_states(name).map(|s| s.iter().any(|s| s == "blocked"));
        publishing_blocked |= blocked("monohook-worker-publish")?;
        consuming_blocked |= blocked("monohook-worker")?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(alarm);
    set_mono(&system, 0.0, "500", 0).await?;
    report.check(
        "a worker's publishing connection was blocked during the alarm (it had moves to publish)",
        publishing_blocked,
    );
    report.check("no worker's consuming connection was blocked: its acks went on", !consuming_blocked);
    report.check(
        format!(
            "ingest's connections stayed at {ingest_connections} through the alarm (most {most_connections})"
        ),
        most_connections <= ingest_connections,
    );
    report.check("the workers stayed ready (consuming) through the alarm", workers_ready);
    let cleared_at = Instant::now();
    let mut cleared = false;
    while !cleared && cleared_at.elapsed() < Duration::from_secs(10) {
        cleared = !services::memory_alarm_in_force();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.check("the memory alarm cleared", cleared);
    report.check(
        "ingest takes webhooks again by itself",
        wait_ready(&format!("{}/readyz", system.ingest_url()), Duration::from_secs(10)).await,
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let load = load.stop().await;
    report.check("webhooks got 503 during the alarm", load.statuses.get(&503).copied().unwrap_or(0) > 0);
    report.note(format!(
        "{} of {} posts answered 503 while blocked; slowest answer {:?}",
        load.statuses.get(&503).copied().unwrap_or(0),
        load.statuses.values().sum::<u64>(),
        load.slowest
    ));
    finish("memory_alarm_under_load", started, system, load, report).await
}

/// Retry tier 1 takes nothing (replaced, while it is empty, by a classic queue with max-length 0 and
/// reject-publish) while Mono is down, so every park is nacked. A worker must not wedge holding moves
/// that cannot succeed: each leaves its node within a minute (here the one node: a fresh session),
/// and once the tier takes copies again everything accepted is processed once. (A policy of
/// max-length 0 on the quorum tier is no such target: a quorum queue checks its limit lazily and
/// takes the odd copy once it has emptied.)
async fn republish_target_nacks(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    const MOVE_WITHIN: Duration = Duration::from_secs(60);
    let started = Instant::now();
    let _restore = RestoreServices;
    let system = System::start(base.clone(), 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Mono answers, so nothing waits in tier 1 while it is replaced.
    let topology = system.topology();
    let tier = topology.retry_queue(1);
    let connection = shared::amqp::connect(&base.amqp_url.clone().into(), "monohook-chaos").await?;
    let channel = connection.create_channel().await?;
    channel.queue_delete(tier.as_str().into(), Default::default()).await?;
    let mut refusing = lapin::types::FieldTable::default();
    refusing.insert("x-max-length".into(), lapin::types::AMQPValue::LongLongInt(0));
    refusing.insert("x-overflow".into(), lapin::types::AMQPValue::LongString("reject-publish".into()));
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(tier.as_str().into(), durable, refusing).await?;
    set_mono(&system, 1.0, "500", 0).await?;
    let fault = Instant::now();
    let mut moved_after = vec![None; system.workers.len()];
    while fault.elapsed() < MOVE_WITHIN && moved_after.iter().any(Option::is_none) {
        for (index, moved) in moved_after.iter_mut().enumerate() {
            let text = system.worker_metrics(index).await.unwrap_or_default();
            let moves =
                metric_value(&text, "monohook_worker_node_moves_total", &["reason=\"moves_failing\""]);
            if moved.is_none() && moves.unwrap_or(0.0) > 0.0 {
                *moved = Some(fault.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.check(
        format!("every worker left the nacking node within {MOVE_WITHIN:?} ({moved_after:?})"),
        moved_after.iter().all(Option::is_some),
    );
    // The refusing tier holds nothing: it goes, and the real one comes back.
    channel.queue_delete(tier.as_str().into(), Default::default()).await?;
    topology.declare_on(&connection).await?;
    let _ = connection.close(200, "done".into()).await;
    set_mono(&system, 0.0, "500", 0).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let load = load.stop().await;
    finish("republish_target_nacks", started, system, load, report).await
}

/// Copies of re-auths with no process or session killed: the broker's answers to ingest are held
/// 1.2 s now and then (past its 600 ms deadline), so some webhooks get 503 although the broker took
/// them, and the Mono-like load posts them again. Two workers with four batch slots each take the
/// copies side by side. Nothing dies mid-call, so the token bound is exact, account by account.
async fn copies_without_kills(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    const SPELLS: u32 = 6;
    let started = Instant::now();
    let proxy = shared::testing::TcpProxy::start("127.0.0.1:5672".parse()?).await;
    let proxied = base.amqp_url.replace("127.0.0.1:5672", &proxy.addr().to_string());
    anyhow::ensure!(proxied != base.amqp_url, "AMQP_URL must point at 127.0.0.1:5672 for this scenario");
    let mut config = with_worker_env(base, &[("BATCH_CONCURRENCY", "4")]);
    config.ingest_env.extend([
        ("AMQP_URL", proxied),
        ("PUBLISH_TIMEOUT_MS", "300".to_owned()),
        ("PUBLISH_DEADLINE_MS", "600".to_owned()),
    ]);
    let system = System::start(config, 2).await?;
    let mut report = ScenarioReport::default();
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..SPELLS {
        proxy.delay_answers(Duration::from_millis(1_200));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        proxy.delay_answers(Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let load = load.stop().await;
    let refused = load.statuses.iter().filter(|(status, _)| **status == 503).map(|(_, n)| n).sum::<u64>();
    report.check(format!("ingest answered 503 now and then ({refused} times)"), refused > 0);
    let copies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_events
         WHERE event = 'mono.events.reauthorisation_required' AND status = 'duplicate'",
    )
    .fetch_one(&system.pool)
    .await?;
    report.check(
        format!("copies of re-auths reached the workers ({copies} journaled as duplicates)"),
        copies > 0,
    );
    finish("copies_without_kills", started, system, load, report).await
}

/// The broker's answers to ingest (its confirms among them) slowed to 1 s, above the publish
/// timeout (800 ms) and below three of them, for 20 s under load: quorum commits on a slow disk, a
/// cluster across zones. Slow is not broken: every webhook is answered 200 by its first copy's late
/// confirm, ingest stays on its connection and ready, and none is published twice.
async fn broker_confirms_slowed(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    const SLOW: Duration = Duration::from_secs(20);
    let started = Instant::now();
    let proxy = shared::testing::TcpProxy::start("127.0.0.1:5672".parse()?).await;
    let proxied = base.amqp_url.replace("127.0.0.1:5672", &proxy.addr().to_string());
    anyhow::ensure!(proxied != base.amqp_url, "AMQP_URL must point at 127.0.0.1:5672 for this scenario");
    let mut config = base.clone();
    config.ingest_env.extend([("AMQP_URL", proxied), ("PUBLISH_DEADLINE_MS", "5000".to_owned())]);
    let system = System::start(config, 2).await?;
    let mut report = ScenarioReport::default();
    let sessions = proxy.connections_accepted();
    let load = Load::start(system.ingest_url(), all_kinds(100, 40));
    tokio::time::sleep(Duration::from_secs(4)).await;

    proxy.delay_answers(Duration::from_secs(1));
    let slowed = Instant::now();
    let mut stayed_ready = true;
    while slowed.elapsed() < SLOW {
        stayed_ready &= ready(&format!("{}/readyz", system.ingest_url())).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    proxy.delay_answers(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let load = load.stop().await;

    report.check(
        format!(
            "ingest stayed on its connection ({} opened, {sessions} before)",
            proxy.connections_accepted()
        ),
        proxy.connections_accepted() == sessions,
    );
    report.check("ingest stayed ready while the broker was slow", stayed_ready);
    let refused = load.statuses.iter().filter(|(status, _)| **status != 200).map(|(_, n)| n).sum::<u64>();
    report.check(
        format!("every post answered 200 at once ({refused} other answers, {} none)", load.no_answer),
        refused == 0 && load.no_answer == 0,
    );
    report.check(
        format!(
            "the slowest answer ({:?}) waited for the slowed broker, and came well within the 5 s deadline",
            load.slowest
        ),
        load.slowest >= Duration::from_secs(1) && load.slowest < Duration::from_millis(2_400),
    );
    // Every reason's series: a second copy of any webhook is one of them.
    let copies: f64 = system
        .ingest_metrics()
        .await?
        .lines()
        .filter(|line| line.starts_with("monohook_ingest_publish_retries_total"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    report.check(format!("no webhook was published twice ({} copies)", copies as u64), copies == 0.0);
    finish("broker_confirms_slowed", started, system, load, report).await
}

/// `monohook_worker_deliveries_in_flight` of worker `index` (0 if it cannot be read).
async fn worker_in_flight(system: &System, index: usize) -> f64 {
    let metrics = system.worker_metrics(index).await.unwrap_or_default();
    metric_value(&metrics, "monohook_worker_deliveries_in_flight", &[]).unwrap_or(0.0)
}
