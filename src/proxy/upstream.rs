//! The pooled client that carries requests to the upstream.

use std::time::{Duration, Instant};

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::ProxyBody;
use super::error::{chain, ProxyError};
use crate::config::UpstreamUrl;
use crate::tls::TlsError;

/// How long an idle upstream connection is kept for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Settings of the upstream client.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// The base URL requests are forwarded to.
    pub url: UpstreamUrl,
    /// Extra PEM roots to trust.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Upper bound for the TCP connect.
    pub connect_timeout: Duration,
    /// Upper bound from sending to the response headers.
    pub response_timeout: Duration,
}

/// Sends requests to the upstream over pooled keep-alive connections,
/// HTTP/2 where the upstream offers it by ALPN.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    url: UpstreamUrl,
    response_timeout: Duration,
}

impl Upstream {
    /// A client for `options.url`.
    pub fn new(options: &UpstreamOptions) -> Result<Self, TlsError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(options.connect_timeout));
        let tls = crate::tls::client_config(options.extra_roots_pem.as_deref())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Ok(Self {
            client,
            url: options.url.clone(),
            response_timeout: options.response_timeout,
        })
    }

    /// The upstream URI for a client's request URI: the base path joined with
    /// the request's path and query. Only the path and query of the client's
    /// URI are used, so an absolute-form request cannot redirect the token.
    pub fn uri_for(&self, requested: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = requested.path_and_query().map_or("/", PathAndQuery::as_str);
        let path_and_query = if self.url.base_path.is_empty() {
            PathAndQuery::try_from(path_and_query)
        } else {
            PathAndQuery::try_from(format!("{}{}", self.url.base_path, path_and_query))
        }
        .map_err(|_| ProxyError::BadRequest("the request path is not valid".into()))?;
        Uri::builder()
            .scheme(self.url.scheme.clone())
            .authority(self.url.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ProxyError::BadRequest("the request path is not valid".into()))
    }

    /// Sends `request` and waits for the response headers, bounded by the
    /// response timeout. Returns the time it took with the response.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Duration), ProxyError> {
        let started = Instant::now();
        let idempotent = request.method().is_idempotent();
        match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok((response, started.elapsed())),
            Ok(Err(error))
                if was_not_processed(&error) || (idempotent && never_dispatched(&error)) =>
            {
                Err(ProxyError::UpstreamUnprocessed(chain(&error)))
            }
            Ok(Err(error)) if error.is_connect() => {
                Err(ProxyError::UpstreamUnreachable(chain(&error)))
            }
            Ok(Err(error)) => Err(ProxyError::UpstreamFailed(chain(&error))),
            Err(_) => Err(ProxyError::UpstreamTimeout(self.response_timeout)),
        }
    }
}

/// Whether the upstream refused the request without processing it: an
/// HTTP/2 GOAWAY without error (a server rotating its connections; RFC 9113
/// §6.8 says such streams were not processed) or REFUSED_STREAM (§8.7).
fn was_not_processed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return match h2.reason() {
                Some(h2::Reason::REFUSED_STREAM) => true,
                Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
                _ => false,
            };
        }
        source = cause.source();
    }
    false
}

/// Whether the client's connection task ended before it took the request
/// (the connection closed under it, as after a GOAWAY). hyper says so only in
/// its message; tests/upstream_faults.rs fails should that change. Whether the
/// request reached the wire is not certain, so only idempotent ones count.
fn never_dispatched(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            if hyper.to_string() == "dispatch task is gone" {
                return true;
            }
        }
        source = cause.source();
    }
    false
}
