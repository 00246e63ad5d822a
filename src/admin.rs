//! The admin listener: liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::metrics::Metrics;
use crate::proxy::body::{response, ProxyBody};
use crate::proxy::error::json_response;
use crate::server::Answer;
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
}

impl Answer for AdminService {
    fn answer(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            );
        }
        match request.uri().path() {
            "/healthz" => response(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" if self.tokens.is_ready() => {
                response(StatusCode::OK, "text/plain", "ready\n")
            }
            "/readyz" => response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no valid access token\n",
            ),
            "/metrics" => {
                let rendered = self
                    .metrics
                    .render(&self.tokens.snapshot(), self.tokens.is_ready());
                response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    rendered,
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
