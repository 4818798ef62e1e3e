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

/// Whether `error` says "not now" rather than "never": the database is unreachable, restarting,
/// failing over, overloaded, or refusing our credentials for the moment. Deliveries are held and the
/// statement retried; none of these may ever dead-letter an event.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_code(&code)),
        _ => false,
    }
}

/// The SQLSTATE classes and codes of [`is_transient`].
fn is_transient_code(code: &str) -> bool {
    // 08: connection exception; 53: insufficient resources (too many connections, disk full);
    // 57P: operator intervention (admin shutdown, crash shutdown, cannot connect now); 58: system
    // error; 28: invalid authorisation (a rotated password); 40001/40P01: serialization failure,
    // deadlock; 25006: read-only transaction (a failover landed on a replica); 57014: statement
    // timeout or cancel; 55P03: lock timeout; 55006: object in use.
    ["08", "53", "57P", "58", "28"].iter().any(|class| code.starts_with(class))
        || ["40001", "40P01", "25006", "57014", "55P03", "55006"].contains(&code)
}

/// Whether the connection that saw `error` should be closed rather than reused: its session is on
/// the wrong server (a read-only replica) or holds settings or credentials that are stale now.
pub fn poisons_connection(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|code| code == "25006" || code.starts_with("28")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_of_ours_are_transient_and_bad_data_is_not() {
        for code in ["08006", "53300", "57P01", "28P01", "28000", "25006", "57014", "55P03", "40001"] {
            assert!(is_transient_code(code), "{code} must be transient");
        }
        for code in ["22P02", "23505", "22021", "42P01", "22P05"] {
            assert!(!is_transient_code(code), "{code} must not be transient");
        }
    }
}
