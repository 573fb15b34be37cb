//! "The host's first offers are bound": what `cusedev run` waits for before it starts its
//! command, so the command's first open finds its device.
//!
//! A real guest has the same moment: `vmbus_connect()` ends with the host's
//! CHANNELMSG_ALLOFFERS_DELIVERED, and the drivers probe each offer as it comes
//! (drivers/hv/channel_mgmt.c, Linux 6.1). Here the offers are bound on threads of their own,
//! so the moment is "ALLOFFERS_DELIVERED seen, and every bind started before it has ended"
//! (bound or refused: a refused offer is logged, and waiting longer would not change it).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    all_delivered: bool,
    binds_running: usize,
    /// Set once, the first time the moment comes; later sessions (reconnects) do not undo it.
    reached: bool,
}

/// Counts the binds of the first round of offers; see the module docs.
#[derive(Default)]
pub struct FirstOffers {
    state: Mutex<State>,
    changed: Condvar,
}

impl FirstOffers {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.lock();
        change(&mut state);
        if state.all_delivered && state.binds_running == 0 {
            state.reached = true;
        }
        self.changed.notify_all();
    }

    /// An offer's bind starts.
    pub fn bind_started(&self) {
        self.update(|state| state.binds_running += 1);
    }

    /// An offer's bind has ended, whatever its outcome.
    pub fn bind_ended(&self) {
        self.update(|state| state.binds_running = state.binds_running.saturating_sub(1));
    }

    /// The host said ALLOFFERS_DELIVERED.
    pub fn all_delivered(&self) {
        self.update(|state| state.all_delivered = true);
    }

    /// Waits until the first offers are bound; false if `timeout` passed first.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.reached {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reached_only_when_delivered_and_no_bind_runs() {
        let first = FirstOffers::default();
        first.bind_started();
        first.all_delivered();
        assert!(!first.wait(Duration::ZERO), "a bind still runs");
        first.bind_ended();
        assert!(first.wait(Duration::ZERO));
        // A later round (a reconnect) does not take it back.
        first.bind_started();
        assert!(first.wait(Duration::ZERO));
    }

    #[test]
    fn binds_ending_before_the_host_is_done_are_not_enough() {
        let first = FirstOffers::default();
        first.bind_started();
        first.bind_ended();
        assert!(!first.wait(Duration::from_millis(1)));
    }
}
