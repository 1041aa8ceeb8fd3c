//! Tells waiting clients (WatchTask, GetResult with a wait) when a task changes:
//! one watch channel per watched task, created on demand and dropped when its last
//! watcher goes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::model::TaskRecord;

#[derive(Default)]
pub struct TaskWatchers {
    channels: Mutex<HashMap<String, watch::Sender<Arc<TaskRecord>>>>,
    /// The gateway stops: watchers are woken with the channel closed.
    closed: AtomicBool,
}

impl TaskWatchers {
    fn channels(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Arc<TaskRecord>>>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching. `current` must be read from the store *after* this call
    /// begins, so no change falls between the read and the subscription: the caller
    /// passes a closure that reads it.
    pub fn subscribe(
        &self,
        read_current: impl FnOnce() -> Option<TaskRecord>,
    ) -> Option<watch::Receiver<Arc<TaskRecord>>> {
        let mut channels = self.channels();
        let current = read_current()?;
        if self.closed.load(Ordering::SeqCst) {
            // The current state, and at once the end: nothing changes any more.
            return Some(watch::channel(Arc::new(current)).1);
        }
        let tx = channels
            .entry(current.task_id.clone())
            .or_insert_with(|| watch::channel(Arc::new(current.clone())).0);
        let rx = tx.subscribe();
        tx.send_if_modified(|old| {
            let newer =
                current.history.len() > old.history.len() || current.updated_ms > old.updated_ms;
            if newer {
                *old = Arc::new(current);
            }
            newer
        });
        Some(rx)
    }

    /// Whether anyone watches the task now. A change stored before a watcher comes
    /// is what that watcher reads first, so a change nobody watched when it was
    /// stored need not be published.
    pub fn is_watched(&self, task_id: &str) -> bool {
        self.channels().contains_key(task_id)
    }

    /// Announces a stored change to the task's watchers, if any (the record as
    /// given, not a copy of it).
    pub fn publish(&self, rec: Arc<TaskRecord>) {
        let mut channels = self.channels();
        if let Some(tx) = channels.get(&rec.task_id) {
            if tx.receiver_count() == 0 {
                channels.remove(&rec.task_id);
            } else {
                tx.send_replace(rec);
            }
        }
    }

    /// The gateway stops: wakes every watcher (their channel closes), so waits and
    /// streams end instead of holding the shutdown.
    pub fn close(&self) {
        let mut channels = self.channels();
        self.closed.store(true, Ordering::SeqCst);
        channels.clear();
    }

    /// Drops channels nobody watches any more.
    pub fn prune(&self) {
        self.channels().retain(|_, tx| tx.receiver_count() > 0);
    }
}
