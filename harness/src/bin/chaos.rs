//! `chaos`: runs the chaos scenarios one after the other and prints one line each:
//! `scenario accepted processed lost double_effects dead_lettered seconds`. Exits non-zero if any
//! delivery that got a 200 was lost, any effect was doubled, or a scenario's own check failed.
//! It stops and starts the machine's RabbitMQ and PostgreSQL: run it alone (`./scripts/chaos`).

use clap::Parser;

use harness::chaos::{ScenarioReport, scenarios};
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
        scenarios::ALL.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios
    };
    let base = SystemConfig::default();
    println!("{}", ScenarioReport::header());
    let mut failed = Vec::new();
    for name in &names {
        match scenarios::run(name, &base).await {
            Ok(report) => {
                println!("{}", report.line());
                for (check, ok) in &report.checks {
                    println!("    {} {check}", if *ok { "ok    " } else { "FAILED" });
                }
                if !report.passed() {
                    failed.push(name.clone());
                }
            }
            Err(error) => {
                println!("{name:<34} error: {error:#}");
                failed.push(name.clone());
            }
        }
    }
    if !failed.is_empty() {
        eprintln!("chaos suite failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}
