//! The client that carries requests to the upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HOST;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use super::body::ProxyBody;
use super::error::{chain, ProxyError};
use super::pool::{Affinity, Lease, Pool, SendError};
use crate::config::UpstreamUrl;
use crate::metrics::Metrics;
use crate::tls::TlsError;

/// How many connections one request tries when each turns out closed before taking it.
const STALE_CONNECTION_ATTEMPTS: usize = 3;

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

/// Sends requests to the upstream: over the HTTP/1.1 connection bound to
/// the client's connection where there is one, over a shared HTTP/2 one for
/// HTTP/2 clients where the upstream offers it (see [`pool`](super::pool)).
#[derive(Clone, Debug)]
pub struct Upstream {
    pool: Arc<Pool>,
    url: UpstreamUrl,
    /// The `Host` header of HTTP/1 requests.
    host: HeaderValue,
    response_timeout: Duration,
}

impl Upstream {
    /// A client for `options.url`; it counts the connections it opens in `metrics`.
    pub fn new(options: &UpstreamOptions, metrics: Arc<Metrics>) -> Result<Self, TlsError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(options.connect_timeout));
        let tls = crate::tls::client_config(options.extra_roots_pem.as_deref())?;
        let http1_connector = connector(http.clone(), tls.clone(), false);
        let shared_connector = connector(http, tls, true);
        let url = options.url.clone();
        let target = Uri::builder()
            .scheme(url.scheme.clone())
            .authority(url.authority.clone())
            .path_and_query("/")
            .build()
            .expect("a parsed upstream URL makes a valid URI");
        let host = HeaderValue::from_str(url.authority.as_str())
            .expect("a parsed authority is a valid header value");
        Ok(Self {
            pool: Arc::new(Pool::new(
                http1_connector,
                shared_connector,
                target,
                metrics,
            )),
            url,
            host,
            response_timeout: options.response_timeout,
        })
    }

    /// State for a new client connection: its binding to an upstream connection.
    pub fn affinity(&self) -> Affinity {
        self.pool.affinity()
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

    /// Sends `request` (with an absolute URI, as [`Upstream::uri_for`] makes)
    /// and waits for the response headers, bounded by the response timeout.
    /// `affinity` is the client connection's binding; HTTP/2 client streams,
    /// which run side by side, go without. Returns the time it took with the response.
    pub async fn send(
        &self,
        affinity: Option<&Affinity>,
        request: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Duration), ProxyError> {
        let started = Instant::now();
        // Pinned in place: `timeout` would otherwise move the whole exchange future.
        let exchange = std::pin::pin!(self.exchange(affinity, request));
        match tokio::time::timeout(self.response_timeout, exchange).await {
            Ok(result) => result.map(|response| (response, started.elapsed())),
            Err(_) => Err(ProxyError::UpstreamTimeout(self.response_timeout)),
        }
    }

    async fn exchange(
        &self,
        affinity: Option<&Affinity>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let absolute = request.uri().clone();
        let idempotent = request.method().is_idempotent();
        let mut attempt = 1;
        loop {
            let Lease { mut sender, reused } = self
                .pool
                .checkout(affinity)
                .await
                .map_err(|e| ProxyError::UpstreamUnreachable(chain(&e)))?;
            self.address(&mut request, &absolute, sender.is_http2());
            match sender.send(request).await {
                Ok(response) => {
                    self.pool.checkin(affinity, sender);
                    return Ok(response);
                }
                // The connection closed while idle; the request never left.
                Err(SendError::NotSent(back)) if attempt < STALE_CONNECTION_ATTEMPTS => {
                    request = *back;
                    attempt += 1;
                }
                Err(SendError::NotSent(_)) => {
                    return Err(ProxyError::UpstreamFailed(
                        "the upstream closed every connection before taking the request".into(),
                    ))
                }
                // A reused HTTP/1 connection that closed before any answer is
                // most likely the upstream's keep-alive timeout racing the
                // request; RFC 9112 §9.3.1 allows idempotent ones to be sent again.
                Err(SendError::Failed(error))
                    if was_not_processed(&error)
                        || (idempotent && never_dispatched(&error))
                        || (reused && idempotent && error.is_incomplete_message()) =>
                {
                    return Err(ProxyError::UpstreamUnprocessed(chain(&error)))
                }
                Err(SendError::Failed(error)) => {
                    return Err(ProxyError::UpstreamFailed(chain(&error)))
                }
            }
        }
    }

    /// HTTP/1 takes the origin form and a `Host` header; HTTP/2 the absolute
    /// URI, from which hyper makes `:scheme` and `:authority`.
    fn address(&self, request: &mut Request<ProxyBody>, absolute: &Uri, http2: bool) {
        if http2 {
            *request.uri_mut() = absolute.clone();
            request.headers_mut().remove(HOST);
        } else {
            let origin = absolute
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *request.uri_mut() = Uri::from(origin);
            request.headers_mut().insert(HOST, self.host.clone());
        }
    }
}

/// A connector for https and http upstreams that offers HTTP/1.1 by ALPN,
/// and HTTP/2 first when `offer_http2`.
fn connector(
    http: HttpConnector,
    tls: rustls::ClientConfig,
    offer_http2: bool,
) -> HttpsConnector<HttpConnector> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    if offer_http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
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

/// Whether the connection's task ended with the request still queued for it
/// (seen with HTTP/2 when a server rotates its connection by GOAWAY under
/// load: one request in a million in `benches/load.py --tls` before this
/// check). hyper says so only in its message. Whether the request reached
/// the wire is not certain, so only idempotent ones count.
fn never_dispatched(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            if hyper.to_string().starts_with("dispatch task is gone") {
                return true;
            }
        }
        source = cause.source();
    }
    false
}
