//! `bench`: measures ingest and the worker against RabbitMQ's own ceiling on this machine and writes
//! the report to `bench/results/<date>.md`. Run it with `./scripts/bench`, which builds the release
//! binaries first.

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

use harness::bench::broker::PublishShape;
use harness::bench::report::{self, Runs};
use harness::bench::worker_drain::Workload;
use harness::bench::{BenchConfig, api_load, broker, ingest_load, notify_latency, worker_drain};

#[derive(Debug, Parser)]
#[command(name = "bench", about = "Benchmark monohook against the broker's own ceiling")]
struct Args {
    /// Runs per measurement; each figure is their median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// HTTP connections, and publishes in flight of the reference.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of HTTP load per run.
    #[arg(long, default_value_t = 10)]
    load_secs: u64,
    /// Events the worker drains per run (also the consume reference's messages).
    #[arg(long, default_value_t = 100_000)]
    drain_events: u64,
    /// Accounts the drained events are spread over.
    #[arg(long, default_value_t = 10_000)]
    drain_accounts: u64,
    /// Re-auth events per run.
    #[arg(long, default_value_t = 5_000)]
    reauth_events: u64,
    /// Mono's answer delay in the re-auth phase, in ms.
    #[arg(long, default_value_t = 100)]
    mono_latency_ms: u64,
    /// The worker's PREFETCH in the drain (and the consume reference's prefetch).
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// The worker's PREFETCH in the re-auth phase.
    #[arg(long, default_value_t = 256)]
    reauth_prefetch: u16,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// PostgreSQL server URL without a database name.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    database_server: String,
    /// Only these phases (for investigating one figure; the report needs all of them).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// A baseline build's binaries (e.g. the previous release's `target/release`): the ingest and
    /// drain phases also run with them, interleaved in each run, and the report compares the two.
    #[arg(long, value_name = "DIR")]
    baseline_bin_dir: Option<PathBuf>,
    /// Where to write the report.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = BenchConfig {
        runs: args.runs,
        connections: args.connections,
        load_duration: Duration::from_secs(args.load_secs),
        body_bytes: 1024,
        drain_events: args.drain_events,
        drain_accounts: args.drain_accounts,
        reauth_events: args.reauth_events,
        mono_latency_ms: args.mono_latency_ms,
        prefetch: args.prefetch,
        reauth_prefetch: args.reauth_prefetch,
        amqp_url: args.amqp_url,
        database_server: args.database_server,
        binaries: None,
    };
    let baseline = args.baseline_bin_dir.map(|dir| BenchConfig { binaries: Some(dir), ..config.clone() });
    let log_dir = PathBuf::from("target/bench-logs");
    let mut runs = Runs::default();
    let wanted = |phase: &str| args.only.is_empty() || args.only.iter().any(|p| p == phase);
    for run in 1..=config.runs {
        if wanted("publish") {
            eprintln!("run {run}/{}: raw publish references", config.runs);
            for (shape, results) in [
                (PublishShape::Bare, &mut runs.publish_ref),
                (PublishShape::LikeIngest, &mut runs.publish_like_ingest),
            ] {
                results.push(
                    broker::publish_reference(
                        &config.amqp_url,
                        config.connections,
                        4,
                        config.load_duration,
                        config.body_bytes,
                        shape,
                    )
                    .await?,
                );
            }
        }
        if wanted("ingest") {
            eprintln!("run {run}/{}: ingest under HTTP load", config.runs);
            // With a baseline, who goes first alternates from run to run, so neither always gets
            // the fresher broker.
            let baseline_first = run % 2 == 0;
            if let Some(baseline) = baseline.as_ref().filter(|_| baseline_first) {
                eprintln!("run {run}/{}: the baseline's ingest under HTTP load", config.runs);
                runs.ingest_baseline.push(ingest_load::run(baseline, &log_dir).await?);
            }
            runs.ingest.push(ingest_load::run(&config, &log_dir).await?);
            if let Some(baseline) = baseline.as_ref().filter(|_| !baseline_first) {
                eprintln!("run {run}/{}: the baseline's ingest under HTTP load", config.runs);
                runs.ingest_baseline.push(ingest_load::run(baseline, &log_dir).await?);
            }
        }
        if wanted("consume") {
            eprintln!("run {run}/{}: raw consume reference", config.runs);
            runs.consume_ref.push(
                broker::consume_reference(
                    &config.amqp_url,
                    config.drain_events,
                    config.prefetch,
                    config.body_bytes,
                )
                .await?,
            );
        }
        if wanted("drain") {
            eprintln!("run {run}/{}: worker drain", config.runs);
            let baseline_first = run % 2 == 0;
            if let Some(baseline) = baseline.as_ref().filter(|_| baseline_first) {
                eprintln!("run {run}/{}: the baseline's worker drain", config.runs);
                runs.drain_baseline
                    .push(worker_drain::run(baseline, Workload::AccountUpdates, &log_dir).await?);
            }
            runs.drain.push(worker_drain::run(&config, Workload::AccountUpdates, &log_dir).await?);
            if let Some(baseline) = baseline.as_ref().filter(|_| !baseline_first) {
                eprintln!("run {run}/{}: the baseline's worker drain", config.runs);
                runs.drain_baseline
                    .push(worker_drain::run(baseline, Workload::AccountUpdates, &log_dir).await?);
            }
        }
        if wanted("reauth") {
            eprintln!("run {run}/{}: worker re-auth", config.runs);
            runs.reauth.push(worker_drain::run(&config, Workload::Reauths, &log_dir).await?);
        }
        if wanted("api") {
            eprintln!("run {run}/{}: api under HTTP load, against a bare actix + sqlx read", config.runs);
            runs.api.push(api_load::run(&config, &log_dir).await?);
        }
        if wanted("notify") {
            eprintln!("run {run}/{}: from Mono's webhook to the app's notification", config.runs);
            runs.notify.push(notify_latency::run(&config, &log_dir).await?);
        }
    }
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", config.database_server)).await?;
    let postgres_version: String = sqlx::query_scalar("SELECT version()").fetch_one(&admin).await?;
    let markdown = report::render(&config, &runs, postgres_version.split(" on ").next().unwrap_or_default());
    std::fs::create_dir_all(&args.out_dir)?;
    let path = args.out_dir.join(format!("{}.md", chrono::Utc::now().format("%Y-%m-%d")));
    std::fs::write(&path, &markdown)?;
    println!("{markdown}\nwritten to {}", path.display());
    Ok(())
}
