//! Forward mode for hosts that are not inject hosts (with `--other-hosts
//! tunnel`): a `CONNECT` becomes a byte tunnel (end-to-end TLS between the
//! client and the host), and an absolute-form request is forwarded as it
//! is. Neither ever carries the token.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::outbound::ConnectTo;
use crate::proxy::body::ProxyBody;
use crate::proxy::error::{chain, ProxyError};
use crate::proxy::headers;
use crate::proxy::upgrade::pipe;
use crate::server::Admission;

/// Answers the `CONNECT` and, once the client has the connection to
/// itself, copies bytes between it and `stream` until both close, holding
/// the client connection's `admission` meanwhile.
pub fn open(
    mut request: Request<Incoming>,
    stream: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) -> Response<ProxyBody> {
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _admission = admission;
        match upgrade.await {
            Ok(upgraded) => pipe(TokioIo::new(upgraded), stream).await,
            Err(error) => tracing::debug!(%peer, error = %error, "a CONNECT tunnel did not open"),
        }
    });
    super::connection_established()
}

/// Sends an absolute-form `http://` request to the host it names, once,
/// as the client made it (its own `Authorization` included), less the
/// headers addressed to this hop, over a connection of its own (other
/// hosts get no pool: clients may name any number of them); waits up to
/// `within` for the answer.
pub async fn forward_plain(
    connect_to: &ConnectTo,
    connect_timeout: Duration,
    request: Request<Incoming>,
    within: Duration,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .cloned()
        .ok_or_else(|| ProxyError::BadRequest("the request names no host".into()))?;
    if parts.uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return Err(ProxyError::BadRequest(
            "only http:// requests are passed on as they are; send https:// ones through CONNECT"
                .into(),
        ));
    }
    let port = authority.port_u16().unwrap_or(80);
    let stream = connect_to
        .dial(authority.host(), port, connect_timeout)
        .await
        .map_err(|e| ProxyError::UpstreamUnreachable(format!("{authority}: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::UpstreamFailed(chain(&e)))?;
    tokio::spawn(connection);
    let mut outgoing = Request::new(ProxyBody::Stream(body));
    *outgoing.method_mut() = parts.method;
    *outgoing.uri_mut() = parts.uri.path_and_query().map_or_else(
        || http::Uri::from_static("/"),
        |p| http::Uri::from(p.clone()),
    );
    *outgoing.version_mut() = Version::HTTP_11;
    let mut headers = headers::passed_on_request_headers(&parts.headers);
    headers.insert(
        http::header::HOST,
        http::HeaderValue::from_str(authority.as_str())
            .map_err(|_| ProxyError::BadRequest("the host is not valid".into()))?,
    );
    *outgoing.headers_mut() = headers;
    let response = tokio::time::timeout(within, sender.send_request(outgoing))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(within))?
        .map_err(|e| ProxyError::UpstreamFailed(chain(&e)))?;
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, ProxyBody::Stream(body)))
}
