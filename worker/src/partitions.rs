//! The journal's monthly partitions (issue 22, point 4): created ahead, and dropped whole once
//! retention needs none of their rows. Run by the retention round, under its advisory lock.
//!
//! ```text
//! webhook_events  PARTITION BY RANGE (id)    a delivery id is a UUIDv7: its first 48 bits are the
//!   │                                        receive time in ms, so a month is a range of ids
//!   ├─ webhook_events_before   [MINVALUE, B)  the journal as the migration found it
//!   ├─ webhook_events_2027_01  [floor(2027-01-01), floor(2027-02-01))
//!   ├─ …                       created MONTHS_AHEAD ahead by each round
//!   └─ webhook_events_default  DEFAULT        ids no month holds: not UUIDv7 (derived from a
//!                                            body), or a month not created in time
//!
//! each round:  months_to_create ──▶ create: a table, the default's rows of its range moved in,
//!                                   ATTACH (one transaction)
//!              expired          ──▶ drop_if_unneeded: SHARE lock on the partition (no write
//!                                   lands meanwhile), no `dead` row and none received at or
//!                                   after the cutoff? DETACH + DROP : keep it (its expired rows
//!                                   go by the round's bounded deletes)
//! ```
//!
//! The decisions ([`months_to_create`], [`expired`]) are pure functions over the partitions'
//! bounds, with the catalog reads and the DDL around them. Every statement runs with a short
//! `lock_timeout`: DETACH takes an ACCESS EXCLUSIVE lock on `webhook_events` for a moment, and a
//! lock it cannot get at once must not queue the worker's batches behind it. A step that fails
//! (a lock not granted, a month whose name is taken) is logged and tried again next round; rows
//! meanwhile land in the default partition, and the round's row deletes still bound the journal.

use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use sqlx::{Connection, PgConnection};
use std::time::Instant;
use uuid::Uuid;

/// Months created ahead of the current one, so the month after next exists before any row needs it.
pub const MONTHS_AHEAD: u32 = 2;

/// Longest any partition statement waits for a lock before the step is left to the next round.
const LOCK_TIMEOUT: &str = "2s";

/// A partition of `webhook_events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub bounds: Bounds,
}

/// Which ids a partition holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bounds {
    /// Every id no other partition holds.
    Default,
    /// `[from, to)`; `None` is MINVALUE (for `from`) or MAXVALUE (for `to`).
    Range { from: Option<Uuid>, to: Option<Uuid> },
}

impl Bounds {
    fn overlaps(self, from: Uuid, to: Uuid) -> bool {
        match self {
            Self::Default => false,
            Self::Range { from: start, to: end } => {
                start.is_none_or(|start| start < to) && end.is_none_or(|end| from < end)
            }
        }
    }

    /// Reads `pg_get_expr(relpartbound)`: `DEFAULT` or `FOR VALUES FROM (…) TO (…)`.
    fn parse(expr: &str) -> Option<Self> {
        if expr == "DEFAULT" {
            return Some(Self::Default);
        }
        let (from, to) = expr.strip_prefix("FOR VALUES FROM (")?.strip_suffix(')')?.split_once(") TO (")?;
        let value = |v: &str| match v {
            "MINVALUE" | "MAXVALUE" => Some(None),
            quoted => Uuid::parse_str(quoted.trim_matches('\'')).ok().map(Some),
        };
        Some(Self::Range { from: value(from)?, to: value(to)? })
    }
}

/// A calendar month (UTC) of the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Month {
    /// Its first instant.
    pub start: DateTime<Utc>,
}

impl Month {
    /// The month `at` falls in.
    pub fn containing(at: DateTime<Utc>) -> Self {
        let start = Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0).earliest().unwrap_or(at);
        Self { start }
    }

    /// The month after.
    pub fn next(&self) -> Self {
        Self { start: self.start.checked_add_months(Months::new(1)).unwrap_or(self.start) }
    }

    /// `webhook_events_YYYY_MM`.
    pub fn name(&self) -> String {
        format!("webhook_events_{}", self.start.format("%Y_%m"))
    }

    /// The ids of the month: `[from, to)`.
    pub fn ids(&self) -> (Uuid, Uuid) {
        (id_floor(self.start), id_floor(self.next().start))
    }
}

/// The lowest UUIDv7 of the millisecond `at` (the migration's `journal_id_floor`): every id ingest
/// stamps at `at` or later is at least this.
pub fn id_floor(at: DateTime<Utc>) -> Uuid {
    let millis = u128::try_from(at.timestamp_millis()).unwrap_or(0);
    Uuid::from_u128(millis << 80)
}

/// The months from `now`'s to [`MONTHS_AHEAD`] later that no partition holds any id of yet. A month
/// a partition holds part of is left alone (its rows go where the bounds say).
pub fn months_to_create(existing: &[Partition], now: DateTime<Utc>) -> Vec<Month> {
    let mut month = Month::containing(now);
    let mut wanted = Vec::new();
    for _ in 0..=MONTHS_AHEAD {
        let (from, to) = month.ids();
        if !existing.iter().any(|p| p.bounds.overlaps(from, to)) {
            wanted.push(month.clone());
        }
        month = month.next();
    }
    wanted
}

/// The partitions whose every id was stamped before `cutoff`: retention may drop one once it has
/// checked that it holds no row retention keeps. Never the default.
pub fn expired(existing: &[Partition], cutoff: DateTime<Utc>) -> Vec<&Partition> {
    let floor = id_floor(cutoff);
    existing
        .iter()
        .filter(|p| matches!(p.bounds, Bounds::Range { to: Some(to), .. } if to <= floor))
        .collect()
}

/// The partitions of `webhook_events` (none while it is a plain table).
pub async fn list(conn: &mut PgConnection) -> sqlx::Result<Vec<Partition>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid)
         FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'webhook_events'::regclass ORDER BY c.relname",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, expr)| match Bounds::parse(&expr) {
            Some(bounds) => Some(Partition { name, bounds }),
            None => {
                tracing::warn!(partition = %name, bounds = %expr, "a journal partition's bounds are not understood; left alone");
                None
            }
        })
        .collect())
}

/// Creates `month`'s partition: a table like the journal, the default partition's rows of its range
/// moved in, then attached (ATTACH builds its indexes). Returns the rows moved.
pub async fn create(conn: &mut PgConnection, month: &Month, default: Option<&str>) -> sqlx::Result<u64> {
    let (name, (from, to)) = (ident(&month.name()), month.ids());
    let mut tx = conn.begin().await?;
    set_lock_timeout(&mut tx).await?;
    run(
        &mut tx,
        &format!("CREATE TABLE {name} (LIKE webhook_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"),
    )
    .await?;
    let mut moved = 0;
    if let Some(default) = default {
        moved = run(
            &mut tx,
            &format!(
                "WITH moved AS (DELETE FROM {} WHERE id >= '{from}' AND id < '{to}' RETURNING *)
             INSERT INTO {name} SELECT * FROM moved",
                ident(default)
            ),
        )
        .await?;
    }
    run(
        &mut tx,
        &format!("ALTER TABLE webhook_events ATTACH PARTITION {name} FOR VALUES FROM ('{from}') TO ('{to}')"),
    )
    .await?;
    tx.commit().await?;
    Ok(moved)
}

/// What became of an expired partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Detached and dropped, with about this many rows (the planner's estimate: counting them
    /// would read the whole month).
    Dropped { rows_estimate: i64 },
    /// It holds a `dead` row (its letter may still wait in the queue) or one received at or after
    /// the cutoff (the dedup window may need it): kept, for the bounded deletes.
    Kept,
}

/// Drops `partition` unless it holds a row retention keeps: no `dead` row, none received at or
/// after `cutoff`. The partition is SHARE-locked before it is looked at, so no row lands in it
/// between the look and the drop.
pub async fn drop_if_unneeded(
    conn: &mut PgConnection,
    partition: &str,
    cutoff: DateTime<Utc>,
) -> sqlx::Result<Expiry> {
    let name = ident(partition);
    let mut tx = conn.begin().await?;
    set_lock_timeout(&mut tx).await?;
    run(&mut tx, &format!("LOCK TABLE {name} IN SHARE MODE")).await?;
    let needed: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {name} WHERE status = 'dead')
             OR EXISTS (SELECT 1 FROM {name} WHERE received_at >= $1)"
    ))
    .bind(cutoff)
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    if needed {
        tx.rollback().await?;
        return Ok(Expiry::Kept);
    }
    let rows: f32 = sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = $1::regclass")
        .bind(partition)
        .fetch_one(&mut *tx)
        .await?;
    run(&mut tx, &format!("ALTER TABLE webhook_events DETACH PARTITION {name}")).await?;
    run(&mut tx, &format!("DROP TABLE {name}")).await?;
    tx.commit().await?;
    Ok(Expiry::Dropped { rows_estimate: rows.max(0.0) as i64 })
}

/// One round's partition work: creates the months ahead, drops the expired partitions retention
/// needs nothing of. Returns the partitions dropped. A step that fails is logged and left to the
/// next round; the round goes on.
pub async fn maintain(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    cutoff: DateTime<Utc>,
) -> sqlx::Result<u32> {
    let existing = list(conn).await?;
    if existing.is_empty() {
        return Ok(0);
    }
    let default = existing.iter().find(|p| p.bounds == Bounds::Default).map(|p| p.name.clone());
    for month in months_to_create(&existing, now) {
        match create(conn, &month, default.as_deref()).await {
            Ok(moved) => tracing::info!(partition = %month.name(), moved, "created a journal partition"),
            Err(error) => {
                tracing::warn!(partition = %month.name(), %error, "creating a journal partition failed; the next round tries again");
            }
        }
    }
    let mut dropped = 0;
    for partition in expired(&existing, cutoff) {
        let started = Instant::now();
        match drop_if_unneeded(conn, &partition.name, cutoff).await {
            Ok(Expiry::Dropped { rows_estimate }) => {
                dropped += 1;
                let took_ms = started.elapsed().as_millis() as u64;
                metrics::counter!("monohook_worker_retention_partitions_dropped_total").increment(1);
                tracing::info!(partition = %partition.name, rows_estimate, took_ms, %cutoff, "retention dropped a journal partition");
            }
            Ok(Expiry::Kept) => {
                tracing::debug!(partition = %partition.name, "an expired journal partition holds rows retention keeps");
            }
            Err(error) => {
                tracing::warn!(partition = %partition.name, %error, "dropping a journal partition failed; the next round tries again");
            }
        }
    }
    Ok(dropped)
}

/// Runs one statement of DDL or with literals only (no parameters, nothing prepared); returns the
/// rows it affected.
async fn run(conn: &mut PgConnection, sql: &str) -> sqlx::Result<u64> {
    sqlx::Executor::execute(conn, sql).await.map(|done| done.rows_affected())
}

async fn set_lock_timeout(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(LOCK_TIMEOUT)
        .execute(conn)
        .await
        .map(drop)
}

/// `name` as an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn month(name: &str, start: &str) -> Partition {
        let (from, to) = Month::containing(at(start)).ids();
        Partition { name: name.to_owned(), bounds: Bounds::Range { from: Some(from), to: Some(to) } }
    }

    #[test]
    fn a_months_ids_are_those_ingest_stamps_within_it() {
        let start = at("2027-01-01T00:00:00Z");
        let (from, to) = Month::containing(at("2027-01-17T10:00:00Z")).ids();
        let stamped = |t: DateTime<Utc>| {
            let ts =
                uuid::Timestamp::from_unix(uuid::NoContext, t.timestamp() as u64, t.timestamp_subsec_nanos());
            Uuid::new_v7(ts)
        };
        assert_eq!(from, id_floor(start));
        assert!(from <= stamped(start) && stamped(start) < to);
        let last = at("2027-01-31T23:59:59.999Z");
        assert!(stamped(last) < to && stamped(at("2027-02-01T00:00:00Z")) >= to);
        // What the migration's `journal_id_floor('2027-01-01')` gives.
        assert_eq!(from.to_string(), "01a2ce8b-d400-0000-0000-000000000000");
    }

    #[test]
    fn bounds_are_read_as_postgresql_prints_them() {
        assert_eq!(Bounds::parse("DEFAULT"), Some(Bounds::Default));
        let id = "01a2ce8b-d400-0000-0000-000000000000";
        assert_eq!(
            Bounds::parse(&format!("FOR VALUES FROM (MINVALUE) TO ('{id}')")),
            Some(Bounds::Range { from: None, to: Some(id.parse().unwrap()) })
        );
        assert_eq!(
            Bounds::parse(&format!("FOR VALUES FROM ('{id}') TO (MAXVALUE)")),
            Some(Bounds::Range { from: Some(id.parse().unwrap()), to: None })
        );
        assert_eq!(Bounds::parse("FOR VALUES IN ('x')"), None);
    }

    #[test]
    fn only_months_no_partition_holds_are_created() {
        let now = at("2026-12-05T03:00:00Z");
        let (b, _) = Month::containing(at("2027-01-01T00:00:00Z")).ids();
        // As the migration leaves it: the old table below next month, then two months, a default.
        let existing = vec![
            Partition {
                name: "webhook_events_before".into(),
                bounds: Bounds::Range { from: None, to: Some(b) },
            },
            month("webhook_events_2027_01", "2027-01-01T00:00:00Z"),
            Partition { name: "webhook_events_default".into(), bounds: Bounds::Default },
        ];

        let names: Vec<String> = months_to_create(&existing, now).iter().map(Month::name).collect();

        assert_eq!(names, ["webhook_events_2027_02"]);
        assert_eq!(months_to_create(&[], now).len() as u32, MONTHS_AHEAD + 1);
    }

    #[test]
    fn a_partition_expires_only_when_its_every_id_is_older_than_the_cutoff_and_the_default_never() {
        let existing = vec![
            Partition {
                name: "before".into(),
                bounds: Bounds::Range { from: None, to: Some(id_floor(at("2026-09-01T00:00:00Z"))) },
            },
            month("webhook_events_2026_09", "2026-09-01T00:00:00Z"),
            month("webhook_events_2026_10", "2026-10-01T00:00:00Z"),
            Partition { name: "default".into(), bounds: Bounds::Default },
            Partition {
                name: "open".into(),
                bounds: Bounds::Range { from: Some(id_floor(at("2027-03-01T00:00:00Z"))), to: None },
            },
        ];

        let names = |cutoff: &str| -> Vec<String> {
            expired(&existing, at(cutoff)).iter().map(|p| p.name.clone()).collect()
        };

        assert_eq!(names("2026-10-01T00:00:00Z"), ["before", "webhook_events_2026_09"]);
        assert_eq!(names("2026-09-30T23:59:59Z"), ["before"]);
        assert_eq!(
            names("2030-01-01T00:00:00Z"),
            ["before", "webhook_events_2026_09", "webhook_events_2026_10"]
        );
    }
}
