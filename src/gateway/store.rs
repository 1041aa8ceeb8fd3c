//! The gateway's durable state in sled: tasks (keyed by time-ordered id, so key
//! order is creation order), agents and their identities, and counters. Writes that
//! a client was promised are made durable by a group commit shared with concurrent
//! writers; other changes reach disk within sled's flush interval, and every one of
//! those can be redone from the agents after a crash.

use std::path::Path;

use thiserror::Error;

use super::model::{AgentRecord, TaskRecord, TaskStatus};
use crate::durable::{open_db, CommitError, GroupCommit};

/// sled's page cache for the gateway's store.
const CACHE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("gateway store: {0}")]
    Sled(#[from] sled::Error),
    #[error("gateway store: {0}")]
    Commit(#[from] CommitError),
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

#[derive(Clone)]
pub struct GatewayStore {
    tasks: sled::Tree,
    agents: sled::Tree,
    /// MAC|port → agent id.
    identities: sled::Tree,
    meta: sled::Tree,
    commits: GroupCommit,
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        error: e.to_string(),
    })
}

impl GatewayStore {
    pub fn open(dir: &Path) -> Result<GatewayStore, StoreError> {
        let path = dir.join("gateway.sled");
        let db = open_db(&path, CACHE_BYTES)?;
        let commits = GroupCommit::start(db.clone(), &path, "gateway-store")
            .map_err(|e| StoreError::Commit(CommitError::Flush(e.to_string())))?;
        Ok(GatewayStore {
            tasks: db.open_tree("tasks")?,
            agents: db.open_tree("agents")?,
            identities: db.open_tree("identities")?,
            meta: db.open_tree("meta")?,
            commits,
        })
    }

    /// Waits until every write made before the call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        Ok(self.commits.commit().await?)
    }

    /// Stores a task without waiting for disk (a later commit covers it).
    pub fn put_task(&self, t: &TaskRecord) -> Result<(), StoreError> {
        self.tasks
            .insert(t.task_id.as_bytes(), serde_json::to_vec(t)?)?;
        Ok(())
    }

    pub fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.tasks
            .get(id.as_bytes())?
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
        self.tasks.fetch_and_update(id.as_bytes(), |old| {
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
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Every task for which `keep` holds (a full scan: start-up and maintenance).
    pub fn scan_tasks(&self, mut keep: impl FnMut(&TaskRecord) -> bool) -> Vec<TaskRecord> {
        self.tasks
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
            .collect()
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
        let iter = match after {
            Some(a) => self.tasks.range(..a.as_bytes().to_vec()),
            None => self.tasks.iter(),
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
    }

    /// Drops finished tasks older than `max_age_ms`, then the oldest finished ones
    /// beyond `max_count`. Unfinished tasks are never dropped. Returns how many went.
    pub fn apply_retention(
        &self,
        now_ms: u64,
        max_age_ms: u64,
        max_count: usize,
    ) -> Result<usize, StoreError> {
        let finished: Vec<(sled::IVec, u64)> = self
            .tasks
            .iter()
            .filter_map(|kv| {
                let (k, v) = kv.ok()?;
                let t: TaskRecord = decode(&k, &v).ok()?;
                Some((k, t.finished_ms?)).filter(|_| t.status.is_final())
            })
            .collect();
        let excess = finished.len().saturating_sub(max_count);
        let mut removed = 0;
        for (i, (k, finished_ms)) in finished.iter().enumerate() {
            if i < excess || now_ms.saturating_sub(*finished_ms) > max_age_ms {
                self.tasks.remove(k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.agents
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn put_agent(&self, a: &AgentRecord) -> Result<(), StoreError> {
        self.agents
            .insert(a.agent_id.as_bytes(), serde_json::to_vec(a)?)?;
        Ok(())
    }

    /// The agent id of an identity (MAC + port), assigning the next free one for a
    /// new identity. Ids are never reused.
    pub async fn agent_id_for(&self, identity: &str) -> Result<String, StoreError> {
        if let Some(id) = self.identities.get(identity.as_bytes())? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let next = self.meta.update_and_fetch("agent_counter", |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        let n = next
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(1, u64::from_be_bytes);
        let id = format!("agent-{n}");
        match self.identities.compare_and_swap(
            identity.as_bytes(),
            None as Option<&[u8]>,
            Some(id.as_bytes()),
        )? {
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
