//! Wiring: builds the token source, refresher, upstream client and both
//! listeners from [`Settings`], and runs them until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::admin::AdminService;
use crate::config::{Bootstrap, Settings};
use crate::metrics::Metrics;
use crate::proxy::upstream::{Upstream, UpstreamOptions};
use crate::proxy::{ProxyOptions, ProxyService};
use crate::server::{serve, ServerOptions};
use crate::shutdown::ShutdownSignal;
use crate::store::{FileStore, StateStore, StoreError};
use crate::tls::TlsError;
use crate::token::endpoint::unix_now;
use crate::token::refresher::{Credential, Refresher};
use crate::token::TokenSource;

/// Why the proxy could not start.
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

/// The credential to start with: the state file's refresh token first, the
/// bootstrap token as its fallback; or the PAT.
pub async fn initial_credential(
    settings: &Settings,
    store: &dyn StateStore,
) -> Result<Credential, StartError> {
    let refresh = match &settings.bootstrap {
        Bootstrap::Pat(pat) => return Ok(Credential::Pat(pat.value.clone())),
        Bootstrap::RefreshToken(bootstrap) => Some(bootstrap.value.clone()),
        Bootstrap::None => None,
    };
    let stored = store.load().await?;
    let stored_token = stored.as_ref().and_then(|s| {
        s.refresh_token
            .clone()
            .map(|t| (t, s.refresh_token_first_seen))
    });
    match (stored_token, refresh) {
        (Some((current, since)), bootstrap) => {
            use secrecy::ExposeSecret;
            let fallback = bootstrap.filter(|b| b.expose_secret() != current.expose_secret());
            Ok(Credential::RefreshToken {
                current,
                since: since.unwrap_or_else(unix_now),
                fallback,
            })
        }
        (None, Some(bootstrap)) => Ok(Credential::RefreshToken {
            current: bootstrap,
            since: unix_now(),
            fallback: None,
        }),
        (None, None) => Err(StartError::NoRefreshToken(settings.state_file.clone())),
    }
}

/// Runs the proxy on `listeners` until `shutdown` fires, then drains and returns.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: ShutdownSignal,
) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::new());
    let tokens = Arc::new(TokenSource::new());
    let store = Arc::new(FileStore::new(&settings.state_file));
    match store.remove_leftovers() {
        Ok(0) => {}
        Ok(count) => tracing::info!(
            count,
            "removed temporary files an interrupted state write left behind"
        ),
        Err(error) => tracing::warn!(error = %error, "cannot clean up beside the state file"),
    }
    let credential = initial_credential(&settings, store.as_ref()).await?;
    let persist: Option<Arc<dyn StateStore>> = match credential {
        Credential::Pat(_) => None,
        Credential::RefreshToken { .. } => Some(store.clone()),
    };
    let endpoint = settings.token_endpoint()?;
    let refresher = Refresher::new(
        endpoint,
        credential,
        persist,
        tokens.clone(),
        metrics.clone(),
        settings.refresh_margin,
    );
    let upstream = Upstream::new(
        &UpstreamOptions {
            url: settings.upstream.clone(),
            extra_roots_pem: settings.extra_roots_pem.clone(),
            connect_timeout: settings.connect_timeout,
            response_timeout: settings.upstream_timeout,
        },
        metrics.clone(),
    )?;
    let proxy = Arc::new(ProxyService::new(
        tokens.clone(),
        upstream,
        metrics.clone(),
        ProxyOptions {
            token_wait: settings.token_wait,
            retry_body_limit: settings.retry_body_limit,
        },
    ));
    let admin = Arc::new(AdminService::new(tokens, metrics));
    let server_options = ServerOptions {
        header_read_timeout: settings.header_read_timeout,
        max_header_bytes: settings.max_header_bytes,
        drain_timeout: settings.drain_timeout,
    };
    log_start(&settings, &listeners);
    // The refresher outlives the drain: a request in flight may still need a refresh.
    let (stop_refresher, refresher_signal) = crate::shutdown::channel();
    let refresher = tokio::spawn(refresher.run(refresher_signal));
    let admin = tokio::spawn(serve(
        "admin",
        listeners.admin,
        admin,
        server_options.clone(),
        shutdown.clone(),
    ));
    serve("proxy", listeners.proxy, proxy, server_options, shutdown).await;
    stop_refresher.trigger();
    let _ = tokio::join!(admin, refresher);
    tracing::info!("stopped");
    Ok(())
}

fn log_start(settings: &Settings, listeners: &Listeners) {
    let address = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        listen = %address(&listeners.proxy),
        upstream = %settings.upstream,
        "goto-auth-proxy {} forwarding; point API clients at http://{}",
        env!("CARGO_PKG_VERSION"),
        address(&listeners.proxy),
    );
    tracing::info!(
        admin = %address(&listeners.admin),
        token_url = %settings.token_url,
        client_id = %settings.client.id,
        state_file = %settings.state_file.display(),
        "admin endpoints /healthz /readyz /metrics; waiting for the first access token"
    );
}
