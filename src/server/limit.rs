//! The cap on client connections served at once. A connection beyond it is
//! closed as soon as it is accepted (each served one may hold a request
//! body in memory), counted, and logged once per burst.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// The quietest a burst of refusals is: one line per this long at most.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A connection's place under the cap. Clones share it: what outlives the
/// connection on its behalf (a tunnel, an upgraded stream) keeps it taken.
#[derive(Clone, Debug)]
pub struct Admission {
    /// Released when the last clone is dropped.
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl Admission {
    /// A place under no cap (a stream the listener did not accept).
    pub fn unlimited() -> Self {
        Self { _permit: None }
    }
}

/// Admits connections up to a cap, for one listener's accept loop.
#[derive(Debug)]
pub struct ConnectionLimit {
    listener: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl ConnectionLimit {
    /// A cap of `max` connections on `listener`, refusals counted in `metrics`.
    pub fn new(listener: &'static str, max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            listener,
            max,
            permits: Arc::new(Semaphore::new(max)),
            metrics,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// Room for one more connection, held until every clone of the
    /// admission is dropped; or `None`, and the refusal is counted and
    /// perhaps logged.
    pub fn admit(&mut self) -> Option<Admission> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(Admission {
                _permit: Some(Arc::new(permit)),
            });
        }
        self.metrics.count_connection_refused(self.listener);
        self.unlogged += 1;
        let quiet = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL);
        if quiet {
            tracing::warn!(
                listener = self.listener,
                max_connections = self.max,
                refused = self.unlogged,
                "closing new client connections: {} are open, the most --max-connections allows; \
                 raise it, or find the client that holds so many",
                self.max
            );
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        }
        None
    }
}
