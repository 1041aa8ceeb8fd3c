//! The leases the gateway grants its agents, and the fence they make. An agent may
//! start the attempts it holds without asking only while its lease holds (see
//! `agent/lease.rs`); the gateway grants the lease in its answers to the agent's
//! SIGNALs and keeps, per agent, when the lease ends at the latest and its epoch.
//! It withdraws an agent's waiting attempts only once that time has passed, and
//! then moves the agent to a new epoch, which every later ATASK and grant carries:
//! attempts the agent accepted before must ask, and are told they were withdrawn.
//! An agent that says it does not hold an attempt is fenced the other way round:
//! new epoch at once, the attempt withdrawn once the old lease has ended (it may
//! still be on its way to the agent, which would start it unasked until then).
//!
//! Pure rules: the time is passed in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::arpcp::LeaseGrant;

/// Added to every lease's end on the gateway's side: covers clock-rate differences
/// between the hosts over one lease.
pub const LEASE_MARGIN: Duration = Duration::from_millis(50);
/// Epochs stay below 2^53 so that every JSON reader keeps them exact.
const EPOCH_MASK: u64 = (1 << 53) - 1;

#[derive(Debug)]
struct AgentLease {
    epoch: u64,
    /// No lease granted before now runs past this.
    ends: Instant,
}

/// Every agent's lease.
#[derive(Debug)]
pub struct Leases {
    duration: Duration,
    /// Leases granted by an earlier process of the gateway end by `started + duration`.
    started: Instant,
    agents: Mutex<HashMap<String, AgentLease>>,
}

fn fresh_epoch() -> u64 {
    let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
    (hi ^ lo) & EPOCH_MASK
}

impl Leases {
    pub fn new(duration: Duration, now: Instant) -> Leases {
        Leases {
            duration,
            started: now,
            agents: Mutex::new(HashMap::new()),
        }
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentLease>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'a>(
        &self,
        agents: &'a mut HashMap<String, AgentLease>,
        agent_id: &str,
    ) -> &'a mut AgentLease {
        let restart_end = self.started + self.duration + LEASE_MARGIN;
        agents
            .entry(agent_id.to_string())
            .or_insert_with(|| AgentLease {
                epoch: fresh_epoch(),
                ends: restart_end,
            })
    }

    /// The epoch an ATASK to `agent_id` carries.
    pub fn epoch(&self, agent_id: &str) -> u64 {
        self.entry(&mut self.agents(), agent_id).epoch
    }

    /// Grants `agent_id` a lease in an answer sent at `now`.
    pub fn grant(&self, agent_id: &str, now: Instant) -> LeaseGrant {
        let mut agents = self.agents();
        let lease = self.entry(&mut agents, agent_id);
        lease.ends = lease.ends.max(now + self.duration + LEASE_MARGIN);
        LeaseGrant {
            lease_ms: self.duration.as_millis() as u64,
            lease_epoch: lease.epoch,
        }
    }

    /// Withdraws the attempts `agent_id` holds and has not started, if its lease
    /// has ended by `now`: moves it to a new epoch and returns `Ok`. Otherwise
    /// returns when the lease ends; nothing changes.
    pub fn withdraw(&self, agent_id: &str, now: Instant) -> Result<(), Instant> {
        let mut agents = self.agents();
        let lease = self.entry(&mut agents, agent_id);
        if now < lease.ends {
            return Err(lease.ends);
        }
        lease.epoch = fresh_epoch();
        Ok(())
    }

    /// Fences off the attempts `agent_id` accepted so far, at once: moves it to a
    /// new epoch, which every later ATASK and grant carries, so an attempt accepted
    /// before must ask before it starts once the lease it came with has ended.
    /// Returns when that lease ends: until then the agent may still start such an
    /// attempt without asking, so none of them may be placed elsewhere before.
    pub fn fence(&self, agent_id: &str) -> Instant {
        let mut agents = self.agents();
        let lease = self.entry(&mut agents, agent_id);
        lease.epoch = fresh_epoch();
        lease.ends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn withdrawal_waits_for_the_last_grant_to_end_and_changes_the_epoch() {
        let t0 = Instant::now();
        let l = Leases::new(2 * SECOND, t0);
        let first = l.epoch("a");
        assert_eq!(l.epoch("a"), first);
        let g = l.grant("a", t0 + 3 * SECOND);
        assert_eq!(g.lease_epoch, first);
        assert_eq!(g.lease_ms, 2000);
        let ends = t0 + 5 * SECOND + LEASE_MARGIN;
        assert_eq!(l.withdraw("a", t0 + 4 * SECOND), Err(ends));
        assert_eq!(l.epoch("a"), first, "nothing changes before the end");
        assert_eq!(l.withdraw("a", ends), Ok(()));
        assert_ne!(l.epoch("a"), first);
        assert!(l.epoch("a") <= EPOCH_MASK);
    }

    #[test]
    fn a_fence_changes_the_epoch_at_once_and_says_when_the_old_lease_ends() {
        let t0 = Instant::now();
        let l = Leases::new(2 * SECOND, t0);
        let first = l.epoch("a");
        l.grant("a", t0 + 3 * SECOND);
        let ends = t0 + 5 * SECOND + LEASE_MARGIN;
        assert_eq!(l.fence("a"), ends);
        let second = l.epoch("a");
        assert_ne!(
            second, first,
            "the new epoch holds before the old lease ends"
        );
        assert!(second <= EPOCH_MASK);
        // Grants from now on carry the new epoch; a second fence moves on again
        // and still reports the latest end of any lease granted.
        let g = l.grant("a", t0 + 4 * SECOND);
        assert_eq!(g.lease_epoch, second);
        assert_eq!(l.fence("a"), t0 + 6 * SECOND + LEASE_MARGIN);
        assert_ne!(l.epoch("a"), second);
    }

    #[test]
    fn a_fence_right_after_a_restart_waits_for_the_leases_of_the_earlier_process() {
        let t0 = Instant::now();
        let l = Leases::new(2 * SECOND, t0);
        assert_eq!(l.fence("never-granted"), t0 + 2 * SECOND + LEASE_MARGIN);
    }

    #[test]
    fn leases_of_an_earlier_process_are_waited_for() {
        let t0 = Instant::now();
        let l = Leases::new(2 * SECOND, t0);
        assert_eq!(
            l.withdraw("never-heard-of", t0 + SECOND),
            Err(t0 + 2 * SECOND + LEASE_MARGIN)
        );
        assert_eq!(l.withdraw("never-heard-of", t0 + 3 * SECOND), Ok(()));
    }
}
