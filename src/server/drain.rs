//! The graceful drain of a server's connections: once shutdown is asked
//! for, every connection is told to finish the request in flight and
//! close, no new one is served, and the server waits for those still open.
//!
//! A connection checks one flag each time it is polled, and the drain
//! keeps its waker so that an idle connection hears of the drain too.
//! (hyper-util's `GracefulShutdown`, used before, polls a tokio `watch`
//! at every wake-up of every connection: 320 instructions a request under
//! callgrind, docs/performance.md. It also cannot watch hyper's HTTP/1
//! connection with upgrades, which the server serves directly.)

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use tokio::sync::Notify;

/// The drain of one server's connections.
#[derive(Debug, Default)]
pub struct Drain {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    started: AtomicBool,
    watched: Mutex<Watched>,
    /// Notified when the last watched connection ends.
    all_closed: Notify,
}

/// The connections being served, by slot: their wakers once polled.
#[derive(Debug, Default)]
struct Watched {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
    open: usize,
}

impl Drain {
    /// A drain with no connection yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a connection in, to be served with [`Watch::serve`]; `None`
    /// once the drain has begun (the connection is then not served).
    pub fn watch(&self) -> Option<Watch> {
        let mut watched = self.shared.lock();
        // Checked under the lock `begin` takes after setting the flag: a
        // connection counted in here is one `begin` will wake.
        if self.shared.started.load(Ordering::SeqCst) {
            return None;
        }
        let slot = match watched.free.pop() {
            Some(slot) => slot,
            None => {
                watched.wakers.push(None);
                watched.wakers.len() - 1
            }
        };
        watched.open += 1;
        Some(Watch {
            shared: self.shared.clone(),
            slot,
            waker: None,
        })
    }

    /// Tells every connection to close once its request in flight is
    /// answered; returns how many are open, or `None` if the drain had
    /// begun already.
    pub fn begin(&self) -> Option<usize> {
        if self.shared.started.swap(true, Ordering::SeqCst) {
            return None;
        }
        let watched = self.shared.lock();
        for waker in watched.wakers.iter().flatten() {
            waker.wake_by_ref();
        }
        Some(watched.open)
    }

    /// Waits until every connection counted in has ended.
    pub async fn closed(&self) {
        loop {
            // Made before the count is read, so that a notification
            // between the two is not missed.
            let notified = self.shared.all_closed.notified();
            if self.shared.lock().open == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Watched> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's place in the drain; dropping it counts the
/// connection out.
#[derive(Debug)]
pub struct Watch {
    shared: Arc<Shared>,
    slot: usize,
    /// The waker the drain holds for this connection, to skip the lock
    /// while it stays the same (it does, for a task's whole life).
    waker: Option<Waker>,
}

impl Watch {
    /// Polls `connection` to its end, calling `close` on it (hyper's
    /// `graceful_shutdown`) once the drain begins.
    pub async fn serve<C, F>(mut self, connection: C, mut close: F) -> C::Output
    where
        C: Future,
        F: FnMut(Pin<&mut C>),
    {
        let mut connection = pin!(connection);
        let mut told = false;
        std::future::poll_fn(|cx| {
            self.keep_waker(cx.waker());
            // After the waker is in place: a drain that begins from here on
            // wakes this task, one that began before is seen now.
            if !told && self.shared.started.load(Ordering::SeqCst) {
                close(connection.as_mut());
                told = true;
            }
            connection.as_mut().poll(cx)
        })
        .await
    }

    fn keep_waker(&mut self, waker: &Waker) {
        if self
            .waker
            .as_ref()
            .is_some_and(|held| held.will_wake(waker))
        {
            return;
        }
        self.shared.lock().wakers[self.slot] = Some(waker.clone());
        self.waker = Some(waker.clone());
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = self.shared.lock();
        watched.wakers[self.slot] = None;
        watched.free.push(self.slot);
        watched.open -= 1;
        if watched.open == 0 {
            self.shared.all_closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::task::Poll;
    use std::time::Duration;

    use super::*;

    /// A stand-in for hyper's connection: pending until `closing` is set.
    fn connection(closing: &AtomicBool) -> impl Future<Output = &'static str> + '_ {
        std::future::poll_fn(move |_| {
            if closing.load(Ordering::SeqCst) {
                Poll::Ready("closed")
            } else {
                Poll::Pending
            }
        })
    }

    /// A connection that stays open until told to close, then ends at its
    /// next poll.
    async fn connection_until_told(drain: &Drain) -> Option<&'static str> {
        let watch = drain.watch()?;
        let closing = AtomicBool::new(false);
        let closed = watch
            .serve(connection(&closing), |_| {
                closing.store(true, Ordering::SeqCst)
            })
            .await;
        Some(closed)
    }

    #[tokio::test]
    async fn idle_connections_are_woken_told_and_waited_for() {
        let drain = Arc::new(Drain::new());
        let mut served = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let drain = drain.clone();
            served.spawn(async move { connection_until_told(&drain).await });
        }
        // Every connection is counted in and has been polled once.
        while drain.shared.lock().wakers.iter().flatten().count() < 3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(drain.begin(), Some(3));
        assert_eq!(drain.begin(), None, "a drain begins once");
        tokio::time::timeout(Duration::from_secs(30), drain.closed())
            .await
            .expect("every connection closed");
        while let Some(result) = served.join_next().await {
            assert_eq!(result.unwrap(), Some("closed"));
        }
        assert!(
            drain.watch().is_none(),
            "nothing is served after the drain began"
        );
    }

    #[tokio::test]
    async fn a_connection_first_polled_after_the_drain_began_is_told_at_once() {
        let drain = Drain::new();
        let watch = drain.watch().unwrap();
        assert_eq!(drain.begin(), Some(1));
        let closing = AtomicBool::new(false);
        let served = watch.serve(connection(&closing), |_| {
            closing.store(true, Ordering::SeqCst)
        });
        let closed = tokio::time::timeout(Duration::from_secs(30), served).await;
        assert_eq!(closed, Ok("closed"), "told on its first poll");
        drain.closed().await;
    }

    #[tokio::test]
    async fn slots_of_ended_connections_are_reused_and_an_empty_drain_is_closed() {
        let drain = Drain::new();
        let first = drain.watch().unwrap();
        let second = drain.watch().unwrap();
        drop(first);
        let third = drain.watch().unwrap();
        assert_eq!(third.slot, 0);
        assert_eq!(drain.shared.lock().wakers.len(), 2);
        drop((second, third));
        drain.closed().await;
        assert_eq!(drain.shared.lock().open, 0);
    }
}
