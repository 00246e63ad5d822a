//! The Redis store: one token state shared by every replica that has the
//! same OAuth client and token endpoint.
//!
//! Per account, four keys under `goto-auth-proxy:{NS}:` (NS: a hash of the
//! client id and token URL; the braces keep them in one cluster slot):
//!
//! - `state`, a hash of `version`, `fence` (of the lease it was written
//!   under) and `data` (JSON; tokens and principal sealed with AES-256-GCM
//!   when a key file is given);
//! - `lease`, `OWNER:FENCE` while a replica refreshes (`SET NX PX`, renewed
//!   while the refresh is in flight, deleted only by its owner);
//! - `fence`, a counter that grows with every lease granted;
//! - `changed`, a pub/sub channel on which every write announces its version.
//!
//! Writes are one compare-and-set script: refused when the stored version
//! is above the one the write is based on, or when the stored state was
//! written under a newer lease than the writer's. Each replica keeps its own
//! state file as a copy of the newest state it knows; when Redis cannot be
//! reached a refresh's result goes there and is written back once Redis
//! answers again, unless Redis by then holds a newer state (a higher
//! version, or the same version written later).

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{sleep, timeout};

use super::seal::{hex, Keyring, SealError, Sealed};
use super::{
    BoxFuture, FileStore, Lease, LeaseGrant, PersistedState, SaveError, StateStore, StoreError,
    Versioned,
};
use crate::metrics::AccountMetrics;

/// Upper bound for one Redis operation; past it Redis counts as away.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refresh lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often a held lease is renewed.
const LEASE_RENEWAL: Duration = Duration::from_secs(5);
/// How often the stored state is read even without a notification, since
/// pub/sub drops what is published while a subscriber is away.
const REREAD_INTERVAL: Duration = Duration::from_secs(5);
/// The longest pause between attempts to reach Redis again.
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The write: compare the version and the fence, then store and announce.
const SAVE_SCRIPT: &str = r"
local stored = redis.call('HMGET', KEYS[1], 'version', 'fence')
local version = tonumber(stored[1] or '0')
local fence = tonumber(stored[2] or '0')
if version > tonumber(ARGV[1]) then return {0, version} end
if tonumber(ARGV[2]) < fence then return {-1, version} end
local new = tonumber(ARGV[1]) + 1
redis.call('HSET', KEYS[1], 'version', new, 'fence', ARGV[2], 'data', ARGV[3])
redis.call('PUBLISH', KEYS[2], new)
return {1, new}
";

/// The lease: `SET NX PX`, so granted only when free, then named with the
/// next fencing number (one script, so nobody sees it unnamed).
const LEASE_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. fence, 'PX', ARGV[2])
return fence
";

/// Renewal and release touch the lease only while its owner still holds it.
const RENEW_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The scripts, hashed once; invoked by hash, loaded when Redis lacks them.
static SAVE: LazyLock<Script> = LazyLock::new(|| Script::new(SAVE_SCRIPT));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(LEASE_SCRIPT));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_SCRIPT));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_SCRIPT));

/// One Redis server, shared by every account's store.
#[derive(Clone)]
pub struct RedisServer {
    client: Client,
    connection: ConnectionManager,
    location: Arc<str>,
    keyring: Option<Arc<Keyring>>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Where Redis is and how to speak to it.
pub struct RedisOptions<'a> {
    /// `redis://` or `rediss://` URL, with any password in it.
    pub url: &'a SecretString,
    /// The URL without its password, for logs.
    pub location: &'a str,
    /// A password that overrides the URL's.
    pub password: Option<&'a SecretString>,
    /// Extra roots for `rediss://`, besides the system's.
    pub extra_roots_pem: Option<&'a [u8]>,
    /// Seals tokens at rest when set.
    pub keyring: Option<Arc<Keyring>>,
}

impl RedisServer {
    /// A handle that connects on first use, and again whenever the
    /// connection drops: starting never waits for Redis.
    pub fn new(options: RedisOptions<'_>) -> Result<Self, String> {
        use redis::IntoConnectionInfo as _;
        let mut info = options
            .url
            .expose_secret()
            .into_connection_info()
            .map_err(|e| format!("not a Redis URL: {:?}", e.kind()))?;
        if let Some(password) = options.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose_secret());
            info = info.set_redis_settings(settings);
        }
        let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        let client = if tls {
            let roots = trusted_roots_pem(options.extra_roots_pem)?;
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(roots),
                },
            )
        } else {
            Client::open(info)
        }
        .map_err(|e| format!("cannot use the Redis URL: {:?}", e.kind()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OPERATION_TIMEOUT))
            .set_response_timeout(Some(OPERATION_TIMEOUT))
            .set_max_delay(RECONNECT_MAX);
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("cannot set up the Redis connection: {:?}", e.kind()))?;
        Ok(Self {
            client,
            connection,
            location: options.location.into(),
            keyring: options.keyring,
        })
    }

    /// The store of the account with `client_id` and `token_url`, keeping its
    /// local copy in `state_file`. Watching Redis starts at once and stops
    /// when the store is dropped.
    pub fn store(
        &self,
        client_id: &str,
        token_url: &str,
        state_file: &std::path::Path,
        metrics: AccountMetrics,
    ) -> RedisStore {
        let keys = Keys::new(client_id, token_url);
        tracing::info!(account = %metrics.account(), store = %self.location, key = %keys.state,
            sealed = self.keyring.is_some(), "the account's token state is shared in Redis");
        let shared = Arc::new(Shared {
            location: format!("{} ({})", self.location, keys.state),
            server: self.clone(),
            keys,
            local: FileStore::new(state_file),
            latest: watch::channel(None).0,
            pending: Mutex::new(None),
            owner: hex(&fastrand::u128(..).to_be_bytes()),
            looked_at_local_copy: std::sync::atomic::AtomicBool::new(false),
            reachable: std::sync::atomic::AtomicBool::new(true),
            metrics,
        });
        let watcher = tokio::spawn(watch_store(shared.clone()));
        RedisStore { shared, watcher }
    }
}

/// The system's trust roots and the extra ones, as one PEM bundle.
fn trusted_roots_pem(extra: Option<&[u8]>) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let mut pem = Vec::new();
    for certificate in rustls_native_certs::load_native_certs().certs {
        let body = base64::engine::general_purpose::STANDARD.encode(certificate.as_ref());
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    if let Some(extra) = extra {
        pem.extend_from_slice(extra);
    }
    if pem.is_empty() {
        return Err(
            "no trusted roots for rediss://: install the system's CA certificates \
             or name the Redis server's CA in --upstream-ca-file"
                .into(),
        );
    }
    Ok(pem)
}

/// An account's keys. None holds a secret: the namespace is a hash.
struct Keys {
    state: String,
    lease: String,
    fence: String,
    channel: String,
}

impl Keys {
    fn new(client_id: &str, token_url: &str) -> Self {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(client_id.as_bytes());
        context.update(b"\0");
        context.update(token_url.as_bytes());
        let namespace = hex(&context.finish().as_ref()[..12]);
        let key = |name: &str| format!("goto-auth-proxy:{{{namespace}}}:{name}");
        Self {
            state: key("state"),
            lease: key("lease"),
            fence: key("fence"),
            channel: key("changed"),
        }
    }
}

/// What one account's store and its watcher share.
struct Shared {
    server: RedisServer,
    keys: Keys,
    location: String,
    /// The replica's own copy, and its last resort.
    local: FileStore,
    /// The newest state Redis is known to hold (read, written or heard of).
    latest: watch::Sender<Option<Arc<Versioned>>>,
    /// A state saved while Redis was away, with the version it is based
    /// on, to write back when Redis answers.
    pending: Mutex<Option<Versioned>>,
    /// This replica's name in the lease; random, so a restart is a new owner.
    owner: String,
    /// Whether the watcher has compared the local file with Redis's record since start.
    looked_at_local_copy: std::sync::atomic::AtomicBool,
    /// Whether the last operation reached Redis, so that an outage and its
    /// end are each logged once.
    reachable: std::sync::atomic::AtomicBool,
    metrics: AccountMetrics,
}

/// The stored record's `data`, as JSON.
#[derive(Serialize, Deserialize)]
struct Record {
    updated_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_first_seen: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token_expires_at_ms: Option<u64>,
    /// The secret part in the clear (no key file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secrets: Option<Secrets>,
    /// The secret part sealed (a key file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<Sealed>,
}

/// What only the replicas may read.
#[derive(Serialize, Deserialize, Default)]
struct Secrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    principal: Option<String>,
}

/// One account's token state in Redis.
pub struct RedisStore {
    shared: Arc<Shared>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Shared {
    fn unavailable(&self, operation: &'static str, reason: impl std::fmt::Display) -> StoreError {
        self.metrics.count_store_error(operation);
        if self
            .reachable
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                account = %self.metrics.account(),
                store = %self.location,
                operation,
                %reason,
                "the Redis store does not answer; serving with the token held, and refreshing alone \
                 (kept in the state file) if it nears expiry before Redis is back"
            );
        }
        StoreError::Unavailable {
            location: self.location.clone(),
            reason: reason.to_string(),
        }
    }

    fn reached(&self) {
        if !self
            .reachable
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(account = %self.metrics.account(), store = %self.location, "the Redis store answers again");
        }
    }

    /// Runs one Redis operation under [`OPERATION_TIMEOUT`].
    async fn call<T>(
        &self,
        operation: &'static str,
        work: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match timeout(OPERATION_TIMEOUT, work).await {
            Ok(Ok(value)) => {
                self.reached();
                Ok(value)
            }
            Ok(Err(error)) => Err(self.unavailable(operation, describe(&error))),
            Err(_) => Err(self.unavailable(operation, "no answer in time")),
        }
    }

    /// The state in Redis, `None` when there is none.
    async fn fetch(&self, operation: &'static str) -> Result<Option<Versioned>, StoreError> {
        let mut connection = self.server.connection.clone();
        let fields: Vec<Option<Vec<u8>>> = self
            .call(
                operation,
                redis::cmd("HMGET")
                    .arg(&self.keys.state)
                    .arg("version")
                    .arg("data")
                    .query_async(&mut connection),
            )
            .await?;
        let (Some(Some(version)), Some(Some(data))) = (fields.first(), fields.get(1)) else {
            return Ok(None);
        };
        let version = std::str::from_utf8(version)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.unreadable("its version is not a number"))?;
        self.decode(data, version).map(Some)
    }

    fn unreadable(&self, reason: impl std::fmt::Display) -> StoreError {
        self.metrics.count_store_error("load");
        StoreError::Unreadable {
            location: self.location.clone(),
            reason: reason.to_string(),
        }
    }

    /// What binds a sealed record to its key and version.
    fn seal_context(&self, version: u64) -> Vec<u8> {
        format!("{}\0{version}", self.keys.state).into_bytes()
    }

    fn encode(&self, state: &PersistedState, version: u64) -> Vec<u8> {
        let secrets = Secrets {
            refresh_token: state
                .refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            access_token: state
                .access_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            principal: state.principal.clone(),
        };
        let (secrets, sealed) = match &self.server.keyring {
            Some(keyring) => {
                let plaintext = serde_json::to_vec(&secrets).expect("secrets serialize");
                (
                    None,
                    Some(keyring.seal(&plaintext, &self.seal_context(version))),
                )
            }
            None => (Some(secrets), None),
        };
        let record = Record {
            updated_at: state.updated_at,
            refresh_token_first_seen: state.refresh_token_first_seen,
            access_token_expires_at_ms: state
                .access_token_expires_at
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .map(|at| at.as_millis() as u64),
            secrets,
            sealed,
        };
        serde_json::to_vec(&record).expect("a record serializes")
    }

    fn decode(&self, data: &[u8], version: u64) -> Result<Versioned, StoreError> {
        let record: Record = serde_json::from_slice(data)
            .map_err(|e| self.unreadable(format!("not a state record (column {})", e.column())))?;
        let secrets = match (&self.server.keyring, record.sealed, record.secrets) {
            (Some(keyring), Some(sealed), _) => {
                let plaintext = keyring
                    .open(&sealed, &self.seal_context(version))
                    .map_err(|e| self.unreadable(e))?;
                serde_json::from_slice(&plaintext)
                    .map_err(|_| self.unreadable("its sealed part is not a state record"))?
            }
            (Some(_), None, _) => return Err(self.unreadable(SealError::NotSealed)),
            (None, Some(sealed), _) => {
                return Err(self.unreadable(format!(
                    "it is sealed with key {}: give this replica the same --store-key-file as the others",
                    sealed.key_id
                )))
            }
            (None, None, secrets) => secrets.unwrap_or_default(),
        };
        Ok(Versioned {
            version,
            state: PersistedState {
                refresh_token: super::stored_secret(secrets.refresh_token),
                refresh_token_first_seen: record.refresh_token_first_seen,
                principal: secrets.principal,
                access_token: super::stored_secret(secrets.access_token),
                access_token_expires_at: record
                    .access_token_expires_at_ms
                    .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                updated_at: record.updated_at,
            },
        })
    }

    /// The compare-and-set write, under `fence`.
    async fn write(
        &self,
        state: &PersistedState,
        based_on: u64,
        fence: u64,
    ) -> Result<Written, StoreError> {
        let data = self.encode(state, based_on + 1);
        let mut connection = self.server.connection.clone();
        let mut invocation = SAVE.key(&self.keys.state);
        invocation
            .key(&self.keys.channel)
            .arg(based_on)
            .arg(fence)
            .arg(data);
        let (outcome, version): (i64, u64) = self
            .call("save", invocation.invoke_async(&mut connection))
            .await?;
        Ok(match outcome {
            1 => Written::Saved(version),
            0 => Written::Newer,
            _ => Written::Fenced,
        })
    }

    /// Takes `stored` as the newest known state, and copies it to the local file.
    async fn learn(&self, stored: Versioned) {
        let newer = self
            .latest
            .borrow()
            .as_ref()
            .is_none_or(|known| stored.version > known.version);
        if !newer {
            return;
        }
        self.copy_locally(&stored).await;
        self.latest.send_replace(Some(Arc::new(stored)));
    }

    async fn copy_locally(&self, stored: &Versioned) {
        if let Err(error) = self.local.put(&stored.state, stored.version).await {
            tracing::warn!(account = %self.metrics.account(), error = %error,
                "cannot update the local copy of the shared token state; Redis still holds it");
        }
    }

    /// What this replica holds without Redis: `pending`, else its file.
    async fn local_view(
        &self,
        pending: Option<Versioned>,
    ) -> Result<Option<Versioned>, StoreError> {
        match pending {
            Some(mine) => Ok(Some(mine)),
            None => self.local.load().await,
        }
    }

    /// Saves `state` in the local file only, to be written back later. The
    /// version stays `based_on`: Redis gives the state its version when it
    /// is written back, so that what other replicas wrote meanwhile is
    /// still heard of as newer.
    async fn save_alone(&self, state: PersistedState, based_on: u64) -> Result<u64, SaveError> {
        self.local.put(&state, based_on).await?;
        *self.pending.lock().expect("pending lock") = Some(Versioned {
            state,
            version: based_on,
        });
        Ok(based_on)
    }

    /// Brings Redis and this replica to the same newest state: a state
    /// saved here while Redis was away (in memory, or in the local file
    /// from before a restart) is written back unless Redis holds a newer
    /// one; a record Redis lost is put back from the local copy.
    async fn sync(&self) -> Result<(), StoreError> {
        let stored = self.fetch("watch").await?;
        self.take_up_state_saved_before_start(stored.as_ref()).await;
        let pending = self.pending.lock().expect("pending lock").clone();
        if let Some(mine) = pending {
            return self.write_back(mine, stored, Origin::SavedAlone).await;
        }
        match stored {
            Some(stored) => {
                self.learn(stored).await;
                Ok(())
            }
            // Redis lost the record: put this replica's copy back.
            None => match self.local.load().await.ok().flatten() {
                Some(local) if local.state.refresh_token.is_some() => {
                    self.write_back(local, None, Origin::LocalCopy).await
                }
                _ => Ok(()),
            },
        }
    }

    /// Once after start: a state the local file holds that was refreshed
    /// alone before this process began (and so is not in `pending`) is
    /// taken up to be written back.
    async fn take_up_state_saved_before_start(&self, stored: Option<&Versioned>) {
        let Some(stored) = stored else { return };
        if self
            .looked_at_local_copy
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Ok(Some(local)) = self.local.load().await {
            if saved_alone_before(&local, stored) {
                let mut pending = self.pending.lock().expect("pending lock");
                pending.get_or_insert(local);
            }
        }
    }

    /// Writes `mine`, a state based on version `mine.version`, to Redis
    /// unless `stored` is newer.
    async fn write_back(
        &self,
        mine: Versioned,
        stored: Option<Versioned>,
        origin: Origin,
    ) -> Result<(), StoreError> {
        if let Some(stored) = stored.as_ref().filter(|s| !based_state_is_newer(&mine, s)) {
            if origin == Origin::SavedAlone {
                tracing::warn!(account = %self.metrics.account(), stored_version = stored.version,
                    "Redis holds a newer token state than the one refreshed here while it was away; using Redis's");
                self.clear_pending(mine.version);
            }
            self.learn(stored.clone()).await;
            return Ok(());
        }
        let Some(fence) = self.grant().await? else {
            // Another replica is writing; what it writes is heard of, and compared again.
            return Ok(());
        };
        let based_on = stored.as_ref().map_or(0, |s| s.version).max(mine.version);
        let written = self.write(&mine.state, based_on, fence).await;
        self.give_back(fence).await;
        match written? {
            Written::Saved(version) => {
                tracing::info!(account = %self.metrics.account(), version, what = origin.describe(),
                    "written back to Redis");
                self.clear_pending(mine.version);
                self.learn(Versioned {
                    state: mine.state,
                    version,
                })
                .await;
            }
            // Someone wrote in between; the next look compares again.
            Written::Newer | Written::Fenced => {}
        }
        Ok(())
    }

    /// Forgets the state waiting to be written back once a write based on
    /// `version` or later covers it.
    fn clear_pending(&self, version: u64) {
        let mut pending = self.pending.lock().expect("pending lock");
        if pending.as_ref().is_some_and(|p| p.version <= version) {
            *pending = None;
        }
    }

    /// The lease's next fencing number, or `None` while another replica holds it.
    async fn grant(&self) -> Result<Option<u64>, StoreError> {
        let mut connection = self.server.connection.clone();
        let mut invocation = LEASE.key(&self.keys.lease);
        invocation
            .key(&self.keys.fence)
            .arg(&self.owner)
            .arg(LEASE_TTL.as_millis() as u64);
        let fence: u64 = self
            .call("lease", invocation.invoke_async(&mut connection))
            .await?;
        Ok((fence > 0).then_some(fence))
    }

    fn lease_value(&self, fence: u64) -> String {
        format!("{}:{fence}", self.owner)
    }

    async fn give_back(&self, fence: u64) {
        let mut connection = self.server.connection.clone();
        let mut invocation = RELEASE.key(&self.keys.lease);
        invocation.arg(self.lease_value(fence));
        // A release that fails is harmless: the lease runs out by itself.
        let _: Result<u64, _> = self
            .call("release", invocation.invoke_async(&mut connection))
            .await;
    }

    /// Keeps the lease `fence` alive while it is held.
    async fn renew(self: Arc<Self>, fence: u64) {
        loop {
            sleep(LEASE_RENEWAL).await;
            let mut connection = self.server.connection.clone();
            let mut invocation = RENEW.key(&self.keys.lease);
            invocation
                .arg(self.lease_value(fence))
                .arg(LEASE_TTL.as_millis() as u64);
            match self
                .call("renew", invocation.invoke_async::<u64>(&mut connection))
                .await
            {
                Ok(1) => {}
                Ok(_) => {
                    tracing::warn!(account = %self.metrics.account(), fence,
                        "the refresh lease ran out while refreshing; another replica may refresh too, \
                         and the write is checked against what it stores");
                    return;
                }
                Err(_) => {}
            }
        }
    }
}

/// What the compare-and-set script did.
enum Written {
    Saved(u64),
    /// A newer version is stored.
    Newer,
    /// The stored state was written under a newer lease.
    Fenced,
}

/// Where a state being written back comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Refreshed here while Redis was away.
    SavedAlone,
    /// This replica's copy of a record Redis no longer has.
    LocalCopy,
}

impl Origin {
    fn describe(self) -> &'static str {
        match self {
            Origin::SavedAlone => "the token state refreshed while Redis was away",
            Origin::LocalCopy => "the local copy of a record Redis lost",
        }
    }
}

/// The order replicas converge on: the higher version, then the newer
/// refresh token, then the later access token. `mine` is based on its
/// version, so it would be stored as the next one.
fn based_state_is_newer(mine: &Versioned, stored: &Versioned) -> bool {
    let order = |state: &PersistedState, version: u64| {
        (
            version,
            state.refresh_token_first_seen.unwrap_or(0),
            state.access_token_expires_at.unwrap_or(UNIX_EPOCH),
        )
    };
    order(&mine.state, mine.version + 1) > order(&stored.state, stored.version)
}

/// Whether the local file holds a state refreshed alone before this process
/// started, which Redis has not seen: based on the stored version or a
/// later one, with another, newer refresh token.
fn saved_alone_before(local: &Versioned, stored: &Versioned) -> bool {
    let token = |v: &Versioned| {
        v.state
            .refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned())
    };
    local.version >= stored.version
        && token(local).is_some()
        && token(local) != token(stored)
        && local.state.refresh_token_first_seen > stored.state.refresh_token_first_seen
}

/// Watches the account's channel, re-reading on every notification, on
/// every (re)connection and on a timer, and writing back what waits to be.
async fn watch_store(shared: Arc<Shared>) {
    let mut pause = Duration::from_millis(200);
    loop {
        match subscribe(&shared).await {
            Ok(pubsub) => {
                let mut messages = pubsub.into_on_message();
                let mut healthy = shared.sync().await.is_ok();
                if healthy {
                    pause = Duration::from_millis(200);
                }
                while healthy {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(_) => healthy = shared.sync().await.is_ok(),
                            None => break,
                        },
                        () = sleep(REREAD_INTERVAL) => healthy = shared.sync().await.is_ok(),
                    }
                }
            }
            Err(error) => {
                let _ = shared.unavailable("watch", error);
            }
        }
        sleep(pause).await;
        pause = (pause * 2).min(RECONNECT_MAX);
    }
}

async fn subscribe(shared: &Shared) -> Result<redis::aio::PubSub, String> {
    let connect = async {
        let mut pubsub = shared.server.client.get_async_pubsub().await?;
        pubsub.subscribe(&shared.keys.channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match timeout(OPERATION_TIMEOUT, connect).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(error)) => Err(describe(&error)),
        Err(_) => Err("no answer in time".into()),
    }
}

/// A Redis error's text; it never holds the URL or a password.
fn describe(error: &redis::RedisError) -> String {
    error.to_string()
}

impl StateStore for RedisStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Versioned>, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let pending = shared.pending.lock().expect("pending lock").clone();
            match shared.fetch("load").await {
                Ok(Some(stored)) => {
                    shared.learn(stored.clone()).await;
                    Ok(match pending {
                        Some(mine) if based_state_is_newer(&mine, &stored) => Some(mine),
                        _ => Some(stored),
                    })
                }
                // Nothing in Redis (new, or it lost its data), or no Redis:
                // what was saved here alone, else the local copy.
                Ok(None) => shared.local_view(pending).await,
                Err(error @ StoreError::Unavailable { .. }) => {
                    tracing::warn!(error = %error, path = %shared.local.path().display(),
                        "reading the local copy of the token state instead");
                    shared.local_view(pending).await
                }
                Err(error) => Err(error),
            }
        })
    }

    fn save<'a>(
        &'a self,
        state: PersistedState,
        based_on: u64,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<u64, SaveError>> {
        Box::pin(async move {
            let shared = &self.shared;
            if lease.is_alone() {
                return shared.save_alone(state, based_on).await;
            }
            match shared.write(&state, based_on, lease.fence).await {
                Ok(Written::Saved(version)) => {
                    shared.clear_pending(based_on);
                    shared.learn(Versioned { state, version }).await;
                    Ok(version)
                }
                Ok(outcome) => {
                    if matches!(outcome, Written::Fenced) {
                        tracing::warn!(account = %shared.metrics.account(), fence = lease.fence,
                            "a replica with a newer refresh lease has stored its state; this write is refused");
                    }
                    match shared.fetch("save").await? {
                        Some(newer) => Err(SaveError::Conflict(Box::new(newer))),
                        None => Err(SaveError::Store(StoreError::Unavailable {
                            location: shared.location.clone(),
                            reason: "the record went away during the write".into(),
                        })),
                    }
                }
                Err(StoreError::Unavailable { .. }) => {
                    // What the endpoint handed out must not be lost: keep it here.
                    shared.save_alone(state, based_on).await
                }
                Err(error) => Err(SaveError::Store(error)),
            }
        })
    }

    fn changed(&self, seen: u64) -> BoxFuture<'_, Result<Versioned, StoreError>> {
        let mut latest = self.shared.latest.subscribe();
        Box::pin(async move {
            let newer = latest
                .wait_for(|known| known.as_ref().is_some_and(|k| k.version > seen))
                .await
                .expect("the store outlives its watchers");
            Ok(newer.as_ref().expect("checked above").as_ref().clone())
        })
    }

    fn lease(&self) -> BoxFuture<'_, Result<LeaseGrant, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            match shared.grant().await? {
                Some(fence) => {
                    shared.metrics.set_store_leader(true);
                    let renewal = tokio::spawn(shared.clone().renew(fence));
                    Ok(LeaseGrant::Held(Lease::granted(fence).renewed_by(renewal)))
                }
                None => Ok(LeaseGrant::Elsewhere),
            }
        })
    }

    fn release(&self, lease: Lease) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let fence = lease.fence;
            let alone = lease.is_alone();
            drop(lease);
            if !alone {
                self.shared.metrics.set_store_leader(false);
                self.shared.give_back(fence).await;
            }
        })
    }

    fn location(&self) -> String {
        self.shared.location.clone()
    }
}
