//! The side task that keeps the access token fresh.
//!
//! Each turn: obtain a token, persist a rotated refresh token, publish, then
//! sleep until the next deadline, or until a request reports the token stale.
//! On a failure it logs, keeps the token it has while that is valid, and backs
//! off with jitter; on a rejection it waits for an operator.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::time::{sleep, sleep_until, Instant};

use super::endpoint::{unix_now, EndpointError, Grant, TokenClient};
use super::grant::TokenGrant;
use super::{
    AccessToken, Snapshot, TokenSource, TokenState, REFRESH_TOKEN_LIFETIME, REFRESH_TOKEN_WARN_AGE,
};
use crate::metrics::AccountMetrics;
use crate::shutdown::ShutdownSignal;
use crate::store::{
    Lease, LeaseGrant, PersistedState, SaveError, StateStore, StoreError, Versioned,
};

/// First delay after a failed token request; doubles up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest delay between failed token requests.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often a rejected proxy looks for a new refresh token in the state file.
const REJECTED_RECHECK: Duration = Duration::from_secs(15);
/// First delay before retrying a failed state write; doubles up to [`BACKOFF_MAX`].
const SAVE_RETRY_BASE: Duration = Duration::from_secs(1);
/// How long a follower waits for the lease holder's token before asking again.
const FOLLOW_WAIT: Duration = Duration::from_secs(15);
/// With no valid token at all, how many tries for the store's lease fail
/// before the refresher refreshes alone.
const LEASE_TRIES_WITHOUT_TOKEN: u32 = 2;
/// How long to wait before watching the store again after watching failed.
const WATCH_RETRY: Duration = Duration::from_secs(5);

/// What the proxy presents to the token endpoint.
pub enum Credential {
    /// A refresh token, and the bootstrap token to fall back to once if it is rejected.
    RefreshToken {
        current: SecretString,
        /// When `current` was first seen (Unix seconds).
        since: u64,
        fallback: Option<SecretString>,
    },
    /// A personal access token; nothing rotates, nothing is persisted.
    Pat(SecretString),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::RefreshToken { .. } => "Credential::RefreshToken([redacted])",
            Credential::Pat(_) => "Credential::Pat([redacted])",
        })
    }
}

impl Credential {
    /// What the credential is, without its value, for `run --check`.
    pub fn describe(&self) -> &'static str {
        match self {
            Credential::RefreshToken {
                fallback: Some(_), ..
            } => "refresh token from the state file (bootstrap token kept as fallback)",
            Credential::RefreshToken { .. } => "refresh token",
            Credential::Pat(_) => "personal access token",
        }
    }

    fn grant(&self) -> Grant {
        match self {
            Credential::RefreshToken { current, .. } => Grant::RefreshToken(current.clone()),
            Credential::Pat(pat) => Grant::PersonalAccessToken(pat.clone()),
        }
    }

    fn refresh_token_since(&self) -> Option<u64> {
        match self {
            Credential::RefreshToken { since, .. } => Some(*since),
            Credential::Pat(_) => None,
        }
    }
}

/// When the next proactive refresh is due: once the remaining lifetime falls
/// below `margin`, or below half the lifetime if that is smaller.
pub fn refresh_delay(lifetime: Duration, margin: Duration) -> Duration {
    lifetime - margin.min(lifetime / 2)
}

/// Exponential backoff with equal jitter: half the delay fixed, half random,
/// so that replicas that failed together do not retry together.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self, base: Duration) -> Duration {
        let exponent = self.failures.min(16);
        self.failures += 1;
        let ceiling = base.saturating_mul(1 << exponent).min(BACKOFF_MAX);
        ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Where the refresher stands between turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the next proactive refresh; a stale report refreshes at once.
    Scheduled,
    /// Waiting out a backoff after a failure; stale reports wait too.
    BackingOff,
    /// The credential was rejected; waiting for a new one in the store.
    Rejected,
}

/// What woke the refresher.
enum Wake {
    /// A refresh is due (proactively, after a backoff, or a recheck).
    Due,
    /// A request reported the current token stale.
    Stale,
    /// A state write that failed is due to be tried again.
    SaveDue,
    /// Someone else stored a newer state.
    Heard(Versioned),
    /// Shutdown.
    Stop,
}

/// Keeps one token source fresh for one account.
pub struct Refresher {
    client: Box<dyn TokenClient>,
    credential: Credential,
    store: Option<Arc<dyn StateStore>>,
    /// The version of the stored state this refresher's credential comes from.
    version: u64,
    source: Arc<TokenSource>,
    metrics: AccountMetrics,
    margin: Duration,
    unsaved: Option<PersistedState>,
    save_backoff: Backoff,
    next_save: Option<Instant>,
    principal: Option<Arc<str>>,
    /// Tries for the lease that failed in a row (the store unreachable).
    lease_failures: u32,
}

impl Refresher {
    /// A refresher that asks `client` for tokens and publishes into
    /// `source`. `store` is where a rotated refresh token goes, and `version`
    /// the stored version `credential` was read from; `None` for a PAT,
    /// which never rotates.
    pub fn new(
        client: impl TokenClient,
        credential: Credential,
        store: Option<(Arc<dyn StateStore>, u64)>,
        source: Arc<TokenSource>,
        metrics: AccountMetrics,
        margin: Duration,
    ) -> Self {
        let (store, version) = match store {
            Some((store, version)) => (Some(store), version),
            None => (None, 0),
        };
        Self {
            client: Box::new(client),
            credential,
            store,
            version,
            source,
            metrics,
            margin,
            unsaved: None,
            save_backoff: Backoff::default(),
            next_save: None,
            principal: None,
            lease_failures: 0,
        }
    }

    /// Runs until `shutdown` fires.
    pub async fn run(mut self, mut shutdown: ShutdownSignal) {
        let mut phase = Phase::Scheduled;
        let mut next_refresh = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            let mut after_refusal = false;
            match self.wait(phase, next_refresh, &mut shutdown).await {
                Wake::Stop => return,
                Wake::Due => {}
                Wake::Stale => {
                    if !self.source.current_is_reported_stale() {
                        continue;
                    }
                    tracing::info!("upstream refused the current access token; refreshing now");
                    after_refusal = true;
                }
                Wake::SaveDue => {
                    self.retry_save().await;
                    continue;
                }
                Wake::Heard(stored) => {
                    let adopted = self.adopt(stored);
                    match (adopted.access_token_lifetime, phase) {
                        (Some(lifetime), _) => {
                            phase = Phase::Scheduled;
                            next_refresh = Instant::now() + refresh_delay(lifetime, self.margin);
                        }
                        // A rejected proxy tries the new state's refresh token at once.
                        (None, Phase::Rejected) => {
                            phase = Phase::Scheduled;
                            next_refresh = Instant::now();
                        }
                        (None, _) => {}
                    }
                    continue;
                }
            }
            if phase == Phase::Rejected && !self.adopt_new_stored_token().await {
                next_refresh = Instant::now() + REJECTED_RECHECK;
                continue;
            }
            match self.refresh(after_refusal).await {
                Ok(lifetime) => {
                    backoff.reset();
                    phase = Phase::Scheduled;
                    next_refresh = Instant::now() + refresh_delay(lifetime, self.margin);
                }
                Err(Failure::Endpoint(error)) if error.is_rejection() => {
                    if phase != Phase::Rejected {
                        tracing::error!(
                            error = %error,
                            "the proxy cannot obtain access tokens; clients get 503 token_unavailable until an operator acts: \
                             run `goto-auth-proxy login` (a running proxy picks up the new state file) \
                             or set a new GOTO_REFRESH_TOKEN and restart"
                        );
                    }
                    phase = Phase::Rejected;
                    self.publish_state(TokenState::Rejected);
                    next_refresh = Instant::now() + REJECTED_RECHECK;
                }
                Err(failure) => {
                    let mut delay = backoff
                        .next(BACKOFF_BASE)
                        .max(failure.retry_after().unwrap_or_default());
                    if let (Failure::Store(_), Some(at)) = (&failure, self.alone_at()) {
                        // Try the store again no later than the moment to refresh alone.
                        delay = delay.min(at.saturating_duration_since(Instant::now()));
                    }
                    let retry_in =
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
                    if self.source.is_ready() {
                        tracing::warn!(error = %failure, %retry_in,
                            "refresh failed; the current token is still valid and stays in use");
                    } else {
                        tracing::warn!(error = %failure, %retry_in,
                            "refresh failed and no valid token is held; requests wait for the retry");
                    }
                    phase = Phase::BackingOff;
                    self.publish_state(TokenState::Retrying);
                    next_refresh = Instant::now() + delay;
                }
            }
        }
    }

    /// Sleeps until something needs doing.
    async fn wait(
        &self,
        phase: Phase,
        next_refresh: Instant,
        shutdown: &mut ShutdownSignal,
    ) -> Wake {
        let next_save = self.next_save;
        let save_due = async {
            match next_save {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let heard = async {
            let Some(store) = &self.store else {
                return std::future::pending().await;
            };
            match store.changed(self.version).await {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot watch the stored token state; looking again later");
                    sleep(WATCH_RETRY).await;
                    std::future::pending().await
                }
            }
        };
        // Biased, so that what is due is done in a fixed order.
        tokio::select! {
            biased;
            () = shutdown.wait() => Wake::Stop,
            () = sleep_until(next_refresh) => Wake::Due,
            () = self.source.stale_reported(), if phase == Phase::Scheduled => Wake::Stale,
            () = save_due => Wake::SaveDue,
            stored = heard => Wake::Heard(stored),
        }
    }

    /// One refresh: take the lease, ask for a token (with the fallbacks a
    /// rejection allows), save, publish, release. When someone else holds
    /// the lease, wait to hear of the token they store instead; when the
    /// lease shows someone stored a token since, take that one.
    async fn refresh(&mut self, after_refusal: bool) -> Result<Duration, Failure> {
        let Some(store) = self.store.clone() else {
            let grant = self.request_with_fallbacks().await?;
            return Ok(self.accept(grant, after_refusal, None).await?);
        };
        let granted = store.lease().await;
        self.lease_failures = match granted {
            Ok(_) => 0,
            Err(_) => self.lease_failures + 1,
        };
        let lease = match granted {
            Ok(LeaseGrant::Held(lease)) => lease,
            Ok(LeaseGrant::Elsewhere) => {
                if let Some(lifetime) = self
                    .take_stored_instead(store.as_ref(), after_refusal)
                    .await
                {
                    return Ok(lifetime);
                }
                return self.follow(store.as_ref()).await;
            }
            Err(error) if self.must_refresh_alone(after_refusal) => {
                tracing::warn!(
                    error = %error,
                    store = %store.location(),
                    "the token store cannot be reached and the access token is about to run out: \
                     refreshing without the refresh lease; a rotated refresh token is kept in the state file \
                     and written to the store when it answers again"
                );
                self.metrics.count_refresh_alone();
                Lease::alone()
            }
            Err(error) => return Err(Failure::Store(error)),
        };
        if !lease.is_alone() {
            if let Some(lifetime) = self
                .take_stored_instead(store.as_ref(), after_refusal)
                .await
            {
                store.release(lease).await;
                return Ok(lifetime);
            }
        }
        let result = match self.request_with_fallbacks().await {
            Ok(grant) => self
                .accept(grant, after_refusal, Some(&lease))
                .await
                .map_err(Failure::from),
            Err(failure) => Err(failure),
        };
        store.release(lease).await;
        result
    }

    /// Whether to refresh although the store cannot grant the lease:
    /// upstream refused the token, its moment to refresh alone has come, or
    /// no valid token is held and the store failed more than once.
    fn must_refresh_alone(&self, after_refusal: bool) -> bool {
        match self.alone_at() {
            Some(at) => after_refusal || Instant::now() >= at,
            None => self.lease_failures >= LEASE_TRIES_WITHOUT_TOKEN,
        }
    }

    /// When the valid token held is to be refreshed alone if the store is
    /// still away: once less than half of the time between its planned
    /// refresh and its expiry is left. `None` without a valid token.
    fn alone_at(&self) -> Option<Instant> {
        let snapshot = self.source.snapshot();
        let token = snapshot.token.as_ref().filter(|t| t.is_valid())?;
        let window = self.margin.min(token.lifetime() / 2);
        Some(token.expires_at() - window / 2)
    }

    /// Whoever holds the lease: when another writer stored a state since
    /// this refresher last looked (or, before its first token, when the
    /// stored access token is still good), takes it instead of asking the
    /// endpoint or waiting for the holder, and returns the stored token's
    /// lifetime left.
    async fn take_stored_instead(
        &mut self,
        store: &dyn StateStore,
        after_refusal: bool,
    ) -> Option<Duration> {
        let stored = store.load().await.ok()??;
        let newer = stored.version > self.version;
        let first = self.source.snapshot().generation == 0;
        if !newer && (!first || after_refusal) {
            return None;
        }
        self.adopt(stored).access_token_lifetime
    }

    /// Another process is refreshing: waits, up to [`FOLLOW_WAIT`], for the
    /// state it stores, and takes its access token into use.
    async fn follow(&mut self, store: &dyn StateStore) -> Result<Duration, Failure> {
        tracing::debug!("another process holds the refresh lease; waiting for its token");
        match tokio::time::timeout(FOLLOW_WAIT, store.changed(self.version)).await {
            Ok(Ok(stored)) => self
                .adopt(stored)
                .access_token_lifetime
                .ok_or(Failure::NothingHeard),
            Ok(Err(error)) => Err(Failure::Store(error)),
            Err(_) => Err(Failure::NothingHeard),
        }
    }

    /// Takes a state someone else stored: its refresh token for the next
    /// refresh, and its access token, if it carries a valid one, at once.
    fn adopt(&mut self, stored: Versioned) -> Adopted {
        self.version = stored.version;
        let state = stored.state;
        let mut refresh_token_changed = false;
        if let (Credential::RefreshToken { current, since, .. }, Some(token)) =
            (&mut self.credential, state.refresh_token)
        {
            if token.expose_secret() != current.expose_secret() {
                *current = token;
                *since = state.refresh_token_first_seen.unwrap_or_else(unix_now);
                refresh_token_changed = true;
            }
        }
        if let Some(principal) = state.principal {
            self.principal = Some(principal.into());
        }
        let access_token_lifetime = state
            .access_token_expires_at
            .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
            .filter(|left| !left.is_zero())
            .zip(state.access_token)
            .and_then(|(lifetime, token)| {
                let token = AccessToken::new(&token, lifetime).ok()?;
                self.log_new_token(&token, self.source.snapshot().generation == 0, false);
                self.publish(token);
                Some(lifetime)
            });
        if refresh_token_changed {
            tracing::info!(
                version = self.version,
                "another writer stored a newer refresh token; using it from now on"
            );
        }
        Adopted {
            refresh_token_changed,
            access_token_lifetime,
        }
    }

    /// One token request; on a rejection, first a refresh token someone
    /// else stored (they may have rotated it a moment ago), then the
    /// bootstrap token, each tried once.
    async fn request_with_fallbacks(&mut self) -> Result<TokenGrant, Failure> {
        let mut reread = false;
        loop {
            let error = match self.client.request(&self.credential.grant()).await {
                Ok(grant) => {
                    self.metrics.count_refresh("success");
                    return Ok(grant);
                }
                Err(error) => error,
            };
            self.metrics.count_refresh(error.kind());
            if !error.is_rejection() {
                return Err(Failure::Endpoint(error));
            }
            if !reread {
                reread = true;
                if self.adopt_new_stored_token().await {
                    continue;
                }
            }
            if self.fall_back() {
                tracing::warn!(
                    error = %error,
                    "the state file's refresh token was rejected; trying the bootstrap refresh token"
                );
                continue;
            }
            return Err(Failure::Endpoint(error));
        }
    }

    /// Switches to the bootstrap token if there is one left to try.
    fn fall_back(&mut self) -> bool {
        if let Credential::RefreshToken {
            current,
            since,
            fallback,
        } = &mut self.credential
        {
            if let Some(bootstrap) = fallback.take() {
                *current = bootstrap;
                *since = unix_now();
                return true;
            }
        }
        false
    }

    /// Takes a grant into use: persist what must survive a crash, then publish.
    async fn accept(
        &mut self,
        grant: TokenGrant,
        after_refusal: bool,
        lease: Option<&Lease>,
    ) -> Result<Duration, EndpointError> {
        let mut token = AccessToken::new(&grant.access_token, grant.lifetime)?;
        token.after_refusal = after_refusal;
        let rotated = self.take_rotated(grant.refresh_token);
        if let Some(principal) = grant.principal {
            if self.principal.as_deref() != Some(principal.as_str()) {
                self.principal = Some(principal.into());
            }
        }
        if let Credential::RefreshToken { fallback, .. } = &mut self.credential {
            // The bootstrap token is only a way in; once a refresh works it is spent.
            *fallback = None;
        }
        if let Some(lease) = lease {
            self.save(&grant.access_token, &token, lease).await;
        }
        self.warn_if_refresh_token_is_old();
        let first = self.source.snapshot().generation == 0;
        self.log_new_token(&token, first, rotated);
        let lifetime = token.lifetime();
        self.publish(token);
        Ok(lifetime)
    }

    /// Publishes `token` as the next generation.
    fn publish(&self, token: AccessToken) {
        let previous = self.source.snapshot();
        self.source.publish(Snapshot {
            token: Some(token),
            generation: previous.generation + 1,
            state: TokenState::Fresh,
            principal: self.principal.clone(),
            refresh_token_since: self.credential.refresh_token_since(),
        });
    }

    /// Replaces the refresh token if the grant carried a different one.
    fn take_rotated(&mut self, offered: Option<SecretString>) -> bool {
        let (Credential::RefreshToken { current, since, .. }, Some(offered)) =
            (&mut self.credential, offered)
        else {
            return false;
        };
        if offered.expose_secret() == current.expose_secret() {
            return false;
        }
        *current = offered;
        *since = unix_now();
        true
    }

    /// GoTo's refresh tokens die after about 30 days unless rotated: say so
    /// while there is still time to run `login`.
    fn warn_if_refresh_token_is_old(&self) {
        let Some(since) = self.credential.refresh_token_since() else {
            return;
        };
        let age = Duration::from_secs(unix_now().saturating_sub(since));
        if age >= REFRESH_TOKEN_WARN_AGE {
            tracing::warn!(
                age_days = age.as_secs() / 86_400,
                "the refresh token has not rotated for {} days and may stop working by day {}; \
                 run `goto-auth-proxy login` to get a new one",
                age.as_secs() / 86_400,
                REFRESH_TOKEN_LIFETIME.as_secs() / 86_400,
            );
        }
    }

    fn log_new_token(&self, token: &AccessToken, first: bool, rotated: bool) {
        let principal = self
            .principal
            .as_deref()
            .unwrap_or("(not named by the endpoint)");
        let expires_at = humantime::format_rfc3339_seconds(token.expires_at_wall());
        let lifetime = humantime::format_duration(token.lifetime());
        if first {
            tracing::info!(%principal, %expires_at, %lifetime, "access token obtained; the proxy is ready");
        } else {
            tracing::info!(%principal, %expires_at, %lifetime, refresh_token_rotated = rotated, "access token refreshed");
        }
    }

    /// Writes the state for `token`; a failure is loud and queued for retry.
    async fn save(&mut self, access_token: &SecretString, token: &AccessToken, lease: &Lease) {
        let Credential::RefreshToken { current, since, .. } = &self.credential else {
            return;
        };
        self.unsaved = Some(PersistedState {
            refresh_token: Some(current.clone()),
            refresh_token_first_seen: Some(*since),
            principal: self.principal.as_deref().map(str::to_owned),
            access_token: Some(access_token.clone()),
            access_token_expires_at: Some(token.expires_at_wall()),
            updated_at: unix_now(),
        });
        self.write_unsaved(lease).await;
    }

    /// Tries a failed write again, under a lease of its own.
    async fn retry_save(&mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        match store.lease().await {
            Ok(LeaseGrant::Held(lease)) => {
                self.write_unsaved(&lease).await;
                store.release(lease).await;
            }
            // The holder's state supersedes ours; what it stores is heard of.
            Ok(LeaseGrant::Elsewhere) => {
                self.schedule_save_retry();
            }
            Err(error) => self.save_failed(&SaveError::Store(error)),
        }
    }

    /// Writes the pending state, if any. On a conflict the newer state is
    /// taken; on a failure the next try is scheduled.
    async fn write_unsaved(&mut self, lease: &Lease) {
        let Some(store) = self.store.clone() else {
            return;
        };
        while let Some(state) = self.unsaved.clone() {
            match store.save(state, self.version, lease).await {
                Ok(version) => {
                    if self.save_backoff.failures > 0 {
                        tracing::info!(path = %store.location(), "the state file is written again");
                    }
                    self.version = version;
                    self.unsaved = None;
                    self.next_save = None;
                    self.save_backoff.reset();
                }
                Err(SaveError::Conflict(newer)) if newer.state.refresh_token.is_some() => {
                    // Another writer (a `login`, another replica) stored a
                    // refresh token after ours was read: theirs is the newer.
                    self.unsaved = None;
                    self.next_save = None;
                    self.adopt(*newer);
                }
                Err(SaveError::Conflict(newer)) => self.version = newer.version,
                Err(error) => {
                    self.save_failed(&error);
                    return;
                }
            }
        }
    }

    fn save_failed(&mut self, error: &SaveError) {
        self.metrics.count_state_write_failure();
        let delay = self.schedule_save_retry();
        tracing::error!(
            error = %error,
            retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())),
            "the refresh token could not be saved: if the proxy stops before a write succeeds, \
             it may need `goto-auth-proxy login`; free disk space or fix the permissions of the state file's directory"
        );
    }

    fn schedule_save_retry(&mut self) -> Duration {
        let delay = self.save_backoff.next(SAVE_RETRY_BASE);
        self.next_save = Some(Instant::now() + delay);
        delay
    }

    /// Takes a refresh token that an operator or another writer put in the
    /// store, if it differs from the current one.
    async fn adopt_new_stored_token(&mut self) -> bool {
        let Some(store) = self.store.clone() else {
            return false;
        };
        match store.load().await {
            Ok(Some(stored)) => self.adopt(stored).refresh_token_changed,
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the state file for a new refresh token");
                false
            }
        }
    }

    /// Publishes a state change, keeping the current token.
    fn publish_state(&self, state: TokenState) {
        let previous = self.source.snapshot();
        self.source.publish(Snapshot {
            state,
            ..(*previous).clone()
        });
    }
}

/// What taking a stored state changed.
struct Adopted {
    /// The refresh token differs from the one held before.
    refresh_token_changed: bool,
    /// The state carried a valid access token, now published; its lifetime left.
    access_token_lifetime: Option<Duration>,
}

/// Why a refresh gave no token.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("the token store failed: {0}")]
    Store(StoreError),
    #[error("another process holds the refresh lease, and no new token was stored in time")]
    NothingHeard,
}

impl Failure {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Endpoint(error) => error.retry_after(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_due_at_the_margin_or_half_the_lifetime() {
        let margin = Duration::from_secs(300);
        assert_eq!(
            refresh_delay(Duration::from_secs(3600), margin),
            Duration::from_secs(3300)
        );
        assert_eq!(
            refresh_delay(Duration::from_secs(6), margin),
            Duration::from_secs(3)
        );
        assert_eq!(
            refresh_delay(Duration::from_secs(600), margin),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut backoff = Backoff::default();
        let first = backoff.next(BACKOFF_BASE);
        assert!(
            first >= BACKOFF_BASE / 2 && first <= BACKOFF_BASE,
            "{first:?}"
        );
        let second = backoff.next(BACKOFF_BASE);
        assert!(
            second >= BACKOFF_BASE && second <= BACKOFF_BASE * 2,
            "{second:?}"
        );
        for _ in 0..40 {
            assert!(backoff.next(BACKOFF_BASE) <= BACKOFF_MAX);
        }
        backoff.reset();
        assert!(backoff.next(BACKOFF_BASE) <= BACKOFF_BASE);
    }

    #[test]
    fn credential_debug_is_redacted() {
        let credential = Credential::RefreshToken {
            current: SecretString::from("rt-123"),
            since: 0,
            fallback: Some(SecretString::from("rt-456")),
        };
        let shown = format!("{credential:?}");
        assert!(!shown.contains("rt-"), "{shown}");
    }

    /// The refresher's state machine, driven through fakes under tokio's
    /// paused clock: no real waiting, and times that are exact.
    mod machine {
        use std::collections::VecDeque;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Mutex;

        use super::super::*;
        use crate::shutdown::ShutdownTrigger;
        use crate::store::BoxFuture;

        /// What the fake token endpoint answers, in order; then good tokens.
        enum Answer {
            Token {
                lifetime: u64,
                rotate_to: Option<&'static str>,
            },
            Unreachable,
            RetryAfter(u64),
            Rejected,
        }

        #[derive(Default)]
        struct FakeEndpoint {
            answers: Mutex<VecDeque<Answer>>,
            /// When each request came, and the refresh token it presented.
            seen: Mutex<Vec<(Instant, String)>>,
            /// What another writer does while the next request is under way.
            meanwhile: Mutex<Option<Box<dyn FnOnce() + Send>>>,
        }

        impl FakeEndpoint {
            fn script(answers: impl IntoIterator<Item = Answer>) -> Arc<Self> {
                Arc::new(Self {
                    answers: Mutex::new(answers.into_iter().collect()),
                    seen: Mutex::default(),
                    meanwhile: Mutex::default(),
                })
            }

            /// Runs `work` during the next token request.
            fn meanwhile(&self, work: impl FnOnce() + Send + 'static) {
                *self.meanwhile.lock().unwrap() = Some(Box::new(work));
            }

            fn seen(&self) -> Vec<(Instant, String)> {
                self.seen.lock().unwrap().clone()
            }
        }

        impl TokenClient for Arc<FakeEndpoint> {
            fn request<'a>(
                &'a self,
                grant: &'a Grant,
            ) -> BoxFuture<'a, Result<TokenGrant, EndpointError>> {
                let presented = match grant {
                    Grant::RefreshToken(token) => token.expose_secret().to_owned(),
                    _ => String::new(),
                };
                self.seen.lock().unwrap().push((Instant::now(), presented));
                if let Some(work) = self.meanwhile.lock().unwrap().take() {
                    work();
                }
                let answer = self.answers.lock().unwrap().pop_front();
                let result = match answer.unwrap_or(Answer::Token {
                    lifetime: 60,
                    rotate_to: None,
                }) {
                    Answer::Token {
                        lifetime,
                        rotate_to,
                    } => Ok(TokenGrant {
                        access_token: SecretString::from("at"),
                        lifetime: Duration::from_secs(lifetime),
                        refresh_token: rotate_to.map(SecretString::from),
                        principal: None,
                    }),
                    Answer::Unreachable => Err(EndpointError::Unreachable("down".into())),
                    Answer::RetryAfter(seconds) => Err(EndpointError::Status {
                        status: 429,
                        code: None,
                        retry_after: Some(Duration::from_secs(seconds)),
                    }),
                    Answer::Rejected => Err(EndpointError::GrantRejected {
                        code: "invalid_grant".into(),
                    }),
                };
                Box::pin(std::future::ready(result))
            }
        }

        /// A store in memory that the test writes to as "someone else".
        struct MemoryStore {
            stored: Mutex<Option<Versioned>>,
            version: tokio::sync::watch::Sender<u64>,
            lease_elsewhere: AtomicBool,
            /// Asking for the lease fails, as with a store that cannot be reached.
            unreachable: AtomicBool,
        }

        impl MemoryStore {
            fn new() -> Arc<Self> {
                Arc::new(Self {
                    stored: Mutex::new(None),
                    version: tokio::sync::watch::channel(0).0,
                    lease_elsewhere: AtomicBool::new(false),
                    unreachable: AtomicBool::new(false),
                })
            }

            /// Another writer stores `state` on top of whatever is there.
            fn put(&self, state: PersistedState) {
                let mut stored = self.stored.lock().unwrap();
                let version = stored.as_ref().map_or(0, |s| s.version) + 1;
                *stored = Some(Versioned { state, version });
                self.version.send_replace(version);
            }

            fn refresh_token(&self) -> Option<String> {
                let stored = self.stored.lock().unwrap();
                stored
                    .as_ref()
                    .and_then(|s| s.state.refresh_token.as_ref())
                    .map(|t| t.expose_secret().to_owned())
            }
        }

        impl StateStore for MemoryStore {
            fn load(&self) -> BoxFuture<'_, Result<Option<Versioned>, StoreError>> {
                Box::pin(std::future::ready(Ok(self.stored.lock().unwrap().clone())))
            }

            fn save<'a>(
                &'a self,
                state: PersistedState,
                based_on: u64,
                _lease: &'a Lease,
            ) -> BoxFuture<'a, Result<u64, SaveError>> {
                let mut stored = self.stored.lock().unwrap();
                let result = match stored.as_ref() {
                    Some(newer) if newer.version > based_on => {
                        Err(SaveError::Conflict(Box::new(newer.clone())))
                    }
                    _ => {
                        *stored = Some(Versioned {
                            state,
                            version: based_on + 1,
                        });
                        self.version.send_replace(based_on + 1);
                        Ok(based_on + 1)
                    }
                };
                Box::pin(std::future::ready(result))
            }

            fn changed(&self, seen: u64) -> BoxFuture<'_, Result<Versioned, StoreError>> {
                let mut version = self.version.subscribe();
                Box::pin(async move {
                    let _ = version.wait_for(|v| *v > seen).await;
                    Ok(self.stored.lock().unwrap().clone().expect("a stored state"))
                })
            }

            fn lease(&self) -> BoxFuture<'_, Result<LeaseGrant, StoreError>> {
                if self.unreachable.load(Ordering::Relaxed) {
                    return Box::pin(std::future::ready(Err(StoreError::Unavailable {
                        location: "memory".into(),
                        reason: "away".into(),
                    })));
                }
                let grant = if self.lease_elsewhere.load(Ordering::Relaxed) {
                    LeaseGrant::Elsewhere
                } else {
                    LeaseGrant::Held(Lease::granted(1))
                };
                Box::pin(std::future::ready(Ok(grant)))
            }

            fn release(&self, _lease: Lease) -> BoxFuture<'_, ()> {
                Box::pin(std::future::ready(()))
            }

            fn location(&self) -> String {
                "memory".into()
            }
        }

        struct Running {
            source: Arc<TokenSource>,
            _stop: ShutdownTrigger,
        }

        fn refresh_token(token: &str, fallback: Option<&str>) -> Credential {
            Credential::RefreshToken {
                current: SecretString::from(token),
                since: unix_now(),
                fallback: fallback.map(SecretString::from),
            }
        }

        fn start(
            endpoint: &Arc<FakeEndpoint>,
            credential: Credential,
            store: &Arc<MemoryStore>,
        ) -> Running {
            let source = Arc::new(TokenSource::new());
            let version = store
                .stored
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, |s| s.version);
            let refresher = Refresher::new(
                endpoint.clone(),
                credential,
                Some((store.clone() as Arc<dyn StateStore>, version)),
                source.clone(),
                Arc::new(crate::metrics::Metrics::new()).account("default"),
                Duration::from_secs(300),
            );
            let (stop, signal) = crate::shutdown::channel();
            tokio::spawn(refresher.run(signal));
            Running {
                source,
                _stop: stop,
            }
        }

        fn stored(token: &str) -> PersistedState {
            PersistedState {
                refresh_token: Some(SecretString::from(token)),
                refresh_token_first_seen: Some(unix_now()),
                ..PersistedState::default()
            }
        }

        #[tokio::test(start_paused = true)]
        async fn refreshes_at_half_the_lifetime_and_saves_a_rotation_first() {
            let endpoint = FakeEndpoint::script([
                Answer::Token {
                    lifetime: 60,
                    rotate_to: Some("rt-2"),
                },
                Answer::Token {
                    lifetime: 60,
                    rotate_to: None,
                },
            ]);
            let store = MemoryStore::new();
            let started = Instant::now();
            let running = start(&endpoint, refresh_token("rt-1", None), &store);
            sleep(Duration::from_secs(1)).await;
            assert!(running.source.is_ready());
            assert_eq!(store.refresh_token().as_deref(), Some("rt-2"));
            sleep(Duration::from_secs(60)).await;
            let seen = endpoint.seen();
            assert_eq!(seen.len(), 3, "at 0 s, 30 s and 60 s");
            assert_eq!(seen[0].1, "rt-1");
            assert_eq!(seen[1].1, "rt-2", "the rotated token is used next");
            assert_eq!(seen[1].0 - started, Duration::from_secs(30));
            assert_eq!(seen[2].0 - seen[1].0, Duration::from_secs(30));
        }

        #[tokio::test(start_paused = true)]
        async fn backs_off_with_jitter_and_honours_retry_after() {
            let endpoint = FakeEndpoint::script([
                Answer::Unreachable,
                Answer::Unreachable,
                Answer::RetryAfter(20),
            ]);
            let store = MemoryStore::new();
            let running = start(&endpoint, refresh_token("rt-1", None), &store);
            sleep(Duration::from_secs(30)).await;
            assert!(running.source.is_ready());
            let times: Vec<_> = endpoint.seen().into_iter().map(|(at, _)| at).collect();
            assert_eq!(times.len(), 4, "three failures, then a token");
            let first = times[1] - times[0];
            let second = times[2] - times[1];
            assert!(
                first >= BACKOFF_BASE / 2 && first <= BACKOFF_BASE,
                "{first:?}"
            );
            assert!(
                second >= BACKOFF_BASE && second <= BACKOFF_BASE * 2,
                "{second:?}"
            );
            assert!(
                times[3] - times[2] >= Duration::from_secs(20),
                "Retry-After is honoured"
            );
        }

        #[tokio::test(start_paused = true)]
        async fn a_rejection_waits_for_a_new_state_and_then_recovers() {
            let endpoint = FakeEndpoint::script([Answer::Rejected]);
            let store = MemoryStore::new();
            let running = start(&endpoint, refresh_token("rt-dead", None), &store);
            sleep(Duration::from_secs(60)).await;
            assert_eq!(running.source.snapshot().state, TokenState::Rejected);
            assert_eq!(
                endpoint.seen().len(),
                1,
                "no token request while nothing new is stored"
            );
            // An operator runs `login` (another writer): the new token is heard of and tried.
            store.put(stored("rt-from-login"));
            sleep(Duration::from_secs(1)).await;
            assert!(running.source.is_ready());
            let seen = endpoint.seen();
            assert_eq!(seen.last().unwrap().1, "rt-from-login");
            assert_eq!(seen.len(), 2);
        }

        #[tokio::test(start_paused = true)]
        async fn invalid_grant_rereads_the_store_before_the_bootstrap_token() {
            // Another writer rotated the token a moment ago; the one in hand is stale.
            let endpoint = FakeEndpoint::script([Answer::Rejected]);
            let store = MemoryStore::new();
            store.put(stored("rt-stale"));
            let writer = store.clone();
            endpoint.meanwhile(move || {
                writer.stored.lock().unwrap().as_mut().unwrap().state =
                    stored("rt-rotated-elsewhere");
            });
            let running = start(
                &endpoint,
                refresh_token("rt-stale", Some("rt-bootstrap")),
                &store,
            );
            sleep(Duration::from_secs(1)).await;
            assert!(running.source.is_ready());
            let presented: Vec<_> = endpoint.seen().into_iter().map(|(_, t)| t).collect();
            assert_eq!(presented, ["rt-stale", "rt-rotated-elsewhere"]);
        }

        #[tokio::test(start_paused = true)]
        async fn a_follower_takes_the_lease_holders_token_without_asking() {
            let endpoint = FakeEndpoint::script([]);
            let store = MemoryStore::new();
            store.lease_elsewhere.store(true, Ordering::Relaxed);
            let running = start(&endpoint, refresh_token("rt-1", None), &store);
            sleep(Duration::from_secs(2)).await;
            assert!(!running.source.is_ready());
            store.put(PersistedState {
                access_token: Some(SecretString::from("at-of-the-leader")),
                access_token_expires_at: Some(
                    std::time::SystemTime::now() + Duration::from_secs(600),
                ),
                ..stored("rt-of-the-leader")
            });
            sleep(Duration::from_millis(10)).await;
            let bearer = running.source.current().unwrap().expect("a token");
            assert_eq!(bearer.header.as_bytes(), b"Bearer at-of-the-leader");
            assert!(endpoint.seen().is_empty(), "a follower asks for no token");
        }

        #[tokio::test(start_paused = true)]
        async fn a_replica_starting_beside_a_lease_holder_takes_the_stored_token_at_once() {
            // The holder stored a good token before this replica read the
            // store, and still holds the lease (it is refreshing again, say).
            let endpoint = FakeEndpoint::script([]);
            let store = MemoryStore::new();
            store.put(PersistedState {
                access_token: Some(SecretString::from("at-stored")),
                access_token_expires_at: Some(
                    std::time::SystemTime::now() + Duration::from_secs(600),
                ),
                ..stored("rt-stored")
            });
            store.lease_elsewhere.store(true, Ordering::Relaxed);
            let running = start(&endpoint, refresh_token("rt-stored", None), &store);
            sleep(Duration::from_millis(10)).await;
            let bearer = running.source.current().unwrap().expect("a token at once");
            assert_eq!(bearer.header.as_bytes(), b"Bearer at-stored");
            assert!(endpoint.seen().is_empty());
        }

        #[tokio::test(start_paused = true)]
        async fn with_the_store_away_it_refreshes_alone_only_as_the_token_nears_expiry() {
            let endpoint = FakeEndpoint::script([]);
            let store = MemoryStore::new();
            let started = Instant::now();
            let running = start(&endpoint, refresh_token("rt-1", None), &store);
            sleep(Duration::from_secs(1)).await;
            assert_eq!(endpoint.seen().len(), 1);
            store.unreachable.store(true, Ordering::Relaxed);
            // Planned at 30 s (half of 60); alone once half of the 30 s
            // between then and expiry is left: at 45 s, and not before.
            sleep_until(started + Duration::from_millis(44_900)).await;
            assert_eq!(endpoint.seen().len(), 1, "no refresh while the token lasts");
            assert!(running.source.is_ready(), "the token held stays in use");
            sleep_until(started + Duration::from_secs(46)).await;
            let seen = endpoint.seen();
            assert_eq!(seen.len(), 2, "one refresh alone");
            assert_eq!(seen[1].0 - started, Duration::from_secs(45));
            assert!(running.source.is_ready());
        }

        #[tokio::test(start_paused = true)]
        async fn with_the_store_away_and_no_token_it_refreshes_alone_after_a_second_try() {
            let endpoint = FakeEndpoint::script([]);
            let store = MemoryStore::new();
            store.unreachable.store(true, Ordering::Relaxed);
            let started = Instant::now();
            let running = start(&endpoint, refresh_token("rt-1", None), &store);
            sleep(Duration::from_secs(2)).await;
            let seen = endpoint.seen();
            assert_eq!(seen.len(), 1);
            assert!(
                seen[0].0 - started >= BACKOFF_BASE / 2,
                "not on the first failed try"
            );
            assert!(running.source.is_ready());
        }

        #[tokio::test(start_paused = true)]
        async fn a_save_that_conflicts_takes_the_newer_refresh_token() {
            let endpoint = FakeEndpoint::script([Answer::Token {
                lifetime: 60,
                rotate_to: Some("rt-mine"),
            }]);
            let store = MemoryStore::new();
            // Someone stores a newer state while the refresher's first request is under way.
            let writer = store.clone();
            endpoint.meanwhile(move || writer.put(stored("rt-theirs")));
            let running = start(&endpoint, refresh_token("rt-1", None), &store);
            sleep(Duration::from_secs(1)).await;
            assert!(running.source.is_ready());
            assert_eq!(store.refresh_token().as_deref(), Some("rt-theirs"));
            sleep(Duration::from_secs(30)).await;
            assert_eq!(endpoint.seen().last().unwrap().1, "rt-theirs");
        }
    }
}
