//! The floor of what hyper costs for this job, for `benches/load.py` to
//! load beside goto-auth-proxy: each client connection gets one upstream
//! HTTP/1.1 connection of its own, every request gets the ~1.5 KB bearer
//! header inserted, and nothing else happens (no token source, no metrics,
//! no logs, no limits, no retry).
//!
//! By default it runs on tokio's work-stealing runtime; with `--per-core`,
//! on one single-threaded runtime per core, each accepting from its own
//! `SO_REUSEPORT` listener (as nginx's workers do), which is how
//! `benches/load.py` runs it.
//!
//! ```sh
//! cargo build --release --example minimal_proxy
//! target/release/examples/minimal_proxy 127.0.0.1:18080 http://127.0.0.1:18081
//! target/release/examples/minimal_proxy --per-core 127.0.0.1:18080 http://127.0.0.1:18081
//! target/release/examples/minimal_proxy 127.0.0.1:18080 https://localhost:18443 certs/test-ca.pem
//! ```
//!
//! It runs until killed and binds where it is told (`load.py` gives it a
//! loopback port).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, AUTHORIZATION};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

/// Where requests go, and how.
struct Upstream {
    addr: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let per_core = args.first().is_some_and(|a| a == "--per-core");
    if per_core {
        args.remove(0);
    }
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: minimal_proxy [--per-core] LISTEN_ADDR UPSTREAM_URL [CA_FILE]");
        std::process::exit(64);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR is host:port");
    let upstream = Arc::new(upstream_of(upstream, args.get(2)));
    let bearer = HeaderValue::try_from(format!("Bearer {}", "x".repeat(1500))).unwrap();
    if !per_core {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(serve(bound(listen, false), upstream, bearer));
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let (upstream, bearer) = (upstream.clone(), bearer.clone());
            let listener = bound(listen, true);
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(serve(listener, upstream, bearer))
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

/// A listening socket; with `shared`, one of several on the same address
/// (`SO_REUSEPORT`: the kernel spreads connections over them).
fn bound(addr: SocketAddr, shared: bool) -> std::net::TcpListener {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    if shared {
        socket.set_reuse_port(true).unwrap();
    }
    socket.set_nonblocking(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(1024).unwrap();
    socket.into()
}

fn upstream_of(url: &str, ca_file: Option<&String>) -> Upstream {
    let url = url::Url::parse(url).expect("UPSTREAM_URL is a URL");
    let host = url.host_str().expect("UPSTREAM_URL has a host").to_owned();
    let port = url
        .port_or_known_default()
        .expect("UPSTREAM_URL has a port");
    let tls = (url.scheme() == "https").then(|| {
        let ca = std::fs::read(ca_file.expect("CA_FILE for an https upstream")).unwrap();
        let config = goto_auth_proxy::tls::client_config(Some(&ca)).unwrap();
        let name = rustls_pki_types::ServerName::try_from(host.clone()).unwrap();
        (tokio_rustls::TlsConnector::from(Arc::new(config)), name)
    });
    let addr = if host == "localhost" {
        format!("127.0.0.1:{port}")
    } else {
        format!("{host}:{port}")
    };
    Upstream { addr, tls }
}

async fn serve(listener: std::net::TcpListener, upstream: Arc<Upstream>, bearer: HeaderValue) {
    let listener = TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let (upstream, bearer) = (upstream.clone(), bearer.clone());
        tokio::spawn(async move {
            let Some(sender) = connect(&upstream).await else {
                return;
            };
            let sender = Arc::new(Mutex::new(sender));
            let service = service_fn(move |mut request: Request<Incoming>| {
                let (sender, bearer) = (sender.clone(), bearer.clone());
                async move {
                    request.headers_mut().insert(AUTHORIZATION, bearer);
                    let response: Result<Response<Incoming>, hyper::Error> =
                        sender.lock().await.send_request(request).await;
                    response
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(client), service)
                .await;
        });
    }
}

/// One HTTP/1.1 connection to the upstream, its driver spawned.
async fn connect(upstream: &Upstream) -> Option<hyper::client::conn::http1::SendRequest<Incoming>> {
    let stream = TcpStream::connect(&upstream.addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    match &upstream.tls {
        None => handshake(TokioIo::new(stream)).await,
        Some((connector, name)) => {
            let stream = connector.connect(name.clone(), stream).await.ok()?;
            handshake(TokioIo::new(stream)).await
        }
    }
}

async fn handshake<T>(io: T) -> Option<hyper::client::conn::http1::SendRequest<Incoming>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io).await.ok()?;
    tokio::spawn(connection);
    Some(sender)
}
