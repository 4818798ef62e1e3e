//! `worker status`: what an operator checks first. `--check` turns it into a probe for cron jobs and
//! monitors: exit 1 when a worker is not ready, Mono's circuit is open or refuses the key, or dead
//! letters are waiting (and, as a problem of its own, when some have waited longer than
//! `DEAD_LETTER_MAX_AGE_DAYS`: retention never deletes a dead letter, so someone must decide).

use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use std::time::Duration;

use super::dlq::list_age as age;
use super::output;
use shared::config::BrokerArgs;
use shared::topology::Topology;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A worker's METRICS_ADDR, asked for its readiness and Mono circuit (`/readyz`; repeatable).
    #[arg(long = "worker-url", default_value = "http://127.0.0.1:9090")]
    pub worker_urls: Vec<String>,
    /// Exit 1 when a worker is unreachable or not ready, a worker's Mono circuit is open or Mono
    /// refuses its key, or dead letters are waiting (the `problems` say which).
    #[arg(long)]
    pub check: bool,
    /// Days a dead letter may wait before `--check` reports it as old (retention never deletes
    /// one: replay or purge it).
    #[arg(long, env = "DEAD_LETTER_MAX_AGE_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub dead_letter_max_age_days: u64,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `worker status --json`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Every queue of the topology, in the order an operator reads them; empty if they could not be
    /// read (`queues_error` says why).
    pub queues: Vec<QueueState>,
    pub queues_error: Option<String>,
    /// Why the database could not be read (unreachable, missing, or a schema not this binary's);
    /// `null` when it was. The parts read from it are then `null`.
    pub database_error: Option<String>,
    pub dead_letters: Option<DeadLetters>,
    /// The newest event processed (any status but `dead`); `null` before the first.
    pub last_processed: Option<LastProcessed>,
    /// Replays and purges an earlier version left unfinished (its queue walks).
    pub unfinished_actions: Option<i64>,
    pub workers: Vec<WorkerState>,
    /// What `--check` fails on; empty when all is well. Computed with or without `--check`.
    pub problems: Vec<Problem>,
    /// Whether `problems` is empty (what `--check` exits 0 on).
    pub ok: bool,
}

#[derive(Debug, Serialize)]
pub struct QueueState {
    pub queue: String,
    /// `work`, `retry` or `dead`.
    pub role: &'static str,
    /// Ready messages (not those a consumer holds unacked).
    pub messages: u32,
    pub consumers: u32,
    /// `false` when the broker answered without the queue's leader: it lists no consumer on the
    /// work queue while a worker reports consuming it, so its 0 messages mean nothing.
    pub depth_known: bool,
}

#[derive(Debug, Serialize)]
pub struct DeadLetters {
    /// Dead letters waiting for an operator (`dead_letters` rows).
    pub stored: i64,
    /// Messages in the dead-letter queue not yet drained into rows by a worker; `null` if the
    /// queues could not be read.
    pub in_queue: Option<u32>,
    /// Replay copies in the outbox not yet published by a worker.
    pub outbox: i64,
    /// When the oldest stored dead letter was dead-lettered.
    pub oldest_at: Option<DateTime<Utc>>,
    /// Stored dead letters older than `DEAD_LETTER_MAX_AGE_DAYS`.
    pub older_than_max_age: i64,
    pub max_age_days: u64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct LastProcessed {
    pub event: String,
    pub status: String,
    pub received_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
    /// Milliseconds from ingest's receipt to processing.
    #[sqlx(skip)]
    pub lag_ms: Option<i64>,
}

/// A worker's `/readyz`, as it answered.
#[derive(Debug, Serialize)]
pub struct WorkerState {
    pub url: String,
    /// Whether `/readyz` answered at all (within a second).
    pub reachable: bool,
    /// Whether it answered `status: ready`.
    pub ready: bool,
    /// The fields of `/readyz`; `null` when unreachable or missing from the answer.
    pub status: Option<String>,
    pub database: Option<String>,
    pub broker: Option<String>,
    pub consumer: Option<String>,
    pub mono_circuit: Option<String>,
    pub mono_key: Option<String>,
    /// The status Mono refuses every account with (taken as ours), `null` while it does not.
    pub mono_refusing_alike: Option<u64>,
}

/// One reason `--check` fails.
#[derive(Debug, Serialize)]
pub struct Problem {
    /// `worker_unreachable`, `worker_not_ready`, `mono_circuit_open`, `mono_key_refused`,
    /// `mono_refusing_alike`,
    /// `dead_letters_waiting`, `dead_letters_old` or `queues_unreadable`.
    pub check: &'static str,
    /// What it is about: a worker URL, or a queue.
    pub subject: String,
    pub detail: String,
}

/// Prints what can be read. `pool` is the database or why it cannot be used: either way the
/// broker and the workers are still reported, and a part that cannot be reached makes it exit 1.
pub async fn run(pool: anyhow::Result<PgPool>, broker: &BrokerArgs, args: &StatusArgs) -> anyhow::Result<()> {
    let topology = broker.topology();
    let (pool, database_error) = match pool {
        Ok(pool) => (Some(pool), None),
        Err(error) => (None, Some(format!("{error:#}"))),
    };
    let (status, broker_reached) = gather(pool.as_ref(), database_error, broker, &topology, args).await?;
    if args.json {
        output::document(&status)?;
    } else {
        print_text(&status, args.check);
    }
    if let Some(error) = &status.database_error {
        anyhow::bail!("the database could not be read: {error}");
    }
    if !broker_reached {
        anyhow::bail!("RabbitMQ could not be reached: {}", status.queues_error.as_deref().unwrap_or("?"));
    }
    if args.check && !status.ok {
        let checks: Vec<&str> = status.problems.iter().map(|p| p.check).collect();
        anyhow::bail!("status check failed: {}", checks.join(", "));
    }
    Ok(())
}

/// Everything `status` reports, and whether the broker was reached at all.
async fn gather(
    pool: Option<&PgPool>,
    database_error: Option<String>,
    broker: &BrokerArgs,
    topology: &Topology,
    args: &StatusArgs,
) -> anyhow::Result<(Status, bool)> {
    let depths = async {
        let connection = shared::amqp::connect(&broker.amqp_url, "monohook-status").await?;
        // The channel lives until the connection is closed: dropped before, it would close itself
        // while the connection closes, and lapin logs that race as an error on stderr.
        let channel = connection.create_channel().await;
        let depths = match &channel {
            Ok(channel) => Ok(topology.depths(channel).await),
            Err(error) => Err(anyhow::anyhow!("cannot open a channel: {error}")),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "done".into())).await;
        drop(channel);
        depths
    };
    let (depths, broker_reached) = match tokio::time::timeout(Duration::from_secs(20), depths).await {
        Ok(Ok(depths)) => (depths.map_err(|e| e.to_string()), true),
        Ok(Err(error)) => (Err(format!("cannot reach RabbitMQ: {error:#}")), false),
        Err(_) => (Err("RabbitMQ did not answer within 20 s".to_owned()), false),
    };
    let (queues, queues_error) = match depths {
        Ok(depths) => {
            let queues = depths
                .into_iter()
                .map(|depth| QueueState {
                    role: role(topology, &depth.queue),
                    queue: depth.queue,
                    messages: depth.messages,
                    consumers: depth.consumers,
                    depth_known: true,
                })
                .collect();
            (queues, None)
        }
        Err(error) => (Vec::new(), Some(error)),
    };
    let (dead_letters, last_processed, unfinished_actions) = match pool {
        Some(pool) => {
            let (dead, last, unfinished) = from_database(pool, args, &queues).await?;
            (Some(dead), last, Some(unfinished))
        }
        None => (None, None, None),
    };

    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?;
    let mut workers = Vec::new();
    for url in &args.worker_urls {
        workers.push(ask_worker(&http, url).await);
    }

    let mut queues = queues;
    mark_unknown_depths(&mut queues, &workers);
    let mut status = Status {
        queues,
        queues_error,
        database_error,
        dead_letters,
        last_processed,
        unfinished_actions,
        workers,
        problems: Vec::new(),
        ok: true,
    };
    status.problems = problems(&status, topology);
    status.ok = status.problems.is_empty();
    Ok((status, broker_reached))
}

/// The parts of the status the database holds.
async fn from_database(
    pool: &PgPool,
    args: &StatusArgs,
    queues: &[QueueState],
) -> anyhow::Result<(DeadLetters, Option<LastProcessed>, i64)> {
    let max_age_days = args.dead_letter_max_age_days;
    let (stored, oldest_at, older_than_max_age, outbox): (i64, Option<DateTime<Utc>>, i64, i64) = sqlx::query_as(
        "SELECT count(*), min(dead_at), count(*) FILTER (WHERE dead_at < now() - make_interval(days => $1)),
             (SELECT count(*) FROM outbox)
         FROM dead_letters",
    )
    .bind(i32::try_from(max_age_days).unwrap_or(i32::MAX))
    .fetch_one(pool)
    .await?;
    let in_queue = queues.iter().find(|q| q.role == "dead").map(|q| q.messages);
    let dead_letters = DeadLetters { stored, in_queue, outbox, oldest_at, older_than_max_age, max_age_days };
    // The newest by id (ids are UUIDv7: receive order), read backwards along each partition's key:
    // bounded time on a journal of any size, where sorting by `processed_at` is not.
    let mut last_processed: Option<LastProcessed> = sqlx::query_as(
        "SELECT event, status, received_at, processed_at FROM webhook_events WHERE status <> 'dead'
         ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    if let Some(last) = last_processed.as_mut() {
        last.lag_ms = last.processed_at.map(|p| (p - last.received_at).num_milliseconds());
    }
    let unfinished_actions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letter_actions WHERE completed_at IS NULL")
            .fetch_one(pool)
            .await?;

    Ok((dead_letters, last_processed, unfinished_actions))
}

fn role(topology: &Topology, queue: &str) -> &'static str {
    if queue == topology.work_queue() {
        "work"
    } else if queue == topology.dead_queue() {
        "dead"
    } else {
        "retry"
    }
}

async fn ask_worker(http: &reqwest::Client, url: &str) -> WorkerState {
    let answer = http.get(format!("{}/readyz", url.trim_end_matches('/'))).send().await;
    let body: Option<Value> = match answer {
        Ok(response) => Some(response.json().await.unwrap_or_default()),
        Err(_) => None,
    };
    let field = |name: &str| body.as_ref().and_then(|b| b[name].as_str()).map(str::to_owned);
    let status = field("status");
    WorkerState {
        url: url.to_owned(),
        reachable: body.is_some(),
        ready: status.as_deref() == Some("ready"),
        database: field("database"),
        broker: field("broker"),
        consumer: field("consumer"),
        mono_circuit: field("mono_circuit"),
        mono_key: field("mono_key"),
        mono_refusing_alike: body.as_ref().and_then(|b| b["mono_refusing_alike"].as_u64()),
        status,
    }
}

/// What `--check` fails on.
/// A worker consuming the work queue while the broker lists no consumer on it: the broker answered
/// without the queue's leader (an election, lost quorum), and the depth is unknown, not 0.
fn mark_unknown_depths(queues: &mut [QueueState], workers: &[WorkerState]) {
    let someone_consumes = workers.iter().any(|w| w.consumer.as_deref() == Some("alive"));
    for queue in queues.iter_mut().filter(|q| q.role == "work") {
        queue.depth_known = !(someone_consumes && queue.consumers == 0);
    }
}

fn problems(status: &Status, topology: &Topology) -> Vec<Problem> {
    let mut problems = Vec::new();
    for queue in status.queues.iter().filter(|q| !q.depth_known) {
        problems.push(Problem {
            check: "queue_depth_unknown",
            subject: queue.queue.clone(),
            detail: "the broker lists no consumer while a worker consumes it: its leader did not answer"
                .to_owned(),
        });
    }
    for worker in &status.workers {
        let subject = worker.url.clone();
        if !worker.reachable {
            problems.push(Problem {
                check: "worker_unreachable",
                subject,
                detail: "/readyz did not answer (nothing listens there, or no answer within 1 s)".to_owned(),
            });
            continue;
        }
        if !worker.ready {
            let unhealthy: Vec<String> = [
                ("database", &worker.database, "up"),
                ("broker", &worker.broker, "connected"),
                ("consumer", &worker.consumer, "alive"),
            ]
            .into_iter()
            .filter(|(_, value, good)| value.as_deref() != Some(*good))
            .map(|(name, value, _)| format!("{name} {}", value.as_deref().unwrap_or("?")))
            .collect();
            let detail = if unhealthy.is_empty() {
                format!("status {}", worker.status.as_deref().unwrap_or("?"))
            } else {
                unhealthy.join(", ")
            };
            problems.push(Problem { check: "worker_not_ready", subject: subject.clone(), detail });
        }
        if worker.mono_circuit.as_deref() == Some("open") {
            problems.push(Problem {
                check: "mono_circuit_open",
                subject: subject.clone(),
                detail: "the worker stopped calling Mono; re-auth deliveries are parked".to_owned(),
            });
        }
        if worker.mono_key.as_deref() == Some("refused") {
            problems.push(Problem {
                check: "mono_key_refused",
                subject: subject.clone(),
                detail: "Mono answers 401/403 to the worker's MONO_SECRET_KEY".to_owned(),
            });
        }
        if let Some(status) = worker.mono_refusing_alike {
            problems.push(Problem {
                check: "mono_refusing_alike",
                subject,
                detail: format!("Mono answers {status} to every account: is MONO_API_URL right?"),
            });
        }
    }
    if let Some(error) = &status.database_error {
        problems.push(Problem {
            check: "database_unreadable",
            subject: "database".to_owned(),
            detail: error.clone(),
        });
    }
    let none = DeadLetters {
        stored: 0,
        in_queue: None,
        outbox: 0,
        oldest_at: None,
        older_than_max_age: 0,
        max_age_days: 0,
    };
    let dead = status.dead_letters.as_ref().unwrap_or(&none);
    if dead.stored > 0 || dead.in_queue.unwrap_or(0) > 0 {
        let in_queue = dead.in_queue.map_or_else(|| "?".to_owned(), |n| n.to_string());
        problems.push(Problem {
            check: "dead_letters_waiting",
            subject: topology.dead_queue(),
            detail: format!("{} stored, {in_queue} in the dead-letter queue not yet stored", dead.stored),
        });
    }
    if dead.older_than_max_age > 0 {
        problems.push(Problem {
            check: "dead_letters_old",
            subject: topology.dead_queue(),
            detail: format!(
                "{} dead letters have waited more than {} days (DEAD_LETTER_MAX_AGE_DAYS); retention \
                 keeps them until they are replayed or purged",
                dead.older_than_max_age, dead.max_age_days
            ),
        });
    }
    if let Some(error) = &status.queues_error {
        problems.push(Problem {
            check: "queues_unreadable",
            subject: topology.work_queue(),
            detail: error.clone(),
        });
    }
    problems
}

fn print_text(status: &Status, check: bool) {
    println!("{:<40} {:>9} {:>10}", "queue", "messages", "consumers");
    for queue in &status.queues {
        if queue.depth_known {
            println!("{:<40} {:>9} {:>10}", queue.queue, queue.messages, queue.consumers);
        } else {
            println!("{:<40} {:>9} {:>10}  (no leader answered)", queue.queue, "unknown", "unknown");
        }
    }
    if let Some(error) = &status.queues_error {
        println!("queues not declared yet ({error})");
    }
    match &status.dead_letters {
        Some(dead) => {
            println!("\ndead letters stored           {} (oldest {})", dead.stored, age(dead.oldest_at));
            if dead.outbox > 0 {
                println!("replay copies to publish      {}", dead.outbox);
            }
        }
        None => {
            println!("\ndatabase not readable         {}", status.database_error.as_deref().unwrap_or("?"))
        }
    }
    match &status.last_processed {
        Some(last) => println!(
            "last processed event          {} ({}) {} ago, {} ms after ingest received it",
            last.event,
            last.status,
            age(last.processed_at),
            last.lag_ms.unwrap_or_default()
        ),
        None => println!("last processed event          none yet"),
    }
    if let Some(unfinished) = status.unfinished_actions.filter(|n| *n > 0) {
        println!("unfinished replays/purges     {unfinished} (left by an earlier version's queue walks)");
    }
    for worker in &status.workers {
        if worker.reachable {
            let field = |value: &Option<String>| value.clone().unwrap_or_else(|| "?".to_owned());
            println!(
                "worker {:<24} {} (Mono circuit {}, database {}, broker {})",
                worker.url,
                field(&worker.status),
                field(&worker.mono_circuit),
                field(&worker.database),
                field(&worker.broker),
            );
        } else {
            println!("worker {:<24} not reachable", worker.url);
        }
    }
    if check {
        if status.ok {
            println!("\ncheck passed");
        } else {
            println!("\ncheck failed:");
            for problem in &status.problems {
                println!("  {:<22} {}: {}", problem.check, problem.subject, problem.detail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(url: &str, readyz: Option<Value>) -> WorkerState {
        let field = |name: &str| readyz.as_ref().and_then(|b| b[name].as_str()).map(str::to_owned);
        WorkerState {
            url: url.to_owned(),
            reachable: readyz.is_some(),
            ready: field("status").as_deref() == Some("ready"),
            status: field("status"),
            database: field("database"),
            broker: field("broker"),
            consumer: field("consumer"),
            mono_circuit: field("mono_circuit"),
            mono_key: field("mono_key"),
            mono_refusing_alike: readyz.as_ref().and_then(|b| b["mono_refusing_alike"].as_u64()),
        }
    }

    fn status(workers: Vec<WorkerState>, dead_in_journal: i64) -> Status {
        Status {
            queues: Vec::new(),
            queues_error: None,
            database_error: None,
            dead_letters: Some(DeadLetters {
                stored: dead_in_journal,
                in_queue: Some(0),
                outbox: 0,
                oldest_at: None,
                older_than_max_age: dead_in_journal / 2,
                max_age_days: 30,
            }),
            last_processed: None,
            unfinished_actions: Some(0),
            workers,
            problems: Vec::new(),
            ok: true,
        }
    }

    #[test]
    fn a_work_queue_with_no_consumer_while_a_worker_consumes_has_an_unknown_depth() {
        let queue = |consumers| QueueState {
            queue: "p.work".into(),
            role: "work",
            messages: 0,
            consumers,
            depth_known: true,
        };
        let consuming = vec![worker("w1", readyz("ready", "up", "closed", "accepted"))];
        let mut queues = vec![queue(0)];
        mark_unknown_depths(&mut queues, &consuming);
        assert!(!queues[0].depth_known, "the leader did not answer");
        let mut with_consumer = vec![queue(1)];
        mark_unknown_depths(&mut with_consumer, &consuming);
        assert!(with_consumer[0].depth_known);
        let mut nobody = vec![queue(0)];
        mark_unknown_depths(&mut nobody, &[worker("w1", None)]);
        assert!(nobody[0].depth_known, "no worker consumes: 0 consumers may be true");

        let mut unknown = status(consuming, 0);
        unknown.queues = queues;
        let checks: Vec<&str> =
            problems(&unknown, &Topology::new("p", vec![], 10)).iter().map(|p| p.check).collect();
        assert!(checks.contains(&"queue_depth_unknown"), "{checks:?}");
    }

    fn readyz(status: &str, database: &str, circuit: &str, key: &str) -> Option<Value> {
        Some(serde_json::json!({
            "status": status, "database": database, "broker": "connected", "consumer": "alive",
            "mono_circuit": circuit, "mono_key": key,
            "mono_refusing_alike": if key == "refused" { Some(404) } else { None },
        }))
    }

    #[test]
    fn each_check_names_its_worker_and_a_healthy_fleet_has_none() {
        let topology = Topology::new("t", vec![Duration::from_secs(1)], 10);
        let healthy = status(vec![worker("http://a", readyz("ready", "up", "closed", "accepted"))], 0);
        assert!(problems(&healthy, &topology).is_empty());
        // Half-open is a probe under way, not a stop.
        let probing = status(vec![worker("http://a", readyz("ready", "up", "half_open", "accepted"))], 0);
        assert!(problems(&probing, &topology).is_empty());

        let troubled = status(
            vec![
                worker("http://a", readyz("not_ready", "down", "open", "refused")),
                worker("http://b", None),
            ],
            1,
        );
        let found = problems(&troubled, &topology);
        assert_eq!(
            found.iter().map(|p| (p.check, p.subject.as_str())).collect::<Vec<_>>(),
            [
                ("worker_not_ready", "http://a"),
                ("mono_circuit_open", "http://a"),
                ("mono_key_refused", "http://a"),
                ("mono_refusing_alike", "http://a"),
                ("worker_unreachable", "http://b"),
                ("dead_letters_waiting", "t.dead"),
            ]
        );
        let old = problems(&status(Vec::new(), 2), &topology);
        assert_eq!(
            old.iter().map(|p| p.check).collect::<Vec<_>>(),
            ["dead_letters_waiting", "dead_letters_old"]
        );
        assert!(
            old[1].detail.starts_with("1 dead letters have waited more than 30 days"),
            "{}",
            old[1].detail
        );
        assert_eq!(found[0].detail, "database down");
    }
}
