//! The admin listener: liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::metrics::Metrics;
use crate::proxy::body::{response, ProxyBody};
use crate::proxy::error::json_response;
use crate::proxy::route::Router;
use crate::server::Answer;
use crate::supervisor::Health;

/// Answers `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug)]
pub struct AdminService {
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl AdminService {
    /// An admin service reporting on the accounts of `router`'s table and
    /// on the process's `health`.
    pub fn new(router: Arc<Router>, metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Self {
            router,
            metrics,
            health,
        }
    }

    /// Whether every account holds a valid token.
    fn is_ready(&self) -> bool {
        let table = self.router.table();
        !table.routes().is_empty() && table.routes().iter().all(|r| r.tokens.is_ready())
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
            "/healthz" => match self.health.failure() {
                None => response(StatusCode::OK, "text/plain", "ok\n"),
                Some(why) => response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("failing: {why}\n"),
                ),
            },
            "/readyz" if self.is_ready() => response(StatusCode::OK, "text/plain", "ready\n"),
            "/readyz" => response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no valid access token\n",
            ),
            "/metrics" => {
                let table = self.router.table();
                let snapshot = table.routes().first().map(|r| r.tokens.snapshot());
                let rendered = self.metrics.render(snapshot.as_deref(), self.is_ready());
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
