//! Crash injection for the model test (`agent/tests/it/model.rs`): with the
//! `failpoints` feature, a test arms a countdown on its own thread and the
//! agent "crashes" (panics with [`Crash`]) at the Nth durable write, slot
//! write or command it reaches there. Without the feature [`hit`] is empty.

/// The panic payload of an injected crash: where it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash(pub &'static str);

#[cfg(feature = "failpoints")]
mod imp {
    use super::Crash;
    use std::cell::Cell;

    thread_local! {
        static COUNTDOWN: Cell<Option<u32>> = const { Cell::new(None) };
        static HITS: Cell<u64> = const { Cell::new(0) };
    }

    /// Crash at the `n`th point reached from now on this thread (0: the next).
    pub fn arm(n: u32) {
        COUNTDOWN.set(Some(n));
    }

    /// No crash on this thread.
    pub fn disarm() {
        COUNTDOWN.set(None);
    }

    /// How many points this thread has reached.
    pub fn hits() -> u64 {
        HITS.get()
    }

    /// A point where a crash may happen.
    pub fn hit(site: &'static str) {
        HITS.set(HITS.get() + 1);
        match COUNTDOWN.get() {
            Some(0) => {
                COUNTDOWN.set(None);
                std::panic::panic_any(Crash(site));
            }
            Some(n) => COUNTDOWN.set(Some(n - 1)),
            None => {}
        }
    }
}

#[cfg(feature = "failpoints")]
pub use imp::{arm, disarm, hit, hits};

/// A point where a crash may happen (nothing without `failpoints`).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_site: &'static str) {}
