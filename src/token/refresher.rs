//! The side task that keeps the access token fresh.
//!
//! Each turn: obtain a token, persist a rotated refresh token, publish, then
//! sleep until the next deadline, or until a request reports the token stale.
//! On a failure it logs, keeps the token it has while that is valid, and backs
//! off with jitter; on a rejection it waits for an operator.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::time::{sleep_until, Instant};

use super::endpoint::{unix_now, EndpointError, Grant, TokenEndpoint};
use super::grant::TokenGrant;
use super::{
    AccessToken, Snapshot, TokenSource, TokenState, REFRESH_TOKEN_LIFETIME, REFRESH_TOKEN_WARN_AGE,
};
use crate::metrics::Metrics;
use crate::shutdown::ShutdownSignal;
use crate::store::{PersistedState, StateStore};

/// First delay after a failed token request; doubles up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest delay between failed token requests.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often a rejected proxy looks for a new refresh token in the state file.
const REJECTED_RECHECK: Duration = Duration::from_secs(15);
/// First delay before retrying a failed state write; doubles up to [`BACKOFF_MAX`].
const SAVE_RETRY_BASE: Duration = Duration::from_secs(1);

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

/// Keeps one token source fresh for one account.
pub struct Refresher {
    endpoint: TokenEndpoint,
    credential: Credential,
    store: Option<Arc<dyn StateStore>>,
    source: Arc<TokenSource>,
    metrics: Arc<Metrics>,
    margin: Duration,
    unsaved: Option<PersistedState>,
    save_backoff: Backoff,
    next_save: Option<Instant>,
    principal: Option<Arc<str>>,
}

impl Refresher {
    /// A refresher that publishes into `source`. `store` is where a rotated
    /// refresh token goes; `None` for a PAT, which never rotates.
    pub fn new(
        endpoint: TokenEndpoint,
        credential: Credential,
        store: Option<Arc<dyn StateStore>>,
        source: Arc<TokenSource>,
        metrics: Arc<Metrics>,
        margin: Duration,
    ) -> Self {
        Self {
            endpoint,
            credential,
            store,
            source,
            metrics,
            margin,
            unsaved: None,
            save_backoff: Backoff::default(),
            next_save: None,
            principal: None,
        }
    }

    /// Runs until `shutdown` fires.
    pub async fn run(mut self, mut shutdown: ShutdownSignal) {
        let mut phase = Phase::Scheduled;
        let mut next_refresh = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            let mut after_refusal = false;
            let next_save = self.next_save;
            let save_due = async {
                match next_save {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep_until(next_refresh) => {}
                () = self.source.stale_reported(), if phase == Phase::Scheduled => {
                    if !self.source.current_is_reported_stale() {
                        continue;
                    }
                    tracing::info!("upstream refused the current access token; refreshing now");
                    after_refusal = true;
                }
                () = save_due => {
                    self.retry_save().await;
                    continue;
                }
                () = shutdown.wait() => return,
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
                Err(error) if error.is_rejection() => {
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
                Err(error) => {
                    let delay = backoff
                        .next(BACKOFF_BASE)
                        .max(error.retry_after().unwrap_or_default());
                    let retry_in =
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
                    if self.source.is_ready() {
                        tracing::warn!(error = %error, %retry_in,
                            "token request failed; the current token is still valid and stays in use");
                    } else {
                        tracing::warn!(error = %error, %retry_in,
                            "token request failed and no valid token is held; requests wait for the retry");
                    }
                    phase = Phase::BackingOff;
                    self.publish_state(TokenState::Retrying);
                    next_refresh = Instant::now() + delay;
                }
            }
        }
    }

    /// One token request, with the bootstrap fallback on a first rejection.
    /// `after_refusal` marks a refresh that answers an upstream 401.
    async fn refresh(&mut self, after_refusal: bool) -> Result<Duration, EndpointError> {
        loop {
            match self.endpoint.request(&self.credential.grant()).await {
                Ok(grant) => {
                    self.metrics.count_refresh("success");
                    return self.accept(grant, after_refusal).await;
                }
                Err(error) => {
                    self.metrics.count_refresh(error.kind());
                    if error.is_rejection() && self.fall_back() {
                        tracing::warn!(
                            error = %error,
                            "the state file's refresh token was rejected; trying the bootstrap refresh token"
                        );
                        continue;
                    }
                    return Err(error);
                }
            }
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
        self.save(&token).await;
        self.warn_if_refresh_token_is_old();
        let first = self.source.snapshot().generation == 0;
        self.log_new_token(&token, first, rotated);
        let previous = self.source.snapshot();
        self.source.publish(Snapshot {
            token: Some(token.clone()),
            generation: previous.generation + 1,
            state: TokenState::Fresh,
            principal: self.principal.clone(),
            refresh_token_since: self.credential.refresh_token_since(),
        });
        Ok(token.lifetime())
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
    async fn save(&mut self, token: &AccessToken) {
        let (Some(_), Credential::RefreshToken { current, since, .. }) =
            (&self.store, &self.credential)
        else {
            return;
        };
        let state = PersistedState {
            refresh_token: Some(current.clone()),
            refresh_token_first_seen: Some(*since),
            principal: self.principal.as_deref().map(str::to_owned),
            access_token_expires_at: token
                .expires_at_wall()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
            updated_at: unix_now(),
        };
        self.unsaved = Some(state);
        self.retry_save().await;
    }

    /// Writes the pending state, if any; after a failure, schedules the next try.
    async fn retry_save(&mut self) {
        let (Some(store), Some(state)) = (&self.store, &self.unsaved) else {
            return;
        };
        match store.save(state.clone()).await {
            Ok(()) => {
                if self.save_backoff.failures > 0 {
                    tracing::info!(path = %store.location(), "the state file is written again");
                }
                self.unsaved = None;
                self.next_save = None;
                self.save_backoff.reset();
            }
            Err(error) => {
                self.metrics.count_state_write_failure();
                let delay = self.save_backoff.next(SAVE_RETRY_BASE);
                tracing::error!(
                    error = %error,
                    retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())),
                    "the refresh token could not be saved: if the proxy stops before a write succeeds, \
                     it may need `goto-auth-proxy login`; free disk space or fix the permissions of the state file's directory"
                );
                self.next_save = Some(Instant::now() + delay);
            }
        }
    }

    /// While rejected: takes a refresh token that an operator put in the store.
    async fn adopt_new_stored_token(&mut self) -> bool {
        let (Some(store), Credential::RefreshToken { current, since, .. }) =
            (&self.store, &mut self.credential)
        else {
            return false;
        };
        let stored = match store.load().await {
            Ok(Some(state)) => state,
            Ok(None) => return false,
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the state file for a new refresh token");
                return false;
            }
        };
        match stored.refresh_token {
            Some(token) if token.expose_secret() != current.expose_secret() => {
                tracing::info!(path = %store.location(), "found a new refresh token in the state file; trying it");
                *current = token;
                *since = stored.refresh_token_first_seen.unwrap_or_else(unix_now);
                true
            }
            _ => false,
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
}
