//! The cap on client connections: one beyond `--max-connections` is closed
//! as soon as it is accepted and counted; room made again lets the next in.

mod common;

use common::{setup, wait_for, PATIENCE};
use goto_auth_proxy::standin::StandInOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A keep-alive connection that has been answered once, and stays open.
async fn open_and_answered(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /G2M/rest/meetings HTTP/1.1\r\nHost: p\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 12];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut buffer))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(&buffer, b"HTTP/1.1 200");
    stream
}

#[tokio::test]
async fn a_connection_beyond_the_cap_is_closed_at_once_and_counted() {
    let s = setup(StandInOptions::default(), |o| {
        o.max_connections = Some("2".into());
    })
    .await;
    let first = open_and_answered(s.proxy.addr).await;
    let _second = open_and_answered(s.proxy.addr).await;
    let mut third = TcpStream::connect(s.proxy.addr).await.unwrap();
    let _ = third
        .write_all(b"GET /G2M/rest/meetings HTTP/1.1\r\nHost: p\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, third.read_to_end(&mut answer))
        .await
        .expect("the proxy closes the connection without waiting");
    assert!(
        read.is_err() || answer.is_empty(),
        "a connection beyond the cap got an answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let refused = s
        .proxy
        .metric("goto_proxy_connections_refused_total{listener=\"proxy\"}")
        .await;
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    // Room again once a client leaves.
    drop(first);
    wait_for("a freed place to admit a new connection", || async {
        let Ok(mut stream) = TcpStream::connect(s.proxy.addr).await else {
            return false;
        };
        if stream
            .write_all(b"GET /G2M/rest/meetings HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        answer.starts_with(b"HTTP/1.1 200")
    })
    .await;
}
