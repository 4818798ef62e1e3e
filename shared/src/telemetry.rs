//! Logging set-up shared by every binary: `tracing` with JSON lines (production) or pretty output
//! (a terminal), filtered by `RUST_LOG`.
//!
//! Lines are written by a background thread (`tracing-appender`), so a request or a delivery never
//! waits on a `write` to stderr; when that thread falls behind, callers block rather than lose lines.
//! Keep the returned guard alive until exit: dropping it flushes what is still buffered.

use std::io::IsTerminal;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryArgs};

/// Installs the global subscriber. Call once, first thing in `main`, and hold the guard.
pub fn init(args: &TelemetryArgs) -> anyhow::Result<WorkerGuard> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|e| anyhow::anyhow!("RUST_LOG is not a valid filter ({e})"))?;
    let json = match args.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let (writer, guard) = NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only where a person reads them, never into log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let installed = if json {
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
    installed.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    Ok(guard)
}
