//! Deadlines at the resolution of a worker's tick, for the two timeouts
//! armed for every request and almost never reached: hyper's header read
//! timeout and the upstream timeout.
//!
//! A tokio timer costs, per request, a registration in the runtime's timer
//! wheel under its lock, a removal when it is dropped unfired, and the
//! clock arithmetic of both; these deadlines take 500 instructions a
//! request fewer under callgrind (docs/performance.md). Arming one is a push
//! into a slab of the worker thread's own, dropping it a removal, and the
//! worker's tick (every [`TICK`]) wakes what has come due: a deadline fires
//! up to one tick late. That is used only where it is at most a tenth of
//! the wait ([`COARSE_FROM`]); shorter waits, and sleeps polled off a
//! worker thread (the admin listener, tests on tokio's own runtimes), use
//! tokio's timer.
//!
//! A deadline's slot is only a wake-up call: whether the deadline has come
//! is always decided by the clock, so a slot lost (a sleep moved to another
//! thread, a slot reused) costs a spurious wake-up, never a wrong answer.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often a worker wakes up to fire the deadlines that have come due.
pub const TICK: Duration = Duration::from_secs(1);

/// The shortest wait a deadline may serve at tick resolution: ten ticks,
/// so that it fires at most a tenth late.
pub const COARSE_FROM: Duration = Duration::from_secs(10);

thread_local! {
    /// The deadlines armed on this thread; `None` off the workers.
    static ARMED: RefCell<Option<Armed>> = const { RefCell::new(None) };
}

/// Makes the current thread keep deadlines: it must then call [`fire_due`]
/// every [`TICK`] (a worker does, see `workers.rs`).
pub fn keep_on_this_thread() {
    ARMED.with(|armed| *armed.borrow_mut() = Some(Armed::default()));
}

/// Wakes the sleeps on this thread whose deadline has come.
pub fn fire_due() {
    let now = Instant::now();
    let due = ARMED.with(|armed| {
        armed
            .borrow_mut()
            .as_mut()
            .map(|armed| armed.take_due(now))
            .unwrap_or_default()
    });
    // Woken outside the borrow: a waker may arm or drop a deadline itself.
    for waker in due {
        waker.wake();
    }
}

/// A sleep until a deadline. See the module's comment for its resolution.
#[derive(Debug)]
pub struct Sleep {
    at: Instant,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// Kept by the worker's tick; the slot once armed.
    Coarse(Option<Slot>),
    /// Kept by tokio's timer.
    Precise(Pin<Box<tokio::time::Sleep>>),
}

/// Where a coarse sleep is armed: the thread's slab (its address, unique
/// among live threads), the index in it and the slot's generation then.
#[derive(Clone, Copy, Debug)]
struct Slot {
    owner: usize,
    index: u32,
    generation: u32,
}

impl Sleep {
    /// A sleep until `at`, which ends a wait of `wait` in all: at tick
    /// resolution on a worker when `wait` is at least [`COARSE_FROM`].
    pub fn until(at: Instant, wait: Duration) -> Self {
        let coarse = wait >= COARSE_FROM && ARMED.with(|armed| armed.borrow().is_some());
        let kind = if coarse {
            Kind::Coarse(None)
        } else {
            Kind::Precise(Box::pin(tokio::time::sleep_until(at.into())))
        };
        Self { at, kind }
    }

    /// Whether the tick keeps this sleep (rather than tokio's timer).
    pub fn is_coarse(&self) -> bool {
        matches!(self.kind, Kind::Coarse(_))
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let at = this.at;
        let slot = match &mut this.kind {
            Kind::Precise(sleep) => return sleep.as_mut().poll(cx),
            Kind::Coarse(slot) => slot,
        };
        let armed_here = ARMED.with(|armed| {
            let mut armed = armed.borrow_mut();
            let owner = owner_of(&armed);
            let armed = armed.as_mut()?;
            match *slot {
                // Armed here and not fired: only the waker may have changed.
                Some(held) if held.owner == owner && armed.rewake(held, cx.waker()) => {
                    Some(Poll::Pending)
                }
                // Never armed: armed now, without reading the clock; if it is
                // already due, the next tick fires it, within the resolution.
                None => {
                    *slot = Some(armed.arm(owner, at, cx.waker()));
                    Some(Poll::Pending)
                }
                // Fired, or armed on another thread: the clock decides.
                Some(_) if Instant::now() >= at => {
                    *slot = None;
                    Some(Poll::Ready(()))
                }
                Some(_) => {
                    *slot = Some(armed.arm(owner, at, cx.waker()));
                    Some(Poll::Pending)
                }
            }
        });
        match armed_here {
            Some(poll) => poll,
            // Moved off the workers: tokio's timer from here on.
            None => {
                this.kind = Kind::Precise(Box::pin(tokio::time::sleep_until(at.into())));
                Pin::new(this).poll(cx)
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        let Kind::Coarse(Some(held)) = self.kind else {
            return;
        };
        // The thread's slab may be gone already when the thread is ending.
        let _ = ARMED.try_with(|armed| {
            let mut armed = armed.borrow_mut();
            if owner_of(&armed) == held.owner {
                if let Some(armed) = armed.as_mut() {
                    armed.disarm(held);
                }
            }
        });
    }
}

impl hyper::rt::Sleep for Sleep {}

fn owner_of(armed: &Option<Armed>) -> usize {
    std::ptr::from_ref(armed) as usize
}

/// A future with a deadline: [`timeout_at`].
#[derive(Debug)]
pub struct Timeout<F> {
    future: F,
    sleep: Sleep,
}

/// The deadline passed before the future finished.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `future` until `at`, the end of a wait of `wait` in all (which
/// decides the resolution, see [`Sleep::until`]). The future is polled
/// first, so one that is ready is never timed out.
pub fn timeout_at<F: Future + Unpin>(at: Instant, wait: Duration, future: F) -> Timeout<F> {
    Timeout {
        future,
        sleep: Sleep::until(at, wait),
    }
}

impl<F: Future + Unpin> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(output) = Pin::new(&mut this.future).poll(cx) {
            return Poll::Ready(Ok(output));
        }
        Pin::new(&mut this.sleep).poll(cx).map(|()| Err(Elapsed))
    }
}

/// hyper's timer for a server whose timeouts are `wait` long: coarse
/// sleeps on the workers when that is long enough (see [`Sleep::until`]).
#[derive(Clone, Copy, Debug)]
pub struct Timer {
    wait: Duration,
}

impl Timer {
    /// A timer for timeouts of `wait`.
    pub fn for_timeouts_of(wait: Duration) -> Self {
        Self { wait }
    }
}

impl hyper::rt::Timer for Timer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep::until(Instant::now() + duration, duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep::until(deadline, self.wait))
    }
}

/// The deadlines armed on one thread.
#[derive(Default)]
struct Armed {
    slots: Vec<Entry>,
    free: Vec<u32>,
}

#[derive(Default)]
struct Entry {
    generation: u32,
    waiting: Option<(Instant, Waker)>,
}

impl Armed {
    fn arm(&mut self, owner: usize, at: Instant, waker: &Waker) -> Slot {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Entry::default());
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 deadlines")
            }
        };
        let entry = &mut self.slots[index as usize];
        entry.waiting = Some((at, waker.clone()));
        Slot {
            owner,
            index,
            generation: entry.generation,
        }
    }

    /// Keeps `slot`'s waker current; false when the slot is no longer
    /// `slot`'s (it fired).
    fn rewake(&mut self, slot: Slot, waker: &Waker) -> bool {
        match self.entry_of(slot) {
            Some((_, held)) => {
                if !held.will_wake(waker) {
                    held.clone_from(waker);
                }
                true
            }
            None => false,
        }
    }

    fn disarm(&mut self, slot: Slot) {
        if self.entry_of(slot).is_some() {
            self.release(slot.index);
        }
    }

    /// The wakers of every deadline at or before `now`, their slots freed.
    fn take_due(&mut self, now: Instant) -> Vec<Waker> {
        let mut due = Vec::new();
        for index in 0..self.slots.len() {
            if matches!(self.slots[index].waiting, Some((at, _)) if at <= now) {
                if let Some((_, waker)) = self.release(index as u32) {
                    due.push(waker);
                }
            }
        }
        due
    }

    fn entry_of(&mut self, slot: Slot) -> Option<&mut (Instant, Waker)> {
        let entry = self.slots.get_mut(slot.index as usize)?;
        if entry.generation != slot.generation {
            return None;
        }
        entry.waiting.as_mut()
    }

    fn release(&mut self, index: u32) -> Option<(Instant, Waker)> {
        let entry = &mut self.slots[index as usize];
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(index);
        entry.waiting.take()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    fn poll(sleep: &mut Sleep, waker: &Waker) -> Poll<()> {
        Pin::new(sleep).poll(&mut Context::from_waker(waker))
    }

    /// Runs `test` on a fresh thread that keeps deadlines (as a worker's
    /// does), so that each test has a slab of its own.
    fn on_a_thread_keeping_deadlines(test: impl FnOnce() + Send + 'static) {
        std::thread::spawn(|| {
            keep_on_this_thread();
            test();
        })
        .join()
        .unwrap();
    }

    fn armed_count() -> usize {
        ARMED.with(|armed| {
            let armed = armed.borrow();
            let armed = armed.as_ref().unwrap();
            armed.slots.iter().filter(|e| e.waiting.is_some()).count()
        })
    }

    #[test]
    fn a_due_deadline_is_woken_by_the_tick_and_then_ready() {
        on_a_thread_keeping_deadlines(|| {
            let (woken, waker) = counting_waker();
            let mut sleep = Sleep::until(Instant::now(), COARSE_FROM);
            assert!(sleep.is_coarse());
            assert!(
                poll(&mut sleep, &waker).is_pending(),
                "arming reads no clock"
            );
            assert_eq!(armed_count(), 1);
            fire_due();
            assert_eq!(woken.0.load(Ordering::SeqCst), 1);
            assert_eq!(armed_count(), 0);
            assert!(poll(&mut sleep, &waker).is_ready());
        });
    }

    #[test]
    fn a_deadline_not_yet_due_is_left_armed_and_dropping_it_disarms_it() {
        on_a_thread_keeping_deadlines(|| {
            let (woken, waker) = counting_waker();
            let later = Instant::now() + Duration::from_secs(3600);
            let mut sleep = Sleep::until(later, COARSE_FROM);
            assert!(poll(&mut sleep, &waker).is_pending());
            fire_due();
            assert_eq!(woken.0.load(Ordering::SeqCst), 0);
            assert!(poll(&mut sleep, &waker).is_pending());
            assert_eq!(armed_count(), 1, "polling again arms nothing more");
            drop(sleep);
            assert_eq!(armed_count(), 0);
            // The freed slot serves the next deadline; the old key is stale.
            let mut next = Sleep::until(later, COARSE_FROM);
            assert!(poll(&mut next, &waker).is_pending());
            assert_eq!(armed_count(), 1);
        });
    }

    #[test]
    fn the_latest_waker_is_the_one_woken() {
        on_a_thread_keeping_deadlines(|| {
            let (first, first_waker) = counting_waker();
            let (second, second_waker) = counting_waker();
            let mut sleep = Sleep::until(Instant::now(), COARSE_FROM);
            assert!(poll(&mut sleep, &first_waker).is_pending());
            assert!(poll(&mut sleep, &second_waker).is_pending());
            fire_due();
            assert_eq!(first.0.load(Ordering::SeqCst), 0);
            assert_eq!(second.0.load(Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn a_woken_deadline_not_yet_due_arms_again() {
        on_a_thread_keeping_deadlines(|| {
            let (_, waker) = counting_waker();
            let later = Instant::now() + Duration::from_secs(3600);
            let mut sleep = Sleep::until(later, COARSE_FROM);
            assert!(poll(&mut sleep, &waker).is_pending());
            // As if its slot had been lost (armed on another thread).
            if let Kind::Coarse(Some(slot)) = &mut sleep.kind {
                slot.owner = 0;
            }
            assert!(
                poll(&mut sleep, &waker).is_pending(),
                "the clock says not yet"
            );
            assert_eq!(armed_count(), 2, "armed again here");
        });
    }

    #[tokio::test]
    async fn short_waits_and_threads_without_a_tick_use_tokio() {
        let at = Instant::now() + Duration::from_millis(20);
        let sleep = Sleep::until(at, COARSE_FROM);
        assert!(!sleep.is_coarse(), "this thread keeps no deadlines");
        sleep.await;
        assert!(Instant::now() >= at);
        let on_a_worker = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                keep_on_this_thread();
                let short = Sleep::until(Instant::now(), COARSE_FROM - Duration::from_millis(1));
                (
                    short.is_coarse(),
                    Sleep::until(Instant::now(), COARSE_FROM).is_coarse(),
                )
            })
        });
        assert_eq!(on_a_worker.join().unwrap(), (false, true));
    }

    #[tokio::test]
    async fn a_timeout_gives_the_output_or_elapsed() {
        let soon = Instant::now() + Duration::from_millis(20);
        let never = std::pin::pin!(std::future::pending::<()>());
        assert_eq!(timeout_at(soon, Duration::ZERO, never).await, Err(Elapsed));
        let ready = std::pin::pin!(async { 7 });
        assert_eq!(
            timeout_at(Instant::now(), Duration::ZERO, ready).await,
            Ok(7)
        );
    }
}
