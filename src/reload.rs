//! Reload without restart. SIGHUP, or a change to a watched file (the
//! configuration file and every secret file), makes the proxy read its
//! configuration and secrets again. Files are watched by polling what
//! their path resolves to: Kubernetes updates a mounted Secret by swapping
//! a `..data` symlink, which changes the file a path leads to without
//! touching the file an inotify watch would have been put on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::config::{ConfigError, Settings};

/// How often watched files are looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Makes the settings anew, as at start: flags and environment over the
/// configuration file read again, secrets read again.
pub type SettingsSource = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// What a running proxy reloads from.
pub struct Reload {
    /// The new settings.
    pub source: SettingsSource,
    /// The configuration file, watched beside the secret files.
    pub config_file: Option<PathBuf>,
    /// Whether SIGHUP asks for a reload (the binary; not tests in one process).
    pub on_sighup: bool,
}

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// SIGHUP.
    Signal,
    /// A watched file changed.
    Watch,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cause::Signal => "SIGHUP",
            Cause::Watch => "a watched file changed",
        })
    }
}

/// The files to watch, replaced after each reload (accounts come and go).
pub type Watched = Arc<ArcSwap<Vec<PathBuf>>>;

/// Reload requests: one on each SIGHUP (when `on_sighup`), and one when
/// any of `watched` resolves to another file, or the file changes.
pub fn triggers(watched: Watched, on_sighup: bool) -> mpsc::Receiver<Cause> {
    let (sender, receiver) = mpsc::channel(4);
    if on_sighup {
        let sender = sender.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hangup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot handle SIGHUP; reloads come from file changes only");
                return;
            };
            while hangup.recv().await.is_some() {
                if sender.send(Cause::Signal).await.is_err() {
                    return;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut seen = fingerprints(&watched.load());
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let now = fingerprints(&watched.load());
            if now != seen {
                seen = now;
                if sender.send(Cause::Watch).await.is_err() {
                    return;
                }
            }
        }
    });
    receiver
}

/// What a path leads to now: the file's device, inode, size and
/// modification time (symlinks followed), or nothing when it is missing.
type Fingerprint = Option<(u64, u64, u64, SystemTime)>;

fn fingerprints(paths: &[PathBuf]) -> Vec<(PathBuf, Fingerprint)> {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .map(|path| {
            let fingerprint = std::fs::metadata(path).ok().map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.len(),
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                )
            });
            (path.clone(), fingerprint)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn swapping_a_data_symlink_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("..2026_01");
        let second = dir.path().join("..2026_02");
        std::fs::create_dir(&first).unwrap();
        std::fs::create_dir(&second).unwrap();
        std::fs::write(first.join("client-secret"), "one").unwrap();
        std::fs::write(second.join("client-secret"), "two").unwrap();
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink(&first, &data).unwrap();
        let secret = dir.path().join("client-secret");
        std::os::unix::fs::symlink("..data/client-secret", &secret).unwrap();
        let before = fingerprints(std::slice::from_ref(&secret));
        // As Kubernetes does it: a new link, renamed over the old one.
        let new_link = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&second, &new_link).unwrap();
        std::fs::rename(&new_link, &data).unwrap();
        let after = fingerprints(std::slice::from_ref(&secret));
        assert_ne!(before, after);
        assert_eq!(after, fingerprints(std::slice::from_ref(&secret)));
    }
}
