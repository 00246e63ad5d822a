//! Criterion benchmarks of the request path. Run with `cargo bench`.
//!
//! - `token_load` and `request_path`: the proxy's own work per request
//!   without sockets (load the token, build the upstream URI and request,
//!   rewrite headers);
//! - `token_load_while_refreshing`: the same load while another thread
//!   publishes new tokens as fast as it can (readers must never wait);
//! - `round_trip/direct` and `round_trip/proxy`: one keep-alive request on
//!   loopback to a minimal upstream, directly and through the proxy; the
//!   difference is what the proxy adds.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use goto_auth_proxy::app::{self, Listeners};
use goto_auth_proxy::config::{RunOptions, UpstreamUrl, DEFAULT_UPSTREAM};
use goto_auth_proxy::metrics::Metrics;
use goto_auth_proxy::proxy::body::ProxyBody;
use goto_auth_proxy::proxy::rate::{api_of, RateSettings, RateShaper};
use goto_auth_proxy::proxy::route::{Route, RoutePolicy, Router, RoutingTable};
use goto_auth_proxy::proxy::upstream::{ConnectOptions, Pools, Upstream};
use goto_auth_proxy::proxy::upstream_request;
use goto_auth_proxy::shutdown;
use goto_auth_proxy::standin::{StandIn, StandInOptions, CLIENT_ID, CLIENT_SECRET};
use goto_auth_proxy::token::{AccessToken, Snapshot, TokenSource, TokenState};
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use secrecy::SecretString;

/// A snapshot holding one 1.5 KB token, as GoTo's are.
fn snapshot(generation: u64) -> Snapshot {
    let token = AccessToken::new(
        &SecretString::from("x".repeat(1500)),
        Duration::from_secs(3600),
    )
    .unwrap();
    Snapshot {
        token: Some(token),
        generation,
        state: TokenState::Fresh,
        principal: None,
        refresh_token_since: None,
    }
}

/// A router with the one route today's settings make, to the default
/// upstream, shaped as `rate` says.
fn router(tokens: Arc<TokenSource>, rate: RateSettings) -> Router {
    let url = UpstreamUrl::parse(DEFAULT_UPSTREAM, false).expect("default upstream");
    let pools = Pools::new(
        &ConnectOptions {
            extra_roots_pem: None,
            connect_timeout: Duration::from_secs(5),
            connect_to: Arc::default(),
        },
        Arc::new(Metrics::new()),
    )
    .expect("TLS set-up");
    Router::new(RoutingTable::new([Route {
        account: "default".into(),
        tokens,
        upstream: Upstream::new(url, &pools),
        policy: RoutePolicy {
            token_wait: Duration::from_secs(10),
            retry_body_limit: 1024 * 1024,
            upstream_timeout: Duration::from_secs(60),
        },
        metrics: Arc::new(Metrics::new()).account("default"),
        shaper: Arc::new(RateShaper::new(rate)),
    }]))
}

/// A request as a typical API client sends it.
fn client_request() -> http::request::Parts {
    let (parts, ()) = Request::get("/G2M/rest/meetings?scheduled=true&page=2")
        .header("host", "127.0.0.1:8080")
        .header("user-agent", "python-requests/2.32.3")
        .header("accept", "application/json")
        .header("accept-encoding", "gzip, deflate")
        .header("connection", "keep-alive")
        .header("authorization", "Bearer ignored-client-token")
        .body(())
        .unwrap()
        .into_parts();
    parts
}

fn request_path(c: &mut Criterion) {
    let source = Arc::new(TokenSource::new());
    source.publish(snapshot(1));
    let router = router(source.clone(), RateSettings::off());
    // A limit no benchmark reaches: every request takes the shaper's path
    // and none waits.
    let shaped = self::router(
        source.clone(),
        RateSettings {
            per_second: u32::MAX,
            burst: u32::MAX,
            queue: 100,
            max_wait: Duration::from_secs(5),
        },
    );
    let parts = client_request();
    c.bench_function("token_load", |b| {
        b.iter(|| black_box(source.current().unwrap()))
    });
    c.bench_function("request_path", |b| {
        b.iter_batched_ref(
            || parts.clone(),
            |parts| {
                let route = router.route(parts, None).unwrap();
                let bearer = route.tokens.current().unwrap().unwrap();
                let target = route.upstream.target_for(&parts.uri).unwrap();
                black_box(upstream_request(parts, target, &bearer, ProxyBody::Empty))
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("request_path_shaped", |b| {
        b.iter_batched_ref(
            || parts.clone(),
            |parts| {
                let route = shaped.route(parts, None).unwrap();
                let admitted = route.shaper.admit(api_of(parts.uri.path()));
                black_box(admitted.now_or_never().expect("no wait").unwrap());
                let bearer = route.tokens.current().unwrap().unwrap();
                let target = route.upstream.target_for(&parts.uri).unwrap();
                black_box(upstream_request(parts, target, &bearer, ProxyBody::Empty))
            },
            BatchSize::SmallInput,
        )
    });

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (source, stop) = (source.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut generation = 1;
            while !stop.load(Ordering::Relaxed) {
                generation += 1;
                source.publish(snapshot(generation));
            }
            generation
        })
    };
    c.bench_function("token_load_while_refreshing", |b| {
        b.iter(|| black_box(source.current().unwrap()))
    });
    stop.store(true, Ordering::Relaxed);
    let published = publisher.join().unwrap();
    eprintln!("(the publisher swapped in {published} tokens meanwhile)");
}

/// A minimal upstream on loopback answering every request with "ok".
async fn minimal_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A keep-alive HTTP/1.1 connection to `addr`.
async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn get(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) {
    sender.ready().await.unwrap();
    let request = Request::get("/G2M/rest/meetings")
        .header("host", "bench")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    black_box(response.into_body().collect().await.unwrap());
}

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (upstream, proxy, _standin, _trigger) = runtime.block_on(async {
        let upstream = minimal_upstream().await;
        let standin = StandIn::start(StandInOptions::default()).await.unwrap();
        let options = RunOptions {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            upstream: Some(format!("http://{upstream}")),
            token_url: Some(standin.token_url()),
            client_id: Some(CLIENT_ID.into()),
            state_file: Some(
                std::env::temp_dir().join(format!("goto-bench-{}.json", std::process::id())),
            ),
            ..RunOptions::default()
        };
        let refresh_token = standin.refresh_token();
        let settings = options
            .resolve(&|name| match name {
                "GOTO_CLIENT_SECRET" => Some(CLIENT_SECRET.to_owned()),
                "GOTO_REFRESH_TOKEN" => Some(refresh_token.clone()),
                _ => None,
            })
            .unwrap();
        let state_file = settings
            .default_account()
            .expect("the default account")
            .state_file
            .clone();
        let listeners = Listeners::bind(&settings).await.unwrap();
        let proxy = listeners.proxy.local_addr().unwrap();
        let (trigger, signal) = shutdown::channel();
        tokio::spawn(app::run(settings, listeners, signal));
        let mut sender = connect(proxy).await;
        // The first request waits for the first token.
        get(&mut sender).await;
        let _ = std::fs::remove_file(state_file);
        (upstream, proxy, standin, trigger)
    });
    let mut group = c.benchmark_group("round_trip");
    for (name, addr) in [("direct", upstream), ("proxy", proxy)] {
        let mut sender = runtime.block_on(connect(addr));
        group.bench_function(name, |b| b.iter(|| runtime.block_on(get(&mut sender))));
    }
    group.finish();
}

criterion_group!(benches, request_path, round_trip);
criterion_main!(benches);
