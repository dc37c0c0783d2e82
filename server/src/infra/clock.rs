//! The server's clock for the fleet policy (rollout waves, maintenance
//! windows, reboot leases): the system's time, which tests stop at a chosen
//! instant and move forward through `AppState` instead of sleeping through
//! hours. Nothing outside the process can set it.

use std::sync::atomic::{AtomicI64, Ordering};
use time::{Duration, OffsetDateTime};

/// Not stopped: the system's time.
const RUNNING: i64 = i64::MIN;

/// The system's clock, unless a test stopped it at an instant.
#[derive(Debug)]
pub struct Clock {
    /// The instant it stands at, in nanoseconds since the epoch, or [`RUNNING`].
    stopped_at_ns: AtomicI64,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            stopped_at_ns: AtomicI64::new(RUNNING),
        }
    }
}

impl Clock {
    /// Now, by this clock.
    pub fn now(&self) -> OffsetDateTime {
        match self.stopped_at_ns.load(Ordering::Relaxed) {
            RUNNING => OffsetDateTime::now_utc(),
            ns => OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
                .unwrap_or_else(|_| OffsetDateTime::now_utc()),
        }
    }

    /// Stops the clock at `at` (between 1678 and 2261).
    pub fn set(&self, at: OffsetDateTime) {
        let ns = i64::try_from(at.unix_timestamp_nanos()).expect("an instant before 2262");
        self.stopped_at_ns.store(ns, Ordering::Relaxed);
    }

    /// Moves the clock forward by `by` (stopping it where it was, if it ran).
    pub fn advance(&self, by: Duration) {
        self.set(self.now() + by);
    }
}
