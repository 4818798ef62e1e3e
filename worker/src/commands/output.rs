//! What every operator command shares: how it prints JSON, and its exit codes.
//!
//! With `--json` a command prints one JSON document on stdout (pretty-printed), or, for a command
//! whose results stream out one at a time (`dlq replay --dry-run`), one compact JSON object per line.
//! Progress, prompts and errors go to stderr as text, whatever the mode.
//!
//! Exit codes: 0 the command did what it was asked; 1 a check failed or something went wrong (any
//! error that reaches `main`); 2 a usage error (clap's own, and [`UsageError`]); 130 a walk stopped
//! at once by a second Ctrl-C (the shell's code for SIGINT).

use serde::Serialize;

/// The exit code of a usage error.
pub const USAGE: i32 = 2;

/// The exit code of a command stopped at once by a second Ctrl-C.
pub const INTERRUPTED: i32 = 130;

/// A command line that cannot be acted on as given (exit 2, like clap's own usage errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Prints `value` as one pretty-printed JSON document.
pub fn document<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as one line of JSON lines.
pub fn line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
