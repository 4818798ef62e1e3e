//! `bench-journal`: the journal at 1 and 10 million rows (its queries, its batch commit, one
//! retention step of each kind, its size), written to `bench/results/<date>-journal.md`. Run it
//! with `./scripts/bench-journal`, which builds the release binaries first. PostgreSQL only.

use clap::Parser;
use std::path::PathBuf;

use harness::bench::journal::{self, JournalConfig};
use harness::bench::{journal_report, report};

#[derive(Debug, Parser)]
#[command(name = "bench-journal", about = "Benchmark the journal at 1 and 10 million rows")]
struct Args {
    /// Journal sizes measured, smallest first (retention is measured at the last).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000u64, 10_000_000])]
    rows: Vec<u64>,
    /// Days the largest size's rows are spread over (a smaller size's over as many fewer): more
    /// than the retention plus a month, so a month has expired.
    #[arg(long, default_value_t = 150)]
    days: u32,
    /// Batches timed at each size.
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Row-delete steps timed.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// PostgreSQL server URL without a database name.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    database_server: String,
    /// Where to write the report.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = JournalConfig {
        database_server: args.database_server,
        sizes: args.rows,
        days: args.days,
        samples: args.samples,
        // The worker's defaults: BATCH_MAX, RETENTION_STEP_ROWS, JOURNAL_RETENTION_DAYS, DEDUP_WINDOW_SECS.
        batch: 128,
        step_rows: 5_000,
        steps: args.steps,
        retention_days: 90,
        dedup_window_secs: 600,
    };
    let started = std::time::Instant::now();
    let result = journal::run(&config).await?;
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", config.database_server)).await?;
    let postgres_version: String = sqlx::query_scalar("SELECT version()").fetch_one(&admin).await?;
    let markdown = journal_report::render(
        &config,
        &result,
        postgres_version.split(" on ").next().unwrap_or_default(),
        &report::machine(),
    );
    std::fs::create_dir_all(&args.out_dir)?;
    let path = args.out_dir.join(format!("{}-journal.md", chrono::Utc::now().format("%Y-%m-%d")));
    std::fs::write(&path, &markdown)?;
    println!("{markdown}\nwritten to {} in {:.0} s", path.display(), started.elapsed().as_secs_f64());
    Ok(())
}
