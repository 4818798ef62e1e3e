use tokio_util::sync::CancellationToken;

use ingest::config::IngestConfig;
use ingest::startup::Application;
use shared::telemetry;

#[actix_web::main]
async fn main() {
    let config: IngestConfig = shared::config::parse_or_exit();
    if let Err(error) = run(config).await {
        // One line naming what is wrong, for an operator reading a crash loop.
        eprintln!("ingest: {error:#}");
        std::process::exit(1);
    }
}

async fn run(config: IngestConfig) -> anyhow::Result<()> {
    // Kept to the end of `run`: dropping it flushes the spans still buffered.
    let _telemetry = telemetry::init(&config.telemetry, "ingest")?;
    let cancel = CancellationToken::new();
    let application = Application::build(config, cancel.clone()).await?;
    tokio::spawn(shared::shutdown::cancel_on_signal(cancel));
    application.run_until_stopped().await
}
