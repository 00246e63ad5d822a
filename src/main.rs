//! The `goto-auth-proxy` binary: parse, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use goto_auth_proxy::app::{self, Listeners};
use goto_auth_proxy::cli::{Cli, Command, RunArgs};
use goto_auth_proxy::config::Settings;
use goto_auth_proxy::store::FileStore;
use goto_auth_proxy::{shutdown, telemetry};

/// Exit status for a configuration error (EX_USAGE of sysexits.h).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let settings = match args
        .layered_options()
        .and_then(|options| options.resolve(&|name| std::env::var(name).ok()))
    {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("goto-auth-proxy: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(settings.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(async move {
        if args.check {
            return check(&settings).await;
        }
        let listeners = match Listeners::bind(&settings).await {
            Ok(listeners) => listeners,
            Err(error) => {
                tracing::error!(error = %error, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        let signal = shutdown::from_future(shutdown::os_signal());
        match app::run(settings, listeners, signal).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %error, "cannot start");
                ExitCode::FAILURE
            }
        }
    })
}

/// `run --check`: the settings are valid and a credential is at hand.
async fn check(settings: &Settings) -> ExitCode {
    let store = FileStore::new(&settings.state_file);
    match app::initial_credential(settings, &store).await {
        Ok(credential) => {
            print!("{}", settings.describe());
            println!("credential = {}", credential.describe());
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("goto-auth-proxy: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
