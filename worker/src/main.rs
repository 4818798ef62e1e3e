use tokio_util::sync::CancellationToken;

use shared::telemetry;
use worker::commands;
use worker::config::{Cli, Command};
use worker::db;
use worker::startup::Worker;

#[tokio::main]
async fn main() {
    let cli: Cli = shared::config::parse_or_exit();
    if let Err(error) = run(cli).await {
        // One line naming what is wrong, for an operator reading a crash loop.
        eprintln!("worker: {error:#}");
        // A usage error exits 2 like clap's own; anything else went wrong (1).
        let usage = error.downcast_ref::<commands::output::UsageError>().is_some();
        std::process::exit(if usage { commands::output::USAGE } else { 1 });
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Kept to the end of `run`: dropping it flushes the spans still buffered.
    let _telemetry = telemetry::init(&cli.telemetry, "worker")?;
    match cli.command {
        Some(Command::Migrate) => {
            db::connect_and_migrate(&cli.database).await?;
            tracing::info!("migrations are up to date");
            Ok(())
        }
        Some(Command::Account(args)) => {
            let pool = db::connect_current(&cli.database).await?;
            commands::account::run(&pool, &args).await
        }
        Some(Command::Dlq(command)) => {
            let pool = db::connect_current(&cli.database).await?;
            commands::dlq::run(command, &pool, &cli.broker, cli.run.dedup_window()).await
        }
        Some(Command::Status(args)) => {
            let pool =
                tokio::time::timeout(std::time::Duration::from_secs(20), db::connect_current(&cli.database))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("PostgreSQL did not answer within 20 s")));
            commands::status::run(pool, &cli.broker, &args).await
        }
        None => {
            let pool = db::connect_and_migrate(&cli.database).await?;
            let cancel = CancellationToken::new();
            let worker = Worker::build(&cli.broker, &cli.run, pool.clone()).await?;
            tokio::spawn(shared::shutdown::cancel_on_signal(cancel.clone()));
            let ran = worker.run(cancel).await;
            // Closing tells PostgreSQL goodbye instead of leaving it to notice dropped sockets.
            pool.close().await;
            ran
        }
    }
}
