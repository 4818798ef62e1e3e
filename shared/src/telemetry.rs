//! Logging set-up shared by every binary: `tracing` with JSON lines (production) or pretty output
//! (a terminal), filtered by `RUST_LOG`.
//!
//! Each line is written to stderr by the thread that logs it, in one `write`. A background writer
//! thread (tracing-appender) was measured to cost more: under load it spent a tenth of ingest's CPU
//! handing lines over and yielding (bench/results).

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryArgs};

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(args: &TelemetryArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|e| anyhow::anyhow!("RUST_LOG is not a valid filter ({e})"))?;
    let json = match args.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only where a person reads them, never into log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = if json {
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
    installed.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
