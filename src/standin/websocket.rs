//! The stand-in's WebSocket echo (RFC 6455), at `/ws/echo`: what GoTo
//! Connect's notification channel looks like to a proxy. Every message
//! comes back as it was sent; the handshake's `101` says whether it carried
//! a valid token (`x-token-number`), so tests see what the proxy added.

use base64::Engine;
use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::json;
use crate::proxy::body::ProxyBody;

/// The GUID a server appends to the client's key (RFC 6455 §4.2.2).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The largest message echoed; the stand-in is for tests.
const MAX_PAYLOAD: u64 = 1024 * 1024;

/// Answers the handshake and echoes on the upgraded connection.
pub(super) fn accept(
    mut request: Request<Incoming>,
    token_number: Option<u64>,
) -> Response<ProxyBody> {
    let Some(key) = request.headers().get(SEC_WEBSOCKET_KEY).cloned() else {
        return json(
            400,
            &serde_json::json!({"error": "not a WebSocket handshake"}),
        );
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let _ = echo(TokioIo::new(upgraded)).await;
        }
    });
    let mut response = Response::new(ProxyBody::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept_key(key.as_bytes())).expect("base64 is a header value"),
    );
    if let Some(number) = token_number {
        headers.insert("x-token-number", HeaderValue::from(number));
    }
    response
}

fn accept_key(key: &[u8]) -> String {
    let mut input = key.to_vec();
    input.extend_from_slice(GUID.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Echoes frames until the client closes: data frames come back with the
/// same opcode, pings get pongs, a close is answered and ends it.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await?;
        let (fin, opcode, masked) = (head[0] & 0x80, head[0] & 0x0f, head[1] & 0x80 != 0);
        let length = match head[1] & 0x7f {
            126 => u64::from(stream.read_u16().await?),
            127 => stream.read_u64().await?,
            short => u64::from(short),
        };
        if length > MAX_PAYLOAD || !masked {
            return Ok(());
        }
        let mut mask = [0u8; 4];
        stream.read_exact(&mut mask).await?;
        let mut payload = vec![0u8; length as usize];
        stream.read_exact(&mut payload).await?;
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
        let reply_opcode = match opcode {
            0x9 => 0xA,
            0xA => continue,
            other => other,
        };
        write_frame(&mut stream, fin | reply_opcode, &payload).await?;
        if opcode == 0x8 {
            return stream.shutdown().await;
        }
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    first: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut frame = vec![first];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    stream.write_all(&frame).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_accept_key_is_rfc_6455s() {
        // The example of RFC 6455 §1.3.
        assert_eq!(
            super::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
