//! PostgreSQL: the pool, migrations, and how a database error is classified.
//!
//! Every write the worker makes is idempotent and guarded (`ON CONFLICT`, conditions in `WHERE`),
//! because a delivery can arrive more than once. An error that means "the database is not reachable
//! right now" is transient: the worker holds the delivery and tries again; any other is permanent.

pub mod accounts;
pub mod batch;
pub mod events;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::str::FromStr;
use std::time::Duration;

use shared::config::{DatabaseArgs, redact_url};

/// The schema, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects, creating the database if it does not exist, and applies pending migrations.
/// Fails with one line naming the database if it cannot be reached.
pub async fn connect_and_migrate(args: &DatabaseArgs) -> anyhow::Result<PgPool> {
    let url = args.database_url.expose_secret();
    let shown = redact_url(url);
    let exists = Postgres::database_exists(url)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {shown}"))?;
    if !exists {
        Postgres::create_database(url)
            .await
            .with_context(|| format!("cannot create the database {shown}"))?;
        tracing::info!(database = %shown, "created the database");
    }
    let pool = connect(args).await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// Connects to an existing database (operator commands, which must not change the schema).
pub async fn connect(args: &DatabaseArgs) -> anyhow::Result<PgPool> {
    let url = args.database_url.expose_secret();
    let shown = redact_url(url);
    let options =
        PgConnectOptions::from_str(url).with_context(|| format!("DATABASE_URL is not valid ({shown})"))?;
    PgPoolOptions::new()
        .max_connections(args.db_max_connections)
        // A delivery waits this long for a connection before the attempt counts as transient.
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {shown}"))
}

/// Applies pending migrations. Safe with many workers starting at once (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying database migrations failed")
}

/// Whether `error` means the database is unavailable for now (retry) rather than that this statement
/// can never succeed.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P: operator intervention
            // (shutdown, restart); 58: system error; 40001/40P01: serialization failure, deadlock.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code.starts_with("58")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}
