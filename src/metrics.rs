//! Prometheus metrics. Labels are fixed words, never request data or secrets.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::token::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabel {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountClassLabel {
    account: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountResultLabel {
    account: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountOperationLabel {
    account: String,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
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

/// The operations `goto_proxy_store_errors_total` counts failures of.
pub const STORE_OPERATIONS: [&str; 6] = ["load", "save", "lease", "release", "renew", "watch"];

/// The `account` label of what no account answered (a request with no
/// route, a refusal at the front door).
pub const NO_ACCOUNT: &str = "";

type HistogramFamily = Family<AccountLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric the proxy exports. Per-account series carry an `account`
/// label; an account's handles come from [`Metrics::account`].
pub struct Metrics {
    registry: Registry,
    requests: Family<AccountClassLabel, Counter>,
    upstream_latency: HistogramFamily,
    refreshes: Family<AccountResultLabel, Counter>,
    auth_retries: Family<AccountLabel, Counter>,
    state_write_failures: Family<AccountLabel, Counter>,
    expires_in: Family<AccountLabel, Gauge<f64, AtomicU64>>,
    refresh_token_age: Family<AccountLabel, Gauge<f64, AtomicU64>>,
    ready: Family<AccountLabel, Gauge>,
    rate_queued: Family<AccountLabel, Counter>,
    rate_shed: Family<AccountLabel, Counter>,
    rate_wait: HistogramFamily,
    throttled: Family<AccountLabel, Counter>,
    upstream_connections: Counter,
    connections_refused: Family<ListenerLabel, Counter>,
    forward_connects: Family<OutcomeLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    store_errors: Family<AccountOperationLabel, Counter>,
    store_leader: Family<AccountLabel, Gauge>,
    refreshes_alone: Family<AccountLabel, Counter>,
    /// The unrouted answers' counters, resolved once.
    unrouted: [Counter; 6],
}

/// One account's handles to its series, resolved once so that the request
/// path only adds. Cheap to clone.
#[derive(Clone)]
pub struct AccountMetrics {
    account: Arc<str>,
    by_class: [Counter; 6],
    upstream_latency: Histogram,
    auth_retries: Counter,
    state_write_failures: Counter,
    rate_queued: Counter,
    rate_shed: Counter,
    rate_wait: Histogram,
    throttled: Counter,
    store_leader: Gauge,
    refreshes_alone: Counter,
    metrics: Arc<Metrics>,
}

/// What `/metrics` reports of one account's token.
pub struct AccountReport<'a> {
    /// The account.
    pub account: &'a str,
    /// Its token source's state.
    pub snapshot: &'a Snapshot,
    /// Whether it holds a valid token.
    pub ready: bool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AccountMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountMetrics")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

fn class_index(status: http::StatusCode) -> usize {
    match status.as_u16() / 100 {
        class @ 1..=5 => usize::from(class) - 1,
        _ => 5,
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<AccountClassLabel, Counter>::default();
        registry.register(
            "goto_proxy_requests",
            "Requests answered to clients, by account and HTTP status class",
            requests.clone(),
        );
        let upstream_latency = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register(
            "goto_proxy_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers",
            upstream_latency.clone(),
        );
        let refreshes = Family::<AccountResultLabel, Counter>::default();
        registry.register(
            "goto_proxy_token_refreshes",
            "Token requests to the token endpoint, by account and result",
            refreshes.clone(),
        );
        let auth_retries = Family::<AccountLabel, Counter>::default();
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
        let state_write_failures = Family::<AccountLabel, Counter>::default();
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
        let expires_in = Family::<AccountLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "goto_proxy_access_token_expires_in_seconds",
            "Seconds until the account's access token expires (negative once expired)",
            expires_in.clone(),
        );
        let refresh_token_age = Family::<AccountLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "goto_proxy_refresh_token_age_seconds",
            "Seconds since the account's refresh token in use was first seen",
            refresh_token_age.clone(),
        );
        let ready = Family::<AccountLabel, Gauge>::default();
        registry.register(
            "goto_proxy_token_ready",
            "1 while the account holds a valid access token, else 0",
            ready.clone(),
        );
        let rate_queued = Family::<AccountLabel, Counter>::default();
        registry.register(
            "goto_proxy_rate_queued",
            "Requests that waited for their turn under rate shaping",
            rate_queued.clone(),
        );
        let rate_shed = Family::<AccountLabel, Counter>::default();
        registry.register(
            "goto_proxy_rate_shed",
            "Requests answered 429 by rate shaping (turn too late, or queue full)",
            rate_shed.clone(),
        );
        let rate_wait = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register(
            "goto_proxy_rate_wait_seconds",
            "How long admitted requests waited for their turn",
            rate_wait.clone(),
        );
        let throttled = Family::<AccountLabel, Counter>::default();
        registry.register(
            "goto_proxy_upstream_throttled",
            "429 answers from upstream, each pausing its bucket",
            throttled.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        for result in ["ok", "error"] {
            drop(reloads.get_or_create(&ResultLabel { result }));
        }
        registry.register(
            "goto_proxy_config_reloads",
            "Reloads of the configuration and secrets, by signal or by watch, by result",
            reloads.clone(),
        );
        let store_errors = Family::<AccountOperationLabel, Counter>::default();
        registry.register(
            "goto_proxy_store_errors",
            "Failed operations on the shared token store (Redis), by account and operation",
            store_errors.clone(),
        );
        let store_leader = Family::<AccountLabel, Gauge>::default();
        registry.register(
            "goto_proxy_store_leader",
            "1 while this replica holds the account's refresh lease in the shared store, else 0",
            store_leader.clone(),
        );
        let refreshes_alone = Family::<AccountLabel, Counter>::default();
        registry.register(
            "goto_proxy_store_refreshes_alone",
            "Token refreshes done without the shared store's lease, because it could not be reached",
            refreshes_alone.clone(),
        );
        let unrouted = class_counters(&requests, NO_ACCOUNT);
        Self {
            registry,
            requests,
            upstream_latency,
            refreshes,
            auth_retries,
            state_write_failures,
            expires_in,
            refresh_token_age,
            ready,
            rate_queued,
            rate_shed,
            rate_wait,
            throttled,
            upstream_connections,
            connections_refused,
            forward_connects,
            reloads,
            store_errors,
            store_leader,
            refreshes_alone,
            unrouted,
        }
    }

    /// The handles of `account`'s series, which start at zero.
    pub fn account(self: &Arc<Self>, account: &str) -> AccountMetrics {
        let label = AccountLabel {
            account: account.to_owned(),
        };
        drop(self.refreshes.get_or_create(&AccountResultLabel {
            account: account.to_owned(),
            result: "success",
        }));
        AccountMetrics {
            account: Arc::from(account),
            by_class: class_counters(&self.requests, account),
            upstream_latency: self.upstream_latency.get_or_create(&label).clone(),
            auth_retries: self.auth_retries.get_or_create(&label).clone(),
            state_write_failures: self.state_write_failures.get_or_create(&label).clone(),
            rate_queued: self.rate_queued.get_or_create(&label).clone(),
            rate_shed: self.rate_shed.get_or_create(&label).clone(),
            rate_wait: self.rate_wait.get_or_create(&label).clone(),
            throttled: self.throttled.get_or_create(&label).clone(),
            store_leader: self.store_leader.get_or_create(&label).clone(),
            refreshes_alone: self.refreshes_alone.get_or_create(&label).clone(),
            metrics: self.clone(),
        }
    }

    /// Removes every series of `account` (an account no longer served).
    pub fn forget(&self, account: &str) {
        let label = AccountLabel {
            account: account.to_owned(),
        };
        for class in CLASSES {
            self.requests.remove(&AccountClassLabel {
                account: account.to_owned(),
                class,
            });
        }
        self.upstream_latency.remove(&label);
        self.auth_retries.remove(&label);
        self.state_write_failures.remove(&label);
        self.expires_in.remove(&label);
        self.refresh_token_age.remove(&label);
        self.ready.remove(&label);
        self.rate_queued.remove(&label);
        self.rate_shed.remove(&label);
        self.rate_wait.remove(&label);
        self.throttled.remove(&label);
        self.store_leader.remove(&label);
        self.refreshes_alone.remove(&label);
        for operation in STORE_OPERATIONS {
            self.store_errors.remove(&AccountOperationLabel {
                account: account.to_owned(),
                operation,
            });
        }
        let results = crate::token::endpoint::EndpointError::KINDS;
        for result in results.into_iter().chain(["success"]) {
            self.refreshes.remove(&AccountResultLabel {
                account: account.to_owned(),
                result,
            });
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

    /// Counts a reload by whether the new configuration was taken.
    pub fn count_reload(&self, taken: bool) {
        let result = if taken { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts an answer no account gave (no route, the front door's refusals).
    pub fn count_unrouted_response(&self, status: http::StatusCode) {
        self.unrouted[class_index(status)].inc();
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

    /// Renders the text exposition format, after updating each account's
    /// token gauges from its report.
    pub fn render(&self, accounts: &[AccountReport<'_>]) -> String {
        let now = SystemTime::now();
        for report in accounts {
            let label = AccountLabel {
                account: report.account.to_owned(),
            };
            if let Some(token) = report.snapshot.token.as_ref() {
                self.expires_in
                    .get_or_create(&label)
                    .set(signed_seconds(token.expires_at_wall(), now));
            }
            if let Some(since) = report.snapshot.refresh_token_since {
                let since = SystemTime::UNIX_EPOCH + Duration::from_secs(since);
                self.refresh_token_age
                    .get_or_create(&label)
                    .set(-signed_seconds(since, now));
            }
            self.ready
                .get_or_create(&label)
                .set(i64::from(report.ready));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

fn class_counters(requests: &Family<AccountClassLabel, Counter>, account: &str) -> [Counter; 6] {
    CLASSES.map(|class| {
        requests
            .get_or_create(&AccountClassLabel {
                account: account.to_owned(),
                class,
            })
            .clone()
    })
}

impl AccountMetrics {
    /// The account's name.
    pub fn account(&self) -> &Arc<str> {
        &self.account
    }

    /// Counts a response to a client.
    pub fn count_response(&self, status: http::StatusCode) {
        self.by_class[class_index(status)].inc();
    }

    /// Records how long upstream took to answer with headers.
    pub fn observe_upstream(&self, elapsed: Duration) {
        self.upstream_latency.observe(elapsed.as_secs_f64());
    }

    /// Counts a request retried after a token refusal.
    pub fn count_auth_retry(&self) {
        self.auth_retries.inc();
    }

    /// Counts a token request by its result (`success` or an error kind).
    pub fn count_refresh(&self, result: &'static str) {
        self.metrics
            .refreshes
            .get_or_create(&AccountResultLabel {
                account: self.account.to_string(),
                result,
            })
            .inc();
    }

    /// Counts a failed state write.
    pub fn count_state_write_failure(&self) {
        self.state_write_failures.inc();
    }

    /// Records a request admitted by rate shaping after `waited`.
    pub fn observe_rate_wait(&self, waited: Duration) {
        if !waited.is_zero() {
            self.rate_queued.inc();
            self.rate_wait.observe(waited.as_secs_f64());
        }
    }

    /// Counts a request shed by rate shaping.
    pub fn count_rate_shed(&self) {
        self.rate_shed.inc();
    }

    /// Counts a 429 from upstream.
    pub fn count_throttled(&self) {
        self.throttled.inc();
    }

    /// Counts a failed operation on the shared store; `operation` is one
    /// of [`STORE_OPERATIONS`].
    pub fn count_store_error(&self, operation: &'static str) {
        debug_assert!(STORE_OPERATIONS.contains(&operation));
        self.metrics
            .store_errors
            .get_or_create(&AccountOperationLabel {
                account: self.account.to_string(),
                operation,
            })
            .inc();
    }

    /// Records whether this replica holds the refresh lease.
    pub fn set_store_leader(&self, leader: bool) {
        self.store_leader.set(i64::from(leader));
    }

    /// Counts a refresh done without the shared store's lease.
    pub fn count_refresh_alone(&self) {
        self.refreshes_alone.inc();
    }

    /// The registry these handles belong to.
    pub fn registry(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// `later - earlier` in seconds, negative when `later` is in the past.
fn signed_seconds(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
