//! Running the binary as users do, with its output collected.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use goto_auth_proxy::standin::{StandIn, CLIENT_ID, CLIENT_SECRET};

use super::{wait_for, PATIENCE};

pub const BINARY: &str = env!("CARGO_BIN_EXE_goto-auth-proxy");

/// A command with a clean environment, so the test host's own GOTO_* settings
/// cannot leak in.
pub fn proxy_command() -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

/// The binary running `run`, with its log collected line by line.
pub struct Running {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Running {
    /// Starts `command`, collecting stdout and stderr lines into one log.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [stdout, stderr] {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The value after `key=` in the first log line that has it.
    pub async fn logged_value(&self, key: &str) -> String {
        let needle = format!("{key}=");
        let mut found = None;
        wait_for(&format!("{key} in the log"), || {
            found = self.log.lock().unwrap().iter().find_map(|line| {
                let start = line.find(&needle)? + needle.len();
                Some(
                    line[start..]
                        .split_whitespace()
                        .next()?
                        .trim_matches('"')
                        .to_owned(),
                )
            });
            std::future::ready(found.is_some())
        })
        .await;
        found.unwrap()
    }

    /// The string field `key` of the first JSON log line that has it
    /// (`--log-format json`).
    pub async fn logged_json_value(&self, key: &str) -> String {
        let mut found = None;
        wait_for(&format!("{key} in the JSON log"), || {
            found = self.log.lock().unwrap().iter().find_map(|line| {
                let line: serde_json::Value = serde_json::from_str(line).ok()?;
                line.get(key)?.as_str().map(str::to_owned)
            });
            std::future::ready(found.is_some())
        })
        .await;
        found.unwrap()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Stops the proxy with SIGTERM, checks that it exits 0, and gives its log.
    pub async fn stop(mut self) -> String {
        self.signal("TERM");
        let status = self.wait_exit().await;
        assert!(status.success(), "exit {status}:\n{}", self.log_text());
        self.log_text()
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy did not exit:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `run` against `standin` on ports the OS picks, secrets from the environment.
pub fn run_command(standin: &StandIn, dir: &std::path::Path, refresh_token: &str) -> Command {
    let mut command = proxy_command();
    command
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("GOTO_UPSTREAM", standin.api_url())
        .env("GOTO_TOKEN_URL", standin.token_url())
        .env("GOTO_CLIENT_ID", CLIENT_ID)
        .env("GOTO_CLIENT_SECRET", CLIENT_SECRET)
        .env("GOTO_REFRESH_TOKEN", refresh_token)
        .env("GOTO_STATE_FILE", dir.join("state.json"));
    command
}
