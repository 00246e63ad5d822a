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
use crate::config::{AccountSettings, Bootstrap, Settings};
use crate::front::gate::ClientKey;
use crate::front::intercept::NoAuthority;
use crate::front::{Forwarder, FrontDoor};
use crate::metrics::Metrics;
use crate::proxy::rate::RateShaper;
use crate::proxy::route::{Route, RoutePolicy, Router, RoutingTable};
use crate::proxy::upstream::{ConnectOptions, Pools, Upstream};
use crate::proxy::ProxyService;
use crate::server::{serve, Server, ServerOptions};
use crate::shutdown::ShutdownSignal;
use crate::store::{StateStore, StoreError};
use crate::supervisor::{Exit, Health, Supervisor};
use crate::tls::TlsError;
use crate::token::endpoint::unix_now;
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
    mut shutdown: ShutdownSignal,
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
    let mut supervisor = Supervisor::new(health.clone());
    // The refreshers outlive the drain: a request in flight may still need a refresh.
    let (stop_refreshers, refreshers_signal) = crate::shutdown::channel();
    let mut routes = Vec::with_capacity(settings.accounts.len());
    for account in &settings.accounts {
        let (route, refresher) = start_account(&settings, account, &pools, &metrics).await?;
        supervisor.spawn(
            format!("refresher of account {}", account.name),
            refresher.run(refreshers_signal.clone()),
        );
        routes.push(route);
    }
    let router = Arc::new(Router::new(RoutingTable::new(routes)));
    let proxy = Arc::new(ProxyService::new(
        router.clone(),
        metrics.clone(),
        settings.access.allow_requests.clone(),
    ));
    let admin = Arc::new(AdminService::new(router, metrics.clone(), health));
    let server_options = ServerOptions {
        header_read_timeout: settings.header_read_timeout,
        max_header_bytes: settings.max_header_bytes,
        drain_timeout: settings.drain_timeout,
        max_connections: settings.max_connections,
    };
    let proxy_server = Arc::new(Server::new("proxy", server_options.clone()));
    let front = Arc::new(front_door(&settings, proxy, &proxy_server, pools)?);
    log_start(&settings, &listeners);
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
    let serving = serve(
        listeners.proxy,
        proxy_server,
        front,
        settings.access.listener_tls.clone().map(TlsAcceptor::from),
        metrics,
        serving_signal,
    );
    let mut serving = std::pin::pin!(serving);
    let mut drained = false;
    let failure = tokio::select! {
        () = shutdown.wait() => None,
        exit = supervisor.failure() => Some(exit),
        // The listener stops only when told to; should it ever end, stop too.
        () = &mut serving => {
            drained = true;
            None
        }
    };
    stop_serving.trigger();
    if !drained {
        serving.await;
    }
    stop_refreshers.trigger();
    supervisor.join_all().await;
    match failure {
        None => {
            tracing::info!("stopped");
            Ok(())
        }
        Some(exit) => Err(StartError::TaskFailed(exit)),
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

/// One account's route, and the refresher that keeps its token fresh.
async fn start_account(
    settings: &Settings,
    account: &AccountSettings,
    pools: &Pools,
    metrics: &Arc<Metrics>,
) -> Result<(Route, Refresher), StartError> {
    let store = crate::store::open(&account.state_file);
    let (credential, version) = initial_credential(account, store.as_ref()).await?;
    let persist = match credential {
        Credential::Pat(_) => None,
        Credential::RefreshToken { .. } => Some((store, version)),
    };
    let tokens = Arc::new(TokenSource::new());
    let account_metrics = metrics.account(&account.name);
    let refresher = Refresher::new(
        account.token_endpoint(settings)?,
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
        policy: RoutePolicy {
            token_wait: settings.token_wait,
            retry_body_limit: settings.retry_body_limit,
            upstream_timeout: settings.upstream_timeout,
        },
        metrics: account_metrics,
        shaper: Arc::new(RateShaper::new(settings.rate.for_account(account))),
    };
    Ok((route, refresher))
}

fn log_start(settings: &Settings, listeners: &Listeners) {
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
