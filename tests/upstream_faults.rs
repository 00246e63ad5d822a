//! The upstream misbehaving: refusing every token, rate limiting, and
//! connections that break before or during the response.

mod common;

use common::{client, h2c_client, options_for, settings, setup, start_proxy, status_of};
use goto_auth_proxy::standin::StandInOptions;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn an_upstream_that_refuses_every_token_causes_no_refresh_storm() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    s.standin.set_refuse_all(true);
    let before = s.standin.token_requests();
    for _ in 0..25 {
        let response = client().get(s.proxy.url("/x")).send().await.unwrap();
        assert_eq!(
            response.status(),
            401,
            "the upstream's refusal is passed on"
        );
    }
    // One refresh for the first refusal; the token it brought is refused too,
    // which points at scopes or the account, so no more refreshes follow.
    assert_eq!(s.standin.token_requests() - before, 1);
    s.standin.set_refuse_all(false);
    assert_eq!(status_of(s.proxy.url("/x")).await, 200);
}

#[tokio::test]
async fn rate_limiting_is_passed_on_with_retry_after() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let response = client()
        .get(s.proxy.url("/rate-limited"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "too_many_requests");
}

/// An upstream that reads a request head, writes `answer`, and closes.
async fn breaking_upstream(answer: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = stream.write_all(answer).await;
                // Dropping the stream closes the connection mid-answer.
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_connection_reset_before_the_answer_is_502_and_during_it_cuts_the_body() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    for (answer, expect_headers) in [
        (&b""[..], false),
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial"[..],
            true,
        ),
    ] {
        let addr = breaking_upstream(answer).await;
        let dir = tempfile::tempdir().unwrap();
        let mut options = options_for(&s.standin, dir.path());
        options.upstream = Some(format!("http://{addr}"));
        let proxy = start_proxy(settings(options, Some(s.standin.refresh_token()))).await;
        proxy.wait_ready().await;
        let response = client().get(proxy.url("/x")).send().await.unwrap();
        if expect_headers {
            assert_eq!(response.status(), 200);
            assert!(
                response.bytes().await.is_err(),
                "a cut body must not look complete"
            );
        } else {
            assert_eq!(response.status(), 502);
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"], "upstream_failed");
        }
        // Still serving.
        assert_eq!(status_of(proxy.admin_url("/healthz")).await, 200);
    }
}

/// A proxy in front of a TLS stand-in (HTTP/2 by ALPN) that closes each
/// connection gracefully, by GOAWAY, after `requests` requests.
async fn rotating_tls_upstream(requests: usize) -> common::Setup {
    let tls = (
        std::fs::read(common::cert_path("localhost.pem")).unwrap(),
        std::fs::read(common::cert_path("localhost.key")).unwrap(),
    );
    let options = StandInOptions {
        tls: Some(tls),
        close_connections_after: Some(requests),
        ..StandInOptions::default()
    };
    setup(options, |o| {
        o.upstream_ca_file = Some(common::cert_path("test-ca.pem"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_rotating_its_connections_loses_no_request() {
    // Every connection says GOAWAY after 20 requests, as servers that rotate
    // connections do (nginx after 1000); requests in flight on it are refused.
    let s = rotating_tls_upstream(20).await;
    let workers: Vec<_> = (0..16)
        .map(|worker| {
            let url = s.proxy.url(&format!("/G2M/rest/meetings/{worker}"));
            tokio::spawn(async move {
                let client = h2c_client();
                let mut statuses = Vec::new();
                for _ in 0..40 {
                    statuses.push(client.get(&url).send().await.unwrap().status().as_u16());
                }
                statuses
            })
        })
        .collect();
    let mut failed = Vec::new();
    for worker in workers {
        failed.extend(
            worker
                .await
                .unwrap()
                .into_iter()
                .filter(|status| *status != 200),
        );
    }
    assert!(
        failed.is_empty(),
        "{} of 640 requests failed: {failed:?}",
        failed.len()
    );
    assert!(
        s.standin.recorded_requests().len() >= 200,
        "the API saw the requests"
    );
}

/// After a GOAWAY an HTTP/2 server keeps the connection open until the
/// streams under way end, and refuses new ones (once its final GOAWAY is
/// out); a request arriving meanwhile is answered, on whichever connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_after_a_goaway_go_to_a_new_connection_while_the_old_one_drains() {
    // Each connection says GOAWAY as soon as its first request arrives.
    let s = rotating_tls_upstream(1).await;
    // A slow answer keeps the first connection open, draining, for 3 s.
    let client = h2c_client();
    let slow = tokio::spawn(client.get(s.proxy.url("/sleep/3000")).send());
    common::wait_for("the slow request to reach the API", || async {
        s.standin
            .recorded_requests()
            .iter()
            .any(|r| r.path_and_query.starts_with("/sleep/"))
    })
    .await;
    let response = client.get(s.proxy.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
}
