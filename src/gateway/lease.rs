//! The leases the gateway grants its agents, and the fence they make. An agent may
//! start the attempts it holds without asking only while its lease holds (see
//! `agent/lease.rs`); the gateway grants the lease in its answers to the agent's
//! SIGNALs and keeps, per agent, when the lease ends at the latest and its epoch.
//! It withdraws an agent's waiting attempts only once that time has passed, and
//! then moves the agent to a new epoch, which every later ATASK and grant carries:
//! attempts the agent accepted before must ask, and are told they were withdrawn.
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
