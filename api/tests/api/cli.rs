//! The binary as an operator meets it.

use std::process::Command;

fn api() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_api"));
    command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("LOG_FORMAT", "json");
    command
}

#[test]
fn help_lists_every_setting_with_its_environment_variable() {
    let output = api().arg("--help").output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();

    for env in [
        "DATABASE_URL",
        "LISTEN_ADDR",
        "APP_API_KEYS",
        "MONO_SECRET_KEY",
        "MONO_API_URL",
        "MONO_TIMEOUT_MS",
        "TOKEN_MIN_REMAINING_SECS",
        "METRICS_ADDR",
    ] {
        assert!(help.contains(&format!("[env: {env}")), "--help lacks {env}:\n{help}");
    }
    assert!(help.contains("[default: 127.0.0.1:8081]") && help.contains("[default: 120]"), "{help}");
}

#[test]
fn missing_keys_stop_the_api_naming_them() {
    let output = api().output().unwrap();

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.starts_with("api: missing required setting: APP_API_KEYS (--app-api-keys)"), "{stderr}");
}

#[test]
fn a_duration_out_of_its_range_stops_the_api_with_one_line_naming_it() {
    for (env, value) in [
        ("MONO_TIMEOUT_MS", "300001"),
        ("MONO_RETRY_BUDGET_MS", "600001"),
        ("MONO_RETRY_AFTER_MAX_SECS", "86401"),
        ("MONO_REFUSAL_MEMORY_SECS", "18446744073709551615"),
        ("MONO_CIRCUIT_OPEN_MS", "99"),
        ("TOKEN_DEADLINE_MS", "600001"),
        ("REAUTH_LINK_REUSE_SECS", "9223372036854775807"),
        ("SHUTDOWN_GRACE_SECS", "3601"),
    ] {
        let output = api()
            .env("APP_API_KEYS", "mobile:0123456789abcdef0123")
            .env("MONO_SECRET_KEY", "test_sk_0123456789")
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env(env, value)
            .output()
            .unwrap();

        assert_eq!(output.status.code(), Some(2), "{env}={value}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{env}={value}: {stderr}");
        assert!(stderr.starts_with("api: invalid ") && stderr.contains(env), "{env}={value}: {stderr}");
    }
}
