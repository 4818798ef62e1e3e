//! The chaos suite: each scenario drives real webhooks through a real ingest into RabbitMQ and
//! PostgreSQL with workers running, injects one fault mid-load, waits for the backlog to drain, and
//! checks every delivery that got a 200 against the database. Run it with `./scripts/chaos` (it
//! restarts the shared services, so it runs alone, after the other tests).

pub mod api_recovery;
mod app_endpoint;
mod app_notices;
pub mod cluster;
pub mod common;
pub mod dead_letters;
pub mod load;
pub mod model;
pub mod on_cluster;
pub mod scenarios;
pub mod services;
pub mod useless_node;

use std::time::Duration;

/// One line of the suite's table.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    pub name: String,
    /// Webhooks posted (each once, however often the load posted it again).
    pub posted: u64,
    /// The share of them that ended with a 200.
    pub accepted_share: f64,
    /// Below this share the scenario fails: a sender's retries must get (almost) everything in.
    pub min_accepted_share: f64,
    /// Deliveries that got a 200.
    pub accepted: usize,
    pub processed: usize,
    pub lost: usize,
    pub double_effects: usize,
    pub dead_lettered: usize,
    /// Dead letters the scenario means to make (poison); any other dead letter fails it: a bug
    /// that dead-letters what was in flight during a restart is neither lost nor processed.
    pub expected_dead: usize,
    pub seconds: f64,
    /// What this scenario checks beyond the common columns, and whether each held.
    pub checks: Vec<(String, bool)>,
    /// Figures worth printing that are not pass/fail (e.g. how long ingest answered 503).
    pub notes: Vec<String>,
    /// Tokens Mono issued to the workers and the re-auths the model counts, over all accounts.
    pub mono_tokens: Option<(u64, usize)>,
    /// Tokens one account may get beyond its re-auths in the model: 0 where no process or broker
    /// session dies mid-call; else the scenario's kills (each can cut one call short per account).
    pub extra_tokens_per_account: usize,
}

impl Default for ScenarioReport {
    fn default() -> Self {
        Self {
            name: String::new(),
            posted: 0,
            accepted_share: 0.0,
            min_accepted_share: 0.99,
            accepted: 0,
            processed: 0,
            lost: 0,
            double_effects: 0,
            dead_lettered: 0,
            expected_dead: 0,
            seconds: 0.0,
            checks: Vec::new(),
            notes: Vec::new(),
            mono_tokens: None,
            extra_tokens_per_account: 0,
        }
    }
}

impl ScenarioReport {
    /// Nothing lost or doubled, no dead letter but those meant, every check held, and enough of the
    /// load accepted: a suite whose ingest answered 503 to everything must not pass.
    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// Why the scenario did not pass, one line each: the suite repeats them at its end, where a CI
    /// log's tail still shows them.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.accepted == 0 || self.accepted_share < self.min_accepted_share {
            failures.push(format!(
                "{:.1}% accepted, {:.1}% needed",
                self.accepted_share * 100.0,
                self.min_accepted_share * 100.0
            ));
        }
        if self.lost > 0 {
            failures.push(format!("{} lost", self.lost));
        }
        if self.double_effects > 0 {
            failures.push(format!("{} account(s) in a wrong final state", self.double_effects));
        }
        if self.dead_lettered != self.expected_dead {
            failures.push(format!("{} dead letter(s), {} expected", self.dead_lettered, self.expected_dead));
        }
        failures.extend(self.checks.iter().filter(|(_, ok)| !ok).map(|(check, _)| check.clone()));
        failures
    }

    pub fn check(&mut self, what: impl Into<String>, ok: bool) {
        self.checks.push((what.into(), ok));
    }

    pub fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    pub fn header() -> String {
        format!(
            "{:<34} {:>8} {:>8} {:>9} {:>5} {:>14} {:>13} {:>11} {:>8}",
            "scenario",
            "posted",
            "accepted",
            "processed",
            "lost",
            "double_effects",
            "dead_lettered",
            "mono_tokens",
            "seconds"
        )
    }

    pub fn line(&self) -> String {
        let accepted = format!("{:.1}%", self.accepted_share * 100.0);
        let tokens =
            self.mono_tokens.map_or_else(|| "-".to_owned(), |(tokens, model)| format!("{tokens}/{model}"));
        format!(
            "{:<34} {:>8} {:>8} {:>9} {:>5} {:>14} {:>13} {:>11} {:>8.1}",
            self.name,
            self.posted,
            accepted,
            self.processed,
            self.lost,
            self.double_effects,
            self.dead_lettered,
            tokens,
            self.seconds
        )
    }
}

/// How long a scenario may wait for the backlog to drain once its load has stopped.
pub const DRAIN_PATIENCE: Duration = Duration::from_secs(90);

#[cfg(test)]
mod tests {
    use super::ScenarioReport;

    #[test]
    fn a_dead_letter_the_scenario_did_not_mean_fails_it() {
        let clean = ScenarioReport { accepted: 10, accepted_share: 1.0, ..ScenarioReport::default() };
        assert!(clean.passed());
        assert!(
            !ScenarioReport { dead_lettered: 1, ..clean.clone() }.passed(),
            "one in-flight delivery dead"
        );
        let poison = ScenarioReport { expected_dead: 3, ..clean.clone() };
        assert!(!poison.passed(), "the poison it sent must be there");
        assert!(ScenarioReport { dead_lettered: 3, ..poison }.passed());
    }
}
