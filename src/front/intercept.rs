//! Interception: a `CONNECT` to an inject host is answered `200`, the
//! client's TLS is terminated with a leaf certificate for that host minted
//! by the local CA, and every request inside goes through the same request
//! path as reverse mode to the real host, with the token. The CONNECT
//! authority, the SNI and each request's `Host` must name the same host:
//! a differing SNI ends the handshake, a differing `Host` gets 421.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HOST;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::LazyConfigAcceptor;

use crate::access::{AccessLog, Note};
use crate::ca::CertificateAuthority;
use crate::metrics::{ConnectOutcome, Metrics};
use crate::proxy::body::ProxyBody;
use crate::proxy::error::ProxyError;
use crate::proxy::pool::Affinity;
use crate::proxy::upgrade;
use crate::proxy::upstream::Upstream;
use crate::proxy::{refused_unrouted, ProxyService, Via};
use crate::server::{Admission, Handler, Server};

/// Forward mode was asked for without its CA.
#[derive(Debug, thiserror::Error)]
#[error("forward mode needs its CA (--ca-cert-file, --ca-key-file); run `goto-auth-proxy ca init`")]
pub struct NoAuthority;

/// Serves the inside of intercepted tunnels.
pub struct Interceptor {
    proxy: Arc<ProxyService>,
    ca: Arc<CertificateAuthority>,
    server: Arc<Server>,
    access: AccessLog,
}

/// A `CONNECT` to an inject host, about to be intercepted.
pub struct Tunnel {
    /// The client.
    pub peer: SocketAddr,
    /// The client connection's place under the connection cap.
    pub admission: Admission,
    /// The `CONNECT`'s `Proxy-Authorization: Basic` user name, which may
    /// name the account of every request in the tunnel.
    pub proxy_user: Option<String>,
    /// The host the `CONNECT` named (lower case).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Where the tunnel's requests go.
    pub upstream: Upstream,
}

/// One intercepted tunnel being served: the host its CONNECT named, and
/// where its requests go.
pub struct Intercepted {
    affinity: Affinity,
    host: String,
    port: u16,
    upstream: Upstream,
    proxy_user: Option<String>,
    /// Held while the tunnel is served, and by a WebSocket inside it.
    admission: Admission,
}

impl Interceptor {
    /// Intercepts for `proxy` with certificates from `ca`, serving the
    /// tunnels on `server` (so the drain covers them) and logging their
    /// requests to `access`.
    pub fn new(
        proxy: Arc<ProxyService>,
        ca: Arc<CertificateAuthority>,
        server: Arc<Server>,
        access: AccessLog,
    ) -> Self {
        Self {
            proxy,
            ca,
            server,
            access,
        }
    }

    /// The metrics intercepted requests are counted in.
    pub fn metrics(&self) -> &Metrics {
        self.proxy.metrics()
    }

    /// Answers the `CONNECT` and, once the client has the connection to
    /// itself, serves the tunnel's TLS and the requests inside it.
    pub fn intercept(
        self: &Arc<Self>,
        mut request: Request<Incoming>,
        tunnel: Tunnel,
    ) -> Response<ProxyBody> {
        let upgrade = hyper::upgrade::on(&mut request);
        let interceptor = self.clone();
        let peer = tunnel.peer;
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let tunnel = Intercepted {
                        affinity: Affinity::new(),
                        host: tunnel.host,
                        port: tunnel.port,
                        upstream: tunnel.upstream,
                        proxy_user: tunnel.proxy_user,
                        admission: tunnel.admission,
                    };
                    interceptor
                        .serve(TokioIo::new(upgraded), peer, tunnel)
                        .await;
                }
                Err(error) => {
                    tracing::debug!(%peer, error = %error, "a CONNECT tunnel did not open")
                }
            }
        });
        super::connection_established()
    }

    /// The TLS handshake with the client (the SNI checked against the
    /// CONNECT host), then HTTP on the decrypted stream.
    async fn serve<S>(self: Arc<Self>, stream: S, peer: SocketAddr, tunnel: Intercepted)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = self.server.options().header_read_timeout;
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(sni) = start.client_hello().server_name() {
                if !sni.eq_ignore_ascii_case(&tunnel.host) {
                    return Err(format!(
                        "the TLS server name {sni:?} is not the CONNECT host {}",
                        tunnel.host
                    ));
                }
            }
            let config = self
                .ca
                .server_config(&tunnel.host)
                .map_err(|e| e.to_string())?;
            start.into_stream(config).await.map_err(|e| e.to_string())
        };
        let metrics = self.proxy.metrics();
        let tls = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(tls)) => {
                metrics.count_connect(ConnectOutcome::Intercepted);
                tls
            }
            Ok(Err(reason)) => {
                metrics.count_connect(ConnectOutcome::HandshakeRefused);
                tracing::warn!(%peer, host = %tunnel.host, %reason, "refused the TLS handshake of an intercepted tunnel");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, host = %tunnel.host, "the TLS handshake of an intercepted tunnel timed out");
                return;
            }
        };
        tracing::debug!(%peer, host = %tunnel.host, "intercepting a tunnel");
        let server = self.server.clone();
        server.serve_stream(self, tunnel, tls, peer).await;
    }

    async fn answer(
        &self,
        tunnel: &Intercepted,
        mut request: Request<Incoming>,
        note: &mut Note,
    ) -> Response<ProxyBody> {
        upgrade::keep_place(&mut request, &tunnel.admission);
        let checked = if request.method() == http::Method::CONNECT {
            Err(ProxyError::BadRequest(
                "a CONNECT inside a tunnel is not served".into(),
            ))
        } else {
            names_tunnel_host(&request, tunnel)
        };
        if let Err(error) = checked {
            return refused_unrouted(self.proxy.metrics(), error);
        }
        self.proxy
            .handle(
                &tunnel.affinity,
                request,
                Via::Forward {
                    upstream: &tunnel.upstream,
                    proxy_user: tunnel.proxy_user.as_deref(),
                },
                note,
            )
            .await
    }
}

/// Whether the request's `Host` (or HTTP/2 `:authority`) names the host
/// and port the tunnel was opened for.
fn names_tunnel_host(request: &Request<Incoming>, tunnel: &Intercepted) -> Result<(), ProxyError> {
    let named = match request.uri().authority() {
        Some(authority) => Some(authority.as_str().to_owned()),
        None => request
            .headers()
            .get(HOST)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
    };
    let matches = named
        .as_deref()
        .and_then(|named| http::uri::Authority::try_from(named).ok())
        .is_some_and(|authority| {
            authority.host().eq_ignore_ascii_case(&tunnel.host)
                && authority.port_u16().is_none_or(|port| port == tunnel.port)
        });
    if matches {
        Ok(())
    } else {
        Err(ProxyError::Misdirected(format!(
            "this tunnel was opened for {}:{}, and the request names another host; \
             open a tunnel to the host you mean",
            tunnel.host, tunnel.port
        )))
    }
}

impl Handler for Interceptor {
    type Connection = Intercepted;

    async fn handle(
        &self,
        connection: &Intercepted,
        mut request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let pending = self.access.start(&mut request);
        let mut note = Note::default();
        let response = self.answer(connection, request, &mut note).await;
        self.access.finish(pending, response, note)
    }
}
