//! Validation: layered [`RunOptions`] checked and turned into typed
//! [`Settings`], secrets loaded, every error naming the setting at fault.

use std::path::Path;

use super::options::RunOptions;
use super::parse;
use super::*;
use crate::secret::{load_secret, SecretError};

impl RunOptions {
    /// Checks every setting and loads the secrets it names.
    pub fn resolve(
        self,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let listen = parse::addr("--listen", self.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
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
        let admin_listen = parse::addr(
            "--admin-listen",
            self.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        )?;
        let upstream_ca_file = parse::utf8_path("--upstream-ca-file", self.upstream_ca_file)?;
        let extra_roots_pem = upstream_ca_file
            .as_deref()
            .map(parse::ca_file)
            .transpose()?;
        let default_account = AccountOptions {
            upstream: self.upstream,
            allow_custom_upstream: self.allow_custom_upstream,
            token_url: self.token_url,
            client_id: self.client_id,
            client_secret_file: parse::utf8_path("--client-secret-file", self.client_secret_file)?,
            refresh_token_file: parse::utf8_path("--refresh-token-file", self.refresh_token_file)?,
            pat_file: parse::utf8_path("--pat-file", self.pat_file)?,
            state_file: parse::utf8_path("--state-file", self.state_file)?,
        }
        .resolve(DEFAULT_ACCOUNT, lookup_env)?;
        let settings = Settings {
            listen,
            admin_listen,
            upstream_ca_file,
            extra_roots_pem,
            accounts: vec![default_account],
            refresh_margin: parse::duration(
                "--refresh-margin",
                self.refresh_margin,
                DEFAULT_REFRESH_MARGIN,
            )?,
            token_wait: parse::duration("--token-wait", self.token_wait, DEFAULT_TOKEN_WAIT)?,
            connect_timeout: parse::positive_duration(
                "--connect-timeout",
                self.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            upstream_timeout: parse::positive_duration(
                "--upstream-timeout",
                self.upstream_timeout,
                DEFAULT_UPSTREAM_TIMEOUT,
            )?,
            token_timeout: parse::positive_duration(
                "--token-timeout",
                self.token_timeout,
                DEFAULT_TOKEN_TIMEOUT,
            )?,
            header_read_timeout: parse::positive_duration(
                "--header-read-timeout",
                self.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            drain_timeout: parse::duration(
                "--drain-timeout",
                self.drain_timeout,
                DEFAULT_DRAIN_TIMEOUT,
            )?,
            max_header_bytes: parse::size(
                "--max-header-bytes",
                self.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
            )?,
            retry_body_limit: parse::size(
                "--retry-body-limit",
                self.retry_body_limit,
                DEFAULT_RETRY_BODY_LIMIT,
            )?,
            max_connections: parse::count(
                "--max-connections",
                self.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )?,
            log_format: parse::log_format(self.log_format.as_deref())?,
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

/// The settings of one account as given: today the top-level keys, which
/// make the account `default`.
struct AccountOptions {
    upstream: Option<String>,
    allow_custom_upstream: Option<bool>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    refresh_token_file: Option<PathBuf>,
    pat_file: Option<PathBuf>,
    state_file: Option<PathBuf>,
}

impl AccountOptions {
    fn resolve(
        self,
        name: &str,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AccountSettings, ConfigError> {
        let upstream = parse::upstream(
            self.upstream.as_deref().unwrap_or(DEFAULT_UPSTREAM),
            self.allow_custom_upstream.unwrap_or(false),
        )?;
        let token_url = parse::token_url(self.token_url.as_deref().unwrap_or(DEFAULT_TOKEN_URL))?;
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
        Ok(AccountSettings {
            name: name.to_owned(),
            upstream,
            token_url,
            client: ClientCredentials {
                id: client_id,
                secret: client_secret.value,
            },
            client_secret_origin: client_secret.origin,
            bootstrap,
            state_file: self
                .state_file
                .unwrap_or_else(|| parse::default_state_file(lookup_env)),
        })
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
