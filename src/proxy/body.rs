//! Bodies that cross the proxy: streamed as they come, or kept in memory when
//! a request may have to be sent twice (a retry after a 401).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The body type of every request and response the proxy handles.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A body held in memory; taken on the first poll.
    Full(Option<Bytes>),
    /// A body streamed from a peer.
    Stream(Incoming),
    /// Chunks already read from a peer, then the rest of its stream.
    Prefixed {
        prefix: VecDeque<Bytes>,
        rest: Incoming,
    },
    /// Chunks fed by a task as they are made (the stand-in's slow answers).
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
    /// A response body on its way to the client, counted for the access log.
    Logged(Box<crate::access::Logged>),
}

impl ProxyBody {
    /// A body of `bytes` (empty bytes make an empty body).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Self::Empty
        } else {
            Self::Full(Some(bytes))
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(incoming) => Pin::new(incoming).poll_frame(cx),
            ProxyBody::Prefixed { prefix, rest } => match prefix.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Pin::new(rest).poll_frame(cx),
            },
            ProxyBody::Channel(receiver) => receiver
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c)))),
            ProxyBody::Logged(logged) => {
                let polled = Pin::new(&mut logged.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            logged.sent(data.len());
                        }
                    }
                    Poll::Ready(None) => logged.ended(),
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Stream(incoming) => incoming.is_end_stream(),
            ProxyBody::Prefixed { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
            ProxyBody::Channel(_) => false,
            ProxyBody::Logged(logged) => logged.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream(incoming) => incoming.size_hint(),
            ProxyBody::Prefixed { prefix, rest } => {
                let held: u64 = prefix.iter().map(|c| c.len() as u64).sum();
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + held);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + held);
                }
                hint
            }
            ProxyBody::Channel(_) => SizeHint::new(),
            ProxyBody::Logged(logged) => logged.body.size_hint(),
        }
    }
}

/// A response with `status`, a `Content-Type` and a body held in memory.
pub fn response(
    status: http::StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> http::Response<ProxyBody> {
    let mut response = http::Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// A body read into memory as far as a limit allows.
#[derive(Debug)]
pub enum Held {
    /// The whole body fit: it can be looked into, and sent again.
    Whole(Bytes),
    /// The body is larger than the limit (or announced it would be): what was
    /// read is replayed ahead of the rest of the stream, and no copy is kept.
    TooLarge(ProxyBody),
}

/// Reads up to `limit` bytes of `body`. Used to keep a request body for a retry
/// after a 401, and to look into a 403 for GoToWebinar's InvalidToken. Trailers
/// of a whole body are dropped.
pub async fn read_up_to(mut body: Incoming, limit: usize) -> Result<Held, hyper::Error> {
    if body.is_end_stream() {
        return Ok(Held::Whole(Bytes::new()));
    }
    if body.size_hint().lower() > limit as u64 {
        return Ok(Held::TooLarge(ProxyBody::Stream(body)));
    }
    let mut chunks = VecDeque::new();
    let mut held = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        held += data.len();
        chunks.push_back(data);
        if held > limit {
            return Ok(Held::TooLarge(ProxyBody::Prefixed {
                prefix: chunks,
                rest: body,
            }));
        }
    }
    Ok(Held::Whole(concat(chunks, held)))
}

fn concat(mut chunks: VecDeque<Bytes>, total: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop_front().unwrap_or_default();
    }
    let mut joined = BytesMut::with_capacity(total);
    for chunk in chunks {
        joined.extend_from_slice(&chunk);
    }
    joined.freeze()
}
