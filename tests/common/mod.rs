//! Shared test harness: a stand-in GoTo and the real proxy in front of it,
//! all on 127.0.0.1:0 inside the test process.

#![allow(dead_code)] // each test crate uses a different part of the harness

pub mod forward;
pub mod pki;
pub mod process;
pub mod redis;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use goto_auth_proxy::app::{self, Listeners, StartError};
use goto_auth_proxy::config::{RunOptions, Settings};
use goto_auth_proxy::shutdown::{self, ShutdownTrigger};
use goto_auth_proxy::standin::{StandIn, StandInOptions, CLIENT_SECRET};
use tokio::task::JoinHandle;

/// Generous bound for anything that should happen "soon" on a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The repository's test certificates.
pub fn cert_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .join(name)
}

/// A proxy running in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    trigger: ShutdownTrigger,
    task: JoinHandle<Result<(), StartError>>,
}

impl Proxy {
    /// `http://127.0.0.1:port` of the proxy listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://127.0.0.1:port` of the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Asks the proxy to stop and waits for it.
    pub async fn stop(self) -> Result<(), StartError> {
        self.trigger.trigger();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the proxy stops within the drain timeout")
            .expect("the proxy task does not panic")
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        wait_ready_at(&self.admin_addr.to_string()).await;
    }

    /// The sum of the series named as `series` says: a metric name and,
    /// optionally, labels in braces that each series must carry (others,
    /// such as `account`, may be there too). `None` when no series matches.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(&self.admin_addr.to_string(), series).await
    }
}

/// [`Proxy::metric`] of the admin listener at `admin` (`host:port`), such
/// as a binary's.
pub async fn metric_at(admin: &str, series: &str) -> Option<f64> {
    let text = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    sum_of_series(&text, series)
}

/// Polls `/readyz` of the admin listener at `admin` (`host:port`) until it
/// answers 200.
pub async fn wait_ready_at(admin: &str) {
    let http = client();
    wait_for("the proxy to become ready", || async {
        http.get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

/// The sum of the values of the series in `text` that match `series` (see
/// [`Proxy::metric`]).
pub fn sum_of_series(text: &str, series: &str) -> Option<f64> {
    let (name, wanted) = split_series(series);
    let mut sum = None;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((line_series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (line_name, labels) = split_series(line_series);
        if line_name == name && wanted.iter().all(|label| labels.contains(label)) {
            if let Ok(value) = value.trim().parse::<f64>() {
                *sum.get_or_insert(0.0) += value;
            }
        }
    }
    sum
}

/// A series' name and its `key="value"` labels.
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        Some((name, labels)) => (
            name,
            labels
                .trim_end_matches('}')
                .split(',')
                .filter(|label| !label.is_empty())
                .collect(),
        ),
        None => (series, Vec::new()),
    }
}

/// Options for the proxy under test: the stand-in's endpoints and credentials,
/// with `state_file` in `dir`.
pub fn options_for(standin: &StandIn, dir: &Path) -> RunOptions {
    RunOptions {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        upstream: Some(standin.api_url()),
        token_url: Some(standin.token_url()),
        client_id: Some(goto_auth_proxy::standin::CLIENT_ID.into()),
        state_file: Some(dir.join("state.json")),
        ..RunOptions::default()
    }
}

/// Resolves `options` with the client secret, and `refresh_token` as
/// GOTO_REFRESH_TOKEN when given.
pub fn settings(options: RunOptions, refresh_token: Option<String>) -> Settings {
    let env = move |name: &str| match name {
        "GOTO_CLIENT_SECRET" => Some(CLIENT_SECRET.to_owned()),
        "GOTO_REFRESH_TOKEN" => refresh_token.clone(),
        _ => None,
    };
    options.resolve(&env).expect("test settings are valid")
}

/// Starts the proxy with `settings`.
pub async fn start_proxy(settings: Settings) -> Proxy {
    let listeners = Listeners::bind(&settings)
        .await
        .expect("binding 127.0.0.1:0");
    let addr = listeners.proxy.local_addr().unwrap();
    let admin_addr = listeners.admin.local_addr().unwrap();
    let (trigger, signal) = shutdown::channel();
    let task = tokio::spawn(app::run(settings, listeners, signal));
    Proxy {
        addr,
        admin_addr,
        trigger,
        task,
    }
}

/// A stand-in and a ready proxy in front of it, bootstrapped with the
/// stand-in's refresh token.
pub struct Setup {
    pub standin: StandIn,
    pub proxy: Proxy,
    pub dir: tempfile::TempDir,
}

/// Starts a stand-in with `standin_options`, then a proxy whose options
/// `adjust` may change, and waits until it is ready.
pub async fn setup(standin_options: StandInOptions, adjust: impl FnOnce(&mut RunOptions)) -> Setup {
    let standin = StandIn::start(standin_options)
        .await
        .expect("stand-in starts");
    let dir = tempfile::tempdir().unwrap();
    let mut options = options_for(&standin, dir.path());
    adjust(&mut options);
    let proxy = start_proxy(settings(options, Some(standin.refresh_token()))).await;
    proxy.wait_ready().await;
    Setup {
        standin,
        proxy,
        dir,
    }
}

/// Polls `condition` every 50 ms until it holds, failing after [`PATIENCE`].
pub async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP/1.1 client that does not follow redirects or use a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A client that speaks HTTP/2 to the proxy (h2c, by prior knowledge):
/// its requests share one multiplexed upstream connection.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// The status of a plain GET to `url`.
pub async fn status_of(url: impl reqwest::IntoUrl) -> reqwest::StatusCode {
    client().get(url).send().await.unwrap().status()
}

/// Opens `count` connections to `addr` that never complete a request: a
/// third say nothing, a third start a request head and stall (slowloris),
/// and a third send `third` and stall or wait for their answer.
pub async fn stalled_connections(
    addr: impl tokio::net::ToSocketAddrs + Copy,
    count: usize,
    third: &[u8],
) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        match i % 3 {
            0 => {}
            1 => stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap(),
            _ => stream.write_all(third).await.unwrap(),
        }
        streams.push(stream);
    }
    streams
}

/// Waits until the proxy has closed every one of `streams` by itself.
pub async fn closed_by_the_proxy(streams: Vec<tokio::net::TcpStream>) {
    use tokio::io::AsyncReadExt;
    for mut stream in streams {
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
            .await
            .expect("the proxy closes a connection that completes no request")
            .ok();
    }
}
