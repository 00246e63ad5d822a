//! Rate shaping per account and API, so that bursts reach GoTo smoothed
//! instead of being answered 429.
//!
//! GoTo allows about ten requests a second per API. Each account has one
//! [`RateShaper`]; it keeps one bucket per API (the first path segment, see
//! [`api_of`]), created when the API is first seen. A bucket is `governor`'s
//! GCRA, with one addition: a request that cannot pass now *reserves* the
//! next free slot and sleeps until it. The reservation is what keeps
//! waiters to the rate however many wait at once: each wakes at its own
//! slot, none has to race the others for the slot that has just come free.
//! A request whose slot would come after the longest wait, or that finds
//! the bucket's queue full, is shed at once with the time to its slot.
//!
//! A 429 from GoTo pauses the bucket (for its `Retry-After`, or a backoff
//! that grows with consecutive 429s); every request of the bucket, those
//! already waiting included, waits for the end of the pause, and the bucket
//! then resumes at its rate without a burst.
//!
//! Time is tokio's, so tests run it under a paused clock.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

/// The most API names one account gets a bucket of its own for; requests
/// to any further name share one overflow bucket, so a client inventing
/// path segments cannot make the proxy keep state without bound.
pub const MAX_APIS: usize = 256;

/// The longest API name that gets a bucket of its own; longer ones (no
/// GoTo API has one) share the overflow bucket.
pub const MAX_API_NAME: usize = 64;

/// The pause after a first 429 that came without `Retry-After`; it doubles
/// with each consecutive one, up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// The longest pause after 429s without `Retry-After`.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The longest pause a `Retry-After` can set: a longer one is taken as this.
pub const PAUSE_MAX: Duration = Duration::from_secs(3600);

/// How one account's requests are shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateSettings {
    /// Requests per second per API; `0` turns shaping off.
    pub per_second: u32,
    /// How many requests may pass at once after a quiet spell (`0` is taken
    /// as `1`); the settings default it to the rate.
    pub burst: u32,
    /// How many requests may wait for their turn per API; one that finds
    /// this many waiting is shed.
    pub queue: usize,
    /// The longest a request waits for its turn; one whose turn would come
    /// later is shed.
    pub max_wait: Duration,
}

impl RateSettings {
    /// No shaping at all.
    pub fn off() -> Self {
        Self {
            per_second: 0,
            burst: 0,
            queue: 0,
            max_wait: Duration::ZERO,
        }
    }
}

/// A request admitted by [`RateShaper::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// How long it waited for its turn; zero when it passed at once.
    pub waited: Duration,
}

/// A request shed by [`RateShaper::admit`]: its turn would come too late,
/// or the queue was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shed {
    /// When to try again, for the `Retry-After` header: the time to the
    /// request's turn in whole seconds, rounded up, at least one second.
    pub retry_after: Duration,
}

/// The API a request belongs to: the first segment of its path, the path
/// being already without any `/acct/NAME/` prefix (`"/G2W/rest/x"` gives
/// `"G2W"`, `"/"` gives `""`).
pub fn api_of(path: &str) -> &str {
    let rest = path.strip_prefix('/').unwrap_or(path);
    match rest.find(['/', '?']) {
        Some(end) => &rest[..end],
        None => rest,
    }
}

/// One account's rate shaper: a bucket per API, shared by every request
/// of the account.
pub struct RateShaper {
    settings: RateSettings,
    /// `None` when shaping is off.
    shaping: Option<Shaping>,
}

/// The state of a shaper that is on.
struct Shaping {
    quota: Quota,
    /// The time every bucket counts from, in nanoseconds.
    epoch: Instant,
    /// The buckets by API name, swapped whole when one is added, so that
    /// finding an existing bucket takes no lock.
    buckets: ArcSwap<HashMap<Box<str>, Arc<Bucket>>>,
    /// Held while a bucket is added, so that two requests that see a new
    /// name at once add one bucket.
    adding: Mutex<()>,
    /// Shared by every API beyond [`MAX_APIS`].
    overflow: Arc<Bucket>,
}

/// One API's bucket.
struct Bucket {
    /// `governor`'s GCRA state. Its clock tells the limiter the instant a
    /// decision is for, which may be a future one: the slot being reserved.
    limiter: RateLimiter<NotKeyed, InMemoryState, DecisionClock, NoOpMiddleware<Nanos>>,
    /// Held for each decision: set the clock, ask the limiter, count the
    /// waiter. A few atomic operations, never across an await.
    schedule: Mutex<Schedule>,
    /// 429s since the last success.
    strikes: AtomicU32,
}

/// What a bucket decides with, besides the limiter.
#[derive(Debug, Default)]
struct Schedule {
    /// Requests holding a reserved turn that has not come yet.
    waiting: usize,
    /// No request passes before this (nanoseconds from the epoch).
    paused_until: u64,
}

/// The clock of a bucket's limiter: reads whatever instant it was last
/// set to, in nanoseconds from the shaper's epoch.
#[derive(Debug, Default)]
struct DecisionClock(AtomicU64);

impl Clock for DecisionClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.load(Ordering::Relaxed))
    }
}

impl RateShaper {
    /// A shaper with these settings; `per_second == 0` makes one that is
    /// off.
    pub fn new(settings: RateSettings) -> Self {
        let shaping = NonZeroU32::new(settings.per_second).map(|rate| {
            let burst = NonZeroU32::new(settings.burst).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::per_second(rate).allow_burst(burst);
            Shaping {
                quota,
                epoch: Instant::now(),
                buckets: ArcSwap::default(),
                adding: Mutex::new(()),
                overflow: Arc::new(Bucket::new(quota)),
            }
        });
        Self { settings, shaping }
    }

    /// The settings the shaper was made with.
    pub fn settings(&self) -> RateSettings {
        self.settings
    }

    /// Whether shaping is off (`per_second == 0`).
    pub fn is_off(&self) -> bool {
        self.shaping.is_none()
    }

    /// Waits for the request's turn in the bucket of `api`: at once while
    /// the API is under its rate, else until the slot it reserves, or not at
    /// all when that slot would come after `max_wait` (a pause after a 429
    /// counts) or `queue` requests are already waiting. Dropping the future
    /// gives up the request's place in the queue; the slot it reserved
    /// stays taken.
    pub async fn admit(&self, api: &str) -> Result<Admitted, Shed> {
        let Some(shaping) = &self.shaping else {
            return Ok(Admitted {
                waited: Duration::ZERO,
            });
        };
        let arrived = shaping.now();
        let waiter = shaping.with_bucket(api, |bucket| {
            let turn = bucket.book(arrived, arrived, false, &self.settings)?;
            // Only a request that waits needs the bucket beyond this point.
            Ok((turn > arrived).then(|| (bucket.clone(), turn)))
        })?;
        let Some((bucket, mut turn)) = waiter else {
            return Ok(Admitted {
                waited: Duration::ZERO,
            });
        };
        let _waiting = Waiting(&bucket);
        loop {
            tokio::time::sleep_until(shaping.instant(turn)).await;
            match bucket.resume(turn, shaping.now(), arrived, &self.settings)? {
                Some(later) => turn = later,
                None => break,
            }
        }
        Ok(Admitted {
            waited: Duration::from_nanos(shaping.now().saturating_sub(arrived)),
        })
    }

    /// GoTo answered 429 for `api`: pauses that bucket for `retry_after`
    /// (at most [`PAUSE_MAX`]), or, when `None`, for a backoff that grows
    /// with consecutive 429s ([`BACKOFF_FIRST`] doubling up to
    /// [`BACKOFF_MAX`], reset by [`succeeded`](Self::succeeded)). A pause
    /// never shortens one already running. Returns the time until the
    /// bucket's pause ends (the longer of this pause and the running one):
    /// zero when shaping is off, as nothing is then paused.
    pub fn throttled(&self, api: &str, retry_after: Option<Duration>) -> Duration {
        let Some(shaping) = &self.shaping else {
            return Duration::ZERO;
        };
        shaping.with_bucket(api, |bucket| {
            let strikes = bucket
                .strikes
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            let pause = retry_after.map_or_else(|| backoff(strikes), |after| after.min(PAUSE_MAX));
            let now = shaping.now();
            let until = bucket.pause(now.saturating_add(nanos(pause)), &shaping.quota);
            Duration::from_nanos(until - now)
        })
    }

    /// A success from GoTo for `api`: resets the backoff of its bucket.
    pub fn succeeded(&self, api: &str) {
        let Some(shaping) = &self.shaping else {
            return;
        };
        let buckets = shaping.buckets.load();
        if let Some(bucket) = shaping.find(&buckets, api) {
            // A load first: the common case, no 429 before, writes nothing.
            if bucket.strikes.load(Ordering::Relaxed) != 0 {
                bucket.strikes.store(0, Ordering::Relaxed);
            }
        }
    }
}

impl fmt::Debug for RateShaper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("RateShaper");
        debug.field("settings", &self.settings);
        if let Some(shaping) = &self.shaping {
            debug.field("apis", &shaping.buckets.load().len());
        }
        debug.finish()
    }
}

impl Shaping {
    /// Nanoseconds from the epoch to now.
    fn now(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }

    /// The instant `at` nanoseconds from the epoch.
    fn instant(&self, at: u64) -> Instant {
        self.epoch + Duration::from_nanos(at)
    }

    /// The bucket of `api`, if it exists or is the overflow bucket (for a
    /// name too long, or a new one once there are [`MAX_APIS`]).
    fn find<'a>(
        &'a self,
        buckets: &'a HashMap<Box<str>, Arc<Bucket>>,
        api: &str,
    ) -> Option<&'a Arc<Bucket>> {
        if api.len() > MAX_API_NAME {
            return Some(&self.overflow);
        }
        match buckets.get(api) {
            Some(bucket) => Some(bucket),
            None if buckets.len() >= MAX_APIS => Some(&self.overflow),
            None => None,
        }
    }

    /// Runs `f` with the bucket of `api`, adding the bucket first if it is
    /// new. An existing bucket costs a lock-free load and a lookup.
    fn with_bucket<R>(&self, api: &str, f: impl FnOnce(&Arc<Bucket>) -> R) -> R {
        let buckets = self.buckets.load();
        if let Some(bucket) = self.find(&buckets, api) {
            return f(bucket);
        }
        drop(buckets);
        let bucket = self.add(api);
        f(&bucket)
    }

    /// Adds the bucket of `api` (or finds the one another request has just
    /// added, or the overflow bucket once there are [`MAX_APIS`]).
    fn add(&self, api: &str) -> Arc<Bucket> {
        let _adding = lock(&self.adding);
        let buckets = self.buckets.load_full();
        if let Some(bucket) = self.find(&buckets, api) {
            return bucket.clone();
        }
        let bucket = Arc::new(Bucket::new(self.quota));
        let mut more = HashMap::clone(&buckets);
        more.insert(api.into(), bucket.clone());
        self.buckets.store(Arc::new(more));
        bucket
    }
}

impl Bucket {
    fn new(quota: Quota) -> Self {
        Self {
            // The clock reads 0 here, so the limiter counts from the epoch.
            limiter: RateLimiter::new(quota, InMemoryState::default(), DecisionClock::default()),
            schedule: Mutex::new(Schedule::default()),
            strikes: AtomicU32::new(0),
        }
    }

    /// Books the turn of a request that arrived at `arrived`, asking at
    /// `now`: the first slot at or after `now` (and after any pause), which
    /// it then holds. A turn later than `now` counts the request as waiting
    /// unless it is `queued` already.
    fn book(
        &self,
        now: u64,
        arrived: u64,
        queued: bool,
        settings: &RateSettings,
    ) -> Result<u64, Shed> {
        let mut schedule = lock(&self.schedule);
        let mut turn = now.max(schedule.paused_until);
        loop {
            if turn > now {
                let full = !queued && schedule.waiting >= settings.queue;
                let too_late = turn - arrived > nanos(settings.max_wait);
                if full || too_late {
                    return Err(Shed {
                        retry_after: whole_seconds(turn - now),
                    });
                }
            }
            self.limiter.clock().0.store(turn, Ordering::Relaxed);
            match self.limiter.check() {
                Ok(()) => break,
                // Not yet: ask again for the earliest instant it allows,
                // which the limiter then grants and counts.
                Err(not_until) => turn = not_until.earliest_possible().into(),
            }
        }
        if turn > now && !queued {
            schedule.waiting += 1;
        }
        Ok(turn)
    }

    /// A waiter's turn has come: `None` if it may pass, or a later turn
    /// when a pause has begun since it booked and covers its slot.
    fn resume(
        &self,
        turn: u64,
        now: u64,
        arrived: u64,
        settings: &RateSettings,
    ) -> Result<Option<u64>, Shed> {
        if lock(&self.schedule).paused_until <= turn {
            return Ok(None);
        }
        let later = self.book(now, arrived, true, settings)?;
        Ok((later > now).then_some(later))
    }

    /// Lets no request pass before `until`, and takes away the burst
    /// the bucket would have saved up by then: GoTo has just said it is
    /// over its limit, so the bucket resumes at its rate. Returns the end
    /// of the pause, which a shorter one than that running leaves as it is.
    fn pause(&self, until: u64, quota: &Quota) -> u64 {
        let mut schedule = lock(&self.schedule);
        if until <= schedule.paused_until {
            return schedule.paused_until;
        }
        schedule.paused_until = until;
        // Take every cell the limiter would allow one interval before
        // `until` (in halving batches: a few calls even for a large
        // burst); the next cell is then due at `until`.
        let interval = nanos(quota.replenish_interval()).max(1);
        self.limiter
            .clock()
            .0
            .store(until.saturating_sub(interval), Ordering::Relaxed);
        let mut cells = quota.burst_size().get();
        while let Some(batch) = NonZeroU32::new(cells) {
            if !matches!(self.limiter.check_n(batch), Ok(Ok(()))) {
                cells /= 2;
            }
        }
        until
    }
}

/// Takes a waiter off its bucket's queue when it passes, is shed or is
/// dropped.
struct Waiting<'a>(&'a Bucket);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut schedule = lock(&self.0.schedule);
        schedule.waiting = schedule.waiting.saturating_sub(1);
    }
}

/// The pause after `strikes` consecutive 429s without `Retry-After`.
fn backoff(strikes: u32) -> Duration {
    let doublings = strikes.saturating_sub(1).min(5);
    (BACKOFF_FIRST * (1 << doublings)).min(BACKOFF_MAX)
}

/// `nanos` as whole seconds, rounded up, at least one.
fn whole_seconds(nanos: u64) -> Duration {
    Duration::from_secs(nanos.div_ceil(1_000_000_000).max(1))
}

/// A duration in nanoseconds, saturating (at 584 years).
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Locks `mutex`; a panic elsewhere while it was held left nothing half
/// done (each critical section only stores whole values).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings(per_second: u32, burst: u32, queue: usize, max_wait: Duration) -> RateSettings {
        RateSettings {
            per_second,
            burst,
            queue,
            max_wait,
        }
    }

    /// GoTo's limit with the documented defaults.
    fn goto_default() -> RateSettings {
        settings(10, 10, 100, Duration::from_secs(5))
    }

    /// Starts `admit(api)` in a task; it reports the instant it was
    /// admitted along with the result.
    fn spawn_admit(
        shaper: &Arc<RateShaper>,
        api: &'static str,
    ) -> tokio::task::JoinHandle<(Instant, Result<Admitted, Shed>)> {
        let shaper = shaper.clone();
        tokio::spawn(async move {
            let result = shaper.admit(api).await;
            (Instant::now(), result)
        })
    }

    async fn admitted_at_once(shaper: &RateShaper, api: &str) -> bool {
        matches!(shaper.admit(api).await, Ok(admitted) if admitted.waited.is_zero())
    }

    #[test]
    fn the_api_is_the_first_path_segment() {
        assert_eq!(api_of("/G2W/rest/organizers/1/webinars"), "G2W");
        assert_eq!(api_of("/admin/rest/v1/me"), "admin");
        assert_eq!(api_of("/messaging"), "messaging");
        assert_eq!(api_of("/messaging/"), "messaging");
        assert_eq!(api_of("/G2W?x=1"), "G2W");
        assert_eq!(api_of("/"), "");
        assert_eq!(api_of(""), "");
        assert_eq!(api_of("//x"), "");
    }

    #[test]
    fn a_shaper_can_be_shared_by_every_request() {
        fn shared<T: Send + Sync>() {}
        fn sendable<T: Send>(_: &T) {}
        shared::<RateShaper>();
        let shaper = RateShaper::new(goto_default());
        sendable(&shaper.admit("G2W"));
    }

    #[test]
    fn the_backoff_doubles_up_to_its_maximum() {
        let pauses: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(whole_seconds(0), Duration::from_secs(1));
        assert_eq!(whole_seconds(1), Duration::from_secs(1));
        assert_eq!(whole_seconds(1_000_000_000), Duration::from_secs(1));
        assert_eq!(whole_seconds(1_000_000_001), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_smoothed_to_the_rate_and_the_excess_shed() {
        let shaper = Arc::new(RateShaper::new(goto_default()));
        let start = Instant::now();
        let tasks: Vec<_> = (0..200).map(|_| spawn_admit(&shaper, "G2W")).collect();
        let mut admitted = Vec::new();
        let mut shed = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (at, Ok(done)) => admitted.push((at - start, done.waited)),
                (at, Err(refused)) => {
                    assert_eq!(at, start, "shed at once");
                    shed.push(refused.retry_after);
                }
            }
        }
        // The burst at once, then one every 100 ms up to the 5 s bound.
        assert_eq!(admitted.len(), 10 + 50);
        assert_eq!(shed.len(), 140);
        admitted.sort();
        assert!(admitted[..10].iter().all(|&(at, _)| at.is_zero()));
        for pair in admitted[9..].windows(2) {
            assert!(pair[1].0 - pair[0].0 >= 100 * MS, "{pair:?}");
        }
        for &(at, waited) in &admitted {
            assert_eq!(at, waited);
            assert!(waited <= Duration::from_secs(5));
        }
        assert!(shed.iter().all(|&after| after >= Duration::from_secs(1)));
        assert!(shed.iter().all(|after| after.subsec_nanos() == 0));
        // The first shed request's turn would have been at 5.1 s.
        assert_eq!(shed.iter().min(), Some(&Duration::from_secs(6)));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_released_one_slot_apart() {
        let shaper = Arc::new(RateShaper::new(settings(
            10,
            1,
            100,
            Duration::from_secs(60),
        )));
        assert!(admitted_at_once(&shaper, "G2W").await);
        let start = Instant::now();
        let tasks: Vec<_> = (0..20).map(|_| spawn_admit(&shaper, "G2W")).collect();
        let mut instants = Vec::new();
        for task in tasks {
            let (at, result) = task.await.unwrap();
            result.unwrap();
            instants.push(at - start);
        }
        instants.sort();
        let expected: Vec<_> = (1..=20).map(|n| n * 100 * MS).collect();
        assert_eq!(instants, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_sheds_at_once() {
        let shaper = Arc::new(RateShaper::new(settings(1, 1, 3, Duration::from_secs(60))));
        assert!(admitted_at_once(&shaper, "G2W").await);
        let waiters: Vec<_> = (0..3).map(|_| spawn_admit(&shaper, "G2W")).collect();
        tokio::task::yield_now().await;
        let refused = shaper.admit("G2W").await.unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(4));
        for waiter in waiters {
            assert!(waiter.await.unwrap().1.is_ok());
        }
        // The queue has emptied: a request may wait again.
        let admitted = shaper.admit("G2W").await.unwrap();
        assert_eq!(admitted.waited, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn no_queue_means_no_waiting() {
        let shaper = RateShaper::new(settings(1, 1, 0, Duration::from_secs(60)));
        assert!(admitted_at_once(&shaper, "G2W").await);
        let refused = shaper.admit("G2W").await.unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_leaves_the_queue() {
        let shaper = RateShaper::new(settings(1, 1, 1, Duration::from_secs(60)));
        assert!(admitted_at_once(&shaper, "G2W").await);
        let gave_up = tokio::time::timeout(100 * MS, shaper.admit("G2W")).await;
        assert!(gave_up.is_err());
        // Its slot is gone with it, but its place in the queue is free.
        let admitted = shaper.admit("G2W").await.unwrap();
        assert_eq!(admitted.waited, Duration::from_millis(1900));
    }

    #[tokio::test(start_paused = true)]
    async fn apis_have_independent_buckets() {
        let shaper = RateShaper::new(settings(1, 2, 0, Duration::from_secs(5)));
        assert!(admitted_at_once(&shaper, "G2W").await);
        assert!(admitted_at_once(&shaper, "G2W").await);
        assert!(shaper.admit("G2W").await.is_err());
        assert!(admitted_at_once(&shaper, "admin").await);
        assert!(admitted_at_once(&shaper, "admin").await);
        assert!(admitted_at_once(&shaper, "messaging").await);
        assert!(shaper.admit("admin").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn api_names_beyond_the_bound_share_one_bucket() {
        let shaper = RateShaper::new(settings(1, 1, 0, Duration::from_secs(5)));
        let names: Vec<String> = (0..MAX_APIS + 2).map(|n| format!("api{n}")).collect();
        for name in &names[..MAX_APIS] {
            assert!(admitted_at_once(&shaper, name).await);
        }
        assert!(admitted_at_once(&shaper, &names[MAX_APIS]).await);
        // The next new name lands in the same, now exhausted, bucket.
        assert!(shaper.admit(&names[MAX_APIS + 1]).await.is_err());
        let shaping = shaper.shaping.as_ref().unwrap();
        assert_eq!(shaping.buckets.load().len(), MAX_APIS);
        let long = "x".repeat(MAX_API_NAME + 1);
        assert!(shaper.admit(&long).await.is_err());
        // Known names keep their own buckets.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(admitted_at_once(&shaper, &names[0]).await);
    }

    #[tokio::test(start_paused = true)]
    async fn long_api_names_share_the_overflow_bucket() {
        let shaper = RateShaper::new(settings(1, 1, 0, Duration::from_secs(5)));
        let long = "x".repeat(MAX_API_NAME + 1);
        let longer = "y".repeat(10 * MAX_API_NAME);
        assert!(admitted_at_once(&shaper, &long).await);
        assert!(shaper.admit(&longer).await.is_err());
        let name = "z".repeat(MAX_API_NAME);
        assert!(admitted_at_once(&shaper, &name).await);
        let shaping = shaper.shaping.as_ref().unwrap();
        assert_eq!(shaping.buckets.load().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_with_retry_after_pauses_the_bucket() {
        let shaper = RateShaper::new(goto_default());
        assert!(admitted_at_once(&shaper, "G2W").await);
        let pause = shaper.throttled("G2W", Some(Duration::from_secs(1)));
        assert_eq!(pause, Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(
            shaper.admit("G2W").await.unwrap().waited,
            Duration::from_secs(1)
        );
        // After the pause the bucket runs at its rate, without a burst.
        assert_eq!(shaper.admit("G2W").await.unwrap().waited, 100 * MS);
        assert_eq!(Instant::now() - start, 1100 * MS);
        // Another API is not paused.
        assert!(admitted_at_once(&shaper, "admin").await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_delays_requests_already_waiting() {
        let shaper = Arc::new(RateShaper::new(settings(1, 1, 10, Duration::from_secs(5))));
        assert!(admitted_at_once(&shaper, "G2W").await);
        let start = Instant::now();
        let first = spawn_admit(&shaper, "G2W");
        let second = spawn_admit(&shaper, "G2W");
        tokio::time::sleep(500 * MS).await;
        shaper.throttled("G2W", Some(Duration::from_secs(2)));
        // Both slots (1 s and 2 s) fell in the pause; the waiters get the
        // first free ones after it, which the slots they held push by less
        // than one interval.
        let (at, result) = first.await.unwrap();
        assert_eq!(at - start, Duration::from_secs(3));
        assert_eq!(result.unwrap().waited, Duration::from_secs(3));
        let (at, result) = second.await.unwrap();
        assert_eq!(at - start, Duration::from_secs(4));
        assert!(result.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_beyond_the_longest_wait_sheds() {
        let shaper = Arc::new(RateShaper::new(goto_default()));
        assert!(admitted_at_once(&shaper, "G2W").await);
        let waiter = spawn_admit(&shaper, "admin");
        tokio::task::yield_now().await;
        shaper.throttled("G2W", Some(Duration::from_millis(7500)));
        let refused = shaper.admit("G2W").await.unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(8));
        assert!(waiter.await.unwrap().1.is_ok());

        // A waiter whose slot a pause pushes past the bound is shed when
        // its slot comes.
        let shaper = Arc::new(RateShaper::new(settings(1, 1, 10, Duration::from_secs(5))));
        assert!(admitted_at_once(&shaper, "G2W").await);
        let start = Instant::now();
        let waiter = spawn_admit(&shaper, "G2W");
        tokio::task::yield_now().await;
        shaper.throttled("G2W", Some(Duration::from_secs(10)));
        let (at, result) = waiter.await.unwrap();
        assert_eq!(at - start, Duration::from_secs(1));
        assert_eq!(result.unwrap_err().retry_after, Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_without_retry_after_backs_off_until_a_success() {
        let shaper = RateShaper::new(goto_default());
        let mut pauses = Vec::new();
        for _ in 0..7 {
            let pause = shaper.throttled("G2W", None);
            pauses.push(pause.as_secs());
            tokio::time::advance(pause).await;
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
        shaper.succeeded("G2W");
        assert_eq!(shaper.throttled("G2W", None), Duration::from_secs(1));
        // Each API backs off on its own.
        assert_eq!(shaper.throttled("admin", None), Duration::from_secs(1));
        // A shorter pause leaves the running one as it is.
        let start = Instant::now();
        let pause = shaper.throttled("admin", Some(100 * MS));
        assert_eq!(pause, Duration::from_secs(1));
        assert_eq!(
            shaper.admit("admin").await.unwrap().waited,
            Duration::from_secs(1)
        );
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
        // A success ends the backoff, not the pause running.
        assert_eq!(shaper.throttled("G2W", None), Duration::from_secs(2));
        shaper.succeeded("G2W");
        assert_eq!(shaper.throttled("G2W", None), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_capped() {
        let shaper = RateShaper::new(goto_default());
        let pause = shaper.throttled("G2W", Some(Duration::MAX));
        assert_eq!(pause, PAUSE_MAX);
        let refused = shaper.admit("G2W").await.unwrap_err();
        assert_eq!(refused.retry_after, PAUSE_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn off_admits_everything_at_once_and_keeps_nothing() {
        let shaper = RateShaper::new(settings(0, 0, 0, Duration::ZERO));
        assert!(shaper.is_off());
        assert!(!RateShaper::new(goto_default()).is_off());
        let start = Instant::now();
        for _ in 0..10_000 {
            assert!(admitted_at_once(&shaper, "G2W").await);
        }
        assert_eq!(
            shaper.throttled("G2W", Some(Duration::from_secs(5))),
            Duration::ZERO
        );
        assert_eq!(shaper.throttled("G2W", None), Duration::ZERO);
        shaper.succeeded("G2W");
        assert!(admitted_at_once(&shaper, "G2W").await);
        assert_eq!(Instant::now(), start);
    }

    #[test]
    fn threads_racing_for_one_bucket_never_pass_more_than_it_allows() {
        let shaper = Arc::new(RateShaper::new(settings(10, 10, 0, Duration::from_secs(5))));
        let start = std::time::Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let shaper = shaper.clone();
                std::thread::spawn(move || {
                    (0..5_000)
                        .filter(|_| ready_at_once(shaper.admit("G2W")).is_ok())
                        .count()
                })
            })
            .collect();
        let passed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let allowed = 10 + (start.elapsed().as_secs_f64() * 10.0).ceil() as usize;
        assert!(
            (10..=allowed).contains(&passed),
            "{passed} passed, {allowed} allowed"
        );
    }

    #[test]
    fn debug_shows_settings_and_the_number_of_apis() {
        let shaper = RateShaper::new(goto_default());
        let _ = ready_at_once(shaper.admit("G2W"));
        let text = format!("{shaper:?}");
        assert!(text.contains("per_second: 10"), "{text}");
        assert!(text.contains("apis: 1"), "{text}");
    }

    /// Polls a future that must be ready at once.
    fn ready_at_once<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(output) => output,
            std::task::Poll::Pending => panic!("the future had to wait"),
        }
    }
}
