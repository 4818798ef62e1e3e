//! `mono-sim`: a local stand-in for Mono, for demos, chaos runs and benchmarks.
//!
//! `serve` answers Mono's re-authorise endpoint and its v2 re-auth link (`initiate`, and the link
//! itself, which plays the customer finishing) with knobs for latency and failures (changeable at
//! run time through `/_sim/config`); `send` and `story` post Mono-shaped webhooks to an ingest.

mod app;
mod links;
mod server;
mod webhooks;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mono-sim",
    version,
    about = "A local stand-in for Mono: serves the re-authorise endpoint and sends Mono-shaped webhooks."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    #[command(flatten)]
    telemetry: shared::config::TelemetryArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve `POST /accounts/{id}/reauthorise` and `POST /v2/accounts/initiate` like Mono, and the
    /// links it hands out (`GET /reauth/{token}`: the customer finishes re-authorising).
    Serve(server::ServeArgs),
    /// Send one Mono-shaped webhook to an ingest.
    Send(webhooks::SendArgs),
    /// Send the whole re-auth story for one account: reauthorisation_required, account_reauthorized,
    /// account_updated.
    Story(webhooks::StoryArgs),
}

#[actix_web::main]
async fn main() {
    let cli = Cli::parse();
    // LOG_FORMAT and RUST_LOG as in the other binaries: JSON lines for a log collector.
    let _telemetry = match shared::telemetry::init(&cli.telemetry, "mono-sim") {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("mono-sim: {:#}", anyhow::Error::from(error));
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => server::serve(args).await,
        Command::Send(args) => webhooks::send(args).await,
        Command::Story(args) => webhooks::story(args).await,
    };
    if let Err(error) = result {
        eprintln!("mono-sim: {error:#}");
        std::process::exit(1);
    }
}
