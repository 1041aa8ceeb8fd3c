//! The gateway's durable state in sled: tasks (keyed by time-ordered id, so key
//! order is creation order), agents and their identities, and counters. Writes that
//! a client was promised are made durable by a group commit shared with concurrent
//! writers; other changes reach disk within sled's flush interval, and every one of
//! those can be redone from the agents after a crash.
//!
//! The sled handles live in a [`Store`] that reopens itself after a write error
//! (see `durable.rs`), so every access goes through [`Store::with`] and no method
//! keeps a tree or an iterator past its return.

use std::path::Path;

use thiserror::Error;

use super::model::{AgentRecord, TaskRecord, TaskStatus};
use crate::durable::{DamagePolicy, DurableError, OpenError, Spec, Store, GATEWAY_STORE};

/// sled's page cache for the gateway's store.
const CACHE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("gateway store: unreadable record {key:?}: {error}")]
    Corrupt { key: String, error: String },
    #[error("gateway store: {0}")]
    Encode(#[from] serde_json::Error),
}

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
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        error: e.to_string(),
    })
}

impl GatewayStore {
    /// Opens the store, refusing a damaged one.
    pub fn open(dir: &Path) -> Result<GatewayStore, StoreError> {
        GatewayStore::open_with(dir, DamagePolicy::Refuse)
    }

    /// Opens the store; damage (lost durable writes, records that do not decode)
    /// is refused or, with [`DamagePolicy::Accept`], logged and the unreadable
    /// records dropped.
    pub fn open_with(dir: &Path, policy: DamagePolicy) -> Result<GatewayStore, StoreError> {
        let opened = Store::open(
            Spec {
                label: "task store",
                path: dir.join(GATEWAY_STORE),
                cache_bytes: CACHE_BYTES,
                trees,
            },
            policy,
        )?;
        let mut damage = opened.damage;
        let db = opened.store;
        let (bad, entries) = db.with(|t| {
            let (mut bad, mut entries) = (0usize, 0usize);
            for tree in [&t.tasks, &t.agents] {
                let is_tasks = std::ptr::eq(tree, &t.tasks);
                for kv in tree.iter() {
                    let Ok((k, v)) = kv else {
                        entries += 1;
                        continue;
                    };
                    let decodes = if is_tasks {
                        decode::<TaskRecord>(&k, &v).is_ok()
                    } else {
                        decode::<AgentRecord>(&k, &v).is_ok()
                    };
                    if decodes {
                        continue;
                    }
                    bad += 1;
                    if policy == DamagePolicy::Accept {
                        tracing::warn!(key = %String::from_utf8_lossy(&k), "damaged store: dropping a record that does not decode");
                        tree.remove(&k)?;
                    }
                }
            }
            Ok((bad, entries))
        })?;
        if bad > 0 || entries > 0 {
            damage.push(format!(
                "{bad} records do not decode and {entries} entries cannot be read"
            ));
        }
        Ok(GatewayStore {
            db: db.settle(damage, policy)?,
        })
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
        let bytes = serde_json::to_vec(t)?;
        self.db
            .with(|d| d.tasks.insert(t.task_id.as_bytes(), bytes))?;
        Ok(())
    }

    pub fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.db
            .with(|d| d.tasks.get(id.as_bytes()))?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    /// Applies `change` atomically. `change` returns whether it changed anything;
    /// the answer is the record after the change and that flag, or `None` for an
    /// unknown id. Not yet durable: see [`GatewayStore::commit`].
    pub fn update_task(
        &self,
        id: &str,
        mut change: impl FnMut(&mut TaskRecord) -> bool,
    ) -> Result<Option<(TaskRecord, bool)>, StoreError> {
        let mut out = None;
        let mut failure = None;
        self.db.with(|d| {
            d.tasks.fetch_and_update(id.as_bytes(), |old| {
                let old = old?;
                match decode::<TaskRecord>(id.as_bytes(), old) {
                    Ok(mut rec) => {
                        let changed = change(&mut rec);
                        let bytes = if changed {
                            serde_json::to_vec(&rec).ok()
                        } else {
                            Some(old.to_vec())
                        };
                        out = Some((rec, changed));
                        bytes
                    }
                    Err(e) => {
                        failure = Some(e);
                        Some(old.to_vec())
                    }
                }
            })
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Every task for which `keep` holds (a full scan: start-up and maintenance).
    pub fn scan_tasks(&self, mut keep: impl FnMut(&TaskRecord) -> bool) -> Vec<TaskRecord> {
        let scanned = self.db.with(|d| {
            Ok(d.tasks
                .iter()
                .filter_map(|kv| {
                    let (k, v) = kv.ok()?;
                    match decode::<TaskRecord>(&k, &v) {
                        Ok(t) => keep(&t).then_some(t),
                        Err(e) => {
                            tracing::warn!("{e}");
                            None
                        }
                    }
                })
                .collect())
        });
        scanned.unwrap_or_else(|e| {
            tracing::warn!("cannot scan the tasks: {e}");
            Vec::new()
        })
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
        self.db
            .with(|d| {
                let iter = match after {
                    Some(a) => d.tasks.range(..a.as_bytes().to_vec()),
                    None => d.tasks.iter(),
                };
                let mut page = Vec::new();
                let mut bytes = 0usize;
                for kv in iter.rev() {
                    let (k, v) = kv?;
                    let t: TaskRecord = match decode(&k, &v) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::warn!("listing tasks: {e}");
                            continue;
                        }
                    };
                    if !filter.matches(&t) {
                        continue;
                    }
                    if page.len() == limit {
                        return Ok((page, true));
                    }
                    let (item, size) = convert(&t);
                    if !page.is_empty() && bytes.saturating_add(size) > max_bytes {
                        return Ok((page, true));
                    }
                    bytes = bytes.saturating_add(size);
                    page.push(item);
                }
                Ok((page, false))
            })
            .map_err(StoreError::from)
    }

    /// Drops finished tasks older than `max_age_ms`, then the oldest finished ones
    /// beyond `max_count`. Unfinished tasks are never dropped. Returns how many went.
    pub fn apply_retention(
        &self,
        now_ms: u64,
        max_age_ms: u64,
        max_count: usize,
    ) -> Result<usize, StoreError> {
        let finished: Vec<(sled::IVec, u64)> = self.db.with(|d| {
            Ok(d.tasks
                .iter()
                .filter_map(|kv| {
                    let (k, v) = kv.ok()?;
                    let t: TaskRecord = decode(&k, &v).ok()?;
                    Some((k, t.finished_ms?)).filter(|_| t.status.is_final())
                })
                .collect())
        })?;
        let excess = finished.len().saturating_sub(max_count);
        let mut removed = 0;
        for (i, (k, finished_ms)) in finished.iter().enumerate() {
            if i < excess || now_ms.saturating_sub(*finished_ms) > max_age_ms {
                self.db.with(|d| d.tasks.remove(k))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.db.with(|d| {
            let mut out = Vec::new();
            for kv in d.agents.iter() {
                let (k, v) = kv?;
                match decode(&k, &v) {
                    Ok(a) => out.push(a),
                    Err(e) => return Ok(Err(e)),
                }
            }
            Ok(Ok(out))
        })?
    }

    pub fn put_agent(&self, a: &AgentRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(a)?;
        self.db
            .with(|d| d.agents.insert(a.agent_id.as_bytes(), bytes))?;
        Ok(())
    }

    /// The agent id of an identity (MAC + port), assigning the next free one for a
    /// new identity. Ids are never reused.
    pub async fn agent_id_for(&self, identity: &str) -> Result<String, StoreError> {
        if let Some(id) = self.db.with(|d| d.identities.get(identity.as_bytes()))? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let next = self.db.with(|d| {
            d.meta.update_and_fetch("agent_counter", |old| {
                let n = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes);
                Some((n + 1).to_be_bytes().to_vec())
            })
        })?;
        let n = next
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(1, u64::from_be_bytes);
        let id = format!("agent-{n}");
        match self.db.with(|d| {
            d.identities.compare_and_swap(
                identity.as_bytes(),
                None as Option<&[u8]>,
                Some(id.as_bytes()),
            )
        })? {
            Ok(()) => {
                self.commit().await?;
                Ok(id)
            }
            // Registered concurrently: keep the first id.
            Err(cas) => Ok(cas
                .current
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or(id)),
        }
    }
}
