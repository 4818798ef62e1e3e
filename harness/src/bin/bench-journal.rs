//! `bench-journal`: the journal at 1 and 10 million rows (its queries, its batch commit, one
//! retention step of each kind, its size), written to `bench/results/<date>-journal.md`. Run it
//! with `./scripts/bench-journal`, which builds the release binaries first. PostgreSQL only.

use clap::Parser;
use std::path::PathBuf;

use harness::bench::journal::{self, JournalConfig, Size};
use harness::bench::{journal_report, report};

#[derive(Debug, Parser)]
#[command(name = "bench-journal", about = "Benchmark the journal at 1 and 10 million rows")]
struct Args {
    /// Journal sizes measured, as ROWS@DAYS (rows spread over that many days before now):
    /// 1 M over 15 days and 10 M over 150 is the same traffic ten times longer; 1 M and 10 M over
    /// 150 days, ten times the traffic. Retention is measured at the last, whose days must pass
    /// the retention (90) by a month.
    #[arg(long, value_delimiter = ',', default_value = "1000000@15,1000000@150,10000000@150")]
    sizes: Vec<Size>,
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
        sizes: args.sizes,
        samples: args.samples,
        // The worker's defaults: BATCH_MAX, RETENTION_STEP_ROWS, JOURNAL_RETENTION_DAYS, DEDUP_WINDOW_SECS.
        batch: 128,
        step_rows: 5_000,
        steps: args.steps,
        retention_days: 90,
        dedup_window_secs: 600,
    };
    let started = std::time::Instant::now();
    let result = journal::run(&config).await;
    journal::drop_databases(&config).await?;
    let result = result?;
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
