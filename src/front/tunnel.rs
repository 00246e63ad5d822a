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

use crate::proxy::body::ProxyBody;
use crate::proxy::error::ProxyError;
use crate::proxy::headers;
use crate::proxy::pool::Affinity;
use crate::proxy::retry::AttemptError;
use crate::proxy::upgrade::pipe;
use crate::proxy::upstream::Upstream;
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

/// Sends an absolute-form request to `upstream` once, as the client made
/// it (its own `Authorization` included), less the headers addressed to
/// this hop; waits up to `within` for the answer.
pub async fn forward_plain(
    upstream: &Upstream,
    affinity: &Affinity,
    request: Request<Incoming>,
    within: Duration,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = request.into_parts();
    let mut outgoing = Request::new(ProxyBody::Stream(body));
    *outgoing.method_mut() = parts.method;
    *outgoing.uri_mut() = upstream.uri_for(&parts.uri)?;
    *outgoing.version_mut() = Version::HTTP_11;
    *outgoing.headers_mut() = headers::passed_on_request_headers(&parts.headers);
    match upstream.send(Some(affinity), outgoing, within).await {
        Ok((response, _)) => {
            let (mut parts, body) = response.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, ProxyBody::Stream(body)))
        }
        Err(AttemptError::NotSent(_)) => Err(ProxyError::UpstreamFailed(
            "the host closed the connection before taking the request".into(),
        )),
        Err(AttemptError::Unprocessed(reason)) => Err(ProxyError::UpstreamUnprocessed(reason)),
        Err(AttemptError::TimedOut) => Err(ProxyError::UpstreamTimeout(within)),
        Err(AttemptError::Fatal(error)) => Err(error),
    }
}
