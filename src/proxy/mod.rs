//! The request path, the same for every route: the router picks the
//! route first, then every request gets its account's current token and
//! goes to its upstream; a token refusal gets one shared refresh and one
//! retry, and every resend is decided by one [`retry`] policy.

pub mod allow;
pub mod body;
pub mod error;
pub mod headers;
pub mod path;
pub mod pool;
pub mod rate;
pub mod retry;
pub mod route;
pub mod upgrade;
pub mod upstream;

use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use self::allow::RequestRules;
use self::body::{read_up_to, Held, ProxyBody};
use self::error::ProxyError;
use self::pool::Affinity;
use self::retry::{AttemptError, Cause, RetryPolicy};
use self::route::{Route, Router};
use self::upstream::Upstream;
use crate::access::Note;
use crate::metrics::Metrics;
use crate::token::Bearer;

/// The most of a 403 body read to look for GoToWebinar's `InvalidToken`.
const FORBIDDEN_PEEK_LIMIT: usize = 64 * 1024;

/// Forwards client requests to their route's upstream (or the host a
/// forward-mode client named) with its account's token.
#[derive(Debug)]
pub struct ProxyService {
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    /// Replaced whole by a reload.
    rules: ArcSwap<RequestRules>,
}

/// What upstream's answer means for the token.
enum Verdict {
    /// Pass the response to the client.
    Deliver(Response<ProxyBody>),
    /// Upstream refused the token; the response goes to the client if no retry is possible.
    TokenRefused(Response<ProxyBody>),
    /// GoTo throttled the request (429), asking for this pause if it said.
    Throttled(Response<ProxyBody>, Option<Duration>),
}

impl ProxyService {
    /// A service that routes every request with `router` and lets only
    /// what `rules` allow carry the token.
    pub fn new(router: Arc<Router>, metrics: Arc<Metrics>, rules: Arc<RequestRules>) -> Self {
        Self {
            router,
            metrics,
            rules: ArcSwap::new(rules),
        }
    }

    /// The rules requests are held to from now on.
    pub fn set_rules(&self, rules: Arc<RequestRules>) {
        self.rules.store(rules);
    }

    /// The metrics it counts in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Answers one client request arriving on the connection `affinity` was
    /// opened for, as it came in (`via`): to its route's upstream, or to the
    /// host a forward-mode client named. Never fails: errors become JSON
    /// answers.
    pub async fn handle(
        &self,
        affinity: &Affinity,
        request: Request<Incoming>,
        via: Via<'_>,
        note: &mut Note,
    ) -> Response<ProxyBody> {
        // HTTP/2 streams of one client run side by side: they cannot share one
        // bound HTTP/1 connection.
        let affinity = (request.version() != Version::HTTP_2).then_some(affinity);
        let (mut parts, body) = request.into_parts();
        let route = match self.router.route(&mut parts, via.proxy_user()) {
            Ok(route) => route,
            Err(error) => return refused_unrouted(&self.metrics, error.into()),
        };
        let upstream = via.upstream().unwrap_or(&route.upstream);
        note.account = Some(route.metrics.account().clone());
        // Boxed: hyper keeps room for a connection's handler future from the
        // start, so an idle connection would otherwise carry all of it
        // (measured: ~3 MiB more resident per 2000 idle connections).
        let forwarded = Box::pin(self.forward(&route, upstream, affinity, parts, body, note));
        let response = match forwarded.await {
            Ok(response) => response,
            Err(error) => refused(error),
        };
        route.metrics.count_response(response.status());
        response
    }

    async fn forward(
        &self,
        route: &Route,
        upstream: &Upstream,
        affinity: Option<&Affinity>,
        mut parts: Parts,
        body: Incoming,
        note: &mut Note,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.rules.load().check(&parts.method, parts.uri.path())?;
        let target = upstream.target_for(&parts.uri)?;
        admit(route, rate::api_of(parts.uri.path()), note).await?;
        let upgrade = upgrade::requested(&mut parts);
        let body = read_up_to(body, route.policy.retry_body_limit)
            .await
            .map_err(|e| ProxyError::BadRequest(format!("reading the request body failed: {e}")))?;
        let mut bearer = acquire(route).await?;
        let (mut body, replay) = match body {
            Held::Whole(bytes) => {
                note.bytes_in = Some(bytes.len() as u64);
                (ProxyBody::full(bytes.clone()), Some(bytes))
            }
            Held::TooLarge(stream) => (stream, None),
        };
        let mut retry = RetryPolicy::new(route.policy.upstream_timeout);
        loop {
            let within = retry.next_send()?;
            note.retried = retry.sends() > 1;
            let mut request = upstream_request(&parts, target.clone(), &bearer, body);
            if let Some(upgrade) = &upgrade {
                upgrade.ask(request.headers_mut());
            }
            let sent = send(
                route,
                upstream,
                affinity,
                request,
                within,
                upgrade.is_some(),
                note,
            );
            let refused = match sent.await {
                Ok(Verdict::Deliver(response)) => {
                    route.tokens.report_accepted(bearer.generation);
                    if !route.shaper.is_off() {
                        route.shaper.succeeded(rate::api_of(parts.uri.path()));
                    }
                    return Ok(match upgrade {
                        Some(upgrade) => upgrade.join(response),
                        None => response,
                    });
                }
                Ok(Verdict::TokenRefused(response)) => response,
                Ok(Verdict::Throttled(response, retry_after)) => {
                    let api = rate::api_of(parts.uri.path());
                    route.metrics.count_throttled();
                    let pause = route.shaper.throttled(api, retry_after);
                    // Sent again only after a pause the bucket enforces, and
                    // only if that pause fits the wait a request is allowed.
                    let waits = !route.shaper.is_off()
                        && pause
                            <= route
                                .shaper
                                .settings()
                                .max_wait
                                .saturating_sub(note.rate_delayed);
                    let bytes = replay
                        .as_ref()
                        .filter(|_| waits && resent_after_throttling(&parts.method))
                        .filter(|_| retry.allows(Cause::Throttled, true));
                    let Some(bytes) = bytes else {
                        return Ok(response);
                    };
                    drop(response);
                    tracing::debug!(
                        api,
                        "upstream throttled the request; sending it again after the pause"
                    );
                    admit(route, api, note).await?;
                    body = ProxyBody::full(bytes.clone());
                    continue;
                }
                Err(AttemptError::NotSent(back)) if retry.allows(Cause::NotSent, true) => {
                    body = back.into_body();
                    continue;
                }
                Err(AttemptError::NotSent(_)) => {
                    return Err(ProxyError::UpstreamFailed(
                        "the upstream closed every connection before taking the request".into(),
                    ))
                }
                Err(AttemptError::Unprocessed(reason)) => match &replay {
                    Some(bytes) if retry.allows(Cause::Unprocessed, true) => {
                        tracing::debug!(%reason, "upstream refused the request unprocessed; sending it again");
                        body = ProxyBody::full(bytes.clone());
                        continue;
                    }
                    _ => return Err(ProxyError::UpstreamUnprocessed(reason)),
                },
                Err(AttemptError::TimedOut) => return Err(retry.timed_out()),
                Err(AttemptError::Fatal(error)) => return Err(error),
            };
            if !route.tokens.refusal_warrants_retry(bearer.generation) {
                tracing::debug!("upstream refused a token obtained in answer to a refusal moments ago; passing the refusal on");
                return Ok(refused);
            }
            let Some(bytes) = replay
                .as_ref()
                .filter(|_| retry.allows(Cause::TokenRefused, true))
            else {
                // No retry for this request; the next one gets a fresh token.
                route.tokens.report_stale(bearer.generation);
                return Ok(refused);
            };
            drop(refused);
            route.metrics.count_auth_retry();
            bearer = route
                .tokens
                .refreshed_after(bearer.generation, route.policy.token_wait)
                .await?;
            body = ProxyBody::full(bytes.clone());
        }
    }
}

/// Sends once (an upgrade over a connection of its own) and sorts the
/// answer by what it says of the token.
async fn send(
    route: &Route,
    upstream: &Upstream,
    affinity: Option<&Affinity>,
    request: Request<ProxyBody>,
    within: Duration,
    upgrade: bool,
    note: &mut Note,
) -> Result<Verdict, AttemptError> {
    let (response, elapsed) = if upgrade {
        upstream.send_upgrade(request, within).await?
    } else {
        upstream.send(affinity, request, within).await?
    };
    route.metrics.observe_upstream(elapsed);
    note.upstream += elapsed;
    let (mut parts, body) = response.into_parts();
    let switched = upgrade::switched_to(&parts);
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = switched {
        upgrade::announce(&mut parts.headers, protocol);
    }
    match parts.status {
        StatusCode::TOO_MANY_REQUESTS => {
            let pause = headers::retry_after(&parts.headers);
            Ok(Verdict::Throttled(
                Response::from_parts(parts, ProxyBody::Stream(body)),
                pause,
            ))
        }
        StatusCode::UNAUTHORIZED => Ok(Verdict::TokenRefused(Response::from_parts(
            parts,
            ProxyBody::Stream(body),
        ))),
        StatusCode::FORBIDDEN => {
            let held = read_up_to(body, FORBIDDEN_PEEK_LIMIT)
                .await
                .map_err(|e| AttemptError::Fatal(ProxyError::UpstreamFailed(error::chain(&e))))?;
            Ok(match held {
                Held::Whole(bytes) if says_invalid_token(&bytes) => {
                    Verdict::TokenRefused(Response::from_parts(parts, ProxyBody::full(bytes)))
                }
                Held::Whole(bytes) => {
                    Verdict::Deliver(Response::from_parts(parts, ProxyBody::full(bytes)))
                }
                Held::TooLarge(body) => Verdict::Deliver(Response::from_parts(parts, body)),
            })
        }
        _ => Ok(Verdict::Deliver(Response::from_parts(
            parts,
            ProxyBody::Stream(body),
        ))),
    }
}

/// How a request came in, as far as its route and destination go.
#[derive(Clone, Copy, Debug)]
pub enum Via<'a> {
    /// Reverse mode: to the route's upstream.
    Reverse,
    /// Forward mode: to the host the client named, by the account the
    /// proxy credentials' user name may name.
    Forward {
        /// The host's upstream.
        upstream: &'a Upstream,
        /// The `Proxy-Authorization: Basic` user name, if any.
        proxy_user: Option<&'a str>,
    },
}

impl<'a> Via<'a> {
    fn upstream(self) -> Option<&'a Upstream> {
        match self {
            Via::Reverse => None,
            Via::Forward { upstream, .. } => Some(upstream),
        }
    }

    fn proxy_user(self) -> Option<&'a str> {
        match self {
            Via::Reverse => None,
            Via::Forward { proxy_user, .. } => proxy_user,
        }
    }
}

/// The answer to a request the proxy could not carry out, logged.
fn refused(error: ProxyError) -> Response<ProxyBody> {
    tracing::warn!(error = %error, "request failed in the proxy");
    error.into_response()
}

/// [`refused`], for a request no account answers (no route, the front
/// door's own refusals): counted under no account.
pub(crate) fn refused_unrouted(metrics: &Metrics, error: ProxyError) -> Response<ProxyBody> {
    let response = refused(error);
    metrics.count_unrouted_response(response.status());
    response
}

/// Waits for the request's turn in its account's bucket for `api`; a turn
/// too far off (or a full queue) is the 429 it gets.
async fn admit(route: &Route, api: &str, note: &mut Note) -> Result<(), ProxyError> {
    if route.shaper.is_off() {
        return Ok(());
    }
    match route.shaper.admit(api).await {
        Ok(admitted) => {
            route.metrics.observe_rate_wait(admitted.waited);
            note.rate_delayed += admitted.waited;
            Ok(())
        }
        Err(shed) => {
            route.metrics.count_rate_shed();
            Err(ProxyError::RateLimited(shed.retry_after))
        }
    }
}

/// Whether a request GoTo throttled is sent again after the pause: the
/// methods that do the same however often they are sent (RFC 9110 §9.2.2).
fn resent_after_throttling(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
    ]
    .contains(method)
}

/// The route's current token, or the next one within the wait. The fast
/// path only loads the snapshot; waiting sets up a notification first.
async fn acquire(route: &Route) -> Result<Bearer, ProxyError> {
    match route.tokens.current()? {
        Some(bearer) => Ok(bearer),
        None => Ok(route.tokens.acquire(route.policy.token_wait).await?),
    }
}

/// Builds the upstream request: same method and headers (rewritten), the
/// upstream target (see [`Upstream::target_for`]), and the proxy's token.
pub fn upstream_request(
    parts: &Parts,
    target: PathAndQuery,
    bearer: &Bearer,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = Uri::from(target);
    // The pool picks HTTP/1.1 or HTTP/2 per connection; the client's version does not carry over.
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() =
        headers::upstream_request_headers(&parts.headers, bearer.header.clone());
    request
}

/// GoToWebinar answers an expired token with 403 and `"int_err_code": "InvalidToken"`.
fn says_invalid_token(body: &Bytes) -> bool {
    #[derive(serde::Deserialize)]
    struct GoToError {
        int_err_code: Option<String>,
    }
    serde_json::from_slice::<GoToError>(body)
        .ok()
        .and_then(|e| e.int_err_code)
        .is_some_and(|code| code == "InvalidToken")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_invalid_token_403_is_a_token_refusal() {
        assert!(says_invalid_token(&Bytes::from_static(
            br#"{"int_err_code":"InvalidToken","msg":"x"}"#
        )));
        assert!(!says_invalid_token(&Bytes::from_static(
            br#"{"int_err_code":"Forbidden"}"#
        )));
        assert!(!says_invalid_token(&Bytes::from_static(b"InvalidToken")));
        assert!(!says_invalid_token(&Bytes::new()));
    }
}
