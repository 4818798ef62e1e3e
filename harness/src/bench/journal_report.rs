//! The journal benchmark's markdown report (`bench/results/<date>-journal.md`).

use std::fmt::Write as _;

use super::journal::{JournalConfig, JournalResult, Latency};

fn gib(bytes: i64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

fn millis(l: &Latency) -> String {
    format!("{:.2} / {:.2} ms", l.p50_ms, l.p99_ms)
}

pub fn render(
    config: &JournalConfig,
    result: &JournalResult,
    postgres_version: &str,
    machine: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# monohook benchmark: the journal, {}\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(
        out,
        "`./scripts/bench-journal` (release build; PostgreSQL only, no broker). One run; every ratio is \
         between figures of that run. The journal as a database partitioned by month holds it after \
         steady traffic: the largest size's rows spread evenly over the last {} days, a smaller size's \
         over as many fewer (the same rows per second, so a dedup window holds as many rows at each \
         size; UUIDv7 ids of their receive time, minimal payloads, 100,000 accounts), one partition \
         per month plus {} ahead and the default. Each figure is over \
         {} batches of {} deliveries (`BATCH_MAX`), p50 / p99: the worker's two journal reads of a \
         batch (`worker/src/db/batch.rs`: which ids are journaled, half of them spread over the whole \
         journal; and the dedup lookup, half the bodies journaled within `DEDUP_WINDOW_SECS` = {} s), \
         and its journal insert (`ON CONFLICT (id) DO NOTHING`) with the commit.\n",
        config.days,
        worker::partitions::MONTHS_AHEAD,
        config.samples,
        config.batch,
        config.dedup_window_secs
    );
    let (Some(small), Some(large)) = (result.scales.first(), result.scales.last()) else {
        return out;
    };
    let _ = writeln!(
        out,
        "| measure | {} rows | {} rows | ratio (p50) |",
        thousands(small.rows),
        thousands(large.rows)
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for (name, a, b) in [
        ("journaled ids (`id = ANY`), p50 / p99", &small.settled, &large.settled),
        ("dedup lookup (bodies in the window), p50 / p99", &small.copies, &large.copies),
        ("batch journal insert + commit, p50 / p99", &small.commit, &large.commit),
    ] {
        let _ = writeln!(out, "| {name} | {} | {} | {:.2} |", millis(a), millis(b), b.p50_ms / a.p50_ms);
    }
    let _ = writeln!(
        out,
        "| journal on disk (tables, indexes, TOAST) | {} | {} | {:.1} |",
        gib(small.size_bytes),
        gib(large.size_bytes),
        large.size_bytes as f64 / small.size_bytes as f64
    );
    let _ = writeln!(out, "| partitions | {} | {} | |", small.partitions, large.partitions);
    let _ = writeln!(out, "| time to fill | {:.0} s | {:.0} s | |", small.fill_secs, large.fill_secs);

    let (rows_step, drop) = (&result.row_steps, &result.partition_drop);
    let _ = writeln!(out, "\n## One retention step at {} rows\n", thousands(large.rows));
    let _ = writeln!(
        out,
        "While each step ran, one connection ran batches back to back (both reads, the insert, the \
         commit): their times show what the step's locks cost the worker. Row deletes: {} steps of \
         `RETENTION_STEP_ROWS` = {} (`worker::retention::JOURNAL_STEP`), the time is their median. \
         Partition: the oldest month, dropped by `worker::partitions::drop_if_unneeded` (SHARE lock, \
         the check for rows retention keeps, DETACH, DROP).\n",
        config.steps, config.step_rows
    );
    let _ = writeln!(
        out,
        "| | rows removed | time | batches meanwhile p50 / p99 / max | journal on disk after |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let batches =
        |l: &Latency| format!("{:.1} / {:.1} / {:.1} ms ({} batches)", l.p50_ms, l.p99_ms, l.max_ms, l.count);
    let _ = writeln!(
        out,
        "| none (baseline) | | | {} | {} |",
        batches(&result.baseline),
        gib(result.size_before_steps)
    );
    let _ = writeln!(
        out,
        "| row deletes, one step | {} | {:.0} ms | {} | {} |",
        thousands(rows_step.rows),
        rows_step.took_ms,
        batches(&rows_step.during),
        gib(rows_step.size_after)
    );
    let _ = writeln!(
        out,
        "| dropping one month's partition | {} | {:.0} ms | {} | {} |",
        thousands(drop.rows),
        drop.took_ms,
        batches(&drop.during),
        gib(drop.size_after)
    );
    let per_row_delete = rows_step.took_ms / rows_step.rows.max(1) as f64;
    let per_row_drop = drop.took_ms / drop.rows.max(1) as f64;
    let steps_for_month = drop.rows.div_ceil(rows_step.rows.max(1));
    let _ = writeln!(
        out,
        "\nPer row removed, the drop is {:.0}× cheaper. Deleting the same month row by row would take \
         {} steps, about {:.0} s of deletes at the measured step time (extrapolated, not measured), and \
         would leave the table's size as it was: deleted rows are reused, never returned to the \
         disk, until a `VACUUM FULL` (an exclusive lock for the whole rewrite).",
        per_row_delete / per_row_drop,
        thousands(steps_for_month),
        steps_for_month as f64 * rows_step.took_ms / 1000.0
    );
    let _ = writeln!(out, "\n## Machine\n\n{machine}- {postgres_version}");
    out
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
