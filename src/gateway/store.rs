//! The gateway's durable state in sled: tasks (keyed by time-ordered id, so key
//! order is creation order), agents and their identities, and counters. Writes that
//! a client was promised are made durable by a group commit shared with concurrent
//! writers; other changes reach disk within sled's flush interval, and every one of
//! those can be redone from the agents after a crash.
//!
//! The sled handles live in a [`Store`] that reopens itself after a write error
//! (see `durable.rs`), so every access goes through [`Store::with`] and no method
//! keeps a tree or an iterator past its return.

use std::ops::ControlFlow;
use std::path::Path;

use super::model::{AgentRecord, TaskRecord, TaskStatus};
use crate::durable::{count_up, DamagePolicy, Spec, Store, GATEWAY_STORE};
pub use crate::store::StoreError;
use crate::store::{Edit, Json, Records, Text};

/// sled's page cache for the gateway's store unless `--store-cache` says otherwise:
/// it holds the unfinished tasks' records and the newest pages of the listings; the
/// rest of a big store is read through the kernel's page cache, which the machine
/// shares with everything else.
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Tasks one retention pass removes at most; more wait for the next pass.
pub const MAX_RETENTION_BATCH: usize = 10_000;

/// Which tasks a listing wants.
#[derive(Debug, Default, Clone)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub agent_id: Option<String>,
    pub procedure: Option<String>,
}

impl TaskFilter {
    fn matches(&self, t: &TaskRecord) -> bool {
        self.status.is_none_or(|s| s == t.status)
            && self
                .agent_id
                .as_ref()
                .is_none_or(|a| t.agent_id.as_ref() == Some(a))
            && self.procedure.as_ref().is_none_or(|p| &t.procedure == p)
    }
}

struct Trees {
    tasks: sled::Tree,
    agents: sled::Tree,
    /// MAC|port → agent id.
    identities: sled::Tree,
    meta: sled::Tree,
}

fn trees(db: &sled::Db) -> sled::Result<Trees> {
    Ok(Trees {
        tasks: db.open_tree("tasks")?,
        agents: db.open_tree("agents")?,
        identities: db.open_tree("identities")?,
        meta: db.open_tree("meta")?,
    })
}

#[derive(Clone)]
pub struct GatewayStore {
    db: Store<Trees>,
    tasks: Records<Trees, Json<TaskRecord>>,
    agents: Records<Trees, Json<AgentRecord>>,
    identities: Records<Trees, Text>,
}

impl GatewayStore {
    /// Opens the store, refusing a damaged one.
    pub fn open(dir: &Path) -> Result<GatewayStore, StoreError> {
        GatewayStore::open_with(dir, DamagePolicy::Refuse, DEFAULT_CACHE_BYTES)
    }

    /// Opens the store; damage (lost durable writes, records that do not decode)
    /// is refused or, with [`DamagePolicy::Accept`], logged and the unreadable
    /// records dropped.
    /// `cache_bytes` is sled's page cache.
    pub fn open_with(
        dir: &Path,
        policy: DamagePolicy,
        cache_bytes: u64,
    ) -> Result<GatewayStore, StoreError> {
        let opened = Store::open(
            Spec {
                label: "task store",
                path: dir.join(GATEWAY_STORE),
                cache_bytes,
                trees,
            },
            policy,
        )?;
        let mut damage = opened.damage;
        let store = GatewayStore::with_records(opened.store);
        let drop_bad = policy == DamagePolicy::Accept;
        let (bad_tasks, unreadable_tasks) = store.tasks.audit(drop_bad)?;
        let (bad_agents, unreadable_agents) = store.agents.audit(drop_bad)?;
        let (bad, entries) = (bad_tasks + bad_agents, unreadable_tasks + unreadable_agents);
        if bad > 0 || entries > 0 {
            damage.push(format!(
                "{bad} records do not decode and {entries} entries cannot be read"
            ));
        }
        Ok(GatewayStore::with_records(store.db.settle(damage, policy)?))
    }

    fn with_records(db: Store<Trees>) -> GatewayStore {
        GatewayStore {
            tasks: Records::new(db.clone(), "tasks", |t| &t.tasks),
            agents: Records::new(db.clone(), "agents", |t| &t.agents),
            identities: Records::new(db.clone(), "identities", |t| &t.identities),
            db,
        }
    }

    /// Why the store cannot write now, `None` while it can; changes as it fails
    /// and recovers.
    pub fn faults(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.db.faults()
    }

    /// Flushes and records the commit sequence, as on a clean stop.
    pub fn close(&self) {
        self.db.close();
    }

    /// Waits until every write made before the call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        Ok(self.db.commit().await?)
    }

    /// Stores a task without waiting for disk (a later commit covers it).
    pub fn put_task(&self, t: &TaskRecord) -> Result<(), StoreError> {
        self.tasks.put(&t.task_id, t)?;
        Ok(())
    }

    pub fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.tasks.get(id)
    }

    /// Applies `change` atomically. `change` returns whether it changed anything;
    /// the answer is the record after the change and that flag, or `None` for an
    /// unknown id. Not yet durable: see [`GatewayStore::commit`]. On an error the
    /// stored record is left as it was.
    pub fn update_task(
        &self,
        id: &str,
        change: impl FnMut(&mut TaskRecord) -> bool,
    ) -> Result<Option<(TaskRecord, bool)>, StoreError> {
        self.tasks.update(id, change)
    }

    /// Every task for which `keep` holds (a full scan: start-up and maintenance).
    pub fn scan_tasks(&self, mut keep: impl FnMut(&TaskRecord) -> bool) -> Vec<TaskRecord> {
        let mut out = Vec::new();
        let scanned = self.tasks.scan(|_, t| {
            match t {
                Ok(t) if keep(&t) => out.push(t),
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
            ControlFlow::<()>::Continue(())
        });
        if let Err(e) = scanned {
            tracing::warn!("cannot scan the tasks: {e}");
            return Vec::new();
        }
        out
    }

    /// Newest first, from before `after` (a previous page's last id): at most
    /// `limit` tasks, each made an item by `convert`, which also says its size in
    /// bytes; the page ends before the sizes pass `max_bytes`, but holds at least
    /// one task. Returns the page and whether more tasks follow. A record that
    /// does not decode is left out (and logged), so that no stored task can make
    /// the listing fail.
    pub fn list_tasks<T>(
        &self,
        filter: &TaskFilter,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        mut convert: impl FnMut(&TaskRecord) -> (T, usize),
    ) -> Result<(Vec<T>, bool), StoreError> {
        let mut page = Vec::new();
        let mut bytes = 0usize;
        let cut = self.tasks.scan_back(after, |_, t| {
            let t = match t {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("listing tasks: {e}");
                    return ControlFlow::Continue(());
                }
            };
            if !filter.matches(&t) {
                return ControlFlow::Continue(());
            }
            if page.len() == limit {
                return ControlFlow::Break(());
            }
            let (item, size) = convert(&t);
            if !page.is_empty() && bytes.saturating_add(size) > max_bytes {
                return ControlFlow::Break(());
            }
            bytes = bytes.saturating_add(size);
            page.push(item);
            ControlFlow::Continue(())
        })?;
        Ok((page, cut.is_some()))
    }

    /// Drops finished tasks older than `max_age_ms`, then the oldest finished ones
    /// beyond `max_count`, at most `MAX_RETENTION_BATCH` a call (the rest go at the
    /// next). Unfinished tasks are never dropped. Returns how many went.
    pub fn apply_retention(
        &self,
        now_ms: u64,
        max_age_ms: u64,
        max_count: usize,
    ) -> Result<usize, StoreError> {
        // Two passes, so that what is held is the batch, not a list of every finished
        // task: count the finished, then pick the oldest beyond the count and the
        // expired, in key (creation) order.
        let mut finished = 0usize;
        self.tasks.scan(|_, t| {
            if t.is_ok_and(|t| t.finished_ms.is_some() && t.status.is_final()) {
                finished += 1;
            }
            ControlFlow::<()>::Continue(())
        })?;
        let excess = finished.saturating_sub(max_count);
        let mut seen = 0usize;
        let mut doomed: Vec<String> = Vec::new();
        self.tasks.scan(|k, t| {
            if doomed.len() >= MAX_RETENTION_BATCH {
                return ControlFlow::Break(());
            }
            if let Ok(t) = t {
                if let Some(at) = t.finished_ms.filter(|_| t.status.is_final()) {
                    if seen < excess || now_ms.saturating_sub(at) > max_age_ms {
                        doomed.push(k.to_string());
                    }
                    seen += 1;
                }
            }
            ControlFlow::Continue(())
        })?;
        let mut removed = 0;
        for k in &doomed {
            // A final status is never left, so the check only guards the rule.
            let gone = self.tasks.edit(k, |t| {
                if t.status.is_final() {
                    Edit::Remove
                } else {
                    Edit::Keep
                }
            })?;
            if matches!(gone, Some((_, Edit::Remove))) {
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let mut out = Vec::new();
        let failed = self.agents.scan(|_, a| match a {
            Ok(a) => {
                out.push(a);
                ControlFlow::Continue(())
            }
            Err(e) => ControlFlow::Break(e),
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    pub fn put_agent(&self, a: &AgentRecord) -> Result<(), StoreError> {
        self.agents.put(&a.agent_id, a)?;
        Ok(())
    }

    /// The agent id of an identity (MAC + port), assigning the next free one for a
    /// new identity. Ids are never reused.
    pub async fn agent_id_for(&self, identity: &str) -> Result<String, StoreError> {
        if let Some(id) = self.identities.get(identity)? {
            return Ok(id);
        }
        let n = self.db.with(|d| count_up(&d.meta, b"agent_counter"))?;
        let id = format!("agent-{n}");
        match self.identities.insert_new(identity, &id)? {
            None => {
                self.commit().await?;
                Ok(id)
            }
            // Registered concurrently: keep the first id.
            Some(first) => Ok(first),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_drops_the_oldest_in_batches() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = GatewayStore::open(dir.path()).expect("a store");
        let total = MAX_RETENTION_BATCH * 2 + 500;
        let mut ids = Vec::new();
        for i in 0..total {
            // Time-ordered ids, as the gateway makes them: key order is age.
            let id = format!("{i:08}");
            let mut t = TaskRecord::new(id.clone(), "add".into(), Default::default(), None);
            t.set_status(TaskStatus::Done, None, 1);
            store.put_task(&t).expect("put");
            ids.push(id);
        }
        let mut open = TaskRecord::new("00000000x".into(), "add".into(), Default::default(), None);
        open.status = TaskStatus::Running;
        store.put_task(&open).expect("put");
        let keep = 100;
        let mut removed = Vec::new();
        for _ in 0..4 {
            removed.push(store.apply_retention(2, u64::MAX, keep).expect("retention"));
        }
        assert_eq!(
            removed,
            vec![
                MAX_RETENTION_BATCH,
                MAX_RETENTION_BATCH,
                total - keep - 2 * MAX_RETENTION_BATCH,
                0
            ]
        );
        // The newest finished stay, and the unfinished one whatever its age.
        assert!(store.get_task(&ids[total - keep]).expect("get").is_some());
        assert!(store
            .get_task(&ids[total - keep - 1])
            .expect("get")
            .is_none());
        assert!(store.get_task("00000000x").expect("get").is_some());
    }
}
