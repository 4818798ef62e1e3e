//! HTTP load on a release ingest with `wrk`: 64 connections posting 1 KiB `account_updated` bodies
//! with varying accounts, through the real broker.

use anyhow::{Context, bail};
use std::path::Path;
use std::process::Command;

use super::BenchConfig;
use crate::bodies;
use crate::process::{Service, free_port, wait_until_ready};
use shared::topology::Topology;

const SECRET: &str = "bench-secret";

#[derive(Clone, Debug)]
pub struct LoadResult {
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
    pub peak_rss_kib: u64,
}

pub async fn run(config: &BenchConfig, log_dir: &Path) -> anyhow::Result<LoadResult> {
    let prefix = format!("bench.ingest.{}", uuid::Uuid::new_v4().simple());
    let port = free_port();
    let env = [
        ("AMQP_URL", config.amqp_url.clone()),
        ("QUEUE_PREFIX", prefix.clone()),
        ("MONO_WEBHOOK_SECRET", SECRET.to_owned()),
        ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
        ("LOG_FORMAT", "json".to_owned()),
        // Per-request logs are part of the cost being measured; keep them on as in production.
        ("RUST_LOG", std::env::var("BENCH_INGEST_LOG").unwrap_or_else(|_| "info".to_owned())),
    ];
    // BENCH_INGEST_ENV="HTTP_WORKERS=1,PUBLISH_CHANNELS=2" tries other settings.
    let extra = std::env::var("BENCH_INGEST_ENV").unwrap_or_default();
    let mut env = env.to_vec();
    for pair in extra.split(',').filter(|p| !p.is_empty()) {
        if let Some((key, value)) = pair.split_once('=') {
            env.push((Box::leak(key.to_owned().into_boxed_str()), value.to_owned()));
        }
    }
    let mut ingest = Service::spawn("bench-ingest", &config.binary("ingest"), &[], &env, log_dir)?;
    wait_until_ready(
        &mut ingest,
        &format!("http://127.0.0.1:{port}/readyz"),
        std::time::Duration::from_secs(20),
    )
    .await?;

    let script = log_dir.join("wrk-post.lua");
    std::fs::write(&script, wrk_script(config.body_bytes))?;
    let report = run_wrk(config, &script, &format!("http://127.0.0.1:{port}/webhooks/mono"))?;
    std::fs::write(log_dir.join("wrk.txt"), &report)?;
    let peak_rss_kib = ingest.peak_rss_kib().unwrap_or_default();
    ingest.terminate();
    ingest.wait_exit(std::time::Duration::from_secs(15));

    // The queues hold everything the load published; remove them.
    let connection = super::broker::connect(&config.amqp_url).await?;
    let channel = connection.create_channel().await?;
    let _ = Topology::new(&prefix, vec![], 10).delete(&channel).await;
    for tier in 1..=4 {
        super::broker::delete_queue(&channel, &format!("{prefix}.retry.{tier}")).await;
    }
    let _ = connection.close(200, "done".into()).await;

    parse_wrk(&report, peak_rss_kib)
}

/// Runs wrk with the benchmark's threads, connections and duration, `script` making the requests;
/// returns its report.
pub(crate) fn run_wrk(config: &BenchConfig, script: &Path, url: &str) -> anyhow::Result<String> {
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{}", config.connections),
            &format!("-d{}s", config.load_duration.as_secs()),
        ])
        .args(["--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("cannot run wrk (scripts/bench installs it)")?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A wrk script posting 1 KiB bodies, each for one of 10,000 accounts in turn.
fn wrk_script(body_bytes: usize) -> String {
    let placeholder = "ACCOUNTPLACEHOLDER012345";
    let template = String::from_utf8(bodies::account_updated(placeholder, 0, body_bytes)).expect("utf-8");
    let template = template.replace('%', "%%").replace(placeholder, "%s");
    format!(
        r#"counter = 0
template = [==[{template}]==]
headers = {{ ["mono-webhook-secret"] = "{SECRET}", ["content-type"] = "application/json" }}
request = function()
  counter = counter + 1
  local body = string.format(template, string.format("%024x", counter % 10000))
  return wrk.format("POST", nil, headers, body)
end
"#
    )
}

pub(crate) fn parse_wrk(report: &str, peak_rss_kib: u64) -> anyhow::Result<LoadResult> {
    let field = |prefix: &str| {
        report.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
    };
    let Some(rps) = field("Requests/sec:") else {
        bail!("unexpected wrk output:\n{report}");
    };
    let latency = |pct: &str| field(pct).map(|v| parse_duration_ms(&v)).unwrap_or(f64::NAN);
    // Socket errors (connect, read, write, timeout) are failed requests too.
    let socket_errors: u64 = field("Socket errors:")
        .map(|v| v.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    let non_2xx =
        field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0) + socket_errors;
    Ok(LoadResult {
        requests_per_sec: rps.parse()?,
        p50_ms: latency("50%"),
        p99_ms: latency("99%"),
        non_2xx,
        peak_rss_kib,
    })
}

/// `1.23ms`, `456.00us`, `1.02s` → milliseconds.
fn parse_duration_ms(value: &str) -> f64 {
    let value = value.trim();
    let (number, factor) = if let Some(n) = value.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (value, 1.0)
    };
    number.parse::<f64>().map(|n| n * factor).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let report = "  Latency Distribution\n     50%    1.50ms\n     99%  12.00ms\n  82000 requests in 10.00s\nRequests/sec:   8200.10\n";
        let result = parse_wrk(report, 10).unwrap();
        assert_eq!(result.requests_per_sec, 8200.10);
        assert_eq!(result.p50_ms, 1.5);
        assert_eq!(result.p99_ms, 12.0);
        assert_eq!(result.non_2xx, 0);
        assert_eq!(parse_duration_ms("850.00us"), 0.85);
    }
}
