//! Checkpoint on request: a [`StopSignal`] another thread (the rank's SIGTERM handler) raises,
//! after which the run stops at the next step boundary every rank agrees on, writes a
//! checkpoint, and ends early ([`crate::TrainOutcome::stopped_at`]).
//!
//! Ranks see the signal at different moments, so they cannot each stop when they see it: each
//! step carries every rank's flag with its gradients (a slot after them in the data-parallel
//! loop's flat buffer, summed with them, so agreeing costs nothing), the driver asks the run
//! whether some rank asked ([`crate::run::driver::Run::stop_agreed`]), and every rank stops after
//! the same step, with the same parameters, which is what the checkpoint holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A request to stop at the next step boundary and checkpoint, shared with whoever raises it.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop (safe to call from any thread, any number of times).
    pub fn raise(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the stop was asked for.
    pub fn raised(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl PartialEq for StopSignal {
    /// Two signals are equal when they are the same signal.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_signal_is_seen_through_every_clone() {
        let signal = StopSignal::new();
        let seen_by_the_run = signal.clone();
        assert!(!seen_by_the_run.raised());
        std::thread::spawn(move || signal.raise()).join().unwrap();
        assert!(seen_by_the_run.raised());
        assert_ne!(seen_by_the_run, StopSignal::new());
    }
}
