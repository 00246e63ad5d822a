//! Upstream connections, kept off the hot path.
//!
//! A shared pool consulted on every request costs a lock, a checkout and a
//! task hand-off per request; nginx avoids that with per-worker caches. Here
//! each HTTP/1 client connection is *bound* to one upstream HTTP/1
//! connection: its requests come one at a time, so they reuse that
//! connection without touching anything shared. When the client leaves, the
//! connection goes to a small idle set for the next client, so clients that
//! open a connection per request do not pay for a new upstream connection
//! (and, to GoTo, a TLS handshake) each time.
//!
//! Each HTTP/1 connection runs as a task of its own on the thread that
//! opened it, which with one runtime per core is its client's: a request
//! and its response wake a task on the same thread, never on another. The
//! idle set hands a connection only to clients of that thread. (Driving
//! the connection inside the client's own task instead, beside the client
//! connection, polls both for every wake-up of either: measured 46,700
//! instructions per request against 40,700, and 0.92 × the req/s at 256
//! connections.)
//!
//! Bound connections are HTTP/1.1 (the only protocol they offer by ALPN):
//! an HTTP/2 connection shared by every client is one task on one thread
//! that all requests queue for (measured: 0.62 × nginx's throughput at 256
//! clients over TLS, against 0.84 × with a connection per client). So the
//! upstream sees the parallelism the clients chose, as with nginx. HTTP/2
//! clients, whose streams run side by side on one connection, share one
//! multiplexed upstream connection where the upstream offers HTTP/2 (GoTo
//! does), and HTTP/1 connections from the idle set where it does not:
//! a client that wants a single connection to GoTo speaks h2c to the proxy.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use super::body::ProxyBody;
use crate::metrics::Metrics;
use crate::outbound::Dialer;

/// The upstream's protocol, as learned by connecting.
const UNKNOWN: u8 = 0;
const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

/// Idle HTTP/1 connections kept for clients to come, per worker thread;
/// more are closed.
const MAX_IDLE: usize = 32;
/// How long an idle connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often an HTTP/2 upstream connection is pinged, so one that died
/// silently (a NAT or load balancer dropping it) is noticed and replaced.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);

/// Why no connection to the upstream could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection or the TLS handshake failed.
    #[error("connecting to the upstream failed")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP handshake on a new connection failed.
    #[error("the HTTP handshake with the upstream failed")]
    Handshake(#[source] hyper::Error),
}

/// A connection just opened, already driven by a task of its own.
enum Opened {
    /// HTTP/1.1: one request at a time.
    Http1(http1::SendRequest<ProxyBody>),
    /// HTTP/2: shared.
    Http2(http2::SendRequest<ProxyBody>),
}

/// Which protocols a new connection may offer the upstream by ALPN.
#[derive(Clone, Copy)]
enum Offer {
    /// HTTP/1.1 only: a connection bound to one client.
    Http1,
    /// HTTP/2 first: a connection to share.
    Http2,
}

/// A connection ready to take a request.
pub(crate) enum Sender {
    /// An HTTP/1.1 connection: one request at a time.
    Http1(http1::SendRequest<ProxyBody>),
    /// A handle to the shared HTTP/2 connection.
    Http2(http2::SendRequest<ProxyBody>),
}

/// Why a request did not get an answer.
pub(crate) enum SendError {
    /// The connection was closed before it took the request; here it is back.
    NotSent(Box<Request<ProxyBody>>),
    /// The request was handed over and the exchange failed.
    Failed(hyper::Error),
}

impl Sender {
    /// Whether requests to this connection take the absolute URI (HTTP/2,
    /// whose `:authority` comes from it) rather than the origin form.
    pub(crate) fn is_http2(&self) -> bool {
        matches!(self, Sender::Http2(_))
    }

    /// Sends `request`, giving it back when the connection never took it.
    pub(crate) async fn send(
        &mut self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let result = match self {
            Sender::Http1(sender) => sender.try_send_request(request).await,
            Sender::Http2(sender) => sender.try_send_request(request).await,
        };
        result.map_err(|mut error| match error.take_message() {
            Some(request) => SendError::NotSent(Box::new(request)),
            None => SendError::Failed(error.into_error()),
        })
    }
}

/// The upstream connections a client connection is bound to: one HTTP/1.1
/// connection per upstream its requests have named (reverse mode names one;
/// a forward-mode client may name several hosts on one connection).
pub struct Affinity {
    bindings: Mutex<Vec<Binding>>,
}

/// One upstream's connection bound to a client connection.
struct Binding {
    pool: Arc<Pool>,
    /// The connection's handle, while no request of the client uses it.
    sender: Option<http1::SendRequest<ProxyBody>>,
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Affinity").finish_non_exhaustive()
    }
}

impl Default for Affinity {
    fn default() -> Self {
        Self::new()
    }
}

impl Affinity {
    /// A client connection bound to nothing yet; connections are made on first use.
    pub fn new() -> Self {
        Self {
            bindings: Mutex::new(Vec::new()),
        }
    }

    /// Takes the bound connection to `pool`, if there is one.
    fn take(&self, pool: &Arc<Pool>) -> Option<http1::SendRequest<ProxyBody>> {
        lock(&self.bindings)
            .iter_mut()
            .find(|b| Arc::ptr_eq(&b.pool, pool))
            .and_then(|b| b.sender.take())
    }

    /// Binds `sender` (back) to this client connection.
    fn put(&self, pool: &Arc<Pool>, sender: http1::SendRequest<ProxyBody>) {
        let mut bindings = lock(&self.bindings);
        match bindings.iter_mut().find(|b| Arc::ptr_eq(&b.pool, pool)) {
            Some(binding) => binding.sender = Some(sender),
            None => bindings.push(Binding {
                pool: pool.clone(),
                sender: Some(sender),
            }),
        }
    }
}

impl Drop for Affinity {
    /// The client has gone: each bound connection that is free goes to its
    /// pool's idle set.
    fn drop(&mut self) {
        let bindings = std::mem::take(&mut *lock(&self.bindings));
        // Keeping one may take a task (waiting for its response's end);
        // outside a runtime (shutdown) the connections just close.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for binding in bindings {
            if let Some(sender) = binding.sender {
                binding.pool.keep_when_ready(sender);
            }
        }
    }
}

/// A connection lent out for one request.
pub(crate) struct Lease {
    /// The connection.
    pub(crate) sender: Sender,
    /// Whether it served requests before (and may have been closed by the upstream since).
    pub(crate) reused: bool,
}

struct IdleConnection {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
    home: Home,
}

impl IdleConnection {
    /// Still open, and idle for less than [`IDLE_TIMEOUT`].
    fn worth_keeping(&self) -> bool {
        !self.sender.is_closed() && self.since.elapsed() < IDLE_TIMEOUT
    }
}

/// The thread a connection's socket is registered with, when its runtime
/// runs on that one thread (a worker): such a connection is handed only to
/// clients of the same thread, or each of its requests and responses
/// would wake a task on another thread (measured: 0.88 × the req/s at 32
/// connections after a first round had filled the idle set). Connections
/// of a multi-threaded runtime, `None`, may go to any of its clients.
type Home = Option<std::thread::ThreadId>;

fn current_home() -> Home {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    (runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
        .then(|| std::thread::current().id())
}

/// Opens upstream connections and keeps those worth keeping.
pub struct Pool {
    /// Offers HTTP/1.1 only, for bound connections.
    http1_connector: HttpsConnector<Dialer>,
    /// Offers HTTP/2 and HTTP/1.1, for connections to share.
    shared_connector: HttpsConnector<Dialer>,
    /// `scheme://authority` of the upstream, what the connector dials.
    target: Uri,
    idle: Mutex<Vec<IdleConnection>>,
    multiplexed: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    /// What the upstream chose at the last connect that offered HTTP/2
    /// ([`UNKNOWN`], [`HTTP1`] or [`HTTP2`]).
    protocol: AtomicU8,
    connecting: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of connections to `target` (`scheme://authority`), made by
    /// `http1_connector` (which must offer HTTP/1.1 only) and
    /// `shared_connector` (which may offer HTTP/2 too).
    pub fn new(
        http1_connector: HttpsConnector<Dialer>,
        shared_connector: HttpsConnector<Dialer>,
        target: Uri,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            http1_connector,
            shared_connector,
            target,
            idle: Mutex::new(Vec::new()),
            multiplexed: Mutex::new(None),
            protocol: AtomicU8::new(UNKNOWN),
            connecting: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// A connection for one request. With an affinity (an HTTP/1 client):
    /// the bound one, else an idle one, else a new HTTP/1.1 one. Without (an
    /// HTTP/2 client's stream): the multiplexed one, else an idle one, else a
    /// new one, HTTP/2 if the upstream takes it.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        affinity: Option<&Affinity>,
    ) -> Result<Lease, ConnectError> {
        let reused = |sender| {
            Ok(Lease {
                sender,
                reused: true,
            })
        };
        if let Some(mut sender) = affinity.and_then(|a| a.take(self)) {
            // Ready again as soon as the previous response was read to the
            // end, which it has been: the client sent this request.
            if sender.ready().await.is_ok() {
                return reused(Sender::Http1(sender));
            }
        }
        if affinity.is_none() {
            if let Some(sender) = self.shared_http2() {
                return reused(Sender::Http2(sender));
            }
        }
        // An HTTP/2 client takes an idle HTTP/1 connection only from an
        // upstream known not to offer HTTP/2.
        let idle_will_do = affinity.is_some() || self.protocol.load(Ordering::Relaxed) == HTTP1;
        if let Some(sender) = idle_will_do.then(|| self.take_idle()).flatten() {
            return reused(Sender::Http1(sender));
        }
        let offer = if affinity.is_some() {
            Offer::Http1
        } else {
            Offer::Http2
        };
        // Boxed: the connect future is large, and every request's future would
        // carry (and move) its space although few requests connect.
        let sender = match Box::pin(self.connect(offer)).await? {
            Opened::Http2(sender) => Sender::Http2(sender),
            Opened::Http1(sender) => Sender::Http1(sender),
        };
        Ok(Lease {
            sender,
            reused: false,
        })
    }

    /// Gives the connection back once its request has its response headers:
    /// to the client connection it is bound to, or to the idle set when it is
    /// free again (after the response body has been read).
    pub(crate) fn checkin(self: &Arc<Self>, affinity: Option<&Affinity>, sender: Sender) {
        match (affinity, sender) {
            (_, Sender::Http2(_)) => {}
            (Some(affinity), Sender::Http1(sender)) => affinity.put(self, sender),
            (None, Sender::Http1(sender)) => self.keep_when_ready(sender),
        }
    }

    /// Keeps `sender` in the idle set once its response has been read to
    /// the end; a connection that closes instead is let go.
    fn keep_when_ready(self: &Arc<Self>, mut sender: http1::SendRequest<ProxyBody>) {
        if sender.is_ready() {
            return self.keep_idle(sender);
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.keep_idle(sender);
            }
        });
    }

    fn keep_idle(&self, sender: http1::SendRequest<ProxyBody>) {
        if !sender.is_ready() {
            return;
        }
        let home = current_home();
        let mut idle = lock(&self.idle);
        idle.retain(IdleConnection::worth_keeping);
        if idle.iter().filter(|c| c.home == home).count() < MAX_IDLE {
            idle.push(IdleConnection {
                sender,
                since: Instant::now(),
                home,
            });
        }
    }

    /// The most recently used idle connection of this thread's that is
    /// still open. Those found closed or expired on the way are let go.
    fn take_idle(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let home = current_home();
        let mut idle = lock(&self.idle);
        idle.retain(IdleConnection::worth_keeping);
        let newest = idle
            .iter()
            .rposition(|c| c.home == home && c.sender.is_ready())?;
        Some(idle.remove(newest).sender)
    }

    fn shared_http2(&self) -> Option<http2::SendRequest<ProxyBody>> {
        let mut multiplexed = lock(&self.multiplexed);
        match multiplexed.as_ref() {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                *multiplexed = None;
                None
            }
            None => None,
        }
    }

    /// Opens an HTTP/1.1 connection for one upgrade request; its task
    /// hands the connection over when the upstream switches protocols.
    pub(crate) async fn open_for_upgrade(
        &self,
    ) -> Result<http1::SendRequest<ProxyBody>, ConnectError> {
        let stream = self
            .http1_connector
            .clone()
            .call(self.target.clone())
            .await
            .map_err(ConnectError::Connect)?;
        self.metrics.count_upstream_connection();
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(connection.with_upgrades());
        Ok(sender)
    }

    /// Opens a connection offering `offer`. Connections offering HTTP/2 are
    /// opened one at a time until the upstream is known to speak HTTP/1
    /// only: with HTTP/2 the others wait to share the one being opened (a
    /// burst of first requests would otherwise open a connection each).
    async fn connect(&self, offer: Offer) -> Result<Opened, ConnectError> {
        let shared = matches!(offer, Offer::Http2);
        let _single_flight = if shared && self.protocol.load(Ordering::Relaxed) != HTTP1 {
            let guard = self.connecting.lock().await;
            if let Some(sender) = self.shared_http2() {
                return Ok(Opened::Http2(sender));
            }
            Some(guard)
        } else {
            None
        };
        let mut connector = match offer {
            Offer::Http1 => self.http1_connector.clone(),
            Offer::Http2 => self.shared_connector.clone(),
        };
        let stream = connector
            .call(self.target.clone())
            .await
            .map_err(ConnectError::Connect)?;
        self.metrics.count_upstream_connection();
        if stream.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(HTTP2_PING_INTERVAL)
                .handshake(stream)
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(connection);
            self.protocol.store(HTTP2, Ordering::Relaxed);
            *lock(&self.multiplexed) = Some(sender.clone());
            return Ok(Opened::Http2(sender));
        }
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(ConnectError::Handshake)?;
        if shared {
            self.protocol.store(HTTP1, Ordering::Relaxed);
        }
        tokio::spawn(connection);
        Ok(Opened::Http1(sender))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections only move handles around; a panic cannot leave them half-done.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http::uri::Scheme;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::sync::oneshot;

    use super::*;
    use crate::proxy::upstream::{ConnectOptions, Pools, UpstreamKey};
    use crate::server::Workers;

    /// An HTTP/1 upstream on loopback answering `200 ok`; counts the
    /// connections it accepts.
    async fn counting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, accepted)
    }

    /// One client connection's request, as the front door makes it.
    async fn one_client(pool: Arc<Pool>) {
        let affinity = Affinity::new();
        let Lease { mut sender, .. } = pool.checkout(Some(&affinity)).await.unwrap();
        let request = Request::builder()
            .uri("/")
            .header(http::header::HOST, "upstream")
            .body(ProxyBody::full(Bytes::new()))
            .unwrap();
        let Ok(response) = sender.send(request).await else {
            panic!("the upstream did not answer");
        };
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
        pool.checkin(Some(&affinity), sender);
    }

    #[tokio::test]
    async fn an_idle_connection_goes_only_to_clients_of_its_worker() {
        let (addr, accepted) = counting_upstream().await;
        let options = ConnectOptions {
            extra_roots_pem: None,
            connect_timeout: Duration::from_secs(5),
            connect_to: Arc::default(),
        };
        let pools = Pools::new(&options, Arc::new(Metrics::new())).unwrap();
        let pool = pools.pool(&UpstreamKey {
            scheme: Scheme::HTTP,
            authority: addr.to_string().parse().unwrap(),
        });
        let workers = Workers::start("pool-test", 2).unwrap();
        // Clients in turn on worker 0, worker 1, worker 0, worker 1: the
        // second opens a connection of its own although the first left one
        // idle; the third and fourth take those their workers left.
        for expected_connections in [1, 2, 2, 2] {
            let (done, finished) = oneshot::channel();
            let pool = pool.clone();
            workers.spawn(async move {
                one_client(pool).await;
                let _ = done.send(());
            });
            finished.await.unwrap();
            assert_eq!(accepted.load(Ordering::SeqCst), expected_connections);
        }
        workers.stop();
    }
}
