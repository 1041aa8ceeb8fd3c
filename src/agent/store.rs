//! The agent's durable task store (sled). A task is written before the agent answers
//! ATASK and stays until the controller terminates it, so a finished result survives
//! a crash and a controller that was briefly away.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::arpcp::{Args, AtaskStatus, TaskError};
use crate::durable::{DamagePolicy, DurableError, OpenError, Spec, Store, AGENT_STORE};

/// sled's page cache for the agent's store.
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0}")]
    Durable(DurableError),
    #[error("{0}")]
    Open(OpenError),
    #[error("task store holds an unreadable record for {key:?}: {error}")]
    Corrupt { key: String, error: String },
    #[error("task store: {0}")]
    Encode(serde_json::Error),
}

impl StoreError {
    /// Writes fail for now (a full disk) and will work again once the store has
    /// recovered: worth waiting for.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Durable(DurableError::Unwritable { .. }))
    }
}

// The texts above include their cause, so the causes are not also exposed as
// `source()`: a caller printing the chain would repeat them.
impl From<DurableError> for StoreError {
    fn from(e: DurableError) -> Self {
        StoreError::Durable(e)
    }
}

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> Self {
        StoreError::Open(e)
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Encode(e)
    }
}

/// Where a task is in its life on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Done,
    Failed,
    ClientError,
    Interrupted,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }

    /// The ARPCP status reported for this state.
    pub fn atask_status(self) -> AtaskStatus {
        match self {
            TaskState::Queued | TaskState::Running => AtaskStatus::Accepted,
            TaskState::Done | TaskState::Failed => AtaskStatus::Done,
            TaskState::ClientError => AtaskStatus::ClientError,
            TaskState::Interrupted => AtaskStatus::Interrupted,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub atask_id: String,
    pub procedure: String,
    pub args: Args,
    #[serde(default)]
    pub reply_to: Option<String>,
    pub state: TaskState,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<TaskError>,
    /// The controller answered this task's final SIGNAL.
    #[serde(default)]
    pub final_signal_answered: bool,
    /// When it ended (milliseconds since the Unix epoch): unclaimed results are
    /// dropped a retention period later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}

impl TaskRecord {
    /// Same call as another ATASK with this id (the idempotency check).
    pub fn same_call(&self, procedure: &str, args: &Args) -> bool {
        self.procedure == procedure && &self.args == args
    }
}

struct Trees {
    tasks: sled::Tree,
    meta: sled::Tree,
}

fn trees(db: &sled::Db) -> sled::Result<Trees> {
    Ok(Trees {
        tasks: db.open_tree("tasks")?,
        meta: db.open_tree("meta")?,
    })
}

/// The sled handles live in a [`Store`] that reopens itself after a write error
/// (see `durable.rs`): every access goes through [`Store::with`].
#[derive(Clone)]
pub struct AgentStore {
    db: Store<Trees>,
    /// A random id made when the store was created, naming it to programs it runs.
    id: std::sync::Arc<str>,
}

/// What an insert found.
pub enum Inserted {
    New,
    Existing(TaskRecord),
}

impl AgentStore {
    /// Opens the store, refusing a damaged one (lost durable writes; see
    /// `durable::accept_damage` for starting anyway).
    pub fn open(dir: &Path) -> Result<AgentStore, StoreError> {
        let opened = Store::open(
            Spec {
                label: "task store",
                path: dir.join(AGENT_STORE),
                cache_bytes: CACHE_BYTES,
                trees,
            },
            DamagePolicy::Refuse,
        )?;
        let db = opened.store.settle(opened.damage, DamagePolicy::Refuse)?;
        let fresh = uuid::Uuid::new_v4().to_string();
        let id = match db.with(|d| {
            d.meta
                .compare_and_swap("store_id", None as Option<&[u8]>, Some(fresh.as_bytes()))
        })? {
            Ok(()) => {
                db.close();
                fresh
            }
            Err(cas) => cas
                .current
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or(fresh),
        };
        Ok(AgentStore { db, id: id.into() })
    }

    /// The store's id (stable across restarts).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Inserts `rec` unless its id exists, atomically; not yet durable (see
    /// [`AgentStore::commit`]). A synchronous step, so a caller can pair it with
    /// other bookkeeping that no cancelled future can split.
    pub fn insert_new(&self, rec: &TaskRecord) -> Result<Inserted, StoreError> {
        let bytes = serde_json::to_vec(rec)?;
        match self.db.with(|d| {
            d.tasks
                .compare_and_swap(rec.atask_id.as_bytes(), None as Option<&[u8]>, Some(bytes))
        })? {
            Ok(()) => Ok(Inserted::New),
            Err(cas) => {
                let existing = cas.current.map(|v| decode(&rec.atask_id, &v)).transpose()?;
                match existing {
                    Some(r) => Ok(Inserted::Existing(r)),
                    None => Err(StoreError::Corrupt {
                        key: rec.atask_id.clone(),
                        error: "record vanished during insert".into(),
                    }),
                }
            }
        }
    }

    /// Waits until every write made before the call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        Ok(self.db.commit().await?)
    }

    pub fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.db
            .with(|d| d.tasks.get(id.as_bytes()))?
            .map(|v| decode(id, &v))
            .transpose()
    }

    /// Changes a stored task (if it still exists) and, with `durable`, waits for disk.
    /// Returns the new record, or `None` when the task was terminated meanwhile.
    pub async fn update(
        &self,
        id: &str,
        durable: bool,
        change: impl Fn(&mut TaskRecord),
    ) -> Result<Option<TaskRecord>, StoreError> {
        let mut out = None;
        let mut failure = None;
        self.db.with(|d| {
            d.tasks.fetch_and_update(id.as_bytes(), |old| {
                let old = old?;
                match decode(id, old) {
                    Ok(mut rec) => {
                        change(&mut rec);
                        let bytes = serde_json::to_vec(&rec).ok();
                        out = Some(rec);
                        bytes
                    }
                    Err(e) => {
                        failure = Some(e);
                        Some(old.to_vec())
                    }
                }
            })
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        if durable && out.is_some() {
            self.db.commit().await?;
        }
        Ok(out)
    }

    /// Deletes a task; true if it existed.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.db.with(|d| d.tasks.remove(id.as_bytes()))?.is_some())
    }

    /// Every stored task; unreadable records are reported, not skipped silently.
    pub fn all(&self) -> Vec<Result<TaskRecord, StoreError>> {
        let all = self.db.with(|d| {
            Ok(d.tasks
                .iter()
                .map(|kv| match kv {
                    Ok((k, v)) => decode(&String::from_utf8_lossy(&k), &v),
                    Err(e) => Err(StoreError::Corrupt {
                        key: "?".into(),
                        error: e.to_string(),
                    }),
                })
                .collect())
        });
        all.unwrap_or_else(|e| vec![Err(e.into())])
    }

    /// Drops finished tasks that ended before `cutoff_ms`, and stamps finished tasks
    /// stored without an end time (by an older version) with `now_ms`. Returns how
    /// many were dropped. Unfinished tasks are never dropped.
    pub fn drop_finished_before(&self, cutoff_ms: u64, now_ms: u64) -> Result<usize, StoreError> {
        // A snapshot of the keys first: no sled iterator is held across the store's
        // handle, which a write error may swap.
        let keys: Vec<sled::IVec> = self.db.with(|d| {
            d.tasks
                .iter()
                .keys()
                .collect::<sled::Result<Vec<sled::IVec>>>()
        })?;
        let mut dropped = 0;
        for k in keys {
            let Some(v) = self.db.with(|d| d.tasks.get(&k))? else {
                continue;
            };
            let Ok(rec) = decode(&String::from_utf8_lossy(&k), &v) else {
                continue;
            };
            if !rec.state.is_final() {
                continue;
            }
            match rec.finished_ms {
                Some(at) if at < cutoff_ms => {
                    // Only if unchanged since read: a terminate or update meanwhile wins.
                    let swapped = self.db.with(|d| {
                        d.tasks
                            .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)
                    })?;
                    if swapped.is_ok() {
                        dropped += 1;
                    }
                }
                Some(_) => {}
                None => {
                    let mut stamped = rec;
                    stamped.finished_ms = Some(now_ms);
                    let bytes = serde_json::to_vec(&stamped)?;
                    let _ = self
                        .db
                        .with(|d| d.tasks.compare_and_swap(&k, Some(&v), Some(bytes)))?;
                }
            }
        }
        Ok(dropped)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .with(|d| d.meta.get(key))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let old = self.db.with(|d| d.meta.insert(key, value.as_bytes()))?;
        if old.as_deref() != Some(value.as_bytes()) {
            self.db.commit().await?;
        }
        Ok(())
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<TaskRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        error: e.to_string(),
    })
}
