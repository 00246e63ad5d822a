//! Upgrades (WebSocket, RFC 9110 §7.8): the handshake goes upstream like
//! any request, token and retry included, over an upstream connection of
//! its own; after `101` the bytes flow both ways until either side closes.

use http::header::{CONNECTION, UPGRADE};
use http::{request, response, HeaderMap, HeaderValue, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::ProxyBody;
use super::headers;
use crate::server::Admission;

/// A client's request to switch protocols.
pub struct Requested {
    protocol: HeaderValue,
    client: OnUpgrade,
    /// The client connection's place under the connection cap, kept by the
    /// piped connection once it outlives the HTTP one.
    admission: Option<Admission>,
}

/// The client's upgrade request, if `parts` make one: HTTP/1.1 with
/// `Upgrade` and `Connection: upgrade`. Its connection is then taken over
/// once the upstream agrees.
pub fn requested(parts: &mut request::Parts) -> Option<Requested> {
    if parts.version != Version::HTTP_11 || !headers::connection_lists(&parts.headers, "upgrade") {
        return None;
    }
    let protocol = parts.headers.get(UPGRADE)?.clone();
    let client = parts.extensions.remove::<OnUpgrade>()?;
    let admission = parts.extensions.remove::<Admission>();
    Some(Requested {
        protocol,
        client,
        admission,
    })
}

impl Requested {
    /// Puts the upgrade request back into headers that had hop-by-hop
    /// headers taken out.
    pub fn ask(&self, headers: &mut HeaderMap) {
        announce(headers, self.protocol.clone());
    }

    /// Joins the client's connection to the upstream's when `response` is
    /// `101`; any other answer goes to the client as it is.
    pub fn join(self, mut response: Response<ProxyBody>) -> Response<ProxyBody> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return response;
        }
        let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>() else {
            return super::error::ProxyError::UpstreamFailed(
                "the upstream switched protocols on a connection that cannot be taken over".into(),
            )
            .into_response();
        };
        tokio::spawn(async move {
            let _admission = self.admission;
            match tokio::try_join!(self.client, upstream) {
                Ok((client, upstream)) => pipe(TokioIo::new(client), TokioIo::new(upstream)).await,
                Err(error) => tracing::debug!(error = %error, "an upgrade did not complete"),
            }
        });
        response
    }
}

/// The protocol a `101` answer switches to.
pub fn switched_to(parts: &response::Parts) -> Option<HeaderValue> {
    (parts.status == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| parts.headers.get(UPGRADE).cloned())
        .flatten()
}

/// Sets `Connection: upgrade` and `Upgrade: protocol`.
pub fn announce(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// Copies bytes both ways between `a` and `b` until both sides have closed.
pub async fn pipe<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((sent, received)) => tracing::debug!(sent, received, "a piped connection closed"),
        Err(error) => tracing::debug!(error = %error, "a piped connection ended with an error"),
    }
}

/// Lets an upgrade of `request` keep the client connection's place under
/// the connection cap (see [`Requested`]); only upgrade requests carry it.
pub fn keep_place<B>(request: &mut http::Request<B>, admission: &Admission) {
    if request.headers().contains_key(UPGRADE) {
        request.extensions_mut().insert(admission.clone());
    }
}
