//! The `goto-auth-proxy` binary: parse, set up logging, hand over to the library.

use std::process::ExitCode;
use std::time::SystemTime;

use clap::Parser;
use goto_auth_proxy::app::{self, Listeners};
use goto_auth_proxy::bench::BenchOptions;
use goto_auth_proxy::cli::{
    BenchArgs, CaCommand, CaInitArgs, Cli, Command, DemoArgs, LoginArgs, RunArgs, StateFileArgs,
};
use goto_auth_proxy::config::{ConfigError, LogFormat, RunOptions, Settings};
use goto_auth_proxy::demo::DemoOptions;
use goto_auth_proxy::login::LoginOptions;
use goto_auth_proxy::reload::Reload;
use goto_auth_proxy::status::Verdict;
use goto_auth_proxy::{ca, shutdown, telemetry};

/// Exit status for a configuration error (EX_USAGE of sysexits.h).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Demo(args) => demo(args),
        Command::Status(args) => status(args),
        Command::Login(args) => login(*args),
        Command::Bench(args) => bench(args),
        Command::Ca(args) => match args.command {
            CaCommand::Init(args) => ca_init(args),
        },
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    // Only warnings: the report is the output.
    telemetry::init(LogFormat::Text, "warn");
    let options = BenchOptions {
        requests: args.requests.max(1),
        concurrency: args.concurrency.max(1),
        plot: args.plot,
        forward: args.forward,
    };
    runtime().block_on(async move {
        match goto_auth_proxy::bench::run(options).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("goto-auth-proxy: bench failed: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

fn login(args: LoginArgs) -> ExitCode {
    let settings = match resolve(args.layered_options()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    telemetry::init(settings.log_format, "info");
    let options = LoginOptions {
        authorize_url: args.authorize_url,
        redirect_uri: args.redirect_uri,
        timeout: args.timeout,
        open_browser: !args.no_browser,
        account: args.account,
    };
    runtime().block_on(async move {
        match goto_auth_proxy::login::login(&settings, options).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("goto-auth-proxy: login failed: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Checks layered options, printing the error and giving the exit code on failure.
fn resolve(options: Result<RunOptions, ConfigError>) -> Result<Settings, ExitCode> {
    options
        .and_then(|options| options.resolve(&|name| std::env::var(name).ok()))
        .map_err(|error| {
            eprintln!("goto-auth-proxy: configuration error: {error}");
            ExitCode::from(EXIT_CONFIG)
        })
}

fn status(args: StateFileArgs) -> ExitCode {
    // Warnings (a state file others can read) go to stderr; the report is the output.
    telemetry::init(LogFormat::Text, "warn");
    let files = match args.state_files(&|name| std::env::var(name).ok()) {
        Ok(files) => files,
        Err(error) => {
            eprintln!("goto-auth-proxy: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    runtime().block_on(async move {
        let mut verdicts = Vec::with_capacity(files.len());
        for (index, (account, path)) in files.iter().enumerate() {
            if files.len() > 1 {
                let gap = if index > 0 { "\n" } else { "" };
                println!("{gap}account:        {account}");
            }
            let store = goto_auth_proxy::store::open(path);
            let state = match store.load().await {
                Ok(state) => state.map(|stored| stored.state),
                Err(error) => {
                    eprintln!("goto-auth-proxy: account {account}: {error}");
                    verdicts.push(Verdict::Missing);
                    continue;
                }
            };
            let (text, verdict) = goto_auth_proxy::status::report(
                &store.location(),
                state.as_ref(),
                SystemTime::now(),
            );
            print!("{text}");
            verdicts.push(verdict);
        }
        ExitCode::from(Verdict::worst(&verdicts).exit_code())
    })
}

/// `ca init`: the CA goes into --dir, or beside the state file `run` would use.
fn ca_init(args: CaInitArgs) -> ExitCode {
    telemetry::init(LogFormat::Text, "warn");
    let default_dir = args
        .location
        .state_file(&|name| std::env::var(name).ok())
        .map(|state_file| ca::init::default_dir(&state_file));
    let dir = match (args.dir, default_dir.as_ref()) {
        (Some(dir), _) => dir,
        (None, Ok(dir)) => dir.clone(),
        (None, Err(error)) => {
            eprintln!("goto-auth-proxy: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match ca::init::init(&dir, args.force) {
        Ok(written) => {
            let default_location = default_dir.is_ok_and(|default| default == dir);
            print!("{}", ca::init::report(&written, default_location));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("goto-auth-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime")
}

fn demo(args: DemoArgs) -> ExitCode {
    telemetry::init(LogFormat::Text, "info");
    let options = DemoOptions {
        listen: args.listen,
        admin_listen: args.admin_listen,
        token_lifetime: args.token_lifetime,
        rotate_every: args.rotate_every,
        upstream: args.upstream,
        upstream_ca_file: args.upstream_ca_file,
    };
    runtime().block_on(async move {
        let signal = shutdown::from_future(shutdown::os_signal());
        match goto_auth_proxy::demo::run(options, signal).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %error, "the demo cannot run");
                ExitCode::FAILURE
            }
        }
    })
}

fn run(args: RunArgs) -> ExitCode {
    let settings = match resolve(args.layered_options()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    telemetry::init(settings.log_format, "info");
    runtime().block_on(async move {
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
        let (options, config_file) = (args.options.clone(), args.config.clone());
        let watched_config = config_file.clone();
        let reload = Reload {
            // The flags and environment as at start, over the file read again.
            source: Box::new(move || {
                options
                    .clone()
                    .layered_over_file(config_file.as_deref())?
                    .resolve(&|name| std::env::var(name).ok())
            }),
            config_file: watched_config,
            on_sighup: true,
        };
        match app::run_with_reload(settings, listeners, signal, Some(reload)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %error, "cannot start");
                ExitCode::FAILURE
            }
        }
    })
}

/// `run --check`: the settings are valid and every account has a credential at hand.
async fn check(settings: &Settings) -> ExitCode {
    let mut credentials = Vec::with_capacity(settings.accounts.len());
    let stores = match goto_auth_proxy::store::Stores::new(settings) {
        Ok(stores) => stores,
        Err(error) => {
            eprintln!("goto-auth-proxy: --store: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let metrics = std::sync::Arc::new(goto_auth_proxy::metrics::Metrics::new());
    for account in &settings.accounts {
        let store = stores.open(account, metrics.account(&account.name));
        match app::initial_credential(account, store.as_ref()).await {
            Ok((credential, _)) => credentials.push((&account.name, credential.describe())),
            Err(error) => {
                eprintln!("goto-auth-proxy: account {}: {error}", account.name);
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    print!("{}", settings.describe());
    for (account, credential) in credentials {
        match account.as_str() {
            goto_auth_proxy::config::DEFAULT_ACCOUNT => println!("credential = {credential}"),
            name => println!("accounts.{name}.credential = {credential}"),
        }
    }
    println!("configuration is valid");
    ExitCode::SUCCESS
}
