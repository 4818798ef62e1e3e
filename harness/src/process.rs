//! A monohook binary running as a child process, its output captured to a log file.

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where the binaries are: `MONOHOOK_BIN_DIR`, else the profile directory of the running executable
/// (`target/<profile>/`, also for test executables in `target/<profile>/deps/`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MONOHOOK_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("cannot find the running executable");
    let mut dir = exe.parent().expect("executable without a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// One running binary.
pub struct Service {
    pub name: String,
    child: Child,
    log_path: PathBuf,
    /// Where this process's output starts in its log: a scenario's log directory holds, under the
    /// same name, the processes of the scenarios before it, whose lines must not answer its checks.
    log_start: u64,
    exit: Option<ExitStatus>,
}

impl Service {
    /// Starts `binary` (a file in [`bin_dir`]) with `args` and `env`, stdout and stderr appended to
    /// `<log_dir>/<name>.log`. The environment is cleared first, so only what is passed applies.
    pub fn spawn(
        name: &str,
        binary: &str,
        args: &[&str],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let path = bin_dir().join(binary);
        if !path.exists() {
            bail!("{} is missing: build the binaries first (cargo build --bins)", path.display());
        }
        std::fs::create_dir_all(log_dir)?;
        let log_path = log_dir.join(format!("{name}.log"));
        let log = File::options().create(true).append(true).open(&log_path)?;
        let log_start = log.metadata()?.len();
        let child = Command::new(&path)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        Ok(Self { name: name.to_owned(), child, log_path, log_start, exit: None })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
    }

    /// Sends SIGKILL (a crash) and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.exit = self.child.wait().ok();
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_some() {
            return self.exit;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                return self.exit;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether SIGKILL ended the process (so a kill check can fail: one that exited first did not
    /// die mid-work).
    pub fn died_of_sigkill(&self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        self.exit.is_some_and(|status| status.signal() == Some(9))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.exit.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Everything the process has written so far (not what earlier processes of its name wrote).
    pub fn logs(&self) -> String {
        let all = std::fs::read(&self.log_path).unwrap_or_default();
        let start = usize::try_from(self.log_start).unwrap_or(usize::MAX).min(all.len());
        String::from_utf8_lossy(&all[start..]).into_owned()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill();
        }
    }
}

/// Polls `url` until it answers 200, or fails after `timeout` (with the service's last log lines).
pub async fn wait_until_ready(service: &mut Service, url: &str, timeout: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if !service.is_running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = service.logs();
    let tail: Vec<_> = logs.lines().rev().take(5).collect();
    bail!(
        "{} did not become ready at {url}; last log lines:\n{}",
        service.name,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}
