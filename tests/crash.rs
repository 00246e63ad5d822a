//! Crash consistency of the state file: the proxy, rotating its refresh
//! token every half second, is killed with SIGKILL at random moments. After
//! every kill the state file parses and holds the newest refresh token the
//! stand-in handed out, or the one before it (a kill between the endpoint's
//! answer and the write); never a torn, empty or older file.

mod common;

use std::time::Duration;

use common::process::{run_command, Running};
use common::wait_for;
use goto_auth_proxy::standin::{GrantShape, StandIn, StandInOptions};
use goto_auth_proxy::store::FileStore;
use secrecy::ExposeSecret;

const ROUNDS: usize = 15;

#[tokio::test]
async fn sigkill_at_random_moments_never_leaves_a_torn_or_stale_state_file() {
    let shape = GrantShape {
        lifetime: Duration::from_secs(1),
        rotate_every: 1,
        // A kill after the endpoint rotated but before the write leaves the
        // previous token on disk; a server that still takes it lets the next
        // round go on (whether GoTo's does is not documented).
        accept_previous_refresh_token: true,
        ..GrantShape::default()
    };
    let standin = StandIn::start(StandInOptions {
        shape,
        ..StandInOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let bootstrap = standin.refresh_token();
    let mut previous_kept = 0;
    for round in 0..ROUNDS {
        let mut running = Running::spawn(run_command(&standin, dir.path(), &bootstrap));
        tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(0..1400))).await;
        running.child.kill().unwrap();
        running.child.wait().unwrap();

        let history = standin.refresh_token_history();
        let stored = match FileStore::new(&state_file).load_blocking() {
            Ok(Some(state)) => state
                .refresh_token
                .expect("a refresh token in the state file"),
            Ok(None) => {
                assert_eq!(
                    history.len(),
                    1,
                    "round {round}: tokens rotated but no state file exists"
                );
                continue;
            }
            Err(error) => {
                panic!("round {round}: the state file is unreadable after SIGKILL: {error}")
            }
        };
        let stored = stored.expose_secret();
        let newest = &history[history.len() - 1];
        if stored != newest {
            assert!(
                history.len() >= 2 && stored == history[history.len() - 2],
                "round {round}: the state file holds neither of the last two refresh tokens"
            );
            previous_kept += 1;
        }
    }
    let rotations = standin.refresh_token_history().len() - 1;
    eprintln!("{ROUNDS} SIGKILLs during {rotations} rotations; {previous_kept} left the previous token on disk");
    assert!(
        rotations >= ROUNDS / 2,
        "too few rotations to mean anything: {rotations}"
    );

    // A last start takes over, removes any temporary file a kill left, and is
    // ready; stopped gracefully, it finishes the write it may have under way.
    let mut running = Running::spawn(run_command(&standin, dir.path(), &bootstrap));
    wait_for("readiness after the crashes", || {
        std::future::ready(running.log_text().contains("access token obtained"))
    })
    .await;
    running.signal("TERM");
    assert!(running.wait_exit().await.success());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// A tiny tmpfs mounted for the test, unmounted when dropped.
struct TinyDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TinyDisk {
    /// Mounts 16 KiB of tmpfs, or says why it cannot (mounting needs root).
    fn mount() -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(Self { path, _dir: dir })
    }

    /// Fills the free space with one file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        while file.write_all(&[0u8; 512]).is_ok() {}
        filler
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_writes_loudly_keeps_the_old_file_and_the_proxy_serving() {
    let disk = match TinyDisk::mount() {
        Ok(disk) => disk,
        Err(why) if !is_root() => {
            eprintln!("SKIPPED: mounting a tmpfs needs root ({why})");
            return;
        }
        Err(why) => panic!("cannot mount a tmpfs as root: {why}"),
    };
    let shape = GrantShape {
        rotate_every: 1,
        ..GrantShape::default()
    };
    let standin = StandIn::start(StandInOptions {
        shape,
        ..StandInOptions::default()
    })
    .await
    .unwrap();
    let mut options = common::options_for(&standin, &disk.path);
    options.state_file = Some(disk.path.join("state.json"));
    let proxy = common::start_proxy(common::settings(options, Some(standin.refresh_token()))).await;
    proxy.wait_ready().await;
    let store = FileStore::new(disk.path.join("state.json"));
    let written = store
        .load_blocking()
        .unwrap()
        .unwrap()
        .refresh_token
        .unwrap()
        .expose_secret()
        .to_owned();
    assert_eq!(written, standin.refresh_token());

    let filler = disk.fill();
    standin.revoke_access_tokens();
    let client = common::client();
    assert_eq!(
        client.get(proxy.url("/x")).send().await.unwrap().status(),
        200,
        "serving goes on"
    );
    assert!(
        proxy
            .metric("goto_proxy_state_write_failures_total")
            .await
            .unwrap()
            >= 1.0
    );
    // The old file is whole, and no half-written temporary is left on the full disk.
    let kept = store
        .load_blocking()
        .unwrap()
        .unwrap()
        .refresh_token
        .unwrap()
        .expose_secret()
        .to_owned();
    assert_eq!(kept, written);
    assert!(std::fs::read_dir(&disk.path).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));

    // Space comes back: the retried write lands the rotated token.
    std::fs::remove_file(filler).unwrap();
    wait_for("the retried write", || {
        let stored = store
            .load_blocking()
            .ok()
            .flatten()
            .and_then(|s| s.refresh_token);
        std::future::ready(stored.is_some_and(|t| t.expose_secret() == standin.refresh_token()))
    })
    .await;
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
