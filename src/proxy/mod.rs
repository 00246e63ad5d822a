//! The request path: every request gets the current token and goes upstream;
//! a token refusal gets one shared refresh and one retry.

pub mod body;
pub mod error;
pub mod headers;
pub mod pool;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use self::body::{read_up_to, Held, ProxyBody};
use self::error::ProxyError;
use self::pool::Affinity;
use self::upstream::Upstream;
use crate::metrics::Metrics;
use crate::token::{Bearer, TokenSource};

/// How many times one request is sent when the upstream keeps refusing it unprocessed.
const UNPROCESSED_ATTEMPTS: usize = 4;

/// The most of a 403 body read to look for GoToWebinar's `InvalidToken`.
const FORBIDDEN_PEEK_LIMIT: usize = 64 * 1024;

/// How the request path behaves.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// How long a request may wait for a token.
    pub token_wait: Duration,
    /// Request bodies up to this size are kept for a retry.
    pub retry_body_limit: usize,
}

/// Forwards client requests upstream with the current access token.
#[derive(Debug)]
pub struct ProxyService {
    tokens: Arc<TokenSource>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    options: ProxyOptions,
}

/// What upstream's answer means for the token.
enum Verdict {
    /// Pass the response to the client.
    Deliver(Response<ProxyBody>),
    /// Upstream refused the token; the response goes to the client if no retry is possible.
    TokenRefused(Response<ProxyBody>),
}

impl ProxyService {
    /// A service that takes tokens from `tokens` and sends through `upstream`.
    pub fn new(
        tokens: Arc<TokenSource>,
        upstream: Upstream,
        metrics: Arc<Metrics>,
        options: ProxyOptions,
    ) -> Self {
        Self {
            tokens,
            upstream,
            metrics,
            options,
        }
    }

    /// State for a new client connection.
    pub fn open_connection(&self) -> Affinity {
        self.upstream.affinity()
    }

    /// Answers one client request arriving on the connection `affinity` was
    /// opened for; never fails, errors become JSON answers.
    pub async fn handle(
        &self,
        affinity: &Affinity,
        request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        // HTTP/2 streams of one client run side by side: they cannot share one
        // bound HTTP/1 connection.
        let affinity = (request.version() != Version::HTTP_2).then_some(affinity);
        let response = match self.forward(affinity, request).await {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(error = %error, "request failed in the proxy");
                error.into_response()
            }
        };
        self.metrics.count_response(response.status());
        response
    }

    async fn forward(
        &self,
        affinity: Option<&Affinity>,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, body) = request.into_parts();
        let uri = self.upstream.uri_for(&parts.uri)?;
        let body = read_up_to(body, self.options.retry_body_limit)
            .await
            .map_err(|e| ProxyError::BadRequest(format!("reading the request body failed: {e}")))?;
        let bearer = self.acquire().await?;
        let (first_body, replay) = match body {
            Held::Whole(bytes) => (ProxyBody::full(bytes.clone()), Some(bytes)),
            Held::TooLarge(stream) => (stream, None),
        };
        let refused = match self
            .deliver(affinity, &parts, &uri, &bearer, first_body, replay.as_ref())
            .await?
        {
            Verdict::Deliver(response) => {
                self.tokens.report_accepted(bearer.generation);
                return Ok(response);
            }
            Verdict::TokenRefused(response) => response,
        };
        if !self.tokens.refusal_warrants_retry(bearer.generation) {
            tracing::debug!("upstream refused a token obtained in answer to a refusal moments ago; passing the refusal on");
            return Ok(refused);
        }
        let Some(replay) = replay else {
            // The body is gone; the client gets the refusal, but the next request a fresh token.
            self.tokens.report_stale(bearer.generation);
            return Ok(refused);
        };
        drop(refused);
        self.metrics.count_auth_retry();
        let bearer = self
            .tokens
            .refreshed_after(bearer.generation, self.options.token_wait)
            .await?;
        let retry_body = ProxyBody::full(replay.clone());
        match self
            .deliver(affinity, &parts, &uri, &bearer, retry_body, Some(&replay))
            .await?
        {
            Verdict::Deliver(response) => {
                self.tokens.report_accepted(bearer.generation);
                Ok(response)
            }
            Verdict::TokenRefused(response) => Ok(response),
        }
    }

    /// The current token, or the next one within the wait. The fast path
    /// only loads the snapshot; waiting sets up a notification first.
    async fn acquire(&self) -> Result<Bearer, ProxyError> {
        match self.tokens.current()? {
            Some(bearer) => Ok(bearer),
            None => Ok(self.tokens.acquire(self.options.token_wait).await?),
        }
    }

    /// Sends the request; when the upstream refused it unprocessed (a server
    /// rotating its HTTP/2 connections) and the body is at hand, sends it again
    /// on another connection, a few times at most.
    async fn deliver(
        &self,
        affinity: Option<&Affinity>,
        parts: &Parts,
        uri: &Uri,
        bearer: &Bearer,
        body: ProxyBody,
        replay: Option<&Bytes>,
    ) -> Result<Verdict, ProxyError> {
        let mut body = body;
        let mut attempt = 1;
        loop {
            match self
                .send(affinity, upstream_request(parts, uri.clone(), bearer, body))
                .await
            {
                Err(ProxyError::UpstreamUnprocessed(reason)) if attempt < UNPROCESSED_ATTEMPTS => {
                    let Some(bytes) = replay else {
                        return Err(ProxyError::UpstreamUnprocessed(reason));
                    };
                    tracing::debug!(%reason, attempt, "upstream refused the request unprocessed; sending it again");
                    body = ProxyBody::full(bytes.clone());
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn send(
        &self,
        affinity: Option<&Affinity>,
        request: Request<ProxyBody>,
    ) -> Result<Verdict, ProxyError> {
        let (response, elapsed) = self.upstream.send(affinity, request).await?;
        self.metrics.observe_upstream(elapsed);
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        match parts.status {
            StatusCode::UNAUTHORIZED => Ok(Verdict::TokenRefused(Response::from_parts(
                parts,
                ProxyBody::Stream(body),
            ))),
            StatusCode::FORBIDDEN => {
                let held = read_up_to(body, FORBIDDEN_PEEK_LIMIT)
                    .await
                    .map_err(|e| ProxyError::UpstreamFailed(error::chain(&e)))?;
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
}

/// Builds the upstream request: same method and headers (rewritten), the
/// upstream URI, and the proxy's token.
pub fn upstream_request(
    parts: &Parts,
    uri: Uri,
    bearer: &Bearer,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
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
