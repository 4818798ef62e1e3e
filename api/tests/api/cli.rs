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
