//! Durable token state, behind one trait that a store shared by several
//! writers can implement.
//!
//! [`StateStore`] is what the refresher, `login` and `status` use: a load, a
//! save that is a compare-and-set on a version (a save based on an older
//! version than the stored one is refused, and the caller learns the newer
//! state), a way to hear of a state someone else wrote, and a lease that
//! says who may refresh. The file store ([`file`]) serves one machine:
//! writers serialised by a lock on the state file's directory, and a lease
//! that is always granted. The Redis store ([`redis`]) serves replicas: a
//! lease with a fencing number, notifications, and the state file as each
//! replica's copy; [`seal`] keeps its tokens unreadable without the key.
//! [`Stores`] opens the kind `--store` names.

pub mod file;
pub mod redis;
pub mod seal;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use secrecy::SecretString;

pub use self::file::{parse_state, write_atomically, FileStore};

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
    /// The last access token obtained, for a store that other processes
    /// read it from. The file store never writes it: the file is one
    /// process's, and an access token on disk is one more secret at rest.
    pub access_token: Option<SecretString>,
    /// When the last access token obtained runs out (kept to the
    /// millisecond where the store can, so that replicas reading it plan
    /// their refreshes alike).
    pub access_token_expires_at: Option<std::time::SystemTime>,
    /// When the state was written.
    pub updated_at: u64,
}

/// A token as a store read it: an empty one counts as none.
fn stored_secret(value: Option<String>) -> Option<SecretString> {
    value.filter(|t| !t.is_empty()).map(SecretString::from)
}

/// A stored state and its version, which grows by one with every save.
#[derive(Clone, Debug)]
pub struct Versioned {
    /// The state.
    pub state: PersistedState,
    /// Its version; 0 for a state written before versions were kept.
    pub version: u64,
}

/// The right to refresh an account's tokens, for as long as the store grants it.
#[derive(Debug)]
pub struct Lease {
    /// A number that grows with every lease granted; a store that checks it
    /// refuses a write fenced by an older one.
    pub fence: u64,
    /// Taken without the store's agreement, because the store could not be
    /// asked: what is saved under it stays local until the store is back.
    alone: bool,
    /// Keeps a shared store's lease alive while it is held; dropping it stops that.
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    /// A lease the store granted, fenced by `fence`.
    pub fn granted(fence: u64) -> Self {
        Self {
            fence,
            alone: false,
            renewal: None,
        }
    }

    /// The right a process takes on its own to refresh when the store
    /// cannot be reached and its token is about to run out.
    pub fn alone() -> Self {
        Self {
            fence: 0,
            alone: true,
            renewal: None,
        }
    }

    /// Whether this lease was taken without the store.
    pub fn is_alone(&self) -> bool {
        self.alone
    }

    /// This lease, kept alive by `renewal` until it is released or dropped.
    fn renewed_by(mut self, renewal: tokio::task::JoinHandle<()>) -> Self {
        self.renewal = Some(renewal);
        self
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(renewal) = &self.renewal {
            renewal.abort();
        }
    }
}

/// Who may refresh now.
#[derive(Debug)]
pub enum LeaseGrant {
    /// This process: refresh, save, then release.
    Held(Lease),
    /// Someone else is refreshing: wait to hear of the state they write.
    Elsewhere,
}

/// Why state could not be read or written. Texts never hold the contents.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the state file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the state file {path} is not valid JSON (line {line}, column {column}); move it aside and run `goto-auth-proxy login`")]
    Corrupt {
        path: std::path::PathBuf,
        line: usize,
        column: usize,
    },
    #[error("cannot write the state file {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The shared store could not be reached or did not answer in time.
    #[error("the token store {location} is unavailable: {reason}")]
    Unavailable { location: String, reason: String },
    /// The shared store holds a record this process cannot read.
    #[error("the token store {location} holds a record this replica cannot read: {reason}")]
    Unreadable { location: String, reason: String },
}

/// Why a save did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Someone saved a newer state since the version the save was based on;
    /// here it is. Nothing was written.
    #[error("the stored state has changed since it was read (now version {})", .0.version)]
    Conflict(Box<Versioned>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where token state lives between runs.
pub trait StateStore: Send + Sync + 'static {
    /// The stored state, or `None` when there is none yet.
    fn load(&self) -> BoxFuture<'_, Result<Option<Versioned>, StoreError>>;

    /// Stores `state` durably if the stored version is still `based_on` (0:
    /// nothing stored yet) and returns the new version; when this returns
    /// `Ok`, a crash cannot lose it. `lease` is the right to write.
    fn save<'a>(
        &'a self,
        state: PersistedState,
        based_on: u64,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<u64, SaveError>>;

    /// Resolves with the stored state once its version is above `seen`
    /// (a state someone else wrote). Never resolves for a store nobody else writes.
    fn changed(&self, seen: u64) -> BoxFuture<'_, Result<Versioned, StoreError>>;

    /// Asks for the right to refresh.
    fn lease(&self) -> BoxFuture<'_, Result<LeaseGrant, StoreError>>;

    /// Gives the right to refresh back.
    fn release(&self, lease: Lease) -> BoxFuture<'_, ()>;

    /// Where the state lives, for logs and `status`.
    fn location(&self) -> String;
}

/// Opens each account's store of the kind `--store` names.
#[derive(Debug)]
pub struct Stores {
    redis: Option<self::redis::RedisServer>,
}

impl Stores {
    /// The stores of `settings`; a Redis server is connected to on first use.
    pub fn new(settings: &crate::config::Settings) -> Result<Self, String> {
        let redis = match &settings.store.kind {
            crate::config::StoreKind::File => None,
            crate::config::StoreKind::Redis { url, location } => {
                Some(self::redis::RedisServer::new(self::redis::RedisOptions {
                    url,
                    location,
                    password: settings.store.password.as_ref().map(|p| &p.value),
                    extra_roots_pem: settings.extra_roots_pem.as_deref(),
                    keyring: settings.store.keyring(),
                })?)
            }
        };
        Ok(Self { redis })
    }

    /// The store of `account`: its state file, or its state in Redis with
    /// the state file as this replica's copy.
    pub fn open(
        &self,
        account: &crate::config::AccountSettings,
        metrics: crate::metrics::AccountMetrics,
    ) -> Arc<dyn StateStore> {
        let Some(redis) = &self.redis else {
            return open(&account.state_file);
        };
        clean_up_beside(&FileStore::new(&account.state_file));
        Arc::new(redis.store(
            &account.client.id,
            account.token_url.as_str(),
            &account.state_file,
            metrics,
        ))
    }
}

/// The store of an account whose state file is `state_file`: that file,
/// cleaned of what an interrupted write left behind.
pub fn open(state_file: &std::path::Path) -> Arc<dyn StateStore> {
    let store = FileStore::new(state_file);
    clean_up_beside(&store);
    Arc::new(store)
}

fn clean_up_beside(store: &FileStore) {
    match store.remove_leftovers() {
        Ok(0) => {}
        Ok(count) => tracing::info!(
            count,
            "removed temporary files an interrupted state write left behind"
        ),
        Err(error) => tracing::warn!(error = %error, "cannot clean up beside the state file"),
    }
}
