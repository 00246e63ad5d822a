//! Settings of `run`, in three layers: [`options`] holds the keys as given
//! (flags, environment variables and a TOML file, merged in that order of
//! precedence), [`parse`] turns one value into its type, and [`validate`]
//! checks them all into the typed [`Settings`] below.

pub mod options;
pub mod parse;
pub mod store;
mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

pub use self::options::{AccountTable, RunOptions, StoreUrl};
pub use self::parse::{default_state_file, is_loopback_host, named_state_file};
pub use self::store::{StoreKind, StoreSettings};
use crate::ca::CertificateAuthority;
use crate::outbound::ConnectTo;
use crate::proxy::allow::RequestRules;
use crate::secret::{LoadedSecret, SecretOrigin};
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
/// Upper bound from sending a request upstream to its response headers,
/// every retry included.
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
/// Client connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// hyper's smallest read buffer; a lower header limit cannot be honoured.
const MIN_HEADER_BYTES: usize = 8 * 1024;
/// The account the top-level settings describe.
pub const DEFAULT_ACCOUNT: &str = "default";

/// Hosts that serve GoTo's APIs; the token is sent nowhere else unless allowed.
pub const GOTO_API_HOSTS: [&str; 2] = ["api.getgo.com", "api.goto.com"];
/// Forward mode's default inject hosts: GoTo's API hosts and GoTo Connect's older one.
pub const DEFAULT_INJECT_HOSTS: &str = "api.getgo.com,api.goto.com,api.jive.com";

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
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

/// The upstream an account's requests are forwarded to.
#[derive(Clone, Debug)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// A path prefix without a trailing slash ("" for none), free of dot segments.
    pub base_path: String,
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

impl UpstreamUrl {
    /// Parses and checks an upstream URL: https (http only to loopback), and a
    /// GoTo API host unless `allow_custom`.
    pub fn parse(value: &str, allow_custom: bool) -> Result<Self, ConfigError> {
        parse::upstream(value, allow_custom)
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

/// One GoTo account: the OAuth client, its credential, where its state
/// lives and where its requests go. Each account gets a token source and a
/// refresher of its own.
#[derive(Clone, Debug, Serialize)]
pub struct AccountSettings {
    /// The account's name (`default` for the top-level settings).
    #[serde(skip)]
    pub name: String,
    /// Where requests go.
    #[serde(serialize_with = "display")]
    pub upstream: UpstreamUrl,
    /// The OAuth token endpoint.
    #[serde(serialize_with = "display")]
    pub token_url: reqwest::Url,
    /// The OAuth client; only its id is ever shown.
    #[serde(rename = "client_id", serialize_with = "client_id")]
    pub client: ClientCredentials,
    /// Where the client secret came from.
    #[serde(rename = "client_secret", serialize_with = "origin")]
    pub client_secret_origin: SecretOrigin,
    /// The first credential.
    #[serde(serialize_with = "bootstrap")]
    pub bootstrap: Bootstrap,
    /// The state file.
    #[serde(serialize_with = "path")]
    pub state_file: PathBuf,
}

/// Checked, typed settings of `run`. Serializing them gives the listing of
/// `run --check`, so the listing cannot miss a setting.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Where API clients connect.
    pub listen: SocketAddr,
    /// Where probes and Prometheus connect.
    pub admin_listen: SocketAddr,
    /// Extra roots for every outgoing TLS connection.
    #[serde(serialize_with = "optional_path")]
    pub upstream_ca_file: Option<PathBuf>,
    /// The contents of `upstream_ca_file`, checked to hold at least one certificate.
    #[serde(skip)]
    pub extra_roots_pem: Option<Vec<u8>>,
    /// The accounts; today one, `default`.
    pub accounts: Vec<AccountSettings>,
    /// Where token state is shared.
    #[serde(flatten)]
    pub store: StoreSettings,
    /// Refresh when less than this is left.
    #[serde(serialize_with = "duration")]
    pub refresh_margin: Duration,
    /// How long a request may wait for a token.
    #[serde(serialize_with = "duration")]
    pub token_wait: Duration,
    /// Upper bound for connecting to the upstream.
    #[serde(serialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Upper bound for the upstream's response headers, retries included.
    #[serde(serialize_with = "duration")]
    pub upstream_timeout: Duration,
    /// Upper bound for one token request.
    #[serde(serialize_with = "duration")]
    pub token_timeout: Duration,
    /// Upper bound for a client's request head.
    #[serde(serialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// How long requests in flight may finish at shutdown.
    #[serde(serialize_with = "duration")]
    pub drain_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Request bodies up to this size are kept for a retry.
    pub retry_body_limit: usize,
    /// Client connections served at once.
    pub max_connections: usize,
    /// Log output format.
    pub log_format: LogFormat,
    /// Whether each request gets an access log line.
    pub access_log: bool,
    /// Rate shaping.
    #[serde(flatten)]
    pub rate: RateOptions,
    /// Who may use the main listener, and what they may ask.
    #[serde(flatten)]
    pub access: AccessSettings,
    /// Forward mode.
    #[serde(flatten)]
    pub forward: ForwardSettings,
    /// Where outgoing connections go instead.
    #[serde(serialize_with = "display")]
    pub connect_to: Arc<ConnectTo>,
}

/// Who may use the main listener, how it speaks, and what may be asked
/// with the token.
#[derive(Clone, Debug, Serialize)]
pub struct AccessSettings {
    /// The listener's certificate chain: TLS on when set.
    #[serde(serialize_with = "optional_path")]
    pub tls_cert_file: Option<PathBuf>,
    /// Its key.
    #[serde(serialize_with = "optional_path")]
    pub tls_key_file: Option<PathBuf>,
    /// Clients must present a certificate from this CA.
    #[serde(serialize_with = "optional_path")]
    pub client_ca_file: Option<PathBuf>,
    /// The listener's TLS configuration, made from the three files above.
    #[serde(skip)]
    pub listener_tls: Option<Arc<rustls::ServerConfig>>,
    /// The key clients must send in `Proxy-Authorization`.
    #[serde(serialize_with = "optional_origin")]
    pub client_key: Option<LoadedSecret>,
    /// A non-loopback listener without client authentication was asked for.
    pub allow_remote_clients: bool,
    /// Which requests may carry the token.
    #[serde(serialize_with = "display")]
    pub allow_requests: Arc<RequestRules>,
}

/// Rate shaping, per account and API.
#[derive(Clone, Debug, Serialize)]
pub struct RateOptions {
    /// Requests per second; `None`: by the account's upstream.
    #[serde(rename = "rate_limit", serialize_with = "rate_limit")]
    pub limit: Option<u32>,
    /// Requests let through at once; `None`: the limit.
    #[serde(rename = "rate_burst", serialize_with = "rate_burst")]
    pub burst: Option<u32>,
    /// Requests waiting per bucket.
    #[serde(rename = "rate_queue")]
    pub queue: usize,
    /// The longest wait for a turn.
    #[serde(rename = "rate_wait", serialize_with = "duration")]
    pub wait: Duration,
}

/// GoTo's documented default limit, per API.
pub const GOTO_RATE_LIMIT: u32 = 10;
/// Requests waiting per bucket.
pub const DEFAULT_RATE_QUEUE: usize = 100;
/// The longest wait for a turn.
pub const DEFAULT_RATE_WAIT: Duration = Duration::from_secs(5);

impl RateOptions {
    /// The shaping of `account`'s requests: the limit as set, else GoTo's
    /// for a GoTo API upstream and none for any other (a stand-in, a
    /// benchmark target).
    pub fn for_account(&self, account: &AccountSettings) -> crate::proxy::rate::RateSettings {
        let host = account.upstream.authority.host();
        let goto = GOTO_API_HOSTS.iter().any(|h| host.eq_ignore_ascii_case(h));
        let per_second = self.limit.unwrap_or(if goto { GOTO_RATE_LIMIT } else { 0 });
        crate::proxy::rate::RateSettings {
            per_second,
            burst: self.burst.unwrap_or(per_second),
            queue: self.queue,
            max_wait: self.wait,
        }
    }
}

fn rate_limit<S: Serializer>(value: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(limit) => s.serialize_u32(*limit),
        None => s.collect_str(&format_args!(
            "{GOTO_RATE_LIMIT} for a GoTo API upstream, else 0"
        )),
    }
}

fn rate_burst<S: Serializer>(value: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(burst) => s.serialize_u32(*burst),
        None => s.serialize_str("the rate limit"),
    }
}

/// What forward mode does with a host that is not an inject host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OtherHosts {
    /// Bytes pass untouched (CONNECT), requests are forwarded (absolute form); never a token.
    Tunnel,
    /// 403 `host_not_allowed`.
    Deny,
}

/// Forward mode: clients that use the proxy through `HTTPS_PROXY`.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardSettings {
    /// Whether CONNECT and absolute-form requests are served.
    pub forward: bool,
    /// Hosts whose requests carry the token (lower case).
    #[serde(serialize_with = "comma_list")]
    pub inject_hosts: Vec<String>,
    /// What happens to requests for other hosts.
    pub other_hosts: OtherHosts,
    /// The interception CA's certificate.
    #[serde(serialize_with = "path")]
    pub ca_cert_file: PathBuf,
    /// Its key.
    #[serde(serialize_with = "path")]
    pub ca_key_file: PathBuf,
    /// The CA, loaded when forward mode is on.
    #[serde(skip)]
    pub ca: Option<Arc<CertificateAuthority>>,
}

impl ForwardSettings {
    /// Whether requests for `host` carry the token.
    pub fn injects(&self, host: &str) -> bool {
        self.inject_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }
}

impl Settings {
    /// The account requests go to when they name none, if there is one.
    pub fn default_account(&self) -> Option<&AccountSettings> {
        self.account(DEFAULT_ACCOUNT)
    }

    /// The account called `name`.
    pub fn account(&self, name: &str) -> Option<&AccountSettings> {
        self.accounts.iter().find(|account| account.name == name)
    }

    /// Every file a secret was read from: a reload is due when one changes.
    pub fn secret_files(&self) -> Vec<PathBuf> {
        let mut origins: Vec<&SecretOrigin> = Vec::new();
        for account in &self.accounts {
            origins.push(&account.client_secret_origin);
            if let Bootstrap::RefreshToken(secret) | Bootstrap::Pat(secret) = &account.bootstrap {
                origins.push(&secret.origin);
            }
        }
        if let Some(key) = &self.access.client_key {
            origins.push(&key.origin);
        }
        origins
            .into_iter()
            .filter_map(|origin| match origin {
                SecretOrigin::File(path) => Some(path.clone()),
                SecretOrigin::Env(_) => None,
            })
            .collect()
    }

    /// A listing of the effective settings for `run --check`, one `key =
    /// value` line each, keyed as in the TOML file (an account other than
    /// `default` under `accounts.NAME.`); secrets appear only as where they
    /// come from.
    pub fn describe(&self) -> String {
        let value = serde_json::to_value(self).expect("settings serialize to JSON");
        let mut lines = String::new();
        let serde_json::Value::Object(top) = value else {
            unreachable!("a struct serializes to an object")
        };
        for (key, value) in top {
            match value {
                serde_json::Value::Array(accounts) => {
                    for (account, settings) in self.accounts.iter().zip(accounts) {
                        let prefix = if account.name == DEFAULT_ACCOUNT {
                            String::new()
                        } else {
                            format!("{key}.{}.", account.name)
                        };
                        let serde_json::Value::Object(fields) = settings else {
                            continue;
                        };
                        for (field, value) in fields {
                            lines.push_str(&format!("{prefix}{field} = {}\n", plain(&value)));
                        }
                    }
                }
                other => lines.push_str(&format!("{key} = {}\n", plain(&other))),
            }
        }
        lines
    }
}

impl AccountSettings {
    /// A client for the account's token endpoint, as its OAuth client.
    pub fn token_endpoint(&self, settings: &Settings) -> Result<TokenEndpoint, reqwest::Error> {
        TokenEndpoint::new(
            self.token_url.clone(),
            self.client.clone(),
            &EndpointOptions {
                timeout: settings.token_timeout,
                extra_roots_pem: settings.extra_roots_pem.clone(),
                connect_to: settings.connect_to.clone(),
            },
        )
    }
}

/// A JSON scalar as the listing shows it: strings without quotes, null as `none`.
fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Null => "none".to_owned(),
        other => other.to_string(),
    }
}

fn display<T: std::fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn duration<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*value))
}

fn path<S: Serializer>(value: &std::path::Path, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&value.display())
}

fn optional_path<S: Serializer>(value: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => path(value, s),
        None => s.serialize_none(),
    }
}

fn optional_origin<S: Serializer>(value: &Option<LoadedSecret>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(secret) => s.collect_str(&format_args!("from {}", secret.origin)),
        None => s.serialize_none(),
    }
}

fn comma_list<S: Serializer>(value: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&value.join(","))
}

fn client_id<S: Serializer>(value: &ClientCredentials, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&value.id)
}

fn origin<S: Serializer>(value: &SecretOrigin, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("from {value}"))
}

fn bootstrap<S: Serializer>(value: &Bootstrap, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Bootstrap::RefreshToken(secret) => {
            s.collect_str(&format_args!("refresh token from {}", secret.origin))
        }
        Bootstrap::Pat(secret) => s.collect_str(&format_args!(
            "personal access token from {}",
            secret.origin
        )),
        Bootstrap::None => s.serialize_str("none (the state file must hold a refresh token)"),
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
        assert_eq!(
            settings.default_account().unwrap().upstream.to_string(),
            DEFAULT_UPSTREAM
        );
        assert_eq!(settings.refresh_margin, DEFAULT_REFRESH_MARGIN);
        assert_eq!(settings.retry_body_limit, DEFAULT_RETRY_BODY_LIMIT);
        assert!(matches!(
            settings.default_account().unwrap().bootstrap,
            Bootstrap::None
        ));
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
            custom
                .resolve(&env_with_secret)
                .unwrap()
                .default_account()
                .unwrap()
                .upstream
                .base_path,
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
    fn paths_that_are_not_utf8_are_refused_naming_the_setting() {
        use std::os::unix::ffi::OsStrExt;
        let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff/state.json"));
        let err = error_of(RunOptions {
            state_file: Some(odd),
            ..base()
        });
        assert_eq!(err.setting, "--state-file");
        assert!(err.problem.contains("UTF-8"), "{err}");
    }

    #[test]
    fn upstream_base_paths_with_dot_segments_are_refused() {
        for url in [
            "http://127.0.0.1:9/a/../b",
            "http://127.0.0.1:9/./a",
            "http://127.0.0.1:9/a/%2e%2E",
        ] {
            let err = error_of(RunOptions {
                upstream: Some(url.into()),
                ..base()
            });
            assert_eq!(err.setting, "--upstream", "{url}");
        }
    }

    #[test]
    fn the_check_listing_names_every_setting_and_no_secret() {
        let env = |name: &str| match name {
            "GOTO_CLIENT_SECRET" => Some("client-secret-value".to_owned()),
            "GOTO_REFRESH_TOKEN" => Some("refresh-token-value".to_owned()),
            _ => None,
        };
        let settings = RunOptions {
            max_connections: Some("7".into()),
            ..base()
        }
        .resolve(&env)
        .unwrap();
        let listing = settings.describe();
        for line in [
            "listen = 127.0.0.1:8080",
            "upstream = https://api.getgo.com",
            "client_id = client",
            "client_secret = from environment variable GOTO_CLIENT_SECRET",
            "bootstrap = refresh token from environment variable GOTO_REFRESH_TOKEN",
            "refresh_margin = 5m",
            "max_connections = 7",
            "upstream_ca_file = none",
            "log_format = text",
        ] {
            assert!(
                listing.contains(&format!("{line}\n")),
                "{line} missing:\n{listing}"
            );
        }
        assert!(!listing.contains("-value"), "{listing}");
        assert!(!listing.contains("extra_roots_pem"), "{listing}");
    }

    fn with_tables(tables: &[(&str, AccountTable)]) -> RunOptions {
        RunOptions {
            state_file: Some("/var/lib/goto/state.json".into()),
            accounts: Some(
                tables
                    .iter()
                    .map(|(name, table)| ((*name).to_owned(), table.clone()))
                    .collect(),
            ),
            ..base()
        }
    }

    fn table(secret: &std::path::Path) -> AccountTable {
        AccountTable {
            client_id: Some("eu-client".into()),
            client_secret_file: Some(secret.to_owned()),
            ..AccountTable::default()
        }
    }

    #[test]
    fn account_tables_become_accounts_after_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s\n").unwrap();
        let settings = with_tables(&[("eu", table(&secret)), ("apac", table(&secret))])
            .resolve(&env_with_secret)
            .unwrap();
        let names: Vec<_> = settings.accounts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["default", "apac", "eu"]);
        let eu = settings.account("eu").unwrap();
        assert_eq!(eu.client.id, "eu-client");
        assert_eq!(
            eu.state_file,
            std::path::Path::new("/var/lib/goto/state-eu.json")
        );
        assert!(settings
            .describe()
            .contains("accounts.eu.client_id = eu-client\n"));
    }

    #[test]
    fn account_tables_are_checked_naming_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s\n").unwrap();
        let no_id = AccountTable {
            client_id: None,
            ..table(&secret)
        };
        let err = error_of(with_tables(&[("eu", no_id)]));
        assert_eq!(
            err.problem,
            "accounts.eu.client_id: required; set client_id in [accounts.eu]"
        );
        let no_secret = AccountTable {
            client_secret_file: None,
            ..table(&secret)
        };
        // The default account's GOTO_CLIENT_SECRET is not the named account's.
        let err = error_of(with_tables(&[("eu", no_secret)]));
        assert!(
            err.problem
                .starts_with("accounts.eu.client_secret_file: required"),
            "{err}"
        );
        let err = error_of(with_tables(&[("EU", table(&secret))]));
        assert!(err.problem.contains("a-z, 0-9"), "{err}");
        let evil = AccountTable {
            upstream: Some("https://evil.example".into()),
            ..table(&secret)
        };
        let err = error_of(with_tables(&[("eu", evil)]));
        assert!(err.problem.starts_with("accounts.eu.upstream:"), "{err}");
        let shared = AccountTable {
            state_file: Some("/var/lib/goto/state.json".into()),
            ..table(&secret)
        };
        let err = error_of(with_tables(&[("eu", shared)]));
        assert!(err.problem.contains("share the state file"), "{err}");
        let err = error_of(with_tables(&[("default", table(&secret))]));
        assert!(err.problem.contains("[accounts.default]"), "{err}");
    }

    #[test]
    fn account_tables_parse_from_toml_and_refuse_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            "[accounts.eu]\nclient_id = \"x\"\nclient_secret_file = \"/s\"\n",
        )
        .unwrap();
        let options = RunOptions::from_toml_file(&path).unwrap();
        let tables = options.accounts.unwrap();
        assert_eq!(tables["eu"].client_id.as_deref(), Some("x"));
        std::fs::write(&path, "[accounts.eu]\nclient_secret = \"hunter2\"\n").unwrap();
        let err = RunOptions::from_toml_file(&path).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
