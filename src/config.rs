//! Settings of `run`: one set of keys taken from flags, environment variables
//! and a TOML file (in that order of precedence), then checked and turned into
//! typed [`Settings`] by [`RunOptions::resolve`].

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::{load_secret, LoadedSecret, SecretError};
use crate::token::endpoint::{ClientCredentials, EndpointOptions, TokenEndpoint};

/// Default listen address: loopback, since whoever reaches the proxy acts as the GoTo user.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin listen address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// GoToMeeting, GoToWebinar and the Admin API.
pub const DEFAULT_UPSTREAM: &str = "https://api.getgo.com";
/// GoTo's OAuth token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://authentication.logmeininc.com/oauth/token";
/// Refresh when less than this is left (or half the lifetime, if smaller).
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// How long a request may wait for a token.
pub const DEFAULT_TOKEN_WAIT: Duration = Duration::from_secs(10);
/// Upper bound for opening a TCP connection to the upstream.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound from sending a request upstream to its response headers.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one token request.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for a client to send its request headers (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may finish after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
/// Largest request head accepted; larger ones get 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Request bodies up to this size are kept for a retry after a 401.
pub const DEFAULT_RETRY_BODY_LIMIT: usize = 1024 * 1024;
/// hyper's smallest read buffer; a lower header limit cannot be honoured.
const MIN_HEADER_BYTES: usize = 8 * 1024;

/// Hosts that serve GoTo's APIs; the token is sent nowhere else unless allowed.
pub const GOTO_API_HOSTS: [&str; 2] = ["api.getgo.com", "api.goto.com"];

/// Every setting of `run` as given: strings as typed, before any checking.
///
/// The same struct is parsed from the command line (with environment
/// fallbacks) and from the TOML file, so the keys cannot drift apart.
#[derive(clap::Args, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunOptions {
    /// Address for API clients [default: 127.0.0.1:8080]
    #[arg(long, env = "GOTO_PROXY_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Allow --listen on a non-loopback address: anyone who reaches it acts as the GoTo user
    #[arg(long, env = "GOTO_PROXY_ALLOW_REMOTE_CLIENTS", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_remote_clients: Option<bool>,
    /// Address for /healthz, /readyz and /metrics [default: 127.0.0.1:9090]
    #[arg(long, env = "GOTO_PROXY_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// The GoTo API base URL, optionally with a path prefix [default: https://api.getgo.com]
    #[arg(long, env = "GOTO_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Allow an upstream that is not a GoTo API host (an egress gateway, say)
    #[arg(long, env = "GOTO_ALLOW_CUSTOM_UPSTREAM", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_custom_upstream: Option<bool>,
    /// PEM file of extra root certificates for the upstream and the token endpoint
    #[arg(long, env = "GOTO_UPSTREAM_CA_FILE", value_name = "PATH")]
    pub upstream_ca_file: Option<PathBuf>,
    /// OAuth token endpoint [default: https://authentication.logmeininc.com/oauth/token]
    #[arg(long, env = "GOTO_TOKEN_URL", value_name = "URL")]
    pub token_url: Option<String>,
    /// OAuth client id (required)
    #[arg(long, env = "GOTO_CLIENT_ID", value_name = "ID")]
    pub client_id: Option<String>,
    /// File holding the OAuth client secret (or put the secret in GOTO_CLIENT_SECRET)
    #[arg(long, env = "GOTO_CLIENT_SECRET_FILE", value_name = "PATH")]
    pub client_secret_file: Option<PathBuf>,
    /// File holding the bootstrap refresh token (or put it in GOTO_REFRESH_TOKEN)
    #[arg(long, env = "GOTO_REFRESH_TOKEN_FILE", value_name = "PATH")]
    pub refresh_token_file: Option<PathBuf>,
    /// File holding a personal access token, used instead of a refresh token (or GOTO_PAT)
    #[arg(long, env = "GOTO_PAT_FILE", value_name = "PATH")]
    pub pat_file: Option<PathBuf>,
    /// Where the rotating refresh token is kept [default: $STATE_DIRECTORY/state.json,
    /// else $XDG_STATE_HOME/goto-auth-proxy/state.json, else ~/.local/state/goto-auth-proxy/state.json]
    #[arg(long, env = "GOTO_STATE_FILE", value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    /// Refresh when less than this is left, or half the lifetime if smaller [default: 300s]
    #[arg(long, env = "GOTO_REFRESH_MARGIN", value_name = "DURATION")]
    pub refresh_margin: Option<String>,
    /// How long a request may wait for a token refresh under way [default: 10s]
    #[arg(long, env = "GOTO_TOKEN_WAIT", value_name = "DURATION")]
    pub token_wait: Option<String>,
    /// Upper bound for opening a connection to the upstream [default: 5s]
    #[arg(long, env = "GOTO_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Upper bound for the upstream's response headers; then 504 [default: 60s]
    #[arg(long, env = "GOTO_UPSTREAM_TIMEOUT", value_name = "DURATION")]
    pub upstream_timeout: Option<String>,
    /// Upper bound for one token request [default: 10s]
    #[arg(long, env = "GOTO_TOKEN_TIMEOUT", value_name = "DURATION")]
    pub token_timeout: Option<String>,
    /// Upper bound for a client to send its request headers [default: 10s]
    #[arg(long, env = "GOTO_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// How long requests in flight may finish after SIGTERM/SIGINT [default: 25s]
    #[arg(long, env = "GOTO_DRAIN_TIMEOUT", value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Largest request head accepted; larger ones get 431 [default: 64KiB]
    #[arg(long, env = "GOTO_MAX_HEADER_BYTES", value_name = "SIZE")]
    pub max_header_bytes: Option<String>,
    /// Request bodies up to this size are kept to retry after a 401 [default: 1MiB]
    #[arg(long, env = "GOTO_RETRY_BODY_LIMIT", value_name = "SIZE")]
    pub retry_body_limit: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "GOTO_PROXY_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A setting that is wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    /// The flag at fault (its env var and TOML key follow from it).
    pub setting: &'static str,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl ConfigError {
    fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

/// The upstream the proxy forwards to.
#[derive(Clone, Debug)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// A path prefix without a trailing slash ("" for none).
    pub base_path: String,
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// What the proxy authenticates with to get its first access token.
#[derive(Clone, Debug)]
pub enum Bootstrap {
    /// A refresh token given by the operator; the state file's one, if any, comes first.
    RefreshToken(LoadedSecret),
    /// A personal access token.
    Pat(LoadedSecret),
    /// Nothing given: the state file must hold a refresh token.
    None,
}

/// Checked, typed settings of `run`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream: UpstreamUrl,
    pub upstream_ca_file: Option<PathBuf>,
    /// The contents of `upstream_ca_file`, checked to hold at least one certificate.
    pub extra_roots_pem: Option<Vec<u8>>,
    pub token_url: reqwest::Url,
    pub client: ClientCredentials,
    pub client_secret_origin: crate::secret::SecretOrigin,
    pub bootstrap: Bootstrap,
    pub state_file: PathBuf,
    pub refresh_margin: Duration,
    pub token_wait: Duration,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub token_timeout: Duration,
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_header_bytes: usize,
    pub retry_body_limit: usize,
    pub log_format: LogFormat,
}

impl RunOptions {
    /// Reads a TOML file of settings. Errors give the line, never the line's text
    /// (it could hold a secret pasted where it does not belong).
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|span| text[..span.start].matches('\n').count() + 1);
            let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
            let inline_secret = ["`client_secret`", "`refresh_token`", "`pat`"]
                .iter()
                .any(|key| e.message().contains(&format!("unknown field {key}")));
            let hint = if inline_secret {
                " (secrets are never taken inline: name a file with client_secret_file, refresh_token_file or pat_file)"
            } else {
                ""
            };
            ConfigError::new(
                "--config",
                format!("{}{at}: {}{hint}", path.display(), e.message().trim()),
            )
        })
    }

    /// These options with every unset key taken from `lower` (flag/env over file).
    pub fn over(self, lower: RunOptions) -> RunOptions {
        let mut merged = to_map(lower);
        merged.extend(to_map(self));
        serde_json::from_value(serde_json::Value::Object(merged)).expect("options round-trip")
    }

    /// Checks every setting and loads the secrets it names.
    pub fn resolve(
        self,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let listen = parse_addr("--listen", self.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
        if !listen.ip().is_loopback() && !self.allow_remote_clients.unwrap_or(false) {
            return Err(ConfigError::new(
                "--listen",
                format!(
                    "{listen} is not a loopback address, and anyone who can reach the proxy acts as the GoTo user; \
                     listen on 127.0.0.1, or if the network in front is trusted set --allow-remote-clients \
                     (GOTO_PROXY_ALLOW_REMOTE_CLIENTS=true)"
                ),
            ));
        }
        let admin_listen = parse_addr(
            "--admin-listen",
            self.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        )?;
        let upstream = parse_upstream(
            self.upstream.as_deref().unwrap_or(DEFAULT_UPSTREAM),
            self.allow_custom_upstream.unwrap_or(false),
        )?;
        let extra_roots_pem = self
            .upstream_ca_file
            .as_deref()
            .map(read_ca_file)
            .transpose()?;
        let token_url = parse_token_url(self.token_url.as_deref().unwrap_or(DEFAULT_TOKEN_URL))?;
        let client_id = self
            .client_id
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| {
                ConfigError::new(
                    "--client-id",
                    "required: set --client-id or GOTO_CLIENT_ID to your OAuth client's id",
                )
            })?;
        let client_secret = load_secret(
            self.client_secret_file.as_deref(),
            "--client-secret-file",
            "GOTO_CLIENT_SECRET",
            lookup_env,
        )
        .map_err(|e| secret_error("--client-secret-file", e))?
        .ok_or_else(|| {
            ConfigError::new(
                "--client-secret-file",
                "required: set --client-secret-file / GOTO_CLIENT_SECRET_FILE to a file holding the client secret, \
                 or put the secret in GOTO_CLIENT_SECRET",
            )
        })?;
        let bootstrap = resolve_bootstrap(
            self.refresh_token_file.as_deref(),
            self.pat_file.as_deref(),
            lookup_env,
        )?;
        let state_file = match self.state_file {
            Some(path) => path,
            None => default_state_file(lookup_env),
        };
        let settings = Settings {
            listen,
            admin_listen,
            upstream,
            upstream_ca_file: self.upstream_ca_file,
            extra_roots_pem,
            token_url,
            client: ClientCredentials {
                id: client_id,
                secret: client_secret.value,
            },
            client_secret_origin: client_secret.origin,
            bootstrap,
            state_file,
            refresh_margin: duration(
                "--refresh-margin",
                self.refresh_margin,
                DEFAULT_REFRESH_MARGIN,
            )?,
            token_wait: duration("--token-wait", self.token_wait, DEFAULT_TOKEN_WAIT)?,
            connect_timeout: positive_duration(
                "--connect-timeout",
                self.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            upstream_timeout: positive_duration(
                "--upstream-timeout",
                self.upstream_timeout,
                DEFAULT_UPSTREAM_TIMEOUT,
            )?,
            token_timeout: positive_duration(
                "--token-timeout",
                self.token_timeout,
                DEFAULT_TOKEN_TIMEOUT,
            )?,
            header_read_timeout: positive_duration(
                "--header-read-timeout",
                self.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            drain_timeout: duration("--drain-timeout", self.drain_timeout, DEFAULT_DRAIN_TIMEOUT)?,
            max_header_bytes: size(
                "--max-header-bytes",
                self.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
            )?,
            retry_body_limit: size(
                "--retry-body-limit",
                self.retry_body_limit,
                DEFAULT_RETRY_BODY_LIMIT,
            )?,
            log_format: parse_log_format(self.log_format.as_deref())?,
        };
        if settings.max_header_bytes < MIN_HEADER_BYTES {
            return Err(ConfigError::new(
                "--max-header-bytes",
                format!("must be at least {MIN_HEADER_BYTES} bytes"),
            ));
        }
        Ok(settings)
    }
}

impl Settings {
    /// A client for the configured token endpoint, as the configured OAuth client.
    pub fn token_endpoint(&self) -> Result<TokenEndpoint, reqwest::Error> {
        TokenEndpoint::new(
            self.token_url.clone(),
            self.client.clone(),
            &EndpointOptions {
                timeout: self.token_timeout,
                extra_roots_pem: self.extra_roots_pem.clone(),
            },
        )
    }

    /// A listing of the effective settings for `run --check`; secrets appear
    /// only as where they come from.
    pub fn describe(&self) -> String {
        let bootstrap = match &self.bootstrap {
            Bootstrap::RefreshToken(s) => format!("refresh token from {}", s.origin),
            Bootstrap::Pat(s) => format!("personal access token from {}", s.origin),
            Bootstrap::None => "none (the state file must hold a refresh token)".to_owned(),
        };
        let lines = [
            ("listen", self.listen.to_string()),
            ("admin_listen", self.admin_listen.to_string()),
            ("upstream", self.upstream.to_string()),
            (
                "upstream_ca_file",
                self.upstream_ca_file
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string()),
            ),
            ("token_url", self.token_url.to_string()),
            ("client_id", self.client.id.clone()),
            (
                "client_secret",
                format!("from {}", self.client_secret_origin),
            ),
            ("bootstrap", bootstrap),
            ("state_file", self.state_file.display().to_string()),
            (
                "refresh_margin",
                humantime::format_duration(self.refresh_margin).to_string(),
            ),
            (
                "token_wait",
                humantime::format_duration(self.token_wait).to_string(),
            ),
            (
                "connect_timeout",
                humantime::format_duration(self.connect_timeout).to_string(),
            ),
            (
                "upstream_timeout",
                humantime::format_duration(self.upstream_timeout).to_string(),
            ),
            (
                "token_timeout",
                humantime::format_duration(self.token_timeout).to_string(),
            ),
            (
                "header_read_timeout",
                humantime::format_duration(self.header_read_timeout).to_string(),
            ),
            (
                "drain_timeout",
                humantime::format_duration(self.drain_timeout).to_string(),
            ),
            ("max_header_bytes", self.max_header_bytes.to_string()),
            ("retry_body_limit", self.retry_body_limit.to_string()),
            (
                "log_format",
                format!("{:?}", self.log_format).to_lowercase(),
            ),
        ];
        lines
            .iter()
            .map(|(key, value)| format!("{key} = {value}\n"))
            .collect()
    }
}

fn to_map(options: RunOptions) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(options).expect("options serialize") {
        serde_json::Value::Object(mut map) => {
            map.retain(|_, value| !value.is_null());
            map
        }
        _ => unreachable!("a struct serializes to an object"),
    }
}

fn secret_error(setting: &'static str, error: SecretError) -> ConfigError {
    ConfigError::new(setting, error.to_string())
}

fn resolve_bootstrap(
    refresh_token_file: Option<&Path>,
    pat_file: Option<&Path>,
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<Bootstrap, ConfigError> {
    let refresh = load_secret(
        refresh_token_file,
        "--refresh-token-file",
        "GOTO_REFRESH_TOKEN",
        lookup_env,
    )
    .map_err(|e| secret_error("--refresh-token-file", e))?;
    let pat = load_secret(pat_file, "--pat-file", "GOTO_PAT", lookup_env)
        .map_err(|e| secret_error("--pat-file", e))?;
    match (refresh, pat) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            "--pat-file",
            "both a refresh token and a personal access token are given; keep only one",
        )),
        (Some(refresh), None) => Ok(Bootstrap::RefreshToken(refresh)),
        (None, Some(pat)) => Ok(Bootstrap::Pat(pat)),
        (None, None) => Ok(Bootstrap::None),
    }
}

/// The documented default place for the state file.
pub fn default_state_file(lookup_env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let non_empty = |name: &str| {
        lookup_env(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = non_empty("STATE_DIRECTORY") {
        // systemd's StateDirectory= may list several, separated by colons.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        return PathBuf::from(first).join("state.json");
    }
    if let Some(dir) = non_empty("XDG_STATE_HOME") {
        return dir.join("goto-auth-proxy/state.json");
    }
    if let Some(home) = non_empty("HOME") {
        return home.join(".local/state/goto-auth-proxy/state.json");
    }
    PathBuf::from("goto-auth-proxy-state.json")
}

fn parse_addr(setting: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            setting,
            format!("{value:?} is not an IP address with a port, such as 127.0.0.1:8080"),
        )
    })
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl UpstreamUrl {
    /// Parses and checks an upstream URL: https (http only to loopback), and a
    /// GoTo API host unless `allow_custom`.
    pub fn parse(value: &str, allow_custom: bool) -> Result<Self, ConfigError> {
        parse_upstream(value, allow_custom)
    }
}

fn parse_upstream(value: &str, allow_custom: bool) -> Result<UpstreamUrl, ConfigError> {
    const SETTING: &str = "--upstream";
    let uri: http::Uri = value.trim().parse().map_err(|_| {
        ConfigError::new(
            SETTING,
            format!("{value:?} is not a URL such as https://api.getgo.com"),
        )
    })?;
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        return Err(ConfigError::new(
            SETTING,
            format!("{value:?} needs a scheme and a host, such as https://api.getgo.com"),
        ));
    };
    if authority.as_str().contains('@') {
        return Err(ConfigError::new(
            SETTING,
            "credentials in the URL are not supported",
        ));
    }
    if uri.query().is_some() {
        return Err(ConfigError::new(
            SETTING,
            "a query string in the upstream URL is not supported",
        ));
    }
    let loopback = is_loopback_host(authority.host());
    if scheme == http::uri::Scheme::HTTP && !loopback {
        return Err(ConfigError::new(
            SETTING,
            "plain http would send the token in clear text; use https (http is only for loopback test servers)",
        ));
    }
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(ConfigError::new(
            SETTING,
            format!("unsupported scheme {scheme}; use https"),
        ));
    }
    let known = GOTO_API_HOSTS
        .iter()
        .any(|h| authority.host().eq_ignore_ascii_case(h));
    if !known && !loopback && !allow_custom {
        return Err(ConfigError::new(
            SETTING,
            format!(
                "{} is not a GoTo API host ({}), and the proxy sends the GoTo token to it; \
                 if that is intended (an egress gateway, say), also set --allow-custom-upstream",
                authority.host(),
                GOTO_API_HOSTS.join(", ")
            ),
        ));
    }
    Ok(UpstreamUrl {
        scheme,
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
    })
}

fn parse_token_url(value: &str) -> Result<reqwest::Url, ConfigError> {
    const SETTING: &str = "--token-url";
    let url = reqwest::Url::parse(value.trim())
        .map_err(|e| ConfigError::new(SETTING, format!("{value:?} is not a URL: {e}")))?;
    let loopback = url.host_str().is_some_and(is_loopback_host);
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(ConfigError::new(
            SETTING,
            "the token endpoint must be https (http is only for loopback test servers)",
        )),
    }
}

fn read_ca_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    const SETTING: &str = "--upstream-ca-file";
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::new(SETTING, format!("cannot read {}: {e}", path.display())))?;
    let certificates = crate::tls::certificates_from_pem(&pem)
        .map_err(|e| ConfigError::new(SETTING, format!("{}: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(ConfigError::new(
            SETTING,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(pem)
}

fn parse_duration(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|_| {
        ConfigError::new(
            setting,
            format!("{value:?} is not a duration such as 300s, 5m or 1h30m"),
        )
    })
}

fn duration(
    setting: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    value.map_or(Ok(default), |v| parse_duration(setting, &v))
}

fn positive_duration(
    setting: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let parsed = duration(setting, value, default)?;
    if parsed.is_zero() {
        return Err(ConfigError::new(setting, "must be longer than zero"));
    }
    Ok(parsed)
}

/// A byte size: a plain number, or one with a KiB/MiB/KB/MB suffix.
fn size(
    setting: &'static str,
    value: Option<String>,
    default: usize,
) -> Result<usize, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let text = value.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1024,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1024 * 1024,
        _ => 0,
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|_| multiplier > 0)
        .ok_or_else(|| {
            ConfigError::new(
                setting,
                format!("{value:?} is not a size such as 65536, 64KiB or 1MiB"),
            )
        })
}

fn parse_log_format(value: Option<&str>) -> Result<LogFormat, ConfigError> {
    match value.map(str::trim) {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(ConfigError::new(
            "--log-format",
            format!("{other:?} is neither text nor json"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RunOptions {
        RunOptions {
            client_id: Some("client".into()),
            ..RunOptions::default()
        }
    }

    fn env_with_secret(name: &str) -> Option<String> {
        (name == "GOTO_CLIENT_SECRET").then(|| "s".to_owned())
    }

    fn error_of(options: RunOptions) -> ConfigError {
        options.resolve(&env_with_secret).unwrap_err()
    }

    #[test]
    fn defaults_apply() {
        let settings = base().resolve(&env_with_secret).unwrap();
        assert_eq!(settings.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(settings.upstream.to_string(), DEFAULT_UPSTREAM);
        assert_eq!(settings.refresh_margin, DEFAULT_REFRESH_MARGIN);
        assert_eq!(settings.retry_body_limit, DEFAULT_RETRY_BODY_LIMIT);
        assert!(matches!(settings.bootstrap, Bootstrap::None));
    }

    #[test]
    fn higher_layer_wins_key_by_key() {
        let file = RunOptions {
            listen: Some("127.0.0.1:1".into()),
            token_wait: Some("3s".into()),
            ..RunOptions::default()
        };
        let cli = RunOptions {
            listen: Some("127.0.0.1:2".into()),
            ..RunOptions::default()
        };
        let merged = cli.over(file);
        assert_eq!(merged.listen.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(merged.token_wait.as_deref(), Some("3s"));
    }

    #[test]
    fn non_loopback_listen_needs_a_deliberate_flag() {
        let wide = RunOptions {
            listen: Some("0.0.0.0:8080".into()),
            ..base()
        };
        let err = error_of(wide.clone());
        assert_eq!(err.setting, "--listen");
        assert!(err.problem.contains("--allow-remote-clients"));
        let allowed = RunOptions {
            allow_remote_clients: Some(true),
            ..wide
        };
        assert!(allowed.resolve(&env_with_secret).is_ok());
    }

    #[test]
    fn upstream_must_be_a_goto_host_over_https() {
        for (url, ok) in [
            ("https://api.getgo.com", true),
            ("https://api.goto.com/admin/", true),
            ("http://127.0.0.1:9/x", true),
            ("http://api.getgo.com", false),
            ("https://evil.example.com", false),
            ("ftp://127.0.0.1", false),
            ("not a url", false),
        ] {
            let result = RunOptions {
                upstream: Some(url.into()),
                ..base()
            }
            .resolve(&env_with_secret);
            assert_eq!(result.is_ok(), ok, "{url}: {:?}", result.err());
        }
        let custom = RunOptions {
            upstream: Some("https://egress.corp.example/goto".into()),
            allow_custom_upstream: Some(true),
            ..base()
        };
        assert_eq!(
            custom.resolve(&env_with_secret).unwrap().upstream.base_path,
            "/goto"
        );
    }

    #[test]
    fn token_url_must_be_https_unless_loopback() {
        let err = error_of(RunOptions {
            token_url: Some("http://auth.example.com/t".into()),
            ..base()
        });
        assert_eq!(err.setting, "--token-url");
        assert!(RunOptions {
            token_url: Some("http://localhost:1/t".into()),
            ..base()
        }
        .resolve(&env_with_secret)
        .is_ok());
    }

    #[test]
    fn missing_client_settings_name_the_setting() {
        assert_eq!(error_of(RunOptions::default()).setting, "--client-id");
        let err = base().resolve(&|_| None).unwrap_err();
        assert_eq!(err.setting, "--client-secret-file");
        assert!(err.problem.contains("GOTO_CLIENT_SECRET"));
    }

    #[test]
    fn refresh_token_and_pat_are_exclusive() {
        let env = |name: &str| match name {
            "GOTO_CLIENT_SECRET" | "GOTO_REFRESH_TOKEN" | "GOTO_PAT" => Some("x".to_owned()),
            _ => None,
        };
        assert_eq!(base().resolve(&env).unwrap_err().setting, "--pat-file");
    }

    #[test]
    fn durations_and_sizes_parse_or_say_why_not() {
        let settings = RunOptions {
            refresh_margin: Some("2m".into()),
            retry_body_limit: Some("2MiB".into()),
            max_header_bytes: Some("16KiB".into()),
            ..base()
        }
        .resolve(&env_with_secret)
        .unwrap();
        assert_eq!(settings.refresh_margin, Duration::from_secs(120));
        assert_eq!(settings.retry_body_limit, 2 * 1024 * 1024);
        assert_eq!(settings.max_header_bytes, 16 * 1024);
        assert_eq!(
            error_of(RunOptions {
                token_wait: Some("soon".into()),
                ..base()
            })
            .setting,
            "--token-wait"
        );
        assert_eq!(
            error_of(RunOptions {
                retry_body_limit: Some("lots".into()),
                ..base()
            })
            .setting,
            "--retry-body-limit"
        );
        assert_eq!(
            error_of(RunOptions {
                upstream_timeout: Some("0s".into()),
                ..base()
            })
            .setting,
            "--upstream-timeout"
        );
        assert_eq!(
            error_of(RunOptions {
                max_header_bytes: Some("100".into()),
                ..base()
            })
            .setting,
            "--max-header-bytes"
        );
    }

    #[test]
    fn toml_errors_give_the_line_but_not_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1\"\nclient_secret = \"hunter2\"\n",
        )
        .unwrap();
        let err = RunOptions::from_toml_file(&path).unwrap_err();
        assert!(err.problem.contains("line 2"), "{err}");
        assert!(err.problem.contains("client_secret_file"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn default_state_file_follows_the_environment() {
        let env = |name: &str| match name {
            "XDG_STATE_HOME" => Some("/x".to_owned()),
            "HOME" => Some("/home/u".to_owned()),
            _ => None,
        };
        assert_eq!(
            default_state_file(&env),
            PathBuf::from("/x/goto-auth-proxy/state.json")
        );
        let home = |name: &str| (name == "HOME").then(|| "/home/u".to_owned());
        assert_eq!(
            default_state_file(&home),
            PathBuf::from("/home/u/.local/state/goto-auth-proxy/state.json")
        );
        let systemd =
            |name: &str| (name == "STATE_DIRECTORY").then(|| "/var/lib/gap:/other".to_owned());
        assert_eq!(
            default_state_file(&systemd),
            PathBuf::from("/var/lib/gap/state.json")
        );
    }
}
