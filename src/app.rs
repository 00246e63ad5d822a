//! Wiring: builds each account's token source, refresher and route, the
//! router, the upstream pools and both listeners from [`Settings`], and
//! runs them under supervision until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::access::AccessLog;
use crate::admin::AdminService;
use std::collections::BTreeMap;

use arc_swap::ArcSwap;

use crate::config::{AccountSettings, Bootstrap, Settings};
use crate::front::gate::ClientKey;
use crate::front::intercept::NoAuthority;
use crate::front::{Forwarder, FrontDoor};
use crate::metrics::Metrics;
use crate::proxy::rate::RateShaper;
use crate::proxy::route::{Route, RoutePolicy, Router, RoutingTable};
use crate::proxy::upstream::{ConnectOptions, Pools, Upstream};
use crate::proxy::ProxyService;
use crate::reload::{Cause, Reload, Watched};
use crate::server::{serve, Server, ServerOptions, Workers};
use crate::shutdown::ShutdownSignal;
use crate::shutdown::ShutdownTrigger;
use crate::store::{StateStore, StoreError, Stores};
use crate::supervisor::{Exit, Health, Supervisor};
use crate::tls::TlsError;
use crate::token::endpoint::unix_now;
use crate::token::endpoint::SharedEndpoint;
use crate::token::refresher::{Credential, Refresher};
use crate::token::TokenSource;

/// The admin listener serves probes and Prometheus: a few connections at most.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Why the proxy could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({setting}): {source}")]
    Bind {
        setting: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--store: {0}")]
    StoreSetup(String),
    #[error(
        "no refresh token: the state file {0} holds none and no bootstrap token is given; \
         run `goto-auth-proxy login`, or set --refresh-token-file / GOTO_REFRESH_TOKEN (or GOTO_PAT)"
    )]
    NoRefreshToken(PathBuf),
    #[error("upstream TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("token endpoint client: {0}")]
    TokenClient(#[from] reqwest::Error),
    #[error("{0}")]
    TaskFailed(Exit),
    #[error(transparent)]
    NoAuthority(#[from] NoAuthority),
    #[error("cannot start the threads that serve connections: {0}")]
    Workers(std::io::Error),
}

/// The proxy's and the admin listener's sockets, bound before [`run`] so a
/// caller (or a test, on port 0) knows the addresses.
#[derive(Debug)]
pub struct Listeners {
    /// Where API clients connect.
    pub proxy: TcpListener,
    /// Where probes and Prometheus connect.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both listen addresses of `settings`.
    pub async fn bind(settings: &Settings) -> Result<Self, StartError> {
        let bind = |setting, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    setting,
                    addr,
                    source,
                })
        };
        Ok(Self {
            proxy: bind("--listen", settings.listen).await?,
            admin: bind("--admin-listen", settings.admin_listen).await?,
        })
    }
}

/// The credential to start `account` with: the stored refresh token first,
/// the bootstrap token as its fallback; or the PAT. With it, the stored
/// version it was read from (0 when nothing is stored).
pub async fn initial_credential(
    account: &AccountSettings,
    store: &dyn StateStore,
) -> Result<(Credential, u64), StartError> {
    let refresh = match &account.bootstrap {
        Bootstrap::Pat(pat) => return Ok((Credential::Pat(pat.value.clone()), 0)),
        Bootstrap::RefreshToken(bootstrap) => Some(bootstrap.value.clone()),
        Bootstrap::None => None,
    };
    let stored = store.load().await?;
    let version = stored.as_ref().map_or(0, |s| s.version);
    let stored_token = stored.and_then(|s| {
        s.state
            .refresh_token
            .map(|t| (t, s.state.refresh_token_first_seen))
    });
    let credential = match (stored_token, refresh) {
        (Some((current, since)), bootstrap) => {
            use secrecy::ExposeSecret;
            let fallback = bootstrap.filter(|b| b.expose_secret() != current.expose_secret());
            Credential::RefreshToken {
                current,
                since: since.unwrap_or_else(unix_now),
                fallback,
            }
        }
        (None, Some(bootstrap)) => Credential::RefreshToken {
            current: bootstrap,
            since: unix_now(),
            fallback: None,
        },
        (None, None) => return Err(StartError::NoRefreshToken(account.state_file.clone())),
    };
    Ok((credential, version))
}

/// Runs the proxy on `listeners` until `shutdown` fires, then drains and
/// returns; or, when a background task ends on its own, drains and returns
/// [`StartError::TaskFailed`].
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: ShutdownSignal,
) -> Result<(), StartError> {
    run_with_reload(settings, listeners, shutdown, None).await
}

/// An account being served: its settings, its route, and what a reload
/// may change under its refresher, which keeps running.
struct RunningAccount {
    settings: AccountSettings,
    route: Arc<Route>,
    endpoint: SharedEndpoint,
    stop: ShutdownTrigger,
}

/// The parts a reload works on.
struct Serving {
    settings: Settings,
    accounts: BTreeMap<String, RunningAccount>,
    router: Arc<Router>,
    proxy: Arc<ProxyService>,
    front: Arc<FrontDoor>,
    pools: Arc<Pools>,
    stores: Arc<Stores>,
    metrics: Arc<Metrics>,
}

/// [`run`], reloading from `reload` on its triggers when given.
pub async fn run_with_reload(
    settings: Settings,
    listeners: Listeners,
    mut shutdown: ShutdownSignal,
    reload: Option<Reload>,
) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let pools = Arc::new(Pools::new(
        &ConnectOptions {
            extra_roots_pem: settings.extra_roots_pem.clone(),
            connect_timeout: settings.connect_timeout,
            connect_to: settings.connect_to.clone(),
        },
        metrics.clone(),
    )?);
    let stores = Arc::new(Stores::new(&settings).map_err(StartError::StoreSetup)?);
    let mut supervisor = Supervisor::new(health.clone());
    let mut accounts = BTreeMap::new();
    for account in &settings.accounts {
        let started = start_account(&settings, account, &pools, &stores, &metrics).await?;
        accounts.insert(
            account.name.clone(),
            spawn_refresher(&mut supervisor, started),
        );
    }
    let router = Arc::new(Router::new(table_of(&accounts)));
    let proxy = Arc::new(ProxyService::new(
        router.clone(),
        metrics.clone(),
        settings.access.allow_requests.clone(),
    ));
    let admin = Arc::new(AdminService::new(router.clone(), metrics.clone(), health));
    let server_options = ServerOptions {
        header_read_timeout: settings.header_read_timeout,
        max_header_bytes: settings.max_header_bytes,
        drain_timeout: settings.drain_timeout,
        max_connections: settings.max_connections,
    };
    let workers = Arc::new(Workers::per_core("proxy").map_err(StartError::Workers)?);
    let proxy_server =
        Arc::new(Server::new("proxy", server_options.clone()).on_workers(workers.clone()));
    let front = Arc::new(front_door(
        &settings,
        proxy.clone(),
        &proxy_server,
        pools.clone(),
    )?);
    log_start(&settings, &listeners, &workers);
    let (stop_serving, serving_signal) = crate::shutdown::channel();
    supervisor.spawn(
        "admin listener",
        serve(
            listeners.admin,
            Arc::new(Server::new(
                "admin",
                ServerOptions {
                    max_connections: ADMIN_MAX_CONNECTIONS,
                    ..server_options
                },
            )),
            admin,
            None,
            metrics.clone(),
            serving_signal.clone(),
        ),
    );
    // A task of its own, so that a reload under way never holds up accepting.
    let mut serving = tokio::spawn(serve(
        listeners.proxy,
        proxy_server,
        front.clone(),
        settings.access.listener_tls.clone().map(TlsAcceptor::from),
        metrics.clone(),
        serving_signal,
    ));
    let watched: Watched = Arc::new(ArcSwap::from_pointee(watched_files(
        &settings,
        reload.as_ref(),
    )));
    let mut triggers = reload
        .as_ref()
        .map(|reload| crate::reload::triggers(watched.clone(), reload.on_sighup));
    let mut state = Serving {
        settings,
        accounts,
        router,
        proxy,
        front,
        pools,
        stores,
        metrics,
    };
    let mut drained = false;
    let failure = loop {
        let next_reload = async {
            match triggers.as_mut() {
                Some(triggers) => triggers.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.wait() => break None,
            exit = supervisor.failure() => break Some(exit),
            // The listener stops only when told to; should it ever end, stop too.
            _ = &mut serving => {
                drained = true;
                break None;
            }
            Some(cause) = next_reload => {
                if let Some(reload) = &reload {
                    state.reload(reload, cause, &mut supervisor).await;
                    watched.store(Arc::new(watched_files(&state.settings, Some(reload))));
                }
            }
        }
    };
    stop_serving.trigger();
    if !drained {
        let _ = serving.await;
    }
    workers.stop();
    // The refreshers outlive the drain: a request in flight may still need a refresh.
    for running in state.accounts.values() {
        running.stop.trigger();
    }
    supervisor.join_all().await;
    match failure {
        None => {
            tracing::info!("stopped");
            Ok(())
        }
        Some(exit) => Err(StartError::TaskFailed(exit)),
    }
}

/// The configuration file and every secret file of `settings`.
fn watched_files(settings: &Settings, reload: Option<&Reload>) -> Vec<std::path::PathBuf> {
    let mut files = settings.secret_files();
    if let Some(config) = reload.and_then(|r| r.config_file.clone()) {
        files.push(config);
    }
    files
}

fn table_of(accounts: &BTreeMap<String, RunningAccount>) -> RoutingTable {
    RoutingTable::from_routes(accounts.values().map(|running| running.route.clone()))
}

fn refresher_task(account: &str) -> String {
    format!("refresher of account {account}")
}

/// Runs the started account's refresher under `supervisor`.
fn spawn_refresher(supervisor: &mut Supervisor, started: Started) -> RunningAccount {
    let Started {
        running,
        refresher,
        stop,
    } = started;
    supervisor.spawn(refresher_task(&running.settings.name), refresher.run(stop));
    running
}

impl Serving {
    /// Reads the configuration and secrets again and applies what changed;
    /// a configuration that does not hold keeps the old one serving.
    async fn reload(&mut self, reload: &Reload, cause: Cause, supervisor: &mut Supervisor) {
        let new = match (reload.source)() {
            Ok(new) => new,
            Err(error) => {
                tracing::error!(%cause, setting = error.setting, error = %error, "the new configuration is not valid; the old one keeps serving");
                self.metrics.count_reload(false);
                return;
            }
        };
        match self.apply(new, supervisor).await {
            Ok(()) => {
                tracing::info!(%cause, accounts = self.accounts.len(), "configuration reloaded");
                self.metrics.count_reload(true);
            }
            Err(error) => {
                tracing::error!(%cause, error = %error, "the new configuration cannot be applied; the old one keeps serving");
                self.metrics.count_reload(false);
            }
        }
    }

    async fn apply(
        &mut self,
        new: Settings,
        supervisor: &mut Supervisor,
    ) -> Result<(), StartError> {
        warn_of_restart_settings(&self.settings, &new);
        // New accounts are made ready first: should one fail, nothing has changed.
        let mut started = Vec::new();
        for account in new
            .accounts
            .iter()
            .filter(|a| !self.accounts.contains_key(&a.name))
        {
            started.push(
                start_account(&new, account, &self.pools, &self.stores, &self.metrics).await?,
            );
        }
        let mut updates = Vec::new();
        for account in &new.accounts {
            if let Some(running) = self.accounts.get(&account.name) {
                updates.push((
                    account.name.clone(),
                    running.prepare(&new, account, &self.pools)?,
                ));
            }
        }
        // Nothing below can fail: the reload is taken whole or not at all.
        let mut next = BTreeMap::new();
        for (name, update) in updates {
            if let Some(mut running) = self.accounts.remove(&name) {
                running.commit(update);
                next.insert(name, running);
            }
        }
        for started in started {
            let name = started.running.settings.name.clone();
            tracing::info!(account = %name, "account added; waiting for its first access token");
            next.insert(name, spawn_refresher(supervisor, started));
        }
        for (name, running) in std::mem::take(&mut self.accounts) {
            tracing::info!(account = %name, "account removed; its requests in flight finish");
            supervisor.retire(&refresher_task(&name));
            running.stop.trigger();
            self.metrics.forget(&name);
        }
        self.accounts = next;
        self.router.swap(table_of(&self.accounts));
        self.proxy.set_rules(new.access.allow_requests.clone());
        self.front.set_key(
            new.access
                .client_key
                .as_ref()
                .map(|key| ClientKey::new(&key.value)),
        );
        self.settings = new;
        Ok(())
    }
}

/// What a reload changes of a kept account, made before anything changes.
struct Update {
    /// A new token endpoint client, when the client or token URL changed.
    endpoint: Option<crate::token::endpoint::TokenEndpoint>,
    route: Arc<Route>,
    settings: AccountSettings,
}

impl RunningAccount {
    /// What `account`'s new settings change: a changed client or token URL
    /// goes to the running refresher (which keeps running, and with it the
    /// refresh token it holds); the route is rebuilt.
    fn prepare(
        &self,
        settings: &Settings,
        account: &AccountSettings,
        pools: &Pools,
    ) -> Result<Update, StartError> {
        use secrecy::ExposeSecret;
        let old = &self.settings;
        if old.state_file != account.state_file {
            tracing::warn!(account = %account.name, "state_file changed: it takes effect after a restart");
        }
        let client_changed = old.token_url != account.token_url
            || old.client.id != account.client.id
            || old.client.secret.expose_secret() != account.client.secret.expose_secret();
        let endpoint = client_changed
            .then(|| account.token_endpoint(settings))
            .transpose()?;
        let rate = settings.rate.for_account(account);
        let shaper = if rate == self.route.shaper.settings() {
            self.route.shaper.clone()
        } else {
            Arc::new(RateShaper::new(rate))
        };
        let route = Arc::new(Route {
            account: account.name.clone(),
            tokens: self.route.tokens.clone(),
            upstream: Upstream::new(account.upstream.clone(), pools),
            policy: route_policy(settings),
            metrics: self.route.metrics.clone(),
            shaper,
        });
        Ok(Update {
            endpoint,
            route,
            // The state file stays the one the refresher writes to.
            settings: AccountSettings {
                state_file: old.state_file.clone(),
                ..account.clone()
            },
        })
    }

    fn commit(&mut self, update: Update) {
        if let Some(endpoint) = update.endpoint {
            self.endpoint.replace(endpoint);
            tracing::info!(account = %update.settings.name, "the OAuth client or token URL changed; used from the next token request");
        }
        self.route = update.route;
        self.settings = update.settings;
    }
}

/// Logs the settings a reload cannot change under a running listener.
fn warn_of_restart_settings(old: &Settings, new: &Settings) {
    let changed = [
        ("listen", old.listen != new.listen),
        ("admin_listen", old.admin_listen != new.admin_listen),
        (
            "tls_cert_file/tls_key_file/client_ca_file",
            old.access.tls_cert_file != new.access.tls_cert_file
                || old.access.tls_key_file != new.access.tls_key_file
                || old.access.client_ca_file != new.access.client_ca_file,
        ),
        (
            "forward mode",
            old.forward.forward != new.forward.forward
                || old.forward.inject_hosts != new.forward.inject_hosts
                || old.forward.other_hosts != new.forward.other_hosts,
        ),
        ("connect_to", old.connect_to != new.connect_to),
        (
            "store/store_password_file/store_key_file",
            !old.store.same_as(&new.store),
        ),
    ];
    for (setting, _) in changed.iter().filter(|(_, changed)| *changed) {
        tracing::warn!(setting, "changed: it takes effect after a restart");
    }
}

/// The main listener's handler: the client key, and forward mode when on.
fn front_door(
    settings: &Settings,
    proxy: Arc<ProxyService>,
    server: &Arc<Server>,
    pools: Arc<Pools>,
) -> Result<FrontDoor, StartError> {
    let key = settings
        .access
        .client_key
        .as_ref()
        .map(|key| ClientKey::new(&key.value));
    let forward = if settings.forward.forward {
        Some(Forwarder::new(
            settings,
            proxy.clone(),
            server.clone(),
            pools,
        )?)
    } else {
        None
    };
    Ok(FrontDoor::new(
        proxy,
        key,
        forward,
        AccessLog::new(settings.access_log),
    ))
}

/// What starting an account makes: the account, ready to serve once its
/// refresher runs, and that refresher with its stop signal.
struct Started {
    running: RunningAccount,
    refresher: Refresher,
    stop: ShutdownSignal,
}

/// One account's route, and the refresher that keeps its token fresh.
async fn start_account(
    settings: &Settings,
    account: &AccountSettings,
    pools: &Pools,
    stores: &Stores,
    metrics: &Arc<Metrics>,
) -> Result<Started, StartError> {
    let account_metrics = metrics.account(&account.name);
    let store = stores.open(account, account_metrics.clone());
    let (credential, version) = initial_credential(account, store.as_ref()).await?;
    let persist = match credential {
        Credential::Pat(_) => None,
        Credential::RefreshToken { .. } => Some((store, version)),
    };
    let tokens = Arc::new(TokenSource::new());
    let endpoint = SharedEndpoint::new(account.token_endpoint(settings)?);
    let refresher = Refresher::new(
        endpoint.clone(),
        credential,
        persist,
        tokens.clone(),
        account_metrics.clone(),
        settings.refresh_margin,
    );
    let route = Route {
        account: account.name.clone(),
        tokens,
        upstream: Upstream::new(account.upstream.clone(), pools),
        policy: route_policy(settings),
        metrics: account_metrics,
        shaper: Arc::new(RateShaper::new(settings.rate.for_account(account))),
    };
    let (trigger, stop) = crate::shutdown::channel();
    Ok(Started {
        running: RunningAccount {
            settings: account.clone(),
            route: Arc::new(route),
            endpoint,
            stop: trigger,
        },
        refresher,
        stop,
    })
}

/// How every route's requests are held, from `settings`.
fn route_policy(settings: &Settings) -> RoutePolicy {
    RoutePolicy {
        token_wait: settings.token_wait,
        retry_body_limit: settings.retry_body_limit,
        upstream_timeout: settings.upstream_timeout,
    }
}

fn log_start(settings: &Settings, listeners: &Listeners, workers: &Workers) {
    let address = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let scheme = if settings.access.listener_tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(
        listen = %address(&listeners.proxy),
        accounts = settings.accounts.len(),
        tls = settings.access.listener_tls.is_some(),
        client_certificates = settings.access.client_ca_file.is_some(),
        client_key = settings.access.client_key.is_some(),
        allow_requests = %settings.access.allow_requests,
        max_connections = settings.max_connections,
        worker_threads = workers.count(),
        "goto-auth-proxy {} forwarding; point API clients at {scheme}://{}",
        env!("CARGO_PKG_VERSION"),
        address(&listeners.proxy),
    );
    if settings.forward.forward {
        tracing::info!(
            inject_hosts = %settings.forward.inject_hosts.join(","),
            other_hosts = ?settings.forward.other_hosts,
            ca_cert_file = %settings.forward.ca_cert_file.display(),
            "forward mode on; set HTTPS_PROXY={scheme}://{} and make clients trust the CA",
            address(&listeners.proxy),
        );
    }
    if let crate::config::StoreKind::Redis { location, .. } = &settings.store.kind {
        tracing::info!(
            store = %location,
            sealed = settings.store.key.is_some(),
            "token state shared with the other replicas through Redis; each state file keeps this replica's copy"
        );
    }
    for account in &settings.accounts {
        tracing::info!(
            account = %account.name,
            upstream = %account.upstream,
            token_url = %account.token_url,
            client_id = %account.client.id,
            state_file = %account.state_file.display(),
            "account configured; waiting for its first access token"
        );
    }
    tracing::info!(
        admin = %address(&listeners.admin),
        "admin endpoints /healthz /readyz /metrics"
    );
}
