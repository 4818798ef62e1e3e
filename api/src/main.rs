use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::postgres::PgPoolOptions;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use api::config::ApiConfig;
use api::startup::Application;
use shared::redact::redact_url;
use shared::telemetry;

#[actix_web::main]
async fn main() {
    let config: ApiConfig = shared::config::parse_or_exit();
    if let Err(error) = run(config).await {
        // One line naming what is wrong, for an operator reading a crash loop.
        eprintln!("api: {error:#}");
        std::process::exit(1);
    }
}

async fn run(config: ApiConfig) -> anyhow::Result<()> {
    // Kept to the end of `run`: dropping it flushes the spans still buffered.
    let _telemetry = telemetry::init(&config.telemetry, "api")?;
    let url = config.database.database_url.expose_secret();
    let pool = PgPoolOptions::new()
        .max_connections(config.database.db_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact_url(url)))?;
    let cancel = CancellationToken::new();
    let application = Application::build(config, pool, cancel.clone()).await?;
    tokio::spawn(shared::shutdown::cancel_on_signal(cancel));
    application.run_until_stopped().await
}
