//! The client for GoTo's OAuth token endpoint.
//!
//! Sends one token request and sorts the answer into a grant, a rejection
//! (only an operator can mend it) or a failure that may pass (retry later).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};

use super::grant::{parse_grant, GrantError, TokenGrant};
use crate::store::BoxFuture;

/// The largest answer read from the token endpoint; tokens are kilobytes, not megabytes.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// The longest `Retry-After` honoured, so a confused endpoint cannot park the proxy for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// What the proxy presents to obtain an access token.
#[derive(Clone, Debug)]
pub enum Grant {
    /// `grant_type=refresh_token`.
    RefreshToken(SecretString),
    /// `grant_type=personal_access_token`.
    PersonalAccessToken(SecretString),
    /// `grant_type=authorization_code`, with the PKCE verifier and the redirect URI used.
    AuthorizationCode {
        code: SecretString,
        verifier: SecretString,
        redirect_uri: String,
    },
}

impl Grant {
    fn form(&self) -> Vec<(&'static str, &str)> {
        match self {
            Grant::RefreshToken(token) => vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", token.expose_secret()),
            ],
            Grant::PersonalAccessToken(pat) => vec![
                ("grant_type", "personal_access_token"),
                ("pat", pat.expose_secret()),
            ],
            Grant::AuthorizationCode {
                code,
                verifier,
                redirect_uri,
            } => vec![
                ("grant_type", "authorization_code"),
                ("code", code.expose_secret()),
                ("code_verifier", verifier.expose_secret()),
                ("redirect_uri", redirect_uri),
            ],
        }
    }
}

/// The OAuth client the proxy authenticates as.
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    /// The client id (not a secret).
    pub id: String,
    /// The client secret.
    pub secret: SecretString,
}

/// Why a token request gave no token. Texts never hold a token or a secret.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The endpoint refused the grant (`invalid_grant`): the refresh token or PAT is dead.
    #[error("the token endpoint rejected the grant ({code}): the refresh token or PAT is no longer valid")]
    GrantRejected { code: String },
    /// The endpoint refused the client (`invalid_client`, `unauthorized_client`).
    #[error(
        "the token endpoint rejected the client ({code}): check the client id and client secret"
    )]
    ClientRejected { code: String },
    /// The endpoint could not be reached or did not answer in time.
    #[error("the token endpoint could not be reached: {0}")]
    Unreachable(String),
    /// The endpoint answered with an error status that may pass.
    #[error("the token endpoint answered HTTP {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        status: u16,
        code: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The endpoint answered 200 with something unusable.
    #[error("{0}")]
    BadAnswer(#[from] GrantError),
    /// The answer was larger than [`MAX_ANSWER_BYTES`].
    #[error("the token endpoint's answer is larger than {MAX_ANSWER_BYTES} bytes")]
    AnswerTooLarge,
}

impl EndpointError {
    /// Whether only an operator can mend this (retrying cannot).
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            Self::GrantRejected { .. } | Self::ClientRejected { .. }
        )
    }

    /// How long the endpoint asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Every label [`EndpointError::kind`] gives.
    pub const KINDS: [&'static str; 4] = ["rejected", "unreachable", "error_status", "bad_answer"];

    /// A short label for the refresh metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::GrantRejected { .. } | Self::ClientRejected { .. } => "rejected",
            Self::Unreachable(_) => "unreachable",
            Self::Status { .. } => "error_status",
            Self::BadAnswer(_) | Self::AnswerTooLarge => "bad_answer",
        }
    }
}

/// Where the refresher gets tokens: the token endpoint, or a fake in tests.
pub trait TokenClient: Send + Sync + 'static {
    /// Exchanges `grant` for an access token.
    fn request<'a>(&'a self, grant: &'a Grant) -> BoxFuture<'a, Result<TokenGrant, EndpointError>>;
}

/// A token endpoint client that a reload can replace (a new client secret,
/// a new token URL) under a refresher that keeps running, so that no
/// refresh token it holds is lost.
#[derive(Clone, Debug)]
pub struct SharedEndpoint(std::sync::Arc<arc_swap::ArcSwap<TokenEndpoint>>);

impl SharedEndpoint {
    /// Starts with `endpoint`.
    pub fn new(endpoint: TokenEndpoint) -> Self {
        Self(std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(
            endpoint,
        )))
    }

    /// Token requests from now on go to `endpoint`.
    pub fn replace(&self, endpoint: TokenEndpoint) {
        self.0.store(std::sync::Arc::new(endpoint));
    }
}

impl TokenClient for SharedEndpoint {
    fn request<'a>(&'a self, grant: &'a Grant) -> BoxFuture<'a, Result<TokenGrant, EndpointError>> {
        let endpoint = self.0.load_full();
        Box::pin(async move { endpoint.request(grant).await })
    }
}

impl TokenClient for TokenEndpoint {
    fn request<'a>(&'a self, grant: &'a Grant) -> BoxFuture<'a, Result<TokenGrant, EndpointError>> {
        Box::pin(TokenEndpoint::request(self, grant))
    }
}

/// Sends token requests to one token endpoint as one client.
#[derive(Clone)]
pub struct TokenEndpoint {
    http: reqwest::Client,
    url: reqwest::Url,
    client: ClientCredentials,
}

impl std::fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("url", &self.url.as_str())
            .field("client_id", &self.client.id)
            .finish_non_exhaustive()
    }
}

/// Settings for the endpoint's HTTP client.
#[derive(Clone, Debug)]
pub struct EndpointOptions {
    /// Upper bound for one whole token request.
    pub timeout: Duration,
    /// Extra PEM roots to trust (corporate TLS, tests).
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Where connections go instead (`--connect-to`).
    pub connect_to: std::sync::Arc<crate::outbound::ConnectTo>,
}

impl TokenEndpoint {
    /// A client for `url` that authenticates as `client`.
    pub fn new(
        url: reqwest::Url,
        client: ClientCredentials,
        options: &EndpointOptions,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("goto-auth-proxy/", env!("CARGO_PKG_VERSION")));
        if let Some(port) = url.port_or_known_default() {
            if !options.connect_to.is_empty() {
                builder = builder.dns_resolver(std::sync::Arc::new(
                    crate::outbound::Resolver::new(options.connect_to.clone(), port),
                ));
            }
        }
        if let Some(pem) = &options.extra_roots_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: builder.build()?,
            url,
            client,
        })
    }

    /// The endpoint's URL, for logs.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Exchanges `grant` for an access token.
    pub async fn request(&self, grant: &Grant) -> Result<TokenGrant, EndpointError> {
        let mut response = self
            .http
            .post(self.url.clone())
            .basic_auth(&self.client.id, Some(self.client.secret.expose_secret()))
            .header(http::header::ACCEPT, "application/json")
            .form(&grant.form())
            .send()
            .await
            .map_err(|e| EndpointError::Unreachable(describe_transport_error(&e)))?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        let body = read_bounded(&mut response).await?;
        if status.is_success() {
            return Ok(parse_grant(&body, unix_now())?);
        }
        let code = oauth_error_code(&body);
        Err(classify_refusal(status.as_u16(), code, retry_after))
    }
}

/// Sorts a non-2xx answer. Only the OAuth codes that say the credential itself is
/// bad are rejections; anything else (404 from a wrong URL, 500, 429) may pass.
fn classify_refusal(
    status: u16,
    code: Option<String>,
    retry_after: Option<Duration>,
) -> EndpointError {
    match code.as_deref() {
        Some("invalid_grant") => EndpointError::GrantRejected {
            code: code.unwrap_or_default(),
        },
        Some("invalid_client" | "unauthorized_client") => EndpointError::ClientRejected {
            code: code.unwrap_or_default(),
        },
        _ => EndpointError::Status {
            status,
            code,
            retry_after,
        },
    }
}

/// Reads the body, refusing to buffer more than [`MAX_ANSWER_BYTES`].
async fn read_bounded(response: &mut reqwest::Response) -> Result<Vec<u8>, EndpointError> {
    if response
        .content_length()
        .is_some_and(|len| len > MAX_ANSWER_BYTES as u64)
    {
        return Err(EndpointError::AnswerTooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| EndpointError::Unreachable(describe_transport_error(&e)))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(EndpointError::AnswerTooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The `error` field of an OAuth error answer, if it is one. Only short
/// token-like codes are kept, so nothing the endpoint echoes reaches a log.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct OAuthError {
        error: String,
    }
    let parsed: OAuthError = serde_json::from_slice(body).ok()?;
    let is_code = parsed.error.len() <= 64
        && parsed
            .error
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    is_code.then_some(parsed.error)
}

/// `Retry-After`, capped.
fn parse_retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    crate::proxy::headers::retry_after(headers).map(|delay| delay.min(MAX_RETRY_AFTER))
}

/// A transport error's chain as text. reqwest includes the URL, which holds
/// no secret here (credentials travel in the header and the body).
fn describe_transport_error(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "connection failed".to_owned()
    } else {
        "transport error".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_credential_errors_are_rejections() {
        assert!(classify_refusal(400, Some("invalid_grant".into()), None).is_rejection());
        assert!(classify_refusal(401, Some("invalid_client".into()), None).is_rejection());
        assert!(!classify_refusal(400, Some("invalid_request".into()), None).is_rejection());
        assert!(!classify_refusal(404, None, None).is_rejection());
        assert!(!classify_refusal(503, None, None).is_rejection());
    }

    #[test]
    fn error_codes_that_look_like_data_are_dropped() {
        assert_eq!(
            oauth_error_code(br#"{"error":"invalid_grant","error_description":"x"}"#).as_deref(),
            Some("invalid_grant")
        );
        assert_eq!(
            oauth_error_code(br#"{"error":"refresh token abc.def is bad"}"#),
            None
        );
        assert_eq!(oauth_error_code(b"<html>"), None);
    }

    #[test]
    fn retry_after_is_read_and_capped() {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(http::header::RETRY_AFTER, "86400".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&headers), Some(Duration::ZERO));
        headers.insert(http::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), None);
    }

    #[test]
    fn grant_debug_is_redacted() {
        let shown = format!("{:?}", Grant::RefreshToken(SecretString::from("rt-value")));
        assert!(!shown.contains("rt-value"), "{shown}");
    }
}
