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
    for crate_dir in ["ingest/src", "worker/src", "shared/src"] {
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
fn the_readme_documents_every_setting_of_both_binaries() {
    let readme = read("README.md");
    for binary in ["ingest", "worker"] {
        let vars = env_vars_of(binary);
        assert!(vars.len() >= 10, "{binary} --help lists too few settings: {vars:?}");
        let missing: Vec<_> = vars.iter().filter(|v| !readme.contains(&format!("`{v}`"))).collect();
        assert!(missing.is_empty(), "README.md does not document {binary}'s {missing:?}");
    }
}
