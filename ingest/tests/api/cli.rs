use std::process::Command;

fn ingest() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

#[test]
fn help_lists_every_setting_with_its_environment_variable_and_default() {
    let output = ingest().arg("--help").output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();

    for (env, default) in [
        ("AMQP_URL", Some("amqp://guest:guest@127.0.0.1:5672/%2f")),
        ("QUEUE_PREFIX", Some("mono.webhooks")),
        ("LISTEN_ADDR", Some("127.0.0.1:8080")),
        ("MONO_WEBHOOK_SECRET", None),
        ("MAX_BODY_BYTES", Some("262144")),
        ("RETRY_DELAYS_SECS", Some("30,300,1800,7200")),
        ("LOG_FORMAT", Some("auto")),
        ("RUST_LOG", Some("info,sqlx::postgres::notice=warn")),
    ] {
        assert!(help.contains(&format!("[env: {env}")), "--help lacks {env}:\n{help}");
        if let Some(default) = default {
            assert!(help.contains(&format!("[default: {default}]")), "--help lacks the default of {env}");
        }
    }
}

#[test]
fn help_never_shows_the_current_secret() {
    let output = ingest().arg("--help").env("MONO_WEBHOOK_SECRET", "hunter2-secret").output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();

    assert!(!help.contains("hunter2-secret"));
}

#[test]
fn a_missing_secret_stops_the_process_with_a_message_naming_it() {
    let output = ingest().output().unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr, "ingest: missing required setting: MONO_WEBHOOK_SECRET (--mono-webhook-secret)\n");
}

#[test]
fn an_unreachable_broker_stops_the_process_with_one_line_and_no_password() {
    let output = ingest()
        .env("MONO_WEBHOOK_SECRET", "s")
        .env("AMQP_URL", "amqp://guest:hunter2@127.0.0.1:1/%2f")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("ingest: cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
