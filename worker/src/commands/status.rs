//! `worker status`: what an operator checks first.

use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::Value;
use sqlx::PgPool;
use std::time::Duration;

use super::dlq::list_age as age;
use shared::config::BrokerArgs;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A worker's METRICS_ADDR to ask for its Mono circuit state (repeatable).
    #[arg(long = "worker-url", default_value = "http://127.0.0.1:9090")]
    pub worker_urls: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct LastEvent {
    event: String,
    status: String,
    processed_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
}

pub async fn run(pool: &PgPool, broker: &BrokerArgs, args: &StatusArgs) -> anyhow::Result<()> {
    let topology = broker.topology();
    let connection = shared::amqp::connect(&broker.amqp_url, "monohook-status").await?;
    let channel = connection.create_channel().await?;
    let depths = topology.depths(&channel).await;
    let _ = connection.close(200, "done".into()).await;
    println!("{:<40} {:>9} {:>10}", "queue", "messages", "consumers");
    match depths {
        Ok(depths) => {
            for depth in depths {
                println!("{:<40} {:>9} {:>10}", depth.queue, depth.messages, depth.consumers);
            }
        }
        Err(error) => println!("queues not declared yet ({error})"),
    }

    let (dead, oldest_dead): (i64, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT count(*), min(processed_at) FROM webhook_events WHERE status = 'dead'")
            .fetch_one(pool)
            .await?;
    println!("\ndead letters in the journal   {dead} (oldest {})", age(oldest_dead));
    let last: Option<LastEvent> = sqlx::query_as(
        "SELECT event, status, processed_at, received_at FROM webhook_events WHERE status <> 'dead'
         ORDER BY processed_at DESC NULLS LAST LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    match last {
        Some(LastEvent { event, status, processed_at, received_at }) => {
            let lag = processed_at.map(|p| (p - received_at).num_milliseconds()).unwrap_or_default();
            println!(
                "last processed event          {event} ({status}) {} ago, {lag} ms after ingest received it",
                age(processed_at)
            );
        }
        None => println!("last processed event          none yet"),
    }
    let unfinished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letter_actions WHERE completed_at IS NULL")
            .fetch_one(pool)
            .await?;
    if unfinished > 0 {
        println!(
            "unfinished replays/purges     {unfinished} (run the same dlq command again to finish them)"
        );
    }

    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?;
    for url in &args.worker_urls {
        let answer = http.get(format!("{}/readyz", url.trim_end_matches('/'))).send().await;
        match answer {
            Ok(response) => {
                let body: Value = response.json().await.unwrap_or_default();
                println!(
                    "worker {url:<24} {} (Mono circuit {}, database {}, broker {})",
                    body["status"].as_str().unwrap_or("?"),
                    body["mono_circuit"].as_str().unwrap_or("?"),
                    body["database"].as_str().unwrap_or("?"),
                    body["broker"].as_str().unwrap_or("?"),
                );
            }
            Err(_) => println!("worker {url:<24} not reachable"),
        }
    }
    Ok(())
}
