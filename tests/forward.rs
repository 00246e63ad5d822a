//! Forward mode with clients that honour `HTTPS_PROXY`: interception for
//! inject hosts (the token added inside the client's TLS), tunnels or
//! refusals for other hosts, the checks that keep the token on the host
//! the client named, the client key, the request rules, and WebSocket
//! through every mode.

mod common;

use common::forward::{
    bearer_of, client_via, connect, intercepted_sender, start, tls_over, OTHER_HOST,
};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use tokio_tungstenite::tungstenite::Message;

/// The JSON body of a response.
async fn json_of(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

#[tokio::test]
async fn an_inject_host_gets_the_token_inside_the_clients_tls() {
    let f = start(|_, _| {}).await;
    let client = client_via(&f.proxy.url(""), &[&f.ca]);
    let response = client
        .get("https://api.getgo.com/G2M/rest/meetings?x=1")
        .header("authorization", "Bearer the-clients-own")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo = json_of(response).await;
    assert_eq!(echo["path"], "/G2M/rest/meetings");
    assert!(echo["token_number"].as_u64().unwrap() >= 1, "{echo}");
    let recorded = f.goto.recorded_requests();
    assert_eq!(recorded.len(), 1);
    let issued = f.goto.issued_access_tokens();
    assert_eq!(bearer_of(&recorded[0]).as_ref(), issued.last());
    // GoTo Connect's host is intercepted too, over the same CA.
    let connect_api = client
        .get("https://api.goto.com/users/v1/me")
        .send()
        .await
        .unwrap();
    assert_eq!(connect_api.status(), 200);
    assert_eq!(f.goto.recorded_requests().len(), 2);
}

#[tokio::test]
async fn another_host_is_tunnelled_untouched_and_never_gets_the_token() {
    let f = start(|_, _| {}).await;
    // Trusting only the other host's own CA: the handshake succeeds only
    // if the client sees that host's certificate, not one the proxy made.
    let client = client_via(&f.proxy.url(""), &[&f.other_ca]);
    let response = client
        .get(format!("https://{OTHER_HOST}/G2M/rest/meetings"))
        .header("authorization", "Bearer the-clients-own")
        .send()
        .await
        .unwrap();
    // The other server judges the client's own token, and refuses it.
    assert_eq!(response.status(), 401);
    let recorded = f.other.recorded_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(bearer_of(&recorded[0]).as_deref(), Some("the-clients-own"));
    assert!(f.goto.recorded_requests().is_empty());
    // A client trusting only the proxy's CA refuses the tunnelled host.
    let fooled = client_via(&f.proxy.url(""), &[&f.ca])
        .get(format!("https://{OTHER_HOST}/x"))
        .send()
        .await;
    assert!(fooled.is_err(), "{fooled:?}");
}

#[tokio::test]
async fn other_hosts_deny_answers_403_for_tunnels_and_absolute_requests() {
    let f = start(|options, _| options.other_hosts = Some("deny".into())).await;
    let (status, _) = connect(f.proxy.addr, &format!("{OTHER_HOST}:443"), &[]).await;
    assert_eq!(status, 403);
    let plain = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(f.proxy.url("")).unwrap())
        .build()
        .unwrap();
    let response = plain
        .get(format!("http://{OTHER_HOST}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(json_of(response).await["error"], "host_not_allowed");
    assert!(f.other.recorded_requests().is_empty());
    let denied = f
        .proxy
        .metric("goto_proxy_forward_connects_total{outcome=\"denied\"}")
        .await;
    assert_eq!(denied, Some(1.0));
}

#[tokio::test]
async fn a_differing_sni_or_host_carries_no_token() {
    let f = start(|_, _| {}).await;
    // The SNI names another inject host: the handshake is refused.
    let (status, tunnel) = connect(f.proxy.addr, "api.getgo.com:443", &[]).await;
    assert_eq!(status, 200);
    let refused = tls_over(tunnel, "api.goto.com", &f.ca, &[b"http/1.1"]).await;
    assert!(refused.is_err(), "a handshake for another name succeeded");
    // The SNI agrees but the Host names another inject host: 421.
    let mut sender = intercepted_sender(f.proxy.addr, "api.getgo.com", &f.ca).await;
    let request = http::Request::get("/G2M/rest/meetings")
        .header("host", "api.goto.com")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 421);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "misdirected_request");
    assert!(f.goto.recorded_requests().is_empty());
    let series = |outcome| format!("goto_proxy_forward_connects_total{{outcome=\"{outcome}\"}}");
    assert_eq!(
        f.proxy.metric(&series("handshake_refused")).await,
        Some(1.0)
    );
    assert_eq!(f.proxy.metric(&series("intercepted")).await, Some(1.0));
}

#[tokio::test]
async fn a_401_inside_the_tunnel_gets_one_refresh_and_one_retry() {
    let f = start(|_, _| {}).await;
    let client = client_via(&f.proxy.url(""), &[&f.ca]);
    let before = f.goto.token_requests();
    f.goto.revoke_access_tokens();
    let response = client
        .get("https://api.getgo.com/G2M/rest/meetings")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(f.goto.api_refusals(), 1);
    assert_eq!(f.goto.token_requests(), before + 1);
    assert_eq!(f.goto.recorded_requests().len(), 2);
}

#[tokio::test]
async fn an_absolute_form_request_to_an_inject_host_goes_over_https_with_the_token() {
    let f = start(|_, _| {}).await;
    let plain = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(f.proxy.url("")).unwrap())
        .build()
        .unwrap();
    let response = plain
        .get("http://api.getgo.com/G2M/rest/meetings")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo = json_of(response).await;
    assert!(echo["token_number"].as_u64().unwrap() >= 1, "{echo}");
    // Origin-form requests on the same listener still go to --upstream.
    let reverse = common::client()
        .get(f.proxy.url("/G2M/rest/meetings"))
        .send()
        .await
        .unwrap();
    assert_eq!(reverse.status(), 200);
    assert_eq!(f.goto.recorded_requests().len(), 2);
}

#[tokio::test]
async fn requests_outside_the_rules_never_reach_goto() {
    let f = start(|options, _| options.allow_requests = Some("GET /G2M/rest/".into())).await;
    let client = client_via(&f.proxy.url(""), &[&f.ca]);
    let denied = client
        .post("https://api.getgo.com/G2M/rest/meetings")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(json_of(denied).await["error"], "request_not_allowed");
    let other_path = client
        .get("https://api.getgo.com/admin/rest/v1/users")
        .send()
        .await
        .unwrap();
    assert_eq!(other_path.status(), 403);
    let climbing = client
        .get("https://api.getgo.com/G2M/rest/a%2F..%2F..%2Fadmin/rest/v1/users")
        .send()
        .await
        .unwrap();
    assert_eq!(climbing.status(), 400);
    let reverse = common::client()
        .get(f.proxy.url("/admin/rest/v1/users"))
        .send()
        .await
        .unwrap();
    assert_eq!(reverse.status(), 403);
    assert!(f.goto.recorded_requests().is_empty());
    let allowed = client
        .get("https://api.getgo.com/G2M/rest/meetings")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(f.goto.recorded_requests().len(), 1);
}

#[tokio::test]
async fn the_client_key_is_asked_for_in_both_modes_and_never_forwarded() {
    let f = start(|options, dir| {
        let key_file = dir.join("client-key");
        std::fs::write(&key_file, "k3y-for-clients\n").unwrap();
        options.client_key_file = Some(key_file);
    })
    .await;
    let reverse = common::client();
    for presented in [None, Some("Bearer wrong"), Some("Basic dXNlcjp3cm9uZw==")] {
        let mut request = reverse.get(f.proxy.url("/G2M/rest/meetings"));
        if let Some(value) = presented {
            request = request.header("proxy-authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 407, "{presented:?}");
        assert_eq!(
            response.headers()["proxy-authenticate"],
            "Basic realm=\"goto-auth-proxy\""
        );
        assert_eq!(json_of(response).await["error"], "proxy_auth_required");
    }
    let admitted = reverse
        .get(f.proxy.url("/G2M/rest/meetings"))
        .header("proxy-authorization", "Bearer k3y-for-clients")
        .send()
        .await
        .unwrap();
    assert_eq!(admitted.status(), 200);
    // Forward mode: the CONNECT needs the key; the URL form carries it.
    let (status, _) = connect(f.proxy.addr, "api.getgo.com:443", &[]).await;
    assert_eq!(status, 407);
    let with_key = format!("http://anyone:k3y-for-clients@{}", f.proxy.addr);
    let response = client_via(&with_key, &[&f.ca])
        .get("https://api.getgo.com/G2M/rest/meetings")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let recorded = f.goto.recorded_requests();
    assert_eq!(recorded.len(), 2);
    for request in recorded {
        assert!(!request.headers.contains_key("proxy-authorization"));
    }
}

/// Opens a WebSocket to `/ws/echo` over `stream`, sends a message and
/// checks the echo; gives whether the handshake carried a valid token.
async fn echo_over<S>(stream: S, url: &str) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut socket, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("the WebSocket handshake succeeds");
    let carried_token = response.headers().contains_key("x-token-number");
    for text in ["hello", "twice"] {
        socket.send(Message::text(text)).await.unwrap();
        let echo = socket.next().await.expect("an echo").unwrap();
        assert_eq!(echo, Message::text(text));
    }
    socket.close(None).await.unwrap();
    carried_token
}

#[tokio::test]
async fn websocket_echo_works_through_every_mode() {
    let f = start(|_, _| {}).await;
    // Reverse mode, on the same listener.
    let direct = tokio::net::TcpStream::connect(f.proxy.addr).await.unwrap();
    let url = format!("ws://{}/ws/echo", f.proxy.addr);
    assert!(echo_over(direct, &url).await, "reverse mode adds the token");
    // Intercepted: a client that wants a WebSocket offers HTTP/1.1 by ALPN.
    let (status, tunnel) = connect(f.proxy.addr, "api.getgo.com:443", &[]).await;
    assert_eq!(status, 200);
    let tls = tls_over(tunnel, "api.getgo.com", &f.ca, &[b"http/1.1"])
        .await
        .unwrap();
    assert!(
        echo_over(tls, "wss://api.getgo.com/ws/echo").await,
        "interception adds the token"
    );
    // Tunnelled: end-to-end TLS with the other host, no token.
    let (status, tunnel) = connect(f.proxy.addr, &format!("{OTHER_HOST}:443"), &[]).await;
    assert_eq!(status, 200);
    let tls = tls_over(tunnel, OTHER_HOST, &f.other_ca, &[b"http/1.1"])
        .await
        .unwrap();
    assert!(
        !echo_over(tls, &format!("wss://{OTHER_HOST}/ws/echo")).await,
        "a tunnel never adds the token"
    );
    let handshakes = f.other.recorded_requests();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(bearer_of(&handshakes[0]), None);
}

#[tokio::test]
async fn a_tunnel_keeps_its_place_under_the_connection_cap() {
    let f = start(|options, _| options.max_connections = Some("1".into())).await;
    let (status, tunnel) = connect(f.proxy.addr, &format!("{OTHER_HOST}:443"), &[]).await;
    assert_eq!(status, 200);
    // The CONNECT's own connection has become the tunnel; while it is
    // open, another client connection is over the cap.
    common::wait_for("the proxy to count the tunnel", || async {
        f.proxy
            .metric("goto_proxy_forward_connects_total{outcome=\"tunnelled\"}")
            .await
            == Some(1.0)
    })
    .await;
    let refused = common::client()
        .get(f.proxy.url("/G2M/rest/meetings"))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    drop(tunnel);
    common::wait_for("the tunnel's place to be free again", || async {
        common::client()
            .get(f.proxy.url("/G2M/rest/meetings"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn a_connect_inside_a_tunnel_is_refused() {
    let f = start(|_, _| {}).await;
    let mut sender = intercepted_sender(f.proxy.addr, "api.getgo.com", &f.ca).await;
    let request = http::Request::connect("api.getgo.com:443")
        .header("host", "api.getgo.com:443")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(f.goto.recorded_requests().is_empty());
}

#[tokio::test]
async fn a_plain_request_to_another_host_is_passed_on_without_the_token() {
    let plain = goto_auth_proxy::standin::StandIn::start(Default::default())
        .await
        .unwrap();
    let port = plain.api_url().rsplit(':').next().unwrap().to_owned();
    let f = start(|options, _| {
        let rules = options.connect_to.take().unwrap();
        // The inject host's other port leads nowhere: no test reaches out.
        options.connect_to = Some(format!(
            "{rules},plain.example:80:127.0.0.1:{port},api.getgo.com:8443:127.0.0.1:1"
        ));
    })
    .await;
    let via_proxy = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(f.proxy.url("")).unwrap())
        .build()
        .unwrap();
    let response = via_proxy
        .get("http://plain.example/G2M/rest/meetings")
        .bearer_auth("the-clients-own")
        .send()
        .await
        .unwrap();
    // The plain server judges the client's own token, and refuses it.
    assert_eq!(response.status(), 401);
    let recorded = plain.recorded_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(bearer_of(&recorded[0]).as_deref(), Some("the-clients-own"));
    assert_eq!(recorded[0].headers["host"], "plain.example");
    // An inject host on another port is no inject host: never the token.
    let (status, _) = connect(f.proxy.addr, "api.getgo.com:8443", &[]).await;
    assert_eq!(
        status, 502,
        "tunnelled (to a port nobody listens on), not intercepted"
    );
    assert!(f.goto.recorded_requests().is_empty());
}

#[tokio::test]
async fn a_websocket_keeps_its_place_under_the_connection_cap() {
    let f = start(|options, _| options.max_connections = Some("1".into())).await;
    let direct = tokio::net::TcpStream::connect(f.proxy.addr).await.unwrap();
    let url = format!("ws://{}/ws/echo", f.proxy.addr);
    let (mut socket, _) = tokio_tungstenite::client_async(url.as_str(), direct)
        .await
        .unwrap();
    socket.send(Message::text("hold")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("hold"));
    let refused = common::client()
        .get(f.proxy.url("/G2M/rest/meetings"))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    socket.close(None).await.unwrap();
    drop(socket);
    common::wait_for("the websocket's place to be free again", || async {
        common::client()
            .get(f.proxy.url("/G2M/rest/meetings"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn connect_to_also_sends_the_token_endpoints_connections() {
    // The token URL names a host that only a --connect-to rule leads to:
    // the proxy gets ready only if the token endpoint's client follows it.
    let f = start(|options, _| {
        let token_url = options.token_url.take().unwrap();
        let port = token_url
            .rsplit(':')
            .next()
            .and_then(|rest| rest.split('/').next())
            .unwrap()
            .to_owned();
        options.token_url = Some(token_url.replace("localhost", "auth.example"));
        let rules = options.connect_to.take().unwrap();
        options.connect_to = Some(format!("{rules},auth.example:{port}:127.0.0.1:{port}"));
    })
    .await;
    assert!(f.goto.token_requests() >= 1);
    let response = common::client()
        .get(f.proxy.url("/G2M/rest/meetings"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// An intercepted request the drain gave up on is closed when the proxy
/// stops, not left running: the connections inside tunnels are served by
/// the same workers, and the proxy may be one part of a longer-lived process.
#[tokio::test]
async fn an_intercepted_request_past_the_drain_is_closed_when_the_proxy_stops() {
    let f = start(|options, _| options.drain_timeout = Some("1s".into())).await;
    let mut sender = intercepted_sender(f.proxy.addr, "api.getgo.com", &f.ca).await;
    let request = http::Request::get("/sleep/600000")
        .header("host", "api.getgo.com")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    // The stand-in answers this after ten minutes.
    let stuck = tokio::spawn(async move { sender.send_request(request).await });
    common::wait_for("the request to reach the upstream", || async {
        !f.goto.recorded_requests().is_empty()
    })
    .await;
    f.proxy.stop().await.unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), stuck)
        .await
        .expect("the request is still open after the proxy stopped");
    assert!(ended.unwrap().is_err(), "an answer came after all");
}
