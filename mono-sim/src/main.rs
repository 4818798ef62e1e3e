//! `mono-sim`: a local stand-in for Mono, for demos, chaos runs and benchmarks.
//!
//! `serve` answers Mono's re-authorise endpoint with knobs for latency and failures (changeable at
//! run time through `/_sim/config`); `send` and `story` post Mono-shaped webhooks to an ingest.

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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve `POST /accounts/{id}/reauthorise` like Mono.
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .try_init();
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
