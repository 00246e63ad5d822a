//! Upstream connections: a client connection keeps one, a client that leaves
//! hands it on to the next, and an upstream that closes connections (in
//! the open, or by dropping a request) loses no request it may not lose.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{client, options_for, settings, setup, start_proxy, Proxy, Setup};
use goto_auth_proxy::standin::StandInOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A keep-alive GET on `stream`, which must be answered 200.
async fn get_ok_on(stream: &mut TcpStream, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: proxy\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_message(stream).await.expect("an answer");
    assert!(
        answer.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// Sequential requests on one client connection all go over one upstream
/// connection. (A raw connection: a pooling client may open a second one
/// while the first is still on its way back to its pool.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connection_keeps_one_upstream_connection() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    for _ in 0..30 {
        get_ok_on(&mut stream, "/G2M/rest/meetings").await;
    }
    assert_eq!(s.standin.api_connections(), 1);
}

/// Clients that open a connection per request (scripts, curl) reuse the
/// upstream connection the client before them left, instead of opening
/// (and, to GoTo, handshaking) a new one each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_hands_its_upstream_connection_on() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let requests = 20;
    for _ in 0..requests {
        get_with_connection_close(&s).await;
    }
    // A client can come back before the proxy has finished with the one
    // before (both close at once); a few new connections may come of that,
    // one per request would mean nothing is handed on.
    let opened = s.standin.api_connections();
    assert!(
        opened <= 5,
        "{opened} upstream connections for {requests} one-request clients"
    );
    let metrics = client()
        .get(s.proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "goto_proxy_upstream_connections_opened_total {opened}"
        )),
        "{metrics}"
    );
}

/// One request on a connection of its own, read to the end of the proxy's close.
async fn get_with_connection_close(s: &Setup) {
    let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /G2M/rest/meetings HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// An upstream that closes every connection after one answer (as servers
/// with `keepalive_requests 1` do) costs the client nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_each_connection_after_an_answer_loses_nothing() {
    let options = StandInOptions {
        close_connections_after: Some(1),
        ..StandInOptions::default()
    };
    let s = setup(options, |_| {}).await;
    let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    for _ in 0..20 {
        get_ok_on(&mut stream, "/G2M/rest/meetings").await;
    }
    assert_eq!(s.standin.api_connections(), 20);
}

/// An upstream that answers the first request of each connection and then
/// reads the second and closes without an answer: what a keep-alive timeout
/// firing just as a request arrives looks like. Counts the request heads it read.
async fn one_answer_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let counted = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = counted.clone();
            tokio::spawn(async move {
                for answered in [true, false] {
                    if read_message(&mut stream).await.is_none() {
                        return;
                    }
                    heads.fetch_add(1, Ordering::SeqCst);
                    if answered {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
                // Dropped: closed with the second request unanswered.
            });
        }
    });
    (addr, heads)
}

/// Reads one message head and its `content-length` body; `None` at the end of the stream.
async fn read_message(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if received.len() >= end + 4 + length {
                return Some(received);
            }
        }
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

async fn proxy_to(s: &Setup, upstream: SocketAddr, dir: &std::path::Path) -> Proxy {
    let mut options = options_for(&s.standin, dir);
    options.upstream = Some(format!("http://{upstream}"));
    let proxy = start_proxy(settings(options, Some(s.standin.refresh_token()))).await;
    proxy.wait_ready().await;
    proxy
}

/// A GET that a reused upstream connection took and closed without an
/// answer is sent again on a new connection (RFC 9112 §9.3.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_lost_to_a_closing_connection_is_sent_again() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let (upstream, heads) = one_answer_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_to(&s, upstream, dir.path()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..5 {
        get_ok_on(&mut stream, "/x").await;
    }
    // Each request after the first was read once on a closing connection, once again.
    assert_eq!(heads.load(Ordering::SeqCst), 9);
}

/// A POST the upstream may have acted on is never sent twice: the client gets a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_lost_to_a_closing_connection_is_not_sent_again() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let (upstream, heads) = one_answer_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_to(&s, upstream, dir.path()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let post = b"POST /x HTTP/1.1\r\nhost: proxy\r\ncontent-length: 7\r\n\r\n{\"a\":1}";
    stream.write_all(post).await.unwrap();
    let answer = read_message(&mut stream).await.expect("an answer");
    assert!(answer.starts_with(b"HTTP/1.1 200 "));
    stream.write_all(post).await.unwrap();
    let answer = String::from_utf8(read_message(&mut stream).await.expect("an answer")).unwrap();
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert!(answer.contains(r#""error":"upstream_failed""#), "{answer}");
    assert_eq!(
        heads.load(Ordering::SeqCst),
        2,
        "the POST went upstream twice"
    );
}
