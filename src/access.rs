//! The access log: one structured line per request, written when its
//! response has been sent (or abandoned). Each request has an id: the
//! client's `X-Request-Id` when it sends a usable one, else one made here;
//! it goes upstream and back to the client. The line never holds a token,
//! a header value or the query (which may carry personal data).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Method, Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::proxy::body::ProxyBody;

/// The header that carries the request id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The longest client-given request id kept; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;
/// The `tracing` target of access lines, to filter them (`RUST_LOG=access=off`).
pub const TARGET: &str = "access";

/// What the request path learnt of a request, for its access line, filled
/// in by the proxy as the request goes.
#[derive(Clone, Debug, Default)]
pub struct Note {
    /// The account that served it.
    pub account: Option<Arc<str>>,
    /// Time spent waiting for upstream's response headers, every send included.
    pub upstream: Duration,
    /// Whether it was sent more than once.
    pub retried: bool,
    /// How long rate shaping held it back.
    pub rate_delayed: Duration,
    /// Its body's size, when the proxy read it whole.
    pub bytes_in: Option<u64>,
}

/// Whether requests are logged.
#[derive(Clone, Copy, Debug)]
pub struct AccessLog {
    enabled: bool,
}

/// A request on its way, as its access line will tell it. Dropped before
/// an answer (the client went away while it waited), it writes the line
/// itself: status 499, as nginx logs a client that closed first.
pub struct Pending {
    request_id: HeaderValue,
    /// What the line will say of the request, while the line is still to
    /// be written: by this value, should the client leave first, else by
    /// the [`Line`] it becomes. `None` when no line is recorded.
    request: Option<Begun>,
}

/// A request as its access line tells it.
struct Begun {
    method: Method,
    /// The request's URI, kept whole (a clone shares its bytes) so that
    /// the path is cut out only when a line is written.
    uri: http::Uri,
    declared_length: Option<u64>,
    started: Instant,
}

impl Begun {
    /// What the line calls the path: a `CONNECT`'s authority, else the
    /// path without the query.
    fn path(&self) -> &str {
        if self.method == Method::CONNECT {
            self.uri.authority().map_or("", |a| a.as_str())
        } else {
            self.uri.path()
        }
    }
}

/// The status logged for a request whose client left before its answer.
const CLIENT_CLOSED: u16 = 499;

impl AccessLog {
    /// An access log that writes lines when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }

    /// Gives `request` its id (the client's, or a new one, in its
    /// `X-Request-Id`) and notes what the line will need.
    pub fn start(&self, request: &mut Request<Incoming>) -> Pending {
        let request_id = match request.headers().get(REQUEST_ID) {
            Some(given) if usable_id(given) => given.clone(),
            _ => {
                let made = new_id();
                request.headers_mut().insert(REQUEST_ID, made.clone());
                made
            }
        };
        let begun = (self.enabled && recorded()).then(|| Begun {
            method: request.method().clone(),
            uri: request.uri().clone(),
            declared_length: request
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok()),
            started: Instant::now(),
        });
        Pending {
            request_id,
            request: begun,
        }
    }

    /// Returns the request id to the client, and arranges for the line to
    /// be written once the response body has been sent or dropped.
    pub fn finish(
        &self,
        mut pending: Pending,
        mut response: Response<ProxyBody>,
        note: Note,
    ) -> Response<ProxyBody> {
        response
            .headers_mut()
            .insert(REQUEST_ID, pending.request_id.clone());
        // From here the line is the `Line`'s to write, not the `Pending`'s.
        let Some(request) = pending.request.take() else {
            return response;
        };
        let line = Line {
            status: response.status().as_u16(),
            request_id: pending.request_id.clone(),
            request,
            note,
            bytes_out: 0,
            complete: false,
        };
        response.map(|body| ProxyBody::Logged(Box::new(Logged { body, line })))
    }
}

/// A response body that counts what it sends and writes the access line
/// when it is done with.
#[derive(Debug)]
pub struct Logged {
    /// The body itself.
    pub body: ProxyBody,
    line: Line,
}

impl Logged {
    /// Counts `bytes` more sent.
    pub fn sent(&mut self, bytes: usize) {
        self.line.bytes_out += bytes as u64;
    }

    /// Marks the body as sent to the end.
    pub fn ended(&mut self) {
        self.line.complete = true;
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // hyper does not poll a body that says it has ended (an empty one).
        if self.body.is_end_stream() {
            self.line.complete = true;
        }
    }
}

#[derive(Debug)]
struct Line {
    status: u16,
    request_id: HeaderValue,
    request: Begun,
    note: Note,
    bytes_out: u64,
    complete: bool,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Begun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Begun")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        write_line(
            &self.request_id,
            &self.request,
            self.status,
            &self.note,
            self.bytes_out,
            self.complete,
        );
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(request) = &self.request {
            write_line(
                &self.request_id,
                request,
                CLIENT_CLOSED,
                &Note::default(),
                0,
                false,
            );
        }
    }
}

fn write_line(
    request_id: &HeaderValue,
    request: &Begun,
    status: u16,
    note: &Note,
    bytes_out: u64,
    complete: bool,
) {
    let millis = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let bytes_in = note.bytes_in.or(request.declared_length);
    tracing::info!(
        target: TARGET,
        request_id = request_id.to_str().unwrap_or_default(),
        account = note.account.as_deref().unwrap_or_default(),
        method = %request.method,
        path = request.path(),
        status,
        duration_ms = millis(request.started.elapsed()),
        upstream_ms = millis(note.upstream),
        retried = note.retried,
        rate_delayed_ms = millis(note.rate_delayed),
        bytes_in,
        bytes_out,
        complete,
        "request"
    );
}

/// Whether the subscriber records access lines at all: with `RUST_LOG=warn`
/// or `access=off` a request costs no line's bookkeeping (a boxed body
/// counting bytes).
fn recorded() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// Whether a client-given request id can be passed on and logged as it is.
fn usable_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// A new request id: 16 random hex digits (written by hand: this runs for
/// every request, and the formatting machinery costs several times more).
fn new_id() -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let random = fastrand::u64(..);
    let mut id = [0u8; 16];
    for (index, digit) in id.iter_mut().enumerate() {
        *digit = DIGITS[(random >> (60 - 4 * index)) as usize & 0xf];
    }
    HeaderValue::from_bytes(&id).expect("hex is a header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_short_ids_are_kept() {
        assert!(usable_id(&HeaderValue::from_static("abc-123_x.y")));
        assert!(!usable_id(&HeaderValue::from_static("")));
        assert!(!usable_id(&HeaderValue::from_static("has space")));
        let long = "x".repeat(MAX_REQUEST_ID + 1);
        assert!(!usable_id(&HeaderValue::from_str(&long).unwrap()));
        assert_eq!(new_id().len(), 16);
        assert!(new_id().as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(new_id(), new_id());
    }
}
