//! The command line: subcommands and their arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, RunOptions};

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
    Run(RunArgs),
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
        let file = match &self.config {
            Some(path) => RunOptions::from_toml_file(path)?,
            None => RunOptions::default(),
        };
        Ok(self.options.clone().over(file))
    }
}
