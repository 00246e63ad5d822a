//! Live heap memory, counted exactly by a counting allocator: rounds of
//! idle, slow and completed connections must not leave allocations behind.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use common::{client, setup, PATIENCE};
use goto_auth_proxy::standin::StandInOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes allocated and not yet freed, by anyone in this process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One round: idle, slowloris and completed requests, all closed again.
async fn round(proxy_addr: std::net::SocketAddr, connections: usize) {
    let mut held = Vec::new();
    for i in 0..connections {
        let mut stream = TcpStream::connect(proxy_addr).await.unwrap();
        match i % 3 {
            0 => {}
            1 => stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap(),
            _ => {
                stream
                    .write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
            }
        }
        held.push(stream);
    }
    for mut stream in held {
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
            .await
            .expect("closed by the proxy")
            .ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rounds_leave_no_allocations_behind() {
    let s = setup(StandInOptions::default(), |o| {
        o.header_read_timeout = Some("1s".into())
    })
    .await;
    assert_eq!(
        client()
            .get(s.proxy.url("/warm"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut live = Vec::new();
    for _ in 0..6 {
        round(s.proxy.addr, 300).await;
        // Let connection tasks finish dropping their state.
        tokio::time::sleep(Duration::from_millis(500)).await;
        live.push(LIVE.load(Ordering::Relaxed));
    }
    eprintln!("live heap bytes after each round: {live:?}");
    // The first rounds size the runtime's and hyper's caches (they level off by
    // the third); after that, 900 more connections must leave (almost) nothing:
    // a leak of even 150 bytes a connection would exceed the bound.
    let growth = live[5] - live[2];
    assert!(
        growth < 128 * 1024,
        "live heap grew by {growth} bytes over three rounds: {live:?}"
    );
}
