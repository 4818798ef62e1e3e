//! Progress for the walks and loops of `worker dlq` over a large dead-letter queue. indicatif draws on
//! stderr only when it is a terminal, so piped or redirected output stays clean.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// A bar over `len` items.
pub fn bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").expect("valid template"));
    bar
}

/// A spinner for a wait of unknown length, saying what is awaited.
pub fn spinner(what: &'static str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(what);
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}
