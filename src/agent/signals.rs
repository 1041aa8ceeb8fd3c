//! SIGNALs from the agent to its controller. A final SIGNAL (`done`, `interrupted`,
//! `client_error`) is retried with capped exponential backoff and jitter
//! (`SIGNAL_RETRY`) until the controller answers, and is sent again after a restart
//! if it never was answered; the result stays in the store meanwhile. `accepted` is
//! retried until the task ends; progress reports are best effort (a newer one
//! supersedes a lost one). At most `MAX_SIGNALS_IN_FLIGHT` deliveries run at once:
//! a final SIGNAL waits for a place, a report without one is skipped.
//!
//! The SIGNALs of one task reach the controller in the order of the task's life: the
//! final SIGNAL waits until no `accepted` of the same task is still on the wire, and
//! none is sent after the final one has started.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::lease::Lease;
use super::store::{AgentStore, TaskRecord};
use crate::arpcp::{
    ArpcpClient, AtaskStatus, Code, LeaseGrant, Progress, Request, Response, SignalRequest,
};
use crate::retry::{Backoff, Policy};

/// An unanswered SIGNAL (final, `accepted`, or asking to start) is sent again after
/// 100 ms, doubling up to 5 s, jittered so that the agents of a restarted gateway
/// do not all come back at once; until answered or the agent stops.
pub const SIGNAL_RETRY: Policy =
    Policy::doubling(Duration::from_millis(100), Duration::from_secs(5));

/// SIGNAL deliveries (each one task retrying one SIGNAL) under way at once, over
/// all tasks and controllers. Any ATASK names where its SIGNALs go (`reply_to`),
/// so without a bound a peer could make the agent hold a delivery, and a
/// connection, for every task it sent to an address that never answers.
pub const MAX_SIGNALS_IN_FLIGHT: usize = 256;
/// Final SIGNALs waiting for a place under `MAX_SIGNALS_IN_FLIGHT` (their task ids).
/// Beyond it a final SIGNAL waits in the store for the agent's next start, and the
/// controller, which asks about placed tasks it has not heard of, collects the
/// result with GET meanwhile.
pub const MAX_FINAL_SIGNALS_WAITING: usize = 100_000;

/// The controller's answer to an attempt that asked to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAnswer {
    Go,
    /// The controller placed the task elsewhere (or it was cancelled): it must not run.
    Withdrawn,
}

/// The SIGNALs of one task that have not ended.
struct Lane {
    /// `accepted` SIGNALs being sent right now.
    interim: watch::Sender<usize>,
    /// The final SIGNAL has started: no more `accepted`.
    closed: bool,
}

/// Holds an `accepted` SIGNAL's place on its task's lane while it is being sent.
struct InterimGuard {
    inner: Arc<Inner>,
    atask_id: String,
}

impl Drop for InterimGuard {
    fn drop(&mut self) {
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = lanes.get(&self.atask_id) {
            lane.interim.send_modify(|n| *n = n.saturating_sub(1));
            if *lane.interim.borrow() == 0 && !lane.closed {
                lanes.remove(&self.atask_id);
            }
        }
    }
}

/// Deliveries under way and the final SIGNALs waiting for a place among them, kept
/// under one lock so that a SIGNAL never waits while a place is free.
#[derive(Default)]
struct Places {
    in_flight: usize,
    waiting: VecDeque<String>,
}

/// A delivery's place under `MAX_SIGNALS_IN_FLIGHT`: handed to the next waiting
/// final SIGNAL when the delivery ends, else given back.
struct Place {
    sender: SignalSender,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.sender.release_place();
    }
}

#[derive(Clone)]
pub struct SignalSender {
    inner: Arc<Inner>,
}

struct Inner {
    client: ArpcpClient,
    store: AgentStore,
    /// `--controller`, or the controller that last probed us with ID.
    controller: RwLock<Option<String>>,
    agent_id: RwLock<Option<String>>,
    /// Renewed by the controller's answers to our SIGNALs.
    lease: Lease,
    progress_in_flight: Mutex<HashSet<String>>,
    /// Per task: `accepted` SIGNALs on the wire, and whether the final one started.
    lanes: Mutex<HashMap<String, Lane>>,
    places: Mutex<Places>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl SignalSender {
    pub fn new(
        store: AgentStore,
        controller: Option<String>,
        agent_id: Option<String>,
        tls: Option<crate::arpcp::tls::ClientTls>,
    ) -> Self {
        SignalSender {
            inner: Arc::new(Inner {
                client: ArpcpClient::new(Duration::from_secs(2), Duration::from_secs(5))
                    .with_tls(tls),
                store,
                controller: RwLock::new(controller),
                agent_id: RwLock::new(agent_id),
                lease: Lease::default(),
                progress_in_flight: Mutex::new(HashSet::new()),
                lanes: Mutex::new(HashMap::new()),
                places: Mutex::new(Places::default()),
                tracker: TaskTracker::new(),
                stop: CancellationToken::new(),
            }),
        }
    }

    pub fn set_controller(&self, addr: String) {
        *self
            .inner
            .controller
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(addr);
    }

    pub fn controller(&self) -> Option<String> {
        self.inner
            .controller
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The controller's lease, renewed by its answers to our SIGNALs.
    pub fn lease(&self) -> &Lease {
        &self.inner.lease
    }

    /// A SIGNAL sent at `sent_at` and answered: takes the lease the answer grants.
    fn answered(&self, sent_at: Instant, resp: &Response) {
        if let Some(g) = LeaseGrant::of(&resp.data) {
            self.inner
                .lease
                .renew(sent_at, Duration::from_millis(g.lease_ms), g.lease_epoch);
        }
    }

    pub fn set_agent_id(&self, id: String) {
        *self
            .inner
            .agent_id
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    pub fn agent_id(&self) -> Option<String> {
        self.inner
            .agent_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where the task's SIGNALs go: its `reply_to`, else the controller.
    pub fn destination(&self, rec: &TaskRecord) -> Option<String> {
        rec.reply_to.clone().or_else(|| self.controller())
    }

    fn request(
        &self,
        rec: &TaskRecord,
        status: AtaskStatus,
        progress: Option<Progress>,
    ) -> Request {
        Request::Signal(SignalRequest {
            atask_id: rec.atask_id.clone(),
            status,
            progress,
            agent_id: self.agent_id(),
            error: rec.error.clone(),
            start: false,
        })
    }

    /// Takes a place for an `accepted` SIGNAL of `atask_id`, unless its final
    /// SIGNAL has started.
    fn begin_interim(&self, atask_id: &str) -> Option<InterimGuard> {
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let lane = lanes.entry(atask_id.to_string()).or_insert_with(|| Lane {
            interim: watch::channel(0).0,
            closed: false,
        });
        if lane.closed {
            return None;
        }
        lane.interim.send_modify(|n| *n += 1);
        Some(InterimGuard {
            inner: self.inner.clone(),
            atask_id: atask_id.to_string(),
        })
    }

    /// Stops further `accepted` SIGNALs of `atask_id` and waits for those on the wire
    /// (each attempt is bounded by the client's timeouts).
    async fn close_lane(&self, atask_id: &str) {
        let mut busy = {
            let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let lane = lanes.entry(atask_id.to_string()).or_insert_with(|| Lane {
                interim: watch::channel(0).0,
                closed: false,
            });
            lane.closed = true;
            lane.interim.subscribe()
        };
        tokio::select! {
            _ = busy.wait_for(|n| *n == 0) => {}
            _ = self.inner.stop.cancelled() => {}
        }
    }

    fn drop_lane(&self, atask_id: &str) {
        self.inner
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(atask_id);
    }

    /// `accepted` for a stored task that waits for a slot: retried while it waits.
    pub fn accepted(&self, rec: &TaskRecord) {
        let Some(dest) = self.destination(rec) else {
            return;
        };
        let Some(place) = self.take_place() else {
            // The controller still learns of the task: from its final SIGNAL, or by
            // asking (GET) about a placed task it has not heard of.
            debug!(atask_id = %rec.atask_id, "{MAX_SIGNALS_IN_FLIGHT} SIGNALs under way; not sending accepted");
            return;
        };
        let req = self.request(rec, AtaskStatus::Accepted, None);
        let this = self.clone();
        let id = rec.atask_id.clone();
        self.inner.tracker.spawn(async move {
            let _place = place;
            this.deliver(&dest, &req, || {
                // The place first, then the state: a task that ends meanwhile either
                // waits for this attempt or is seen as ended here.
                let guard = this.begin_interim(&id)?;
                matches!(this.inner.store.get(&id), Ok(Some(r)) if !r.state.is_final())
                    .then_some(guard)
            })
            .await;
        });
    }

    /// `accepted` with progress while the task runs: one attempt, skipped while an
    /// earlier report for the same task is still on its way.
    pub fn progress(&self, rec: &TaskRecord, progress: Progress) {
        let Some(dest) = self.destination(rec) else {
            return;
        };
        let place = {
            let mut busy = self
                .inner
                .progress_in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if busy.contains(&rec.atask_id) {
                return;
            }
            // Best effort like any report: a newer one supersedes it.
            let Some(place) = self.take_place() else {
                return;
            };
            busy.insert(rec.atask_id.clone());
            place
        };
        let req = self.request(rec, AtaskStatus::Accepted, Some(progress));
        let this = self.clone();
        let id = rec.atask_id.clone();
        let guard = self.begin_interim(&id);
        self.inner.tracker.spawn(async move {
            if guard.is_some() {
                let sent_at = Instant::now();
                match this.inner.client.call(&dest, &req).await {
                    Ok(resp) => this.answered(sent_at, &resp),
                    Err(e) => {
                        debug!(atask_id = %id, "progress SIGNAL not delivered: {e}");
                        // As for every SIGNAL: a connection left with an unanswered
                        // request is not kept, or its place would outlive the delivery.
                        this.inner.client.forget(&dest);
                    }
                }
            }
            drop(guard);
            this.inner
                .progress_in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            drop(place);
        });
    }

    /// Asks the task's controller whether this attempt may start (SIGNAL `accepted`
    /// with `start`), retrying until it answers 100 (go) or 205 (withdrawn). Other
    /// answers are a controller in trouble: asked again after a pause. `None` when
    /// the sender stops first; a task with no controller to ask may start.
    pub async fn confirm_start(&self, rec: &TaskRecord) -> Option<StartAnswer> {
        let Some(dest) = self.destination(rec) else {
            return Some(StartAnswer::Go);
        };
        let mut req = self.request(
            rec,
            AtaskStatus::Accepted,
            Some(Progress {
                percent: 0.0,
                comment: "starting".into(),
            }),
        );
        if let Request::Signal(sig) = &mut req {
            sig.start = true;
        }
        let mut backoff = Backoff::new(SIGNAL_RETRY);
        loop {
            let code = self
                .deliver(&dest, &req, || self.begin_interim(&rec.atask_id))
                .await?;
            match code {
                Code::Ok => return Some(StartAnswer::Go),
                Code::UnknownTask => return Some(StartAnswer::Withdrawn),
                other => {
                    warn!(atask_id = %rec.atask_id, controller = %dest, code = %other, "the controller did not confirm the start; asking again");
                }
            }
            if !backoff.wait(&self.inner.stop).await {
                return None;
            }
        }
    }

    /// The final SIGNAL of a finished task: retried until answered, then recorded.
    /// Waits for a place under `MAX_SIGNALS_IN_FLIGHT` when there is none.
    pub fn finished(&self, rec: &TaskRecord) {
        if self.destination(rec).is_none() {
            debug!(atask_id = %rec.atask_id, "no controller to signal; the result waits for GET");
            return;
        }
        if let Some(place) = self.take_place_or_wait(&rec.atask_id) {
            self.spawn_final(rec.clone(), place);
        }
    }

    /// A place under `MAX_SIGNALS_IN_FLIGHT`, if one is free.
    fn take_place(&self) -> Option<Place> {
        let mut places = self.inner.places.lock().unwrap_or_else(|p| p.into_inner());
        (places.in_flight < MAX_SIGNALS_IN_FLIGHT).then(|| {
            places.in_flight += 1;
            Place {
                sender: self.clone(),
            }
        })
    }

    /// A place for the final SIGNAL of `atask_id`, or its turn in the queue (in
    /// the same lock, so that no place frees between the two).
    fn take_place_or_wait(&self, atask_id: &str) -> Option<Place> {
        let mut places = self.inner.places.lock().unwrap_or_else(|p| p.into_inner());
        if places.in_flight < MAX_SIGNALS_IN_FLIGHT {
            places.in_flight += 1;
            return Some(Place {
                sender: self.clone(),
            });
        }
        if places.waiting.len() < MAX_FINAL_SIGNALS_WAITING {
            places.waiting.push_back(atask_id.to_string());
        } else {
            debug!(%atask_id, "{MAX_FINAL_SIGNALS_WAITING} final SIGNALs wait already; this one is sent at the next start, or collected by GET");
        }
        None
    }

    /// A delivery ended: its place goes to the oldest waiting final SIGNAL still
    /// to send, else back.
    fn release_place(&self) {
        loop {
            let next = {
                let mut places = self.inner.places.lock().unwrap_or_else(|p| p.into_inner());
                if self.inner.stop.is_cancelled() {
                    // Stopping: what waits is sent after the restart.
                    places.waiting.clear();
                }
                let next = places.waiting.pop_front();
                if next.is_none() {
                    places.in_flight = places.in_flight.saturating_sub(1);
                }
                next
            };
            let Some(id) = next else {
                return;
            };
            match self.inner.store.get(&id) {
                Ok(Some(rec))
                    if rec.state.is_final()
                        && !rec.final_signal_answered
                        && self.destination(&rec).is_some() =>
                {
                    let place = Place {
                        sender: self.clone(),
                    };
                    self.spawn_final(rec, place);
                    return;
                }
                // Answered, collected or gone meanwhile: the place goes on to the next.
                _ => {}
            }
        }
    }

    fn spawn_final(&self, rec: TaskRecord, place: Place) {
        let Some(dest) = self.destination(&rec) else {
            return;
        };
        let req = self.request(&rec, rec.state.atask_status(), None);
        let this = self.clone();
        let id = rec.atask_id.clone();
        self.inner.tracker.spawn(async move {
            let _place = place;
            this.close_lane(&id).await;
            let answered = this
                .deliver(&dest, &req, || {
                    matches!(this.inner.store.get(&id), Ok(Some(r)) if !r.final_signal_answered)
                        .then_some(())
                })
                .await;
            this.drop_lane(&id);
            if let Some(code) = answered {
                if code == Code::UnknownTask {
                    warn!(atask_id = %id, controller = %dest, "controller does not know this task; keeping its result for GET");
                }
                let stored = this
                    .inner
                    .store
                    .update(&id, false, |r| r.final_signal_answered = true)
                    .await;
                if let Err(e) = stored {
                    warn!(atask_id = %id, "cannot record the answered SIGNAL: {e}");
                }
            }
        });
    }

    /// Sends until answered (returns the code), until `still_wanted` gives nothing,
    /// or until the sender stops (`None`). What `still_wanted` gives is held during
    /// the attempt.
    async fn deliver<G>(
        &self,
        dest: &str,
        req: &Request,
        still_wanted: impl Fn() -> Option<G>,
    ) -> Option<Code> {
        let mut backoff = Backoff::new(SIGNAL_RETRY);
        let first = dest;
        let mut dest = dest.to_string();
        loop {
            if self.inner.stop.is_cancelled() {
                return None;
            }
            let attempt = still_wanted()?;
            let sent_at = Instant::now();
            match self.inner.client.call(&dest, req).await {
                Ok(resp) => {
                    self.answered(sent_at, &resp);
                    if !resp.is_ok() {
                        debug!(controller = %dest, code = %resp.code, "SIGNAL answered: {}", resp.description);
                    }
                    return Some(resp.code);
                }
                Err(e) => {
                    debug!(controller = %dest, "SIGNAL not delivered, retrying: {e}");
                    self.inner.client.forget(&dest);
                    // The controller may have moved (restarted on another address,
                    // which its echoes told us): try there too, in turns.
                    dest = match self.controller() {
                        Some(c) if c != dest => c,
                        _ => first.to_string(),
                    };
                }
            }
            drop(attempt);
            if !backoff.wait(&self.inner.stop).await {
                return None;
            }
        }
    }

    /// Gives deliveries in flight up to `grace` to finish, then stops retrying; the
    /// unanswered final SIGNALs are sent again after a restart.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.tracker.close();
        let _ = tokio::time::timeout(grace, self.inner.tracker.wait()).await;
        self.inner.stop.cancel();
        self.inner.tracker.wait().await;
    }
}
