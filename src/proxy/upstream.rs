//! The client side: the upstreams requests are carried to, and the
//! registry of connection pools, one per upstream (scheme and authority).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use super::body::ProxyBody;
use super::error::{chain, ProxyError};
use super::path;
use super::pool::{Affinity, Lease, Pool, SendError};
use super::retry::AttemptError;
use crate::config::UpstreamUrl;
use crate::metrics::Metrics;
use crate::outbound::{ConnectTo, Dialer};
use crate::server::deadline;
use crate::tls::TlsError;

/// Settings of every outgoing connection.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Extra PEM roots to trust.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Upper bound for the TCP connect.
    pub connect_timeout: Duration,
    /// Where connections go instead (`--connect-to`).
    pub connect_to: Arc<ConnectTo>,
}

/// What tells upstreams apart: a pool serves exactly one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port (compared without regard to case).
    pub authority: Authority,
}

/// The connection pools of every upstream, made on first use and shared by
/// every route (and, in forward mode, every request) that names the same one.
pub struct Pools {
    /// Offers HTTP/1.1 only, for connections bound to one client.
    http1_connector: HttpsConnector<Dialer>,
    /// Offers HTTP/2 and HTTP/1.1, for connections to share.
    shared_connector: HttpsConnector<Dialer>,
    metrics: Arc<Metrics>,
    pools: Mutex<HashMap<UpstreamKey, Arc<Pool>>>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools").finish_non_exhaustive()
    }
}

impl Pools {
    /// A registry whose pools connect as `options` say and count in `metrics`.
    pub fn new(options: &ConnectOptions, metrics: Arc<Metrics>) -> Result<Self, TlsError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(crate::outbound::KEEPALIVE_IDLE));
        http.set_connect_timeout(Some(options.connect_timeout));
        let tls = crate::tls::client_config(options.extra_roots_pem.as_deref())?;
        let dialer = Dialer::new(http, options.connect_to.clone());
        Ok(Self {
            http1_connector: connector(dialer.clone(), tls.clone(), false),
            shared_connector: connector(dialer, tls, true),
            metrics,
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// The pool of `key`'s upstream.
    pub fn pool(&self, key: &UpstreamKey) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                let target = Uri::builder()
                    .scheme(key.scheme.clone())
                    .authority(key.authority.clone())
                    .path_and_query("/")
                    .build()
                    .expect("a scheme and an authority make a valid URI");
                Arc::new(Pool::new(
                    self.http1_connector.clone(),
                    self.shared_connector.clone(),
                    target,
                    self.metrics.clone(),
                ))
            })
            .clone()
    }
}

/// One upstream a route sends to: its base URL, and the pool of connections
/// to it. HTTP/1 clients' requests go over the connection bound to their
/// connection, HTTP/2 clients' over a shared HTTP/2 one where the upstream
/// offers it (see [`pool`](super::pool)).
#[derive(Clone, Debug)]
pub struct Upstream {
    pool: Arc<Pool>,
    url: UpstreamUrl,
    /// The `Host` header of HTTP/1 requests.
    host: HeaderValue,
}

impl Upstream {
    /// The upstream at `url`, with its pool from `pools`.
    pub fn new(url: UpstreamUrl, pools: &Pools) -> Self {
        let pool = pools.pool(&UpstreamKey {
            scheme: url.scheme.clone(),
            authority: url.authority.clone(),
        });
        let host = HeaderValue::from_str(url.authority.as_str())
            .expect("a parsed authority is a valid header value");
        Self { pool, url, host }
    }

    /// The base URL, for logs.
    pub fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    /// The request target upstream (origin form) for a client's request
    /// URI: the base path joined with the request's path (dot segments
    /// resolved, so it cannot leave the base path) and query. Only the path
    /// and query of the client's URI are used, so an absolute-form request
    /// cannot redirect the token. The scheme and authority are the
    /// upstream's, added where a connection needs them ([`Upstream::send`]).
    pub fn target_for(&self, requested: &Uri) -> Result<PathAndQuery, ProxyError> {
        let resolved = path::without_dot_segments(requested.path());
        if self.url.base_path.is_empty() {
            return Ok(match resolved {
                std::borrow::Cow::Borrowed(_) => requested
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
                std::borrow::Cow::Owned(path) => joined("", &path, requested.query())?,
            });
        }
        if path::has_encoded_separator(&resolved) {
            return Err(ProxyError::BadRequest(
                "the request path holds a percent-encoded / or \\, which could leave the upstream's base path"
                    .into(),
            ));
        }
        joined(&self.url.base_path, &resolved, requested.query())
    }

    /// Sends `request` (with the origin-form target [`Upstream::target_for`]
    /// makes) once, and waits up to `within` for the response headers. `affinity`
    /// is the client connection's binding; HTTP/2 client streams, which run
    /// side by side, go without. Returns the time it took with the response.
    pub async fn send(
        &self,
        affinity: Option<&Affinity>,
        request: Request<ProxyBody>,
        within: Duration,
    ) -> Result<(Response<Incoming>, Duration), AttemptError> {
        let started = Instant::now();
        // Pinned in place: `timeout` would otherwise move the whole exchange future.
        let exchange = std::pin::pin!(self.exchange(affinity, request));
        match deadline::timeout_at(started + within, within, exchange).await {
            Ok(result) => result.map(|response| (response, started.elapsed())),
            Err(_) => Err(AttemptError::TimedOut),
        }
    }

    /// Sends an upgrade request over a connection of its own (taken over
    /// by the upgrade, so never pooled), waiting up to `within` for the answer.
    pub async fn send_upgrade(
        &self,
        mut request: Request<ProxyBody>,
        within: Duration,
    ) -> Result<(Response<Incoming>, Duration), AttemptError> {
        let started = Instant::now();
        let exchange = std::pin::pin!(async {
            let mut sender = self
                .pool
                .open_for_upgrade()
                .await
                .map_err(|e| AttemptError::Fatal(ProxyError::UpstreamUnreachable(chain(&e))))?;
            self.address(&mut request, false);
            sender
                .send_request(request)
                .await
                .map_err(|e| AttemptError::Fatal(ProxyError::UpstreamFailed(chain(&e))))
        });
        match deadline::timeout_at(started + within, within, exchange).await {
            Ok(result) => result.map(|response| (response, started.elapsed())),
            Err(_) => Err(AttemptError::TimedOut),
        }
    }

    async fn exchange(
        &self,
        affinity: Option<&Affinity>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, AttemptError> {
        let idempotent = request.method().is_idempotent();
        let Lease { mut sender, reused } = self
            .pool
            .checkout(affinity)
            .await
            .map_err(|e| AttemptError::Fatal(ProxyError::UpstreamUnreachable(chain(&e))))?;
        self.address(&mut request, sender.is_http2());
        match sender.send(request).await {
            Ok(response) => {
                self.pool.checkin(affinity, sender);
                Ok(response)
            }
            // The connection closed while idle; the request never left.
            Err(SendError::NotSent(back)) => Err(AttemptError::NotSent(back)),
            // A reused HTTP/1 connection that closed before any answer is
            // most likely the upstream's keep-alive timeout racing the
            // request; RFC 9112 §9.3.1 allows idempotent ones to be sent again.
            Err(SendError::Failed(error))
                if was_not_processed(&error)
                    || (idempotent && never_dispatched(&error))
                    || (reused && idempotent && error.is_incomplete_message()) =>
            {
                Err(AttemptError::Unprocessed(chain(&error)))
            }
            Err(SendError::Failed(error)) => Err(AttemptError::Fatal(ProxyError::UpstreamFailed(
                chain(&error),
            ))),
        }
    }

    /// HTTP/1 takes the origin form and a `Host` header; HTTP/2 the absolute
    /// URI, from which hyper makes `:scheme` and `:authority`.
    fn address(&self, request: &mut Request<ProxyBody>, http2: bool) {
        if http2 {
            let mut parts = std::mem::take(request.uri_mut()).into_parts();
            parts.scheme = Some(self.url.scheme.clone());
            parts.authority = Some(self.url.authority.clone());
            *request.uri_mut() =
                Uri::from_parts(parts).expect("a scheme, an authority and a path make a URI");
            request.headers_mut().remove(HOST);
        } else {
            request.headers_mut().insert(HOST, self.host.clone());
        }
    }
}

/// `base` + `path` + `?query` as a request target.
fn joined(base: &str, path: &str, query: Option<&str>) -> Result<PathAndQuery, ProxyError> {
    let target = match query {
        Some(query) => format!("{base}{path}?{query}"),
        None => format!("{base}{path}"),
    };
    PathAndQuery::try_from(target)
        .map_err(|_| ProxyError::BadRequest("the request path is not valid".into()))
}

/// A connector for https and http upstreams that offers HTTP/1.1 by ALPN,
/// and HTTP/2 first when `offer_http2`.
fn connector(http: Dialer, tls: rustls::ClientConfig, offer_http2: bool) -> HttpsConnector<Dialer> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Pools {
        Pools::new(
            &ConnectOptions {
                extra_roots_pem: None,
                connect_timeout: Duration::from_secs(1),
                connect_to: Arc::default(),
            },
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    fn upstream(url: &str) -> Upstream {
        Upstream::new(UpstreamUrl::parse(url, true).unwrap(), &pools())
    }

    fn target(upstream: &Upstream, requested: &str) -> Result<String, ProxyError> {
        upstream
            .target_for(&requested.parse().unwrap())
            .map(|target| target.to_string())
    }

    #[test]
    fn a_client_path_cannot_leave_the_base_path() {
        let prefixed = upstream("https://egress.example/goto");
        for (requested, expected) in [
            ("/G2M/rest/meetings?x=1", "/goto/G2M/rest/meetings?x=1"),
            ("/../admin", "/goto/admin"),
            ("/a/../../../admin?q", "/goto/admin?q"),
            ("/%2e%2e/admin", "/goto/admin"),
            ("/./a/.", "/goto/a/"),
        ] {
            assert_eq!(
                target(&prefixed, requested).unwrap(),
                expected,
                "{requested}"
            );
        }
        for smuggled in ["/..%2fadmin", "/a/%2F..%2F..%2Fadmin", "/..%5cadmin"] {
            assert!(
                matches!(target(&prefixed, smuggled), Err(ProxyError::BadRequest(_))),
                "{smuggled}"
            );
        }
    }

    #[test]
    fn without_a_base_path_dot_segments_are_resolved_too() {
        let plain = upstream("https://api.getgo.com");
        assert_eq!(
            target(&plain, "/G2W/../admin/rest?a=b").unwrap(),
            "/admin/rest?a=b"
        );
        assert_eq!(target(&plain, "/G2W/rest/x").unwrap(), "/G2W/rest/x");
    }

    #[test]
    fn pools_are_keyed_by_upstream() {
        let pools = pools();
        let key = |scheme: Scheme, authority: &str| UpstreamKey {
            scheme,
            authority: authority.parse().unwrap(),
        };
        let one = pools.pool(&key(Scheme::HTTPS, "api.getgo.com"));
        assert!(Arc::ptr_eq(
            &one,
            &pools.pool(&key(Scheme::HTTPS, "API.getgo.com"))
        ));
        assert!(!Arc::ptr_eq(
            &one,
            &pools.pool(&key(Scheme::HTTPS, "api.goto.com"))
        ));
        assert!(!Arc::ptr_eq(
            &one,
            &pools.pool(&key(Scheme::HTTP, "api.getgo.com"))
        ));
    }
}
