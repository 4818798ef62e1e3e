//! The binary as an operator meets it: `--help`, start-up errors, and the operator commands.

use sqlx::PgPool;
use std::process::Command;

fn worker() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("LOG_FORMAT", "json");
    command
}

#[test]
fn help_lists_every_setting_with_its_environment_variable_and_default() {
    let output = worker().arg("--help").output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();

    for (env, default) in [
        ("DATABASE_URL", Some("postgres://postgres@127.0.0.1:5432/monohook")),
        ("AMQP_URL", Some("amqp://guest:guest@127.0.0.1:5672/%2f")),
        ("QUEUE_PREFIX", Some("mono.webhooks")),
        ("MONO_SECRET_KEY", None),
        ("MONO_API_URL", Some("https://api.withmono.com")),
        ("PREFETCH", Some("256")),
        ("DEDUP_WINDOW_SECS", Some("600")),
        ("RETRY_DELAYS_SECS", Some("30,300,1800,7200")),
    ] {
        assert!(help.contains(&format!("[env: {env}")), "--help lacks {env}:\n{help}");
        if let Some(default) = default {
            assert!(help.contains(&format!("[default: {default}]")), "--help lacks the default of {env}");
        }
    }
}

#[test]
fn a_missing_secret_key_stops_the_worker_naming_it() {
    let output = worker().output().unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr, "worker: missing required setting: MONO_SECRET_KEY (--mono-secret-key)\n");
}

#[test]
fn a_delivery_limit_below_two_is_refused_at_start() {
    let output = worker().env("MONO_SECRET_KEY", "sk").env("DELIVERY_LIMIT", "1").output().unwrap();

    assert_eq!(output.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--delivery-limit") && stderr.contains("2.."), "{stderr}");
}

#[test]
fn a_password_in_the_query_string_never_reaches_the_output() {
    let output = worker()
        .env("MONO_SECRET_KEY", "sk")
        .env("DATABASE_URL", "postgres://app@127.0.0.1:1/monohook?password=hunter2")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("password=***"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn an_unreachable_database_stops_the_worker_with_one_line_and_no_password() {
    let output = worker()
        .env("MONO_SECRET_KEY", "sk")
        .env("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/monohook")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("worker: cannot connect to PostgreSQL at postgres://app:***@127.0.0.1:1/monohook"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[sqlx::test(migrations = false)]
async fn an_unreachable_broker_stops_the_worker_with_one_line(pool: PgPool) {
    let database = database_url(&pool).await;
    let output = worker()
        .env("MONO_SECRET_KEY", "sk")
        .env("DATABASE_URL", &database)
        .env("AMQP_URL", "amqp://guest:hunter2@127.0.0.1:1/%2f")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("worker: cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn migrate_creates_a_missing_database_and_its_schema() {
    let name = format!("monohook_cli_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}/{name}", server_url());

    let output = worker().arg("migrate").env("DATABASE_URL", &url).output().unwrap();

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let pool = PgPool::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let admin = PgPool::connect(&format!("{}/postgres", server_url())).await.unwrap();
    sqlx::query(&format!("DROP DATABASE {name}")).execute(&admin).await.unwrap();
    assert!(
        tables.contains(&"accounts".to_owned()) && tables.contains(&"webhook_events".to_owned()),
        "{tables:?}"
    );
}

/// Account `acc-1`, flagged and holding the token `VwxcfeLRZvq1UlD5WiuN`; returns the database URL.
async fn account_holding_a_token(pool: &PgPool) -> String {
    sqlx::query(
        "INSERT INTO accounts (id, reauth_required, reauth_token, reauth_token_issued_at)
         VALUES ('acc-1', true, 'VwxcfeLRZvq1UlD5WiuN', now())",
    )
    .execute(pool)
    .await
    .unwrap();
    database_url(pool).await
}

#[sqlx::test(migrations = "../migrations")]
async fn account_prints_the_record_without_the_token(pool: PgPool) {
    let database = account_holding_a_token(&pool).await;

    let output = worker().args(["account", "acc-1"]).env("DATABASE_URL", &database).output().unwrap();

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("reauth_required          true"), "{stdout}");
    assert!(stdout.contains("(held)"), "{stdout}");
    assert!(!stdout.contains("VwxcfeLRZvq1UlD5WiuN"), "{stdout}");
}

#[sqlx::test(migrations = "../migrations")]
async fn account_json_is_one_document_without_the_token(pool: PgPool) {
    let database = account_holding_a_token(&pool).await;

    let output =
        worker().args(["account", "acc-1", "--json"]).env("DATABASE_URL", &database).output().unwrap();

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!String::from_utf8_lossy(&output.stdout).contains("VwxcfeLRZvq1UlD5WiuN"));
    let account: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let fields: std::collections::BTreeSet<&str> =
        account.as_object().unwrap().keys().map(String::as_str).collect();
    let expected = std::collections::BTreeSet::from([
        "id",
        "reauth_required",
        "has_reauth_token",
        "reauth_token_issued_at",
        "reauth_token_expires_at",
        "reauthorized_at",
        "data_status",
        "data_updated_at",
        "last_sync_failed_at",
        "customer_id",
        "connected_at",
        "unlinked_at",
        "created_at",
        "updated_at",
    ]);
    assert_eq!(fields, expected);
    assert_eq!(account["id"], "acc-1");
    assert_eq!(account["reauth_required"], true);
    assert_eq!(account["has_reauth_token"], true);
    assert!(account["reauth_token_issued_at"].is_string() && account["data_status"].is_null());
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unknown_account_is_an_error_on_stderr_with_exit_1_even_with_json(pool: PgPool) {
    let database = database_url(&pool).await;

    let output =
        worker().args(["account", "nope", "--json"]).env("DATABASE_URL", &database).output().unwrap();

    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "{}", String::from_utf8_lossy(&output.stdout));
    assert_eq!(String::from_utf8_lossy(&output.stderr).lines().last(), Some("worker: no account nope"));
}

#[test]
fn usage_errors_exit_2() {
    for args in [&["dlq", "list", "--no-such-flag"][..], &["status", "--check=maybe"], &["account"]] {
        let output = worker().args(args).output().unwrap();

        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

/// The server part of `DATABASE_URL` (what `#[sqlx::test]` uses), without a database name.
fn server_url() -> String {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    url.rsplit_once('/').map(|(server, _)| server.to_owned()).unwrap()
}

/// A URL for the test's own database.
async fn database_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()::text").fetch_one(pool).await.unwrap();
    format!("{}/{name}", server_url())
}

#[test]
fn a_setting_out_of_its_range_is_refused_with_one_line_naming_it() {
    for (env, value, accepted) in [
        ("PREFETCH", "0", "1.."),
        ("MONO_CIRCUIT_FAILURE_RATIO", "1.5", "(0, 1]"),
        ("MONO_CIRCUIT_FAILURE_RATIO", "0", "(0, 1]"),
        ("BATCH_MAX", "0", "at least 1"),
        ("MONO_TIMEOUT_MS", "0", "1.."),
        ("RETRY_DELAYS_SECS", "30,0", "1.."),
        ("DB_MAX_CONNECTIONS", "0", "1.."),
        ("MONO_API_URL", "api.withmono.com", "http://"),
        ("LOG_FORMAT", "xml", "accepted: auto, json, pretty"),
    ] {
        let output = worker().env("MONO_SECRET_KEY", "sk").env(env, value).output().unwrap();

        assert_eq!(output.status.code(), Some(2), "{env}={value}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{env}={value}: {stderr}");
        assert!(stderr.starts_with(&format!("worker: invalid {env} (--")), "{env}={value}: {stderr}");
        assert!(stderr.contains(accepted), "{env}={value}: {stderr}");
    }
}

#[test]
fn a_missing_or_unparseable_ca_file_stops_the_start_naming_the_setting_not_the_file() {
    let unparseable = std::env::temp_dir().join(format!("monohook-ca-{}.pem", uuid::Uuid::new_v4().simple()));
    std::fs::write(&unparseable, "hunter2\n").unwrap();
    for (path, reason) in
        [("/nonexistent/ca.pem", "cannot read the file"), (unparseable.to_str().unwrap(), "no PEM")]
    {
        let output = worker().env("MONO_SECRET_KEY", "sk").env("AMQP_CA_FILE", path).output().unwrap();

        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(2), "{path}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("worker: invalid AMQP_CA_FILE (--amqp-ca-file): "), "{stderr}");
        assert!(stderr.contains(reason) && !stderr.contains("hunter2"), "{stderr}");
    }
    std::fs::remove_file(unparseable).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn read_commands_never_create_or_migrate_a_database(pool: PgPool) {
    // Old design: `dlq` connected with connect_and_migrate, creating and migrating what DATABASE_URL named.
    let missing = format!("monohook_missing_{}", uuid::Uuid::new_v4().simple());
    let exists = |name: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let refused = |args: &'static [&'static str], url: String| {
        let output = worker().args(args).env("DATABASE_URL", &url).output().unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        stderr
    };

    let url = format!("{}/{missing}", server_url());
    for args in
        [&["dlq", "list"][..], &["dlq", "show", "0190d5a4-5b4c-7000-8000-000000000000"], &["account", "x"]]
    {
        refused(args, url.clone());
        assert!(!exists(missing.clone()).await, "{args:?} created the database");
    }
    // status prints what it can read without the database, and fails saying why.
    let status = worker().arg("status").env("DATABASE_URL", &url).output().unwrap();
    let stderr = String::from_utf8(status.stderr).unwrap();
    assert_eq!(status.status.code(), Some(1), "{stderr}");
    assert!(stderr.lines().last().unwrap().contains("the database could not be read"), "{stderr}");
    assert!(!exists(missing.clone()).await, "status created the database");

    // A database an older binary migrated: one migration short of this binary's schema.
    let newest: i64 =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations").fetch_one(&pool).await.unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1").bind(newest).execute(&pool).await.unwrap();
    let stderr = refused(&["dlq", "list"], database_url(&pool).await);
    assert!(stderr.contains("older than this binary's") && stderr.contains("worker migrate"), "{stderr}");
    let applied: i64 =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations").fetch_one(&pool).await.unwrap();
    assert!(applied < newest, "the command migrated the database");
}
