//! The command line: subcommands and their arguments.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::config::{
    default_state_file, named_state_file, ConfigError, RunOptions, DEFAULT_ACCOUNT,
    DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN,
};
use crate::login::{DEFAULT_AUTHORIZE_URL, DEFAULT_REDIRECT_URI};

/// A credential-injecting reverse proxy for GoTo's APIs.
#[derive(Parser, Debug)]
#[command(name = "goto-auth-proxy", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy
    Run(Box<RunArgs>),
    /// Run the proxy in front of an in-process stand-in for GoTo: no credentials, no network
    Demo(DemoArgs),
    /// Get the first refresh token: sign in to GoTo in a browser, write the state file
    Login(Box<LoginArgs>),
    /// Measure the latency the proxy adds, on this machine, against an in-process stand-in
    Bench(BenchArgs),
    /// Show the state file: principal, access-token expiry, refresh-token age (never a token)
    Status(StateFileArgs),
    /// The local certificate authority that forward mode's TLS interception uses
    Ca(CaArgs),
}

/// Arguments of `bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Requests sent directly, and as many through the proxy
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    pub requests: usize,
    /// Connections sending at once
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub concurrency: usize,
    /// Write an SVG plot of both latency distributions here
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
    /// Compare forward mode's intercepted requests with reverse mode's (both to a TLS upstream)
    #[arg(long)]
    pub forward: bool,
}

/// Where the state file is, found as `run` finds it: the arguments of
/// `status`, and part of those of `ca init`.
#[derive(clap::Args, Debug)]
pub struct StateFileArgs {
    /// The TOML file `run` uses; its state_file is read
    #[arg(long, env = "GOTO_PROXY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The state file (overrides the config file's)
    #[arg(long, env = "GOTO_STATE_FILE", value_name = "PATH")]
    pub state_file: Option<PathBuf>,
}

impl StateFileArgs {
    /// The state file `run` would use with the same flags, env and config file.
    pub fn state_file(
        &self,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PathBuf, ConfigError> {
        if let Some(path) = &self.state_file {
            return Ok(path.clone());
        }
        let file = match &self.config {
            Some(path) => RunOptions::from_toml_file(path)?,
            None => RunOptions::default(),
        };
        Ok(file
            .state_file
            .unwrap_or_else(|| default_state_file(lookup_env)))
    }

    /// Every account's state file, as `run` would use them: the default
    /// account's (when the config file's top level names a client, or
    /// declares no other account), then each `[accounts.NAME]`'s.
    pub fn state_files(
        &self,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<(String, PathBuf)>, ConfigError> {
        let default = self.state_file(lookup_env)?;
        if self.state_file.is_some() {
            return Ok(vec![(DEFAULT_ACCOUNT.to_owned(), default)]);
        }
        let file = match &self.config {
            Some(path) => RunOptions::from_toml_file(path)?,
            None => RunOptions::default(),
        };
        let tables = file.accounts.unwrap_or_default();
        let mut files = Vec::with_capacity(tables.len() + 1);
        if file.client_id.is_some() || tables.is_empty() {
            files.push((DEFAULT_ACCOUNT.to_owned(), default.clone()));
        }
        for (name, table) in tables {
            let path = table
                .state_file
                .unwrap_or_else(|| named_state_file(&default, &name));
            files.push((name, path));
        }
        Ok(files)
    }
}

/// Arguments of `ca`.
#[derive(clap::Args, Debug)]
pub struct CaArgs {
    /// What to do with the CA.
    #[command(subcommand)]
    pub command: CaCommand,
}

/// The subcommands of `ca`.
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create the CA (ca.pem, ca-key.pem) and print how to make clients trust it
    Init(CaInitArgs),
}

/// Arguments of `ca init`.
#[derive(clap::Args, Debug)]
pub struct CaInitArgs {
    /// The state file; the CA goes into its directory unless --dir is given.
    #[command(flatten)]
    pub location: StateFileArgs,
    /// Write ca.pem and ca-key.pem here instead of the state file's directory
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Replace existing files (clients that trust the old CA then need the new one)
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Address for API clients
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: String,
    /// Address for /healthz, /readyz and /metrics
    #[arg(long, default_value = DEFAULT_ADMIN_LISTEN, value_name = "ADDR")]
    pub admin_listen: String,
    /// Lifetime of the stand-in's access tokens
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub token_lifetime: std::time::Duration,
    /// Rotate the refresh token every this many refreshes
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub rotate_every: u64,
    /// Forward to this API (loopback) instead of the stand-in's echo API
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// PEM file of extra root certificates for --upstream
    #[arg(long, value_name = "PATH")]
    pub upstream_ca_file: Option<PathBuf>,
}

/// Arguments of `run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// TOML file with any of the settings below (flags and env vars win over it)
    #[arg(long, env = "GOTO_PROXY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Check the configuration and the secrets it names, print the effective settings, and exit
    #[arg(long)]
    pub check: bool,
    /// The settings.
    #[command(flatten)]
    pub options: RunOptions,
}

impl RunArgs {
    /// The options from flags and env vars layered over the config file's.
    pub fn layered_options(&self) -> Result<RunOptions, ConfigError> {
        layered(self.config.as_deref(), &self.options)
    }
}

/// Arguments of `login`: the settings `run` takes (client, token URL, state
/// file), and where the consent page and the redirect are.
#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// TOML file with the settings `run` uses (flags and env vars win over it)
    #[arg(long, env = "GOTO_PROXY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// GoTo's authorization (consent) page
    #[arg(long, env = "GOTO_AUTHORIZE_URL", default_value = DEFAULT_AUTHORIZE_URL, value_name = "URL")]
    pub authorize_url: url::Url,
    /// The loopback redirect URI registered with the OAuth client
    #[arg(long, env = "GOTO_REDIRECT_URI", default_value = DEFAULT_REDIRECT_URI, value_name = "URL")]
    pub redirect_uri: url::Url,
    /// How long to wait for the browser to come back
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: std::time::Duration,
    /// Only print the URL; do not try to open a browser
    #[arg(long)]
    pub no_browser: bool,
    /// The account to sign in for ([accounts.NAME] in the config file)
    #[arg(long, default_value = DEFAULT_ACCOUNT, value_name = "NAME")]
    pub account: String,
    /// The settings.
    #[command(flatten)]
    pub options: RunOptions,
}

impl LoginArgs {
    /// The options from flags and env vars layered over the config file's.
    pub fn layered_options(&self) -> Result<RunOptions, ConfigError> {
        layered(self.config.as_deref(), &self.options)
    }
}

/// `options` (flags and env vars) over the TOML file at `config`, if any.
fn layered(config: Option<&Path>, options: &RunOptions) -> Result<RunOptions, ConfigError> {
    let file = match config {
        Some(path) => RunOptions::from_toml_file(path)?,
        None => RunOptions::default(),
    };
    Ok(options.clone().over(file))
}
