//! PostgreSQL: the pool, migrations, and how a database error is classified.
//!
//! Every write the worker makes is idempotent and guarded (`ON CONFLICT`, conditions in `WHERE`),
//! because a delivery can arrive more than once. A database error is the event's fault only when the
//! event's own data is what PostgreSQL refuses (SQLSTATE classes 22 and 23): that one is dead-lettered.
//! Every other error is ours (an outage, a grant, a timeout, a trigger, a stale prepared statement)
//! and is retried; see [`fault_of`].

pub mod accounts;
pub mod batch;
pub mod dead_letters;
pub mod events;
pub mod notifications;
pub mod outbox;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use std::str::FromStr;
use std::time::Duration;

use shared::config::DatabaseArgs;
use shared::redact::redact_url;

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

/// Connects to an existing database whose schema is exactly this binary's, and leaves it alone: for
/// every operator command (`dlq`, `account`, `status`). A missing database, or a schema older or
/// newer than the binary, is refused with one line; only `worker migrate` and a starting worker
/// create and migrate (a mistyped `DATABASE_URL` must not become an empty database that a replay
/// then writes into).
pub async fn connect_current(args: &DatabaseArgs) -> anyhow::Result<PgPool> {
    let shown = redact_url(args.database_url.expose_secret());
    let pool = connect(args).await?;
    let applied: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .map_err(|_| {
            anyhow::anyhow!("the database at {shown} has no monohook schema: run `worker migrate` first")
        })?;
    let expected = MIGRATOR.iter().map(|m| m.version).max().unwrap_or_default();
    match applied {
        Some(version) if version == expected => Ok(pool),
        Some(version) if version < expected => anyhow::bail!(
            "the database at {shown} has schema {version}, older than this binary's {expected}: run `worker migrate` first"
        ),
        Some(version) => anyhow::bail!(
            "the database at {shown} has schema {version}, newer than this binary's {expected}: use a newer worker binary"
        ),
        None => anyhow::bail!("the database at {shown} has no monohook schema: run `worker migrate` first"),
    }
}

/// Connects to an existing database and leaves its schema alone: for the operator commands that only
/// read (`account`, `status`). The worker, `migrate` and `dlq` (which writes its actions) use
/// [`connect_and_migrate`].
pub async fn connect(args: &DatabaseArgs) -> anyhow::Result<PgPool> {
    let url = args.database_url.expose_secret();
    let shown = redact_url(url);
    let options =
        PgConnectOptions::from_str(url).with_context(|| format!("DATABASE_URL is not valid ({shown})"))?;
    PgPoolOptions::new()
        .max_connections(args.db_max_connections)
        // A delivery waits this long for a connection before the attempt counts as an outage.
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {shown}"))
}

/// Applies pending migrations. Safe with many workers starting at once (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying database migrations failed")
}

/// Longest a worker transaction waits for a row lock. A row held elsewhere (an open psql session, a
/// frozen api pod) then fails the batch that needs it with 55P03, an error of ours: the batch is
/// retried, split, and only the delivery that needs the row is parked, instead of a whole batch of
/// unrelated deliveries waiting until `HOLD_MAX_SECS`. Two workers' batches sharing an account wait
/// for each other far less than this.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Begins a worker transaction whose lock waits end after [`LOCK_WAIT`].
pub async fn begin(conn: &mut PgConnection) -> sqlx::Result<Transaction<'_, Postgres>> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", LOCK_WAIT.as_millis()))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Whose fault a database error is, which decides what becomes of the deliveries that met it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbFault {
    /// The database cannot serve anyone right now (unreachable, restarting, failing over, refusing
    /// our credentials): no event can be at fault, so the deliveries are held and retried as they are.
    Outage,
    /// Ours, though it may strike only some rows (a revoked grant, a statement or lock timeout, a
    /// trigger, a deadlock, a stale prepared statement): retried, never dead-lettered.
    Ours,
    /// The event's own data is what the database refuses (classes 22 and 23): it can never be stored
    /// as it is, so it is dead-lettered.
    Event,
}

/// Classifies `error`; see [`fault_of`] for database errors. Errors that never reached the database
/// are ours: the connection or the pool when they are about reaching it, our own code otherwise.
pub fn classify(error: &sqlx::Error) -> DbFault {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => DbFault::Outage,
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => fault_of(&code, db.constraint()),
            None => DbFault::Ours,
        },
        _ => DbFault::Ours,
    }
}

/// The unique constraints on keys the worker itself chooses: a conflict on one is a race between two
/// of our transactions (both saw the key free), never something wrong with the event. The journal
/// is partitioned: a conflict names the primary key of the partition it happened in
/// (`webhook_events_2027_01_pkey`, `webhook_events_before_pkey`, ...).
const OUR_KEYS: [&str; 2] = ["webhook_events_pkey", "accounts_pkey"];

fn is_our_key(constraint: &str) -> bool {
    OUR_KEYS.contains(&constraint)
        || (constraint.starts_with("webhook_events_") && constraint.ends_with("_pkey"))
}

/// The check the migration to the partitioned journal puts on the old table until its last step (no
/// id at or above the boundary): a row it refuses is refused by our half-done migration, not for
/// anything in the event, so the delivery waits (parked) instead of going to the dead letters.
const MIGRATION_BOUND: &str = "webhook_events_before_bound";

fn is_ours(constraint: &str) -> bool {
    is_our_key(constraint) || constraint == MIGRATION_BOUND
}

/// Whose fault the SQLSTATE `code` is, given the constraint it names (if any). Only data exceptions
/// (class 22: a value the database cannot take, e.g. a NUL in text) and integrity violations (class
/// 23: a constraint the row breaks), apart from conflicts on [`OUR_KEYS`], are the event's. Outages
/// are the classes that can only be about the server or the session: 08 connection exception, 28
/// invalid authorisation (a rotated password), 3D000 the database does not exist (dropped, renamed,
/// not restored yet), 53 insufficient resources, 57P operator intervention (shutdown, restart), 58
/// system error, 25006 read-only transaction (a failover landed on a replica).
pub fn fault_of(code: &str, constraint: Option<&str>) -> DbFault {
    if code.starts_with("22") || (code.starts_with("23") && !constraint.is_some_and(is_ours)) {
        DbFault::Event
    } else if ["08", "28", "53", "57P", "58"].iter().any(|class| code.starts_with(class))
        || ["3D000", "25006"].contains(&code)
    {
        DbFault::Outage
    } else {
        DbFault::Ours
    }
}

/// Whether the connection that saw `error` should be closed rather than reused: its session is on
/// the wrong server (a read-only replica), holds settings or credentials that are stale now, or
/// disagrees with the server about its prepared statements (26000 does not exist, 42P05 exists
/// already: a pooler between us, or a `DISCARD ALL`).
pub fn poisons_connection(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|code| {
        ["25006", "26000", "42P05"].contains(&code.as_ref()) || code.starts_with("28")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_events_own_data_causes_is_refused_for_good() {
        for code in ["22P02", "22021", "22P05", "22001", "23502", "23514", "23503", "23505"] {
            assert_eq!(fault_of(code, None), DbFault::Event, "{code}");
        }
        for code in ["26000", "42P05", "42501", "42P01", "42703", "55P03", "55006", "57014", "40001", "40P01"]
        {
            assert_eq!(fault_of(code, None), DbFault::Ours, "{code}");
        }
        for code in ["P0001", "XX000", "0A000", "54000"] {
            assert_eq!(fault_of(code, None), DbFault::Ours, "{code}");
        }
        for constraint in
            OUR_KEYS.into_iter().chain(["webhook_events_2027_01_pkey", "webhook_events_before_pkey"])
        {
            assert_eq!(fault_of("23505", Some(constraint)), DbFault::Ours, "a race on {constraint}");
        }
        assert_eq!(fault_of("23505", Some("reauth_links_pkey")), DbFault::Event);
        assert_eq!(fault_of("23514", Some(MIGRATION_BOUND)), DbFault::Ours, "a half-done migration");
        assert_eq!(fault_of("23514", Some("webhook_events_status_check")), DbFault::Event);
    }

    #[test]
    fn only_the_server_or_the_session_being_unavailable_is_an_outage() {
        for code in [
            "08006", "08001", "53300", "53100", "57P01", "57P03", "58030", "28P01", "28000", "25006", "3D000",
        ] {
            assert_eq!(fault_of(code, None), DbFault::Outage, "{code}");
        }
    }
}
