//! The one retry policy of the request path.
//!
//! A request may be sent again for four reasons: the connection closed
//! before it took the request (the request is given back untouched), the
//! upstream refused it unprocessed (an HTTP/2 GOAWAY or REFUSED_STREAM, or a
//! reused connection that closed before any answer to an idempotent
//! request), the upstream refused the token (401, or GoToWebinar's 403
//! `InvalidToken`), or GoTo throttled it (429, an idempotent method only,
//! after the bucket's pause). Whatever the reasons, one request is sent at
//! most [`MAX_SENDS`] times, the token is refreshed for it at most once,
//! it is resent after a 429 at most once, and everything (every send,
//! every wait for a connection) ends at one deadline, `--upstream-timeout`
//! after the first send.

use std::time::Duration;

use http::Request;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::error::ProxyError;

/// The most times one client request is sent upstream.
pub const MAX_SENDS: u32 = 3;

/// How one send went wrong.
#[derive(Debug)]
pub enum AttemptError {
    /// The connection closed before it took the request; here it is back.
    NotSent(Box<Request<ProxyBody>>),
    /// The upstream refused the request before processing it: safe to send
    /// again if the body is at hand.
    Unprocessed(String),
    /// No response headers before the deadline.
    TimedOut,
    /// Anything else: the answer is this error.
    Fatal(ProxyError),
}

/// Why a request could be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The connection closed before taking it.
    NotSent,
    /// The upstream refused it unprocessed.
    Unprocessed,
    /// The upstream refused the token.
    TokenRefused,
    /// GoTo answered 429 to an idempotent request.
    Throttled,
}

/// One request's retry budget and deadline.
#[derive(Debug)]
pub struct RetryPolicy {
    sends: u32,
    token_retried: bool,
    throttle_retried: bool,
    deadline: Instant,
    timeout: Duration,
}

impl RetryPolicy {
    /// A budget for a request about to be sent for the first time; all of
    /// its sends end within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            sends: 0,
            token_retried: false,
            throttle_retried: false,
            deadline: Instant::now() + timeout,
            timeout,
        }
    }

    /// How many sends have begun.
    pub fn sends(&self) -> u32 {
        self.sends
    }

    /// Counts a send and says how long it may take: the time left before
    /// the deadline, or the timeout error once it has passed.
    pub fn next_send(&mut self) -> Result<Duration, ProxyError> {
        self.sends += 1;
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProxyError::UpstreamTimeout(self.timeout));
        }
        Ok(left)
    }

    /// The error for a send that ran out of time.
    pub fn timed_out(&self) -> ProxyError {
        ProxyError::UpstreamTimeout(self.timeout)
    }

    /// Whether the request may be sent again for `cause`; `replayable` says
    /// whether its body is still at hand (a request given back unsent
    /// always is).
    pub fn allows(&mut self, cause: Cause, replayable: bool) -> bool {
        if self.sends >= MAX_SENDS || Instant::now() >= self.deadline {
            return false;
        }
        match cause {
            Cause::NotSent => true,
            Cause::Unprocessed => replayable,
            Cause::TokenRefused if self.token_retried || !replayable => false,
            Cause::TokenRefused => {
                self.token_retried = true;
                true
            }
            Cause::Throttled if self.throttle_retried || !replayable => false,
            Cause::Throttled => {
                self.throttle_retried = true;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_is_sent_three_times_at_most_whatever_the_causes() {
        let mut policy = RetryPolicy::new(Duration::from_secs(60));
        policy.next_send().unwrap();
        assert!(policy.allows(Cause::NotSent, false));
        policy.next_send().unwrap();
        assert!(policy.allows(Cause::Unprocessed, true));
        policy.next_send().unwrap();
        for cause in [Cause::NotSent, Cause::Unprocessed, Cause::TokenRefused] {
            assert!(!policy.allows(cause, true), "{cause:?} after three sends");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_request_is_resent_once_and_only_with_the_body() {
        let mut policy = RetryPolicy::new(Duration::from_secs(60));
        policy.next_send().unwrap();
        assert!(!policy.allows(Cause::Throttled, false));
        assert!(policy.allows(Cause::Throttled, true));
        policy.next_send().unwrap();
        assert!(!policy.allows(Cause::Throttled, true));
        assert!(policy.allows(Cause::TokenRefused, true));
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_is_refreshed_once_per_request_and_only_with_the_body() {
        let mut policy = RetryPolicy::new(Duration::from_secs(60));
        policy.next_send().unwrap();
        assert!(
            !policy.allows(Cause::TokenRefused, false),
            "the body is gone"
        );
        assert!(
            !policy.allows(Cause::Unprocessed, false),
            "the body is gone"
        );
        assert!(policy.allows(Cause::TokenRefused, true));
        policy.next_send().unwrap();
        assert!(
            !policy.allows(Cause::TokenRefused, true),
            "a second refusal is the answer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_send_ends_at_one_deadline() {
        let mut policy = RetryPolicy::new(Duration::from_secs(60));
        assert_eq!(policy.next_send().unwrap(), Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(45)).await;
        assert!(policy.allows(Cause::NotSent, true));
        assert_eq!(policy.next_send().unwrap(), Duration::from_secs(15));
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(!policy.allows(Cause::NotSent, true), "past the deadline");
        assert!(matches!(
            policy.next_send(),
            Err(ProxyError::UpstreamTimeout(_))
        ));
    }
}
