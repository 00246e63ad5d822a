//! `goto-auth-proxy login`: the first refresh token, by the OAuth
//! authorization-code grant with PKCE (RFC 7636), received on a loopback
//! redirect (RFC 8252) and written to the state file `run` starts from.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use ring::rand::SecureRandom as _;
use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::proxy::body::ProxyBody;
use crate::server::{serve, Answer, Server, ServerOptions};
use crate::store::{LeaseGrant, PersistedState, SaveError, StateStore, StoreError};
use crate::token::endpoint::{unix_now, EndpointError, Grant};

/// GoTo's authorization (consent) endpoint.
pub const DEFAULT_AUTHORIZE_URL: &str = "https://authentication.logmeininc.com/oauth/authorize";
/// The redirect URI to register for the OAuth client.
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";

/// How `login` runs.
#[derive(Clone, Debug)]
pub struct LoginOptions {
    /// The consent page.
    pub authorize_url: reqwest::Url,
    /// Where the browser is sent back to; must be http on a loopback host.
    pub redirect_uri: reqwest::Url,
    /// How long to wait for the browser to come back.
    pub timeout: Duration,
    /// Try to open the consent page in a browser.
    pub open_browser: bool,
    /// The account to sign in for.
    pub account: String,
}

/// Why `login` did not get a refresh token. Texts never hold a secret.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("--redirect-uri must be http:// on 127.0.0.1, [::1] or localhost (RFC 8252 loopback redirect), not {0}")]
    RedirectUri(String),
    #[error("cannot listen for the redirect on {addr}: {source}; stop what uses the port, or register another redirect URI with your OAuth client and pass it as --redirect-uri")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no redirect arrived within {}; open the URL above in a browser and sign in, or pass a longer --timeout", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("consent was not given ({error}{}); run `goto-auth-proxy login` again and allow access", .description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Denied {
        error: String,
        description: Option<String>,
    },
    #[error("the redirect carried a state that this login did not send: a stale browser tab or a forged redirect; run `goto-auth-proxy login` again")]
    StateMismatch,
    #[error("exchanging the code failed: {0}")]
    Exchange(#[from] EndpointError),
    #[error("the token endpoint answered without a refresh token; check that the OAuth client may use refresh tokens")]
    NoRefreshToken,
    #[error("token endpoint client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--store: {0}")]
    StoreSetup(String),
    #[error("no account {0} is configured; name one the configuration declares with --account")]
    UnknownAccount(String),
}

/// The PKCE S256 challenge for `verifier`: BASE64URL(SHA-256(verifier)).
pub fn pkce_challenge(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// The value of `name` in the URI's query, decoded.
pub(crate) fn query_field(uri: &http::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// `bytes` random bytes from the operating system, base64url-encoded.
fn random_string(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buffer)
        .expect("the operating system's random source works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buffer)
}

/// Runs the whole flow and writes the state file. Prints what the user must do.
pub async fn login(
    settings: &Settings,
    options: LoginOptions,
) -> Result<PersistedState, LoginError> {
    let account = settings
        .account(&options.account)
        .ok_or_else(|| LoginError::UnknownAccount(options.account.clone()))?;
    let (listener, redirect_uri) = bind_redirect(&options.redirect_uri).await?;
    let state = random_string(16);
    let verifier = random_string(48);
    let authorize_url = authorize_url(
        &options.authorize_url,
        &account.client.id,
        &redirect_uri,
        &state,
        &verifier,
    );
    println!("Open this URL in a browser and sign in to GoTo:\n\n    {authorize_url}\n");
    println!("Waiting for the redirect to {redirect_uri} ...");
    if options.open_browser {
        open_browser(authorize_url.as_str());
    }
    let code = receive_code(
        listener,
        redirect_uri.path().to_owned(),
        state,
        options.timeout,
    )
    .await?;
    let endpoint = account.token_endpoint(settings)?;
    let grant = endpoint
        .request(&Grant::AuthorizationCode {
            code,
            verifier: SecretString::from(verifier),
            redirect_uri: redirect_uri.to_string(),
        })
        .await?;
    let refresh_token = grant.refresh_token.ok_or(LoginError::NoRefreshToken)?;
    let now = unix_now();
    let persisted = PersistedState {
        refresh_token: Some(refresh_token),
        refresh_token_first_seen: Some(now),
        principal: grant.principal,
        access_token: Some(grant.access_token),
        access_token_expires_at: Some(std::time::SystemTime::now() + grant.lifetime),
        updated_at: now,
    };
    let stores = crate::store::Stores::new(settings).map_err(LoginError::StoreSetup)?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let store = stores.open(account, metrics.account(&account.name));
    save_over_whatever_is_stored(store.as_ref(), &persisted).await?;
    println!(
        "\nSigned in as {}. The refresh token is saved in {} (mode 0600);\n`goto-auth-proxy run` starts from it, and a running proxy picks it up on its own.",
        persisted.principal.as_deref().unwrap_or("(principal not named)"),
        store.location()
    );
    Ok(persisted)
}

/// Saves `state` as the newest: a fresh sign-in supersedes any stored
/// state, so a conflict only means saving again on top of the newer version.
async fn save_over_whatever_is_stored(
    store: &dyn StateStore,
    state: &PersistedState,
) -> Result<(), StoreError> {
    let mut based_on = store.load().await?.map_or(0, |stored| stored.version);
    loop {
        let lease = match store.lease().await? {
            LeaseGrant::Held(lease) => lease,
            // A proxy is refreshing; its save lands first, then this one on top.
            LeaseGrant::Elsewhere => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let saved = store.save(state.clone(), based_on, &lease).await;
        store.release(lease).await;
        match saved {
            Ok(_) => return Ok(()),
            Err(SaveError::Conflict(newer)) => based_on = newer.version,
            Err(SaveError::Store(error)) => return Err(error),
        }
    }
}

/// Binds the loopback redirect address; port 0 takes a free port (for tests).
async fn bind_redirect(
    uri: &reqwest::Url,
) -> Result<(tokio::net::TcpListener, reqwest::Url), LoginError> {
    let ip = match uri.host() {
        Some(url::Host::Ipv4(ip)) if ip.is_loopback() => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) if ip.is_loopback() => IpAddr::V6(ip),
        Some(url::Host::Domain("localhost")) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => return Err(LoginError::RedirectUri(uri.to_string())),
    };
    if uri.scheme() != "http" {
        return Err(LoginError::RedirectUri(uri.to_string()));
    }
    let addr = SocketAddr::new(ip, uri.port().unwrap_or(80));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| LoginError::Listen { addr, source })?;
    let mut actual = uri.clone();
    if let Ok(bound) = listener.local_addr() {
        let _ = actual.set_port(Some(bound.port()));
    }
    Ok((listener, actual))
}

fn authorize_url(
    base: &reqwest::Url,
    client_id: &str,
    redirect_uri: &reqwest::Url,
    state: &str,
    verifier: &str,
) -> reqwest::Url {
    let mut url = base.clone();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", redirect_uri.as_str())
        .append_pair("state", state)
        .append_pair("code_challenge", &pkce_challenge(verifier))
        .append_pair("code_challenge_method", "S256");
    url
}

/// Opens `url` in the desktop's browser, if there is one; silence otherwise.
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let _ = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// What the browser brought back.
enum Callback {
    Code(SecretString),
    Denied {
        error: String,
        description: Option<String>,
    },
    StateMismatch,
}

/// Answers the redirect and hands its outcome to the waiting flow, once.
struct RedirectHandler {
    path: String,
    state: String,
    outcome: Mutex<Option<oneshot::Sender<Callback>>>,
}

impl Answer for RedirectHandler {
    fn answer(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        if request.uri().path() != self.path {
            return page(StatusCode::NOT_FOUND, "Not the redirect path.");
        }
        let field = |name: &str| query_field(request.uri(), name);
        let (callback, status, text) = if field("state").as_deref() != Some(self.state.as_str()) {
            (
                Callback::StateMismatch,
                StatusCode::BAD_REQUEST,
                "Login failed: the state does not match. Run the login again.",
            )
        } else if let Some(error) = field("error") {
            let description = field("error_description");
            (
                Callback::Denied { error, description },
                StatusCode::OK,
                "Login cancelled: access was not granted. You can close this tab.",
            )
        } else if let Some(code) = field("code") {
            (
                Callback::Code(SecretString::from(code)),
                StatusCode::OK,
                "Signed in. You can close this tab and return to the terminal.",
            )
        } else {
            return page(
                StatusCode::BAD_REQUEST,
                "The redirect carries neither a code nor an error.",
            );
        };
        match self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(sender) => {
                let _ = sender.send(callback);
                page(status, text)
            }
            None => page(
                StatusCode::CONFLICT,
                "This login has already been answered.",
            ),
        }
    }
}

fn page(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let html = format!("<!doctype html><title>goto-auth-proxy login</title><p>{text}</p>\n");
    crate::proxy::body::response(status, "text/html; charset=utf-8", html)
}

async fn receive_code(
    listener: tokio::net::TcpListener,
    path: String,
    state: String,
    timeout: Duration,
) -> Result<SecretString, LoginError> {
    let (sender, receiver) = oneshot::channel();
    let handler = Arc::new(RedirectHandler {
        path,
        state,
        outcome: Mutex::new(Some(sender)),
    });
    let (trigger, signal) = crate::shutdown::channel();
    let options = ServerOptions {
        header_read_timeout: Duration::from_secs(10),
        max_header_bytes: 64 * 1024,
        // Long enough for the browser to get its page after the answer.
        drain_timeout: Duration::from_secs(2),
        // One browser, which may open a few connections.
        max_connections: 16,
    };
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let server = tokio::spawn(serve(
        listener,
        Arc::new(Server::new("login redirect", options)),
        handler,
        None,
        metrics,
        signal,
    ));
    let outcome = tokio::time::timeout(timeout, receiver).await;
    trigger.trigger();
    let _ = server.await;
    match outcome {
        Err(_) | Ok(Err(_)) => Err(LoginError::TimedOut(timeout)),
        Ok(Ok(Callback::Code(code))) => Ok(code),
        Ok(Ok(Callback::Denied { error, description })) => {
            Err(LoginError::Denied { error, description })
        }
        Ok(Ok(Callback::StateMismatch)) => Err(LoginError::StateMismatch),
    }
}
