//! TLS on the main listener: HTTP/2 and HTTP/1.1 by ALPN in reverse mode,
//! forward mode through an `https://` proxy URL, and client certificates
//! that shut out every client without one.

mod common;

use std::path::Path;

use common::forward::{client_via, start, Forward};
use common::pki::Pki;

/// Forward mode on a TLS listener with a certificate for `localhost` from
/// the CA `listener-ca.pem`; `client_ca` requires client certificates.
async fn start_tls(client_ca: Option<&Path>) -> Forward {
    let client_ca = client_ca.map(Path::to_owned);
    start(|options, dir| {
        let pki = Pki::server(dir, "listener", &["localhost"]);
        options.tls_cert_file = Some(pki.chain);
        options.tls_key_file = Some(pki.key);
        options.client_ca_file = client_ca;
    })
    .await
}

/// `https://localhost:port` of the proxy's listener.
fn tls_url(f: &Forward, path: &str) -> String {
    format!("https://localhost:{}{path}", f.proxy.addr.port())
}

fn trusting(f: &Forward, http1_only: bool) -> reqwest::Client {
    let pem = std::fs::read(f.dir.path().join("listener-ca.pem")).unwrap();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

#[tokio::test]
async fn reverse_mode_over_tls_speaks_http2_or_http1_as_the_client_offers() {
    let f = start_tls(None).await;
    for (http1_only, version) in [
        (false, http::Version::HTTP_2),
        (true, http::Version::HTTP_11),
    ] {
        let response = trusting(&f, http1_only)
            .get(tls_url(&f, "/G2M/rest/meetings"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
        let echo: serde_json::Value = response.json().await.unwrap();
        assert!(echo["token_number"].as_u64().unwrap() >= 1, "{echo}");
    }
    // Plain HTTP to a TLS listener gets no answer.
    assert!(common::client()
        .get(f.proxy.url("/G2M/rest/meetings"))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn forward_mode_works_through_an_https_proxy_url() {
    let f = start_tls(None).await;
    let listener_ca = f.dir.path().join("listener-ca.pem");
    let client = client_via(&tls_url(&f, ""), &[&listener_ca, &f.ca]);
    let response = client
        .get("https://api.getgo.com/G2M/rest/meetings")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    assert!(echo["token_number"].as_u64().unwrap() >= 1, "{echo}");
}

#[tokio::test]
async fn with_client_certificates_required_a_client_without_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clients = Pki::client(dir.path(), "clients");
    let f = start_tls(Some(&clients.ca)).await;
    let without = trusting(&f, false)
        .get(tls_url(&f, "/G2M/rest/meetings"))
        .send()
        .await;
    assert!(without.is_err(), "{without:?}");
    let pem = [
        std::fs::read(&clients.chain).unwrap(),
        std::fs::read(&clients.key).unwrap(),
    ]
    .concat();
    let listener_ca = std::fs::read(f.dir.path().join("listener-ca.pem")).unwrap();
    let with = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&listener_ca).unwrap())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let response = with
        .get(tls_url(&f, "/G2M/rest/meetings"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(f.goto.recorded_requests().len(), 1);
}
