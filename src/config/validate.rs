//! Validation: layered [`RunOptions`] checked and turned into typed
//! [`Settings`], secrets loaded, every error naming the setting at fault.

use std::path::Path;

use std::sync::Arc;

use super::options::{AccountTable, RunOptions};
use super::parse;
use super::*;
use crate::outbound::ConnectTo;
use crate::proxy::allow::RequestRules;
use crate::secret::{load_secret, SecretError};

impl RunOptions {
    /// Checks every setting and loads the secrets it names.
    pub fn resolve(
        mut self,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let listen = parse::addr("--listen", self.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
        let access = self.access(lookup_env)?;
        check_door(&listen, &access)?;
        let admin_listen = parse::addr(
            "--admin-listen",
            self.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        )?;
        let upstream_ca_file =
            parse::utf8_path("--upstream-ca-file", self.upstream_ca_file.take())?;
        let extra_roots_pem = upstream_ca_file
            .as_deref()
            .map(parse::ca_file)
            .transpose()?;
        let accounts = self.resolve_accounts(lookup_env)?;
        let store = StoreSettings::resolve(
            self.store.as_ref().map(|url| url.0.as_str()),
            self.store_password_file.take(),
            self.store_key_file.take(),
        )?;
        let connect_to = match &self.connect_to {
            Some(rules) => {
                ConnectTo::parse(rules).map_err(|e| ConfigError::new("--connect-to", e))?
            }
            None => ConnectTo::default(),
        };
        for account in &accounts {
            connect_to
                .check_token_url(&account.token_url)
                .map_err(|e| ConfigError::new("--connect-to", e))?;
        }
        let forward = self.forward_settings(&accounts[0].state_file)?;
        let settings = Settings {
            listen,
            admin_listen,
            upstream_ca_file,
            extra_roots_pem,
            accounts,
            store,
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
            access_log: self.access_log.unwrap_or(true),
            rate: RateOptions {
                limit: self
                    .rate_limit
                    .as_deref()
                    .map(|v| parse::rate("--rate-limit", v))
                    .transpose()?,
                burst: self
                    .rate_burst
                    .as_deref()
                    .map(|v| parse::rate("--rate-burst", v))
                    .transpose()?,
                queue: parse::count("--rate-queue", self.rate_queue.take(), DEFAULT_RATE_QUEUE)?,
                wait: parse::duration("--rate-wait", self.rate_wait.take(), DEFAULT_RATE_WAIT)?,
            },
            access,
            forward,
            connect_to: Arc::new(connect_to),
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

impl RunOptions {
    /// Every account: the top-level one (`default`) when the top-level keys
    /// name a client (or when no other account is declared, so that a
    /// missing client id is reported), then the `[accounts.NAME]` tables.
    fn resolve_accounts(
        &mut self,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<AccountSettings>, ConfigError> {
        let tables = self.accounts.take().unwrap_or_default();
        let allow_custom_upstream = self.allow_custom_upstream.unwrap_or(false);
        let top_level = AccountOptions {
            upstream: self.upstream.take(),
            token_url: self.token_url.take(),
            client_id: self.client_id.take(),
            client_secret_file: parse::utf8_path(
                "--client-secret-file",
                self.client_secret_file.take(),
            )?,
            refresh_token_file: parse::utf8_path(
                "--refresh-token-file",
                self.refresh_token_file.take(),
            )?,
            pat_file: parse::utf8_path("--pat-file", self.pat_file.take())?,
            state_file: parse::utf8_path("--state-file", self.state_file.take())?,
        };
        let default_state_file = top_level
            .state_file
            .clone()
            .unwrap_or_else(|| parse::default_state_file(lookup_env));
        let mut accounts = Vec::with_capacity(tables.len() + 1);
        if top_level.client_id.is_some() || tables.is_empty() {
            if tables.contains_key(DEFAULT_ACCOUNT) {
                return Err(ConfigError::new(
                    "--config",
                    "[accounts.default] and the top-level client settings both describe the account default; keep one",
                ));
            }
            accounts.push(top_level.resolve(DEFAULT_ACCOUNT, allow_custom_upstream, lookup_env)?);
        }
        for (name, table) in tables {
            accounts.push(named_account(
                &name,
                table,
                allow_custom_upstream,
                &default_state_file,
            )?);
        }
        // The default account first: it serves requests that name none.
        accounts.sort_by_key(|account| account.name != DEFAULT_ACCOUNT);
        for (index, account) in accounts.iter().enumerate() {
            if let Some(other) = accounts[..index]
                .iter()
                .find(|other| other.state_file == account.state_file)
            {
                return Err(ConfigError::new(
                    "--config",
                    format!(
                        "accounts {} and {} share the state file {}; each account needs its own",
                        other.name,
                        account.name,
                        account.state_file.display()
                    ),
                ));
            }
        }
        Ok(accounts)
    }

    /// TLS on the listener, client authentication and the request rules.
    fn access(
        &self,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AccessSettings, ConfigError> {
        let tls_cert_file = parse::utf8_path("--tls-cert-file", self.tls_cert_file.clone())?;
        let tls_key_file = parse::utf8_path("--tls-key-file", self.tls_key_file.clone())?;
        let client_ca_file = parse::utf8_path("--client-ca-file", self.client_ca_file.clone())?;
        let listener_tls = match (&tls_cert_file, &tls_key_file) {
            (Some(cert), Some(key)) => Some(Arc::new(parse::listener_tls(
                cert,
                key,
                client_ca_file.as_deref(),
            )?)),
            (None, None) if client_ca_file.is_some() => {
                return Err(ConfigError::new(
                    "--client-ca-file",
                    "client certificates need TLS on the listener: set --tls-cert-file and --tls-key-file too",
                ))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new("--tls-key-file", "required with --tls-cert-file"))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new("--tls-cert-file", "required with --tls-key-file"))
            }
        };
        let client_key_file = parse::utf8_path("--client-key-file", self.client_key_file.clone())?;
        let client_key = load_secret(
            client_key_file.as_deref(),
            "--client-key-file",
            "GOTO_PROXY_CLIENT_KEY",
            lookup_env,
        )
        .map_err(|e| secret_error("--client-key-file", e))?;
        let allow_requests = match &self.allow_requests {
            Some(rules) => {
                RequestRules::parse(rules).map_err(|e| ConfigError::new("--allow-requests", e))?
            }
            None => RequestRules::default(),
        };
        Ok(AccessSettings {
            tls_cert_file,
            tls_key_file,
            client_ca_file,
            listener_tls,
            client_key,
            allow_remote_clients: self.allow_remote_clients.unwrap_or(false),
            allow_requests: Arc::new(allow_requests),
        })
    }

    /// Forward mode's settings; with it on, the CA is loaded (and must exist).
    fn forward_settings(&self, state_file: &Path) -> Result<ForwardSettings, ConfigError> {
        let forward = self.forward.unwrap_or(false);
        let inject_hosts = parse::hosts(
            "--inject-hosts",
            self.inject_hosts.as_deref().unwrap_or(DEFAULT_INJECT_HOSTS),
        )?;
        let other_hosts = parse::other_hosts(self.other_hosts.as_deref())?;
        let defaults = crate::ca::default_paths(state_file);
        let ca_cert_file =
            parse::utf8_path("--ca-cert-file", self.ca_cert_file.clone())?.unwrap_or(defaults.cert);
        let ca_key_file =
            parse::utf8_path("--ca-key-file", self.ca_key_file.clone())?.unwrap_or(defaults.key);
        let ca = if forward {
            let ca = CertificateAuthority::load(&ca_cert_file, &ca_key_file)
                .map_err(|e| ConfigError::new("--ca-cert-file", e.to_string()))?;
            Some(Arc::new(ca))
        } else {
            None
        };
        Ok(ForwardSettings {
            forward,
            inject_hosts,
            other_hosts,
            ca_cert_file,
            ca_key_file,
            ca,
        })
    }
}

/// Anyone who can reach the main listener acts as the GoTo user: a
/// listener other machines can reach needs client certificates or a client
/// key, or `--allow-remote-clients` set deliberately.
fn check_door(listen: &std::net::SocketAddr, access: &AccessSettings) -> Result<(), ConfigError> {
    let authenticated = access.client_key.is_some() || access.client_ca_file.is_some();
    if listen.ip().is_loopback() || authenticated || access.allow_remote_clients {
        return Ok(());
    }
    Err(ConfigError::new(
        "--listen",
        format!(
            "{listen} is not a loopback address, and anyone who can reach the proxy acts as the GoTo user; \
             listen on 127.0.0.1, or require client authentication (--client-key-file, or TLS with \
             --client-ca-file), or if the network in front is trusted set --allow-remote-clients \
             (GOTO_PROXY_ALLOW_REMOTE_CLIENTS=true)"
        ),
    ))
}

/// The settings of one account as given: the top-level keys (the account
/// `default`) or an `[accounts.NAME]` table.
struct AccountOptions {
    upstream: Option<String>,
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
        allow_custom_upstream: bool,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AccountSettings, ConfigError> {
        let upstream = parse::upstream(
            self.upstream.as_deref().unwrap_or(DEFAULT_UPSTREAM),
            allow_custom_upstream,
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

/// An `[accounts.NAME]` table checked into its settings. Its secrets come
/// from its files only (the environment variables are the default
/// account's), and its state file defaults to `state-NAME.json` beside the
/// default one. Errors name the table's key.
fn named_account(
    name: &str,
    table: AccountTable,
    allow_custom_upstream: bool,
    default_state_file: &Path,
) -> Result<AccountSettings, ConfigError> {
    if !crate::proxy::route::is_account_name(name) {
        return Err(ConfigError::new(
            "--config",
            format!("[accounts.{name}]: an account name is made of a-z, 0-9, _ and - only"),
        ));
    }
    let in_table = |error: ConfigError| {
        let key = error.setting.trim_start_matches("--").replace('-', "_");
        // The default account's texts name flags and variables, which do not apply here.
        let problem = if error.problem.starts_with("required") {
            "required".to_owned()
        } else {
            error.problem
        };
        ConfigError::new(
            "--config",
            format!("accounts.{name}.{key}: {problem}; set {key} in [accounts.{name}]"),
        )
    };
    let path = |setting, path| parse::utf8_path(setting, path).map_err(in_table);
    let options = AccountOptions {
        upstream: table.upstream,
        token_url: table.token_url,
        client_id: table.client_id,
        client_secret_file: path("--client-secret-file", table.client_secret_file)?,
        refresh_token_file: path("--refresh-token-file", table.refresh_token_file)?,
        pat_file: path("--pat-file", table.pat_file)?,
        state_file: Some(
            path("--state-file", table.state_file)?
                .unwrap_or_else(|| parse::named_state_file(default_state_file, name)),
        ),
    };
    options
        .resolve(name, allow_custom_upstream, &|_| None)
        .map_err(in_table)
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
