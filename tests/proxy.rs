//! The request path: injection, header handling, streaming, HTTP/2, TLS
//! upstreams, and the proxy's own error answers.

mod common;

use common::{cert_path, client, setup, status_of, PATIENCE};
use goto_auth_proxy::standin::StandInOptions;
use serde_json::Value;

#[tokio::test]
async fn injects_the_token_and_rewrites_headers() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let response = client()
        .get(
            s.proxy
                .url("/G2M/rest/meetings?from=2026-01-01&to=2026-02-01"),
        )
        .header("authorization", "Bearer the-clients-own-token")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .header("connection", "x-hop")
        .header("x-hop", "must not cross")
        .header("x-end-to-end", "kept")
        .header("host", "proxy.internal")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/G2M/rest/meetings");
    assert_eq!(echo["query"], "from=2026-01-01&to=2026-02-01");

    let recorded = s.standin.recorded_requests();
    let seen = &recorded.last().unwrap().headers;
    let issued = s.standin.issued_access_tokens();
    let authorizations: Vec<_> = seen.get_all("authorization").iter().collect();
    assert_eq!(authorizations.len(), 1);
    assert_eq!(
        authorizations[0].to_str().unwrap(),
        format!("Bearer {}", issued.last().unwrap())
    );
    assert!(seen.get("proxy-authorization").is_none());
    assert!(seen.get("x-hop").is_none());
    assert_eq!(seen["x-end-to-end"], "kept");
    let api_authority = s.standin.api_url().trim_start_matches("http://").to_owned();
    assert_eq!(seen["host"].to_str().unwrap(), api_authority);
}

#[tokio::test]
async fn a_client_authorization_never_reaches_the_upstream() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    for header in ["Bearer client-secret-token", "Basic Y2xpZW50OnNlY3JldA=="] {
        let status = client()
            .post(s.proxy.url("/echo"))
            .header("authorization", header)
            .body("{}")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    let issued = s.standin.issued_access_tokens();
    for request in s.standin.recorded_requests() {
        for value in request.headers.values() {
            let text = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !text.contains("client-secret-token") && !text.contains("Y2xpZW50"),
                "{text}"
            );
        }
        let authorization = request.headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(issued
            .iter()
            .any(|t| authorization == format!("Bearer {t}")));
    }
}

#[tokio::test]
async fn the_upstream_path_prefix_is_joined() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let standin = &s.standin;
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::options_for(standin, dir.path());
    options.upstream = Some(format!("{}/admin/rest/v1/", standin.api_url()));
    let proxy = common::start_proxy(common::settings(options, Some(standin.refresh_token()))).await;
    proxy.wait_ready().await;
    let echo: Value = client()
        .get(proxy.url("/accounts/1/users?x=%20y"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["path"], "/admin/rest/v1/accounts/1/users");
    assert_eq!(echo["query"], "x=%20y");
}

#[tokio::test]
async fn http2_clients_are_served_without_tls() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .get(s.proxy.url("/G2W/rest/v2/webinars"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/G2W/rest/v2/webinars");
    assert!(echo["token_number"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn multi_megabyte_bodies_stream_both_ways() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let upload: Vec<u8> = (0..9 * 1024 * 1024)
        .map(|i: usize| (i * 7 % 256) as u8)
        .collect();
    let response = client()
        .post(s.proxy.url("/upload"))
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echoed = response.bytes().await.unwrap();
    assert!(
        echoed == upload,
        "the upload came back altered ({} bytes)",
        echoed.len()
    );

    let size = 7 * 1024 * 1024 + 3;
    let download = client()
        .get(s.proxy.url(&format!("/bytes/{size}")))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    let bytes = download.bytes().await.unwrap();
    assert_eq!(bytes.len(), size);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
}

#[tokio::test]
async fn tls_upstream_with_a_private_ca() {
    let chain = std::fs::read(cert_path("localhost.pem")).unwrap();
    let key = std::fs::read(cert_path("localhost.key")).unwrap();
    let options = StandInOptions {
        tls: Some((chain, key)),
        ..StandInOptions::default()
    };
    let s = setup(options.clone(), |o| {
        o.upstream_ca_file = Some(cert_path("test-ca.pem"))
    })
    .await;
    // An HTTP/1 client gets an HTTP/1.1 connection of its own, although the
    // stand-in offers h2 by ALPN; an HTTP/2 client shares an HTTP/2 one.
    for (client, upstream_version) in [(client(), "HTTP/1.1"), (common::h2c_client(), "HTTP/2.0")] {
        let response = client
            .get(s.proxy.url("/G2M/rest/organizers"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let echo: Value = response.json().await.unwrap();
        assert_eq!(echo["version"], upstream_version);
    }

    // Without the CA file the certificate is not trusted: 502, and no request
    // arrives. (Tokens come from a plain-http stand-in here, so the proxy is ready.)
    let before = s.standin.recorded_requests().len();
    let plain = goto_auth_proxy::standin::StandIn::start(StandInOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::options_for(&plain, dir.path());
    options.upstream = Some(s.standin.api_url());
    let untrusting =
        common::start_proxy(common::settings(options, Some(plain.refresh_token()))).await;
    untrusting.wait_ready().await;
    let response = client()
        .get(untrusting.url("/G2M/rest/organizers"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "upstream_unreachable");
    assert!(
        error["message"].as_str().unwrap().contains("certificate"),
        "{error}"
    );
    assert_eq!(s.standin.recorded_requests().len(), before);
}

#[tokio::test]
async fn upstream_refusing_connections_is_502() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::options_for(&s.standin, dir.path());
    options.upstream = Some(format!("http://127.0.0.1:{closed_port}"));
    let proxy =
        common::start_proxy(common::settings(options, Some(s.standin.refresh_token()))).await;
    proxy.wait_ready().await;
    let response = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "application/json");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "upstream_unreachable");
    assert!(error["message"].as_str().unwrap().len() > 10);
}

/// A silent upstream times out at both resolutions of the upstream
/// deadline: tokio's timer for a wait under ten seconds, the workers' tick
/// for a longer one (`server/deadline.rs`; 11 s, as what is left of the
/// wait when the request is sent decides).
#[tokio::test]
async fn upstream_that_never_answers_is_504() {
    let (short, ticking) = tokio::join!(
        answer_of_silent_upstream("1s"),
        answer_of_silent_upstream("11s")
    );
    for (timeout, (status, error)) in [("1s", short), ("11s", ticking)] {
        assert_eq!(status, 504, "upstream timeout {timeout}");
        assert_eq!(
            error["error"], "upstream_timeout",
            "upstream timeout {timeout}"
        );
    }
}

/// The status and error body a request gets through a proxy whose
/// upstream accepts connections and reads, but never answers.
async fn answer_of_silent_upstream(upstream_timeout: &str) -> (u16, Value) {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::options_for(&s.standin, dir.path());
    options.upstream = Some(format!("http://{silent_addr}"));
    options.upstream_timeout = Some(upstream_timeout.into());
    let proxy =
        common::start_proxy(common::settings(options, Some(s.standin.refresh_token()))).await;
    proxy.wait_ready().await;
    let response = tokio::time::timeout(PATIENCE, client().get(proxy.url("/x")).send())
        .await
        .expect("the proxy answers")
        .unwrap();
    let status = response.status().as_u16();
    let error: Value = response.json().await.unwrap();
    hold.abort();
    (status, error)
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    let s = setup(StandInOptions::default(), |o| {
        o.max_header_bytes = Some("16KiB".into())
    })
    .await;
    let response = client()
        .get(s.proxy.url("/x"))
        .header("x-big", "a".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    // The proxy keeps serving.
    assert_eq!(status_of(s.proxy.url("/x")).await, 200);
}

#[tokio::test]
async fn a_forbidden_that_is_not_about_the_token_passes_through_untouched() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let before = s.standin.token_requests();
    let response = client()
        .get(s.proxy.url("/forbidden"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["int_err_code"], "Forbidden");
    assert_eq!(
        s.standin.token_requests(),
        before,
        "a plain 403 must not cause a refresh"
    );
    assert_eq!(
        s.proxy.metric("goto_proxy_auth_retries_total").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn slow_header_senders_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let s = setup(StandInOptions::default(), |o| {
        o.header_read_timeout = Some("1s".into())
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the head: the proxy must close the connection by itself.
    expect_closed_by_the_proxy(stream, "the connection").await;
}

/// Reads `stream` to its end, which the proxy must reach within PATIENCE.
async fn expect_closed_by_the_proxy(mut stream: tokio::net::TcpStream, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "{what} stayed open");
}

/// A keep-alive connection to `proxy` that has been answered one request
/// (the start of the answer read) and is idle now.
async fn served_once(proxy: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(b"GET /G2M/rest/meetings HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    stream
}

/// A header read timeout of ten seconds or more is kept by the workers'
/// tick rather than tokio's timer (`server/deadline.rs`); it must still cut
/// a slow client off, on a connection that has served a request before
/// (the deadline hyper arms between requests) and on a fresh one.
#[tokio::test]
async fn slow_header_senders_are_cut_off_by_the_ticking_deadline_too() {
    use tokio::io::AsyncWriteExt;
    let s = setup(StandInOptions::default(), |o| {
        o.header_read_timeout = Some("10s".into())
    })
    .await;
    let mut served = served_once(s.proxy.addr).await;
    let mut fresh = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    fresh
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    served.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    expect_closed_by_the_proxy(fresh, "the fresh connection").await;
    expect_closed_by_the_proxy(served, "the connection served once").await;
}

/// The drain tells idle keep-alive connections to close at once (it holds
/// their wakers): the proxy stops long before its drain timeout, each idle
/// connection sees the end of its stream, and one mid-request still gets
/// its answer.
#[tokio::test]
async fn the_drain_closes_idle_keep_alive_connections_at_once() {
    // Nothing else would wake an idle connection before PATIENCE runs out:
    // not the drain timeout, not the header read timeout.
    let s = setup(StandInOptions::default(), |o| {
        o.drain_timeout = Some("10min".into());
        o.header_read_timeout = Some("10min".into());
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(served_once(s.proxy.addr).await);
    }
    let in_flight = tokio::spawn(client().get(s.proxy.url("/sleep/1000")).send());
    common::wait_for("the slow request to reach the API", || async {
        s.standin
            .recorded_requests()
            .iter()
            .any(|r| r.path_and_query.starts_with("/sleep"))
    })
    .await;
    // `stop` waits at most PATIENCE, far below the drain timeout.
    let stopping = tokio::spawn(s.proxy.stop());
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the request in flight was cut off");
    stopping.await.unwrap().unwrap();
    for stream in idle {
        expect_closed_by_the_proxy(stream, "an idle connection").await;
    }
}
