//! The file store: token state in a JSON file, mode 0600, replaced
//! atomically so that a crash at any moment leaves either the old file or
//! the new one, never a torn one. Writers (this process, `login`, another
//! process on the same machine) take an exclusive lock on the file's
//! directory around each compare-and-set, so a version check and the
//! rename that follows it cannot interleave with another writer's.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::{
    BoxFuture, Lease, LeaseGrant, PersistedState, SaveError, StateStore, StoreError, Versioned,
};

/// How often [`StateStore::changed`] looks at the file.
const CHANGE_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Parses the state file's JSON; on failure, the line and column at fault
/// (never the text, which may hold a token).
pub fn parse_state(bytes: &[u8]) -> Result<PersistedState, (usize, usize)> {
    parse_versioned(bytes).map(|versioned| versioned.state)
}

fn parse_versioned(bytes: &[u8]) -> Result<Versioned, (usize, usize)> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(|e| (e.line(), e.column()))?;
    Ok(Versioned {
        version: file.version,
        state: PersistedState {
            refresh_token: super::stored_secret(file.refresh_token),
            refresh_token_first_seen: file.refresh_token_first_seen,
            principal: file.principal,
            access_token: None,
            access_token_expires_at: file
                .access_token_expires_at
                .map(|at| std::time::UNIX_EPOCH + Duration::from_secs(at)),
            updated_at: file.updated_at,
        },
    })
}

/// The file's JSON layout; the secret is exposed only inside this module.
#[derive(Serialize, Deserialize)]
struct StateFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_first_seen: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token_expires_at: Option<u64>,
    #[serde(default)]
    updated_at: u64,
    /// Grows by one with every write.
    #[serde(default)]
    version: u64,
}

/// State in a JSON file, mode 0600, replaced atomically.
#[derive(Clone, Debug)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// A store at `path`; its directory is created on the first write.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file now, on the calling thread.
    pub fn load_blocking(&self) -> Result<Option<PersistedState>, StoreError> {
        Ok(self
            .load_versioned_blocking()?
            .map(|versioned| versioned.state))
    }

    fn load_versioned_blocking(&self) -> Result<Option<Versioned>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        warn_if_exposed(&self.path);
        parse_versioned(&bytes)
            .map(Some)
            .map_err(|(line, column)| StoreError::Corrupt {
                path: self.path.clone(),
                line,
                column,
            })
    }

    /// Removes temporary files that a writer killed mid-write left beside the
    /// state file; returns how many went. A writer holds the directory lock
    /// while its temporary file exists, so while the lock is held elsewhere
    /// nothing is removed (the file may be another process's write in progress).
    pub fn remove_leftovers(&self) -> io::Result<usize> {
        let (dir, prefix) = temporary_prefix(&self.path);
        let directory = match File::open(dir) {
            Ok(directory) => directory,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        match directory.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Ok(0),
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let mut removed = 0;
        for entry in fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes `state` now, on the calling thread, whatever is stored (for
    /// tools and tests that put a state in place).
    pub fn save_blocking(&self, state: &PersistedState) -> Result<(), StoreError> {
        self.locked(|| {
            let current = self.stored_version();
            self.write(state, current + 1)
        })
        .map(|_| ())
        .map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes `state` as `version`, whatever is stored: the local copy of
    /// a state whose version a shared store keeps.
    pub fn put_blocking(&self, state: &PersistedState, version: u64) -> Result<(), StoreError> {
        self.locked(|| self.write(state, version))
            .map(|_| ())
            .map_err(|source| StoreError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// [`FileStore::put_blocking`] on a blocking thread.
    pub async fn put(&self, state: &PersistedState, version: u64) -> Result<(), StoreError> {
        let (store, state) = (self.clone(), state.clone());
        run_blocking(move || store.put_blocking(&state, version)).await
    }

    /// The compare-and-set of [`StateStore::save`], on the calling thread.
    fn save_if_blocking(&self, state: &PersistedState, based_on: u64) -> Result<u64, SaveError> {
        let outcome = self.locked(|| match self.load_versioned_blocking() {
            Ok(Some(stored)) if stored.version > based_on => Ok(Err(stored)),
            // A corrupt file is replaced: the state in hand is the good one.
            Ok(_) | Err(StoreError::Corrupt { .. }) => self.write(state, based_on + 1).map(Ok),
            Err(StoreError::Read { source, .. } | StoreError::Write { source, .. }) => Err(source),
            Err(other) => Err(io::Error::other(other.to_string())),
        });
        match outcome {
            Ok(Ok(version)) => Ok(version),
            Ok(Err(stored)) => Err(SaveError::Conflict(Box::new(stored))),
            Err(source) => Err(SaveError::Store(StoreError::Write {
                path: self.path.clone(),
                source,
            })),
        }
    }

    /// The stored version, 0 when there is no readable file.
    fn stored_version(&self) -> u64 {
        self.load_versioned_blocking()
            .ok()
            .flatten()
            .map_or(0, |stored| stored.version)
    }

    /// Runs `work` holding the exclusive lock on the file's directory.
    fn locked<T>(&self, work: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let (dir, _) = temporary_prefix(&self.path);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let directory = File::open(dir)?;
        directory.lock()?;
        // Released when `directory` is closed, after `work`.
        work()
    }

    fn write(&self, state: &PersistedState, version: u64) -> io::Result<u64> {
        let file = StateFile {
            refresh_token: state
                .refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            refresh_token_first_seen: state.refresh_token_first_seen,
            principal: state.principal.clone(),
            access_token_expires_at: state
                .access_token_expires_at
                .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|at| at.as_secs()),
            updated_at: state.updated_at,
            version,
        };
        let mut bytes = serde_json::to_vec_pretty(&file).expect("state serializes");
        bytes.push(b'\n');
        write_atomically(&self.path, &bytes)?;
        Ok(version)
    }

    /// What identifies one version of the file without reading it.
    fn fingerprint(&self) -> Option<(u64, u64, i64, i64)> {
        fs::metadata(&self.path)
            .ok()
            .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
    }
}

impl StateStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Versioned>, StoreError>> {
        let store = self.clone();
        Box::pin(async move { run_blocking(move || store.load_versioned_blocking()).await })
    }

    fn save<'a>(
        &'a self,
        state: PersistedState,
        based_on: u64,
        _lease: &'a Lease,
    ) -> BoxFuture<'a, Result<u64, SaveError>> {
        let store = self.clone();
        Box::pin(
            async move { run_blocking(move || store.save_if_blocking(&state, based_on)).await },
        )
    }

    fn changed(&self, seen: u64) -> BoxFuture<'_, Result<Versioned, StoreError>> {
        let store = self.clone();
        Box::pin(async move {
            let mut last = None;
            loop {
                tokio::time::sleep(CHANGE_POLL_INTERVAL).await;
                let probe = store.clone();
                let (fingerprint, stored) = run_blocking(move || {
                    let fingerprint = probe.fingerprint();
                    (
                        fingerprint,
                        fingerprint.map(|_| probe.load_versioned_blocking()),
                    )
                })
                .await;
                if fingerprint == last {
                    continue;
                }
                last = fingerprint;
                // A file that cannot be read now is reported by the next load
                // or save; watching goes on.
                if let Some(Ok(Some(stored))) = stored {
                    if stored.version > seen {
                        return Ok(stored);
                    }
                }
            }
        })
    }

    fn lease(&self) -> BoxFuture<'_, Result<LeaseGrant, StoreError>> {
        // One process refreshes each state file; writers are serialised by the lock.
        Box::pin(std::future::ready(Ok(LeaseGrant::Held(Lease::granted(0)))))
    }

    fn release(&self, _lease: Lease) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

async fn run_blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("state file task panicked")
}

/// Replaces `path` with `contents` so that a crash leaves the old or the new
/// file: write a temporary file beside it, fsync, rename over, fsync the directory.
pub fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (dir, prefix) = temporary_prefix(path);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let temp = dir.join(format!(
        "{prefix}{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = write_new_file(&temp, contents).and_then(|()| fs::rename(&temp, path));
    if let Err(e) = written {
        // A full disk must not also leave half-written temporaries behind.
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// The directory of `path`, and how its temporary files' names begin.
fn temporary_prefix(path: &Path) -> (&Path, String) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    (dir, format!(".{name}."))
}

fn write_new_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn warn_if_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "the state file can be read by other users; run `chmod 600` on it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    fn state(token: &str) -> PersistedState {
        PersistedState {
            refresh_token: Some(SecretString::from(token)),
            refresh_token_first_seen: Some(10),
            principal: Some("ann@example.com".into()),
            access_token: None,
            access_token_expires_at: Some(std::time::UNIX_EPOCH + Duration::from_secs(20)),
            updated_at: 30,
        }
    }

    #[test]
    fn round_trip_with_mode_0600_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("nested/state.json"));
        assert!(store.load_blocking().unwrap().is_none());
        store.save_blocking(&state("one")).unwrap();
        store.save_blocking(&state("two")).unwrap();
        let loaded = store.load_blocking().unwrap().unwrap();
        assert_eq!(loaded.refresh_token.unwrap().expose_secret(), "two");
        assert_eq!(loaded.principal.as_deref(), Some("ann@example.com"));
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let entries: Vec<_> = fs::read_dir(dir.path().join("nested")).unwrap().collect();
        assert_eq!(entries.len(), 1, "temporary files were left behind");
    }

    #[test]
    fn corrupt_file_is_an_error_that_does_not_echo_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, br#"{"refresh_token": 12345678}"#).unwrap();
        let err = FileStore::new(&path).load_blocking().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert!(!err.to_string().contains("12345678"), "{err}");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        store.save_blocking(&state("old")).unwrap();
        // A non-empty directory where the file would go makes the rename fail
        // after the temporary file was written beside it.
        let occupied = dir.path().join("occupied");
        fs::create_dir(&occupied).unwrap();
        fs::write(occupied.join("x"), b"x").unwrap();
        assert!(FileStore::new(&occupied)
            .save_blocking(&state("new"))
            .is_err());
        assert_eq!(
            store
                .load_blocking()
                .unwrap()
                .unwrap()
                .refresh_token
                .unwrap()
                .expose_secret(),
            "old"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "a temporary file was left behind: {names:?}"
        );
    }

    #[test]
    fn leftovers_of_a_killed_writer_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        store.save_blocking(&state("kept")).unwrap();
        fs::write(dir.path().join(".state.json.999.0.tmp"), b"{\"refresh_to").unwrap();
        fs::write(dir.path().join("unrelated.tmp"), b"x").unwrap();
        assert_eq!(store.remove_leftovers().unwrap(), 1);
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["state.json", "unrelated.tmp"]);
        assert_eq!(
            FileStore::new(dir.path().join("missing/state.json"))
                .remove_leftovers()
                .unwrap(),
            0
        );
    }

    #[test]
    fn debug_is_redacted() {
        let shown = format!("{:?}", state("sekrit-rt"));
        assert!(!shown.contains("sekrit-rt"), "{shown}");
    }

    #[test]
    fn a_save_based_on_an_older_version_is_refused_with_the_newer_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        let first = store.save_if_blocking(&state("one"), 0).unwrap();
        assert_eq!(first, 1);
        let second = store.save_if_blocking(&state("two"), first).unwrap();
        assert_eq!(second, 2);
        // A writer that read version 1 and missed the second save.
        match store.save_if_blocking(&state("stale"), first) {
            Err(SaveError::Conflict(newer)) => {
                assert_eq!(newer.version, 2);
                assert_eq!(newer.state.refresh_token.unwrap().expose_secret(), "two");
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        let stored = store.load_versioned_blocking().unwrap().unwrap();
        assert_eq!(stored.version, 2);
        assert_eq!(stored.state.refresh_token.unwrap().expose_secret(), "two");
    }

    #[test]
    fn a_file_without_a_version_is_version_zero_and_versions_grow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, br#"{"refresh_token":"old-format","updated_at":1}"#).unwrap();
        let store = FileStore::new(&path);
        assert_eq!(store.load_versioned_blocking().unwrap().unwrap().version, 0);
        store.save_blocking(&state("next")).unwrap();
        assert_eq!(store.load_versioned_blocking().unwrap().unwrap().version, 1);
    }

    #[test]
    fn a_temporary_file_of_a_write_in_progress_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        store.save_blocking(&state("kept")).unwrap();
        let in_progress = dir.path().join(".state.json.4242.0.tmp");
        // Another writer holds the directory lock while its temporary file exists.
        let writer = File::open(dir.path()).unwrap();
        writer.lock().unwrap();
        fs::write(&in_progress, b"{\"refresh_to").unwrap();
        assert_eq!(store.remove_leftovers().unwrap(), 0);
        assert!(in_progress.exists(), "a write in progress lost its file");
        // Once the writer is gone, what it left is a leftover.
        drop(writer);
        assert_eq!(store.remove_leftovers().unwrap(), 1);
        assert!(!in_progress.exists());
    }

    #[tokio::test]
    async fn a_state_another_writer_saves_is_heard_of() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        store.save_blocking(&state("mine")).unwrap();
        let seen = store.load_versioned_blocking().unwrap().unwrap().version;
        let watcher = tokio::spawn({
            let store = store.clone();
            async move { store.changed(seen).await }
        });
        tokio::time::sleep(CHANGE_POLL_INTERVAL * 2).await;
        assert!(!watcher.is_finished(), "no one else wrote yet");
        FileStore::new(store.path())
            .save_blocking(&state("theirs"))
            .unwrap();
        let heard = tokio::time::timeout(Duration::from_secs(30), watcher)
            .await
            .expect("the change is heard of")
            .unwrap()
            .unwrap();
        assert_eq!(heard.version, seen + 1);
        assert_eq!(heard.state.refresh_token.unwrap().expose_secret(), "theirs");
    }
}
