//! The deploy artefacts agree with the code: alerts and the dashboard use only metrics the binaries
//! export, every alert links to a section of docs/operations.md, and every exported metric is
//! documented there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every `monohook_…` word in `text`, with histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(offset) = text[i..].find("monohook_") {
        let start = i + offset;
        let preceded_by_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        // `monohook_queue_*` in prose is a family, not a metric.
        if !preceded_by_word && !text[start..end].ends_with('_') {
            let name = &text[start..end];
            let name = ["_bucket", "_count", "_sum"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            names.insert(name.to_owned());
        }
        i = end;
    }
    names
}

/// Metric names the binaries export: string literals in the crates' sources.
fn exported_metrics() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut sources = String::new();
    for crate_dir in ["ingest/src", "worker/src", "shared/src", "mono-client/src", "api/src"] {
        walk(&root().join(crate_dir), &mut sources);
    }
    sources
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|literal| {
            literal.starts_with("monohook_") && literal.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn alerts_and_dashboard_use_only_exported_metrics() {
    let exported = exported_metrics();
    assert!(exported.len() >= 15, "found too few metrics in the sources: {exported:?}");
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/monohook.json"] {
        let used = metric_names(&read(file));
        assert!(!used.is_empty(), "{file} uses no metric");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} uses metrics the code does not export: {unknown:?}");
    }
}

#[test]
fn every_exported_metric_is_documented() {
    let documented = metric_names(&read("docs/operations.md"));
    let undocumented: Vec<_> = exported_metrics().into_iter().filter(|m| !documented.contains(m)).collect();
    assert!(undocumented.is_empty(), "docs/operations.md does not describe {undocumented:?}");
}

#[test]
fn every_alert_is_complete_and_links_to_its_runbook() {
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read("deploy/prometheus/alerts.yml")).unwrap();
    let operations = read("docs/operations.md");
    let anchors: BTreeSet<String> = operations
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|heading| heading.trim().to_lowercase().replace(' ', "-"))
        .collect();
    let alerts = rules["groups"][0]["rules"].as_sequence().expect("no rules");
    assert!(alerts.len() >= 7);
    for alert in alerts {
        let name = alert["alert"].as_str().expect("an alert without a name");
        assert!(alert["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{name} has no expr");
        assert!(alert["labels"]["severity"].as_str().is_some(), "{name} has no severity");
        for field in ["summary", "description"] {
            assert!(alert["annotations"][field].as_str().is_some(), "{name} has no {field}");
        }
        let runbook = alert["annotations"]["runbook"].as_str().unwrap_or_default();
        let anchor = runbook
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| panic!("{name}: runbook {runbook}"));
        assert!(anchors.contains(anchor), "{name} links to a missing section #{anchor}");
    }
}

#[test]
fn the_dashboard_is_valid_with_unique_panel_ids() {
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/monohook.json")).unwrap();
    assert_eq!(dashboard["uid"], "monohook");
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("no panels") {
        let id = panel["id"].as_u64().expect("a panel without an id");
        assert!(ids.insert(id), "panel id {id} is used twice");
    }
}

/// Every environment variable a binary's `--help` lists.
fn env_vars_of(binary: &str) -> BTreeSet<String> {
    let path = harness::process::bin_dir().join(binary);
    let output = std::process::Command::new(&path)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (build the binaries first)", path.display()));
    let help = String::from_utf8(output.stdout).unwrap();
    help.split("[env: ").skip(1).filter_map(|rest| rest.split([']', '=']).next()).map(str::to_owned).collect()
}

#[test]
fn the_readme_documents_every_setting_of_every_binary() {
    let readme = read("README.md");
    for binary in ["ingest", "worker", "api"] {
        let vars = env_vars_of(binary);
        assert!(vars.len() >= 10, "{binary} --help lists too few settings: {vars:?}");
        let missing: Vec<_> = vars.iter().filter(|v| !readme.contains(&format!("`{v}`"))).collect();
        assert!(missing.is_empty(), "README.md does not document {binary}'s {missing:?}");
    }
}

fn compose() -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&read("docker-compose.yml")).unwrap()
}

/// A service's environment with `<<:` merges resolved.
fn environment(service: &serde_yaml_ng::Value) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if let Some(map) = service["environment"].as_mapping() {
        for (key, value) in map {
            match key.as_str() {
                Some("<<") => {
                    for (merged, _) in value.as_mapping().expect("a merged mapping") {
                        keys.insert(merged.as_str().unwrap().to_owned());
                    }
                }
                Some(key) => {
                    keys.insert(key.to_owned());
                }
                None => {}
            }
        }
    }
    keys
}

fn env_value(service: &serde_yaml_ng::Value, key: &str) -> Option<String> {
    let map = service["environment"].as_mapping()?;
    let direct = map.get(key).and_then(|v| v.as_str().map(str::to_owned));
    direct.or_else(|| map.get("<<")?.as_mapping()?.get(key)?.as_str().map(str::to_owned))
}

#[test]
fn compose_gives_every_binary_every_setting_it_reads() {
    let compose = compose();
    for (service, binary) in [("ingest", "ingest"), ("worker", "worker"), ("api", "api")] {
        let set = environment(&compose["services"][service]);
        let missing: Vec<_> = env_vars_of(binary).into_iter().filter(|v| !set.contains(v)).collect();
        assert!(missing.is_empty(), "compose service {service} does not set {missing:?}");
    }
    let sim = environment(&compose["services"]["mono-sim"]);
    assert!(sim.contains("SIM_SECRET_KEY") && sim.contains("SIM_LISTEN_ADDR"));
}

#[test]
fn compose_ports_and_health_checks_match_the_listen_addresses() {
    let compose = compose();
    let ingest = &compose["services"]["ingest"];
    let listen = env_value(ingest, "LISTEN_ADDR").unwrap();
    let port = listen.rsplit_once(':').unwrap().1;
    let published: Vec<&str> =
        ingest["ports"].as_sequence().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(
        published.iter().any(|p| p.ends_with(&format!(":{port}"))),
        "ingest listens on {listen} but publishes {published:?}"
    );
    assert!(listen.starts_with("0.0.0.0:"), "ingest must listen on all interfaces in a container");
    let check = serde_yaml_ng::to_string(&ingest["healthcheck"]["test"]).unwrap();
    assert!(check.contains(&format!(":{port}/readyz")), "{check}");

    let worker = &compose["services"]["worker"];
    let metrics = env_value(worker, "METRICS_ADDR").unwrap();
    let port = metrics.rsplit_once(':').unwrap().1;
    assert!(metrics.starts_with("0.0.0.0:"));
    let check = serde_yaml_ng::to_string(&worker["healthcheck"]["test"]).unwrap();
    assert!(check.contains(&format!(":{port}/readyz")), "{check}");
    assert!(worker["ports"].is_null(), "a published worker port would stop `--scale worker=3`");

    let api = &compose["services"]["api"];
    let listen = env_value(api, "LISTEN_ADDR").unwrap();
    let port = listen.rsplit_once(':').unwrap().1;
    assert!(listen.starts_with("0.0.0.0:"));
    let published: Vec<&str> =
        api["ports"].as_sequence().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(published.iter().any(|p| p.ends_with(&format!(":{port}"))), "api publishes {published:?}");
    let metrics = env_value(api, "METRICS_ADDR").unwrap();
    assert!(
        !published.iter().any(|p| p.ends_with(metrics.rsplit_once(':').unwrap().1)),
        "metrics stay private"
    );
    let check = serde_yaml_ng::to_string(&api["healthcheck"]["test"]).unwrap();
    assert!(check.contains(&format!(":{port}/readyz")), "{check}");
    assert_eq!(api["depends_on"]["worker"]["condition"], "service_healthy", "the worker migrates first");

    let sim = &compose["services"]["mono-sim"];
    assert_eq!(sim["profiles"][0], "demo");
    let amqp = env_value(ingest, "AMQP_URL").unwrap();
    assert!(amqp.contains("@rabbitmq:5672/"), "{amqp}");
    assert!(env_value(worker, "DATABASE_URL").unwrap().contains("@postgres:5432/"));
}

#[test]
fn compose_starts_nothing_before_what_it_needs_and_builds_from_this_repository() {
    let compose = compose();
    for (service, needs) in [("ingest", vec!["rabbitmq"]), ("worker", vec!["postgres", "rabbitmq"])] {
        let depends = &compose["services"][service]["depends_on"];
        for need in needs {
            assert_eq!(depends[need]["condition"], "service_healthy", "{service} must wait for {need}");
            assert!(
                compose["services"][need]["healthcheck"]["test"].is_sequence(),
                "{need} has no health check"
            );
        }
    }
    for service in ["ingest", "worker", "mono-sim"] {
        let context = compose["services"][service]["build"].as_str().unwrap_or_default();
        assert!(
            root().join(context).join("Dockerfile").exists(),
            "{service} builds from {context:?}, which has no Dockerfile"
        );
    }
    let dockerfile = read("Dockerfile");
    for binary in ["ingest", "worker", "mono-sim"] {
        assert!(dockerfile.contains(&format!("--bin {binary}")), "the Dockerfile does not build {binary}");
    }
    assert!(dockerfile.contains("USER monohook"), "the runtime image must not run as root");
}

#[test]
fn every_secret_compose_interpolates_has_an_example_and_env_is_ignored() {
    let text = read("docker-compose.yml");
    let example = read(".env.example");
    let mut referenced = BTreeSet::new();
    for piece in text.split("${").skip(1) {
        let name = piece.split(['}', ':', '-']).next().unwrap();
        referenced.insert(name.to_owned());
    }
    assert!(referenced.contains("MONO_WEBHOOK_SECRET") && referenced.contains("MONO_SECRET_KEY"));
    for name in &referenced {
        assert!(example.lines().any(|l| l.starts_with(&format!("{name}="))), ".env.example lacks {name}");
    }
    assert!(read(".gitignore").lines().any(|l| l.trim() == ".env"), ".env must be git-ignored");
}
