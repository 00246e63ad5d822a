//! The admin listener: health, readiness and metrics.

mod common;

use common::{client, setup};
use goto_auth_proxy::standin::StandInOptions;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let health = client()
        .get(s.proxy.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = client()
        .get(s.proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    for _ in 0..3 {
        client().get(s.proxy.url("/x")).send().await.unwrap();
    }
    client()
        .get(s.proxy.url("/forbidden"))
        .send()
        .await
        .unwrap();

    let response = client()
        .get(s.proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for family in [
        "goto_proxy_requests_total",
        "goto_proxy_upstream_duration_seconds",
        "goto_proxy_token_refreshes_total",
        "goto_proxy_auth_retries_total",
        "goto_proxy_state_write_failures_total",
        "goto_proxy_access_token_expires_in_seconds",
        "goto_proxy_refresh_token_age_seconds",
        "goto_proxy_token_ready",
    ] {
        assert!(
            text.lines().any(|line| line.starts_with(family)),
            "{family} missing:\n{text}"
        );
    }
    assert_eq!(
        s.proxy
            .metric("goto_proxy_requests_total{class=\"2xx\"}")
            .await,
        Some(3.0)
    );
    assert_eq!(
        s.proxy
            .metric("goto_proxy_requests_total{class=\"4xx\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        s.proxy
            .metric("goto_proxy_token_refreshes_total{result=\"success\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        s.proxy
            .metric("goto_proxy_upstream_duration_seconds_count")
            .await,
        Some(4.0)
    );
    assert_eq!(s.proxy.metric("goto_proxy_token_ready").await, Some(1.0));
    let expires_in = s
        .proxy
        .metric("goto_proxy_access_token_expires_in_seconds")
        .await
        .unwrap();
    assert!(expires_in > 3000.0 && expires_in <= 3600.0, "{expires_in}");
    let age = s
        .proxy
        .metric("goto_proxy_refresh_token_age_seconds")
        .await
        .unwrap();
    assert!((0.0..600.0).contains(&age), "{age}");

    // No label or value carries a token.
    for token in s
        .standin
        .issued_access_tokens()
        .iter()
        .chain([&s.standin.refresh_token()])
    {
        assert!(!text.contains(&token[..24]), "a token reached /metrics");
    }

    let unknown = client()
        .get(s.proxy.admin_url("/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn healthz_turns_503_once_a_background_task_has_failed() {
    use goto_auth_proxy::admin::AdminService;
    use goto_auth_proxy::metrics::Metrics;
    use goto_auth_proxy::proxy::route::{Router, RoutingTable};
    use goto_auth_proxy::server::{serve, Server, ServerOptions};
    use goto_auth_proxy::supervisor::{Health, Supervisor};
    use std::sync::Arc;

    let health = Arc::new(Health::new());
    let metrics = Arc::new(Metrics::new());
    let admin = Arc::new(AdminService::new(
        Arc::new(Router::new(RoutingTable::default())),
        metrics.clone(),
        health.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, signal) = goto_auth_proxy::shutdown::channel();
    let options = ServerOptions {
        header_read_timeout: std::time::Duration::from_secs(10),
        max_header_bytes: 64 * 1024,
        drain_timeout: std::time::Duration::from_secs(1),
        max_connections: 8,
    };
    let server = Arc::new(Server::new("admin", options));
    tokio::spawn(serve(listener, server, admin, None, metrics, signal));
    let url = format!("http://{addr}/healthz");
    assert_eq!(common::status_of(&url).await, 200);
    let mut supervisor = Supervisor::new(health);
    supervisor.spawn("refresher of account default", async {
        panic!("the refresher broke")
    });
    let exit = supervisor.failure().await;
    assert!(exit.panicked);
    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let text = response.text().await.unwrap();
    assert!(text.contains("refresher of account default"), "{text}");
}
