//! Live heap memory, counted exactly by a counting allocator: rounds of
//! idle, slow and completed connections must not leave allocations behind.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use common::{client, closed_by_the_proxy, setup, stalled_connections, status_of};
use goto_auth_proxy::standin::StandInOptions;

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

/// One round: connections that stay idle, stall in the head, or send garbage,
/// all closed again; then requests that go upstream one after another (so
/// the upstream pool holds one connection, whatever the machine's load).
async fn round(proxy: &common::Proxy, connections: usize) {
    let held = stalled_connections(proxy.addr, connections, b"GARBAGE\r\n\r\n").await;
    closed_by_the_proxy(held).await;
    for _ in 0..50 {
        let response = client()
            .post(proxy.url("/echo"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

/// The live heap once it has stopped changing (connection tasks finish
/// dropping their state a little after the sockets close).
async fn settled_live_bytes() -> isize {
    let mut last = LIVE.load(Ordering::Relaxed);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = LIVE.load(Ordering::Relaxed);
        if (now - last).abs() < 1024 {
            return now;
        }
        last = now;
    }
    last
}

const CONNECTIONS_PER_ROUND: usize = 300;
const MEASURED_ROUNDS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rounds_leave_no_allocations_behind() {
    let s = setup(StandInOptions::default(), |o| {
        o.header_read_timeout = Some("1s".into())
    })
    .await;
    assert_eq!(status_of(s.proxy.url("/warm")).await, 200);
    // Warm-up sizes the runtime's and hyper's caches and fills the stand-in's
    // ring of recorded requests (256 requests, each with a 1.7 KB token).
    for _ in 0..6 {
        round(&s.proxy, CONNECTIONS_PER_ROUND).await;
    }
    let base = settled_live_bytes().await;
    let mut live = Vec::new();
    for _ in 0..MEASURED_ROUNDS {
        round(&s.proxy, CONNECTIONS_PER_ROUND).await;
        live.push(settled_live_bytes().await);
    }
    let connections = (CONNECTIONS_PER_ROUND * MEASURED_ROUNDS) as isize;
    let per_connection = (live[MEASURED_ROUNDS - 1] - base) / connections;
    eprintln!("live heap: {base} bytes after warm-up, then {live:?}; {per_connection} bytes per connection");
    // A connection's or a request's state (buffers, task, timers, headers) is
    // kilobytes; leaking any of it shows as hundreds of bytes per connection.
    assert!(
        per_connection < 128,
        "{per_connection} bytes per connection stay allocated: {live:?}"
    );
}
