//! `chaos`: runs the chaos scenarios one after the other and prints one line each:
//! `scenario accepted processed lost double_effects dead_lettered seconds`. Exits non-zero if any
//! delivery that got a 200 was lost, any effect was doubled, or a scenario's own check failed.
//! It stops and starts the machine's RabbitMQ and PostgreSQL: run it alone (`./scripts/chaos`).

use clap::Parser;

use harness::chaos::cluster::Cluster;
use harness::chaos::{ScenarioReport, on_cluster, scenarios};
use harness::system::SystemConfig;

#[derive(Debug, Parser)]
#[command(name = "chaos", about = "Fault-injection suite for monohook")]
struct Args {
    /// Scenarios to run (default: all), by name.
    scenarios: Vec<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let names: Vec<String> = if args.scenarios.is_empty() {
        scenarios::ALL.iter().chain(&on_cluster::ALL).map(|s| s.to_string()).collect()
    } else {
        args.scenarios
    };
    let base = SystemConfig::default();
    // The three-node cluster runs only while its scenarios do, and is always stopped again.
    let mut cluster = None;
    println!("{}", ScenarioReport::header());
    let mut failed = Vec::new();
    for name in &names {
        if on_cluster::ALL.contains(&name.as_str()) && cluster.is_none() {
            match Cluster::up() {
                Ok(up) => cluster = Some(up),
                Err(error) => {
                    println!("{name:<34} error: {error:#}");
                    failed.push(format!("{name}: the cluster did not come up: {error:#}"));
                    continue;
                }
            }
        }
        match scenarios::run(name, &base).await {
            Ok(report) => {
                println!("{}", report.line());
                for (check, ok) in &report.checks {
                    println!("    {} {check}", if *ok { "ok    " } else { "FAILED" });
                }
                for note in &report.notes {
                    println!("    note   {note}");
                }
                let failures = report.failures();
                if !failures.is_empty() {
                    failed.push(format!("{name}: {}", failures.join("; ")));
                }
            }
            Err(error) => {
                println!("{name:<34} error: {error:#}");
                failed.push(format!("{name}: {error:#}"));
            }
        }
    }
    drop(cluster);
    if !failed.is_empty() {
        eprintln!("chaos suite failed:");
        for failure in &failed {
            eprintln!("  {failure}");
        }
        std::process::exit(1);
    }
}
