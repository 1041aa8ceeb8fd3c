//! Cluster membership: which agents exist, whether they answer, and what they offer.
//! The echo loop probes every known agent with ARPCP ID each interval (plus the
//! configured addresses and announced agents that are not agents yet), and beside
//! it passes over the scanned ranges; an answer registers or refreshes the agent,
//! and answers and misses are reported to the controller (`core`), whose rules
//! decide the agent's state (`set_state` brings the record in line). Identity is MAC + port, so agents
//! sharing a host stay distinct; with TLS it is the name in the certificate the
//! agent answered with, so what an agent reports cannot make it another.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::core::Event;
use super::model::{now_ms, AgentRecord, AgentState};
use super::scheduler::{agent_number, ControllerHandle};
use super::store::{GatewayStore, StoreError};
use super::GatewayError;
use crate::arpcp::{ArpcpClient, IdData, ProcedureKind, Request};
use crate::opal::Schema;
use crate::tls::PeerIdentity;

/// The shortest time an echo probe waits for its answer.
pub const PROBE_TIMEOUT_FLOOR: Duration = Duration::from_secs(1);
/// Probes in flight at once in an echo round, and in a scan pass.
pub const MAX_CONCURRENT_PROBES: usize = 64;
/// Largest scan range accepted (a /16 of IPv4).
pub const MAX_SCAN_ADDRESSES: u64 = 65_536;
/// An announced address that fails this many probes in a row is forgotten (it
/// announces itself again when it is an agent that restarted).
pub const ANNOUNCED_PROBES: u32 = 10;
/// Announced addresses waiting to be registered, at most.
pub const MAX_ANNOUNCED: usize = 1024;

/// Procedures kept of one agent's catalog, at most.
pub const MAX_CATALOG_ENTRIES: usize = 4096;
/// Identities (MAC + port, or certificate) whose agent id is remembered in
/// memory, at most: the agents the rules keep (`core::MAX_AGENTS`). Beyond, an
/// echo answer looks its id up in the store, as every one did before.
pub const MAX_REMEMBERED_IDENTITIES: usize = super::core::MAX_AGENTS;

/// What one agent said its procedures are.
pub struct Catalog {
    digest: String,
    procedures: BTreeMap<String, (ProcedureKind, Option<Arc<Schema>>)>,
}

/// A procedure as the cluster offers it.
pub struct Described {
    /// `None` when no offering agent's catalog is known yet.
    pub kind: Option<ProcedureKind>,
    pub schema: Option<Arc<Schema>>,
    pub agent_ids: Vec<String>,
}

pub struct MembershipConfig {
    pub echo_interval: Duration,
    /// Addresses given with --agent.
    pub seeds: Vec<String>,
    pub scan: Vec<IpNet>,
    pub scan_port: u16,
    /// Our ARPCP address as agents should use it (sent in ID's `controller`).
    pub advertise: String,
    /// The lease granted to agents (sent in ID's `lease_ms`: we fence attempts).
    pub lease: Duration,
    /// Probes agents over mutual TLS when set.
    pub tls: Option<crate::arpcp::tls::ClientTls>,
}

pub struct Membership {
    agents: RwLock<HashMap<String, Arc<AgentRecord>>>,
    /// Held while an agent's record is written to the store (see `persist`).
    persisting: Mutex<()>,
    /// Addresses to probe that are not registered agents (yet): `None` for the
    /// configured ones (probed until they answer), the failed probes in a row for
    /// announced ones.
    candidates: Mutex<BTreeMap<String, Option<u32>>>,
    /// Each agent's catalog (procedure kinds, Opal schemas), fetched when its
    /// digest changes.
    catalogs: Mutex<HashMap<String, Arc<Catalog>>>,
    /// Identity → agent id, as the store assigned them (ids are never reused, so
    /// a remembered one stays right): an echo answer needs no store lookup.
    identities: Mutex<HashMap<String, String>>,
    /// Agents whose last echo answer the rules heard of, with no miss reported
    /// since: another answer that changes nothing the rules keep is not sent to
    /// them (at 1,000 agents, 1,000 events a second through the driver).
    in_step: Mutex<BTreeSet<String>>,
    /// Why each agent that missed its last echo missed it (a revoked certificate, a
    /// refused connection), for the warnings of its state changes; cleared when it
    /// answers. At most one entry a known agent.
    miss_reasons: Mutex<HashMap<String, String>>,
    /// Configured addresses (`--agent`) whose failed probe was warned of, once
    /// until they answer; each probe after is at debug level.
    unanswered_warned: Mutex<BTreeSet<String>>,
    store: GatewayStore,
    client: ArpcpClient,
    config: MembershipConfig,
    controller: ControllerHandle,
}

impl Membership {
    pub fn new(
        store: GatewayStore,
        config: MembershipConfig,
        controller: ControllerHandle,
    ) -> Result<Arc<Self>, StoreError> {
        // Not shorter than PROBE_TIMEOUT_FLOOR however fast the rounds: one slow
        // answer (a busy host, a large transfer on the agent) is a miss, and a miss
        // takes the agent out of placement until it answers again.
        let timeout = config
            .echo_interval
            .clamp(PROBE_TIMEOUT_FLOOR, Duration::from_secs(3));
        let agents = store
            .agents()?
            .into_iter()
            .map(|a| (a.agent_id.clone(), Arc::new(a)))
            .collect();
        let candidates = config.seeds.iter().map(|s| (s.clone(), None)).collect();
        Ok(Arc::new(Membership {
            agents: RwLock::new(agents),
            persisting: Mutex::new(()),
            candidates: Mutex::new(candidates),
            catalogs: Mutex::new(HashMap::new()),
            identities: Mutex::new(HashMap::new()),
            in_step: Mutex::new(BTreeSet::new()),
            miss_reasons: Mutex::new(HashMap::new()),
            unanswered_warned: Mutex::new(BTreeSet::new()),
            store,
            client: ArpcpClient::new(timeout, timeout).with_tls(config.tls.clone()),
            config,
            controller,
        }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<AgentRecord>>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<AgentRecord>>> {
        self.agents.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<Arc<AgentRecord>> {
        let mut v: Vec<_> = self.read().values().cloned().collect();
        v.sort_by_key(|a| agent_sort_key(&a.agent_id));
        v
    }

    /// How many known agents are in each state, every state named (for metrics).
    pub fn count_by_state(&self) -> [(&'static str, i64); 3] {
        let mut counts = [("alive", 0), ("suspect", 0), ("gone", 0)];
        for a in self.read().values() {
            let i = match a.state {
                AgentState::Alive => 0,
                AgentState::Suspect => 1,
                AgentState::Gone => 2,
            };
            counts[i].1 += 1;
        }
        counts
    }

    pub fn get(&self, agent_id: &str) -> Option<Arc<AgentRecord>> {
        self.read().get(agent_id).cloned()
    }

    /// Procedure name → agents that can take tasks and offer it.
    pub fn procedures(&self) -> Vec<(String, Option<ProcedureKind>, Vec<String>)> {
        let mut by_name: BTreeMap<String, Vec<String>> = Default::default();
        for a in self.list().into_iter().filter(|a| a.can_take_tasks()) {
            for p in &a.procedures {
                by_name
                    .entry(p.clone())
                    .or_default()
                    .push(a.agent_id.clone());
            }
        }
        let catalogs = self.catalogs();
        by_name
            .into_iter()
            .map(|(name, agents)| {
                let kind = agents
                    .iter()
                    .find_map(|a| Some(catalogs.get(a)?.procedures.get(&name)?.0));
                (name, kind, agents)
            })
            .collect()
    }

    /// Brings an agent's record in line with the state the rules gave it.
    pub fn set_state(&self, agent_id: &str, state: AgentState, misses: u32) {
        let mut agents = self.write();
        let Some(a) = agents.get_mut(agent_id).map(Arc::make_mut) else {
            return;
        };
        let before = a.state;
        a.state = state;
        a.misses = misses;
        drop(agents);
        if let Err(e) = self.persist(agent_id) {
            warn!(agent_id, "cannot store agent: {e}");
        }
        let reason = lock(&self.miss_reasons)
            .get(agent_id)
            .cloned()
            .unwrap_or_default();
        match state {
            AgentState::Gone if before != AgentState::Gone => {
                warn!(
                    agent_id,
                    %reason,
                    "agent missed {misses} echoes: it left the cluster"
                )
            }
            AgentState::Suspect if misses == 0 => info!(
                agent_id,
                "agent unreachable or not heard from since the start: no new tasks until it answers an echo"
            ),
            AgentState::Suspect => warn!(agent_id, misses, %reason, "agent missed an echo"),
            AgentState::Alive | AgentState::Gone => {}
        }
    }

    /// Stores an agent's record as it is in memory now. Writers take turns, so the
    /// last write is of the latest record; readers of the records never wait for
    /// the store.
    fn persist(&self, agent_id: &str) -> Result<(), StoreError> {
        let _turn = self.persisting.lock().unwrap_or_else(|p| p.into_inner());
        match self.get(agent_id) {
            Some(rec) => self.store.put_agent(&rec),
            None => Ok(()),
        }
    }

    /// Whether the agents describe `procedure` as an Opal model (its result is a
    /// table). Asked when a result arrives: a call submitted before the gateway
    /// had the agents' catalog is recognised then.
    pub fn is_opal(&self, procedure: &str) -> bool {
        self.kind_of(procedure)
            .is_some_and(|(kind, _)| kind == ProcedureKind::Opal)
    }

    /// Changes the blacklist; the controller hears of it before any Submit that
    /// comes after this returns.
    pub async fn set_blacklisted(
        &self,
        agent_id: &str,
        on: bool,
    ) -> Result<AgentRecord, GatewayError> {
        let record = {
            let mut agents = self.write();
            let a = Arc::make_mut(
                agents
                    .get_mut(agent_id)
                    .ok_or_else(|| GatewayError::AgentNotFound(agent_id.to_string()))?,
            );
            a.blacklisted = on;
            a.clone()
        };
        self.persist(agent_id)?;
        info!(agent_id, blacklisted = on, "blacklist changed");
        if let Some(agent) = agent_number(agent_id) {
            self.controller.tell(Event::Blacklist { agent, on }).await;
        }
        Ok(record)
    }

    fn candidates(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<u32>>> {
        self.candidates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An agent announced itself: probe it now, and keep probing it until it
    /// answers or has failed `ANNOUNCED_PROBES` probes in a row.
    pub async fn announced(&self, addr: String) {
        {
            let mut candidates = self.candidates();
            let announced = candidates.values().filter(|v| v.is_some()).count();
            if !candidates.contains_key(&addr) {
                if announced >= MAX_ANNOUNCED {
                    warn!(%addr, "too many announced addresses wait for registration; not keeping this one");
                } else {
                    candidates.insert(addr.clone(), Some(0));
                }
            }
        }
        self.probe(addr, None).await;
    }

    /// An announced address failed a probe; forgets it after too many.
    fn announced_probe_failed(&self, addr: &str) {
        let mut candidates = self.candidates();
        if let Some(Some(failures)) = candidates.get_mut(addr) {
            *failures += 1;
            if *failures >= ANNOUNCED_PROBES {
                candidates.remove(addr);
                info!(%addr, "announced address never answered like an agent; no longer probed");
            }
        }
    }

    /// Probes `addr`; `known` is the agent we believe lives there. Returns whether
    /// it answered.
    async fn probe(&self, addr: String, known: Option<String>) -> bool {
        let req = Request::Id {
            agent_id: known.clone(),
            controller: Some(self.config.advertise.clone()),
            port: None,
            lease_ms: Some(self.config.lease.as_millis() as u64),
            describe: false,
        };
        let answer = match self.client.call_identified(&addr, &req).await {
            Ok(r) if r.response.is_ok() => serde_json::from_value::<IdData>(r.response.data)
                .map(|id| (id, r.peer))
                .map_err(|e| e.to_string()),
            Ok(r) => Err(format!(
                "answered {}: {}",
                r.response.code, r.response.description
            )),
            Err(e) => Err(e.to_string()),
        };
        match answer {
            Ok((id, peer)) => {
                // Over TLS, another certificate answering at a known agent's address
                // is not that agent: it is registered as itself, and the agent we
                // knew there missed its echo.
                let answering = peer.as_ref().map(|p| p.name.clone());
                if let (Some(_), Some(agent_id)) = (&self.config.tls, &known) {
                    let expected = self.get(agent_id).and_then(|a| a.certificate.clone());
                    if expected != answering {
                        let why = format!(
                            "{addr} answered with the certificate of {answering:?}, not {expected:?}"
                        );
                        self.missed(agent_id, &why).await;
                    }
                }
                if let Err(e) = self.register(&addr, id, peer).await {
                    warn!(%addr, "cannot register agent: {e}");
                }
                true
            }
            Err(e) => {
                debug!(%addr, "no echo: {e}");
                if known.is_none()
                    && self.config.seeds.contains(&addr)
                    && lock(&self.unanswered_warned).insert(addr.clone())
                {
                    warn!(%addr, "configured agent does not answer: {e} (said once until it answers; each probe is logged at debug level)");
                }
                self.client.forget(&addr);
                match known {
                    Some(agent_id) => self.missed(&agent_id, &e).await,
                    None => self.announced_probe_failed(&addr),
                }
                false
            }
        }
    }

    async fn register(
        &self,
        addr: &str,
        id: IdData,
        peer: Option<PeerIdentity>,
    ) -> Result<(), StoreError> {
        let catalog_digest = id.catalog_digest.clone();
        let certificate = match (&self.config.tls, peer) {
            (None, _) => None,
            (Some(_), Some(peer)) => Some(peer.name),
            // Every TLS connection has a verified peer; none means a bug, and an
            // agent must not be registered by what it reports alone.
            (Some(_), None) => {
                warn!(%addr, "an ID answer over TLS came without a peer certificate; not registered");
                return Ok(());
            }
        };
        // MAC and the port this gateway reached the agent at, not the port the
        // answer reports: a peer elsewhere that copies a live agent's answer would
        // otherwise be taken for that agent and get its tasks. The two differ only
        // behind a port mapping, where the reached port is the one that tells
        // agents of one host apart here.
        let reached = addr
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .unwrap_or(id.port);
        let identity = match &certificate {
            Some(name) => AgentRecord::certificate_identity(name),
            None => AgentRecord::identity(&id.mac, reached),
        };
        let agent_id = self.agent_id_for(&identity).await?;
        let (rec, changed, stored_changed, news) = {
            // Read and change under one lock, so a blacklist change made meanwhile
            // is not overwritten with the flag read before it.
            let mut agents = self.write();
            let previous = agents.get(&agent_id);
            // The state is the rules' to change (`set_state`), once they hear of this.
            let rec = AgentRecord {
                agent_id: agent_id.clone(),
                mac: id.mac.to_lowercase(),
                ip: id.ip.clone(),
                port: id.port,
                address: addr.to_string(),
                hostname: id.hostname,
                version: id.version,
                procedures: id.procedures,
                capacity: id.capacity,
                running: id.running,
                state: previous.map_or(AgentState::Suspect, |p| p.state),
                misses: previous.map_or(0, |p| p.misses),
                last_seen_ms: now_ms(),
                blacklisted: previous.is_some_and(|p| p.blacklisted),
                certificate,
            };
            let changed = previous.is_none_or(|p| {
                p.state != AgentState::Alive
                    || p.address != rec.address
                    || p.procedures != rec.procedures
                    || p.ip != rec.ip
            });
            // What the store keeps of an agent is read at start only: the time
            // of the last echo and the tasks running are kept in memory, and the
            // record is written when something else changed.
            let stored_changed = previous.is_none_or(|p| {
                AgentRecord {
                    last_seen_ms: rec.last_seen_ms,
                    running: rec.running,
                    ..(**p).clone()
                } != rec
            });
            // What the rules keep of an answer: the agent is alive, with no
            // misses, its capacity and procedures.
            let news = previous.is_none_or(|p| {
                p.state != AgentState::Alive
                    || p.misses != 0
                    || p.capacity != rec.capacity
                    || p.procedures != rec.procedures
            });
            agents.insert(agent_id.clone(), Arc::new(rec.clone()));
            (rec, changed, stored_changed, news)
        };
        if stored_changed {
            self.persist(&agent_id)?;
        }
        {
            let mut candidates = self.candidates();
            if !candidates.is_empty() {
                candidates.remove(addr);
            }
        }
        lock(&self.miss_reasons).remove(&agent_id);
        lock(&self.unanswered_warned).remove(addr);
        if changed {
            info!(%agent_id, %addr, mac = %rec.mac, ip = %rec.ip, certificate = rec.certificate.as_deref().unwrap_or(""), "agent alive");
        }
        // Told when the rules may not know it all: news, a miss since they last
        // heard an answer, or the first answer this process had.
        let tell = news || self.in_step().insert(agent_id.clone());
        if let Some(agent) = agent_number(&agent_id).filter(|_| tell) {
            let answered = Event::EchoAnswered {
                agent,
                capacity: rec.capacity,
                procedures: rec.procedures.clone(),
            };
            self.controller.tell(answered).await;
        }
        if id.agent_id.as_deref() != Some(agent_id.as_str()) {
            // Tell the agent its id (it reports it in SIGNALs and ID from now on).
            let req = Request::Id {
                agent_id: Some(agent_id.clone()),
                controller: Some(self.config.advertise.clone()),
                port: None,
                lease_ms: Some(self.config.lease.as_millis() as u64),
                describe: false,
            };
            if let Err(e) = self.client.call(addr, &req).await {
                debug!(%addr, "cannot tell the agent its id yet: {e}");
            }
        }
        if let Some(digest) = catalog_digest {
            let known = self.catalogs().get(&agent_id).map(|c| c.digest.clone());
            if known.as_deref() != Some(digest.as_str()) {
                self.fetch_catalog(&agent_id, addr).await;
            }
        }
        Ok(())
    }

    fn in_step(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.in_step.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent id of an identity: remembered, else from the store (which
    /// assigns a new one to a new identity).
    async fn agent_id_for(&self, identity: &str) -> Result<String, StoreError> {
        let remembered = self
            .identities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(identity)
            .cloned();
        if let Some(id) = remembered {
            return Ok(id);
        }
        let id = self.store.agent_id_for(identity).await?;
        let mut identities = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        if identities.len() < MAX_REMEMBERED_IDENTITIES {
            identities.insert(identity.to_string(), id.clone());
        }
        Ok(id)
    }

    fn catalogs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Catalog>>> {
        self.catalogs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the agent what its procedures are (ID with `describe`) and keeps it;
    /// each Opal model's `--info` is parsed here with the same library the agent
    /// used. A schema that does not parse is logged and the model described as
    /// unknown (calls to it are then checked by the agent alone).
    async fn fetch_catalog(&self, agent_id: &str, addr: &str) {
        let req = Request::Id {
            agent_id: Some(agent_id.to_string()),
            controller: Some(self.config.advertise.clone()),
            port: None,
            lease_ms: Some(self.config.lease.as_millis() as u64),
            describe: true,
        };
        let id = match self.client.call(addr, &req).await {
            Ok(r) if r.is_ok() => {
                serde_json::from_value::<IdData>(r.data).map_err(|e| e.to_string())
            }
            Ok(r) => Err(format!("answered {}: {}", r.code, r.description)),
            Err(e) => Err(e.to_string()),
        };
        let (digest, entries) = match id {
            Ok(IdData {
                catalog_digest: Some(d),
                catalog: Some(c),
                ..
            }) => (d, c),
            Ok(_) => {
                debug!(agent_id, "the agent sent no catalog");
                return;
            }
            Err(e) => {
                debug!(agent_id, "cannot fetch the agent's catalog: {e}");
                return;
            }
        };
        let mut procedures = BTreeMap::new();
        for e in entries.into_iter().take(MAX_CATALOG_ENTRIES) {
            let schema = match (&e.kind, &e.info) {
                (ProcedureKind::Opal, Some(info)) => match crate::opal::schema_from_info(info) {
                    Ok(s) => Some(Arc::new(s)),
                    Err(err) => {
                        warn!(agent_id, procedure = %e.name, "the model's schema does not parse here: {err}");
                        None
                    }
                },
                _ => None,
            };
            procedures.insert(e.name, (e.kind, schema));
        }
        self.catalogs().insert(
            agent_id.to_string(),
            Arc::new(Catalog { digest, procedures }),
        );
    }

    /// What the agents' catalogs say `procedure` is (and, for an Opal model, its
    /// schema), without building a listing: this is on Submit's path. An agent that
    /// can take tasks is believed first: a gone agent's catalog may describe a
    /// model as it was before it changed. Any catalog, when none of those has one.
    pub fn kind_of(&self, procedure: &str) -> Option<(ProcedureKind, Option<Arc<Schema>>)> {
        // Lock order: the catalogs, then the agents (nothing takes them the other
        // way round).
        let catalogs = self.catalogs();
        let agents = self.read();
        let mut any = None;
        for (agent_id, catalog) in catalogs.iter() {
            let Some(entry) = catalog.procedures.get(procedure) else {
                continue;
            };
            if agents.get(agent_id).is_some_and(|a| a.can_take_tasks()) {
                return Some(entry.clone());
            }
            any.get_or_insert_with(|| entry.clone());
        }
        any
    }

    /// What a procedure is and, for an Opal model, its schema, as the alive agents
    /// offering it describe it; with the ids of those agents. `None` when no agent
    /// that can take tasks offers it.
    pub fn describe(&self, procedure: &str) -> Option<Described> {
        let agents: Vec<String> = self
            .list()
            .into_iter()
            .filter(|a| a.can_take_tasks() && a.offers(procedure))
            .map(|a| a.agent_id.clone())
            .collect();
        if agents.is_empty() {
            return None;
        }
        let catalogs = self.catalogs();
        let entry = agents
            .iter()
            .find_map(|a| catalogs.get(a)?.procedures.get(procedure).cloned());
        let (kind, schema) = match entry {
            Some((k, s)) => (Some(k), s),
            None => (None, None),
        };
        Some(Described {
            kind,
            schema,
            agent_ids: agents,
        })
    }

    /// The id of the agent registered with the certificate named `name`, if any.
    pub fn agent_of_certificate(&self, name: &str) -> Option<String> {
        self.read()
            .values()
            .find(|a| a.certificate.as_deref() == Some(name))
            .map(|a| a.agent_id.clone())
    }

    /// `reason`: why the echo failed (a revoked or expired certificate shows here).
    async fn missed(&self, agent_id: &str, reason: &str) {
        if self.get(agent_id).is_none() {
            return;
        }
        debug!(agent_id, "no echo: {reason}");
        lock(&self.miss_reasons).insert(agent_id.to_string(), reason.to_string());
        // Removed before the miss is told, so the next answer is told after it.
        self.in_step().remove(agent_id);
        if let Some(agent) = agent_number(agent_id) {
            self.controller.tell(Event::EchoMissed { agent }).await;
        }
    }

    /// One echo round: every known agent and every candidate (configured or
    /// announced address not registered yet).
    pub async fn echo_round(&self) {
        let known: Vec<(String, String)> = self
            .read()
            .values()
            .map(|a| (a.address.clone(), a.agent_id.clone()))
            .collect();
        let known_addrs: BTreeSet<String> = known.iter().map(|(addr, _)| addr.clone()).collect();
        let mut targets: Vec<(String, Option<String>)> = known
            .into_iter()
            .map(|(addr, id)| (addr, Some(id)))
            .collect();
        let candidates: Vec<String> = self
            .candidates()
            .keys()
            .filter(|a| !known_addrs.contains(*a))
            .cloned()
            .collect();
        targets.extend(candidates.into_iter().map(|a| (a, None)));
        self.probe_all(targets).await;
    }

    /// One pass over the `--scan` ranges: every address that is no known agent's.
    async fn scan_pass(&self) {
        let known_addrs: BTreeSet<String> =
            self.read().values().map(|a| a.address.clone()).collect();
        let port = self.config.scan_port;
        let targets = self
            .config
            .scan
            .iter()
            .flat_map(IpNet::hosts)
            .map(|ip| socket_addr(ip, port))
            .filter(|addr| !known_addrs.contains(addr))
            .map(|addr| (addr, None));
        self.probe_all(targets).await;
    }

    async fn probe_all(&self, targets: impl IntoIterator<Item = (String, Option<String>)>) {
        futures::stream::iter(targets)
            .for_each_concurrent(MAX_CONCURRENT_PROBES, |(addr, id)| async move {
                self.probe(addr, id).await;
            })
            .await;
    }

    /// Runs echo rounds every interval until `stop`, and beside them passes over
    /// the scan ranges, at most one per interval. Kept apart so that a range whose
    /// addresses do not answer (each probe waits for its timeout) never delays the
    /// echoes that tell whether known agents are alive.
    pub async fn echo_loop(self: Arc<Self>, stop: CancellationToken) {
        let interval = self.config.echo_interval;
        let echoes = every(interval, &stop, || self.echo_round());
        let scans = async {
            if !self.config.scan.is_empty() {
                every(interval, &stop, || self.scan_pass()).await;
            }
        };
        tokio::join!(echoes, scans);
    }
}

/// Runs `round` every `interval` (or back to back when it takes longer) until `stop`.
async fn every<F: std::future::Future>(
    interval: Duration,
    stop: &CancellationToken,
    mut round: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = round() => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn socket_addr(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// `agent-10` sorts after `agent-9`.
fn agent_sort_key(id: &str) -> (u64, String) {
    let n = id
        .strip_prefix("agent-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    (n, id.to_string())
}

/// Parses and bounds a --scan range.
pub fn parse_scan(cidr: &str) -> Result<IpNet, String> {
    let net: IpNet = cidr
        .parse()
        .map_err(|e| format!("--scan {cidr:?} is not a CIDR range such as 10.0.0.0/24 ({e})"))?;
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    if host_bits >= 64 || (1u64 << host_bits) > MAX_SCAN_ADDRESSES {
        return Err(format!(
            "--scan {cidr:?} has more than {MAX_SCAN_ADDRESSES} addresses; use a smaller range"
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;
    use crate::gateway::scheduler::ControllerInbox;

    /// Answers ID like an agent on a loopback port; aborting the task closes the
    /// listener and every connection, as if the agent's host went away.
    async fn fake_agent() -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(_)) = lines.next_line().await {
                        let data = IdData {
                            mac: "02:00:00:00:00:01".into(),
                            ip: addr.ip().to_string(),
                            hostname: "fake".into(),
                            port: addr.port(),
                            version: "1.0".into(),
                            procedures: vec!["add".into()],
                            capacity: 1,
                            running: 0,
                            agent_id: None,
                            catalog_digest: None,
                            catalog: None,
                        };
                        let line = json!({"code": 100, "description": "OK", "data": data});
                        if write
                            .write_all(format!("{line}\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        (addr.to_string(), server)
    }

    /// Listeners on every host address of 127.77.0.0/24, on one port, that take
    /// connections and never answer: a range where every probe runs into its timeout.
    fn silent_range() -> (IpNet, u16, Vec<std::net::TcpListener>) {
        let net: IpNet = "127.77.0.0/24".parse().expect("a range");
        for _ in 0..10 {
            let first = std::net::TcpListener::bind("127.77.0.1:0").expect("bind");
            let port = first.local_addr().expect("address").port();
            let rest: Result<Vec<_>, _> = net
                .hosts()
                .skip(1)
                .map(|ip| std::net::TcpListener::bind((ip, port)))
                .collect();
            if let Ok(mut all) = rest {
                all.push(first);
                return (net, port, all);
            }
        }
        panic!("no port free on every address of {net}");
    }

    async fn next_event(heard: &mut ControllerInbox) -> Event {
        tokio::time::timeout(Duration::from_secs(10), heard.next_event())
            .await
            .expect("an event within 10 s")
            .expect("the channel is open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_scan_range_does_not_delay_the_echoes_of_known_agents() {
        let (scan, scan_port, _silent) = silent_range();
        let (agent, server) = fake_agent().await;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = GatewayStore::open(dir.path()).expect("a store");
        let (events, mut heard) = ControllerHandle::new();
        let interval = Duration::from_millis(300);
        let membership = Membership::new(
            store,
            MembershipConfig {
                // Probes time out after PROBE_TIMEOUT_FLOOR: a pass over the silent
                // range takes 254 / 64 waves of 1 s, about 4 s.
                echo_interval: interval,
                seeds: vec![agent.clone()],
                scan: vec![scan],
                scan_port,
                advertise: "127.0.0.1:1".into(),
                lease: interval * 3,
                tls: None,
            },
            events,
        )
        .expect("membership");
        let stop = CancellationToken::new();
        let echo = tokio::spawn(membership.clone().echo_loop(stop.clone()));
        let Event::EchoAnswered { agent: id, .. } = next_event(&mut heard).await else {
            panic!("the seed should answer first");
        };

        server.abort();
        let left = Instant::now();
        let mut misses = 0;
        while misses < 3 {
            match next_event(&mut heard).await {
                Event::EchoMissed { agent } if agent == id => misses += 1,
                Event::EchoAnswered { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let took = left.elapsed();
        // Three echoes 300 ms apart, each refused at once: under 1 s. Echoes waiting
        // for each pass over the silent range would take at least one pass, about 4 s.
        assert!(
            took < Duration::from_secs(2),
            "{id} left {took:?} after it stopped answering, with echoes every {interval:?}"
        );
        stop.cancel();
        echo.await.expect("the echo loop ends");
    }
}
