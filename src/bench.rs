//! `goto-auth-proxy bench`: the latency the proxy adds, measured on the
//! user's own machine. The stand-in's API is loaded directly and through the
//! proxy (wired as `run` wires it) with the same requests at the same
//! concurrency; the difference between the two latency distributions is the
//! proxy's cost.

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

/// Runs the benchmark and prints its report on stdout.
pub async fn run(options: BenchOptions) -> Result<(Measurement, Measurement), BenchError> {
    let prepared = demo::prepare(DemoOptions {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        token_lifetime: Duration::from_secs(3600),
        rotate_every: 0,
        upstream: None,
        upstream_ca_file: None,
    })
    .await?;
    let standin = prepared.standin.clone();
    let proxy = prepared
        .listeners
        .proxy
        .local_addr()
        .map_err(|e| BenchError::Request(e.to_string()))?;
    let api: SocketAddr = standin
        .api_url()
        .trim_start_matches("http://")
        .parse()
        .map_err(|_| BenchError::Request("the stand-in's address".into()))?;
    let (trigger, signal) = crate::shutdown::channel();
    let proxy_task = tokio::spawn(prepared.run(signal));

    // The first request through the proxy waits for its first token; the
    // direct requests then carry that same token, as a client without the proxy would.
    let mut warm = connect(proxy).await?;
    send(&mut warm, None).await?;
    let token = standin
        .issued_access_tokens()
        .pop()
        .expect("the proxy obtained a token");
    let authorization = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|e| BenchError::Request(e.to_string()))?;

    let direct = measure("direct", api, Some(authorization), &options).await?;
    let proxied = measure("proxy", proxy, None, &options).await?;
    trigger.trigger();
    let _ = proxy_task.await;

    print!("{}", report(&direct, &proxied, &options));
    if let Some(path) = &options.plot {
        std::fs::write(path, plot(&direct, &proxied)).map_err(BenchError::Plot)?;
        println!("plot written to {}", path.display());
    }
    Ok((direct, proxied))
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, BenchError> {
    let failed = |e: &dyn std::fmt::Display| BenchError::Request(e.to_string());
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| failed(&e))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send(
    sender: &mut SendRequest<Empty<Bytes>>,
    authorization: Option<&HeaderValue>,
) -> Result<(), BenchError> {
    let failed = |e: &dyn std::fmt::Display| BenchError::Request(e.to_string());
    sender.ready().await.map_err(|e| failed(&e))?;
    let mut request = Request::get("/G2M/rest/meetings").header(http::header::HOST, "bench");
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

/// Sends `options.requests` requests to `addr` from `options.concurrency`
/// keep-alive connections, showing progress on a terminal.
async fn measure(
    name: &'static str,
    addr: SocketAddr,
    authorization: Option<HeaderValue>,
    options: &BenchOptions,
) -> Result<Measurement, BenchError> {
    let tickets = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let progress = tokio::spawn(show_progress(name, done.clone(), options.requests));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let mut sender = connect(addr).await?;
        let (tickets, done, authorization, total) = (
            tickets.clone(),
            done.clone(),
            authorization.clone(),
            options.requests,
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while tickets.fetch_add(1, Ordering::Relaxed) < total {
                let sent = Instant::now();
                send(&mut sender, authorization.as_ref()).await?;
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
            "\r  {name:<6} [{}{}] {count}/{total}",
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

/// The report: percentiles and rates of both targets, and what the proxy adds.
pub fn report(direct: &Measurement, proxied: &Measurement, options: &BenchOptions) -> String {
    let mut text = format!(
        "\n{} requests each, {} at a time, on loopback to the stand-in API\n\n{:<8}",
        options.requests, options.concurrency, ""
    );
    for (label, _) in PERCENTILES {
        let _ = write!(text, "{label:>10}");
    }
    let _ = writeln!(text, "{:>12}", "req/s");
    for (name, measurement) in [("direct", direct), ("proxy", proxied)] {
        let _ = write!(text, "{name:<8}");
        for (_, fraction) in PERCENTILES {
            let _ = write!(text, "{:>8.3}ms", millis(measurement.percentile(fraction)));
        }
        let _ = writeln!(text, "{:>12.0}", measurement.rate());
    }
    // The maxima are single outliers; their difference means nothing.
    let _ = write!(text, "{:<8}", "added");
    for (_, fraction) in &PERCENTILES[..3] {
        let added = millis(proxied.percentile(*fraction)) - millis(direct.percentile(*fraction));
        let _ = write!(text, "{added:>8.3}ms");
    }
    let _ = writeln!(text, "{:>10}{:>11.2}x", "", proxied.rate() / direct.rate());
    text
}

/// An SVG of both latency distributions (share of requests done by each
/// latency, logarithmic time axis).
pub fn plot(direct: &Measurement, proxied: &Measurement) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const PAD: f64 = 60.0;
    let low = direct.latencies[0]
        .min(proxied.latencies[0])
        .as_secs_f64()
        .max(1e-6)
        .log10()
        .floor();
    let high = direct
        .percentile(1.0)
        .max(proxied.percentile(1.0))
        .as_secs_f64()
        .log10()
        .ceil()
        .max(low + 1.0);
    let x = |seconds: f64| PAD + (seconds.max(1e-6).log10() - low) / (high - low) * (W - 2.0 * PAD);
    let y = |share: f64| H - PAD - share * (H - 2.0 * PAD);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{PAD}\" y=\"30\" font-size=\"15\">Request latency: direct and through goto-auth-proxy</text>\n\
         <line x1=\"{PAD}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{}\" stroke=\"black\"/>\n",
        H - PAD, W - PAD, H - PAD, H - PAD
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
    for (name, measurement, colour, row) in [
        ("direct", direct, "#1f77b4", 0.0),
        ("through the proxy", proxied, "#ff7f0e", 1.0),
    ] {
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
        };
        let text = report(&direct, &proxied, &options);
        assert!(
            text.lines()
                .any(|l| l.starts_with("added") && l.contains("0.050ms")),
            "{text}"
        );
    }

    #[test]
    fn the_plot_has_both_curves() {
        let svg = plot(&measurement(&[50, 60, 70]), &measurement(&[90, 100, 400]));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }
}
