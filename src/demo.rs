//! `goto-auth-proxy demo`: the proxy, wired exactly as `run` wires it, in
//! front of an in-process stand-in for GoTo. Needs no credentials and no network.

use std::io::Write;
use std::time::Duration;

use crate::app::{self, Listeners, StartError};
use crate::config::{ConfigError, RunOptions};
use crate::shutdown::ShutdownSignal;
use crate::standin::{GrantShape, StandIn, StandInOptions, CLIENT_ID, CLIENT_SECRET};

/// How the demo's stand-in and proxy are set up.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Where the proxy listens.
    pub listen: String,
    /// Where the admin endpoints listen.
    pub admin_listen: String,
    /// Lifetime of the stand-in's access tokens: short, so refreshes show.
    pub token_lifetime: Duration,
    /// Rotate the refresh token every this many refreshes.
    pub rotate_every: u64,
    /// Forward to this API instead of the stand-in's echo API (a local test
    /// server, or a load benchmark's upstream); tokens still come from the stand-in.
    pub upstream: Option<String>,
    /// Extra PEM roots for that upstream.
    pub upstream_ca_file: Option<std::path::PathBuf>,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot start the stand-in: {0}")]
    StandIn(std::io::Error),
    #[error("cannot write the demo's state directory: {0}")]
    StateDir(std::io::Error),
}

/// A stand-in and the proxy's settings and listeners, ready for [`app::run`].
pub struct Prepared {
    /// The stand-in, serving until the last handle is dropped.
    pub standin: std::sync::Arc<StandIn>,
    /// The proxy's settings, made as `run` makes them.
    pub settings: crate::config::Settings,
    /// The proxy's bound listeners.
    pub listeners: Listeners,
    state_dir: std::path::PathBuf,
}

impl Prepared {
    /// The directory of the proxy's state file, removed when the run ends.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// Runs the proxy until `shutdown` fires, then removes the demo's state.
    pub async fn run(self, shutdown: ShutdownSignal) -> Result<(), StartError> {
        let result = app::run(self.settings, self.listeners, shutdown).await;
        let _ = std::fs::remove_dir_all(&self.state_dir);
        drop(self.standin);
        result
    }
}

/// Runs the demo until `shutdown` fires. Prints where to send requests on stdout.
pub async fn run(options: DemoOptions, shutdown: ShutdownSignal) -> Result<(), DemoError> {
    let (lifetime, rotate_every) = (options.token_lifetime, options.rotate_every);
    let prepared = prepare(options).await?;
    print_banner(&prepared.listeners, lifetime, rotate_every);
    Ok(prepared.run(shutdown).await?)
}

/// Starts the stand-in and binds the proxy's listeners, wired as `run` wires them.
pub async fn prepare(options: DemoOptions) -> Result<Prepared, DemoError> {
    prepare_with(options, None, |_, _, _| Ok(())).await
}

/// [`prepare`], with the stand-in serving TLS with `standin_tls` (a PEM
/// chain and key) when given, and `adjust` changing the proxy's options
/// last (given the stand-in and the directory of the state file).
pub async fn prepare_with(
    options: DemoOptions,
    standin_tls: Option<(Vec<u8>, Vec<u8>)>,
    adjust: impl FnOnce(&mut RunOptions, &StandIn, &std::path::Path) -> std::io::Result<()>,
) -> Result<Prepared, DemoError> {
    let standin = StandIn::start(StandInOptions {
        shape: GrantShape {
            lifetime: options.token_lifetime,
            rotate_every: options.rotate_every,
            ..GrantShape::default()
        },
        tls: standin_tls,
        ..StandInOptions::default()
    })
    .await
    .map_err(DemoError::StandIn)?;
    let state_dir =
        std::env::temp_dir().join(format!("goto-auth-proxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).map_err(DemoError::StateDir)?;
    let mut run_options = RunOptions {
        listen: Some(options.listen),
        admin_listen: Some(options.admin_listen),
        upstream: Some(options.upstream.unwrap_or_else(|| standin.api_url())),
        upstream_ca_file: options.upstream_ca_file,
        token_url: Some(standin.token_url()),
        client_id: Some(CLIENT_ID.to_owned()),
        state_file: Some(state_dir.join("state.json")),
        ..RunOptions::default()
    };
    adjust(&mut run_options, &standin, &state_dir).map_err(DemoError::StateDir)?;
    let bootstrap = standin.refresh_token();
    // The same settings path as `run`, with the stand-in's credentials as the environment.
    let settings = run_options.resolve(&|name| match name {
        "GOTO_CLIENT_SECRET" => Some(CLIENT_SECRET.to_owned()),
        "GOTO_REFRESH_TOKEN" => Some(bootstrap.clone()),
        _ => None,
    })?;
    let listeners = Listeners::bind(&settings).await?;
    Ok(Prepared {
        standin: std::sync::Arc::new(standin),
        settings,
        listeners,
        state_dir,
    })
}

fn print_banner(listeners: &Listeners, lifetime: Duration, rotate_every: u64) {
    let proxy = listeners
        .proxy
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let admin = listeners
        .admin
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let lifetime = humantime::format_duration(lifetime);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\ngoto-auth-proxy demo: a stand-in for GoTo (token endpoint and echo API) runs in this\n\
         process, with the proxy in front of it. Access tokens live {lifetime} here, so the log\n\
         shows a refresh about every half of that; every {rotate_every} refreshes the refresh\n\
         token rotates and is saved first. The echo shows the headers the API received.\n\n\
         Try:\n\n    curl -s http://{proxy}/G2M/rest/meetings\n\n\
         Readiness and metrics:\n\n    curl -s http://{admin}/readyz\n    curl -s http://{admin}/metrics\n\n\
         Ctrl-C stops the demo.\n"
    );
    let _ = out.flush();
}
