//! The token endpoint misbehaving: every fault is counted, retried with
//! backoff by the one refresher, and survived.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::process::{run_command, Running};
use common::{cert_path, client, options_for, settings, start_proxy, status_of, wait_for, Proxy};
use goto_auth_proxy::standin::{Fault, StandIn, StandInOptions};

async fn proxy_for(
    standin: &StandIn,
    dir: &std::path::Path,
    adjust: impl FnOnce(&mut goto_auth_proxy::config::RunOptions),
) -> Proxy {
    let mut options = options_for(standin, dir);
    adjust(&mut options);
    start_proxy(settings(options, Some(standin.refresh_token()))).await
}

async fn refreshes(proxy: &Proxy, result: &str) -> f64 {
    proxy
        .metric(&format!(
            "goto_proxy_token_refreshes_total{{result=\"{result}\"}}"
        ))
        .await
        .unwrap_or(0.0)
}

#[tokio::test]
async fn bad_answers_are_counted_and_retried_until_a_token_comes() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    for fault in [
        Fault::Status(500),
        Fault::Garbage,
        Fault::NoAccessToken,
        Fault::HugeBody,
    ] {
        standin.push_fault(fault);
    }
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&standin, dir.path(), |_| {}).await;
    proxy.wait_ready().await;
    assert_eq!(standin.token_requests(), 5);
    assert_eq!(refreshes(&proxy, "error_status").await, 1.0);
    assert_eq!(refreshes(&proxy, "bad_answer").await, 3.0);
    assert_eq!(refreshes(&proxy, "success").await, 1.0);
    // Backoff: each retry waited at least half its doubling ceiling (0.25 s, 0.5 s, 1 s, 2 s).
    let times = standin.token_request_times();
    for (i, pair) in times.windows(2).enumerate() {
        let least = Duration::from_millis(250 << i);
        assert!(
            pair[1] - pair[0] >= least,
            "retry {i} came after {:?}",
            pair[1] - pair[0]
        );
    }
}

#[tokio::test]
async fn retry_after_from_a_429_is_honoured() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    standin.push_fault(Fault::TooManyRequests {
        retry_after_secs: 3,
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&standin, dir.path(), |o| o.token_wait = Some("20s".into())).await;
    proxy.wait_ready().await;
    let times = standin.token_request_times();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= Duration::from_secs(3),
        "{:?}",
        times[1] - times[0]
    );
    assert_eq!(refreshes(&proxy, "error_status").await, 1.0);
}

#[tokio::test]
async fn a_hanging_or_dripping_endpoint_times_out_and_is_retried() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    standin.push_fault(Fault::Hang);
    standin.push_fault(Fault::SlowDrip);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&standin, dir.path(), |o| {
        o.token_timeout = Some("1s".into())
    })
    .await;
    proxy.wait_ready().await;
    assert_eq!(refreshes(&proxy, "unreachable").await, 2.0);
    assert_eq!(standin.token_requests(), 3);
}

#[tokio::test]
async fn an_untrusted_token_endpoint_certificate_is_a_failure_not_a_token() {
    let tls = (
        std::fs::read(cert_path("localhost.pem")).unwrap(),
        std::fs::read(cert_path("localhost.key")).unwrap(),
    );
    let standin = StandIn::start(StandInOptions {
        tls: Some(tls),
        ..StandInOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&standin, dir.path(), |o| o.token_wait = Some("1s".into())).await;
    wait_for("a failed token request", || async {
        refreshes(&proxy, "unreachable").await >= 1.0
    })
    .await;
    assert_eq!(
        standin.token_requests(),
        0,
        "the TLS handshake must fail before any request"
    );
    let response = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(status_of(proxy.admin_url("/readyz")).await, 503);
}

#[tokio::test]
async fn fifty_waiting_requests_do_not_multiply_token_requests() {
    let standin = Arc::new(StandIn::start(StandInOptions::default()).await.unwrap());
    standin.set_standing_fault(Some(Fault::Status(503)));
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&standin, dir.path(), |o| o.token_wait = Some("3s".into())).await;
    let url = proxy.url("/x");
    let waiting: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { status_of(url).await.as_u16() })
        })
        .collect();
    for request in waiting {
        assert_eq!(request.await.unwrap(), 503);
    }
    // In the ~3 s the requests waited, backoff allows at most 1 + 4 attempts
    // (after ≥0.25, 0.5, 1, 2 s); 50 waiting requests add none.
    let made = standin.token_requests();
    eprintln!("50 requests waited 3 s on a failing endpoint: {made} token requests");
    assert!((1..=6).contains(&made), "{made} token requests");
}

#[tokio::test]
async fn every_fault_is_named_in_the_log() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    for fault in [
        Fault::Status(500),
        Fault::Garbage,
        Fault::NoAccessToken,
        Fault::HugeBody,
        Fault::Hang,
    ] {
        standin.push_fault(fault);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut command = run_command(&standin, dir.path(), &standin.refresh_token());
    command.args(["--token-timeout", "1s"]);
    let running = Running::spawn(command);
    let expected = [
        "the token endpoint answered HTTP 500",
        "something that is not JSON",
        "has no access_token",
        "larger than 262144 bytes",
        "timed out",
        "access token obtained",
    ];
    wait_for("every fault in the log", || {
        let log = running.log_text();
        std::future::ready(expected.iter().all(|line| log.contains(line)))
    })
    .await;
    let log = running.log_text();
    assert!(log.contains("retry_in="), "{log}");
}
