//! An in-process stand-in for GoTo: a token endpoint and an echo API on
//! loopback, controlled by its owner (token lifetime, rotation, revocation,
//! faults). `demo` runs the proxy against it, and the tests do too.

mod api;
mod token_endpoint;
mod websocket;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::proxy::body::ProxyBody;

/// The client id the stand-in accepts unless told otherwise.
pub const CLIENT_ID: &str = "standin-client";
/// The client secret the stand-in accepts unless told otherwise.
pub const CLIENT_SECRET: &str = "standin-client-secret";
/// The principal the stand-in names in its grants.
pub const PRINCIPAL: &str = "demo.user@example.com";

/// A fault the token endpoint plays instead of answering normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an empty JSON object.
    Status(u16),
    /// Answer 429 with `Retry-After` in seconds.
    TooManyRequests { retry_after_secs: u64 },
    /// Answer 400 `invalid_grant`.
    InvalidGrant,
    /// Never answer.
    Hang,
    /// Answer 200, then send the body one byte at a time, too slowly to finish.
    SlowDrip,
    /// Answer 200 with HTML.
    Garbage,
    /// Answer 200 with JSON that has no `access_token`.
    NoAccessToken,
    /// Answer 200 with a body larger than any token answer.
    HugeBody,
}

/// One request the API received, as it arrived.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The method.
    pub method: Method,
    /// Path and query.
    pub path_and_query: String,
    /// Every header, as received.
    pub headers: HeaderMap,
    /// When it arrived.
    pub received_at: Instant,
}

/// How the token endpoint shapes its grants.
#[derive(Clone, Debug)]
pub struct GrantShape {
    /// Lifetime of new access tokens.
    pub lifetime: Duration,
    /// Rotate the refresh token every this many refreshes (0: never).
    pub rotate_every: u64,
    /// Send `expires_in` (else the proxy must read the JWT's `exp`).
    pub send_expires_in: bool,
    /// Repeat the current refresh token in answers that do not rotate it.
    pub repeat_refresh_token: bool,
    /// Answer every this many token requests with 503 (0: never).
    pub fail_every: u64,
    /// Still accept the refresh token before the last rotation.
    pub accept_previous_refresh_token: bool,
    /// Still accept every refresh token handed out: rotation without
    /// revocation, as some OAuth servers do until a token's own expiry.
    pub accept_every_issued_refresh_token: bool,
}

impl Default for GrantShape {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(3600),
            rotate_every: 0,
            send_expires_in: true,
            repeat_refresh_token: false,
            fail_every: 0,
            accept_previous_refresh_token: false,
            accept_every_issued_refresh_token: false,
        }
    }
}

/// Everything the stand-in knows; the owner reads and changes it through [`StandIn`].
#[derive(Debug)]
struct State {
    client_id: String,
    client_secret: String,
    refresh_token: String,
    /// Every refresh token handed out, oldest first (the first one included).
    refresh_token_history: Vec<String>,
    pat: String,
    shape: GrantShape,
    faults: VecDeque<Fault>,
    standing_fault: Option<Fault>,
    issued: HashMap<String, IssuedToken>,
    refreshes: u64,
    refuse_all: bool,
    /// The next API requests answered 429, and the `Retry-After` they carry.
    throttle: Option<(u32, Option<u64>)>,
    token_request_times: Vec<Instant>,
    /// When access token number N was issued, at index N - 1.
    token_issue_times: Vec<Instant>,
    codes: HashMap<String, PendingCode>,
    recorded: VecDeque<RecordedRequest>,
}

/// An authorization code waiting to be exchanged.
#[derive(Debug)]
struct PendingCode {
    challenge: String,
    redirect_uri: String,
}

#[derive(Clone, Copy, Debug)]
struct IssuedToken {
    number: u64,
    issued_at: Instant,
    expires_at: Instant,
    revoked: bool,
}

/// The most API requests remembered for inspection.
const RECORDED_MAX: usize = 256;

/// Counters the owner reads through [`StandIn`]'s methods.
#[derive(Debug, Default)]
struct Counters {
    /// Token requests received (any grant, any outcome).
    token_requests: AtomicU64,
    /// Token requests answered with a new access token.
    tokens_issued: AtomicU64,
    /// API requests refused for their token (401 or 403 InvalidToken).
    api_refusals: AtomicU64,
    /// Connections accepted by the API.
    api_connections: AtomicU64,
}

struct Shared {
    state: Mutex<State>,
    counters: Counters,
}

/// A running stand-in; its servers stop when it is dropped.
pub struct StandIn {
    shared: Arc<Shared>,
    token_addr: SocketAddr,
    api_addr: SocketAddr,
    tls: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn")
            .field("token_addr", &self.token_addr)
            .field("api_addr", &self.api_addr)
            .finish_non_exhaustive()
    }
}

/// How to start a stand-in.
#[derive(Clone, Debug, Default)]
pub struct StandInOptions {
    /// The first refresh token to accept (a random one if `None`).
    pub refresh_token: Option<String>,
    /// How grants look.
    pub shape: GrantShape,
    /// Serve the token endpoint and the API over TLS with this PEM certificate chain and key.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Close each API connection gracefully after this many requests.
    pub close_connections_after: Option<usize>,
}

impl StandIn {
    /// Starts the token endpoint and the API on `127.0.0.1:0`.
    pub async fn start(options: StandInOptions) -> std::io::Result<Self> {
        let first_refresh_token = options.refresh_token.unwrap_or_else(|| random_token("rt"));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                client_id: CLIENT_ID.to_owned(),
                client_secret: CLIENT_SECRET.to_owned(),
                refresh_token: first_refresh_token.clone(),
                refresh_token_history: vec![first_refresh_token],
                pat: random_token("pat"),
                shape: options.shape,
                faults: VecDeque::new(),
                standing_fault: None,
                issued: HashMap::new(),
                refreshes: 0,
                refuse_all: false,
                throttle: None,
                token_request_times: Vec::new(),
                token_issue_times: Vec::new(),
                codes: HashMap::new(),
                recorded: VecDeque::new(),
            }),
            counters: Counters::default(),
        });
        let token_listener = TcpListener::bind("127.0.0.1:0").await?;
        let api_listener = TcpListener::bind("127.0.0.1:0").await?;
        let token_addr = token_listener.local_addr()?;
        let api_addr = api_listener.local_addr()?;
        let tls = match options.tls {
            Some((chain, key)) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                crate::tls::server_config(&chain, &key).map_err(std::io::Error::other)?,
            ))),
            None => None,
        };
        let tasks = vec![
            tokio::spawn(accept_loop(
                token_listener,
                tls.clone(),
                shared.clone(),
                Role::TokenEndpoint,
                None,
            )),
            tokio::spawn(accept_loop(
                api_listener,
                tls.clone(),
                shared.clone(),
                Role::Api,
                options.close_connections_after,
            )),
        ];
        Ok(Self {
            shared,
            token_addr,
            api_addr,
            tls: tls.is_some(),
            tasks,
        })
    }

    /// The authorization (consent) endpoint's URL.
    pub fn authorize_url(&self) -> String {
        format!("{}/oauth/authorize", self.base_url(self.token_addr))
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.base_url(self.token_addr))
    }

    /// The API's base URL.
    pub fn api_url(&self) -> String {
        self.base_url(self.api_addr)
    }

    fn base_url(&self, addr: SocketAddr) -> String {
        if self.tls {
            // The certificate in certs/ names "localhost", so TLS goes by that name.
            format!("https://localhost:{}", addr.port())
        } else {
            format!("http://{addr}")
        }
    }

    /// The refresh token the endpoint accepts now.
    pub fn refresh_token(&self) -> String {
        self.state().refresh_token.clone()
    }

    /// The personal access token the endpoint accepts.
    pub fn pat(&self) -> String {
        self.state().pat.clone()
    }

    /// Every access token issued so far, newest last.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        let state = self.state();
        let mut tokens: Vec<_> = state
            .issued
            .iter()
            .map(|(t, i)| (i.number, t.clone()))
            .collect();
        tokens.sort();
        tokens.into_iter().map(|(_, t)| t).collect()
    }

    /// Plays `fault` for the next token request (queued after earlier ones).
    pub fn push_fault(&self, fault: Fault) {
        self.state().faults.push_back(fault);
    }

    /// Plays `fault` for every token request until cleared with `None`.
    pub fn set_standing_fault(&self, fault: Option<Fault>) {
        self.state().standing_fault = fault;
    }

    /// Makes every access token issued so far invalid, as a revocation would.
    pub fn revoke_access_tokens(&self) {
        self.revoke_access_tokens_older_than(Duration::ZERO);
    }

    /// Makes every access token issued more than `age` ago invalid.
    pub fn revoke_access_tokens_older_than(&self, age: Duration) {
        for token in self.state().issued.values_mut() {
            if token.issued_at.elapsed() >= age {
                token.revoked = true;
            }
        }
    }

    /// Every refresh token handed out so far, oldest first.
    pub fn refresh_token_history(&self) -> Vec<String> {
        self.state().refresh_token_history.clone()
    }

    /// Makes the API refuse every token, even fresh ones, until set back.
    pub fn set_refuse_all(&self, refuse: bool) {
        self.state().refuse_all = refuse;
    }

    /// Makes the token endpoint accept `secret` as the client secret from
    /// now on (and no longer the old one), as after a rotation in GoTo's
    /// developer center.
    pub fn set_client_secret(&self, secret: &str) {
        self.state().client_secret = secret.to_owned();
    }

    /// Makes the API answer its next `count` requests 429, with
    /// `Retry-After: retry_after_secs` when given, as GoTo does beyond its limit.
    pub fn throttle_next(&self, count: u32, retry_after_secs: Option<u64>) {
        self.state().throttle = Some((count, retry_after_secs));
    }

    /// Makes the current refresh token invalid (refreshes then get `invalid_grant`).
    pub fn revoke_refresh_token(&self) {
        self.state().refresh_token = random_token("rt-unknown");
    }

    /// Token requests received so far.
    pub fn token_requests(&self) -> u64 {
        self.shared.counters.token_requests.load(Ordering::SeqCst)
    }

    /// When each token request arrived, oldest first.
    pub fn token_request_times(&self) -> Vec<Instant> {
        self.state().token_request_times.clone()
    }

    /// When each access token was issued: token number N at index N - 1.
    pub fn token_issue_times(&self) -> Vec<Instant> {
        self.state().token_issue_times.clone()
    }

    /// API requests refused for their token so far.
    pub fn api_refusals(&self) -> u64 {
        self.shared.counters.api_refusals.load(Ordering::SeqCst)
    }

    /// Connections the API has accepted so far.
    pub fn api_connections(&self) -> u64 {
        self.shared.counters.api_connections.load(Ordering::SeqCst)
    }

    /// The API requests received, oldest first (the last few hundred).
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        self.state().recorded.iter().cloned().collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl State {
    /// Hands out a new refresh token, remembering the one before.
    fn rotate_refresh_token(&mut self) {
        let next = random_token("rt");
        self.refresh_token = next.clone();
        self.refresh_token_history.push(next);
    }

    /// Whether `offered` is a refresh token this endpoint takes now.
    fn accepts_refresh_token(&self, offered: Option<&str>) -> bool {
        let Some(offered) = offered else { return false };
        if offered == self.refresh_token {
            return true;
        }
        let history = &self.refresh_token_history;
        // A revoked chain (see `revoke_refresh_token`) leaves the history behind.
        let chain_current = history.last() == Some(&self.refresh_token);
        if self.shape.accept_every_issued_refresh_token {
            return chain_current && history.iter().any(|issued| issued == offered);
        }
        self.shape.accept_previous_refresh_token
            && chain_current
            && history.len() >= 2
            && history[history.len() - 2] == offered
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the state half-changed in a
    // way that matters to a stand-in; keep serving.
    shared
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A random token-like string.
fn random_token(prefix: &str) -> String {
    let mut text = String::with_capacity(prefix.len() + 33);
    text.push_str(prefix);
    text.push('-');
    for _ in 0..32 {
        text.push(fastrand::alphanumeric());
    }
    text
}

#[derive(Clone, Copy)]
enum Role {
    TokenEndpoint,
    Api,
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    role: Role,
    close_after: Option<usize>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if let Role::Api = role {
            shared
                .counters
                .api_connections
                .fetch_add(1, Ordering::SeqCst);
        }
        let (shared, tls) = (shared.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        serve_connection(stream, shared, role, close_after).await;
                    }
                }
                None => serve_connection(stream, shared, role, close_after).await,
            }
        });
    }
}

/// Serves one connection; after `close_after` requests it closes gracefully
/// (an HTTP/2 GOAWAY), as servers that rotate their connections do.
async fn serve_connection<I>(io: I, shared: Arc<Shared>, role: Role, close_after: Option<usize>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let limit_reached = Arc::new(tokio::sync::Notify::new());
    let service = {
        let limit_reached = limit_reached.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let shared = shared.clone();
            let count = served.fetch_add(1, Ordering::SeqCst) + 1;
            if close_after == Some(count) {
                limit_reached.notify_one();
            }
            async move {
                Ok::<_, Infallible>(match role {
                    Role::TokenEndpoint => token_endpoint::handle(&shared, request).await,
                    Role::Api => api::handle(&shared, request).await,
                })
            }
        })
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = limit_reached.notified() => connection.as_mut().graceful_shutdown(),
    }
    let _ = connection.await;
}

fn json(status: u16, value: &serde_json::Value) -> Response<ProxyBody> {
    let status =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    crate::proxy::body::response(status, "application/json", value.to_string())
}
