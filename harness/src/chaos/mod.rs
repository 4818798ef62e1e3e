//! The chaos suite: each scenario drives real webhooks through a real ingest into RabbitMQ and
//! PostgreSQL with workers running, injects one fault mid-load, waits for the backlog to drain, and
//! checks every delivery that got a 200 against the database. Run it with `./scripts/chaos` (it
//! restarts the shared services, so it runs alone, after the other tests).

pub mod cluster;
pub mod load;
pub mod model;
pub mod on_cluster;
pub mod scenarios;
pub mod services;

use std::time::Duration;

/// One line of the suite's table.
#[derive(Clone, Debug, Default)]
pub struct ScenarioReport {
    pub name: String,
    pub accepted: usize,
    pub processed: usize,
    pub lost: usize,
    pub double_effects: usize,
    pub dead_lettered: usize,
    pub seconds: f64,
    /// What this scenario checks beyond the common columns, and whether each held.
    pub checks: Vec<(String, bool)>,
    /// Figures worth printing that are not pass/fail (e.g. how long ingest answered 503).
    pub notes: Vec<String>,
}

impl ScenarioReport {
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.double_effects == 0 && self.checks.iter().all(|(_, ok)| *ok)
    }

    pub fn check(&mut self, what: impl Into<String>, ok: bool) {
        self.checks.push((what.into(), ok));
    }

    pub fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    pub fn header() -> String {
        format!(
            "{:<34} {:>8} {:>9} {:>5} {:>14} {:>13} {:>8}",
            "scenario", "accepted", "processed", "lost", "double_effects", "dead_lettered", "seconds"
        )
    }

    pub fn line(&self) -> String {
        format!(
            "{:<34} {:>8} {:>9} {:>5} {:>14} {:>13} {:>8.1}",
            self.name,
            self.accepted,
            self.processed,
            self.lost,
            self.double_effects,
            self.dead_lettered,
            self.seconds
        )
    }
}

/// How long a scenario may wait for the backlog to drain once its load has stopped.
pub const DRAIN_PATIENCE: Duration = Duration::from_secs(90);
