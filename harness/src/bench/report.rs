//! The benchmark's markdown report: figures, ratios, targets, and the machine they were measured on.

use std::fmt::Write as _;
use std::process::Command;

use super::api_load::ApiResult;
use super::ingest_load::LoadResult;
use super::notify_latency::NotifyResult;
use super::worker_drain::DrainResult;
use super::{BenchConfig, median};

/// Every measurement of every run.
#[derive(Default)]
pub struct Runs {
    pub publish_ref: Vec<f64>,
    /// Raw publishes shaped like ingest's (topic exchange, ingest's headers).
    pub publish_like_ingest: Vec<f64>,
    pub ingest: Vec<LoadResult>,
    pub consume_ref: Vec<f64>,
    pub drain: Vec<DrainResult>,
    pub reauth: Vec<DrainResult>,
    pub api: Vec<ApiResult>,
    /// From Mono's webhook to the worker's commit and to the app's notification.
    pub notify: Vec<NotifyResult>,
    /// The same ingest and drain phases with a baseline build's binaries, in the same runs.
    pub ingest_baseline: Vec<LoadResult>,
    pub drain_baseline: Vec<DrainResult>,
}

pub fn render(config: &BenchConfig, runs: &Runs, postgres_version: &str) -> String {
    let med = |values: Vec<f64>| median(&mut values.clone());
    let publish_ref = med(runs.publish_ref.clone());
    let ingest_rps = med(runs.ingest.iter().map(|r| r.requests_per_sec).collect());
    let p50 = med(runs.ingest.iter().map(|r| r.p50_ms).collect());
    let p99 = med(runs.ingest.iter().map(|r| r.p99_ms).collect());
    let non_2xx: u64 = runs.ingest.iter().map(|r| r.non_2xx).sum();
    let consume_ref = med(runs.consume_ref.clone());
    let drain = med(runs.drain.iter().map(|r| r.events_per_sec).collect());
    let reauth = med(runs.reauth.iter().map(|r| r.events_per_sec).collect());
    // Ratios are taken within each run (reference and subject measured minutes apart on the same
    // machine), then the median of those ratios is reported.
    let ingest_ratio =
        med(runs.ingest.iter().zip(&runs.publish_ref).map(|(i, p)| i.requests_per_sec / p).collect());
    let drain_ratio =
        med(runs.drain.iter().zip(&runs.consume_ref).map(|(d, c)| d.events_per_sec / c).collect());
    let ingest_rss = runs.ingest.iter().map(|r| r.peak_rss_kib).max().unwrap_or_default();
    let worker_rss = runs.drain.iter().chain(&runs.reauth).map(|r| r.peak_rss_kib).max().unwrap_or_default();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };

    let mut out = String::new();
    let _ = writeln!(out, "# monohook benchmark, {}\n", chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"));
    let _ = writeln!(
        out,
        "Medians of {} runs; references and subjects interleaved within each run; a ratio is the median \
         of the runs' own ratios.\n",
        config.runs
    );
    let _ = writeln!(out, "| measure | monohook | reference | ratio | target | |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    // A phase left out with --only has no row.
    if !runs.ingest.is_empty() && !runs.drain.is_empty() && !runs.reauth.is_empty() {
        let _ = writeln!(
            out,
            "| ingest, {} connections, {} s | {:.0} req/s | raw publish with confirms, {} in flight: {:.0} msg/s | {:.0} % | ≥ 75 % | {} |",
            config.connections,
            config.load_duration.as_secs(),
            ingest_rps,
            config.connections,
            publish_ref,
            100.0 * ingest_ratio,
            verdict(ingest_ratio >= 0.75)
        );
        if !runs.publish_like_ingest.is_empty() {
            let like = med(runs.publish_like_ingest.clone());
            let ratio = med(runs
                .ingest
                .iter()
                .zip(&runs.publish_like_ingest)
                .map(|(i, p)| i.requests_per_sec / p)
                .collect());
            let _ = writeln!(
                out,
                "| (same, against a raw publish shaped like ingest's: topic exchange, ingest's headers) | | {like:.0} msg/s | {:.0} % | (for analysis) | |",
                100.0 * ratio
            );
        }
        let _ = writeln!(
            out,
            "| ingest latency | p50 {p50:.2} ms, p99 {p99:.2} ms | | | p99 ≤ 20 ms | {} |",
            verdict(p99 <= 20.0)
        );
        let _ =
            writeln!(out, "| ingest non-2xx (all runs) | {non_2xx} | | | 0 | {} |", verdict(non_2xx == 0));
        let _ = writeln!(
            out,
            "| worker drain, {} events over {} accounts | {:.0} events/s | raw consume with manual acks, prefetch {}: {:.0} msg/s | {:.0} % | ≥ 50 % | {} |",
            config.drain_events,
            config.drain_accounts,
            drain,
            config.prefetch,
            consume_ref,
            100.0 * drain_ratio,
            verdict(drain_ratio >= 0.5)
        );
        let _ = writeln!(
            out,
            "| re-auth, {} events, Mono answering after {} ms, PREFETCH {} | {:.0} events/s | | | ≥ 1000/s | {} |",
            config.reauth_events,
            config.mono_latency_ms,
            config.reauth_prefetch,
            reauth,
            verdict(reauth >= 1000.0)
        );
        let _ = writeln!(
            out,
            "| peak RSS ingest | {:.1} MiB | | | < 32 MiB | {} |",
            mib(ingest_rss),
            verdict(mib(ingest_rss) < 32.0)
        );
        let _ = writeln!(
            out,
            "| peak RSS worker | {:.1} MiB | | | < 64 MiB | {} |",
            mib(worker_rss),
            verdict(mib(worker_rss) < 64.0)
        );
    }
    if !runs.api.is_empty() {
        render_api(&mut out, config, &runs.api);
    }
    if !runs.notify.is_empty() {
        render_notify(&mut out, &runs.notify);
    }

    let _ = writeln!(out, "\n## Every run\n");
    let _ = writeln!(
        out,
        "| run | publish ref msg/s | ingest req/s | ratio | p50 ms | p99 ms | non-2xx | consume ref msg/s | drain events/s | ratio | re-auth events/s | RSS ingest MiB | RSS worker MiB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for i in 0..config.runs {
        let (Some(load), Some(d), Some(r)) = (runs.ingest.get(i), runs.drain.get(i), runs.reauth.get(i))
        else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} % | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.0} % | {:.0} | {:.1} | {:.1} |",
            i + 1,
            runs.publish_ref[i],
            load.requests_per_sec,
            100.0 * load.requests_per_sec / runs.publish_ref[i],
            load.p50_ms,
            load.p99_ms,
            load.non_2xx,
            runs.consume_ref[i],
            d.events_per_sec,
            100.0 * d.events_per_sec / runs.consume_ref[i],
            r.events_per_sec,
            mib(load.peak_rss_kib),
            mib(d.peak_rss_kib.max(r.peak_rss_kib))
        );
    }

    render_baseline(&mut out, runs);

    let _ = writeln!(out, "\n## Machine\n");
    out.push_str(&machine());
    let _ = writeln!(out, "- RabbitMQ {}", command_line("rabbitmqctl", &["-q", "version"]));
    let _ = writeln!(out, "- {postgres_version}");
    let _ = writeln!(out, "- {}", command_line("wrk", &["--version"]).lines().next().unwrap_or_default());
    let _ = writeln!(
        out,
        "- load: wrk -t2 -c{} -d{}s, {} B bodies; all processes share the machine's cores",
        config.connections,
        config.load_duration.as_secs(),
        config.body_bytes
    );
    out
}

/// This build against a baseline build (`--baseline-bin-dir`), phase by phase in the same runs: a
/// ratio below 100 % means this build is slower. Absent unless a baseline was given.
fn render_baseline(out: &mut String, runs: &Runs) {
    if runs.ingest_baseline.is_empty() && runs.drain_baseline.is_empty() {
        return;
    }
    let med = |values: Vec<f64>| median(&mut values.clone());
    let _ = writeln!(out, "\n## Against the baseline build\n");
    let _ = writeln!(
        out,
        "Each run measures both builds, in alternating order. Ratio: the median of the runs' own \
         ratios, oriented so that below 100 % means this build is slower.\n"
    );
    let _ = writeln!(out, "| measure | this build | baseline | ratio |");
    let _ = writeln!(out, "|---|---|---|---|");
    // (measure, this build, baseline, whether more is better): every ratio is oriented so that
    // below 100 % means this build is slower.
    let pairs = [
        (
            "ingest req/s",
            runs.ingest.iter().map(|r| r.requests_per_sec).collect::<Vec<_>>(),
            runs.ingest_baseline.iter().map(|r| r.requests_per_sec).collect::<Vec<_>>(),
            true,
        ),
        (
            "ingest p99 ms",
            runs.ingest.iter().map(|r| r.p99_ms).collect(),
            runs.ingest_baseline.iter().map(|r| r.p99_ms).collect(),
            false,
        ),
        (
            "worker drain events/s",
            runs.drain.iter().map(|r| r.events_per_sec).collect(),
            runs.drain_baseline.iter().map(|r| r.events_per_sec).collect(),
            true,
        ),
    ];
    for (measure, this, baseline, more_is_better) in pairs {
        if this.is_empty() || baseline.is_empty() {
            continue;
        }
        let speed = |t: &f64, b: &f64| if more_is_better { t / b } else { b / t };
        let ratio = med(this.iter().zip(&baseline).map(|(t, b)| speed(t, b)).collect());
        let _ = writeln!(
            out,
            "| {measure} | {:.1} | {:.1} | {:.0} % |",
            med(this.clone()),
            med(baseline.clone()),
            100.0 * ratio
        );
    }
    let _ = writeln!(out, "\n| run | ingest req/s | baseline | drain events/s | baseline |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    let figure = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    let rows = runs.ingest.len().max(runs.drain.len());
    for i in 0..rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            i + 1,
            figure(runs.ingest.get(i).map(|r| r.requests_per_sec)),
            figure(runs.ingest_baseline.get(i).map(|r| r.requests_per_sec)),
            figure(runs.drain.get(i).map(|r| r.events_per_sec)),
            figure(runs.drain_baseline.get(i).map(|r| r.events_per_sec)),
        );
    }
}

/// From Mono's webhook to the app: the commit of its effect, then the app's notification, in the
/// same runs; the ratio is what telling the app adds to the commit's latency.
fn render_notify(out: &mut String, notify: &[NotifyResult]) {
    let med = |values: Vec<f64>| median(&mut values.clone());
    let commit_p50 = med(notify.iter().map(|r| r.commit_p50_ms).collect());
    let commit_p99 = med(notify.iter().map(|r| r.commit_p99_ms).collect());
    let told_p50 = med(notify.iter().map(|r| r.told_p50_ms).collect());
    let told_p99 = med(notify.iter().map(|r| r.told_p99_ms).collect());
    let ratio = med(notify.iter().map(|r| r.told_p50_ms / r.commit_p50_ms).collect());
    let count: usize = notify.iter().map(|r| r.count).sum();
    let _ = writeln!(
        out,
        "| webhook → the app's notification, p50 / p99 | {told_p50:.0} / {told_p99:.0} ms | webhook → commit {commit_p50:.0} / {commit_p99:.0} ms | {ratio:.2} (p50) | | |"
    );
    let _ = writeln!(
        out,
        "\nThe notification path: {count} re-auths in all, one account each, posted 25 ms apart to ingest \
         (Mono answering at once); timed from each post to the worker's commit, and to mono-sim, playing \
         the app, taking the signed notification (the batch wakes the senders at its commit with PostgreSQL's NOTIFY; they also poll every second)."
    );
}

/// The api's rows: each endpoint against the bare actix + sqlx single-row read of the same run.
fn render_api(out: &mut String, config: &BenchConfig, api: &[ApiResult]) {
    let med = |values: Vec<f64>| median(&mut values.clone());
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let reference = med(api.iter().map(|r| r.reference.requests_per_sec).collect());
    for (name, pick) in [
        ("api `GET /v1/accounts/{id}`", (|r: &ApiResult| r.get.clone()) as fn(&ApiResult) -> LoadResult),
        ("api `POST /v1/accounts/{id}/reauth-token`, stored token", |r: &ApiResult| r.post_stored.clone()),
    ] {
        let rps = med(api.iter().map(|r| pick(r).requests_per_sec).collect());
        let ratio =
            med(api.iter().map(|r| pick(r).requests_per_sec / r.reference.requests_per_sec).collect());
        let p99 = med(api.iter().map(|r| pick(r).p99_ms).collect());
        let p50 = med(api.iter().map(|r| pick(r).p50_ms).collect());
        let failed: u64 = api.iter().map(|r| pick(r).non_2xx).sum();
        let _ = writeln!(
            out,
            "| {name}, {} connections, {} s | {rps:.0} req/s | bare actix + sqlx single-row read: {reference:.0} req/s | {:.0} % | ≥ 80 % | {} |",
            config.connections,
            config.load_duration.as_secs(),
            100.0 * ratio,
            verdict(ratio >= 0.8)
        );
        let _ = writeln!(
            out,
            "| (latency, non-2xx) | p50 {p50:.2} ms, p99 {p99:.2} ms, {failed} non-2xx | | | p99 ≤ 20 ms, 0 | {} |",
            verdict(p99 <= 20.0 && failed == 0)
        );
    }
    let rss = api.iter().map(|r| r.get.peak_rss_kib).max().unwrap_or_default() as f64 / 1024.0;
    let _ = writeln!(out, "| peak RSS api | {rss:.1} MiB | | | < 48 MiB | {} |", verdict(rss < 48.0));
    let _ = writeln!(out, "\n| run | reference req/s | GET req/s | ratio | POST (stored) req/s | ratio |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (i, r) in api.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} % | {:.0} | {:.0} % |",
            i + 1,
            r.reference.requests_per_sec,
            r.get.requests_per_sec,
            100.0 * r.get.requests_per_sec / r.reference.requests_per_sec,
            r.post_stored.requests_per_sec,
            100.0 * r.post_stored.requests_per_sec / r.reference.requests_per_sec
        );
    }
}

/// The machine's CPU, cores, memory and rustc, as markdown list items.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(|l| l.trim_start_matches("MemTotal:").trim().to_owned()))
        .unwrap_or_default();
    format!("- CPU: {cpu}, {cores} cores; memory {memory}\n- {}\n", command_line("rustc", &["--version"]))
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).trim().to_owned()
        })
        .unwrap_or_else(|_| format!("{program}: not found"))
}
