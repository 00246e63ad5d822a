//! The route seam: a router with two routes sends each request with its
//! route's token to its route's upstream, a swapped table takes effect for
//! new requests only, and a stream that is not a TCP socket is served
//! through the same path.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{client, wait_for, PATIENCE};
use goto_auth_proxy::access::AccessLog;
use goto_auth_proxy::config::UpstreamUrl;
use goto_auth_proxy::front::FrontDoor;
use goto_auth_proxy::metrics::Metrics;
use goto_auth_proxy::proxy::rate::{RateSettings, RateShaper};
use goto_auth_proxy::proxy::route::{Route, RoutePolicy, Router, RoutingTable};
use goto_auth_proxy::proxy::upstream::{ConnectOptions, Pools, Upstream};
use goto_auth_proxy::proxy::ProxyService;
use goto_auth_proxy::server::{serve, Accepting, Admission, Server, ServerOptions};
use goto_auth_proxy::shutdown::{self, ShutdownTrigger};
use goto_auth_proxy::standin::{StandIn, StandInOptions, CLIENT_ID, CLIENT_SECRET};
use goto_auth_proxy::token::endpoint::{
    unix_now, ClientCredentials, EndpointOptions, TokenEndpoint,
};
use goto_auth_proxy::token::refresher::{Credential, Refresher};
use goto_auth_proxy::token::TokenSource;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

/// One account in front of its own stand-in: a token source kept fresh by a
/// real refresher against the stand-in's token endpoint.
struct Account {
    standin: StandIn,
    tokens: Arc<TokenSource>,
    _stop: ShutdownTrigger,
}

async fn account() -> Account {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let tokens = Arc::new(TokenSource::new());
    let endpoint = TokenEndpoint::new(
        standin.token_url().parse().unwrap(),
        ClientCredentials {
            id: CLIENT_ID.into(),
            secret: CLIENT_SECRET.into(),
        },
        &EndpointOptions {
            timeout: Duration::from_secs(10),
            extra_roots_pem: None,
            connect_to: Arc::default(),
        },
    )
    .unwrap();
    let refresher = Refresher::new(
        endpoint,
        Credential::RefreshToken {
            current: standin.refresh_token().into(),
            since: unix_now(),
            fallback: None,
        },
        None,
        tokens.clone(),
        Arc::new(Metrics::new()).account("test"),
        Duration::from_secs(300),
    );
    let (stop, signal) = shutdown::channel();
    tokio::spawn(refresher.run(signal));
    tokens.acquire(PATIENCE).await.expect("a first token");
    Account {
        standin,
        tokens,
        _stop: stop,
    }
}

fn route(name: &str, account: &Account, pools: &Pools) -> Route {
    Route {
        account: name.into(),
        tokens: account.tokens.clone(),
        upstream: Upstream::new(
            UpstreamUrl::parse(&account.standin.api_url(), false).unwrap(),
            pools,
        ),
        policy: RoutePolicy {
            token_wait: Duration::from_secs(10),
            retry_body_limit: 1024 * 1024,
            upstream_timeout: Duration::from_secs(30),
        },
        metrics: Arc::new(Metrics::new()).account(name),
        shaper: Arc::new(RateShaper::new(RateSettings::off())),
    }
}

fn pools() -> Pools {
    Pools::new(
        &ConnectOptions {
            extra_roots_pem: None,
            connect_timeout: Duration::from_secs(5),
            connect_to: Arc::default(),
        },
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

fn server_options() -> ServerOptions {
    ServerOptions {
        header_read_timeout: Duration::from_secs(10),
        max_header_bytes: 64 * 1024,
        drain_timeout: Duration::from_secs(5),
        max_connections: 64,
    }
}

/// Serves `router` on a loopback port.
async fn serve_router(router: Arc<Router>) -> (SocketAddr, ShutdownTrigger) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let proxy = Arc::new(ProxyService::new(router, metrics.clone(), Arc::default()));
    let front = Arc::new(FrontDoor::new(proxy, None, None, AccessLog::new(true)));
    let (trigger, signal) = shutdown::channel();
    tokio::spawn(serve(
        listener,
        Arc::new(Server::new("proxy", server_options())),
        front,
        None,
        metrics,
        signal,
    ));
    (addr, trigger)
}

/// The paths a stand-in's API received.
fn paths(standin: &StandIn) -> Vec<String> {
    standin
        .recorded_requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect()
}

#[tokio::test]
async fn each_request_gets_its_routes_token_and_upstream() {
    let (one, two) = (account().await, account().await);
    let pools = pools();
    let router = Arc::new(Router::new(RoutingTable::new([
        route("default", &one, &pools),
        route("second", &two, &pools),
    ])));
    let (addr, _stop) = serve_router(router).await;
    let http = client();
    let plain = http
        .get(format!("http://{addr}/G2M/rest/meetings"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        plain.status(),
        200,
        "the stand-in took the default route's token"
    );
    let by_header = http
        .get(format!("http://{addr}/G2W/rest/webinars"))
        .header("X-GoTo-Account", "second")
        .send()
        .await
        .unwrap();
    assert_eq!(
        by_header.status(),
        200,
        "the second stand-in took its own token"
    );
    let by_prefix = http
        .get(format!("http://{addr}/acct/second/admin/rest/v1/users?q=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_prefix.status(), 200);
    assert_eq!(paths(&one.standin), ["/G2M/rest/meetings"]);
    assert_eq!(
        paths(&two.standin),
        ["/G2W/rest/webinars", "/admin/rest/v1/users?q=1"],
        "the account prefix is stripped"
    );
    for recorded in two.standin.recorded_requests() {
        assert!(
            !recorded.headers.contains_key("x-goto-account"),
            "the account header is stripped"
        );
    }
    let unknown = http
        .get(format!("http://{addr}/acct/third/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["error"], "unknown_account");
}

#[tokio::test]
async fn a_swapped_table_takes_effect_for_new_requests_only() {
    let (one, two) = (account().await, account().await);
    let pools = pools();
    let router = Arc::new(Router::new(RoutingTable::new([route(
        "default", &one, &pools,
    )])));
    let (addr, _stop) = serve_router(router.clone()).await;
    // A slow request starts on the old table...
    let in_flight = tokio::spawn(client().get(format!("http://{addr}/sleep/1500")).send());
    wait_for("the slow request to reach the first stand-in", || async {
        !one.standin.recorded_requests().is_empty()
    })
    .await;
    // ...and the table is swapped under it.
    router.swap(RoutingTable::new([route("default", &two, &pools)]));
    let after = client()
        .get(format!("http://{addr}/G2M/rest/meetings"))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 200);
    let slow = in_flight.await.unwrap().unwrap();
    assert_eq!(slow.status(), 200, "the request in flight kept its route");
    assert_eq!(paths(&one.standin), ["/sleep/1500"]);
    assert_eq!(paths(&two.standin), ["/G2M/rest/meetings"]);
}

#[tokio::test]
async fn a_stream_that_is_not_a_socket_is_served_through_the_same_path() {
    let one = account().await;
    let pools = pools();
    let router = Arc::new(Router::new(RoutingTable::new([route(
        "default", &one, &pools,
    )])));
    let proxy = Arc::new(ProxyService::new(
        router,
        Arc::new(Metrics::new()),
        Arc::default(),
    ));
    let front = Arc::new(FrontDoor::new(proxy, None, None, AccessLog::new(true)));
    let server = Server::new("in-memory", server_options());
    let (near, far) = tokio::io::duplex(64 * 1024);
    let peer = "127.0.0.1:1".parse().unwrap();
    tokio::spawn(server.serve_stream(
        front.clone(),
        front.open_connection(peer, Admission::unlimited()),
        far,
        peer,
    ));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(near))
        .await
        .unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        let request = http::Request::get("/G2M/rest/meetings")
            .header("host", "proxy.local")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let echo: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes())
                .unwrap();
        assert!(echo["token_number"].as_u64().unwrap() >= 1, "{echo}");
    }
    assert_eq!(one.standin.recorded_requests().len(), 2);
}
