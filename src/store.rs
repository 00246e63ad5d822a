//! Durable token state: the refresh token and what `status` shows about it.
//!
//! [`StateStore`] is the one abstraction the refresher persists through; the
//! file store is the first implementation, written so that a crash at any
//! moment leaves either the old file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Parses the state file's JSON; on failure, the line and column at fault
/// (never the text, which may hold a token).
pub fn parse_state(bytes: &[u8]) -> Result<PersistedState, (usize, usize)> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(|e| (e.line(), e.column()))?;
    Ok(PersistedState {
        refresh_token: file
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(SecretString::from),
        refresh_token_first_seen: file.refresh_token_first_seen,
        principal: file.principal,
        access_token_expires_at: file.access_token_expires_at,
        updated_at: file.updated_at,
    })
}

/// A boxed future, so the store can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What is kept across restarts. Times are Unix seconds.
#[derive(Clone, Debug, Default)]
pub struct PersistedState {
    /// The newest refresh token the endpoint handed out.
    pub refresh_token: Option<SecretString>,
    /// When that refresh token was first seen.
    pub refresh_token_first_seen: Option<u64>,
    /// The account the tokens act for.
    pub principal: Option<String>,
    /// When the last access token obtained runs out.
    pub access_token_expires_at: Option<u64>,
    /// When the state was written.
    pub updated_at: u64,
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
}

/// Why state could not be read or written. Texts never hold the contents.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the state file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the state file {path} is not valid JSON (line {line}, column {column}); move it aside and run `goto-auth-proxy login`")]
    Corrupt {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("cannot write the state file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Where token state lives between runs.
pub trait StateStore: Send + Sync + 'static {
    /// The stored state, or `None` when there is none yet.
    fn load(&self) -> BoxFuture<'_, Result<Option<PersistedState>, StoreError>>;
    /// Stores `state` durably: when this returns `Ok`, a crash cannot lose it.
    fn save(&self, state: PersistedState) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Where the state lives, for logs and `status`.
    fn location(&self) -> String;
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
        parse_state(&bytes)
            .map(Some)
            .map_err(|(line, column)| StoreError::Corrupt {
                path: self.path.clone(),
                line,
                column,
            })
    }

    /// Removes temporary files that a process killed mid-write left beside the
    /// state file; returns how many went. Call before this process writes.
    pub fn remove_leftovers(&self) -> io::Result<usize> {
        let (dir, prefix) = temporary_prefix(&self.path);
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes the file now, on the calling thread.
    pub fn save_blocking(&self, state: &PersistedState) -> Result<(), StoreError> {
        let file = StateFile {
            refresh_token: state
                .refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            refresh_token_first_seen: state.refresh_token_first_seen,
            principal: state.principal.clone(),
            access_token_expires_at: state.access_token_expires_at,
            updated_at: state.updated_at,
        };
        let mut bytes = serde_json::to_vec_pretty(&file).expect("state serializes");
        bytes.push(b'\n');
        write_atomically(&self.path, &bytes).map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

impl StateStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<PersistedState>, StoreError>> {
        let store = self.clone();
        Box::pin(async move { run_blocking(move || store.load_blocking()).await })
    }

    fn save(&self, state: PersistedState) -> BoxFuture<'_, Result<(), StoreError>> {
        let store = self.clone();
        Box::pin(async move { run_blocking(move || store.save_blocking(&state)).await })
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
    use super::*;

    fn state(token: &str) -> PersistedState {
        PersistedState {
            refresh_token: Some(SecretString::from(token)),
            refresh_token_first_seen: Some(10),
            principal: Some("ann@example.com".into()),
            access_token_expires_at: Some(20),
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
}
