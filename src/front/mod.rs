//! The main listener's front door: who may come in (the client key), and
//! what kind of request this is. Origin-form requests go to their route's
//! upstream (reverse mode); with forward mode on, `CONNECT` opens a tunnel
//! (intercepted for inject hosts, see [`intercept`]; a byte [`tunnel`] or a
//! refusal for others) and absolute-form requests go to the host they name.

pub mod gate;
pub mod intercept;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use self::gate::ClientKey;
use self::intercept::Interceptor;
use crate::access::{AccessLog, Note};
use crate::config::{ForwardSettings, OtherHosts, Settings, UpstreamUrl};
use crate::metrics::ConnectOutcome;
use crate::outbound::ConnectTo;
use crate::proxy::body::ProxyBody;
use crate::proxy::error::ProxyError;
use crate::proxy::pool::Affinity;
use crate::proxy::upgrade;
use crate::proxy::upstream::{Pools, Upstream};
use crate::proxy::{refused_unrouted, ProxyService, Via};
use crate::server::{Accepting, Admission, Handler, Server};

/// The only port of an inject host the token goes to.
const HTTPS_PORT: u16 = 443;

/// State of one client connection to the main listener.
pub struct Client {
    affinity: Affinity,
    peer: SocketAddr,
    /// Its place under `--max-connections`, kept by its tunnels too.
    admission: Admission,
}

/// Forward mode's parts: which hosts get the token, the CA for them, and
/// how to reach hosts.
pub struct Forwarder {
    policy: ForwardSettings,
    interceptor: Arc<Interceptor>,
    pools: Arc<Pools>,
    connect_to: Arc<ConnectTo>,
    connect_timeout: Duration,
    upstream_timeout: Duration,
}

impl Forwarder {
    /// Forward mode as `settings` say, serving intercepted connections on
    /// `server` and reaching hosts through `pools` (or, for tunnels, by
    /// dialing as `--connect-to` says).
    pub fn new(
        settings: &Settings,
        proxy: Arc<ProxyService>,
        server: Arc<Server>,
        pools: Arc<Pools>,
    ) -> Result<Self, intercept::NoAuthority> {
        let policy = settings.forward.clone();
        let ca = policy.ca.clone().ok_or(intercept::NoAuthority)?;
        let access = AccessLog::new(settings.access_log);
        Ok(Self {
            policy,
            interceptor: Arc::new(Interceptor::new(proxy, ca, server, access)),
            pools,
            connect_to: settings.connect_to.clone(),
            connect_timeout: settings.connect_timeout,
            upstream_timeout: settings.upstream_timeout,
        })
    }

    /// `CONNECT host:port`: intercepted for an inject host on its HTTPS
    /// port, else tunnelled or refused as `--other-hosts` says.
    async fn connect(
        &self,
        request: Request<Incoming>,
        client: &Client,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let authority = request
            .uri()
            .authority()
            .cloned()
            .ok_or_else(|| ProxyError::BadRequest("CONNECT needs a host:port target".into()))?;
        let port = authority.port_u16().unwrap_or(443);
        let host = authority.host().to_ascii_lowercase();
        if port == HTTPS_PORT && self.policy.injects(&host) {
            let upstream = self.host_upstream(&host);
            let tunnel = intercept::Tunnel {
                peer: client.peer,
                admission: client.admission.clone(),
                proxy_user: gate::basic_user(request.headers()),
                host,
                port: HTTPS_PORT,
                upstream,
            };
            return Ok(self.interceptor.intercept(request, tunnel));
        }
        let metrics = self.interceptor.metrics();
        match self.policy.other_hosts {
            OtherHosts::Deny => {
                metrics.count_connect(ConnectOutcome::Denied);
                Err(ProxyError::HostNotAllowed(shown_host(&host)))
            }
            OtherHosts::Tunnel => {
                let stream = self
                    .connect_to
                    .dial(&host, port, self.connect_timeout)
                    .await
                    .map_err(|e| {
                        ProxyError::UpstreamUnreachable(format!(
                            "{}:{port}: {e}",
                            shown_host(&host)
                        ))
                    })?;
                metrics.count_connect(ConnectOutcome::Tunnelled);
                Ok(tunnel::open(
                    request,
                    stream,
                    client.peer,
                    client.admission.clone(),
                ))
            }
        }
    }

    /// An absolute-form request (`GET http://host/path`): to an inject host
    /// (on its default port) it goes over HTTPS with the token; to another
    /// host as `--other-hosts` says, never with the token.
    async fn absolute(
        &self,
        proxy: &ProxyService,
        affinity: &Affinity,
        request: Request<Incoming>,
        note: &mut Note,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let uri = request.uri();
        let authority = uri.authority().cloned().expect("checked by the caller");
        let host = authority.host().to_ascii_lowercase();
        // Plain http to port 80 means the host's HTTPS port.
        let default_port = matches!(
            (uri.scheme_str(), authority.port_u16()),
            (Some("http"), None | Some(80)) | (Some("https"), None | Some(HTTPS_PORT))
        );
        if default_port && self.policy.injects(&host) {
            let upstream = self.host_upstream(&host);
            let proxy_user = gate::basic_user(request.headers());
            let via = Via::Forward {
                upstream: &upstream,
                proxy_user: proxy_user.as_deref(),
            };
            return Ok(proxy.handle(affinity, request, via, note).await);
        }
        match self.policy.other_hosts {
            OtherHosts::Deny => Err(ProxyError::HostNotAllowed(shown_host(&host))),
            OtherHosts::Tunnel => {
                tunnel::forward_plain(
                    &self.connect_to,
                    self.connect_timeout,
                    request,
                    self.upstream_timeout,
                )
                .await
            }
        }
    }

    /// The upstream for an inject host: HTTPS, the pool shared with every
    /// route that names the same host (so there are as many pools as
    /// inject hosts, whatever clients ask for).
    fn host_upstream(&self, host: &str) -> Upstream {
        let authority =
            Authority::try_from(host).expect("a host from a parsed authority is an authority");
        Upstream::new(
            UpstreamUrl {
                scheme: Scheme::HTTPS,
                authority,
                base_path: String::new(),
            },
            &self.pools,
        )
    }
}

/// The main listener's handler.
pub struct FrontDoor {
    proxy: Arc<ProxyService>,
    /// Replaced by a reload.
    key: ArcSwapOption<ClientKey>,
    forward: Option<Forwarder>,
    access: AccessLog,
}

impl FrontDoor {
    /// A front door to `proxy`, demanding `key` when given, serving forward
    /// mode when `forward` is given, logging requests to `access`.
    pub fn new(
        proxy: Arc<ProxyService>,
        key: Option<ClientKey>,
        forward: Option<Forwarder>,
        access: AccessLog,
    ) -> Self {
        Self {
            proxy,
            key: ArcSwapOption::new(key.map(Arc::new)),
            forward,
            access,
        }
    }

    /// The key clients must present from now on (`None`: no key).
    pub fn set_key(&self, key: Option<ClientKey>) {
        self.key.store(key.map(Arc::new));
    }

    async fn answer(
        &self,
        client: &Client,
        mut request: Request<Incoming>,
        note: &mut Note,
    ) -> Response<ProxyBody> {
        upgrade::keep_place(&mut request, &client.admission);
        if self
            .key
            .load()
            .as_ref()
            .is_some_and(|key| !key.admits(request.headers()))
        {
            return self.refused(ProxyError::ProxyAuthRequired);
        }
        let forward = self.forward.as_ref();
        if request.method() == Method::CONNECT {
            let Some(forward) = forward else {
                return self.refused(ProxyError::BadRequest(
                    "CONNECT is served only in forward mode (--forward)".into(),
                ));
            };
            // Boxed, as is the absolute form below: every connection's task
            // carries room for its handler's future, and these are rare.
            return match Box::pin(forward.connect(request, client)).await {
                Ok(response) => {
                    self.proxy
                        .metrics()
                        .count_unrouted_response(response.status());
                    response
                }
                Err(error) => self.refused(error),
            };
        }
        match forward {
            Some(forward) if is_absolute_form(&request) => {
                let absolute = forward.absolute(&self.proxy, &client.affinity, request, note);
                match Box::pin(absolute).await {
                    Ok(response) => response,
                    Err(error) => self.refused(error),
                }
            }
            _ => {
                self.proxy
                    .handle(&client.affinity, request, Via::Reverse, note)
                    .await
            }
        }
    }

    /// A request answered by the proxy itself, counted and logged.
    fn refused(&self, error: ProxyError) -> Response<ProxyBody> {
        refused_unrouted(self.proxy.metrics(), error)
    }
}

/// An HTTP/1 request whose target names a host (`GET http://host/path`);
/// HTTP/2 requests always carry an authority, so they never count.
fn is_absolute_form(request: &Request<Incoming>) -> bool {
    request.version() < Version::HTTP_2 && request.uri().authority().is_some()
}

/// A client-given host as an error may echo it.
fn shown_host(host: &str) -> String {
    let printable = host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if printable {
        host.to_owned()
    } else {
        "(a host name that is not valid)".to_owned()
    }
}

impl Handler for FrontDoor {
    type Connection = Client;

    async fn handle(
        &self,
        connection: &Client,
        mut request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let pending = self.access.start(&mut request);
        let mut note = Note::default();
        let response = self.answer(connection, request, &mut note).await;
        self.access.finish(pending, response, note)
    }
}

impl Accepting for FrontDoor {
    fn open_connection(&self, peer: SocketAddr, admission: Admission) -> Client {
        Client {
            affinity: Affinity::new(),
            peer,
            admission,
        }
    }
}

/// A `200` to a `CONNECT`, after which the connection is the tunnel's.
fn connection_established() -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::OK;
    response
}
