//! Sending Mono-shaped webhooks to an ingest, with the `mono-webhook-secret` header Mono sends.

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct Target {
    /// The ingest's webhook URL.
    #[arg(long, env = "INGEST_URL", default_value = "http://127.0.0.1:8080/webhooks/mono")]
    pub ingest_url: String,
    /// The secret to send as `mono-webhook-secret`.
    #[arg(long, env = "MONO_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: String,
}

#[derive(Args, Clone, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub target: Target,
    /// Which event to send.
    #[arg(long, value_enum)]
    pub event: Event,
    /// The Mono account id the event is about.
    #[arg(long)]
    pub account: String,
}

#[derive(Args, Clone, Debug)]
pub struct StoryArgs {
    #[command(flatten)]
    pub target: Target,
    /// The Mono account id the story is about.
    #[arg(long)]
    pub account: String,
    /// Pause between the events, in ms.
    #[arg(long, default_value_t = 1000)]
    pub pause_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Event {
    ReauthorisationRequired,
    AccountReauthorized,
    AccountUpdated,
    AccountConnected,
    AccountUnlinked,
    SyncFailed,
}

impl Event {
    /// A body shaped like Mono's for this event (see `tests/fixtures/`).
    pub fn body(self, account: &str) -> Value {
        match self {
            Self::ReauthorisationRequired => {
                json!({ "event": "mono.events.reauthorisation_required", "data": { "account": { "_id": account } } })
            }
            Self::AccountReauthorized => {
                json!({ "event": "mono.events.account_reauthorized", "data": { "account": { "_id": account } } })
            }
            Self::AccountUpdated => json!({
                "event": "mono.events.account_updated",
                "data": {
                    "meta": { "data_status": "AVAILABLE", "auth_method": "internet_banking" },
                    "account": {
                        "_id": account,
                        "name": "Simulated Customer",
                        "accountNumber": "0000000000",
                        "currency": "NGN",
                        "balance": 100000,
                        "institution": { "name": "Sim Bank", "bankCode": "000", "type": "PERSONAL_BANKING" },
                        "updated_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    }
                }
            }),
            Self::AccountConnected => {
                json!({ "event": "mono.events.account_connected", "data": { "id": account, "customer": "sim-customer", "meta": {} } })
            }
            Self::AccountUnlinked => {
                json!({ "event": "mono.events.account_unlinked", "data": { "account": { "id": account } } })
            }
            Self::SyncFailed => json!({
                "event": "mono.events.sync_failed",
                "data": { "account": { "_id": account }, "meta": { "data_status": "FAILED" } }
            }),
        }
    }
}

pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    post(&reqwest::Client::new(), &args.target, args.event, &args.account).await
}

pub async fn story(args: StoryArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let steps = [Event::ReauthorisationRequired, Event::AccountReauthorized, Event::AccountUpdated];
    for (index, event) in steps.into_iter().enumerate() {
        if index > 0 {
            tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
        }
        post(&http, &args.target, event, &args.account).await?;
    }
    Ok(())
}

pub async fn post(
    http: &reqwest::Client,
    target: &Target,
    event: Event,
    account: &str,
) -> anyhow::Result<()> {
    let body = event.body(account);
    let name = body["event"].as_str().unwrap_or_default().to_owned();
    let response = http
        .post(&target.ingest_url)
        .header("mono-webhook-secret", &target.secret)
        .json(&body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach ingest at {}: {e}", target.ingest_url))?;
    let status = response.status();
    let answer = response.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("ingest answered {status} to {name}: {answer}");
    }
    println!("sent {name} for {account}: {status} {answer}");
    Ok(())
}
