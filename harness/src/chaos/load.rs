//! Webhook load for a scenario: a steady rate of Mono-shaped events over a set of accounts, posted to
//! ingest as Mono posts them: a webhook that gets no 200 (an error status or no answer) is posted
//! again with the same body, with backoff, a bounded number of times. Every delivery that got a 200
//! is remembered, and so is every attempt that did not (the broker may have taken it all the same).
//!
//! Re-auth bodies are Mono's: they hold only the account, so an account's episodes (required →
//! reauthorized → required again) repeat the same bodies and the dedup rule is exercised under every
//! fault; `account_updated` bodies differ by a sequence number, as Mono's balances do.

use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::system::WEBHOOK_SECRET;

/// What a load posts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ReauthorisationRequired,
    AccountReauthorized,
    AccountUpdated,
    SyncFailed,
    AccountConnected,
    /// Posted only for every eighth account (others get `AccountConnected` instead): an unlink ends
    /// an account's re-auths for good, and the load must keep re-auth traffic.
    AccountUnlinked,
}

/// Accounts whose number is a multiple of this may be unlinked by the load.
const UNLINKED_EVERY: u64 = 8;

impl Kind {
    pub fn event(self) -> &'static str {
        match self {
            Self::ReauthorisationRequired => "mono.events.reauthorisation_required",
            Self::AccountReauthorized => "mono.events.account_reauthorized",
            Self::AccountUpdated => "mono.events.account_updated",
            Self::SyncFailed => "mono.events.sync_failed",
            Self::AccountConnected => "mono.events.account_connected",
            Self::AccountUnlinked => "mono.events.account_unlinked",
        }
    }

    /// Whether the event decides the account's data status (the data guard's events).
    pub fn sets_data_status(self) -> bool {
        matches!(self, Self::AccountUpdated | Self::SyncFailed)
    }
}

/// A webhook the load posted.
#[derive(Clone, Debug)]
pub struct Posted {
    pub seq: u64,
    pub kind: Kind,
    pub account: String,
    pub data_status: Option<&'static str>,
    pub body: Vec<u8>,
}

/// Settings of a load.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    pub per_second: u32,
    pub accounts: u64,
    /// Which kinds to post, chosen in turn by a hash of the sequence number.
    pub kinds: Vec<Kind>,
}

/// How many times a webhook that got no 200 is posted again, and the first wait (doubling to 8 s):
/// about 24 s in all, like a sender that retries.
pub const REPOSTS: u32 = 6;
const FIRST_REPOST_AFTER: Duration = Duration::from_millis(500);

/// The webhooks that got each answer.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Webhooks posted (each counted once, however often it was posted again).
    pub posted: u64,
    /// Webhooks that never got a 200, after every re-post.
    pub given_up: u64,
    /// Posts beyond each webhook's first.
    pub reposts: u64,
    /// Delivery id → what was posted, for every 200.
    pub accepted: BTreeMap<String, Posted>,
    /// Ids ingest gave to two different webhooks (never: each 200 names its own delivery), kept
    /// apart so that the map above cannot merge them silently.
    pub reused_ids: Vec<String>,
    pub statuses: BTreeMap<u16, u64>,
    /// Posts that got no HTTP answer at all (connection refused or reset).
    pub no_answer: u64,
    /// What the first few of those failed with, for the report.
    pub no_answer_errors: Vec<String>,
    /// Every post that got no 200 (an error status or no answer): ingest promised nothing for it,
    /// yet the broker may have taken one whose confirm came too late, so it may be processed.
    pub uncertain: Vec<Posted>,
    /// When each answer other than 200 came (or the request gave up).
    pub refused_at: Vec<Instant>,
    /// The longest any request waited for its answer.
    pub slowest: Duration,
}

impl LoadResult {
    /// Remembers a webhook ingest answered 200 with `id`; an id it gave before goes to `reused_ids`.
    pub fn accept(&mut self, id: String, posted: Posted) {
        match self.accepted.entry(id) {
            std::collections::btree_map::Entry::Occupied(taken) => self.reused_ids.push(taken.key().clone()),
            std::collections::btree_map::Entry::Vacant(free) => {
                free.insert(posted);
            }
        }
    }

    /// The share of webhooks that ended accepted (0 when none was posted).
    pub fn accepted_share(&self) -> f64 {
        if self.posted == 0 { 0.0 } else { (self.posted - self.given_up) as f64 / self.posted as f64 }
    }

    /// How long ingest refused webhooks, in all: the quarter-seconds in which any answer other than
    /// 200 came, so two faults far apart do not count the healthy time between them.
    pub fn unavailable_secs(&self) -> f64 {
        let Some(first) = self.refused_at.iter().min() else { return 0.0 };
        let quarters: std::collections::BTreeSet<u128> =
            self.refused_at.iter().map(|at| (*at - *first).as_millis() / 250).collect();
        quarters.len() as f64 * 0.25
    }

    /// Two loads (e.g. one per ingest) as one.
    pub fn merge(mut self, other: Self) -> Self {
        self.posted += other.posted;
        self.given_up += other.given_up;
        self.reposts += other.reposts;
        for (id, posted) in other.accepted {
            self.accept(id, posted);
        }
        self.reused_ids.extend(other.reused_ids);
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.no_answer += other.no_answer;
        self.no_answer_errors.extend(other.no_answer_errors);
        self.uncertain.extend(other.uncertain);
        self.refused_at.extend(other.refused_at);
        self.slowest = self.slowest.max(other.slowest);
        self
    }
}

pub struct Load {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<LoadResult>,
}

const DATA_STATUSES: [&str; 3] = ["AVAILABLE", "PROCESSING", "PARTIAL"];

impl Posted {
    pub fn new(seq: u64, plan: &LoadPlan) -> Self {
        let number = 1 + seq % plan.accounts;
        let account = crate::bodies::account_id(number);
        // A cheap mix so consecutive events of one account differ in kind.
        let mut kind = plan.kinds
            [((seq / plan.accounts).wrapping_mul(2_654_435_761) % plan.kinds.len() as u64) as usize];
        if kind == Kind::AccountUnlinked && !number.is_multiple_of(UNLINKED_EVERY) {
            kind = Kind::AccountConnected;
        }
        let data_status = match kind {
            Kind::AccountUpdated => Some(DATA_STATUSES[(seq % 3) as usize]),
            Kind::SyncFailed => Some("FAILED"),
            _ => None,
        };
        // Bodies shaped as Mono's (tests/fixtures). Re-auth, unlink, connect and sync-failure bodies
        // hold only the account (and its customer), so an account's episodes repeat them.
        let data = match kind {
            Kind::AccountUpdated => json!({
                "account": { "_id": account, "balance": seq },
                "meta": { "data_status": data_status },
            }),
            Kind::SyncFailed => json!({ "account": { "_id": account }, "meta": { "data_status": "FAILED" } }),
            Kind::AccountConnected => {
                json!({ "id": account, "customer": format!("cus{account}"), "meta": {} })
            }
            Kind::AccountUnlinked => json!({ "account": { "id": account } }),
            Kind::ReauthorisationRequired | Kind::AccountReauthorized => {
                json!({ "account": { "_id": account } })
            }
        };
        let body = serde_json::to_vec(&json!({ "event": kind.event(), "data": data })).expect("serialisable");
        Self { seq, kind, account, data_status, body }
    }
}

/// Posts one webhook, and posts it again after each answer other than 200 (or none), as Mono does.
async fn post_until_accepted(http: &reqwest::Client, url: &str, posted: Posted, result: &Mutex<LoadResult>) {
    let mut wait = FIRST_REPOST_AFTER;
    for attempt in 0..=REPOSTS {
        let sent_at = Instant::now();
        let sent = http
            .post(url)
            .header("mono-webhook-secret", WEBHOOK_SECRET)
            .body(posted.body.clone())
            .send()
            .await;
        let answered_at = Instant::now();
        let mut failure = None;
        let (status, id) = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let id = match response.json::<serde_json::Value>().await {
                    Ok(answer) if status == 200 => answer["id"].as_str().map(str::to_owned),
                    _ => None,
                };
                (Some(status), id)
            }
            Err(error) => {
                // The cause chain: reqwest's own message says little ("error sending request").
                let mut text = error.to_string();
                let mut source = std::error::Error::source(&error);
                while let Some(cause) = source {
                    text.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                failure = Some(text);
                (None, None)
            }
        };
        let mut result = result.lock().await;
        result.slowest = result.slowest.max(answered_at - sent_at);
        match status {
            Some(status) => *result.statuses.entry(status).or_default() += 1,
            None => {
                result.no_answer += 1;
                if result.no_answer_errors.len() < 3 {
                    result.no_answer_errors.extend(failure);
                }
            }
        }
        if let Some(id) = id {
            result.accept(id, posted);
            return;
        }
        result.refused_at.push(answered_at);
        result.uncertain.push(posted.clone());
        if attempt == REPOSTS {
            result.given_up += 1;
            return;
        }
        result.reposts += 1;
        drop(result);
        // Jitter, so that re-posts after an outage do not all come back at once.
        let jitter = Duration::from_millis(rand::random_range(0..=wait.as_millis() as u64 / 2));
        tokio::time::sleep(wait + jitter).await;
        wait = (wait * 2).min(Duration::from_secs(8));
    }
}

impl Load {
    /// Starts posting to `ingest_url` until [`Load::stop`].
    pub fn start(ingest_url: String, plan: LoadPlan) -> Self {
        Self::start_at(ingest_url, plan, 0)
    }

    /// As [`Load::start`], numbering the webhooks from `first_seq` (two loads at once must not post
    /// the same bodies).
    pub fn start_at(ingest_url: String, plan: LoadPlan, first_seq: u64) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            // Idle connections are dropped before ingest's keep-alive (actix's 5 s) can close
            // them: reusing one the server is closing fails a post that ingest never saw.
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_idle_timeout(Duration::from_secs(2))
                .build()
                .expect("client");
            let result = Arc::new(Mutex::new(LoadResult::default()));
            // Enough for the re-posts of a few seconds' outage at the load's rate.
            let in_flight = Arc::new(Semaphore::new(512));
            let mut tick = tokio::time::interval(Duration::from_secs(1) / plan.per_second.max(1));
            let mut seq = first_seq;
            let mut requests = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = token.cancelled() => break,
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let posted = Posted::new(seq, &plan);
                seq += 1;
                result.lock().await.posted += 1;
                let (http, url, result) =
                    (http.clone(), format!("{ingest_url}/webhooks/mono"), result.clone());
                requests.spawn(async move {
                    post_until_accepted(&http, &url, posted, &result).await;
                    drop(permit);
                });
            }
            while requests.join_next().await.is_some() {}
            Arc::try_unwrap(result).map(Mutex::into_inner).unwrap_or_default()
        });
        Self { stop, task }
    }

    /// Stops posting and returns what happened to every webhook.
    pub async fn stop(self) -> LoadResult {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_given_twice_is_kept_apart_never_merged() {
        let plan = LoadPlan { per_second: 1, accounts: 2, kinds: vec![Kind::AccountUpdated] };
        let mut one = LoadResult::default();
        one.accept("id-1".into(), Posted::new(1, &plan));
        one.accept("id-1".into(), Posted::new(2, &plan));
        assert_eq!(one.reused_ids, ["id-1"]);
        let mut other = LoadResult::default();
        other.accept("id-2".into(), Posted::new(3, &plan));
        other.accept("id-3".into(), Posted::new(4, &plan));
        let mut two = LoadResult::default();
        two.accept("id-2".into(), Posted::new(5, &plan));
        let merged = one.merge(other).merge(two);
        assert_eq!(merged.reused_ids, ["id-1", "id-2"], "one per ingest, the same id: a reuse");
        assert_eq!(merged.accepted.len(), 3);
    }
}
