//! Durable sled stores, shared by the gateway and the agent: group commit, recovery
//! from write errors, and detection of a damaged store at start.
//!
//! **Group commit.** Writers insert, then wait until a flush that started after
//! their insert has finished. One flusher thread serves every waiter, so concurrent
//! writers share fsyncs and durability does not cap throughput at one fsync per write.
//! (sled 0.34's `flush_async` deadlocks when awaited by several tasks at once, so the
//! blocking `flush` runs on a dedicated thread instead. Its flush writes the log with
//! `sync_file_range`, which survives a crash of the process but not a power loss with
//! the device's write cache on, so each flush is followed by an `fdatasync` of the log.)
//!
//! **Write errors.** After one failed write (a full disk, say) sled 0.34 keeps the
//! error as its "global error" and fails every later write with it, for good: only a
//! new `Db` clears it. So a store that meets an I/O error reports itself unwritable
//! and a background thread waits until a probe write next to it succeeds, then drops
//! every handle and opens the store again. What the failed flush did not write is
//! gone with the old handle, which is what its waiters were told; everything that
//! was durable is read back. Callers hold handles only for the length of one
//! operation ([`Store::with`]), so the store can be swapped under them.
//!
//! **Damage.** sled recovers a damaged log by cutting it at the first bad entry, so
//! a damaged store opens silently with older data. To notice, every group commit
//! counts up a sequence number kept in the store, and the number known to be on disk
//! is mirrored into a side file (`<store>.seq`, written with fsync at most every
//! `SEQ_RECORD_INTERVAL` and on close). A store whose sequence is behind its side
//! file lost writes that had been durable; it is refused unless the caller accepts
//! the damage.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// Writers waiting for a flush at once; more wait for room in the channel.
pub const MAX_PENDING_COMMITS: usize = 16 * 1024;
/// How often a store that cannot write checks whether it can again.
pub const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// Bytes written and synced next to an unwritable store before it is opened again:
/// sled needs room for a new log segment (512 KiB) and its recovery.
pub const RECOVERY_PROBE_BYTES: usize = 1024 * 1024;
/// The side file with the durable commit sequence is written at most this often.
pub const SEQ_RECORD_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts to open a store again while the dropped handle's threads let go of it.
pub const REOPEN_ATTEMPTS: u32 = 40;
/// The smallest page cache a store may be given (`--store-cache`): below it sled
/// would read every page from disk again for each access.
pub const MIN_CACHE_BYTES: u64 = 1024 * 1024;
/// The largest: a mistyped unit should not ask for more than any machine has.
pub const MAX_CACHE_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// sled's page cache while a store is opened only to accept its damage.
const ACCEPT_CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// Pause between those attempts.
const REOPEN_PAUSE: Duration = Duration::from_millis(50);

/// The gateway's store directory inside its data directory.
pub const GATEWAY_STORE: &str = "gateway.sled";

/// Creates a daemon's data directory (and its missing parents) readable by its
/// owner only: the stores hold every task's arguments and results. A directory
/// that exists keeps its mode (an operator's choice).
pub fn create_data_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}
/// The agent's store directory inside its data directory.
pub const AGENT_STORE: &str = "agent.sled";

/// Key of the commit sequence in sled's default tree.
const SEQ_KEY: &[u8] = b"arpcp.commit_seq";

/// What went wrong with a store after it opened.
#[derive(Debug, Clone, Error)]
pub enum DurableError {
    /// Writes fail (disk full, I/O error); the store recovers by itself once a write
    /// succeeds again.
    #[error("the {store} cannot write: {reason}")]
    Unwritable { store: &'static str, reason: String },
    #[error("the {store} failed: {reason}")]
    Failed { store: &'static str, reason: String },
    #[error("the {store}'s flusher has stopped")]
    Stopped { store: &'static str },
}

/// Why a store did not open.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error(
        "the {store} {} is damaged: {what}; to start with what is readable (what was lost is \
         logged), run with --accept-damaged-store",
        path.display()
    )]
    Damaged {
        store: &'static str,
        path: PathBuf,
        what: String,
    },
    /// sled's file lock is held: another process has this store open.
    #[error(
        "another arpcp is using {}: its {store} {} is locked by a running process; stop \
         that one, or give this one another --data-dir",
        dir.display(),
        path.display()
    )]
    InUse {
        store: &'static str,
        dir: PathBuf,
        path: PathBuf,
    },
    #[error("cannot open the {store} {}: {reason}", path.display())]
    Open {
        store: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// What to do with a store found damaged at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DamagePolicy {
    /// Refuse to open it ([`OpenError::Damaged`]).
    #[default]
    Refuse,
    /// Open what is readable and log what was lost.
    Accept,
}

/// A `--store-cache` value (`32MiB`, `1GiB`, bytes), within the bounds above.
pub fn parse_cache_bytes(text: &str) -> Result<u64, String> {
    crate::size::parse(text, MIN_CACHE_BYTES, MAX_CACHE_BYTES)
}

/// A `store_cache` key of a configuration file, as [`parse_cache_bytes`] reads it.
pub fn deserialize_cache_bytes<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    crate::size::deserialize_opt(d, MIN_CACHE_BYTES, MAX_CACHE_BYTES)
}

/// Which store, where, and how it is made.
pub struct Spec<T> {
    /// Names the store in errors and logs ("task store").
    pub label: &'static str,
    pub path: PathBuf,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// Opens the trees a store works with.
    pub trees: fn(&sled::Db) -> sled::Result<T>,
}

type Waiter = oneshot::Sender<Result<(), DurableError>>;

struct Handles<T> {
    db: sled::Db,
    /// sled's log, synced after each flush (see the module doc).
    log: File,
    trees: T,
}

struct Shared<T> {
    spec: Spec<T>,
    handles: RwLock<Option<Handles<T>>>,
    /// Why writes fail now; `None` while they work.
    fault: watch::Sender<Option<String>>,
    commits: mpsc::Sender<Waiter>,
    /// The highest commit sequence known to be on disk.
    durable_seq: AtomicU64,
    /// The sequence in the side file, and when it was written.
    recorded: Mutex<(u64, Instant)>,
    /// Set for a store refused at start: it is closed without another write.
    refused: std::sync::atomic::AtomicBool,
}

/// A durable store: its trees, a group commit, recovery from write errors. Clones
/// share everything; the store closes (final flush, side file) with the last one.
pub struct Store<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Store<T> {
    fn clone(&self) -> Self {
        Store {
            shared: self.shared.clone(),
        }
    }
}

/// A store just opened, with the damage found so far; see [`Store::settle`].
pub struct Opened<T> {
    pub store: Store<T>,
    /// What is wrong with it, one entry per finding; empty for a sound store.
    pub damage: Vec<String>,
}

fn seq_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".seq");
    PathBuf::from(p)
}

fn read_seq(db: &sled::Db) -> sled::Result<u64> {
    Ok(db.get(SEQ_KEY)?.map_or(0, |v| counter_value(&v)))
}

/// A counter's stored bytes as a number; missing or not eight bytes counts as 0.
fn counter_value(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map_or(0, u64::from_be_bytes)
}

/// Counts the counter at `key` up by one, atomically, and returns its new value.
pub fn count_up(tree: &sled::Tree, key: &[u8]) -> sled::Result<u64> {
    let new = tree.update_and_fetch(key, |old| {
        Some((old.map_or(0, counter_value) + 1).to_be_bytes().to_vec())
    })?;
    Ok(new.map_or(0, |v| counter_value(&v)))
}

/// The text of an error, without sled's debug formatting of I/O errors.
fn reason(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// sled reports a store another process holds as an I/O error of its own wording.
fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn open_sled(path: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let mut attempts = 0;
    loop {
        match open_sled_once(path, cache_bytes) {
            // A handle dropped a moment ago (the damage check, a reopen) may still
            // hold sled's file lock from one of its I/O threads.
            Err(e) if attempts < REOPEN_ATTEMPTS && is_lock_held(&e) => {
                attempts += 1;
                std::thread::sleep(REOPEN_PAUSE);
            }
            other => return other,
        }
    }
}

fn open_sled_once(path: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let open = || {
        sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            // What must be durable at once goes through a group commit; the rest
            // (progress, status notes) reaches disk within a second.
            .flush_every_ms(Some(1000))
            .open()
    };
    // sled 0.34 panics on some damaged logs instead of returning an error: that is
    // damage to report, not a reason to die without saying which store and why.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        warn!(path = %path.display(), "sled failed while reading the store: {why}");
        Err(sled::Error::Corruption { at: None, bt: () })
    })
}

fn make_handles<T>(spec: &Spec<T>, db: sled::Db) -> sled::Result<Handles<T>> {
    // sled creates its log file when it opens the store.
    let log = File::open(spec.path.join("db"))?;
    let trees = (spec.trees)(&db)?;
    Ok(Handles { db, log, trees })
}

/// Writes `seq` to the side file: a new file, synced, renamed over the old one (so
/// a crash leaves the old number or the new one, never a torn file). The rename is
/// not synced: a side file that falls back to an older number only weakens the
/// check, and the directory sync would cost every group commit a journal wait.
fn write_seq_file(path: &Path, seq: u64) -> std::io::Result<()> {
    let target = seq_path(path);
    let mut tmp = target.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    writeln!(f, "{seq}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &target)
}

/// The side file's sequence: `Ok(None)` when there is none (a new store, or one
/// made before side files existed).
fn read_seq_file(path: &Path) -> Result<Option<u64>, String> {
    let p = seq_path(path);
    match std::fs::read_to_string(&p) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            format!(
                "its commit record {} holds {:?}, not a number",
                p.display(),
                text.trim()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "its commit record {} is unreadable: {e}",
            p.display()
        )),
    }
}

/// sled's recovery failing on the data (rather than, say, a lock held elsewhere).
fn is_damage(e: &sled::Error) -> bool {
    matches!(
        e,
        sled::Error::Corruption { .. }
            | sled::Error::ReportableBug(_)
            | sled::Error::Unsupported(_)
    )
}

impl<T: Send + Sync + 'static> Store<T> {
    /// Opens the store and looks for damage: sled refusing the data, or a commit
    /// sequence behind the side file. With [`DamagePolicy::Accept`], a store sled
    /// cannot read is moved aside and a new one started; other damage is left to
    /// [`Store::settle`], after the caller added what it found in the records.
    pub fn open(spec: Spec<T>, policy: DamagePolicy) -> Result<Opened<T>, OpenError> {
        let label = spec.label;
        let path = spec.path.clone();
        let open_err = |reason: String| OpenError::Open {
            store: label,
            path: path.clone(),
            reason,
        };
        let mut damage = Vec::new();
        let mut recorded = match read_seq_file(&path) {
            Ok(r) => r,
            Err(what) => {
                damage.push(what);
                None
            }
        };
        let db = match open_sled(&path, spec.cache_bytes) {
            Ok(db) => db,
            Err(e) if is_damage(&e) => {
                if policy == DamagePolicy::Refuse {
                    return Err(OpenError::Damaged {
                        store: label,
                        path,
                        what: format!("sled cannot read it: {}", reason(&e)),
                    });
                }
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = PathBuf::from(format!("{}.damaged-{stamp}", path.display()));
                std::fs::rename(&path, &aside).map_err(|m| {
                    open_err(format!("cannot move it aside to {}: {m}", aside.display()))
                })?;
                warn!(store = label, path = %path.display(), aside = %aside.display(),
                    "damaged store accepted: sled cannot read it ({}); it was moved aside and a new, empty store started: every record in it was lost",
                    reason(&e));
                // The new store starts its own sequence.
                damage.clear();
                recorded = None;
                open_sled(&path, spec.cache_bytes).map_err(|e| open_err(reason(&e)))?
            }
            Err(e) if is_lock_held(&e) => {
                return Err(OpenError::InUse {
                    store: label,
                    dir: path
                        .parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new("."))
                        .to_path_buf(),
                    path,
                })
            }
            Err(e) => return Err(open_err(reason(&e))),
        };
        let seq = read_seq(&db).map_err(|e| open_err(reason(&e)))?;
        if let Some(r) = recorded.filter(|&r| seq < r) {
            damage.push(format!(
                "its log ends at commit {seq} but commit {r} had been made durable, so \
                 writes of {} commits were lost",
                r - seq
            ));
        }
        let handles = make_handles(&spec, db).map_err(|e| open_err(reason(&e)))?;
        let (tx, rx) = mpsc::channel(MAX_PENDING_COMMITS);
        let shared = Arc::new(Shared {
            spec,
            handles: RwLock::new(Some(handles)),
            fault: watch::Sender::new(None),
            commits: tx,
            durable_seq: AtomicU64::new(seq),
            recorded: Mutex::new((recorded.unwrap_or(0), Instant::now())),
            refused: std::sync::atomic::AtomicBool::new(false),
        });
        spawn_flusher(Arc::downgrade(&shared), rx).map_err(|e| open_err(e.to_string()))?;
        spawn_keeper(Arc::downgrade(&shared)).map_err(|e| open_err(e.to_string()))?;
        Ok(Opened {
            store: Store { shared },
            damage,
        })
    }

    /// Decides about the damage found at start: none, or accepted (logged, and the
    /// side file brought in line so it is not reported again), or a refusal.
    pub fn settle(self, damage: Vec<String>, policy: DamagePolicy) -> Result<Store<T>, OpenError> {
        if damage.is_empty() {
            return Ok(self);
        }
        let spec = &self.shared.spec;
        let what = damage.join("; ");
        if policy == DamagePolicy::Refuse {
            // Left as found, for a start with the flag or a closer look.
            self.shared.refused.store(true, Ordering::SeqCst);
            return Err(OpenError::Damaged {
                store: spec.label,
                path: spec.path.clone(),
                what,
            });
        }
        warn!(store = spec.label, path = %spec.path.display(), "damaged store accepted: {what}; starting with what is readable, the rest is lost");
        let seq = self.shared.durable_seq.load(Ordering::SeqCst);
        write_seq_file(&spec.path, seq).map_err(|e| OpenError::Open {
            store: spec.label,
            path: spec.path.clone(),
            reason: format!("cannot write {}: {e}", seq_path(&spec.path).display()),
        })?;
        *lock(&self.shared.recorded) = (seq, Instant::now());
        Ok(self)
    }

    /// Runs `f` on the store's trees. A sled error becomes a [`DurableError`]; an
    /// I/O error marks the store unwritable until it recovers.
    pub fn with<R>(&self, f: impl FnOnce(&T) -> sled::Result<R>) -> Result<R, DurableError> {
        let guard = self
            .shared
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let Some(h) = guard.as_ref() else {
            return Err(self.shared.unwritable());
        };
        let out = f(&h.trees);
        drop(guard);
        out.map_err(|e| self.shared.failed(&e))
    }

    /// Returns once everything written before this call is on disk.
    pub async fn commit(&self) -> Result<(), DurableError> {
        let stopped = || DurableError::Stopped {
            store: self.shared.spec.label,
        };
        let (done, wait) = oneshot::channel();
        self.shared
            .commits
            .send(done)
            .await
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }

    /// Why the store cannot write now (`None` while it can); changes as it fails
    /// and recovers.
    pub fn faults(&self) -> watch::Receiver<Option<String>> {
        self.shared.fault.subscribe()
    }

    pub fn label(&self) -> &'static str {
        self.shared.spec.label
    }

    pub fn path(&self) -> &Path {
        &self.shared.spec.path
    }

    /// Flushes and records the commit sequence, as on a clean stop; the store stays
    /// usable.
    pub fn close(&self) {
        self.shared.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> Shared<T> {
    fn unwritable(&self) -> DurableError {
        DurableError::Unwritable {
            store: self.spec.label,
            reason: self
                .fault
                .borrow()
                .clone()
                .unwrap_or_else(|| "it is being reopened".into()),
        }
    }

    fn failed(&self, e: &sled::Error) -> DurableError {
        match e {
            sled::Error::Io(_) => {
                let why = reason(e);
                let first = self.fault.send_if_modified(|f| {
                    if f.is_none() {
                        *f = Some(why.clone());
                        true
                    } else {
                        false
                    }
                });
                if first {
                    warn!(store = self.spec.label, path = %self.spec.path.display(),
                        "the {} cannot write: {why}; refusing writes until it can again", self.spec.label);
                }
                DurableError::Unwritable {
                    store: self.spec.label,
                    reason: why,
                }
            }
            other => DurableError::Failed {
                store: self.spec.label,
                reason: reason(other),
            },
        }
    }

    /// One group commit: count up the sequence, flush, sync the log.
    fn flush(&self) -> Result<(), DurableError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let Some(h) = guard.as_ref() else {
            return Err(self.unwritable());
        };
        let step = || -> sled::Result<u64> {
            let seq = count_up(&h.db, SEQ_KEY)?;
            h.db.flush()?;
            h.log.sync_data()?;
            Ok(seq)
        };
        let out = step();
        drop(guard);
        match out {
            Ok(seq) => {
                self.durable_seq.fetch_max(seq, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Writes the durable sequence to the side file if it moved and `due`.
    fn record_seq(&self, force: bool) {
        let seq = self.durable_seq.load(Ordering::SeqCst);
        let mut rec = lock(&self.recorded);
        if seq <= rec.0 || !(force || rec.1.elapsed() >= SEQ_RECORD_INTERVAL) {
            return;
        }
        match write_seq_file(&self.spec.path, seq) {
            Ok(()) => *rec = (seq, Instant::now()),
            // Only the damage check loses precision; the next round tries again.
            Err(e) => tracing::debug!(
                store = self.spec.label,
                "cannot record the commit sequence: {e}"
            ),
        }
    }

    fn close(&self) {
        if self.refused.load(Ordering::SeqCst) {
            return;
        }
        if self.fault.borrow().is_none() && self.flush().is_err() {
            return;
        }
        self.record_seq(true);
    }

    /// Opens the store again once a probe write next to it succeeds.
    fn recover(&self) {
        let probe = {
            let mut p = self.spec.path.as_os_str().to_owned();
            p.push(".probe");
            PathBuf::from(p)
        };
        let probed = (|| -> std::io::Result<()> {
            let mut f = File::create(&probe)?;
            f.write_all(&vec![0u8; RECOVERY_PROBE_BYTES])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&probe);
        if probed.is_err() {
            return;
        }
        let mut slot = self.handles.write().unwrap_or_else(|p| p.into_inner());
        // Every handle goes before the store opens again: sled locks its files,
        // and only a new `Db` forgets the error.
        drop(slot.take());
        let reopened = open_sled(&self.spec.path, self.spec.cache_bytes)
            .and_then(|db| make_handles(&self.spec, db));
        let seq = match reopened {
            Ok(h) => {
                let seq = read_seq(&h.db);
                *slot = Some(h);
                seq
            }
            Err(e) => {
                drop(slot);
                let why = reason(&e);
                warn!(
                    store = self.spec.label,
                    "cannot open the store again yet: {why}"
                );
                self.fault.send_replace(Some(why));
                return;
            }
        };
        drop(slot);
        if let Ok(seq) = seq {
            self.durable_seq.fetch_max(seq, Ordering::SeqCst);
        }
        // Writable again only once a group commit goes through.
        match self.flush() {
            Ok(()) => {
                self.fault.send_replace(None);
                info!(store = self.spec.label, path = %self.spec.path.display(),
                    "the {} can write again", self.spec.label);
            }
            Err(e) => warn!(store = self.spec.label, "still unwritable: {e}"),
        }
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        self.close();
    }
}

fn spawn_flusher<T: Send + Sync + 'static>(
    shared: Weak<Shared<T>>,
    mut rx: mpsc::Receiver<Waiter>,
) -> std::io::Result<()> {
    let name = shared
        .upgrade()
        .map_or("store", |s| s.spec.label)
        .replace(' ', "-");
    std::thread::Builder::new()
        .name(format!("{name}-flush"))
        .spawn(move || {
            let mut batch = Vec::new();
            // Ends when the last handle (and with it the sender) is gone.
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let started = std::time::Instant::now();
                let outcome = match shared.upgrade() {
                    Some(s) => {
                        let outcome = s.flush();
                        if outcome.is_ok() {
                            crate::metrics::get().store_flushed(
                                s.spec.label,
                                batch.len(),
                                started.elapsed().as_secs_f64(),
                            );
                        }
                        outcome
                    }
                    None => return,
                };
                for waiter in batch.drain(..) {
                    let _ = waiter.send(outcome.clone());
                }
            }
        })?;
    Ok(())
}

/// Records the commit sequence and recovers from write errors, until the store goes.
fn spawn_keeper<T: Send + Sync + 'static>(shared: Weak<Shared<T>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("store-keeper".into())
        .spawn(move || loop {
            std::thread::sleep(RECOVERY_INTERVAL);
            let Some(s) = shared.upgrade() else { return };
            if s.fault.borrow().is_some() {
                s.recover();
            } else {
                s.record_seq(false);
            }
        })?;
    Ok(())
}

/// Accepts damage of the store at `path` ahead of its owner opening it: logs what
/// was lost and records the state as sound (or moves a store sled cannot read
/// aside). The agent's flag goes this way, the gateway's through its own open.
pub fn accept_damage(label: &'static str, path: &Path) -> Result<(), OpenError> {
    let opened = Store::open(
        Spec {
            label,
            path: path.to_path_buf(),
            cache_bytes: ACCEPT_CACHE_BYTES,
            trees: |_| Ok(()),
        },
        DamagePolicy::Accept,
    )?;
    let store = opened.store.settle(opened.damage, DamagePolicy::Accept)?;
    store.close();
    Ok(())
}
