//! The request path's own work, without sockets: loading the token, building
//! the upstream URI and request, rewriting headers. Run with `cargo bench`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use goto_auth_proxy::config::{UpstreamUrl, DEFAULT_UPSTREAM};
use goto_auth_proxy::proxy::body::ProxyBody;
use goto_auth_proxy::proxy::upstream::{Upstream, UpstreamOptions};
use goto_auth_proxy::proxy::upstream_request;
use goto_auth_proxy::token::{AccessToken, Snapshot, TokenSource, TokenState};
use http::Request;
use secrecy::SecretString;

/// A token source holding one 1.5 KB token, as GoTo's are.
fn source() -> Arc<TokenSource> {
    let source = Arc::new(TokenSource::new());
    let token = AccessToken::new(
        &SecretString::from("x".repeat(1500)),
        Duration::from_secs(3600),
    )
    .unwrap();
    source.publish(Snapshot {
        token: Some(token),
        generation: 1,
        state: TokenState::Fresh,
        principal: None,
        refresh_token_since: None,
    });
    source
}

fn upstream() -> Upstream {
    let url = UpstreamUrl::parse(DEFAULT_UPSTREAM, false).expect("default upstream");
    Upstream::new(&UpstreamOptions {
        url,
        extra_roots_pem: None,
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(60),
    })
    .expect("TLS set-up")
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
    let source = source();
    let upstream = upstream();
    let parts = client_request();
    c.bench_function("token_load", |b| {
        b.iter(|| black_box(source.current().unwrap()))
    });
    c.bench_function("request_path", |b| {
        b.iter(|| {
            let bearer = source.current().unwrap().unwrap();
            let uri = upstream.uri_for(&parts.uri).unwrap();
            black_box(upstream_request(&parts, uri, &bearer, ProxyBody::Empty))
        })
    });
}

criterion_group!(benches, request_path);
criterion_main!(benches);
