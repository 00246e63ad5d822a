//! The raw layer of the settings: every key of `run` as given, strings as
//! typed, before any checking. One struct is parsed from the command line
//! (with environment fallbacks) and from the TOML file, so the keys cannot
//! drift apart, and layers are merged key by key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// Declares [`RunOptions`] and its key-by-key merge from one list of fields,
/// so that a new setting cannot be forgotten by the merge.
macro_rules! layered_options {
    (
        $(#[$struct_attr:meta])*
        pub struct $name:ident {
            $( $(#[$attr:meta])* pub $field:ident : Option<$ty:ty>, )*
        }
    ) => {
        $(#[$struct_attr])*
        pub struct $name {
            $( $(#[$attr])* pub $field: Option<$ty>, )*
        }

        impl $name {
            /// These options with every unset key taken from `lower` (flag/env over file).
            pub fn over(self, lower: $name) -> $name {
                $name { $( $field: self.$field.or(lower.$field), )* }
            }
        }
    };
}

layered_options! {
    /// Every setting of `run` as given. Secrets appear only as paths.
    #[derive(clap::Args, Deserialize, Clone, Debug, Default, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    pub struct RunOptions {
        /// Address for API clients [default: 127.0.0.1:8080]
        #[arg(long, env = "GOTO_PROXY_LISTEN", value_name = "ADDR")]
        pub listen: Option<String>,
        /// Allow --listen on a non-loopback address: anyone who reaches it acts as the GoTo user
        #[arg(long, env = "GOTO_PROXY_ALLOW_REMOTE_CLIENTS", value_name = "BOOL", num_args = 0..=1,
              default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
        pub allow_remote_clients: Option<bool>,
        /// Serve the main listener with TLS, with this PEM certificate chain
        #[arg(long, env = "GOTO_PROXY_TLS_CERT_FILE", value_name = "PATH")]
        pub tls_cert_file: Option<PathBuf>,
        /// The PEM key of --tls-cert-file
        #[arg(long, env = "GOTO_PROXY_TLS_KEY_FILE", value_name = "PATH")]
        pub tls_key_file: Option<PathBuf>,
        /// With TLS on, serve only clients presenting a certificate from this PEM CA
        #[arg(long, env = "GOTO_PROXY_CLIENT_CA_FILE", value_name = "PATH")]
        pub client_ca_file: Option<PathBuf>,
        /// File holding the key clients must send in Proxy-Authorization (or GOTO_PROXY_CLIENT_KEY)
        #[arg(long, env = "GOTO_PROXY_CLIENT_KEY_FILE", value_name = "PATH")]
        pub client_key_file: Option<PathBuf>,
        /// Only these requests may carry the token: `METHOD /prefix` rules, comma-separated
        /// (`*` for any method) [default: everything]
        #[arg(long, env = "GOTO_PROXY_ALLOW_REQUESTS", value_name = "RULES")]
        pub allow_requests: Option<String>,
        /// Also serve forward-proxy requests (CONNECT, absolute-form) for HTTPS_PROXY clients
        #[arg(long, env = "GOTO_PROXY_FORWARD", value_name = "BOOL", num_args = 0..=1,
              default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
        pub forward: Option<bool>,
        /// Hosts whose forward-mode requests carry the token, comma-separated
        /// [default: api.getgo.com,api.goto.com,api.jive.com]
        #[arg(long, env = "GOTO_INJECT_HOSTS", value_name = "HOSTS")]
        pub inject_hosts: Option<String>,
        /// Forward mode, any other host: tunnel (untouched, no token) or deny (403) [default: tunnel]
        #[arg(long, env = "GOTO_OTHER_HOSTS", value_name = "POLICY")]
        pub other_hosts: Option<String>,
        /// The CA that signs intercepted hosts' certificates [default: ca.pem beside the state file]
        #[arg(long, env = "GOTO_CA_CERT_FILE", value_name = "PATH")]
        pub ca_cert_file: Option<PathBuf>,
        /// The CA's key, mode 0600 [default: ca-key.pem beside the state file]
        #[arg(long, env = "GOTO_CA_KEY_FILE", value_name = "PATH")]
        pub ca_key_file: Option<PathBuf>,
        /// Send connections for HOST:PORT to ADDR:PORT instead, as curl's option
        /// (`HOST:PORT:ADDR:PORT[,...]`); TLS still verifies HOST
        #[arg(long, env = "GOTO_CONNECT_TO", value_name = "RULES")]
        pub connect_to: Option<String>,
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
        /// Where token state is shared: `file` (the state file alone), or Redis
        /// (`redis://[user[:password]@]host:port[/db]`, `rediss://` for TLS) [default: file]
        #[arg(long, env = "GOTO_STORE", value_name = "STORE")]
        pub store: Option<StoreUrl>,
        /// File holding the Redis password, instead of the URL's
        #[arg(long, env = "GOTO_STORE_PASSWORD_FILE", value_name = "PATH")]
        pub store_password_file: Option<PathBuf>,
        /// File holding the key (32 raw bytes, or 64 hex characters a line) that
        /// seals tokens in Redis; a replica without it cannot read them
        #[arg(long, env = "GOTO_STORE_KEY_FILE", value_name = "PATH")]
        pub store_key_file: Option<PathBuf>,
        /// Refresh when less than this is left, or half the lifetime if smaller [default: 300s]
        #[arg(long, env = "GOTO_REFRESH_MARGIN", value_name = "DURATION")]
        pub refresh_margin: Option<String>,
        /// How long a request may wait for a token refresh under way [default: 10s]
        #[arg(long, env = "GOTO_TOKEN_WAIT", value_name = "DURATION")]
        pub token_wait: Option<String>,
        /// Upper bound for opening a connection to the upstream [default: 5s]
        #[arg(long, env = "GOTO_CONNECT_TIMEOUT", value_name = "DURATION")]
        pub connect_timeout: Option<String>,
        /// Upper bound for the upstream's response headers, retries included; then 504 [default: 60s]
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
        /// Client connections served at once; more are closed at once [default: 1024]
        #[arg(long, env = "GOTO_PROXY_MAX_CONNECTIONS", value_name = "N")]
        pub max_connections: Option<String>,
        /// Requests per second per account and API; 0 turns shaping off
        /// [default: 10 for a GoTo API upstream, else 0]
        #[arg(long, env = "GOTO_RATE_LIMIT", value_name = "N")]
        pub rate_limit: Option<String>,
        /// Requests a bucket lets through at once [default: the rate limit]
        #[arg(long, env = "GOTO_RATE_BURST", value_name = "N")]
        pub rate_burst: Option<String>,
        /// Requests waiting per bucket; more get 429 at once [default: 100]
        #[arg(long, env = "GOTO_RATE_QUEUE", value_name = "N")]
        pub rate_queue: Option<String>,
        /// The longest a request waits for its turn; later turns get 429 at once [default: 5s]
        #[arg(long, env = "GOTO_RATE_WAIT", value_name = "DURATION")]
        pub rate_wait: Option<String>,
        /// One log line per request (target `access`); false turns it off [default: true]
        #[arg(long, env = "GOTO_PROXY_ACCESS_LOG", value_name = "BOOL", num_args = 0..=1,
              default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
        pub access_log: Option<bool>,
        /// Log format: text or json [default: text]
        #[arg(long, env = "GOTO_PROXY_LOG_FORMAT", value_name = "FORMAT")]
        pub log_format: Option<String>,
        /// Further accounts: `[accounts.NAME]` tables, from the TOML file only.
        #[arg(skip)]
        pub accounts: Option<BTreeMap<String, AccountTable>>,
    }
}

/// The value of `--store`, which may carry a password: its `Debug` shows
/// none.
#[derive(Deserialize, Clone, PartialEq, Eq)]
#[serde(transparent)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&super::store::without_password(&self.0))
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

/// One `[accounts.NAME]` table of the TOML file: an account besides the
/// one the top-level keys describe. Secrets appear only as paths.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AccountTable {
    /// The OAuth client's id.
    pub client_id: Option<String>,
    /// File holding the client secret.
    pub client_secret_file: Option<PathBuf>,
    /// File holding the bootstrap refresh token.
    pub refresh_token_file: Option<PathBuf>,
    /// File holding a personal access token.
    pub pat_file: Option<PathBuf>,
    /// The account's own state file.
    pub state_file: Option<PathBuf>,
    /// Where its requests go.
    pub upstream: Option<String>,
    /// Its token endpoint.
    pub token_url: Option<String>,
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

    /// `self` (flags and env vars) over the TOML file at `config`, if any.
    pub fn layered_over_file(self, config: Option<&Path>) -> Result<Self, ConfigError> {
        let file = match config {
            Some(path) => Self::from_toml_file(path)?,
            None => Self::default(),
        };
        Ok(self.over(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn paths_that_are_not_utf8_merge_without_trouble() {
        use std::os::unix::ffi::OsStrExt;
        let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff\xfe"));
        let cli = RunOptions {
            state_file: Some(odd.clone()),
            ..RunOptions::default()
        };
        let merged = cli.over(RunOptions::default());
        assert_eq!(merged.state_file, Some(odd));
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
}
