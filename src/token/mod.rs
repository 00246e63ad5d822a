//! The token source: the one place the current access token lives.
//!
//! The refresher publishes an immutable [`Snapshot`] (token, expiry, state and
//! generation together) into an [`ArcSwap`]; the request path only loads it,
//! which takes no lock and allocates nothing. Waiting (for the first token, or
//! for the refresh a 401 asked for) goes through a [`Notify`] that is woken on
//! every publish.

pub mod endpoint;
pub mod grant;
pub mod refresher;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;
use tokio::time::Instant;

use grant::GrantError;

/// GoTo's refresh tokens live about 30 days unless they rotate.
pub const REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 86_400);
/// A refresh token that has not rotated for this long is reported: it may soon stop working.
pub const REFRESH_TOKEN_WARN_AGE: Duration = Duration::from_secs(25 * 86_400);

/// A token obtained in answer to a 401 that upstream refuses before it was
/// ever accepted points at scopes or the account, not expiry: for this long
/// such refusals go to the client without another refresh, so a misconfigured
/// client cannot storm the token endpoint.
pub const REFUSAL_REFRESH_INTERVAL: Duration = Duration::from_secs(15);

/// A ready-made `Authorization` header value and when it stops being valid.
#[derive(Clone)]
pub struct AccessToken {
    header: HeaderValue,
    obtained_at: Instant,
    expires_at: Instant,
    expires_at_wall: SystemTime,
    lifetime: Duration,
    /// Obtained in answer to an upstream refusal of the token before it.
    pub after_refusal: bool,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("header", &"[redacted]")
            .field(
                "expires_at_wall",
                &humantime::format_rfc3339_seconds(self.expires_at_wall),
            )
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl AccessToken {
    /// Builds the `Bearer` header for `token`, valid for `lifetime` from now
    /// (at most [`MAX_LIFETIME`](grant::MAX_LIFETIME), so the clocks cannot overflow).
    pub fn new(token: &SecretString, lifetime: Duration) -> Result<Self, GrantError> {
        let lifetime = lifetime.min(grant::MAX_LIFETIME);
        let value = format!("Bearer {}", token.expose_secret());
        let mut header = HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
            .map_err(|_| GrantError::UnsendableToken)?;
        header.set_sensitive(true);
        // The first clone of bytes made from a `String` allocates (they become
        // reference-counted then); make it here, off the request path, so that
        // each request's clone only counts up.
        drop(header.clone());
        let now = Instant::now();
        Ok(Self {
            header,
            obtained_at: now,
            after_refusal: false,
            expires_at: now + lifetime,
            expires_at_wall: SystemTime::now() + lifetime,
            lifetime,
        })
    }

    /// Whether the token may still be sent.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.expires_at
    }

    /// When the token runs out, on the monotonic clock.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// When the token runs out, on the wall clock (for logs, metrics and the state file).
    pub fn expires_at_wall(&self) -> SystemTime {
        self.expires_at_wall
    }

    /// The lifetime the token endpoint granted.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

/// Where the source stands, as readiness and clients see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    /// No token has been obtained yet.
    Starting,
    /// The last refresh worked.
    Fresh,
    /// The last refresh failed for a reason that may pass; the refresher retries.
    Retrying,
    /// The token endpoint rejected the credential; only an operator can mend it.
    Rejected,
}

/// One consistent view of the token source.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The newest access token, even when it has expired (so metrics can say when).
    pub token: Option<AccessToken>,
    /// Grows by one with every new access token; a 401 names the one it saw.
    pub generation: u64,
    /// How the last refresh went.
    pub state: TokenState,
    /// The account the token acts for, when the endpoint said.
    pub principal: Option<Arc<str>>,
    /// When the refresh token in use was first seen (Unix seconds).
    pub refresh_token_since: Option<u64>,
}

/// A header to send and the generation it belongs to.
#[derive(Clone, Debug)]
pub struct Bearer {
    /// The `Authorization` value, marked sensitive.
    pub header: HeaderValue,
    /// The generation of the token, to report it stale after a 401.
    pub generation: u64,
}

/// Why no token could be handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "no valid access token came within the wait time; the token endpoint may be unreachable"
    )]
    TimedOut,
    #[error("the token endpoint rejected the proxy's credentials; run `goto-auth-proxy login` or supply a new refresh token")]
    Rejected,
}

/// Holds the current token and lets requests wait for the next one.
pub struct TokenSource {
    current: ArcSwap<Snapshot>,
    published: Notify,
    stale_generation: AtomicU64,
    stale_reported: Notify,
    accepted_generation: AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("current", &self.current.load())
            .finish_non_exhaustive()
    }
}

impl Default for TokenSource {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenSource {
    /// A source with no token yet.
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot {
                token: None,
                generation: 0,
                state: TokenState::Starting,
                principal: None,
                refresh_token_since: None,
            }),
            published: Notify::new(),
            stale_generation: AtomicU64::new(0),
            stale_reported: Notify::new(),
            accepted_generation: AtomicU64::new(0),
        }
    }

    /// The current view, for the admin listener and the refresher.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// True while a valid token is held that upstream has not refused:
    /// what `/readyz` reports.
    pub fn is_ready(&self) -> bool {
        self.current
            .load()
            .token
            .as_ref()
            .is_some_and(AccessToken::is_valid)
            && !self.current_is_reported_stale()
    }

    /// The current token if it is valid: the request path's fast path.
    pub fn current(&self) -> Result<Option<Bearer>, Unavailable> {
        self.valid_from(0)
    }

    /// The current token if it is valid and of at least `min_generation`;
    /// an error once the credential is rejected and no such token can come.
    fn valid_from(&self, min_generation: u64) -> Result<Option<Bearer>, Unavailable> {
        let snapshot = self.current.load();
        match &snapshot.token {
            Some(token) if token.is_valid() && snapshot.generation >= min_generation => {
                Ok(Some(Bearer {
                    header: token.header.clone(),
                    generation: snapshot.generation,
                }))
            }
            _ if snapshot.state == TokenState::Rejected => Err(Unavailable::Rejected),
            _ => Ok(None),
        }
    }

    /// A valid token, waiting up to `wait` for the refresh under way.
    pub async fn acquire(&self, wait: Duration) -> Result<Bearer, Unavailable> {
        self.wait_for(0, wait).await
    }

    /// Reports that upstream refused the token of `generation`, and waits up to
    /// `wait` for a newer one. Any number of callers naming the same generation
    /// cause one refresh; a caller whose token was already replaced gets the new
    /// one at once.
    pub async fn refreshed_after(
        &self,
        generation: u64,
        wait: Duration,
    ) -> Result<Bearer, Unavailable> {
        self.report_stale(generation);
        self.wait_for(generation + 1, wait).await
    }

    /// Records that upstream accepted the token of `generation`.
    pub fn report_accepted(&self, generation: u64) {
        // A load first: on the request path the value rarely changes.
        if self.accepted_generation.load(Ordering::Relaxed) < generation {
            self.accepted_generation
                .fetch_max(generation, Ordering::Relaxed);
        }
    }

    /// Whether upstream refusing the token of `generation` should lead to a
    /// refresh and a retry: yes, unless that very token was obtained in answer
    /// to a refusal less than [`REFUSAL_REFRESH_INTERVAL`] ago and upstream has
    /// never accepted it. (A token that worked and is then refused was revoked.)
    pub fn refusal_warrants_retry(&self, generation: u64) -> bool {
        let snapshot = self.current.load();
        if snapshot.generation != generation {
            return true;
        }
        let never_accepted = self.accepted_generation.load(Ordering::Relaxed) < generation;
        !(never_accepted
            && snapshot.token.as_ref().is_some_and(|t| {
                t.after_refusal && t.obtained_at.elapsed() < REFUSAL_REFRESH_INTERVAL
            }))
    }

    /// Reports that upstream refused the token of `generation`, without waiting.
    /// A report about a token that was already replaced is ignored.
    pub fn report_stale(&self, generation: u64) {
        if self.current.load().generation == generation {
            self.stale_generation
                .fetch_max(generation, Ordering::AcqRel);
            self.stale_reported.notify_one();
        }
    }

    /// Waits for a valid token of at least `min_generation`.
    async fn wait_for(&self, min_generation: u64, wait: Duration) -> Result<Bearer, Unavailable> {
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before looking, so a publish in between is not missed.
            let published = self.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            if let Some(bearer) = self.valid_from(min_generation)? {
                return Ok(bearer);
            }
            if tokio::time::timeout_at(deadline, published).await.is_err() {
                return Err(Unavailable::TimedOut);
            }
        }
    }

    /// Publishes a new view and wakes every waiter. In the proxy the
    /// refresher is the only publisher; there must never be two per source.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        self.published.notify_waiters();
    }

    /// Whether a 401 has been reported for the current generation.
    pub(crate) fn current_is_reported_stale(&self) -> bool {
        let generation = self.current.load().generation;
        generation > 0 && self.stale_generation.load(Ordering::Acquire) >= generation
    }

    /// Resolves when a request reports a stale token.
    pub(crate) async fn stale_reported(&self) {
        self.stale_reported.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime: Duration) -> AccessToken {
        AccessToken::new(&SecretString::from("t0ken"), lifetime).unwrap()
    }

    fn fresh(generation: u64, lifetime: Duration) -> Snapshot {
        Snapshot {
            token: Some(token(lifetime)),
            generation,
            state: TokenState::Fresh,
            principal: None,
            refresh_token_since: None,
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let shown = format!("{:?}", fresh(1, Duration::from_secs(60)));
        assert!(!shown.contains("t0ken"), "{shown}");
        let bearer = format!(
            "{:?}",
            Bearer {
                header: token(Duration::from_secs(1)).header,
                generation: 1
            }
        );
        assert!(!bearer.contains("t0ken"), "{bearer}");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_the_first_token_when_it_is_published() {
        let source = Arc::new(TokenSource::new());
        let waiter = tokio::spawn({
            let source = source.clone();
            async move { source.acquire(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!source.is_ready());
        source.publish(fresh(1, Duration::from_secs(60)));
        let bearer = waiter.await.unwrap().unwrap();
        assert_eq!(bearer.generation, 1);
        assert_eq!(bearer.header.as_bytes(), b"Bearer t0ken");
        assert!(source.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let source = TokenSource::new();
        let started = Instant::now();
        assert_eq!(
            source.acquire(Duration::from_secs(3)).await.unwrap_err(),
            Unavailable::TimedOut
        );
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_is_not_handed_out() {
        let source = TokenSource::new();
        source.publish(fresh(1, Duration::from_secs(5)));
        assert!(source.current().unwrap().is_some());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(source.current().unwrap().is_none());
        assert!(!source.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn rejection_answers_at_once() {
        let source = TokenSource::new();
        source.publish(Snapshot {
            state: TokenState::Rejected,
            ..fresh(0, Duration::ZERO)
        });
        let started = Instant::now();
        assert_eq!(
            source.acquire(Duration::from_secs(30)).await.unwrap_err(),
            Unavailable::Rejected
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_obtained_after_a_refusal_is_not_refreshed_again_at_once() {
        let source = TokenSource::new();
        source.publish(fresh(1, Duration::from_secs(600)));
        assert!(source.refusal_warrants_retry(1));
        let mut again = fresh(2, Duration::from_secs(600));
        again.token.as_mut().unwrap().after_refusal = true;
        source.publish(again);
        assert!(
            source.refusal_warrants_retry(1),
            "an older token's refusal retries with the new one"
        );
        assert!(!source.refusal_warrants_retry(2));
        tokio::time::advance(REFUSAL_REFRESH_INTERVAL).await;
        assert!(source.refusal_warrants_retry(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_that_worked_and_is_then_refused_is_refreshed_again() {
        let source = TokenSource::new();
        let mut again = fresh(2, Duration::from_secs(600));
        again.token.as_mut().unwrap().after_refusal = true;
        source.publish(again);
        source.report_accepted(2);
        assert!(source.refusal_warrants_retry(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_report_after_a_rejection_answers_at_once() {
        let source = TokenSource::new();
        source.publish(fresh(1, Duration::from_secs(60)));
        // The refresh the 401 asked for was rejected; the refused token is still unexpired.
        source.publish(Snapshot {
            state: TokenState::Rejected,
            ..fresh(1, Duration::from_secs(60))
        });
        let started = Instant::now();
        let result = source.refreshed_after(1, Duration::from_secs(30)).await;
        assert_eq!(result.unwrap_err(), Unavailable::Rejected);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_report_for_a_replaced_token_returns_the_new_one_at_once() {
        let source = TokenSource::new();
        source.publish(fresh(1, Duration::from_secs(60)));
        source.publish(fresh(2, Duration::from_secs(60)));
        let bearer = source
            .refreshed_after(1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(bearer.generation, 2);
        assert!(!source.current_is_reported_stale());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_report_for_the_current_token_waits_for_the_next() {
        let source = Arc::new(TokenSource::new());
        source.publish(fresh(1, Duration::from_secs(60)));
        let waiter = tokio::spawn({
            let source = source.clone();
            async move { source.refreshed_after(1, Duration::from_secs(10)).await }
        });
        tokio::time::timeout(Duration::from_secs(1), source.stale_reported())
            .await
            .unwrap();
        assert!(source.current_is_reported_stale());
        source.publish(fresh(2, Duration::from_secs(60)));
        assert_eq!(waiter.await.unwrap().unwrap().generation, 2);
    }
}
