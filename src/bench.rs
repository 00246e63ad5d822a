//! `goto-auth-proxy bench`: the latency the proxy adds, measured on the
//! user's own machine. The stand-in's API is loaded directly and through the
//! proxy (wired as `run` wires it) with the same requests at the same
//! concurrency; the difference between the two latency distributions is the
//! proxy's cost. With `--forward`, reverse mode is the baseline and forward
//! mode's intercepted requests (a tunnel, TLS to the proxy, then the same
//! request path) are compared with it, both to a TLS upstream.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::demo::{self, DemoError, DemoOptions};

/// How `bench` runs.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Requests sent to each of the two targets.
    pub requests: usize,
    /// Connections sending at once, each one request after another.
    pub concurrency: usize,
    /// Where to write an SVG plot of the two latency distributions.
    pub plot: Option<PathBuf>,
    /// Compare forward mode's intercepted requests with reverse mode's,
    /// both to a TLS upstream, instead of the proxy with no proxy.
    pub forward: bool,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Setup(#[from] DemoError),
    #[error("a benchmark request failed: {0}")]
    Request(String),
    #[error("cannot write the plot: {0}")]
    Plot(std::io::Error),
    #[error("cannot make the benchmark's certificates: {0}")]
    Certificates(String),
}

/// The latencies of one target's requests, sorted, and how long they took.
#[derive(Debug)]
pub struct Measurement {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Measurement {
    /// The latency below which `fraction` of the requests finished.
    pub fn percentile(&self, fraction: f64) -> Duration {
        let index = ((self.latencies.len() as f64 * fraction).ceil() as usize)
            .clamp(1, self.latencies.len());
        self.latencies[index - 1]
    }

    /// Requests per second over the whole run.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

const PERCENTILES: [(&str, f64); 4] = [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0)];

/// One measured series: its name in the report and how its requests travel.
struct Series {
    name: &'static str,
    target: Target,
}

/// Where a series' connections go and what its requests carry.
#[derive(Clone)]
enum Target {
    /// Straight to `addr`, with `Host: host` and, when given, a token.
    Plain {
        addr: SocketAddr,
        host: &'static str,
        authorization: Option<HeaderValue>,
    },
    /// Forward mode: `CONNECT host:443` through the proxy at `addr`, then
    /// TLS trusting `tls`'s roots (the interception CA), then requests.
    Intercepted {
        addr: SocketAddr,
        host: &'static str,
        tls: Arc<rustls::ClientConfig>,
    },
}

/// The host forward mode intercepts in the benchmark.
const INTERCEPTED_HOST: &str = "api.getgo.com";

/// Runs the benchmark and prints its report on stdout: the baseline first,
/// then what is compared with it.
pub async fn run(options: BenchOptions) -> Result<(Measurement, Measurement), BenchError> {
    let demo_options = DemoOptions {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        token_lifetime: Duration::from_secs(3600),
        rotate_every: 0,
        upstream: None,
        upstream_ca_file: None,
    };
    let (prepared, interception_ca) = if options.forward {
        let pki = UpstreamPki::new()?;
        let tls = Some((pki.chain.clone().into_bytes(), pki.key.clone().into_bytes()));
        let prepared = demo::prepare_with(demo_options, tls, |run, standin, dir| {
            pki.configure(run, standin, dir)
        })
        .await?;
        let ca = std::fs::read(prepared.state_dir().join(crate::ca::CERT_FILE_NAME))
            .map_err(|e| BenchError::Certificates(e.to_string()))?;
        (prepared, Some(ca))
    } else {
        (demo::prepare(demo_options).await?, None)
    };
    let standin = prepared.standin.clone();
    let proxy = prepared
        .listeners
        .proxy
        .local_addr()
        .map_err(|e| BenchError::Request(e.to_string()))?;
    let (trigger, signal) = crate::shutdown::channel();
    let proxy_task = tokio::spawn(prepared.run(signal));

    // The first request through the proxy waits for its first token; direct
    // requests then carry that same token, as a client without the proxy would.
    let reverse = Target::Plain {
        addr: proxy,
        host: "bench",
        authorization: None,
    };
    let mut warm = open(&reverse).await?;
    send(&mut warm, &reverse).await?;
    let token = standin
        .issued_access_tokens()
        .pop()
        .expect("the proxy obtained a token");
    let (baseline, compared) = match interception_ca {
        Some(ca) => (
            Series {
                name: "reverse",
                target: reverse,
            },
            Series {
                name: "intercepted",
                target: Target::Intercepted {
                    addr: proxy,
                    host: INTERCEPTED_HOST,
                    tls: Arc::new(trusting(&ca)?),
                },
            },
        ),
        None => (
            Series {
                name: "direct",
                target: Target::Plain {
                    addr: standin_addr(&standin.api_url())?,
                    host: "bench",
                    authorization: Some(
                        HeaderValue::try_from(format!("Bearer {token}"))
                            .map_err(|e| BenchError::Request(e.to_string()))?,
                    ),
                },
            },
            Series {
                name: "proxy",
                target: reverse,
            },
        ),
    };
    // Each series once unmeasured first: whichever ran first would otherwise
    // pay for the process warming up (measured: up to 4 times the latency).
    let warm_up = BenchOptions {
        requests: (options.requests / 10).clamp(1, 2_000),
        ..options.clone()
    };
    for series in [&baseline, &compared] {
        measure("warm-up", &series.target, &warm_up).await?;
    }
    let first = measure(baseline.name, &baseline.target, &options).await?;
    let second = measure(compared.name, &compared.target, &options).await?;
    trigger.trigger();
    let _ = proxy_task.await;

    let named = [(baseline.name, &first), (compared.name, &second)];
    print!("{}", report(named, &options));
    if let Some(path) = &options.plot {
        std::fs::write(path, plot(named)).map_err(BenchError::Plot)?;
        println!("plot written to {}", path.display());
    }
    Ok((first, second))
}

fn standin_addr(url: &str) -> Result<SocketAddr, BenchError> {
    url.trim_start_matches("http://")
        .parse()
        .map_err(|_| BenchError::Request("the stand-in's address".into()))
}

/// Certificates for a TLS stand-in that answers as `api.getgo.com` (and
/// `localhost`, for its token endpoint): a CA made for this run and a leaf
/// it signed, both only in memory and the run's state directory.
struct UpstreamPki {
    ca: String,
    chain: String,
    key: String,
}

impl UpstreamPki {
    fn new() -> Result<Self, BenchError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let failed = |e: rcgen::Error| BenchError::Certificates(e.to_string());
        let ca_key = KeyPair::generate().map_err(failed)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "goto-auth-proxy bench upstream CA");
        let ca = ca_params.self_signed(&ca_key).map_err(failed)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().map_err(failed)?;
        let mut params =
            CertificateParams::new(vec![INTERCEPTED_HOST.to_owned(), "localhost".to_owned()])
                .map_err(failed)?;
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &issuer).map_err(failed)?;
        Ok(Self {
            ca: ca.pem(),
            chain: format!("{}{}", leaf.pem(), ca.pem()),
            key: key.serialize_pem(),
        })
    }

    /// Forward mode with its CA in `dir`, and every connection to
    /// `api.getgo.com` (reverse mode's upstream too) sent to the stand-in,
    /// with no rate shaping.
    fn configure(
        &self,
        run: &mut crate::config::RunOptions,
        standin: &crate::standin::StandIn,
        dir: &std::path::Path,
    ) -> std::io::Result<()> {
        let upstream_ca = dir.join("upstream-ca.pem");
        std::fs::write(&upstream_ca, &self.ca)?;
        crate::ca::init::init(dir, true).map_err(std::io::Error::other)?;
        let port = standin
            .api_url()
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        run.upstream = Some(format!("https://{INTERCEPTED_HOST}"));
        run.upstream_ca_file = Some(upstream_ca);
        run.forward = Some(true);
        run.connect_to = Some(format!("{INTERCEPTED_HOST}:443:127.0.0.1:{port}"));
        // The upstream is named as a GoTo host, so GoTo's default rate
        // limit (10 per second) would shape every request: the benchmark
        // measures the proxy, not that limit.
        run.rate_limit = Some("0".into());
        Ok(())
    }
}

/// A client configuration trusting only `ca_pem`, offering HTTP/1.1.
fn trusting(ca_pem: &[u8]) -> Result<rustls::ClientConfig, BenchError> {
    let failed = |e: &dyn std::fmt::Display| BenchError::Certificates(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in crate::tls::certificates_from_pem(ca_pem).map_err(|e| failed(&e))? {
        roots.add(certificate).map_err(|e| failed(&e))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A keep-alive HTTP/1.1 connection to `target`.
async fn open(target: &Target) -> Result<SendRequest<Empty<Bytes>>, BenchError> {
    let failed = |e: &dyn std::fmt::Display| BenchError::Request(e.to_string());
    let addr = match target {
        Target::Plain { addr, .. } | Target::Intercepted { addr, .. } => *addr,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| failed(&e))?;
    let _ = stream.set_nodelay(true);
    let Target::Intercepted { host, tls, .. } = target else {
        return handshake(stream).await;
    };
    let stream = open_tunnel(stream, host).await?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| failed(&e))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, stream)
        .await
        .map_err(|e| failed(&e))?;
    handshake(stream).await
}

/// Asks the proxy on `stream` for a tunnel to `host:443`.
async fn open_tunnel(
    mut stream: tokio::net::TcpStream,
    host: &str,
) -> Result<tokio::net::TcpStream, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed = |e: &dyn std::fmt::Display| BenchError::Request(e.to_string());
    let connect = format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n");
    stream
        .write_all(connect.as_bytes())
        .await
        .map_err(|e| failed(&e))?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await.map_err(|e| failed(&e))? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(BenchError::Request(format!(
            "the proxy refused the tunnel: {}",
            String::from_utf8_lossy(&head)
                .lines()
                .next()
                .unwrap_or_default()
        )));
    }
    Ok(stream)
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Empty<Bytes>>, BenchError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BenchError::Request(e.to_string()))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send(sender: &mut SendRequest<Empty<Bytes>>, target: &Target) -> Result<(), BenchError> {
    let failed = |e: &dyn std::fmt::Display| BenchError::Request(e.to_string());
    sender.ready().await.map_err(|e| failed(&e))?;
    let (host, authorization) = match target {
        Target::Plain {
            host,
            authorization,
            ..
        } => (*host, authorization.as_ref()),
        Target::Intercepted { host, .. } => (*host, None),
    };
    let mut request = Request::get("/G2M/rest/meetings").header(http::header::HOST, host);
    if let Some(value) = authorization {
        request = request.header(http::header::AUTHORIZATION, value);
    }
    let response = sender
        .send_request(request.body(Empty::new()).map_err(|e| failed(&e))?)
        .await
        .map_err(|e| failed(&e))?;
    if !response.status().is_success() {
        return Err(BenchError::Request(format!("answer {}", response.status())));
    }
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(&e))?;
    Ok(())
}

/// Sends `options.requests` requests to `target` from `options.concurrency`
/// keep-alive connections, showing progress on a terminal.
async fn measure(
    name: &'static str,
    target: &Target,
    options: &BenchOptions,
) -> Result<Measurement, BenchError> {
    let tickets = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let progress = tokio::spawn(show_progress(name, done.clone(), options.requests));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let mut sender = open(target).await?;
        let (tickets, done, target, total) = (
            tickets.clone(),
            done.clone(),
            target.clone(),
            options.requests,
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while tickets.fetch_add(1, Ordering::Relaxed) < total {
                let sent = Instant::now();
                send(&mut sender, &target).await?;
                latencies.push(sent.elapsed());
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BenchError>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(options.requests);
    for worker in workers {
        latencies.extend(
            worker
                .await
                .map_err(|e| BenchError::Request(e.to_string()))??,
        );
    }
    let elapsed = started.elapsed();
    progress.abort();
    let _ = progress.await;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    latencies.sort_unstable();
    Ok(Measurement { latencies, elapsed })
}

/// Redraws a progress bar on stderr every 100 ms, when stderr is a terminal.
async fn show_progress(name: &str, done: Arc<AtomicUsize>, total: usize) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    const WIDTH: usize = 40;
    loop {
        let count = done.load(Ordering::Relaxed).min(total);
        let filled = count * WIDTH / total.max(1);
        eprint!(
            "\r  {name:<11} [{}{}] {count}/{total}",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled)
        );
        let _ = std::io::stderr().flush();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Two measured series, named: the baseline first.
pub type Named<'a> = [(&'static str, &'a Measurement); 2];

/// The report: percentiles and rates of both series, and what the second
/// adds to the first.
pub fn report(series: Named<'_>, options: &BenchOptions) -> String {
    let [(_, baseline), (_, compared)] = series;
    let upstream = if options.forward {
        "over TLS to the stand-in API"
    } else {
        "to the stand-in API"
    };
    let mut text = format!(
        "\n{} requests each, {} at a time, on loopback {upstream}\n\n{:<12}",
        options.requests, options.concurrency, ""
    );
    for (label, _) in PERCENTILES {
        let _ = write!(text, "{label:>10}");
    }
    let _ = writeln!(text, "{:>12}", "req/s");
    for (name, measurement) in series {
        let _ = write!(text, "{name:<12}");
        for (_, fraction) in PERCENTILES {
            let _ = write!(text, "{:>8.3}ms", millis(measurement.percentile(fraction)));
        }
        let _ = writeln!(text, "{:>12.0}", measurement.rate());
    }
    // The maxima are single outliers; their difference means nothing.
    let _ = write!(text, "{:<12}", "added");
    for (_, fraction) in &PERCENTILES[..3] {
        let added = millis(compared.percentile(*fraction)) - millis(baseline.percentile(*fraction));
        let _ = write!(text, "{added:>8.3}ms");
    }
    let _ = writeln!(
        text,
        "{:>10}{:>11.2}x",
        "",
        compared.rate() / baseline.rate()
    );
    text
}

/// An SVG of both latency distributions (share of requests done by each
/// latency, logarithmic time axis).
pub fn plot(series: Named<'_>) -> String {
    let [(_, baseline), (_, compared)] = series;
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const PAD: f64 = 60.0;
    let low = baseline.latencies[0]
        .min(compared.latencies[0])
        .as_secs_f64()
        .max(1e-6)
        .log10()
        .floor();
    let high = baseline
        .percentile(1.0)
        .max(compared.percentile(1.0))
        .as_secs_f64()
        .log10()
        .ceil()
        .max(low + 1.0);
    let x = |seconds: f64| PAD + (seconds.max(1e-6).log10() - low) / (high - low) * (W - 2.0 * PAD);
    let y = |share: f64| H - PAD - share * (H - 2.0 * PAD);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{PAD}\" y=\"30\" font-size=\"15\">Request latency: {} and {}</text>\n\
         <line x1=\"{PAD}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{}\" stroke=\"black\"/>\n",
        series[0].0, series[1].0, H - PAD, W - PAD, H - PAD, H - PAD
    );
    let mut decade = low;
    while decade <= high {
        let seconds = 10f64.powf(decade);
        let label = if seconds >= 1e-3 {
            format!("{} ms", seconds * 1e3)
        } else {
            format!("{} µs", (seconds * 1e6).round())
        };
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            x(seconds),
            H - PAD + 18.0
        );
        decade += 1.0;
    }
    for share in [0.0, 0.5, 0.9, 1.0] {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}%</text>",
            PAD - 6.0,
            y(share) + 4.0,
            share * 100.0
        );
    }
    for ((name, measurement), colour, row) in
        [(series[0], "#1f77b4", 0.0), (series[1], "#ff7f0e", 1.0)]
    {
        let count = measurement.latencies.len() as f64;
        let step = (measurement.latencies.len() / 400).max(1);
        let points: Vec<String> = measurement
            .latencies
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i + 1 == measurement.latencies.len())
            .map(|(i, latency)| {
                format!(
                    "{:.1},{:.1}",
                    x(latency.as_secs_f64()),
                    y((i + 1) as f64 / count)
                )
            })
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = writeln!(
            svg,
            // The legend sits bottom right, where the curves have already risen.
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\" text-anchor=\"end\">{name}: p50 {:.3} ms, p99 {:.3} ms</text>",
            W - PAD,
            H - PAD - 40.0 + row * 16.0,
            millis(measurement.percentile(0.5)),
            millis(measurement.percentile(0.99))
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(micros: &[u64]) -> Measurement {
        Measurement {
            latencies: micros.iter().map(|m| Duration::from_micros(*m)).collect(),
            elapsed: Duration::from_secs(1),
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let m = measurement(&(1..=100).collect::<Vec<_>>());
        assert_eq!(m.percentile(0.5), Duration::from_micros(50));
        assert_eq!(m.percentile(0.99), Duration::from_micros(99));
        assert_eq!(m.percentile(1.0), Duration::from_micros(100));
        assert_eq!(m.rate(), 100.0);
    }

    #[test]
    fn the_report_shows_what_the_proxy_adds() {
        let direct = measurement(&[100, 100, 100, 100]);
        let proxied = measurement(&[150, 150, 150, 150]);
        let options = BenchOptions {
            requests: 4,
            concurrency: 1,
            plot: None,
            forward: false,
        };
        let text = report([("direct", &direct), ("proxy", &proxied)], &options);
        assert!(
            text.lines()
                .any(|l| l.starts_with("added") && l.contains("0.050ms")),
            "{text}"
        );
    }

    #[test]
    fn the_plot_has_both_curves() {
        let (direct, proxied) = (measurement(&[50, 60, 70]), measurement(&[90, 100, 400]));
        let svg = plot([("direct", &direct), ("proxy", &proxied)]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }
}
