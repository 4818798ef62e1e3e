//! HTTP load on a release api with `wrk`: `GET /v1/accounts/{id}` and `POST .../reauth-token` (every
//! account holding a stored token that still works, so no call reaches Mono) over 10,000 accounts,
//! against a bare actix-web + sqlx single-row read (`bench-ref-api`) measured in the same run.

use anyhow::bail;
use sqlx::PgPool;
use std::path::Path;
use std::time::Duration;

use super::BenchConfig;
use super::ingest_load::{LoadResult, parse_wrk, run_wrk};
use crate::process::{Service, free_port, wait_until_ready};

const DATABASE: &str = "monohook_bench_api";
const KEY: &str = "bench-app-key-0123456789";
const ACCOUNTS: u64 = 10_000;

/// One run's three measurements.
#[derive(Clone, Debug)]
pub struct ApiResult {
    pub reference: LoadResult,
    pub get: LoadResult,
    pub post_stored: LoadResult,
}

pub async fn run(config: &BenchConfig, log_dir: &Path) -> anyhow::Result<ApiResult> {
    prepare_database(config, log_dir).await?;
    let database_url = format!("{}/{DATABASE}", config.database_server);

    let ref_port = free_port();
    let env = [("DATABASE_URL", database_url.clone()), ("LISTEN_ADDR", format!("127.0.0.1:{ref_port}"))];
    let mut reference = Service::spawn("bench-ref-api", "bench-ref-api", &[], &env, log_dir)?;
    let api_port = free_port();
    let env = [
        ("DATABASE_URL", database_url),
        ("APP_API_KEYS", format!("bench:{KEY}")),
        ("MONO_SECRET_KEY", "unused".to_owned()),
        ("MONO_API_URL", "http://127.0.0.1:9".to_owned()),
        ("LISTEN_ADDR", format!("127.0.0.1:{api_port}")),
        ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
        // Per-request logs are part of the cost being measured; keep them on as in production.
        ("RUST_LOG", std::env::var("BENCH_API_LOG").unwrap_or_else(|_| "info".to_owned())),
    ];
    let mut api = Service::spawn("bench-api", "api", &[], &env, log_dir)?;
    wait_until_ready(&mut api, &format!("http://127.0.0.1:{api_port}/readyz"), Duration::from_secs(20))
        .await?;
    let ready = format!("http://127.0.0.1:{ref_port}/ref/{:024x}", 1);
    wait_until_ready(&mut reference, &ready, Duration::from_secs(20)).await?;

    let reference_load = wrk(config, log_dir, "GET", &format!("http://127.0.0.1:{ref_port}"), "/ref/%024x")?;
    let get = wrk(config, log_dir, "GET", &format!("http://127.0.0.1:{api_port}"), "/v1/accounts/%024x")?;
    let post_stored = wrk(
        config,
        log_dir,
        "POST",
        &format!("http://127.0.0.1:{api_port}"),
        "/v1/accounts/%024x/reauth-token",
    )?;
    let rss = api.peak_rss_kib().unwrap_or_default();
    api.terminate();
    api.wait_exit(Duration::from_secs(15));
    reference.kill();
    Ok(ApiResult {
        reference: reference_load,
        get: LoadResult { peak_rss_kib: rss, ..get },
        post_stored: LoadResult { peak_rss_kib: rss, ..post_stored },
    })
}

/// A migrated database with 10,000 flagged accounts, each holding a token that works 10 minutes.
async fn prepare_database(config: &BenchConfig, log_dir: &Path) -> anyhow::Result<()> {
    let admin = PgPool::connect(&format!("{}/postgres", config.database_server)).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")).execute(&admin).await?;
    admin.close().await;
    let env =
        [("DATABASE_URL", format!("{}/{DATABASE}", config.database_server)), ("LOG_FORMAT", "json".into())];
    let mut migrate = Service::spawn("bench-api-migrate", "worker", &["migrate"], &env, log_dir)?;
    match migrate.wait_exit(Duration::from_secs(60)) {
        Some(status) if status.success() => {}
        _ => bail!("worker migrate failed; see {}", migrate.log_path().display()),
    }
    let pool = PgPool::connect(&format!("{}/{DATABASE}", config.database_server)).await?;
    // BENCH_API_ASYNC_COMMIT=1 measures what the durable commit of each issuance record costs.
    if std::env::var("BENCH_API_ASYNC_COMMIT").is_ok_and(|v| v == "1") {
        sqlx::query(&format!("ALTER DATABASE {DATABASE} SET synchronous_commit = off"))
            .execute(&pool)
            .await?;
    }
    sqlx::query(
        "INSERT INTO accounts (id, reauth_required, reauth_token, reauth_token_issued_at, reauth_token_expires_at,
                               data_status, reauth_state_received_at)
         SELECT lpad(to_hex(n), 24, '0'), true, md5(n::text), now(), now() + interval '10 minutes', 'AVAILABLE', now()
         FROM generate_series(0, $1 - 1) AS n",
    )
    .bind(i64::try_from(ACCOUNTS)?)
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}

/// `wrk` with `config.connections` connections over the accounts in turn; `path` has one `%024x`.
fn wrk(
    config: &BenchConfig,
    log_dir: &Path,
    method: &str,
    base: &str,
    path: &str,
) -> anyhow::Result<LoadResult> {
    let script = log_dir.join("wrk-api.lua");
    std::fs::write(
        &script,
        format!(
            r#"counter = 0
headers = {{ ["authorization"] = "Bearer {KEY}" }}
request = function()
  counter = counter + 1
  return wrk.format("{method}", string.format("{path}", counter % {ACCOUNTS}), headers, nil)
end
"#
        ),
    )?;
    let report = run_wrk(config, &script, base)?;
    std::fs::write(log_dir.join(format!("wrk-api-{}.txt", method.to_lowercase())), &report)?;
    parse_wrk(&report, 0)
}
