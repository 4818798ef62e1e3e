//! From Mono's webhook to the app's notification: a steady trickle of re-auths (one account each,
//! not a saturating load: this measures the path, not a queue), timed from the moment each webhook
//! was posted to ingest to (a) the worker's commit of its effect and (b) the app (mono-sim) taking the
//! signed notification. (b) − (a) is what telling the app adds.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::BenchConfig;
use crate::system::{System, SystemConfig};

#[derive(Clone, Debug)]
pub struct NotifyResult {
    pub count: usize,
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
    pub told_p50_ms: f64,
    pub told_p99_ms: f64,
}

/// Re-auths posted per run, and the gap between two.
const REAUTHS: usize = 400;
const GAP: Duration = Duration::from_millis(25);

pub async fn run(config: &BenchConfig, log_dir: &Path) -> anyhow::Result<NotifyResult> {
    let system_config = SystemConfig {
        amqp_url: config.amqp_url.clone(),
        database_server: config.database_server.clone(),
        log_dir: log_dir.join(format!("notify-{}", uuid::Uuid::new_v4().simple())),
        ..SystemConfig::default()
    };
    let system = System::start(system_config, 1).await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut posted_ms: HashMap<String, i64> = HashMap::new();
    for n in 0..REAUTHS {
        let account = format!("{}{n:08}", &run[..16]);
        let at = chrono::Utc::now().timestamp_millis();
        let (status, _) = system.post(&crate::bodies::reauthorisation_required(&account)).await?;
        anyhow::ensure!(status == 200, "ingest answered {status}");
        posted_ms.insert(account, at);
        tokio::time::sleep(GAP).await;
    }
    let since = Instant::now();
    let mut told: Vec<(String, i64)> = Vec::new();
    while since.elapsed() < Duration::from_secs(60) {
        let app = system.app_notifications().await?;
        told = app["notifications"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["taken"].as_u64().unwrap_or(0) > 0)
            .filter_map(|n| Some((n["account_id"].as_str()?.to_owned(), n["first_taken_ms"].as_i64()?)))
            .collect();
        if told.len() >= REAUTHS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::ensure!(told.len() >= REAUTHS, "the app was told {} of {REAUTHS} re-auths", told.len());
    let committed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account_id, (extract(epoch FROM processed_at) * 1000)::int8 FROM webhook_events WHERE status = 'processed'",
    )
    .fetch_all(&system.pool)
    .await?;
    let since_post = |rows: &[(String, i64)]| -> Vec<f64> {
        rows.iter().filter_map(|(account, at)| Some((at - posted_ms.get(account)?) as f64)).collect()
    };
    let mut commit = since_post(&committed);
    let mut notified = since_post(&told);
    system.shut_down().await?;
    Ok(NotifyResult {
        count: notified.len(),
        commit_p50_ms: percentile(&mut commit, 0.50),
        commit_p99_ms: percentile(&mut commit, 0.99),
        told_p50_ms: percentile(&mut notified, 0.50),
        told_p99_ms: percentile(&mut notified, 0.99),
    })
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index]
}
