//! The controller's lease, as the agent holds it. The controller grants it in its
//! answers to the agent's own SIGNALs (`lease_ms`, `lease_epoch`), so the agent
//! counts it from the moment it *sent* the SIGNAL: however long the answer took,
//! the agent's lease ends no later than the controller's view of it.
//!
//! While its lease holds, an agent starts the attempts it holds without asking.
//! The controller withdraws an agent's waiting attempts (places them elsewhere)
//! only after that agent's lease has run out, and then changes the agent's epoch:
//! an attempt accepted under another epoch than the current one, or at a time the
//! lease did not hold (a pause, a partition, a restart, an ATASK read late from a
//! socket buffer), is started only once the controller confirms it (SIGNAL
//! `accepted` with `start`), so an attempt it withdrew is never started.
//!
//! Pure rules: the time is passed in.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest lease an answer may grant: a controller asking for more is taken
/// to ask for this.
pub const MAX_LEASE: Duration = Duration::from_secs(300);

/// Which lease a task was accepted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptedUnder {
    /// Its controller does not fence attempts (no lease was ever offered): nobody
    /// withdraws them.
    Unfenced,
    /// The lease of this epoch held when the task was accepted.
    Epoch(u64),
    /// It must ask before it starts: accepted while the lease did not hold, under
    /// another epoch, or stored by an earlier process of this agent.
    Ask,
}

/// The lease as a value: what the controller's answers granted so far. The task
/// core (`core.rs`) decides with a copy of it; [`Lease`] shares it between the
/// SIGNAL sender, which renews it, and the driver, which reads it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    /// A controller said it fences attempts (its echoes carry `lease_ms`).
    fenced: bool,
    epoch: Option<u64>,
    valid_until: Option<Instant>,
    /// When the SIGNAL that set `epoch` was sent: older answers do not override it.
    epoch_sent_at: Option<Instant>,
}

impl LeaseState {
    /// A controller's echo said it fences attempts with leases.
    pub fn fence(&mut self) {
        self.fenced = true;
    }

    /// An answer to a SIGNAL sent at `sent_at` granted `duration` under `epoch`.
    pub fn renew(&mut self, sent_at: Instant, duration: Duration, epoch: u64) {
        self.fenced = true;
        let until = sent_at + duration.min(MAX_LEASE);
        if self.epoch == Some(epoch) {
            self.valid_until = self.valid_until.max(Some(until));
            return;
        }
        // Another epoch: the controller withdrew attempts (or restarted). An answer
        // to a SIGNAL sent before the one that set the current epoch is stale.
        if self.epoch_sent_at.is_some_and(|at| sent_at < at) {
            return;
        }
        self.epoch = Some(epoch);
        self.epoch_sent_at = Some(sent_at);
        self.valid_until = Some(until);
    }

    fn holds(&self, now: Instant) -> Option<u64> {
        match (self.epoch, self.valid_until) {
            (Some(e), Some(until)) if now < until => Some(e),
            _ => None,
        }
    }

    /// What a task accepted at `now` is accepted under. `placed_in` is the epoch
    /// the controller placed it in (ATASK `lease_epoch`), if it said.
    pub fn accepting(&self, placed_in: Option<u64>, now: Instant) -> AcceptedUnder {
        if !self.fenced && placed_in.is_none() {
            return AcceptedUnder::Unfenced;
        }
        match self.holds(now) {
            Some(e) if placed_in.is_none_or(|p| p == e) => AcceptedUnder::Epoch(e),
            _ => AcceptedUnder::Ask,
        }
    }

    /// Whether a task accepted under `under` may start at `now` without asking its
    /// controller: only while the lease of the epoch it was accepted in holds.
    pub fn may_start(&self, under: AcceptedUnder, now: Instant) -> bool {
        match under {
            AcceptedUnder::Unfenced => !self.fenced,
            AcceptedUnder::Epoch(e) => self.holds(now) == Some(e),
            AcceptedUnder::Ask => false,
        }
    }
}

/// The lease shared by the threads that renew and read it.
#[derive(Debug, Default)]
pub struct Lease {
    state: Mutex<LeaseState>,
}

impl Lease {
    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A controller's echo said it fences attempts with leases.
    pub fn fenced(&self) {
        self.state().fence();
    }

    /// An answer to a SIGNAL sent at `sent_at` granted `duration` under `epoch`.
    pub fn renew(&self, sent_at: Instant, duration: Duration, epoch: u64) {
        self.state().renew(sent_at, duration, epoch);
    }

    /// The lease as it is now.
    pub fn snapshot(&self) -> LeaseState {
        *self.state()
    }

    #[cfg(test)]
    fn accepting(&self, placed_in: Option<u64>, now: Instant) -> AcceptedUnder {
        self.state().accepting(placed_in, now)
    }

    #[cfg(test)]
    fn may_start(&self, under: AcceptedUnder, now: Instant) -> bool {
        self.state().may_start(under, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn an_unfenced_agent_starts_freely_until_a_controller_fences_it() {
        let l = Lease::default();
        let t0 = Instant::now();
        let under = l.accepting(None, t0);
        assert_eq!(under, AcceptedUnder::Unfenced);
        assert!(l.may_start(under, t0 + SECOND));
        l.fenced();
        // Accepted before, started after: the controller may have withdrawn it.
        assert!(!l.may_start(under, t0 + SECOND));
        assert_eq!(l.accepting(None, t0 + SECOND), AcceptedUnder::Ask);
    }

    #[test]
    fn a_task_starts_unasked_only_while_the_lease_of_its_epoch_holds() {
        let l = Lease::default();
        let t0 = Instant::now();
        // No lease yet: the first placement asks.
        assert_eq!(l.accepting(Some(7), t0), AcceptedUnder::Ask);
        l.renew(t0, 2 * SECOND, 7);
        let under = l.accepting(Some(7), t0 + SECOND);
        assert_eq!(under, AcceptedUnder::Epoch(7));
        l.renew(t0 + SECOND, 2 * SECOND, 7);
        assert!(l.may_start(under, t0 + 2 * SECOND));
        // Ran out (a pause): no start until renewed, and a renewal under a new
        // epoch (the controller withdrew attempts meanwhile) does not revive it.
        assert!(!l.may_start(under, t0 + 4 * SECOND));
        l.renew(t0 + 5 * SECOND, 2 * SECOND, 8);
        assert!(!l.may_start(under, t0 + 5 * SECOND));
        // A placement of the old epoch, read late, asks.
        assert_eq!(l.accepting(Some(7), t0 + 5 * SECOND), AcceptedUnder::Ask);
        let fresh = l.accepting(Some(8), t0 + 5 * SECOND);
        assert_eq!(fresh, AcceptedUnder::Epoch(8));
        assert!(l.may_start(fresh, t0 + 6 * SECOND));
    }

    #[test]
    fn the_same_epoch_renewed_after_a_gap_keeps_its_tasks() {
        // The controller withdrew nothing (same epoch): waiting tasks keep their place.
        let l = Lease::default();
        let t0 = Instant::now();
        l.renew(t0, SECOND, 1);
        let under = l.accepting(Some(1), t0);
        assert!(!l.may_start(under, t0 + 3 * SECOND));
        l.renew(t0 + 3 * SECOND, SECOND, 1);
        assert!(l.may_start(under, t0 + 3 * SECOND));
    }

    #[test]
    fn a_late_answer_of_an_older_epoch_is_ignored() {
        let l = Lease::default();
        let t0 = Instant::now();
        l.renew(t0 + SECOND, SECOND, 2);
        l.renew(t0, 10 * SECOND, 1);
        assert_eq!(l.accepting(Some(2), t0 + SECOND), AcceptedUnder::Epoch(2));
        assert_eq!(l.accepting(Some(1), t0 + SECOND), AcceptedUnder::Ask);
    }

    #[test]
    fn the_lease_counts_from_the_send_and_is_capped() {
        let l = Lease::default();
        let t0 = Instant::now();
        l.renew(t0, SECOND, 1);
        // However late the answer came, the lease ends a second after the send.
        assert_eq!(l.accepting(Some(1), t0 + SECOND), AcceptedUnder::Ask);
        l.renew(t0, Duration::from_secs(1_000_000), 1);
        assert_eq!(l.accepting(Some(1), t0 + MAX_LEASE), AcceptedUnder::Ask);
    }
}
