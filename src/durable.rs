//! Group commit for sled: writers insert, then wait until a flush that started after
//! their insert has finished. One flusher thread serves every waiter, so concurrent
//! writers share fsyncs and durability does not cap throughput at one fsync per write.
//!
//! (sled 0.34's `flush_async` deadlocks when awaited by several tasks at once, so the
//! blocking `flush` runs on a dedicated thread instead. Its flush writes the log with
//! `sync_file_range`, which survives a crash of the process but not a power loss with
//! the device's write cache on, so each flush is followed by an `fdatasync` of the log.)

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// Writers waiting for a flush at once; more wait for room in the channel.
pub const MAX_PENDING_COMMITS: usize = 16 * 1024;

#[derive(Debug, Clone, Error)]
pub enum CommitError {
    #[error("flushing the store to disk failed: {0}")]
    Flush(String),
    #[error("the store's flusher has stopped")]
    Stopped,
}

/// A handle to the flusher thread of one sled database.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<oneshot::Sender<Result<(), CommitError>>>,
}

impl GroupCommit {
    /// Starts the flusher thread; it ends when every handle is dropped.
    pub fn start(db: sled::Db, path: &std::path::Path, name: &str) -> std::io::Result<Self> {
        // sled 0.34 writes its log with sync_file_range, which does not flush the
        // device's write cache; an fdatasync of the log file after each flush does.
        let log = std::fs::File::open(path.join("db"))?;
        let (tx, mut rx) =
            mpsc::channel::<oneshot::Sender<Result<(), CommitError>>>(MAX_PENDING_COMMITS);
        std::thread::Builder::new()
            .name(format!("{name}-flush"))
            .spawn(move || {
                let mut batch = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let outcome = db
                        .flush()
                        .map(|_| ())
                        .map_err(|e| CommitError::Flush(e.to_string()))
                        .and_then(|()| {
                            log.sync_data()
                                .map_err(|e| CommitError::Flush(e.to_string()))
                        });
                    for waiter in batch.drain(..) {
                        let _ = waiter.send(outcome.clone());
                    }
                }
            })?;
        Ok(GroupCommit { tx })
    }

    /// Returns once everything written before this call is on disk.
    pub async fn commit(&self) -> Result<(), CommitError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(done).await.map_err(|_| CommitError::Stopped)?;
        wait.await.map_err(|_| CommitError::Stopped)?
    }
}

/// Opens a sled database with a bounded page cache.
pub fn open_db(path: &std::path::Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        // What must be durable at once goes through a group commit; the rest
        // (progress, status notes) reaches disk within a second.
        .flush_every_ms(Some(1000))
        .open()
}
