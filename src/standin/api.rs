//! The stand-in's API: checks the bearer token as GoTo would, then echoes
//! what it received, streams bytes, or waits, depending on the path.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{header, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{json, lock, RecordedRequest, Shared, RECORDED_MAX};
use crate::proxy::body::ProxyBody;

pub(super) async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<ProxyBody> {
    record(shared, &request);
    if let Some(response) = throttled(shared) {
        return response;
    }
    let path = request.uri().path().to_owned();
    // A slow answer, whose token is judged when it is given (as by a gateway).
    if let Some(millis) = path
        .strip_prefix("/sleep/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    if path == "/ws/echo" {
        // Served whatever the token, so a tunnel's handshake (no token) is seen too.
        let token_number = valid_token_number(shared, request.headers());
        return super::websocket::accept(request, token_number);
    }
    let Some(token_number) = valid_token_number(shared, request.headers()) else {
        shared.counters.api_refusals.fetch_add(1, Ordering::SeqCst);
        // Read the body before refusing, as GoTo's API does: answering early
        // and closing would reset a client still sending.
        let _ = request.into_body().collect().await;
        // GoToWebinar answers a bad token with 403 and its own error code.
        return if path.starts_with("/G2W/") {
            json(
                403,
                &serde_json::json!({"int_err_code": "InvalidToken", "msg": "Invalid token passed"}),
            )
        } else {
            json(
                401,
                &serde_json::json!({"error": "invalid_token", "error_description": "The access token is invalid"}),
            )
        };
    };
    if path == "/rate-limited" {
        let mut response = json(429, &serde_json::json!({"error": "too_many_requests"}));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("7"));
        return response;
    }
    if path == "/forbidden" {
        return json(
            403,
            &serde_json::json!({"int_err_code": "Forbidden", "msg": "Not allowed"}),
        );
    }
    if path == "/upload" {
        // Streams the request body straight back.
        let mut response = Response::new(ProxyBody::Stream(request.into_body()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/octet-stream"),
        );
        return response;
    }
    if let Some(count) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        return bytes_response(count);
    }
    echo(request, token_number).await
}

fn record(shared: &Shared, request: &Request<Incoming>) {
    let mut state = lock(shared);
    if state.recorded.len() == RECORDED_MAX {
        state.recorded.pop_front();
    }
    state.recorded.push_back(RecordedRequest {
        method: request.method().clone(),
        path_and_query: request
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: request.headers().clone(),
        received_at: Instant::now(),
    });
}

/// A 429 if the API was told to throttle this request.
fn throttled(shared: &Shared) -> Option<Response<ProxyBody>> {
    let mut state = lock(shared);
    let (left, retry_after) = state.throttle.as_mut()?;
    if *left == 0 {
        return None;
    }
    *left -= 1;
    let mut response = json(429, &serde_json::json!({"error": "too_many_requests"}));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from(*seconds));
    }
    Some(response)
}

/// The number of the access token in `Authorization`, if it is valid now.
fn valid_token_number(shared: &Shared, headers: &http::HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let token = value.to_str().ok()?.strip_prefix("Bearer ")?;
    let state = lock(shared);
    if state.refuse_all {
        return None;
    }
    let issued = state.issued.get(token)?;
    (!issued.revoked && issued.expires_at > Instant::now()).then_some(issued.number)
}

/// `count` bytes of a repeating pattern (byte `i` is `i % 251`).
fn bytes_response(count: usize) -> Response<ProxyBody> {
    let body: Vec<u8> = (0..count).map(|i| (i % 251) as u8).collect();
    crate::proxy::body::response(http::StatusCode::OK, "application/octet-stream", body)
}

/// Shows what arrived: method, path, query, headers (the token by its number
/// only) and the body's length.
async fn echo(request: Request<Incoming>, token_number: u64) -> Response<ProxyBody> {
    let (parts, body) = request.into_parts();
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let shown = if name == header::AUTHORIZATION {
            format!("Bearer [access token #{token_number}]")
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        headers.insert(name.as_str().to_owned(), shown.into());
    }
    let body_bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    json(
        200,
        &serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "token_number": token_number,
            "body_bytes": body_bytes,
        }),
    )
}
