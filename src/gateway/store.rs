//! The gateway's durable state in sled: tasks (keyed by time-ordered id, so key
//! order is creation order), an index of the finished ones, agents and their
//! identities, and counters. Writes that a client was promised are made durable by
//! a group commit shared with concurrent writers; other changes reach disk within
//! sled's flush interval, and every one of those can be redone from the agents
//! after a crash.
//!
//! The sled handles live in a [`Store`] that reopens itself after a write error
//! (see `durable.rs`), so every access goes through [`Store::with`] and no method
//! keeps a tree or an iterator past its return.
//!
//! ## The index, and why it takes no transaction
//!
//! A finished task has index entries by procedure, agent and status (not `done`:
//! see `encoding.rs`); an unfinished one has none and is kept in memory instead
//! ([`Live`]): there are at most `MAX_OPEN_TASKS` of them, they change several
//! times each, and the store's open reads every record anyway. So a task costs
//! one write per change plus its entries once, when it finishes.
//!
//! The entries are written before the record that needs them, so a finished
//! record has its entries also after a crash between the two; what a crash can
//! leave is an entry whose record is not there or does not match it, and the
//! listings check every record they return against the filter. Retention removes
//! the entries, then the record: a crash between leaves the oldest record without
//! entries, and the next pass, walking from the oldest, removes it first.
//! sled's transactions and batches would make the pair atomic, but the first one
//! in a process moves every later read and write of every tree onto a
//! process-wide lock (sled 0.34's concurrency control): it halved the throughput.

use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use super::encoding::{self, IdKey, Indexed};
use super::model::{AgentRecord, TaskRecord, TaskStatus};
use crate::durable::{count_up, DamagePolicy, Spec, Store, GATEWAY_STORE};
pub use crate::store::StoreError;
use crate::store::{Json, Records, Text};

/// sled's page cache for the gateway's store unless `--store-cache` says otherwise:
/// it holds the unfinished tasks' records and the newest pages of the records and
/// the index; the rest of a big store is read through the kernel's page cache,
/// which the machine shares with everything else. sled counts pages by their size
/// on disk, and they take several times that in memory: 16 MiB here held about
/// 35 MiB more than 4 MiB in a million-task fill, with the same throughput and
/// listings.
pub const DEFAULT_CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Tasks one retention pass removes at most; more wait for the next pass.
pub const MAX_RETENTION_BATCH: usize = 10_000;
/// Records one listing call reads at most (filters that match few tasks
/// without an index: `done` in a store of failures); the page then ends early.
pub const MAX_LISTING_READS: usize = 50_000;
/// Tasks retention reads before removing them: what it holds at once.
const RETENTION_CHUNK: usize = 1_000;

/// Tasks migrated from format 1 in one step: an interrupted migration redoes at
/// most this much work, and loses or doubles no task.
pub const MIGRATION_CHUNK: usize = 1024;
/// A migration logs its progress this often.
const MIGRATION_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the format of the task records is kept in `meta`.
const FORMAT_KEY: &[u8] = b"tasks.format";

/// Which tasks a listing wants.
#[derive(Debug, Default, Clone)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub agent_id: Option<String>,
    pub procedure: Option<String>,
}

impl TaskFilter {
    fn matches(&self, t: &Indexed) -> bool {
        self.status.is_none_or(|s| s == t.status)
            && self
                .agent_id
                .as_ref()
                .is_none_or(|a| t.agent_id.as_ref() == Some(a))
            && self.procedure.as_ref().is_none_or(|p| &t.procedure == p)
    }

    /// How the finished tasks that match are found: no filter, or only the status
    /// `done`, reads the records; a status of unfinished tasks finds none; else
    /// the index ranges whose common tasks they are.
    fn finished_walk(&self) -> FinishedWalk {
        if self.status.is_some_and(|s| !s.is_final()) {
            return FinishedWalk::None;
        }
        let mut p = Vec::new();
        if let Some(a) = &self.agent_id {
            p.push(encoding::agent_prefix(a));
        }
        if let Some(s) = self.status.filter(|s| encoding::status_indexed(*s)) {
            p.push(encoding::status_prefix(s));
        }
        if let Some(n) = &self.procedure {
            p.push(encoding::procedure_prefix(n));
        }
        if p.is_empty() {
            FinishedWalk::Records
        } else {
            FinishedWalk::Index(p)
        }
    }

    /// Whether unfinished tasks must be looked for apart from the finished walk.
    fn wants_unfinished(&self, walk: &FinishedWalk) -> bool {
        !matches!(walk, FinishedWalk::Records) && self.status.is_none_or(|s| !s.is_final())
    }
}

enum FinishedWalk {
    /// Every record, newest first (it holds the unfinished tasks too).
    Records,
    Index(Vec<Vec<u8>>),
    None,
}

/// What the store keeps in memory of its tasks: the unfinished ones, with what
/// the filters ask, and how many finished ones there are (for retention's count).
/// Rebuilt from the records at every open.
#[derive(Default)]
struct Live {
    open: Mutex<BTreeMap<IdKey, Indexed>>,
    finished: AtomicU64,
}

impl Live {
    fn open(&self) -> MutexGuard<'_, BTreeMap<IdKey, Indexed>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that the task of `key` is now `t`, having been `was` (`None`: absent
    /// or unreadable).
    fn note(&self, key: IdKey, was: Option<bool>, t: Option<&Indexed>) {
        let was_final = was == Some(true);
        let is_final = t.is_some_and(|t| t.status.is_final());
        match t {
            Some(t) if !t.status.is_final() => {
                self.open().insert(key, t.clone());
            }
            _ => {
                self.open().remove(&key);
            }
        }
        if is_final && !was_final {
            self.finished.fetch_add(1, Ordering::Relaxed);
        } else if was_final && !is_final {
            let _ = self
                .finished
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
        }
    }
}

struct Trees {
    /// Format 1: JSON records under the id as text. Empty once migrated.
    legacy: sled::Tree,
    /// Format 2: id (16 bytes) → record (see `encoding.rs`).
    records: sled::Tree,
    /// Index entries of the finished tasks (see the module's comment).
    index: sled::Tree,
    agents: sled::Tree,
    /// MAC|port → agent id.
    identities: sled::Tree,
    meta: sled::Tree,
}

fn trees(db: &sled::Db) -> sled::Result<Trees> {
    Ok(Trees {
        legacy: db.open_tree("tasks")?,
        records: db.open_tree("task_records")?,
        index: db.open_tree("task_index")?,
        agents: db.open_tree("agents")?,
        identities: db.open_tree("identities")?,
        meta: db.open_tree("meta")?,
    })
}

/// How many tasks a migration moved and left.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub moved: usize,
    /// Records with an id the gateway never makes (not a UUID), left where they
    /// were, as the scheduler leaves such tasks.
    pub left: usize,
}

#[derive(Clone)]
pub struct GatewayStore {
    db: Store<Trees>,
    live: Arc<Live>,
    legacy: Records<Trees, Json<TaskRecord>>,
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
    /// records dropped. A store of format 1 is migrated to format 2 first.
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
        let store = GatewayStore::with_records(opened.store, Arc::default());
        let drop_bad = policy == DamagePolicy::Accept;
        let (bad_legacy, unreadable_legacy) = store.legacy.audit(drop_bad)?;
        let (bad_tasks, unreadable_tasks) = store.load_tasks(drop_bad)?;
        let (bad_agents, unreadable_agents) = store.agents.audit(drop_bad)?;
        let bad = bad_legacy + bad_tasks + bad_agents;
        let entries = unreadable_legacy + unreadable_tasks + unreadable_agents;
        if bad > 0 || entries > 0 {
            damage.push(format!(
                "{bad} records do not decode and {entries} entries cannot be read"
            ));
        }
        let store = GatewayStore::with_records(store.db.settle(damage, policy)?, store.live);
        store.migrate()?;
        Ok(store)
    }

    fn with_records(db: Store<Trees>, live: Arc<Live>) -> GatewayStore {
        GatewayStore {
            legacy: Records::new(db.clone(), "tasks", |t| &t.legacy),
            agents: Records::new(db.clone(), "agents", |t| &t.agents),
            identities: Records::new(db.clone(), "identities", |t| &t.identities),
            live,
            db,
        }
    }

    fn corrupt(&self, key: &[u8], reason: String) -> StoreError {
        StoreError::Corrupt {
            store: self.db.label(),
            tree: "task_records",
            key: encoding::id_text(key).unwrap_or_else(|| format!("{key:02x?}")),
            reason,
        }
    }

    fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<TaskRecord, StoreError> {
        let id = encoding::id_text(key)
            .ok_or_else(|| self.corrupt(key, "the key is not a task id".into()))?;
        encoding::decode(id, bytes).map_err(|reason| self.corrupt(key, reason))
    }

    fn encode(&self, t: &TaskRecord) -> Result<(IdKey, Vec<u8>), StoreError> {
        let refuse = |reason: String| StoreError::Encode {
            store: self.db.label(),
            tree: "task_records",
            key: t.task_id.clone(),
            reason,
        };
        let key = encoding::id_key(&t.task_id)
            .ok_or_else(|| refuse("the task id is not a UUID in canonical form".into()))?;
        Ok((key, encoding::encode(t).map_err(refuse)?))
    }

    /// Reads every record once: notes the unfinished tasks and counts the
    /// finished ones ([`Live`]); counts the records that do not decode and the
    /// entries sled cannot read and, with `drop_bad`, removes those records (their
    /// index entries, if any, are skipped by the listings, which check every
    /// record).
    fn load_tasks(&self, drop_bad: bool) -> Result<(usize, usize), StoreError> {
        let (bad, unreadable) = self.db.with(|t| {
            let (mut bad, mut unreadable) = (Vec::new(), 0);
            for kv in t.records.iter() {
                let Ok((k, v)) = kv else {
                    unreadable += 1;
                    continue;
                };
                let key = <IdKey>::try_from(k.as_ref()).ok();
                match (key, self.decode(&k, &v)) {
                    (Some(key), Ok(rec)) => {
                        self.live.note(key, None, Some(&Indexed::of(&rec)));
                    }
                    _ => bad.push(k),
                }
            }
            Ok((bad, unreadable))
        })?;
        if drop_bad {
            for k in &bad {
                warn!(store = self.db.label(), tree = "task_records",
                    key = %encoding::id_text(k).unwrap_or_default(),
                    "damaged store: dropping a record that does not decode");
                self.db.with(|t| t.records.remove(k))?;
            }
        }
        Ok((bad.len(), unreadable))
    }

    /// Moves format-1 records (JSON under the id as text) into format 2, a chunk
    /// at a time: the chunk's index entries, then its records, then the removal of
    /// their old copies. A migration cut short (a crash, `kill -9`) goes on from
    /// where it stopped, and none is lost or doubled: a format-2 copy is only
    /// written after its entries, and once there it is the one kept. Once done,
    /// `meta` says so and no later start looks again beyond an empty tree.
    fn migrate(&self) -> Result<Migrated, StoreError> {
        let mut done = Migrated::default();
        let pending = self.db.with(|t| Ok(t.legacy.first()?.is_some()))?;
        if !pending {
            self.mark_format()?;
            return Ok(done);
        }
        let started = std::time::Instant::now();
        info!("migrating the task store from format 1 (JSON) to format 2");
        let mut after: Option<sled::IVec> = None;
        let mut logged = started;
        loop {
            let chunk: Vec<(sled::IVec, sled::IVec)> = self.db.with(|t| {
                let iter = match &after {
                    Some(a) => t
                        .legacy
                        .range::<&[u8], _>((Bound::Excluded(a.as_ref()), Bound::Unbounded)),
                    None => t.legacy.iter(),
                };
                iter.take(MIGRATION_CHUNK).collect()
            })?;
            let Some((last, _)) = chunk.last() else { break };
            after = Some(last.clone());
            let mut moves = Vec::with_capacity(chunk.len());
            for (k, v) in &chunk {
                let rec = match serde_json::from_slice::<TaskRecord>(v) {
                    Ok(rec) => rec,
                    Err(e) => {
                        // The audit found none, or the store was refused.
                        warn!(key = %String::from_utf8_lossy(k), "a format-1 task that does not decode is left as it is: {e}");
                        done.left += 1;
                        continue;
                    }
                };
                let key = String::from_utf8_lossy(k);
                if rec.task_id != key {
                    warn!(key = %key, task_id = %rec.task_id, "a format-1 task stored under another id is left as it is");
                    done.left += 1;
                    continue;
                }
                match self.encode(&rec) {
                    Ok((id, bytes)) => moves.push((k.clone(), id, Indexed::of(&rec), bytes)),
                    Err(e) => {
                        warn!("a format-1 task is left as it is: {e}");
                        done.left += 1;
                    }
                }
            }
            let fresh = self.db.with(|t| {
                let mut fresh = Vec::with_capacity(moves.len());
                for (_, id, fields, _) in &moves {
                    // A copy already in format 2 is the newer one, with its entries
                    // (and was noted when the store opened).
                    let there = t.records.contains_key(id)?;
                    if !there {
                        for k in encoding::index_keys(id, fields) {
                            t.index.insert(k, &[])?;
                        }
                    }
                    fresh.push(!there);
                }
                for ((_, id, _, bytes), fresh) in moves.iter().zip(&fresh) {
                    if *fresh {
                        t.records.insert(id, bytes.as_slice())?;
                    }
                }
                for (old_key, ..) in &moves {
                    t.legacy.remove(old_key)?;
                }
                Ok(fresh)
            })?;
            for ((_, id, fields, _), fresh) in moves.iter().zip(&fresh) {
                if *fresh {
                    self.live.note(*id, None, Some(fields));
                }
            }
            done.moved += moves.len();
            if logged.elapsed() >= MIGRATION_LOG_INTERVAL {
                logged = std::time::Instant::now();
                info!(moved = done.moved, "migrating the task store");
            }
        }
        self.mark_format()?;
        // Made durable now rather than within sled's flush interval.
        self.db.close();
        info!(
            moved = done.moved,
            left = done.left,
            ms = started.elapsed().as_millis() as u64,
            "migrated the task store to format 2"
        );
        Ok(done)
    }

    fn mark_format(&self) -> Result<(), StoreError> {
        let format = [encoding::FORMAT];
        self.db.with(|t| {
            if t.meta.get(FORMAT_KEY)?.as_deref() != Some(&format[..]) {
                t.meta.insert(FORMAT_KEY, &format[..])?;
            }
            Ok(())
        })?;
        Ok(())
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

    /// Stores a task without waiting for disk (a later commit covers it): its
    /// index entries first when it has finished, then the record.
    pub fn put_task(&self, t: &TaskRecord) -> Result<(), StoreError> {
        let (key, bytes) = self.encode(t)?;
        let fields = Indexed::of(t);
        // What the task was: an unfinished one is in memory and has no entries;
        // otherwise it is read (a new task is not there at all).
        let (old_keys, was_final) = if self.live.open().contains_key(&key) {
            (Vec::new(), Some(false))
        } else {
            match self.peek_key(&key)? {
                Some(o) => (encoding::index_keys(&key, &o), Some(o.status.is_final())),
                None => (Vec::new(), None),
            }
        };
        let new_keys = encoding::index_keys(&key, &fields);
        self.db.with(|tr| {
            for k in new_keys.iter().filter(|k| !old_keys.contains(k)) {
                tr.index.insert(k.as_slice(), &[])?;
            }
            tr.records.insert(key, bytes.as_slice())?;
            for k in old_keys.iter().filter(|k| !new_keys.contains(k)) {
                tr.index.remove(k.as_slice())?;
            }
            Ok(())
        })?;
        self.live.note(key, was_final, Some(&fields));
        Ok(())
    }

    /// The indexed fields of the stored record of `key`; `None` when there is none
    /// or it does not decode.
    fn peek_key(&self, key: &IdKey) -> Result<Option<Indexed>, StoreError> {
        Ok(self
            .db
            .with(|t| t.records.get(key))?
            .and_then(|v| encoding::peek(&v).ok()))
    }

    pub fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        match encoding::id_key(id) {
            Some(key) => self.get_key(&key),
            None => Ok(None),
        }
    }

    fn get_key(&self, key: &IdKey) -> Result<Option<TaskRecord>, StoreError> {
        self.db
            .with(|t| t.records.get(key))?
            .map(|v| self.decode(key, &v))
            .transpose()
    }

    /// The tasks not finished (queued, dispatched, running), oldest first: what
    /// start-up needs, at a cost that does not grow with the finished ones.
    pub fn unfinished_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let keys: Vec<IdKey> = self.live.open().keys().copied().collect();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            match self.get_key(&key) {
                Ok(Some(t)) if !t.status.is_final() => out.push(t),
                Ok(_) => {}
                Err(e) => warn!("{e}"),
            }
        }
        Ok(out)
    }

    /// How many finished tasks the store holds.
    pub fn finished_count(&self) -> u64 {
        self.live.finished.load(Ordering::Relaxed)
    }

    /// Newest first, from before `after` (a previous page's token): at most `limit`
    /// tasks, each made an item by `convert`, which also says its size in bytes;
    /// the page ends before the sizes pass `max_bytes`, but holds at least one
    /// task. Returns the page and the token of the next one, `None` at the end. A
    /// listing reads at most `MAX_LISTING_READS` records; a page cut short by that
    /// (even an empty one) has a token too. A record that does not decode is left
    /// out (and logged), so that no stored task can make the listing fail.
    ///
    /// A filtered listing merges two walks back from `after`: the finished tasks
    /// held by every index range of the filter (each range stepped to the newest
    /// id not newer than the others'), and the unfinished ones in memory. Its cost
    /// follows the page, not the store; a value no task has costs a lookup. Only
    /// `done`, which has no index, reads the records until it has a page.
    pub fn list_tasks<T>(
        &self,
        filter: &TaskFilter,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        mut convert: impl FnMut(&TaskRecord) -> (T, usize),
    ) -> Result<(Vec<T>, Option<String>), StoreError> {
        let mut upper: Option<IdKey> = match after {
            Some(a) => match uuid::Uuid::try_parse(a) {
                Ok(u) => Some(*u.as_bytes()),
                Err(_) => return Ok((Vec::new(), None)),
            },
            None => None,
        };
        let walk = filter.finished_walk();
        // The next candidate of each walk, refilled once taken.
        let (mut finished, mut open): (Option<IdKey>, Option<IdKey>) = (None, None);
        let mut finished_done = matches!(walk, FinishedWalk::None);
        let mut open_done = !filter.wants_unfinished(&walk);
        let mut page = Vec::new();
        let (mut bytes, mut reads) = (0usize, 0usize);
        let more = self.db.with(|t| loop {
            if finished.is_none() && !finished_done {
                finished = match &walk {
                    FinishedWalk::Index(r) => newest_common_before(&t.index, r, upper.as_ref())?,
                    FinishedWalk::Records => newest_record_before(&t.records, upper.as_ref())?,
                    FinishedWalk::None => None,
                };
                finished_done = finished.is_none();
            }
            if open.is_none() && !open_done {
                open = self.newest_open_before(filter, upper.as_ref());
                open_done = open.is_none();
            }
            let key = match (finished, open) {
                (None, None) => return Ok(false),
                (Some(f), Some(o)) => f.max(o),
                (Some(k), None) | (None, Some(k)) => k,
            };
            if reads == MAX_LISTING_READS {
                return Ok(true);
            }
            reads += 1;
            // Both walks may hold the same task (one finishing now): taken once.
            if finished == Some(key) {
                finished = None;
            }
            if open == Some(key) {
                open = None;
            }
            let last = upper.replace(key);
            let Some(value) = t.records.get(key)? else {
                continue; // An entry whose record is gone.
            };
            let matches = encoding::peek(&value).is_ok_and(|f| filter.matches(&f));
            if !matches {
                continue;
            }
            let task = match self.decode(&key, &value) {
                Ok(task) => task,
                Err(e) => {
                    warn!("listing tasks: {e}");
                    continue;
                }
            };
            // A task not taken is where the next page starts.
            if page.len() == limit {
                upper = last;
                return Ok(true);
            }
            let (item, size) = convert(&task);
            if !page.is_empty() && bytes.saturating_add(size) > max_bytes {
                upper = last;
                return Ok(true);
            }
            bytes = bytes.saturating_add(size);
            page.push(item);
        })?;
        let next = upper.filter(|_| more).and_then(|k| encoding::id_text(&k));
        Ok((page, next))
    }

    /// The newest unfinished task below `upper` that the filter matches, as last
    /// noted (the caller checks the record).
    fn newest_open_before(&self, filter: &TaskFilter, upper: Option<&IdKey>) -> Option<IdKey> {
        let open = self.live.open();
        let below = match upper {
            Some(u) => open.range(..*u),
            None => open.range::<IdKey, _>(..),
        };
        below
            .rev()
            .find(|(_, f)| filter.matches(f))
            .map(|(k, _)| *k)
    }

    /// Drops finished tasks older than `max_age_ms`, then the oldest finished ones
    /// beyond `max_count`, at most `MAX_RETENTION_BATCH` a call (the rest go at the
    /// next). Unfinished tasks are never dropped. Returns how many went.
    ///
    /// Walks the records from the oldest and stops once past both rules: when
    /// the count is down to `max_count` and the tasks were created after
    /// `max_age_ms` ago (none of those can have finished that long ago). So a pass
    /// reads what it drops, the unfinished tasks among them, and the finished
    /// ones created before the age limit that finished after it.
    pub fn apply_retention(
        &self,
        now_ms: u64,
        max_age_ms: u64,
        max_count: usize,
    ) -> Result<usize, StoreError> {
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let mut excess = self.finished_count().saturating_sub(max_count as u64);
        let mut removed = 0usize;
        let mut after: Option<IdKey> = None;
        while removed < MAX_RETENTION_BATCH {
            let want = RETENTION_CHUNK.min(MAX_RETENTION_BATCH - removed);
            let mut doomed: Vec<(IdKey, sled::IVec, Indexed)> = Vec::new();
            let mut walked_to_end = true;
            self.db.with(|t| {
                let iter = match &after {
                    Some(a) => t.records.range((Bound::Excluded(*a), Bound::Unbounded)),
                    None => t.records.iter(),
                };
                for kv in iter {
                    let (k, v) = kv?;
                    let Ok(key) = <IdKey>::try_from(k.as_ref()) else {
                        continue;
                    };
                    after = Some(key);
                    if excess == 0 && encoding::created_ms(&key).is_some_and(|c| c > cutoff) {
                        break;
                    }
                    if self.live.open().contains_key(&key) {
                        continue;
                    }
                    let Ok(fields) = encoding::peek(&v) else {
                        continue;
                    };
                    if !fields.status.is_final() {
                        continue;
                    }
                    let expired = fields
                        .finished_ms
                        .is_some_and(|at| now_ms.saturating_sub(at) > max_age_ms);
                    if excess > 0 || expired {
                        excess = excess.saturating_sub(1);
                        doomed.push((key, v, fields));
                        if doomed.len() == want {
                            walked_to_end = false;
                            break;
                        }
                    }
                }
                Ok(())
            })?;
            for (key, bytes, fields) in &doomed {
                if self.remove_finished(key, bytes, fields)? {
                    removed += 1;
                }
            }
            if walked_to_end {
                break;
            }
        }
        Ok(removed)
    }

    /// Removes a finished task as read (`bytes`): its index entries, then the
    /// record unless it changed meanwhile. A crash in between leaves a record with
    /// no entries, which the next pass, walking from the oldest, removes first.
    fn remove_finished(
        &self,
        key: &IdKey,
        bytes: &sled::IVec,
        fields: &Indexed,
    ) -> Result<bool, StoreError> {
        let gone = self.db.with(|t| {
            for k in encoding::index_keys(key, fields) {
                t.index.remove(k)?;
            }
            Ok(t.records
                .compare_and_swap(key, Some(bytes), None as Option<&[u8]>)?
                .is_ok())
        })?;
        if gone {
            self.live.note(*key, Some(true), None);
        }
        Ok(gone)
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

/// The newest record with an id below `upper` (or the newest of all).
fn newest_record_before(
    records: &sled::Tree,
    upper: Option<&IdKey>,
) -> sled::Result<Option<IdKey>> {
    let last = match upper {
        Some(u) => records.range(..u.as_slice()).next_back(),
        None => records.iter().next_back(),
    };
    Ok(match last.transpose()? {
        Some((k, _)) => <IdKey>::try_from(k.as_ref()).ok(),
        None => None,
    })
}

/// The newest id in `prefix`'s index range that is at most `at` (`inclusive`) or
/// below it.
fn newest_in(
    index: &sled::Tree,
    prefix: &[u8],
    at: Option<&IdKey>,
    inclusive: bool,
) -> sled::Result<Option<IdKey>> {
    let last = match at {
        Some(id) => {
            let mut end = prefix.to_vec();
            end.extend_from_slice(id);
            if inclusive {
                index.range(prefix.to_vec()..=end).next_back()
            } else {
                index.range(prefix.to_vec()..end).next_back()
            }
        }
        None => index.scan_prefix(prefix).next_back(),
    };
    Ok(match last.transpose()? {
        Some((k, _)) => k
            .get(prefix.len()..)
            .and_then(|id| <IdKey>::try_from(id).ok()),
        None => None,
    })
}

/// The newest id below `upper` held by every index range in `prefixes`.
fn newest_common_before(
    index: &sled::Tree,
    prefixes: &[Vec<u8>],
    upper: Option<&IdKey>,
) -> sled::Result<Option<IdKey>> {
    let Some(first) = prefixes.first() else {
        return Ok(None);
    };
    let Some(mut candidate) = newest_in(index, first, upper, false)? else {
        return Ok(None);
    };
    // Ends: the candidate only moves down, and each range holds finitely many ids.
    'align: loop {
        for p in prefixes {
            match newest_in(index, p, Some(&candidate), true)? {
                None => return Ok(None),
                Some(id) if id < candidate => {
                    candidate = id;
                    continue 'align;
                }
                Some(_) => {}
            }
        }
        return Ok(Some(candidate));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task id as the gateway makes them (UUID v7), created at `ms`.
    fn id_at(ms: u64, n: u32) -> String {
        // The last bytes: none of their bits is the version's or the variant's.
        let mut rest = [0u8; 10];
        rest[6..].copy_from_slice(&n.to_be_bytes());
        uuid::Builder::from_unix_timestamp_millis(ms, &rest)
            .into_uuid()
            .to_string()
    }

    fn finished(id: String, at: u64) -> TaskRecord {
        let mut t = TaskRecord::new(id, "add".into(), Default::default(), None);
        t.created_ms = at;
        t.agent_id = Some("agent-1".into());
        t.set_status(TaskStatus::Done, None, at);
        t
    }

    #[test]
    fn retention_drops_the_oldest_in_batches() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = GatewayStore::open(dir.path()).expect("a store");
        let total = MAX_RETENTION_BATCH * 2 + 500;
        let mut ids = Vec::new();
        for i in 0..total {
            let id = id_at(1_000 + i as u64, 0);
            store.put_task(&finished(id.clone(), 1_000)).expect("put");
            ids.push(id);
        }
        // The oldest task of all, unfinished.
        let mut open = TaskRecord::new(id_at(10, 0), "add".into(), Default::default(), None);
        open.status = TaskStatus::Running;
        store.put_task(&open).expect("put");
        assert_eq!(store.finished_count(), total as u64);
        let keep = 100;
        let mut removed = Vec::new();
        for _ in 0..4 {
            removed.push(
                store
                    .apply_retention(2_000_000, u64::MAX, keep)
                    .expect("retention"),
            );
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
        assert_eq!(store.finished_count(), keep as u64);
        // The newest finished stay, and the unfinished one whatever its age.
        assert!(store.get_task(&ids[total - keep]).expect("get").is_some());
        assert!(store
            .get_task(&ids[total - keep - 1])
            .expect("get")
            .is_none());
        assert!(store.get_task(&open.task_id).expect("get").is_some());
        // Their index entries went with them.
        let done = TaskFilter {
            status: Some(TaskStatus::Done),
            ..TaskFilter::default()
        };
        let (page, more) = store
            .list_tasks(&done, None, 1_000, usize::MAX, |t| (t.task_id.clone(), 1))
            .expect("a listing");
        assert_eq!((page.len(), more), (keep, None));
        // `done` has no status entry: procedure and agent.
        let entries = store.db.with(|t| Ok(t.index.len())).expect("the index");
        assert_eq!(entries, keep * 2);
    }

    #[test]
    fn retention_by_age_reads_no_further_than_the_age_limit() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = GatewayStore::open(dir.path()).expect("a store");
        // Created at 1,000..1,010 and finished at once; one created at 1,005 that
        // finished at 5,000.
        for i in 0..10u64 {
            let at = 1_000 + i;
            let fin = if i == 5 { 5_000 } else { at };
            store.put_task(&finished(id_at(at, 0), fin)).expect("put");
        }
        // At 6,000 with a limit of 4,995 ms: finished before 1,005 go, and the one
        // that finished late stays.
        assert_eq!(
            store
                .apply_retention(6_000, 4_995, usize::MAX)
                .expect("pass"),
            5
        );
        assert_eq!(store.finished_count(), 5);
        assert!(store.get_task(&id_at(1_005, 0)).expect("get").is_some());
        assert!(store.get_task(&id_at(1_004, 0)).expect("get").is_none());
    }

    #[test]
    fn an_unfinished_task_is_indexed_once_it_ends() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = GatewayStore::open(dir.path()).expect("a store");
        let mut t = TaskRecord::new(id_at(1_000, 0), "add".into(), Default::default(), None);
        store.put_task(&t).expect("put");
        t.agent_id = Some("agent-2".into());
        t.set_status(TaskStatus::Running, None, 1_001);
        store.put_task(&t).expect("put");
        let entries = || store.db.with(|tr| Ok(tr.index.len())).expect("the index");
        assert_eq!(entries(), 0);
        let by_agent = TaskFilter {
            agent_id: Some("agent-2".into()),
            ..TaskFilter::default()
        };
        let list = |f: &TaskFilter| {
            store
                .list_tasks(f, None, 10, usize::MAX, |t| (t.status, 1))
                .expect("a listing")
                .0
        };
        assert_eq!(list(&by_agent), vec![TaskStatus::Running]);
        t.set_status(TaskStatus::Failed, None, 1_002);
        store.put_task(&t).expect("put");
        assert_eq!(entries(), 3);
        assert_eq!(list(&by_agent), vec![TaskStatus::Failed]);
        assert_eq!(store.finished_count(), 1);
        assert!(store.unfinished_tasks().expect("unfinished").is_empty());
        // The same again changes nothing.
        store.put_task(&t).expect("put");
        assert_eq!((entries(), store.finished_count()), (3, 1));
        // Reopened, the store knows the same.
        drop(store);
        let store = GatewayStore::open(dir.path()).expect("a store");
        assert_eq!(store.finished_count(), 1);
    }

    #[test]
    fn a_listing_reads_a_bounded_number_of_records() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = GatewayStore::open(dir.path()).expect("a store");
        // The oldest task is done; every later one failed: `done` has no index, so
        // its listing reads the records back to the oldest.
        let failures = MAX_LISTING_READS + MAX_LISTING_READS / 2;
        let done = finished(id_at(1_000, 0), 1_000);
        store.put_task(&done).expect("put");
        for i in 0..failures {
            let mut t = TaskRecord::new(
                id_at(2_000, i as u32),
                "add".into(),
                Default::default(),
                None,
            );
            t.set_status(TaskStatus::Failed, None, 2_000);
            store.put_task(&t).expect("put");
        }
        let filter = TaskFilter {
            status: Some(TaskStatus::Done),
            ..TaskFilter::default()
        };
        let list = |after: Option<&str>| {
            store
                .list_tasks(&filter, after, 10, usize::MAX, |t| (t.task_id.clone(), 1))
                .expect("a listing")
        };
        // The first page ends empty after the budget, with a token to go on.
        let (page, next) = list(None);
        assert!(page.is_empty());
        let next = next.expect("a token after a page cut short");
        let (page, next) = list(Some(&next));
        assert_eq!((page, next), (vec![done.task_id.clone()], None));
    }

    #[test]
    fn a_migration_that_meets_copies_already_moved_counts_each_task_once() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let tasks: Vec<TaskRecord> = (0..15u32)
            .map(|i| finished(id_at(1_000, i), 1_000))
            .collect();
        {
            // As a migration cut short leaves it: ten tasks in both formats, five
            // not moved yet.
            let store = GatewayStore::open(dir.path()).expect("a store");
            for t in &tasks[..10] {
                store.put_task(t).expect("put");
            }
            store
                .db
                .with(|tr| {
                    for t in &tasks {
                        let json = serde_json::to_vec(t).expect("JSON");
                        tr.legacy.insert(t.task_id.as_bytes(), json)?;
                    }
                    Ok(())
                })
                .expect("format-1 copies");
            store.close();
        }
        let store = GatewayStore::open(dir.path()).expect("the store again");
        assert_eq!(store.finished_count(), 15);
        let legacy = store.db.with(|tr| Ok(tr.legacy.len())).expect("legacy");
        assert_eq!(legacy, 0);
        let (page, _) = store
            .list_tasks(&TaskFilter::default(), None, 100, usize::MAX, |t| {
                (t.task_id.clone(), 1)
            })
            .expect("a listing");
        assert_eq!(page.len(), 15);
    }
}
