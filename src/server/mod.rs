//! Accepting connections and serving HTTP/1.1 and HTTP/2 on them, with a
//! cap on connections and a bounded graceful drain when shutdown is asked
//! for. Any byte stream can be served (a TCP socket, a TLS session, the
//! inside of a `CONNECT` tunnel), with hyper's upgrades on, through the same
//! path: first-bytes timeout, header timeout, connection state, drain.

pub mod deadline;
mod drain;
mod limit;
mod rewind;
mod workers;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use self::drain::Drain;
pub use self::limit::{Admission, ConnectionLimit};
pub use self::rewind::Rewind;
pub use self::workers::Workers;
use crate::metrics::Metrics;
use crate::proxy::body::ProxyBody;
use crate::shutdown::ShutdownSignal;

/// How long to pause accepting after an error such as running out of file descriptors.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// What an HTTP/2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    /// What the handler keeps for the life of one client connection.
    type Connection: Send + Sync + 'static;

    /// Answers one request arriving on `connection`; errors are answers too.
    fn handle(
        &self,
        connection: &Self::Connection,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send;
}

/// A handler for connections accepted from a listener, whose state starts
/// from the client's address.
pub trait Accepting: Handler {
    /// State for a client connection from `peer` that has just been
    /// accepted, holding its place under the connection cap.
    fn open_connection(&self, peer: SocketAddr, admission: Admission) -> Self::Connection;
}

/// A handler that answers each request at once from the request alone and
/// keeps nothing per connection (the admin listener, the login redirect).
pub trait Answer: Send + Sync + 'static {
    /// The answer to `request`.
    fn answer(&self, request: &Request<Incoming>) -> Response<ProxyBody>;
}

impl<A: Answer> Accepting for A {
    fn open_connection(&self, _peer: SocketAddr, _admission: Admission) {}
}

impl<A: Answer> Handler for A {
    type Connection = ();

    fn handle(
        &self,
        _connection: &(),
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        std::future::ready(self.answer(&request))
    }
}

/// Connection-level limits.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Upper bound for a client to send its request headers.
    pub header_read_timeout: Duration,
    /// Largest request head; larger ones get 431.
    pub max_header_bytes: usize,
    /// How long requests in flight may finish after shutdown is asked for.
    pub drain_timeout: Duration,
    /// Client connections served at once.
    pub max_connections: usize,
}

/// Serves any number of streams, each with its handler, and drains them
/// all at the end: the main listener's connections and the intercepted
/// connections inside its tunnels alike.
pub struct Server {
    name: &'static str,
    builders: Arc<Builders>,
    /// A stream offered after the drain has begun is not served.
    drain: Drain,
    options: ServerOptions,
    /// Where accepted connections are served; the current runtime when `None`.
    workers: Option<Arc<Workers>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server named `name` (for logs and metrics) holding connections to `options`.
    pub fn new(name: &'static str, options: ServerOptions) -> Self {
        Self {
            name,
            builders: Arc::new(Builders::new(&options)),
            drain: Drain::new(),
            options,
            workers: None,
        }
    }

    /// The same server, serving the connections its listener accepts on `workers`.
    pub fn on_workers(self, workers: Arc<Workers>) -> Self {
        Self {
            workers: Some(workers),
            ..self
        }
    }

    /// The limits connections are held to.
    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    /// Serving one client connection on `stream`, whatever it is, with
    /// `handler` and the connection's state `connection`, until it ends or
    /// the drain closes it. Spawn the future it gives.
    pub fn serve_stream<H, S>(
        &self,
        handler: Arc<H>,
        connection: H::Connection,
        stream: S,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        H: Handler,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let builders = self.builders.clone();
        let watch = self.drain.watch();
        let first_bytes_timeout = self.options.header_read_timeout;
        async move {
            let Some(watch) = watch else {
                tracing::debug!(%peer, "not serving a connection offered during the drain");
                return;
            };
            let Some((prefix, stream)) = first_bytes(stream, first_bytes_timeout).await else {
                tracing::debug!(%peer, "closing a connection that sent no request in time");
                return;
            };
            let state = Arc::new(connection);
            let service = hyper::service::service_fn(move |request| {
                let handler = handler.clone();
                let state = state.clone();
                async move { Ok::<_, Infallible>(handler.handle(&state, request).await) }
            });
            // The first bytes have told the versions apart already.
            let http2 = prefix == H2_PREFACE;
            let io = TokioIo::new(Rewind::new(prefix, stream));
            let result = if http2 {
                let connection = builders.http2.serve_connection(io, service);
                watch
                    .serve(connection, http2::Connection::graceful_shutdown)
                    .await
            } else {
                let connection = builders.http1.serve_connection(io, service).with_upgrades();
                watch
                    .serve(connection, http1::UpgradeableConnection::graceful_shutdown)
                    .await
            };
            if let Err(error) = result {
                tracing::debug!(%peer, error = %error, "client connection ended with an error");
            }
        }
    }

    /// Runs `serve(stream)` in a task: on the next worker when there are
    /// workers, the stream then moved to that worker's runtime (a socket is
    /// watched by the runtime it is registered with).
    fn spawn_with<F, T>(&self, stream: TcpStream, peer: SocketAddr, serve: F)
    where
        F: FnOnce(TcpStream) -> T + Send + 'static,
        T: Future<Output = ()> + Send + 'static,
    {
        let Some(workers) = &self.workers else {
            drop(tokio::spawn(serve(stream)));
            return;
        };
        let name = self.name;
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(listener = name, %peer, error = %error, "cannot hand a connection to a worker");
                return;
            }
        };
        workers.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => {
                    tracing::debug!(listener = name, %peer, error = %error, "a worker cannot take a connection");
                }
            }
        });
    }

    /// Tells every connection to close after its request in flight, and
    /// waits up to the drain timeout for them.
    pub async fn drain(&self) {
        let (name, timeout) = (self.name, self.options.drain_timeout);
        let Some(count) = self.drain.begin() else {
            return;
        };
        if count > 0 {
            tracing::info!(
                listener = name,
                connections = count,
                "waiting for requests in flight"
            );
        }
        match tokio::time::timeout(timeout, self.drain.closed()).await {
            Ok(()) => tracing::debug!(listener = name, "all connections closed"),
            Err(_) => tracing::warn!(
                listener = name,
                timeout = %humantime::format_duration(timeout),
                "drain timeout reached; closing the connections still open"
            ),
        }
    }
}

/// Serves `handler` on `listener` (through TLS when `tls` is given) until
/// `shutdown` fires, then drains `server`. Connections beyond the cap are
/// closed at once and counted in `metrics`.
pub async fn serve<H>(
    listener: TcpListener,
    server: Arc<Server>,
    handler: Arc<H>,
    tls: Option<TlsAcceptor>,
    metrics: Arc<Metrics>,
    mut shutdown: ShutdownSignal,
) where
    H: Accepting,
{
    let name = server.name;
    let mut limit = ConnectionLimit::new(name, server.options.max_connections, metrics);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(admission) = limit.admit() else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let connection = handler.open_connection(peer, admission);
                    spawn_connection(&server, &handler, connection, tls.as_ref(), stream, peer);
                }
                Err(error) => {
                    tracing::warn!(listener = name, error = %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            () = shutdown.wait() => break,
        }
    }
    drop(listener);
    server.drain().await;
}

/// Serves one accepted connection in a task of its own: through TLS when
/// `tls` is given. Plain connections get a task of their own kind, so that
/// they do not carry the room a TLS session needs.
fn spawn_connection<H: Accepting>(
    server: &Arc<Server>,
    handler: &Arc<H>,
    connection: H::Connection,
    tls: Option<&TlsAcceptor>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let handler = handler.clone();
    match tls {
        None => {
            let serving = server.clone();
            server.spawn_with(stream, peer, move |stream| {
                serving.serve_stream(handler, connection, stream, peer)
            });
        }
        Some(acceptor) => {
            let (serving, acceptor) = (server.clone(), acceptor.clone());
            server.spawn_with(stream, peer, move |stream| {
                serve_tls(serving, handler, connection, acceptor, stream, peer)
            });
        }
    }
}

/// The TLS handshake (bounded by the header timeout, as a slow client's
/// request head is), then HTTP on the session.
async fn serve_tls<H: Handler>(
    server: Arc<Server>,
    handler: Arc<H>,
    connection: H::Connection,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let name = server.name;
    match tokio::time::timeout(server.options.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => server.serve_stream(handler, connection, tls, peer).await,
        Ok(Err(error)) => {
            tracing::debug!(listener = name, %peer, error = %error, "TLS handshake with a client failed");
        }
        Err(_) => tracing::debug!(listener = name, %peer, "TLS handshake with a client timed out"),
    }
}

/// Reads, up to `timeout`, until the client has sent enough to tell HTTP/1
/// from the HTTP/2 preface, and gives those bytes back to be replayed.
/// hyper's header read timeout starts only after that, so without this a
/// client that connects and sends nothing (or a few bytes of the preface)
/// would hold its connection forever.
async fn first_bytes<S: AsyncRead + Unpin>(mut stream: S, timeout: Duration) -> Option<(Bytes, S)> {
    let mut buffer = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    let detect = async {
        loop {
            match stream.read(&mut buffer[filled..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => filled += n,
            }
            if filled == H2_PREFACE.len() || buffer[..filled] != H2_PREFACE[..filled] {
                return true;
            }
        }
    };
    let known = tokio::time::timeout(timeout, detect).await.unwrap_or(false);
    known.then(|| (Bytes::copy_from_slice(&buffer[..filled]), stream))
}

/// hyper's HTTP/1 and HTTP/2 connection settings, one of which serves
/// each connection.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(options: &ServerOptions) -> Self {
        let timer = deadline::Timer::for_timeouts_of(options.header_read_timeout);
        let mut http1 = http1::Builder::new();
        http1
            .timer(timer)
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(options.max_header_bytes);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(timer)
            .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
        Self { http1, http2 }
    }
}
