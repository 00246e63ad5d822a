//! The admin listener: liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::metrics::{AccountReport, Metrics};
use crate::proxy::body::{response, ProxyBody};
use crate::proxy::error::json_response;
use crate::proxy::route::Router;
use crate::server::Answer;
use crate::supervisor::Health;
use crate::token::TokenState;

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

    /// Whether every account holds a valid token, and each account's report.
    fn readiness(&self) -> (bool, serde_json::Value) {
        let table = self.router.table();
        let mut accounts = serde_json::Map::new();
        let mut all_ready = !table.routes().is_empty();
        for route in table.routes() {
            let snapshot = route.tokens.snapshot();
            let ready = route.tokens.is_ready();
            all_ready &= ready;
            let expires_in = snapshot.token.as_ref().map(|token| {
                token
                    .expires_at_wall()
                    .duration_since(std::time::SystemTime::now())
                    .map_or(0, |left| left.as_secs())
            });
            let state = match snapshot.state {
                TokenState::Starting => "starting",
                TokenState::Fresh => "fresh",
                TokenState::Retrying => "retrying",
                TokenState::Rejected => "rejected",
            };
            let report = serde_json::json!({
                "ready": ready,
                "state": state,
                "expires_in_seconds": expires_in,
            });
            accounts.insert(route.account.clone(), report);
        }
        (all_ready, serde_json::json!({ "accounts": accounts }))
    }

    fn metrics_text(&self) -> String {
        let table = self.router.table();
        let snapshots: Vec<_> = table
            .routes()
            .iter()
            .map(|route| (route, route.tokens.snapshot()))
            .collect();
        let reports: Vec<AccountReport<'_>> = snapshots
            .iter()
            .map(|(route, snapshot)| AccountReport {
                account: &route.account,
                snapshot,
                ready: route.tokens.is_ready(),
            })
            .collect();
        self.metrics.render(&reports)
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
            "/readyz" => {
                let (ready, report) = self.readiness();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                response(status, "application/json", report.to_string())
            }
            "/metrics" => response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics_text(),
            ),
            _ => json_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "try /healthz, /readyz or /metrics",
            ),
        }
    }
}
