//! Allocations on the hot path, counted exactly: loading the token for a
//! request must not allocate, however many requests do it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use goto_auth_proxy::token::{AccessToken, Snapshot, TokenSource, TokenState};
use secrecy::SecretString;

thread_local! {
    /// Allocations made by this thread; other threads of the test harness do not count.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; the
// counter only observes that it happened.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations_in(work: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    work();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn loading_the_token_allocates_nothing() {
    let source = TokenSource::new();
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
    let loads = 10_000;
    let counted = allocations_in(|| {
        for _ in 0..loads {
            let bearer = source.current().unwrap().expect("a valid token");
            assert_eq!(bearer.header.len(), "Bearer ".len() + 1500);
        }
    });
    assert_eq!(counted, 0, "{counted} allocations in {loads} token loads");
}
