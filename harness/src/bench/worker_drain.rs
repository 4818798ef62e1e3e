//! One release worker draining a pre-filled work queue into PostgreSQL, timed from its start until
//! every event is journaled and the queue is empty.

use anyhow::bail;
use lapin::BasicProperties;
use sqlx::PgPool;
use std::path::Path;
use std::time::{Duration, Instant};

use super::BenchConfig;
use crate::bodies;
use crate::process::{Service, free_port, wait_until_ready};
use shared::delivery::DeliveryMeta;
use shared::topology::Topology;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `account_updated` events spread over accounts: pure database work.
    AccountUpdates,
    /// `reauthorisation_required` for distinct accounts, Mono answering after a delay.
    Reauths,
}

#[derive(Clone, Debug)]
pub struct DrainResult {
    pub events_per_sec: f64,
    pub peak_rss_kib: u64,
}

const DATABASE: &str = "monohook_bench";
const MONO_KEY: &str = "bench_sk";

pub async fn run(config: &BenchConfig, workload: Workload, log_dir: &Path) -> anyhow::Result<DrainResult> {
    let prefix = format!("bench.worker.{}", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(&prefix, [30, 300, 1800, 7200].map(Duration::from_secs).to_vec(), 10);
    let database_url = format!("{}/{DATABASE}", config.database_server);
    recreate_database(config, log_dir).await?;

    let connection = super::broker::connect(&config.amqp_url).await?;
    topology.declare_on(&connection).await?;
    let channel = connection.create_channel().await?;
    let (events, prefetch) = match workload {
        Workload::AccountUpdates => (config.drain_events, config.prefetch),
        Workload::Reauths => (config.reauth_events, config.reauth_prefetch),
    };
    let messages = (0..events).map(|n| {
        let body = match workload {
            Workload::AccountUpdates => {
                bodies::account_updated(&bodies::account_id(n % config.drain_accounts), n, config.body_bytes)
            }
            Workload::Reauths => bodies::reauthorisation_required(&bodies::account_id(n)),
        };
        let properties: BasicProperties = DeliveryMeta::stamp(&body).to_properties();
        (body, properties)
    });
    let routing_key = match workload {
        Workload::AccountUpdates => "mono.events.account_updated",
        Workload::Reauths => "mono.events.reauthorisation_required",
    };
    let fill = connection.create_channel().await?;
    super::broker::prefill(&fill, topology.exchange(), routing_key, messages).await?;

    let mut mono = None;
    let mut env = vec![
        ("DATABASE_URL", database_url.clone()),
        ("AMQP_URL", config.amqp_url.clone()),
        ("QUEUE_PREFIX", prefix.clone()),
        ("MONO_SECRET_KEY", MONO_KEY.to_owned()),
        ("PREFETCH", prefetch.to_string()),
        ("LOG_FORMAT", "json".to_owned()),
        // Per-delivery logs are part of the cost being measured; keep them on as in production.
        ("RUST_LOG", std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "info".to_owned())),
        ("METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
    ];
    if workload == Workload::Reauths {
        let port = free_port();
        let sim_env =
            [("SIM_SECRET_KEY", MONO_KEY.to_owned()), ("SIM_LATENCY_MS", config.mono_latency_ms.to_string())];
        let mut sim = Service::spawn(
            "bench-mono-sim",
            "mono-sim",
            &["serve", "--listen-addr", &format!("127.0.0.1:{port}")],
            &sim_env,
            log_dir,
        )?;
        wait_until_ready(&mut sim, &format!("http://127.0.0.1:{port}/_sim/config"), Duration::from_secs(10))
            .await?;
        env.push(("MONO_API_URL", format!("http://127.0.0.1:{port}")));
        mono = Some(sim);
    }

    let pool = PgPool::connect(&database_url).await?;
    let started = Instant::now();
    let mut worker = Service::spawn("bench-worker", &config.binary("worker"), &[], &env, log_dir)?;
    let work = topology.work_queue();
    // Watch the queue (cheap) while it drains; count journal rows only once it looks empty, so the
    // measurement does not load the database it measures.
    loop {
        let ready = depth(&channel, &topology, &work).await?;
        if ready == 0 {
            let journaled: i64 =
                sqlx::query_scalar("SELECT count(*) FROM webhook_events").fetch_one(&pool).await?;
            if journaled as u64 >= events {
                break;
            }
        }
        if !worker.is_running() {
            bail!("the worker exited during the drain; see {}", worker.log_path().display());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the drain did not finish in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(if ready == 0 { 20 } else { 50 })).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let processed: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE status = 'processed'")
        .fetch_one(&pool)
        .await?;
    if processed as u64 != events {
        bail!("{processed} of {events} events were processed; see {}", worker.log_path().display());
    }
    let peak_rss_kib = worker.peak_rss_kib().unwrap_or_default();
    worker.terminate();
    worker.wait_exit(Duration::from_secs(30));
    drop(mono);
    pool.close().await;
    let _ = topology.delete(&channel).await;
    let _ = connection.close(200, "done".into()).await;
    Ok(DrainResult { events_per_sec: events as f64 / elapsed, peak_rss_kib })
}

async fn depth(channel: &lapin::Channel, topology: &Topology, queue: &str) -> anyhow::Result<u32> {
    let depths = topology.depths(channel).await?;
    Ok(depths.into_iter().find(|d| d.queue == queue).map_or(0, |d| d.messages))
}

/// A fresh, migrated benchmark database (migrations are not part of the timed drain).
async fn recreate_database(config: &BenchConfig, log_dir: &Path) -> anyhow::Result<()> {
    let admin = PgPool::connect(&format!("{}/postgres", config.database_server)).await?;
    sqlx::query("DROP DATABASE IF EXISTS monohook_bench WITH (FORCE)").execute(&admin).await?;
    admin.close().await;
    let env = [
        ("DATABASE_URL", format!("{}/{DATABASE}", config.database_server)),
        ("LOG_FORMAT", "json".to_owned()),
    ];
    let mut migrate = Service::spawn("bench-migrate", "worker", &["migrate"], &env, log_dir)?;
    match migrate.wait_exit(Duration::from_secs(60)) {
        Some(status) if status.success() => Ok(()),
        _ => bail!("worker migrate failed; see {}", migrate.log_path().display()),
    }
}
