//! The agent's durable task store (sled). A task is written before the agent answers
//! ATASK and stays until the controller terminates it, so a finished result survives
//! a crash and a controller that was briefly away.

use std::ops::ControlFlow;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::arpcp::{Args, AtaskStatus, TaskError};
use crate::durable::{DamagePolicy, Spec, Store, AGENT_STORE};
pub use crate::store::StoreError;
use crate::store::{Edit, Json, Records, Text};

/// sled's page cache for the agent's store unless `--store-cache` says otherwise: it
/// holds the records of the tasks on the agent (a few per slot) and those waiting to
/// be collected.
pub const DEFAULT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

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
/// (see `durable.rs`): every access goes through it.
#[derive(Clone)]
pub struct AgentStore {
    db: Store<Trees>,
    tasks: Records<Trees, Json<TaskRecord>>,
    meta: Records<Trees, Text>,
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
    /// `cache_bytes` is sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<AgentStore, StoreError> {
        let opened = Store::open(
            Spec {
                label: "task store",
                path: dir.join(AGENT_STORE),
                cache_bytes,
                trees,
            },
            DamagePolicy::Refuse,
        )?;
        let db = opened.store.settle(opened.damage, DamagePolicy::Refuse)?;
        let tasks = Records::new(db.clone(), "tasks", |t: &Trees| &t.tasks);
        let meta = Records::new(db.clone(), "meta", |t: &Trees| &t.meta);
        let fresh = uuid::Uuid::new_v4().to_string();
        let id = match meta.insert_new("store_id", &fresh)? {
            None => {
                db.close();
                fresh
            }
            Some(id) => id,
        };
        Ok(AgentStore {
            db,
            tasks,
            meta,
            id: id.into(),
        })
    }

    /// The store's id (stable across restarts).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Inserts `rec` unless its id exists, atomically; not yet durable (see
    /// [`AgentStore::commit`]). A synchronous step, so a caller can pair it with
    /// other bookkeeping that no cancelled future can split.
    pub fn insert_new(&self, rec: &TaskRecord) -> Result<Inserted, StoreError> {
        Ok(match self.tasks.insert_new(&rec.atask_id, rec)? {
            None => Inserted::New,
            Some(existing) => Inserted::Existing(existing),
        })
    }

    /// Waits until every write made before the call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        Ok(self.db.commit().await?)
    }

    pub fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.tasks.get(id)
    }

    /// Changes a stored task (if it still exists) and, with `durable`, waits for disk.
    /// Returns the new record, or `None` when the task was terminated meanwhile. On
    /// an error the stored task is left as it was.
    pub async fn update(
        &self,
        id: &str,
        durable: bool,
        change: impl Fn(&mut TaskRecord),
    ) -> Result<Option<TaskRecord>, StoreError> {
        let out = self.tasks.update(id, |rec| {
            change(rec);
            true
        })?;
        if durable && out.is_some() {
            self.db.commit().await?;
        }
        Ok(out.map(|(rec, _)| rec))
    }

    /// Deletes a task; true if it existed.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        self.tasks.remove(id)
    }

    /// Every stored task; unreadable records are reported, not skipped silently.
    pub fn all(&self) -> Vec<Result<TaskRecord, StoreError>> {
        let mut out = Vec::new();
        let scanned = self.tasks.scan(|_, rec| {
            out.push(rec);
            ControlFlow::<()>::Continue(())
        });
        match scanned {
            Ok(_) => out,
            Err(e) => vec![Err(e)],
        }
    }

    /// Drops finished tasks that ended before `cutoff_ms`, and stamps finished tasks
    /// stored without an end time (by an older version) with `now_ms`. Returns how
    /// many were dropped. Unfinished tasks are never dropped.
    pub fn drop_finished_before(&self, cutoff_ms: u64, now_ms: u64) -> Result<usize, StoreError> {
        let mut dropped = 0;
        for k in self.tasks.keys()? {
            // Decided on the record as it is at the swap: a terminate or update
            // meanwhile wins.
            let edited = self.tasks.edit(&k, |rec| {
                if !rec.state.is_final() {
                    return Edit::Keep;
                }
                match rec.finished_ms {
                    Some(at) if at < cutoff_ms => Edit::Remove,
                    Some(_) => Edit::Keep,
                    None => {
                        rec.finished_ms = Some(now_ms);
                        Edit::Write
                    }
                }
            });
            match edited {
                Ok(Some((_, Edit::Remove))) => dropped += 1,
                Ok(_) => {}
                // Reported by `all` at start; retention leaves it alone.
                Err(StoreError::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(dropped)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.meta.get(key)
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        if self.meta.put(key, &value.to_string())? {
            self.db.commit().await?;
        }
        Ok(())
    }
}
