//! The admin listener: liveness, readiness and Prometheus metrics.

use std::future::Future;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::metrics::Metrics;
use crate::proxy::body::ProxyBody;
use crate::proxy::error::json_response;
use crate::server::Handler;
use crate::token::TokenSource;

/// Answers `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug)]
pub struct AdminService {
    tokens: Arc<TokenSource>,
    metrics: Arc<Metrics>,
}

impl AdminService {
    /// An admin service reporting on `tokens`.
    pub fn new(tokens: Arc<TokenSource>, metrics: Arc<Metrics>) -> Self {
        Self { tokens, metrics }
    }

    fn answer(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            );
        }
        match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
            "/readyz" if self.tokens.is_ready() => text(StatusCode::OK, "ready\n", "text/plain"),
            "/readyz" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no valid access token\n",
                "text/plain",
            ),
            "/metrics" => {
                let rendered = self
                    .metrics
                    .render(&self.tokens.snapshot(), self.tokens.is_ready());
                text(
                    StatusCode::OK,
                    rendered,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "try /healthz, /readyz or /metrics",
            ),
        }
    }
}

fn text(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    content_type: &'static str,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

impl Handler for AdminService {
    fn handle(
        &self,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        std::future::ready(self.answer(&request))
    }
}
