//! The journal benchmark's markdown report (`bench/results/<date>-journal.md`).

use std::fmt::Write as _;

use super::journal::{JournalConfig, JournalResult, Latency, Scale};

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
         between figures of that run. Each size is the journal as a database partitioned by month \
         holds it: its rows spread evenly over its last days (UUIDv7 ids of their receive time, \
         minimal payloads, 100,000 accounts), one partition per month plus {} ahead and the default. \
         The same rows over fewer days is the same traffic for less time (fewer months); more rows \
         over the same days is more traffic (as many months, more rows in each). Each size has a \
         database of its own; all are filled first, then measured in turns, a batch on each, round \
         after round, so the machine's other load falls on all alike. Each figure is over {} batches \
         of {} deliveries (`BATCH_MAX`), p50 / p99: the worker's two journal reads of a batch \
         (`worker/src/db/batch.rs`: which ids are journaled, half the batch's own and half \
         redeliveries of rows received in the last hour; and the dedup lookup, half the bodies \
         journaled within `DEDUP_WINDOW_SECS` = {} s), and its journal insert (`ON CONFLICT (id) DO \
         NOTHING`) with the commit. The ratios compare the last size with each other one (p50).\n",
        worker::partitions::MONTHS_AHEAD,
        config.samples,
        config.batch,
        config.dedup_window_secs
    );
    let Some((large, others)) = result.scales.split_last() else {
        return out;
    };
    let label = |s: &Scale| format!("{} rows, {} days", thousands(s.size.rows), s.size.days);
    let mut header = String::from("| measure |");
    for scale in &result.scales {
        let _ = write!(header, " {} |", label(scale));
    }
    for other in others {
        let _ = write!(header, " ratio to {} |", label(other));
    }
    let _ = writeln!(out, "{header}\n|---|{}", "---|".repeat(result.scales.len() + others.len()));
    type Figure = fn(&Scale) -> &Latency;
    let figures: [(&str, Figure); 3] = [
        ("journaled ids (`id = ANY`), p50 / p99", |s| &s.settled),
        ("dedup lookup (bodies in the window), p50 / p99", |s| &s.copies),
        ("batch journal insert + commit, p50 / p99", |s| &s.commit),
    ];
    for (name, figure) in figures {
        let mut row = format!("| {name} |");
        for scale in &result.scales {
            let _ = write!(row, " {} |", millis(figure(scale)));
        }
        for other in others {
            let _ = write!(row, " {:.2} |", figure(large).p50_ms / figure(other).p50_ms);
        }
        let _ = writeln!(out, "{row}");
    }
    let mut row = String::from("| journal on disk (tables, indexes, TOAST) |");
    for scale in &result.scales {
        let _ = write!(row, " {} |", gib(scale.size_bytes));
    }
    for other in others {
        let _ = write!(row, " {:.1} |", large.size_bytes as f64 / other.size_bytes as f64);
    }
    let _ = writeln!(out, "{row}");
    for (name, value) in [
        ("partitions", (|s: &Scale| s.partitions.to_string()) as fn(&Scale) -> String),
        ("time to fill", |s| format!("{:.0} s", s.fill_secs)),
    ] {
        let mut row = format!("| {name} |");
        for scale in &result.scales {
            let _ = write!(row, " {} |", value(scale));
        }
        let _ = writeln!(out, "{row}{}", " |".repeat(others.len()));
    }

    let (rows_step, drop) = (&result.row_steps, &result.partition_drop);
    let _ = writeln!(out, "\n## One retention step at {} rows\n", thousands(large.size.rows));
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
