//! What every binary tells about itself without any setting: its revision, its completions and its
//! man pages, all generated from the same clap definitions as `--help`.

use harness::process::bin_dir;
use std::process::{Command, Output};

const BINARIES: [&str; 3] = ["ingest", "worker", "api"];

/// Runs `binary` with a clean environment, as an operator's shell without monohook's settings.
fn run(binary: &str, args: &[&str]) -> Output {
    Command::new(bin_dir().join(binary))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary} (build the binaries first): {e}"))
}

fn stdout_of(binary: &str, args: &[&str]) -> String {
    let output = run(binary, args);
    assert!(output.status.success(), "{binary} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// The revision the build saw: `git rev-parse --short HEAD`, or "unknown" outside a repository.
fn expected_revision() -> String {
    let git = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output();
    match git {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        _ => "unknown".to_owned(),
    }
}

#[test]
fn version_names_the_git_revision_of_the_build() {
    let revision = expected_revision();
    for binary in BINARIES {
        let version = stdout_of(binary, &["--version"]);
        assert!(
            version.starts_with(&format!("{binary} 0.")) && version.contains(&format!("(git {revision})")),
            "{binary} --version printed {version:?}, expected revision {revision}"
        );
    }
}

#[test]
fn completions_are_printed_for_each_shell_without_any_setting() {
    for binary in BINARIES {
        for shell in ["bash", "zsh", "fish"] {
            let script = stdout_of(binary, &["completions", shell]);
            // Every binary has --log-format; the completion must know the flags of the definition.
            assert!(script.contains("log-format"), "{binary} completions {shell}: {script}");
        }
    }
    // The binary's own description still heads `--help`, with the doc commands listed.
    let help = stdout_of("worker", &["--help"]);
    assert!(help.starts_with("Consumes queued Mono webhooks"), "{help}");
    assert!(help.contains("completions") && help.contains("man "), "{help}");
    let worker = stdout_of("worker", &["completions", "bash"]);
    for subcommand in ["dlq", "replay", "status", "migrate"] {
        assert!(worker.contains(subcommand), "worker's completion lacks {subcommand}");
    }
}

#[test]
fn man_pages_list_every_setting_with_its_environment_variable() {
    let page = stdout_of("ingest", &["man"]);
    assert!(page.contains(".TH ingest 1"), "{page}");
    for env in ["MONO_WEBHOOK_SECRET", "AMQP_URL", "METRICS_ADDR", "LISTEN_ADDR"] {
        assert!(page.contains(env), "ingest's man page lacks {env}");
    }
    assert!(page.contains("(git "), "the man page carries the version with its revision");
}

#[test]
fn man_out_dir_writes_a_page_per_command() {
    let dir = std::env::temp_dir().join(format!("monohook-man-pages-{}", std::process::id()));
    stdout_of("worker", &["man", "--out-dir", dir.to_str().expect("utf-8 path")]);
    for page in ["worker.1", "worker-dlq.1", "worker-dlq-replay.1", "worker-status.1", "worker-completions.1"]
    {
        assert!(dir.join(page).is_file(), "{page} was not written");
    }
    std::fs::remove_dir_all(&dir).expect("cleans up");
}

#[test]
fn a_missing_setting_still_stops_a_real_run() {
    // The doc subcommands waive required settings; running the service must not.
    for binary in ["ingest", "api"] {
        let output = run(binary, &[]);
        assert_eq!(output.status.code(), Some(2), "{binary} started without its required settings");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("missing required setting"), "{binary}: {stderr}");
    }
}

#[test]
fn a_bad_node_in_amqp_url_stops_the_start_naming_its_position_and_never_its_password() {
    let nodes = "amqp://app:s3cret-one@rabbit-1:5672/%2f,amqp://app:hunter2@rabbit-2:5672x/%2f";
    for binary in ["ingest", "worker"] {
        let output = Command::new(bin_dir().join(binary))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AMQP_URL", nodes)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{binary}: {stderr}");
        assert!(stderr.contains("entry 2 of 2 is not an amqp:// or amqps:// URL"), "{binary}: {stderr}");
        assert!(!stderr.contains("hunter2") && !stderr.contains("s3cret-one"), "{binary} printed a password");
    }
}
