//! The proxy's own error answers: one place maps every failure to a status
//! and a JSON body `{"error": "<code>", "message": "<text>"}`.

use http::{header, HeaderValue, Response, StatusCode};

use super::allow::Refusal;
use super::body::ProxyBody;
use super::route::RouteError;
use crate::token::Unavailable;

/// A request the proxy could not complete. Texts never hold a token.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No valid access token within the wait, or the credential was rejected.
    #[error(transparent)]
    TokenUnavailable(#[from] Unavailable),
    /// The upstream could not be connected to.
    #[error("the upstream could not be reached: {0}")]
    UpstreamUnreachable(String),
    /// The upstream failed while the request or response was under way.
    #[error("the upstream connection failed: {0}")]
    UpstreamFailed(String),
    /// The upstream refused the request before processing it (an HTTP/2
    /// GOAWAY or REFUSED_STREAM): safe to send again.
    #[error("the upstream closed the connection before taking the request: {0}")]
    UpstreamUnprocessed(String),
    /// The upstream did not send response headers in time.
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    /// The client's request could not be forwarded as it is.
    #[error("{0}")]
    BadRequest(String),
    /// The request named no account, or one the proxy does not serve.
    #[error(transparent)]
    NoRoute(#[from] RouteError),
    /// `--allow-requests` does not let this request carry the token.
    #[error(transparent)]
    NotAllowed(#[from] Refusal),
    /// Forward mode with `--other-hosts deny`: this host is not served.
    #[error("{0} is not a host this proxy serves (--other-hosts deny)")]
    HostNotAllowed(String),
    /// The CONNECT authority, the TLS SNI and the `Host` do not name one host.
    #[error("{0}")]
    Misdirected(String),
    /// Rate shaping: the request's turn would come too late, or its
    /// bucket's queue is full; try again after this long.
    #[error("too many requests for this account and API; try again in {} s", .0.as_secs())]
    RateLimited(std::time::Duration),
    /// `--client-key-file` is set and the request carries no matching key.
    #[error(
        "this proxy needs its client key: send Proxy-Authorization: Bearer <key>, \
         or put it in the proxy URL (http://user:<key>@host:port)"
    )]
    ProxyAuthRequired,
}

impl ProxyError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::TokenUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "token_unavailable")
            }
            ProxyError::UpstreamUnreachable(_) => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            ProxyError::UpstreamFailed(_) | ProxyError::UpstreamUnprocessed(_) => {
                (StatusCode::BAD_GATEWAY, "upstream_failed")
            }
            ProxyError::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            ProxyError::BadRequest(_) | ProxyError::NoRoute(RouteError::Conflicting) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ProxyError::NoRoute(RouteError::AccountRequired) => {
                (StatusCode::BAD_REQUEST, "account_required")
            }
            ProxyError::NoRoute(RouteError::UnknownAccount(_)) => {
                (StatusCode::NOT_FOUND, "unknown_account")
            }
            ProxyError::NotAllowed(Refusal::NotAllowed { .. }) => {
                (StatusCode::FORBIDDEN, "request_not_allowed")
            }
            ProxyError::NotAllowed(Refusal::AmbiguousPath) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ProxyError::HostNotAllowed(_) => (StatusCode::FORBIDDEN, "host_not_allowed"),
            ProxyError::Misdirected(_) => (StatusCode::MISDIRECTED_REQUEST, "misdirected_request"),
            ProxyError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ProxyError::ProxyAuthRequired => (
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "proxy_auth_required",
            ),
        }
    }

    /// The answer the client gets.
    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, code) = self.status_and_code();
        let mut response = json_response(status, code, &self.to_string());
        if let ProxyError::RateLimited(after) = self {
            // Whole seconds, at least one (RFC 9110 §10.2.3).
            let seconds = after.as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A JSON error answer from the proxy itself.
pub fn json_response(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let mut response = super::body::response(status, "application/json", body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        response.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"goto-auth-proxy\""),
        );
    }
    response
}

/// An error's message with its causes, for the client and the log.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
