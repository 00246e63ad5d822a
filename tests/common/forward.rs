//! Forward mode under test: a TLS stand-in for GoTo answering as
//! `api.getgo.com` and `api.goto.com`, a second TLS server with a CA of its
//! own answering as `other.example`, and the proxy with `--forward`, its
//! interception CA made by `ca init`, and `--connect-to` sending those
//! names to the stand-ins.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use goto_auth_proxy::config::RunOptions;
use goto_auth_proxy::standin::{StandIn, StandInOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::pki::Pki;
use super::{options_for, settings, start_proxy, Proxy};

/// The host that is not an inject host.
pub const OTHER_HOST: &str = "other.example";

/// Everything a forward-mode test needs.
pub struct Forward {
    /// GoTo's stand-in, behind `api.getgo.com` and `api.goto.com`.
    pub goto: StandIn,
    /// Another host's server, with certificates from its own CA.
    pub other: StandIn,
    /// The proxy.
    pub proxy: Proxy,
    /// The interception CA's certificate (what clients trust).
    pub ca: PathBuf,
    /// The CA of the stand-in's certificates (what the proxy trusts).
    pub goto_ca: PathBuf,
    /// The other host's CA (what a client tunnelling to it trusts).
    pub other_ca: PathBuf,
    /// Holds the files.
    pub dir: tempfile::TempDir,
}

/// Starts both servers and a ready proxy in forward mode, with `adjust`
/// changing its options last.
pub async fn start(adjust: impl FnOnce(&mut RunOptions, &Path)) -> Forward {
    let dir = tempfile::tempdir().unwrap();
    let goto_pki = Pki::server(
        dir.path(),
        "goto",
        &["api.getgo.com", "api.goto.com", "localhost", "auth.example"],
    );
    let other_pki = Pki::server(dir.path(), "other", &[OTHER_HOST]);
    let goto = StandIn::start(StandInOptions {
        tls: Some(goto_pki.tls()),
        ..StandInOptions::default()
    })
    .await
    .unwrap();
    let other = StandIn::start(StandInOptions {
        tls: Some(other_pki.tls()),
        ..StandInOptions::default()
    })
    .await
    .unwrap();
    goto_auth_proxy::ca::init::init(dir.path(), false).expect("ca init");
    let mut options = options_for(&goto, dir.path());
    options.upstream_ca_file = Some(goto_pki.ca.clone());
    options.forward = Some(true);
    options.connect_to = Some(format!(
        "api.getgo.com:443:127.0.0.1:{goto},api.goto.com:443:127.0.0.1:{goto},{OTHER_HOST}:443:127.0.0.1:{other}",
        goto = port_of(&goto.api_url()),
        other = port_of(&other.api_url()),
    ));
    adjust(&mut options, dir.path());
    let proxy = start_proxy(settings(options, Some(goto.refresh_token()))).await;
    proxy.wait_ready().await;
    Forward {
        goto,
        other,
        proxy,
        ca: dir.path().join(goto_auth_proxy::ca::CERT_FILE_NAME),
        goto_ca: goto_pki.ca,
        other_ca: other_pki.ca,
        dir,
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|port| port.trim_end_matches('/').parse().ok())
        .expect("a URL with a port")
}

/// A reqwest client that goes through `proxy_url` and trusts only `roots`.
pub fn client_via(proxy_url: &str, roots: &[&Path]) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .proxy(reqwest::Proxy::all(proxy_url).unwrap());
    for root in roots {
        let pem = std::fs::read(root).unwrap();
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

/// Sends `CONNECT authority` (with `headers`, each a full line) and
/// returns the status code and the connection, which is the tunnel's on 200.
pub async fn connect(proxy: SocketAddr, authority: &str, headers: &[&str]) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        answer.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, stream)
}

/// A TLS client session over `stream` for `server_name`, trusting only
/// `root` and offering `alpn`.
pub async fn tls_over(
    stream: TcpStream,
    server_name: &str,
    root: &Path,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(root).unwrap();
    for certificate in goto_auth_proxy::tls::certificates_from_pem(&pem).unwrap() {
        roots.add(certificate).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(goto_auth_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
}

/// The bearer token a recorded request carried, if any.
pub fn bearer_of(request: &goto_auth_proxy::standin::RecordedRequest) -> Option<String> {
    request
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// An HTTP/1.1 connection to `host` inside a tunnel through `proxy`, TLS
/// trusting `ca` (the interception CA).
pub async fn intercepted_sender(
    proxy: SocketAddr,
    host: &str,
    ca: &Path,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let (status, tunnel) = connect(proxy, &format!("{host}:443"), &[]).await;
    assert_eq!(status, 200);
    let tls = tls_over(tunnel, host, ca, &[b"http/1.1"]).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}
