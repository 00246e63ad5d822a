//! Prometheus metrics. Labels are fixed words, never request data or secrets.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::token::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// What became of a forward-mode `CONNECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// To an inject host: the TLS inside is the proxy's.
    Intercepted,
    /// Its TLS handshake was refused (an SNI naming another host, say).
    HandshakeRefused,
    /// To another host: a byte tunnel.
    Tunnelled,
    /// To another host, with `--other-hosts deny`.
    Denied,
}

impl ConnectOutcome {
    fn label(self) -> &'static str {
        match self {
            ConnectOutcome::Intercepted => "intercepted",
            ConnectOutcome::HandshakeRefused => "handshake_refused",
            ConnectOutcome::Tunnelled => "tunnelled",
            ConnectOutcome::Denied => "denied",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Counters per status class, resolved once so the request path only adds.
    by_class: [Counter; 6],
    upstream_latency: Histogram,
    refreshes: Family<ResultLabel, Counter>,
    auth_retries: Counter,
    upstream_connections: Counter,
    state_write_failures: Counter,
    connections_refused: Family<ListenerLabel, Counter>,
    forward_connects: Family<OutcomeLabel, Counter>,
    expires_in: Gauge<f64, AtomicU64>,
    refresh_token_age: Gauge<f64, AtomicU64>,
    ready: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<ClassLabel, Counter>::default();
        registry.register(
            "goto_proxy_requests",
            "Requests answered to clients, by HTTP status class",
            requests.clone(),
        );
        let by_class = CLASSES.map(|class| requests.get_or_create(&ClassLabel { class }).clone());
        let upstream_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "goto_proxy_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers",
            upstream_latency.clone(),
        );
        let refreshes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "goto_proxy_token_refreshes",
            "Token requests to the token endpoint, by result",
            refreshes.clone(),
        );
        let auth_retries = Counter::default();
        registry.register(
            "goto_proxy_auth_retries",
            "Requests retried after upstream refused the token (401, or 403 InvalidToken)",
            auth_retries.clone(),
        );
        let upstream_connections = Counter::default();
        registry.register(
            "goto_proxy_upstream_connections_opened",
            "Connections opened to the upstream; a count that keeps climbing under steady load means churn",
            upstream_connections.clone(),
        );
        let state_write_failures = Counter::default();
        registry.register(
            "goto_proxy_state_write_failures",
            "Failed writes of the state file (the refresh token may not be durable)",
            state_write_failures.clone(),
        );
        let connections_refused = Family::<ListenerLabel, Counter>::default();
        // Shown at 0 from the start, so that a dashboard can tell "none" from "not exported".
        drop(connections_refused.get_or_create(&ListenerLabel { listener: "proxy" }));
        registry.register(
            "goto_proxy_connections_refused",
            "Client connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        let forward_connects = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "goto_proxy_forward_connects",
            "Forward-mode CONNECT requests, by outcome: intercepted, handshake_refused, tunnelled, denied",
            forward_connects.clone(),
        );
        let expires_in = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "goto_proxy_access_token_expires_in_seconds",
            "Seconds until the current access token expires (negative once expired)",
            expires_in.clone(),
        );
        let refresh_token_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "goto_proxy_refresh_token_age_seconds",
            "Seconds since the refresh token in use was first seen",
            refresh_token_age.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "goto_proxy_token_ready",
            "1 while a valid access token is held, else 0",
            ready.clone(),
        );
        Self {
            registry,
            by_class,
            upstream_latency,
            refreshes,
            auth_retries,
            upstream_connections,
            state_write_failures,
            connections_refused,
            forward_connects,
            expires_in,
            refresh_token_age,
            ready,
        }
    }

    /// Counts a forward-mode `CONNECT` by what became of it.
    pub fn count_connect(&self, outcome: ConnectOutcome) {
        self.forward_connects
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label(),
            })
            .inc();
    }

    /// Counts a response to a client.
    pub fn count_response(&self, status: http::StatusCode) {
        let index = match status.as_u16() / 100 {
            class @ 1..=5 => usize::from(class) - 1,
            _ => 5,
        };
        self.by_class[index].inc();
    }

    /// Records how long upstream took to answer with headers.
    pub fn observe_upstream(&self, elapsed: Duration) {
        self.upstream_latency.observe(elapsed.as_secs_f64());
    }

    /// Counts a token request by its result (`success` or an error kind).
    pub fn count_refresh(&self, result: &'static str) {
        self.refreshes.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a request retried after a token refusal.
    pub fn count_auth_retry(&self) {
        self.auth_retries.inc();
    }

    /// Counts a connection opened to the upstream.
    pub fn count_upstream_connection(&self) {
        self.upstream_connections.inc();
    }

    /// Counts a client connection closed at once for the connection cap.
    pub fn count_connection_refused(&self, listener: &'static str) {
        self.connections_refused
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }

    /// Counts a failed state write.
    pub fn count_state_write_failure(&self) {
        self.state_write_failures.inc();
    }

    /// Renders the text exposition format, after updating the token gauges from `snapshot`.
    pub fn render(&self, snapshot: Option<&Snapshot>, ready: bool) -> String {
        let now = SystemTime::now();
        if let Some(token) = snapshot.and_then(|s| s.token.as_ref()) {
            self.expires_in
                .set(signed_seconds(token.expires_at_wall(), now));
        }
        if let Some(since) = snapshot.and_then(|s| s.refresh_token_since) {
            let since = SystemTime::UNIX_EPOCH + Duration::from_secs(since);
            self.refresh_token_age.set(-signed_seconds(since, now));
        }
        self.ready.set(i64::from(ready));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// `later - earlier` in seconds, negative when `later` is in the past.
fn signed_seconds(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
