//! Where client connections are served: one single-threaded tokio runtime
//! per core, each on a thread of its own, as nginx's workers and HAProxy's
//! threads run. A client connection's task, its requests and the task of
//! the upstream connection bound to it stay on one thread from accept to
//! close, so nothing on the request path is woken on, or stolen by, another
//! thread. The listener, the admin endpoints and the refreshers stay on the
//! main runtime. docs/performance.md has the measurement against tokio's
//! work-stealing runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::deadline::{self, TICK};

/// The worker runtimes; [`Workers::stop`] (or dropping this) stops them,
/// and with them every connection still served on them.
#[derive(Debug)]
pub struct Workers {
    runtimes: Vec<Handle>,
    /// Which runtime the next connection goes to.
    next: AtomicUsize,
    /// Each worker runs until its sender is dropped.
    running: Mutex<Vec<oneshot::Sender<()>>>,
}

impl Workers {
    /// One worker per core the process may use (the cgroup's CPU quota
    /// included), named `{name}-worker-N`.
    pub fn per_core(name: &str) -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::start(name, cores)
    }

    /// `count` workers (at least one).
    pub fn start(name: &str, count: usize) -> std::io::Result<Self> {
        let mut runtimes = Vec::new();
        let mut stop = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtimes.push(runtime.handle().clone());
            let (stop_sender, stopped) = oneshot::channel::<()>();
            stop.push(stop_sender);
            std::thread::Builder::new()
                .name(format!("{name}-worker-{index}"))
                .spawn(move || {
                    // The runtime is dropped on this thread, outside any
                    // runtime, which is where tokio allows it.
                    deadline::keep_on_this_thread();
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            () = tick() => {}
                        }
                    });
                })?;
        }
        Ok(Self {
            runtimes,
            next: AtomicUsize::new(0),
            running: Mutex::new(stop),
        })
    }

    /// Stops every worker: what still runs on them (connections the drain
    /// gave up on, tunnels) is dropped, closing its sockets. Their tasks
    /// hold the server that holds these workers, so this is not left to `Drop`.
    pub fn stop(&self) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.runtimes.len()
    }

    /// Runs `task` on the next worker in turn.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.runtimes.len();
        drop(self.runtimes[index].spawn(task));
    }
}

/// Wakes the worker every [`TICK`] to fire the deadlines that have come
/// due (`deadline.rs`). The tick also keeps tokio's next wake-up at most
/// that far off, which matters for the tokio timers still armed per
/// request (upstream waits under ten seconds): tokio writes to the
/// runtime's eventfd (a system call, and another return from
/// `epoll_wait`) whenever a timer is registered that expires before the
/// next planned wake-up, even from the runtime's own thread. Measured when
/// hyper's header read timeout was still a tokio timer, the earliest one
/// on a quiet worker: 15,840 `write`s in 20,279 requests at 32 connections
/// without the tick, 59 in 31,717 with it (`strace -c -f`).
async fn tick() {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        deadline::fire_due();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn tasks_are_spread_over_every_worker_in_turn() {
        let workers = Workers::start("test", 3).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..6 {
            let (seen, done) = (seen.clone(), done.clone());
            workers.spawn(async move {
                let thread = std::thread::current().name().unwrap().to_owned();
                seen.lock().unwrap().push(thread);
                done.send(()).unwrap();
            });
        }
        for _ in 0..6 {
            finished.recv().await.unwrap();
        }
        let seen = seen.lock().unwrap();
        assert_eq!(workers.count(), 3);
        let threads: HashSet<&str> = seen.iter().map(String::as_str).collect();
        let expected: HashSet<&str> = ["test-worker-0", "test-worker-1", "test-worker-2"].into();
        assert_eq!(threads, expected);
        for thread in &expected {
            assert_eq!(seen.iter().filter(|t| t == thread).count(), 2, "{seen:?}");
        }
    }

    #[tokio::test]
    async fn stopping_the_workers_ends_the_tasks_on_them() {
        let workers = Workers::start("test", 2).unwrap();
        let (started, mut running) = tokio::sync::mpsc::unbounded_channel();
        let (kept, mut ended) = tokio::sync::mpsc::unbounded_channel::<()>();
        workers.spawn(async move {
            let _kept = kept;
            started.send(()).unwrap();
            std::future::pending::<()>().await;
        });
        running.recv().await.unwrap();
        workers.stop();
        // The task's sender is dropped with the task when its runtime stops.
        assert!(ended.recv().await.is_none());
    }
}
