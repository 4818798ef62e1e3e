//! The deploy artefacts agree with the code: alerts and the dashboard use only metrics the binaries
//! export, every alert links to a section of docs/operations.md, every exported metric is documented
//! there, and the compose file and the Kubernetes manifests give each binary settings it reads, at
//! the ports it serves.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
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
    // A string literal that is a whole metric name: `"monohook_…"`, quote to quote. (Splitting the
    // sources at every quote would pair the wrong quotes after an escaped one.)
    sources
        .match_indices("\"monohook_")
        .filter_map(|(start, _)| {
            let rest = &sources[start + 1..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            rest[end..].starts_with('"').then(|| rest[..end].to_owned())
        })
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

/// The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn alert_rules() -> Vec<serde_yaml_ng::Value> {
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read("deploy/prometheus/alerts.yml")).unwrap();
    rules["groups"][0]["rules"].as_sequence().expect("no rules").clone()
}

#[test]
fn every_alert_is_complete_and_links_to_its_runbook() {
    let operations = read("docs/operations.md");
    let anchors: BTreeSet<String> =
        operations.lines().filter_map(|l| l.strip_prefix("### ")).map(anchor_of).collect();
    let alerts = alert_rules();
    assert!(alerts.len() >= 7);
    let mut bases = BTreeSet::new();
    for alert in &alerts {
        let name = alert["alert"].as_str().expect("an alert without a name");
        assert!(alert["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{name} has no expr");
        assert!(alert["labels"]["severity"].as_str().is_some(), "{name} has no severity");
        for field in ["summary", "description"] {
            assert!(alert["annotations"][field].as_str().is_some(), "{name} has no {field}");
        }
        // An absolute link, as Alertmanager's receivers (chat, pager) show it outside Prometheus.
        let runbook = alert["annotations"]["runbook_url"].as_str().unwrap_or_default();
        let (base, anchor) =
            runbook.split_once('#').unwrap_or_else(|| panic!("{name}: runbook_url {runbook:?}"));
        assert!(
            base.starts_with("https://") && base.ends_with("/docs/operations.md"),
            "{name}: runbook_url {runbook:?} is not an absolute link to docs/operations.md"
        );
        assert!(anchors.contains(anchor), "{name} links to a missing section #{anchor}");
        bases.insert(base.to_owned());
    }
    // One base, the one docs/operations.md tells operators how to rewrite.
    assert_eq!(bases.len(), 1, "the alerts link to several bases: {bases:?}");
    let base = bases.pop_first().unwrap();
    assert!(operations.contains(&base), "docs/operations.md does not name the runbook base {base}");
    let tests = read("deploy/prometheus/alerts_test.yml");
    for line in tests.lines().filter_map(|l| l.trim().strip_prefix("runbook_url: ")) {
        assert!(line.trim_matches('"').starts_with(&format!("{base}#")), "alerts_test.yml: {line}");
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

/// The compose file with its YAML merge keys (`<<: *anchor`) resolved.
fn compose() -> serde_yaml_ng::Value {
    let mut compose: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read("docker-compose.yml")).unwrap();
    compose.apply_merge().expect("merge keys resolve");
    compose
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
    let metrics_port = env_value(ingest, "METRICS_ADDR").unwrap().rsplit_once(':').unwrap().1.to_owned();
    assert!(
        !published.iter().any(|p| p.ends_with(&format!(":{metrics_port}"))),
        "ingest's /metrics must not be published: {published:?}"
    );
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

/// The `--help` of a compose service's command (`mono-sim serve --help` for `[mono-sim, serve]`).
fn help_of(command: &[&str]) -> String {
    let path = harness::process::bin_dir().join(command[0]);
    let output = std::process::Command::new(&path)
        .args(&command[1..])
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (build the binaries first)", path.display()));
    String::from_utf8(output.stdout).unwrap()
}

/// The default `--help` gives the option read from `var`, taken from that option's own lines.
fn default_of(help: &str, var: &str) -> Option<String> {
    let lines: Vec<&str> = help.lines().collect();
    let env_line = lines.iter().position(|l| l.contains(&format!("[env: {var}=")))?;
    let is_option = |l: &&str| l.trim_start().starts_with('-');
    let start = lines[..=env_line].iter().rposition(is_option)?;
    let end = lines[env_line..].iter().position(is_option).map_or(lines.len(), |e| env_line + e);
    let block = lines[start..end].join("\n");
    Some(block.split("[default: ").nth(1)?.split(']').next()?.to_owned())
}

/// Prometheus's scrape jobs, each with the hosts and ports it scrapes: DNS names (one target per
/// address the name has, so per replica) or static targets.
fn scrape_jobs() -> BTreeMap<String, BTreeSet<(String, u64)>> {
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/prometheus/prometheus.yml")).unwrap();
    let mut jobs = BTreeMap::new();
    for job in config["scrape_configs"].as_sequence().expect("no scrape_configs") {
        let name = job["job_name"].as_str().expect("a job without a name").to_owned();
        assert!(job["metrics_path"].is_null() || job["metrics_path"] == "/metrics", "{name}");
        let mut targets = BTreeSet::new();
        for sd in job["dns_sd_configs"].as_sequence().into_iter().flatten() {
            assert_eq!(sd["type"], "A", "{name}: an A lookup gives one target per replica");
            let port = sd["port"].as_u64().unwrap_or_else(|| panic!("{name}: a DNS lookup without a port"));
            for host in sd["names"].as_sequence().unwrap() {
                targets.insert((host.as_str().unwrap().to_owned(), port));
            }
        }
        for sc in job["static_configs"].as_sequence().into_iter().flatten() {
            for target in sc["targets"].as_sequence().unwrap() {
                let (host, port) = target.as_str().unwrap().rsplit_once(':').unwrap();
                targets.insert((host.to_owned(), port.parse().unwrap()));
            }
        }
        assert!(!targets.is_empty(), "job {name} scrapes nothing");
        assert!(jobs.insert(name.clone(), targets).is_none(), "job {name} is defined twice");
    }
    jobs
}

/// The compose services built from this repository, with the command each runs.
fn monohook_services(compose: &serde_yaml_ng::Value) -> Vec<(String, Vec<String>)> {
    compose["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, service)| service["build"].is_string())
        .map(|(name, service)| {
            let command = service["command"].as_sequence().expect("a monohook service without a command");
            (
                name.as_str().unwrap().to_owned(),
                command.iter().map(|c| c.as_str().unwrap().to_owned()).collect(),
            )
        })
        .collect()
}

#[test]
fn prometheus_scrapes_every_binary_at_the_port_the_code_serves() {
    let compose = compose();
    let jobs = scrape_jobs();
    let mut scraped = BTreeSet::new();
    for (service, command) in monohook_services(&compose) {
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let help = help_of(&command);
        assert!(help.contains("[env: "), "`{} --help` lists no setting", command.join(" "));
        let Some(default) = default_of(&help, "METRICS_ADDR") else { continue };
        let code_port = port_of(&default);
        let definition = &compose["services"][service.as_str()];
        let set = env_value(definition, "METRICS_ADDR")
            .unwrap_or_else(|| panic!("compose service {service} does not set METRICS_ADDR"));
        assert!(
            set.starts_with("0.0.0.0:"),
            "{service}: METRICS_ADDR {set} is not reachable from Prometheus"
        );
        assert_eq!(
            port_of(&set),
            code_port,
            "compose moves {service}'s METRICS_ADDR off the port the code serves by default ({default})"
        );
        let exposed: Vec<u64> = definition["expose"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|p| p.as_str().map_or_else(|| p.as_u64().unwrap(), |p| p.parse().unwrap()))
            .collect();
        assert!(exposed.contains(&code_port), "{service} does not expose its metrics port {code_port}");
        let job = format!("monohook-{service}");
        let targets = jobs.get(&job).unwrap_or_else(|| {
            panic!("prometheus.yml has no job {job} for {service}'s METRICS_ADDR {default}")
        });
        assert_eq!(
            targets,
            &BTreeSet::from([(service.clone(), code_port)]),
            "job {job} must scrape {service}:{code_port}, where `{} --help` says /metrics is",
            command.join(" ")
        );
        scraped.insert(job);
    }
    for binary in ["ingest", "worker", "api"] {
        assert!(scraped.contains(&format!("monohook-{binary}")), "no job scrapes {binary}: {scraped:?}");
    }
    for job in jobs.keys().filter(|j| j.starts_with("monohook-")) {
        assert!(scraped.contains(job), "job {job} scrapes no compose service that serves /metrics");
    }
}

#[test]
fn every_scrape_job_has_an_alert_for_when_it_stops_reporting() {
    let exprs: Vec<String> = alert_rules()
        .iter()
        .map(|a| a["expr"].as_str().unwrap().split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        exprs.iter().any(|e| e == r#"up{job=~"monohook-.*"} == 0"#),
        "no alert for an instance Prometheus cannot scrape"
    );
    for job in scrape_jobs().keys().filter(|j| j.starts_with("monohook-")) {
        let absent = format!(r#"absent(up{{job="{job}"}} == 1)"#);
        assert!(exprs.contains(&absent), "no alert fires when {job} has no healthy target: {absent}");
    }
}

/// The container path a service mounts `source` (a path in this repository) at.
fn mount_of(service: &serde_yaml_ng::Value, source: &str) -> String {
    service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .find_map(|v| {
            let mut parts = v.split(':');
            (parts.next() == Some(source)).then(|| parts.next().unwrap().to_owned())
        })
        .unwrap_or_else(|| panic!("no volume mounts {source}"))
}

#[test]
fn the_observability_profile_runs_prometheus_and_grafana_on_the_repository_files() {
    let compose = compose();
    let services = &compose["services"];
    for name in ["prometheus", "grafana", "jaeger"] {
        let service = &services[name];
        assert_eq!(service["profiles"][0], "observability", "{name}");
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(port.starts_with("127.0.0.1:"), "{name} publishes {port} beyond this host");
        }
    }

    // Prometheus reads this repository's configuration, which finds its rule files beside it.
    let prometheus = &services["prometheus"];
    let config_dir = mount_of(prometheus, "./deploy/prometheus");
    let flags: Vec<&str> =
        prometheus["command"].as_sequence().unwrap().iter().filter_map(|f| f.as_str()).collect();
    assert!(flags.contains(&format!("--config.file={config_dir}/prometheus.yml").as_str()), "{flags:?}");
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/prometheus/prometheus.yml")).unwrap();
    let rule_files: Vec<&str> =
        config["rule_files"].as_sequence().unwrap().iter().filter_map(|f| f.as_str()).collect();
    assert_eq!(rule_files, ["alerts.yml"]);
    for file in rule_files {
        assert!(root().join("deploy/prometheus").join(file).exists(), "rule file {file} is missing");
    }

    // Grafana: the datasource is that Prometheus, and the dashboard is the repository's.
    let grafana = &services["grafana"];
    let grafana_dir = mount_of(grafana, "./deploy/grafana");
    assert_eq!(env_value(grafana, "GF_PATHS_PROVISIONING").unwrap(), format!("{grafana_dir}/provisioning"));
    let datasources: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/grafana/provisioning/datasources/prometheus.yml")).unwrap();
    let datasource = &datasources["datasources"][0];
    assert_eq!(datasource["type"], "prometheus");
    assert_eq!(datasource["isDefault"], true, "the dashboard's datasource variable picks the default");
    let prometheus_port = prometheus["ports"][0].as_str().unwrap().rsplit(':').next().unwrap();
    assert_eq!(datasource["url"].as_str().unwrap(), format!("http://prometheus:{prometheus_port}"));
    let dashboards: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/grafana/provisioning/dashboards/monohook.yml")).unwrap();
    let path = dashboards["providers"][0]["options"]["path"].as_str().unwrap();
    let relative = path.strip_prefix(&grafana_dir).expect("the dashboards come from the mounted folder");
    let folder = root().join("deploy/grafana").join(relative.trim_start_matches('/'));
    assert!(folder.join("monohook.json").exists(), "no monohook.json in {}", folder.display());
    assert_eq!(
        env_value(grafana, "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH").unwrap(),
        format!("{grafana_dir}/monohook.json")
    );
}

#[test]
fn every_image_from_a_registry_is_pinned_to_a_version() {
    let compose = compose();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        if service["build"].is_string() {
            continue;
        }
        let name = name.as_str().unwrap();
        let image = service["image"].as_str().unwrap_or_else(|| panic!("{name} has no image"));
        let (_, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{name}: {image} has no tag"));
        let version = tag.strip_prefix('v').unwrap_or(tag).split('-').next().unwrap();
        let parts: Vec<&str> = version.split('.').collect();
        assert!(
            parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
            "{name}: {image} is not pinned to a version (major.minor at least)"
        );
    }
}

/// Every object of every manifest under deploy/kubernetes (kustomizations aside), with its file.
fn kubernetes_objects() -> Vec<(String, serde_yaml_ng::Value)> {
    fn walk(dir: &Path, out: &mut Vec<(String, serde_yaml_ng::Value)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                for document in serde_yaml_ng::Deserializer::from_str(&text) {
                    let value = serde_yaml_ng::Value::deserialize(document).unwrap();
                    if !value.is_null() {
                        out.push((path.display().to_string(), value));
                    }
                }
            }
        }
    }
    let mut objects = Vec::new();
    walk(&root().join("deploy/kubernetes"), &mut objects);
    objects
}

fn object<'a>(
    objects: &'a [(String, serde_yaml_ng::Value)],
    kind: &str,
    name: &str,
) -> &'a serde_yaml_ng::Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn port_of(address: &str) -> u64 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn kubernetes_deployments_run_each_binary_as_the_code_serves_it() {
    let objects = kubernetes_objects();
    let config = object(&objects, "ConfigMap", "monohook-config")["data"].as_mapping().unwrap().clone();
    let secret = object(&objects, "Secret", "monohook-secrets")["stringData"].as_mapping().unwrap().clone();
    let dockerfile = read("Dockerfile");
    let uid: u64 =
        dockerfile.split("--uid ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let every_setting: BTreeSet<String> =
        ["ingest", "worker", "api"].iter().flat_map(|b| env_vars_of(b)).collect();
    for key in config.keys() {
        let key = key.as_str().unwrap();
        assert!(every_setting.contains(key), "the ConfigMap sets {key}, which no binary reads");
    }

    for (name, binary, health_setting) in [
        ("monohook-ingest", "ingest", "LISTEN_ADDR"),
        ("monohook-worker", "worker", "METRICS_ADDR"),
        ("monohook-api", "api", "LISTEN_ADDR"),
    ] {
        let deployment = object(&objects, "Deployment", name);
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(container["command"][0], binary, "{name}");
        let settings = env_vars_of(binary);
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for var in container["env"].as_sequence().unwrap() {
            let var_name = var["name"].as_str().unwrap();
            assert!(
                settings.contains(var_name),
                "{name} sets {var_name}, which `{binary} --help` does not list"
            );
            if let Some(key) = var["valueFrom"]["secretKeyRef"]["key"].as_str() {
                assert!(
                    secret.contains_key(key),
                    "{name} reads secret key {key}, missing from secret.example.yaml"
                );
            }
            env.insert(var_name.to_owned(), var["value"].as_str().unwrap_or_default().to_owned());
        }
        // Probes and scraping at the ports the code serves.
        let ports: BTreeMap<&str, u64> = container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), p["containerPort"].as_u64().unwrap()))
            .collect();
        let health_port = port_of(&env[health_setting]);
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(container[probe]["httpGet"]["path"], path, "{name} {probe}");
            let port = container[probe]["httpGet"]["port"].as_str().unwrap();
            assert_eq!(ports[port], health_port, "{name} {probe} must hit {health_setting}");
        }
        let metrics_port = port_of(env.get("METRICS_ADDR").unwrap_or_else(|| &env["LISTEN_ADDR"]));
        let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"].as_str().unwrap(), metrics_port.to_string(), "{name}");
        assert!(ports.values().any(|p| *p == metrics_port), "{name} declares no port for /metrics");
        // Hardening, sizing, shutdown.
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(uid),
            "{name} runs as the image's user"
        );
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(container["securityContext"]["capabilities"]["drop"][0], "ALL", "{name}");
        for bound in ["requests", "limits"] {
            assert!(container["resources"][bound]["memory"].is_string(), "{name} has no memory {bound}");
        }
        let grace: u64 = env["SHUTDOWN_GRACE_SECS"].parse().unwrap();
        let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            termination > grace,
            "{name}: terminationGracePeriodSeconds {termination} <= SHUTDOWN_GRACE_SECS {grace}"
        );
    }

    // Services expose the request ports only; nothing exposes /metrics.
    for (service, deployment) in [("monohook-ingest", "monohook-ingest"), ("monohook-api", "monohook-api")] {
        let container =
            &object(&objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0];
        let listen =
            container["env"].as_sequence().unwrap().iter().find(|v| v["name"] == "LISTEN_ADDR").unwrap();
        let ports: Vec<u64> = object(&objects, "Service", service)["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_u64().unwrap())
            .collect();
        assert_eq!(ports, [port_of(listen["value"].as_str().unwrap())], "{service}");
    }
    assert!(
        !objects.iter().any(|(_, o)| o["kind"] == "Service" && o["metadata"]["name"] == "monohook-worker")
    );
    for pdb in ["monohook-ingest", "monohook-worker"] {
        object(&objects, "PodDisruptionBudget", pdb);
    }
    let job = object(&objects, "Job", "monohook-migrate");
    let command: Vec<&str> = job["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(command, ["worker", "migrate"]);
}

#[test]
fn the_autoscalers_watch_the_queue_the_topology_declares_and_scale_the_worker() {
    let objects = kubernetes_objects();
    let config = &object(&objects, "ConfigMap", "monohook-config")["data"];
    let topology = shared::topology::Topology::new(config["QUEUE_PREFIX"].as_str().unwrap(), Vec::new(), 10);
    let scaled = object(&objects, "ScaledObject", "monohook-worker");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "monohook-worker");
    assert!(scaled["spec"]["minReplicaCount"].as_u64().unwrap() >= 1);
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(trigger["metadata"]["queueName"].as_str().unwrap(), topology.work_queue());
    assert!(trigger["metadata"]["value"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    let auth =
        object(&objects, "TriggerAuthentication", trigger["authenticationRef"]["name"].as_str().unwrap());
    let secret = object(&objects, "Secret", "monohook-secrets");
    let mut parameters = BTreeMap::new();
    for target in auth["spec"]["secretTargetRef"].as_sequence().unwrap() {
        assert_eq!(target["name"], "monohook-secrets");
        let example = secret["stringData"][target["key"].as_str().unwrap()].as_str();
        assert!(example.is_some(), "secret.example.yaml has no {:?}", target["key"]);
        parameters.insert(target["parameter"].as_str().unwrap().to_owned(), (target["key"].clone(), example));
    }
    // KEDA takes `host` as one URL: never AMQP_URL, whose node list the docs recommend.
    let (host_key, host) = &parameters["host"];
    assert_ne!(host_key, "AMQP_URL", "the scaler must not read the workers' node list");
    let host = host.unwrap();
    assert!(!host.contains(','), "the scaler's host is one URL, not a list: {host}");
    let url = url::Url::parse(host).expect("the scaler's host parses as one URL");
    assert!(url.host_str().is_some_and(|h| !h.is_empty()), "the scaler's host names a host");
    let scheme = url.scheme();
    assert!(["amqp", "amqps", "http", "https"].contains(&scheme), "KEDA cannot read {scheme}://");
    assert_eq!(trigger["metadata"]["protocol"], "auto", "amqp or http follows the host's scheme");
    let tls = parameters.get("tls").and_then(|(_, value)| *value);
    assert_eq!(
        tls == Some("enable"),
        scheme.ends_with('s'),
        "the example's TLS setting ({tls:?}) matches its scheme ({scheme})"
    );
    assert!(parameters.contains_key("ca"), "a private CA can be given to the scaler");
    let hpa = object(&objects, "HorizontalPodAutoscaler", "monohook-worker");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "monohook-worker");
    // Every kustomization lists files that exist.
    for overlay in ["base", "keda", "hpa"] {
        let dir = root().join("deploy/kubernetes").join(overlay);
        let kustomization: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
                .unwrap();
        for resource in kustomization["resources"].as_sequence().unwrap() {
            let resource = dir.join(resource.as_str().unwrap());
            assert!(resource.exists(), "{} lists the missing {}", overlay, resource.display());
        }
    }
}

/// The replica count each overlay can scale `deployment` down to: the autoscaler's minimum where
/// the overlay adds one, the Deployment's own count otherwise.
fn minimum_replicas(objects: &[(String, serde_yaml_ng::Value)], overlay: &str, deployment: &str) -> u64 {
    let of_overlay = |kind: &str| {
        objects.iter().map(|(path, o)| (path, o)).find(|(path, o)| {
            path.contains(&format!("/{overlay}/"))
                && o["kind"] == kind
                && o["spec"]["scaleTargetRef"]["name"] == deployment
        })
    };
    match overlay {
        "keda" => {
            if let Some((_, scaled)) = of_overlay("ScaledObject") {
                return scaled["spec"]["minReplicaCount"].as_u64().unwrap_or(0);
            }
        }
        "hpa" => {
            if let Some((_, hpa)) = of_overlay("HorizontalPodAutoscaler") {
                return hpa["spec"]["minReplicas"].as_u64().unwrap_or(1);
            }
        }
        _ => {}
    }
    object(objects, "Deployment", deployment)["spec"]["replicas"].as_u64().unwrap_or(1)
}

/// How many of `replicas` pods a PodDisruptionBudget lets an eviction take (Kubernetes rounds a
/// percentage of maxUnavailable up, of minAvailable up too).
fn evictable(pdb: &serde_yaml_ng::Value, replicas: u64) -> u64 {
    let count = |value: &serde_yaml_ng::Value| match value.as_str() {
        Some(percent) => {
            let percent: u64 = percent.trim_end_matches('%').parse().unwrap();
            (replicas * percent).div_ceil(100)
        }
        None => value.as_u64().unwrap(),
    };
    let spec = &pdb["spec"];
    if !spec["maxUnavailable"].is_null() {
        count(&spec["maxUnavailable"]).min(replicas)
    } else {
        replicas.saturating_sub(count(&spec["minAvailable"]))
    }
}

#[test]
fn a_drain_can_evict_a_pod_of_every_deployment_at_every_overlays_minimum() {
    let objects = kubernetes_objects();
    for deployment in ["monohook-ingest", "monohook-worker", "monohook-api"] {
        let labels = &object(&objects, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"];
        let pdb = objects
            .iter()
            .map(|(_, o)| o)
            .find(|o| {
                o["kind"] == "PodDisruptionBudget"
                    && o["spec"]["selector"]["matchLabels"]
                        .as_mapping()
                        .unwrap()
                        .iter()
                        .all(|(key, value)| labels[key.as_str().unwrap()] == *value)
            })
            .unwrap_or_else(|| panic!("no PodDisruptionBudget selects {deployment}'s pods"));
        for overlay in ["base", "keda", "hpa"] {
            let replicas = minimum_replicas(&objects, overlay, deployment);
            assert!(
                evictable(pdb, replicas.max(1)) >= 1,
                "{overlay}: at {replicas} replica(s) of {deployment}, its PodDisruptionBudget lets no \
                 pod be evicted, so `kubectl drain` waits forever"
            );
        }
    }
}

#[test]
fn ingest_and_api_keep_serving_until_their_endpoints_are_gone_and_still_drain() {
    let objects = kubernetes_objects();
    for deployment in ["monohook-ingest", "monohook-api"] {
        let pod = &object(&objects, "Deployment", deployment)["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let delay = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{deployment} has no preStop delay: a rollout refuses requests"));
        let period = container["readinessProbe"]["periodSeconds"].as_u64().unwrap_or(10);
        assert!(delay >= period, "{deployment}: preStop {delay} s is shorter than a readiness period");
        let grace: u64 = container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "SHUTDOWN_GRACE_SECS")
            .and_then(|v| v["value"].as_str())
            .unwrap()
            .parse()
            .unwrap();
        // The grace period runs from the start of preStop: the delay and the drain both fit in it.
        let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            delay + grace < termination,
            "{deployment}: preStop {delay} s + SHUTDOWN_GRACE_SECS {grace} >= terminationGracePeriodSeconds {termination}"
        );
    }
}

/// The `key = value` settings of a RabbitMQ configuration file (the new style, rabbitmq.conf).
fn rabbitmq_settings(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

#[test]
fn compose_cluster_profile_forms_at_boot_and_starts_nothing_before_three_nodes_are_healthy() {
    let compose = compose();
    let services = &compose["services"];
    let single = services["rabbitmq"]["image"].as_str().expect("the single broker's image");
    let node_names: BTreeSet<String> = (1..=3).map(|n| format!("rabbit@rabbitmq-{n}")).collect();
    for n in 1..=3 {
        let node = &services[format!("rabbitmq-{n}").as_str()];
        assert_eq!(node["profiles"][0], "cluster", "rabbitmq-{n} only runs with --profile cluster");
        assert_eq!(
            node["hostname"].as_str(),
            Some(format!("rabbitmq-{n}").as_str()),
            "node name rabbit@rabbitmq-{n}"
        );
        assert_eq!(
            node["image"].as_str(),
            Some(single),
            "the cluster runs the version the tests run against"
        );
        // An empty or missing cookie stops compose (`:?`) instead of starting nodes that cannot
        // authenticate to each other.
        let cookie = env_value(node, "RABBITMQ_ERLANG_COOKIE").expect("a shared Erlang cookie");
        assert!(
            cookie.starts_with("${RABBITMQ_ERLANG_COOKIE:?"),
            "rabbitmq-{n}'s cookie is required: {cookie}"
        );
        let volume = node["volumes"][0].as_str().expect("a data volume");
        assert!(volume.starts_with(&format!("rabbitmq-{n}-data:")), "rabbitmq-{n} keeps its own data");
        // The formation config is this repository's file, read-only, where RabbitMQ reads extra
        // configuration files.
        let mount = node["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .find(|v| v.starts_with("./deploy/rabbitmq/cluster.conf:"))
            .unwrap_or_else(|| panic!("rabbitmq-{n} does not mount deploy/rabbitmq/cluster.conf"));
        let parts: Vec<&str> = mount.split(':').collect();
        assert!(
            parts.len() == 3 && parts[1].starts_with("/etc/rabbitmq/conf.d/") && parts[1].ends_with(".conf"),
            "rabbitmq-{n} mounts {mount}"
        );
        assert_eq!(parts[2], "ro", "rabbitmq-{n} mounts the formation config read-only");
        // Healthy means a member of a cluster of three running nodes, not merely a running node.
        let check: Vec<&str> =
            node["healthcheck"]["test"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
        let at = check
            .iter()
            .position(|a| *a == "await_online_nodes")
            .unwrap_or_else(|| panic!("rabbitmq-{n}'s healthcheck does not check membership: {check:?}"));
        assert_eq!(check.get(at + 1), Some(&"3"), "rabbitmq-{n}: all three nodes: {check:?}");
        let timeout_secs: u64 = check
            .iter()
            .position(|a| *a == "--timeout")
            .and_then(|i| check.get(i + 1)?.parse().ok())
            .unwrap_or_else(|| panic!("rabbitmq-{n}'s membership check has no short timeout: {check:?}"));
        let check_timeout = node["healthcheck"]["timeout"].as_str().unwrap();
        let check_timeout_secs: u64 = check_timeout.trim_end_matches('s').parse().unwrap();
        assert!(timeout_secs < check_timeout_secs, "the check gives up before compose kills it");
    }

    // The nodes form the cluster at boot from the node list; nothing joins (and resets) a node
    // after start.
    assert!(services["rabbitmq-cluster-join"].is_null(), "no join service");
    assert!(!read("docker-compose.yml").contains("join_cluster"), "compose joins no node after start");
    let formation = rabbitmq_settings(&read("deploy/rabbitmq/cluster.conf"));
    assert_eq!(
        formation.get("cluster_formation.peer_discovery_backend").map(String::as_str),
        Some("classic_config")
    );
    let listed: BTreeSet<String> = formation
        .iter()
        .filter(|(key, _)| key.starts_with("cluster_formation.classic_config.nodes."))
        .map(|(_, node)| node.clone())
        .collect();
    assert_eq!(listed, node_names, "the formation config lists the three nodes compose runs");

    // A node on the minority side of a partition pauses and drops its clients, in containers and
    // in the local cluster the chaos suite runs on.
    assert_eq!(formation.get("cluster_partition_handling").map(String::as_str), Some("pause_minority"));
    let script = read("scripts/cluster");
    assert!(
        script.lines().any(|l| l.trim() == "cluster_partition_handling = pause_minority"),
        "scripts/cluster's nodes pause on the minority side"
    );

    // Ingest and worker declare queues at start: with the profile on, only once all three nodes
    // are healthy; without it, the nodes do not exist and are not required.
    for service in ["ingest", "worker"] {
        let depends = &services[service]["depends_on"];
        for n in 1..=3 {
            let node = &depends[format!("rabbitmq-{n}").as_str()];
            assert_eq!(node["condition"], "service_healthy", "{service} waits for rabbitmq-{n}");
            assert_eq!(node["required"], false, "{service} starts without the cluster profile too");
        }
    }
    let example = read(".env.example");
    let cookie = example
        .lines()
        .find_map(|l| l.strip_prefix("RABBITMQ_ERLANG_COOKIE="))
        .expect(".env.example sets RABBITMQ_ERLANG_COOKIE");
    assert!(!cookie.trim().is_empty(), "the example's cookie passes `:?`, so `docker compose up` works");

    // What .env.example suggests for the cluster is a node list the binaries accept, and the replica
    // setting reaches both binaries.
    let example = read(".env.example");
    let urls = example
        .lines()
        .find_map(|line| line.trim_start_matches(['#', ' ']).strip_prefix("AMQP_URL=amqp://"))
        .map(|rest| format!("amqp://{rest}"))
        .expect(".env.example shows the cluster's AMQP_URL");
    let nodes: Vec<&str> = urls.split(',').collect();
    assert_eq!(nodes.len(), 3, "{urls}");
    for (n, url) in nodes.iter().enumerate() {
        assert!(url.contains(&format!("@rabbitmq-{}:5672/", n + 1)), "{url}");
    }
    for service in ["ingest", "worker"] {
        assert!(env_value(&services[service], "QUORUM_INITIAL_GROUP_SIZE").is_some(), "{service}");
        let amqp = env_value(&services[service], "AMQP_URL").expect("AMQP_URL");
        assert!(amqp.starts_with("${AMQP_URL:-"), "{service}: .env's AMQP_URL replaces the single broker");
    }
}

#[test]
fn the_kubernetes_scrape_job_names_pods_as_the_alerts_expect() {
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/prometheus/kubernetes.yml")).unwrap();
    assert_eq!(config["rule_files"][0], "alerts.yml");
    let job = &config["scrape_configs"][0];
    let namespace =
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&read("deploy/kubernetes/base/kustomization.yaml"))
            .unwrap()["namespace"]
            .clone();
    assert_eq!(job["kubernetes_sd_configs"][0]["namespaces"]["names"][0], namespace);
    let relabels = job["relabel_configs"].as_sequence().expect("relabel_configs");
    let label = "__meta_kubernetes_pod_label_app_kubernetes_io_name";
    let from_label = |r: &&serde_yaml_ng::Value| r["source_labels"][0] == label;
    let kept =
        relabels.iter().filter(from_label).find(|r| r["action"] == "keep").expect("keeps monohook pods");
    let keep = kept["regex"].as_str().unwrap();
    assert!(
        relabels.iter().filter(from_label).any(|r| r["target_label"] == "job" && r["action"].is_null()),
        "the job label must come from the pod's app.kubernetes.io/name"
    );
    // Every scraped Deployment's pods carry a name that the keep rule admits and that is a job the
    // alert rules watch, and their port annotation is where the address comes from.
    let alerts = read("deploy/prometheus/alerts.yml");
    let objects = kubernetes_objects();
    for name in ["monohook-ingest", "monohook-worker", "monohook-api"] {
        let deployment = objects.iter().map(|(_, o)| o).find(|o| {
            o["kind"] == "Deployment"
                && o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == name
        });
        let pod =
            &deployment.unwrap_or_else(|| panic!("no Deployment labels its pods {name}"))["spec"]["template"];
        assert_eq!(pod["metadata"]["annotations"]["prometheus.io/scrape"], "true", "{name}");
        assert!(pod["metadata"]["annotations"]["prometheus.io/port"].is_string(), "{name}");
        let service = name.trim_start_matches("monohook-");
        assert!(keep.contains(service), "the keep rule {keep} drops {name}");
        assert!(
            alerts.contains(&format!(r#"absent(up{{job="{name}"}} == 1)"#)),
            "no absent() alert for {name}"
        );
    }
    let address = relabels.iter().find(|r| r["target_label"] == "__address__").expect("an address rule");
    assert_eq!(address["source_labels"][1], "__meta_kubernetes_pod_annotation_prometheus_io_port");
}
