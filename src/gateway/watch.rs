//! Tells waiting clients (WatchTask, GetResult with a wait) when a task changes:
//! one watch channel per watched task, created on demand and dropped when its last
//! watcher goes — at once, since each channel holds a copy of its task, and under
//! load the copies of tasks waited on a moment ago would otherwise be most of the
//! gateway's memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::model::{TaskRecord, TaskStatus};

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
        self: &Arc<Self>,
        read_current: impl FnOnce() -> Option<TaskRecord>,
    ) -> Option<TaskWatch> {
        let mut channels = self.channels();
        let current = read_current()?;
        // Done, failed and refused tasks never change again (an interrupted one may
        // still get its result); after close nothing changes any more: the current
        // state, and at once the end.
        let settled = matches!(
            current.status,
            TaskStatus::Done | TaskStatus::Failed | TaskStatus::ClientError
        );
        if settled || self.closed.load(Ordering::SeqCst) {
            return Some(TaskWatch {
                rx: watch::channel(Arc::new(current)).1,
                registered: None,
            });
        }
        let id = current.task_id.clone();
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
        Some(TaskWatch {
            rx,
            registered: Some((self.clone(), id)),
        })
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

    /// How many tasks are watched.
    pub fn watched(&self) -> usize {
        self.channels().len()
    }

    /// Drops channels nobody watches any more.
    pub fn prune(&self) {
        self.channels().retain(|_, tx| tx.receiver_count() > 0);
    }
}

/// A watcher's end of a task's channel (read it as a `watch::Receiver`); the last one
/// to go takes the channel with it.
pub struct TaskWatch {
    rx: watch::Receiver<Arc<TaskRecord>>,
    /// Where the channel is kept, and under which task; `None` for a channel of its
    /// own (a task that will not change).
    registered: Option<(Arc<TaskWatchers>, String)>,
}

impl std::ops::Deref for TaskWatch {
    type Target = watch::Receiver<Arc<TaskRecord>>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl std::ops::DerefMut for TaskWatch {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

impl Drop for TaskWatch {
    fn drop(&mut self) {
        let Some((watchers, id)) = self.registered.take() else {
            return;
        };
        let mut channels = watchers.channels();
        // While this receiver lives its channel is not removed (publish and prune
        // remove only channels nobody receives from; close clears all), so a channel
        // under this id is this one; with one receiver, that receiver is this.
        if channels.get(&id).is_some_and(|tx| tx.receiver_count() <= 1) {
            channels.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(status: TaskStatus) -> TaskRecord {
        let mut t = TaskRecord::new("t1".into(), "add".into(), Default::default(), None);
        t.status = status;
        t
    }

    #[test]
    fn the_last_watcher_takes_the_channel() {
        let w = Arc::new(TaskWatchers::default());
        let a = w.subscribe(|| Some(task(TaskStatus::Running))).unwrap();
        let b = w.subscribe(|| Some(task(TaskStatus::Running))).unwrap();
        assert!(w.is_watched("t1"));
        drop(a);
        assert!(w.is_watched("t1"), "one watcher is left");
        drop(b);
        assert_eq!(w.watched(), 0);
        // A task that will not change needs no channel kept.
        let done = w.subscribe(|| Some(task(TaskStatus::Done))).unwrap();
        assert_eq!(done.borrow().status, TaskStatus::Done);
        assert_eq!(w.watched(), 0);
        // An interrupted task may still get its result: watched.
        let _late = w.subscribe(|| Some(task(TaskStatus::Interrupted))).unwrap();
        assert!(w.is_watched("t1"));
    }
}
