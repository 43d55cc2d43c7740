//! The cluster core: the single owner of this node's role, disk state,
//! generations and peer states. It decides; the I/O path only reads its
//! verdict (the volume's gate and replication targets).
//!
//! One task runs `loop { let action = self.select().await; self.apply(action) }`.
//! `select` holds the only `tokio::select!` and turns control requests,
//! peer connections and frames, client counts, timers and signals into an
//! [`Action`]; `apply` is synchronous and does all the deciding (the peer
//! side of it lives in `peers.rs`). After every step the core republishes
//! its objects, so every state change becomes an event line and a log line
//! without any handler having to remember it.
//!
//! Steps that must wait (a demotion waits for in-flight client writes and a
//! flush; a resync runs for minutes) are queued as jobs (`jobs.rs`),
//! started after the step, that report back as an [`Internal`] action; the
//! core keeps the caller's reply until then.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use super::lease::{Lease, StartHold};
use super::peer_state::PeerState;
use super::phase::{PhaseKind, RolePhase};
use super::promotion;
use crate::config::{Config, Node, QuorumMode};
use crate::control::events::{ObjectKey, ObjectKind, ObjectTracker};
use crate::control::protocol::{ExitCode, NbdStatus, Request, Response, Status};
use crate::control::server::{ControlCall, CoreReply};
use crate::meta::superblock::StoredDisk;
use crate::meta::tracker::Tracker;
use crate::meta::MetaStore;
use crate::nbd::Clients;
use crate::replication::connector::Established;
use crate::replication::resync::SyncError;
use crate::replication::session::{PeerEvent, SessionConfig, CORE_EVENT_QUEUE};
use crate::replication::wire::{Message, NodeReport, WireLineage};
use crate::vocabulary::generation::{Generation, Lineage};
use crate::vocabulary::node::NodeSet;
use crate::vocabulary::state::{DiskState, Role};
use crate::volume::{Gate, Refusal, Volume};

/// How often the core checks its timers (promotion retries, generation
/// deadlines, auto-demotion).
pub const TICK: Duration = Duration::from_millis(20);
/// An auto-promoted Primary demotes this long after its last client left.
pub const AUTO_DEMOTE_DELAY: Duration = Duration::from_secs(1);
/// Changed bitmap pages are written every this many ticks.
const BITMAP_FLUSH_TICKS: u64 = 50;
/// Background steps report through a small queue.
const INTERNAL_QUEUE: usize = 64;

/// Results of background steps.
#[derive(Debug)]
pub enum Internal {
    /// Clients are gone and the disk is flushed: the demotion can finish.
    Drained(io::Result<()>),
    /// A resync this node drove finished (or failed).
    SyncDone {
        peer: u8,
        session: u64,
        result: Result<(), SyncError>,
    },
    /// An online verify finished: differing blocks, or the failure.
    VerifyDone {
        peer: u8,
        session: u64,
        result: Result<u64, SyncError>,
    },
    /// An NBD client wants to attach to a Secondary with auto-promote.
    AutoPromote { reply: oneshot::Sender<CoreReply> },
    /// The changed bitmap pages were written, or could not be.
    BitmapsFlushed(Result<(), crate::meta::MetaError>),
}

/// Everything the core reacts to.
#[derive(Debug)]
pub enum Action {
    Call(ControlCall),
    ClientsChanged(usize),
    Internal(Internal),
    Established(Established),
    Peer(PeerEvent),
    /// The first write of the current generation happened.
    Wrote,
    Tick,
    Signal(&'static str),
}

/// A demotion under way.
#[derive(Debug)]
pub(super) struct Demotion {
    pub waiting: Vec<oneshot::Sender<CoreReply>>,
    pub stop: bool,
    pub stop_reply: Option<oneshot::Sender<CoreReply>>,
}

/// A new generation being recorded on the connected voters.
#[derive(Debug)]
pub(super) struct GenerationChange {
    pub token: u64,
    pub generation: Generation,
    /// The lineage before it: restored if the record fails.
    pub previous: Lineage,
    /// This node's `known` before it: restored if the record fails.
    pub known_before: Generation,
    /// Whether it wrote in the generation before it: restored too.
    pub wrote_before: bool,
    /// Voters asked.
    pub asked: usize,
    /// Voters asked and not yet answered.
    pub waiting: NodeSet,
    /// Voters that accepted (this node included).
    pub accepted: NodeSet,
    pub reason: String,
    /// `primary` callers answered once it is recorded.
    pub callers: Vec<oneshot::Sender<CoreReply>>,
    /// Data peers that took it as their data generation: they are write
    /// targets before the gate opens.
    pub adopted: NodeSet,
    /// Voters that answered no (not those lost before answering).
    pub refused: NodeSet,
    /// A change this one superseded asked voters: one of them may have
    /// recorded it (its answers are no longer awaited).
    pub superseded_asked: bool,
    /// Started by a promotion (not by a Primary already serving): a
    /// failed record ends the role.
    pub for_promotion: bool,
    pub deadline: tokio::time::Instant,
}

/// A `skip-initial-sync` under way.
#[derive(Debug)]
pub(super) struct SkipSync {
    pub token: u64,
    pub generation: Generation,
    pub waiting: NodeSet,
    pub caller: oneshot::Sender<CoreReply>,
}

/// The time a step runs at. The driver reads the clocks once before each
/// step and hands them in, so every decision of one step sees one instant,
/// and the engine itself reads no clock (a simulation sets the time).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For timers: retries, deadlines, auto-demotion.
    pub instant: tokio::time::Instant,
    /// The lease clock (`lease::now_nanos`), shared with the sessions.
    pub lease_nanos: u64,
}

impl Now {
    pub fn read() -> Now {
        Now {
            instant: tokio::time::Instant::now(),
            lease_nanos: super::lease::now_nanos(),
        }
    }
}

/// What ends the core's loop.
#[derive(Debug)]
pub struct Stopped {
    /// The `down` caller, answered once the daemon has torn down.
    pub reply: Option<oneshot::Sender<CoreReply>>,
}

/// Inputs the daemon hands the core.
#[derive(Debug)]
pub struct CoreParts {
    pub config: Arc<Config>,
    pub me: Node,
    pub meta: MetaStore,
    pub volume: Option<Arc<Volume>>,
    pub tracker: Option<Arc<Tracker>>,
    pub clients: Arc<Clients>,
    pub calls: mpsc::Receiver<ControlCall>,
    pub established: mpsc::Receiver<Established>,
    /// Per peer: what the dialer should do.
    pub wanted: BTreeMap<u8, watch::Sender<crate::replication::connector::Wanted>>,
    pub disk_failed: Arc<AtomicBool>,
    pub lease: Arc<Lease>,
}

/// The cluster core of one node.
#[derive(Debug)]
pub struct Core {
    pub(super) config: Arc<Config>,
    pub(super) me: Node,
    pub(super) meta: MetaStore,
    pub(super) volume: Option<Arc<Volume>>,
    pub(super) tracker: Option<Arc<Tracker>>,
    pub(super) clients: Arc<Clients>,
    clients_seen: watch::Receiver<usize>,
    calls: mpsc::Receiver<ControlCall>,
    established: mpsc::Receiver<Established>,
    pub(super) peer_events_tx: mpsc::Sender<PeerEvent>,
    peer_events: mpsc::Receiver<PeerEvent>,
    pub(super) internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    terminate: Option<Signal>,
    interrupt: Option<Signal>,
    tick: tokio::time::Interval,
    pub(super) session_config: SessionConfig,
    pub(super) disk_failed: Arc<AtomicBool>,
    /// The role and where it stands; changed only by `set_phase`.
    pub(super) phase: RolePhase,
    pub(super) disk: DiskState,
    pub(super) peers: BTreeMap<u8, PeerState>,
    /// A demotion's callers, answered once clients are drained and the
    /// disk flushed (`down` stops the node then).
    pub(super) demotion: Option<Demotion>,
    /// A generation being recorded. Not part of the phase: a record goes
    /// on after its Primary starts demoting or steps down, and its outcome
    /// still decides the lineage.
    pub(super) generation_change: Option<GenerationChange>,
    pub(super) lease: Arc<Lease>,
    /// As a voter: back no new Primary before this time (lease wait).
    pub(super) lease_hold_until: u64,
    pub(super) start_hold: StartHold,
    /// As a voter: the peer whose new generation set `known`; its lease is
    /// backed before its report shows that generation.
    pub(super) known_from: Option<(u8, Generation)>,
    /// Promoted with --override-quorum and quorum has not come back.
    pub(super) quorum_overridden: bool,
    /// Promoted by an NBD client attaching (auto-promote).
    pub(super) auto_promoted: bool,
    /// When to demote after the last auto-promote client left.
    auto_demote_at: Option<tokio::time::Instant>,
    ticks: u64,
    wrote: Option<watch::Receiver<bool>>,
    pub(super) skip_sync: Option<SkipSync>,
    pub(super) next_token: u64,
    /// `verify` callers by peer.
    pub(super) verify_callers: BTreeMap<u8, oneshot::Sender<CoreReply>>,
    /// When the current step runs.
    pub(super) now: Now,
    /// Background work queued by this step (see `jobs.rs`).
    pub(super) jobs: Vec<super::jobs::Job>,
    /// The gate this node decided on (the volume gets it with the step's
    /// effects).
    pub(super) gate: Gate,
    /// What this step changes outside the core (see `effects.rs`).
    pub(super) effects: super::effects::Effects,
    /// What the step staged in the superblock, for the failure message.
    pub(super) unrecorded: Vec<&'static str>,
    objects: ObjectTracker,
}

impl Core {
    pub fn new(parts: CoreParts) -> Core {
        let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
        let (peer_events_tx, peer_events) = mpsc::channel(CORE_EVENT_QUEUE);
        let clients_seen = parts.clients.subscribe();
        let sb = parts.meta.superblock();
        let lone_data_node = parts.config.data_nodes().count() == 1;
        let disk = if !parts.me.is_data() {
            DiskState::Diskless
        } else if lone_data_node {
            // Nothing to sync from or to: a single data node is current.
            DiskState::UpToDate
        } else {
            match sb.disk {
                StoredDisk::Inconsistent => DiskState::Inconsistent,
                StoredDisk::Outdated => DiskState::Outdated,
                StoredDisk::UpToDate => DiskState::Consistent,
            }
        };
        let terminate = signal(SignalKind::terminate())
            .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGTERM"))
            .ok();
        let interrupt = signal(SignalKind::interrupt())
            .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGINT"))
            .ok();
        let data_nodes = parts.config.data_node_set();
        let start_hold = StartHold::new(
            parts.config.resource.ping_timeout,
            parts.config.resource.quorum == QuorumMode::Majority,
            parts
                .config
                .nodes
                .iter()
                .map(|n| n.id)
                .filter(|&id| id != parts.me.id),
        );
        let session_config = SessionConfig {
            lease: parts.lease.clone(),
            me: parts.me.id,
            protocol: parts.config.resource.protocol,
            ping_timeout: parts.config.resource.ping_timeout,
            disk: match (&parts.volume, &parts.tracker) {
                (Some(volume), Some(tracker)) => Some(crate::replication::session::LocalDisk {
                    storage: volume.storage().clone(),
                    tracker: tracker.clone(),
                    data_nodes,
                    failed: parts.disk_failed.clone(),
                }),
                _ => None,
            },
        };
        let mut peers = BTreeMap::new();
        for (id, wanted) in parts.wanted {
            if let Some(node) = parts.config.node_by_id(id) {
                peers.insert(id, PeerState::new(node.clone(), wanted));
            }
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let objects = ObjectTracker::new(parts.me.name.clone());
        let wrote = parts.volume.as_ref().map(|v| v.subscribe_wrote());
        let mut core = Core {
            config: parts.config,
            me: parts.me,
            meta: parts.meta,
            volume: parts.volume,
            tracker: parts.tracker,
            clients: parts.clients,
            clients_seen,
            calls: parts.calls,
            established: parts.established,
            peer_events_tx,
            peer_events,
            internal_tx,
            internal_rx,
            terminate,
            interrupt,
            tick,
            session_config,
            disk_failed: parts.disk_failed,
            phase: RolePhase::Secondary,
            disk,
            peers,
            demotion: None,
            generation_change: None,
            lease: parts.lease,
            lease_hold_until: 0,
            start_hold,
            known_from: None,
            quorum_overridden: false,
            auto_promoted: false,
            auto_demote_at: None,
            ticks: 0,
            wrote,
            skip_sync: None,
            next_token: 1,
            verify_callers: BTreeMap::new(),
            now: Now::read(),
            jobs: Vec::new(),
            gate: Gate::Held {
                size_bytes: 0,
                reason: "starting".into(),
            },
            effects: Default::default(),
            unrecorded: Vec::new(),
            objects,
        };
        core.close_gate(Refusal::NotPrimary);
        core.record_and_carry_out();
        core
    }

    /// Runs until the node is told to stop.
    pub async fn run(mut self) -> Stopped {
        self.publish();
        loop {
            let action = self.select().await;
            if let Some(stopped) = self.step(action, Now::read()) {
                self.shutdown_peers();
                return stopped;
            }
        }
    }

    /// One step: the action, then what follows from any state it changed
    /// (quorum, resyncs whose source no longer qualifies, the lease and
    /// the grants this node gives, events). Returns `Some` when the daemon
    /// should stop.
    pub(super) fn step(&mut self, action: Action, now: Now) -> Option<Stopped> {
        self.now = now;
        let stopped = self.apply(action);
        self.settle();
        stopped
    }

    /// What follows from any state change, after every step; then the
    /// background work the step queued starts.
    pub(super) fn settle(&mut self) {
        self.follow_state_changes();
        self.record_and_carry_out();
        self.start_jobs();
    }

    fn follow_state_changes(&mut self) {
        self.check_quorum();
        self.drop_invalid_source_resyncs();
        self.refresh_lease();
        self.refresh_lease_grants();
        self.publish();
    }

    /// Makes the superblock changes the step staged durable, then carries
    /// out its effects. A failed write is the next input: what the step's
    /// effects may still do is done, the core handles the failure, and
    /// what that queues follows.
    fn record_and_carry_out(&mut self) {
        let unrecorded = std::mem::take(&mut self.unrecorded);
        if let Err(error) = self.meta.commit() {
            let failure = format!(
                "{} could not record {} in its superblock ({error}); its metadata is given up on until a restart",
                self.me.name,
                unrecorded.join(", ")
            );
            let failed = self.effects.take();
            for (command, _) in failed.recorded_calls() {
                self.record_call(command, &Response::failed(failure.clone()));
            }
            let kept = failed.apply_after_failed_record(
                self.volume.as_deref(),
                &failure,
                self.meta.superblock().known.0,
            );
            self.metadata_failed(&failure);
            self.follow_state_changes();
            self.effects.append(kept);
        }
        for (command, response) in self.effects.recorded_calls() {
            self.record_call(command, &response);
        }
        self.effects.apply(self.volume.as_deref());
    }

    async fn select(&mut self) -> Action {
        tokio::select! {
            Some(call) = self.calls.recv() => Action::Call(call),
            Some(internal) = self.internal_rx.recv() => Action::Internal(internal),
            Some(event) = self.peer_events.recv() => Action::Peer(event),
            Some(established) = self.established.recv() => Action::Established(established),
            Ok(()) = self.clients_seen.changed() => Action::ClientsChanged(*self.clients_seen.borrow_and_update()),
            Some(true) = wrote_changed(&mut self.wrote) => Action::Wrote,
            _ = self.tick.tick() => Action::Tick,
            Some(()) = recv_signal(&mut self.terminate) => Action::Signal("SIGTERM"),
            Some(()) = recv_signal(&mut self.interrupt) => Action::Signal("SIGINT"),
        }
    }

    /// Applies one action; returns `Some` when the daemon should stop.
    fn apply(&mut self, action: Action) -> Option<Stopped> {
        match action {
            Action::Call(call) => self.call(call),
            Action::ClientsChanged(attached) => {
                self.clients_changed(attached);
                None
            }
            Action::Internal(Internal::Drained(result)) => self.finish_demotion(result),
            Action::Internal(Internal::SyncDone {
                peer,
                session,
                result,
            }) => {
                self.sync_done(peer, session, result);
                None
            }
            Action::Internal(Internal::VerifyDone {
                peer,
                session,
                result,
            }) => {
                self.verify_done(peer, session, result);
                None
            }
            Action::Internal(Internal::AutoPromote { reply }) => {
                self.auto_promote(reply);
                None
            }
            Action::Internal(Internal::BitmapsFlushed(result)) => {
                // A bitmap page that is not on disk may forget, after a
                // crash, blocks a peer still needs: the disk cannot be
                // trusted as a resync source any more.
                if let Err(error) = result {
                    self.disk_failed(&format!("writing bitmap pages: {error}"));
                }
                None
            }
            Action::Established(established) => {
                self.established(established);
                None
            }
            Action::Peer(event) => {
                self.peer_event(event);
                None
            }
            Action::Wrote => {
                if !self.meta.superblock().flags.wrote_in_generation {
                    self.persist("the first write of this generation", |sb| {
                        sb.flags.wrote_in_generation = true
                    });
                }
                None
            }
            Action::Tick => {
                self.on_tick();
                None
            }
            Action::Signal(name) => {
                tracing::info!(
                    signal = name,
                    "stopping: demoting, disconnecting clients, flushing"
                );
                self.stop(true, None)
            }
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        self.promotion_tick();
        self.auto_demote_tick();
        self.retry_refused_exchanges();
        if let Some(change) = &self.generation_change {
            if self.now.instant >= change.deadline {
                for peer in change.waiting.iter() {
                    tracing::warn!(peer = %self.peer_name(peer), "no answer to the new generation in time; closing the connection");
                    if let Some(link) = self.peers.get(&peer).and_then(|p| p.link.clone()) {
                        link.close("did not record the new generation in time");
                        // Handle the loss now (rule A included), before the
                        // record can finish and open the gate.
                        self.peer_closed(
                            peer,
                            link.session,
                            "did not record the new generation in time",
                            Vec::new(),
                        );
                    } else {
                        self.generation_answer(peer, false);
                    }
                }
            }
        }
        if self.tracker.is_some() && self.ticks % BITMAP_FLUSH_TICKS == 0 {
            self.jobs.push(super::jobs::Job::FlushBitmaps);
        }
    }

    /// The one way this node's disk state changes: the step must be one
    /// the state diagram allows (checked in release builds too: a broken
    /// rule stops the node before it records data as something it is not),
    /// and it is logged with its reason. The durable form is written by the
    /// caller, before the change where the change makes data current.
    pub(super) fn set_disk(&mut self, to: DiskState, why: &str) {
        let from = self.disk;
        if from == to {
            return;
        }
        assert!(
            from.may_become(to),
            "disk state {from} -> {to} is not allowed ({why})"
        );
        tracing::info!(%from, %to, reason = why, "disk state changed");
        #[cfg(test)]
        super::tests::count_transition("disk", format!("{from}"), format!("{to}"));
        self.disk = to;
    }

    /// Whether the volume took a write in this generation, noted or not.
    pub(super) fn wrote_now(&self) -> bool {
        self.wrote.as_ref().is_some_and(|w| *w.borrow())
    }

    /// The next background result, if one is ready: unit tests drive the
    /// core without its loop.
    #[cfg(test)]
    pub(super) fn next_internal(&mut self) -> Option<Internal> {
        self.internal_rx.try_recv().ok()
    }

    /// The next event of this core's sessions, if one is ready: engine
    /// tests that run real sessions hand them in themselves.
    #[cfg(test)]
    pub(super) fn next_peer_event(&mut self) -> Option<PeerEvent> {
        self.peer_events.try_recv().ok()
    }

    /// The sender the NBD export policy uses to ask for auto-promotion.
    pub fn internal_sender(&self) -> mpsc::Sender<Internal> {
        self.internal_tx.clone()
    }

    fn auto_promote(&mut self, reply: oneshot::Sender<CoreReply>) {
        if !self.config.resource.auto_promote {
            self.effects.answer(
                reply,
                CoreReply::Response(Response::refused(format!(
                    "{} is Secondary on {} and auto-promote is off",
                    self.config.resource.name, self.me.name
                ))),
                None,
            );
            return;
        }
        if self.phase.kind() == PhaseKind::Serving {
            self.effects.answer(
                reply,
                CoreReply::Response(Response::done("already Primary")),
                None,
            );
            return;
        }
        tracing::info!("auto-promote: an NBD client is attaching");
        self.promote(false, false, reply);
        if let RolePhase::Promoting(promotion) = &mut self.phase {
            promotion.auto = true;
        }
    }

    fn clients_changed(&mut self, attached: usize) {
        self.auto_demote_at = (attached == 0 && self.auto_promoted && self.role() == Role::Primary)
            .then(|| self.now.instant + AUTO_DEMOTE_DELAY);
    }

    fn auto_demote_tick(&mut self) {
        let due = self.auto_demote_at.is_some_and(|at| self.now.instant >= at);
        if due {
            self.auto_demote_at = None;
            if self.auto_promoted && self.role() == Role::Primary && self.clients.count() == 0 {
                tracing::info!("auto-promote: the last NBD client left; demoting");
                self.begin_demotion(false, None, false);
            }
        }
    }

    pub(super) fn peer_name(&self, id: u8) -> String {
        self.config
            .node_by_id(id)
            .map_or_else(|| format!("node{id}"), |n| n.name.clone())
    }

    fn call(&mut self, call: ControlCall) -> Option<Stopped> {
        let ControlCall { request, reply } = call;
        match request.clone() {
            Request::Status => {
                let response = Response {
                    status: Some(self.status()),
                    ..Response::done("")
                };
                self.effects.inform(reply, CoreReply::Response(response));
            }
            Request::Events { now } => {
                let (snapshot, stream) = self.objects.snapshot();
                self.effects.inform(
                    reply,
                    CoreReply::Events {
                        snapshot,
                        stream,
                        follow: !now,
                    },
                );
            }
            Request::Primary {
                force,
                override_quorum,
            } => self.promote(force, override_quorum, reply),
            Request::Secondary { force } => {
                if self.cancel_promotion("`secondary` was asked for") {
                    self.answer(
                        &request,
                        reply,
                        Response::done(format!(
                            "{} is Secondary (its promotion was cancelled)",
                            self.me.name
                        )),
                    );
                    return None;
                }
                if self.role() != Role::Primary {
                    self.answer(
                        &request,
                        reply,
                        Response::done(format!("{} is already Secondary", self.me.name)),
                    );
                    return None;
                }
                if let Some(refusal) = self.clients_refusal(force, "secondary") {
                    self.answer(&request, reply, refusal);
                    return None;
                }
                self.begin_demotion(force, Some(reply), false);
            }
            Request::Down { force } => {
                let refusal = self
                    .clients_refusal(force, "down")
                    .or_else(|| self.primary_quorum_refusal(force));
                if let Some(refusal) = refusal {
                    self.answer(&request, reply, refusal);
                    return None;
                }
                return self.stop(force, Some(reply));
            }
            Request::Connect {
                peer,
                discard_my_data,
            } => {
                let response = self.connect(peer.as_deref(), discard_my_data);
                self.answer(&request, reply, response);
            }
            Request::Disconnect { peer } => {
                let response = self.disconnect(peer.as_deref());
                self.answer(&request, reply, response);
            }
            Request::Verify { peer } => self.verify(peer.as_deref(), reply),
            Request::Invalidate => {
                let response = self.invalidate();
                self.answer(&request, reply, response);
            }
            Request::SkipInitialSync => self.skip_initial_sync(reply),
        }
        None
    }

    /// Refusal for `down` when this node's leaving would cost a connected
    /// Primary its quorum (it would stop acknowledging writes). Judged on
    /// the connections the Primary last reported.
    fn primary_quorum_refusal(&self, force: bool) -> Option<Response> {
        if force || self.config.resource.quorum == QuorumMode::Off || self.role() == Role::Primary {
            return None;
        }
        let needed = promotion::majority(self.config.nodes.len());
        for (&id, peer) in &self.peers {
            let Some(report) = peer.report.as_ref().filter(|r| r.role == Role::Primary) else {
                continue;
            };
            if peer.link.is_none() {
                continue;
            }
            let mut left: Vec<String> = vec![self.peer_name(id)];
            left.extend(
                report
                    .connections
                    .iter()
                    .filter(|(other, _)| *other != self.me.id)
                    .map(|(other, _)| self.peer_name(*other)),
            );
            if left.len() < needed {
                return Some(Response::refused(format!(
                    "refused: {primary} is Primary and would lose quorum if {me} left (it would \
                     see {seen} of {total} voters: {names}; needs {needed}); bring another node \
                     back first, or run `hablk down --force`",
                    primary = self.peer_name(id),
                    me = self.me.name,
                    seen = left.len(),
                    total = self.config.nodes.len(),
                    names = left.join(", "),
                )));
            }
        }
        None
    }

    /// Refusal for commands that would cut off attached clients.
    fn clients_refusal(&self, force: bool, command: &str) -> Option<Response> {
        let attached = self.clients.count();
        if attached == 0 || force {
            return None;
        }
        Some(Response::refused(format!(
            "refused: {attached} NBD client(s) attached to {} on {}; disconnect them first, \
             or run `hablk {command} --force` to finish their in-flight writes and disconnect them",
            self.config.resource.name, self.me.name
        )))
    }

    /// Answers a command and records it as a `call` event (and a log
    /// line), once the step's superblock write shows how it went.
    pub(super) fn answer(
        &self,
        request: &Request,
        reply: oneshot::Sender<CoreReply>,
        response: Response,
    ) {
        self.effects
            .answer(reply, CoreReply::Response(response), Some(request.name()));
    }

    pub(super) fn record_call(&self, command: &str, response: &Response) {
        let result = match response.exit {
            ExitCode::Done => "done",
            ExitCode::Refused => "refused",
            _ => "failed",
        };
        let message = response.message.clone().unwrap_or_default();
        if result == "done" {
            tracing::info!(command, message = %message, "command done");
        } else {
            tracing::warn!(command, result, reason = %message, "command not done");
        }
        let mut fields = Map::new();
        fields.insert("command".into(), json!(command));
        fields.insert("result".into(), json!(result));
        fields.insert("reason".into(), json!(message));
        self.objects.call(fields);
    }

    /// Voters this node is connected to, itself included (names).
    pub(super) fn voters_seen(&self) -> Vec<String> {
        let mut seen = vec![self.me.name.clone()];
        for peer in self.peers.values() {
            // A voter counts once its state report is in: a bare TCP
            // connection says nothing about what it knows.
            if peer.connected() && peer.report.is_some() {
                seen.push(peer.node.name.clone());
            }
        }
        seen
    }

    pub(super) fn quorum(&self) -> bool {
        match self.config.resource.quorum {
            QuorumMode::Off => true,
            QuorumMode::Majority => {
                self.voters_seen().len() >= promotion::majority(self.config.nodes.len())
            }
        }
    }

    /// Tells peers we leave, and closes every session.
    fn shutdown_peers(&mut self) {
        for peer in self.peers.values() {
            let _ = peer.wanted.send(crate::replication::connector::Wanted::Off);
            if let Some(link) = &peer.link {
                self.effects
                    .send(link, Message::Leaving, bytes::Bytes::new());
            }
        }
        self.record_and_carry_out();
    }

    /// The one way the gate changes: the volume gets it with the step's
    /// effects, after the superblock writes of the step.
    pub(super) fn set_gate(&mut self, gate: Gate) {
        if self.volume.is_some() {
            self.gate = gate.clone();
            self.effects.set_gate(gate);
        }
    }

    pub(super) fn close_gate(&mut self, refusal: Refusal) {
        {
            let primary = self
                .peers
                .values()
                .find(|p| p.report.as_ref().is_some_and(|r| r.role == Role::Primary))
                .map_or("none".to_owned(), |p| p.node.name.clone());
            let reason = match refusal {
                Refusal::ShuttingDown => format!(
                    "{} is being demoted on {}",
                    self.config.resource.name, self.me.name
                ),
                Refusal::NoQuorum => format!(
                    "{} on {} has no quorum",
                    self.config.resource.name, self.me.name
                ),
                Refusal::NotPrimary => format!(
                    "{} is Secondary on {}; Primary: {primary}",
                    self.config.resource.name, self.me.name
                ),
            };
            self.set_gate(Gate::Closed { refusal, reason });
        }
    }

    /// Re-words a Secondary's refusal after a peer's role changed, so that
    /// clients are told who is Primary now.
    pub(super) fn refresh_refusal(&mut self) {
        let not_primary = matches!(
            self.gate,
            Gate::Closed {
                refusal: Refusal::NotPrimary,
                ..
            }
        );
        if not_primary {
            self.close_gate(Refusal::NotPrimary);
        }
    }

    pub(super) fn role(&self) -> Role {
        self.phase.role()
    }

    /// Primary in any phase, or asking to become one.
    pub(super) fn primary_or_promoting(&self) -> bool {
        self.phase.kind() != PhaseKind::Secondary
    }

    /// The one place the role's phase changes. A transition hablk never
    /// makes is a broken invariant: the node stops (in release builds too)
    /// rather than act on a role it should not hold. Returns the phase
    /// left, with its data.
    pub(super) fn set_phase(&mut self, next: RolePhase, why: &str) -> RolePhase {
        let (from, to) = (self.phase.kind(), next.kind());
        assert!(
            from.may_become(to),
            "role phase {from:?} -> {to:?} ({why}) is not a transition hablk makes"
        );
        if from != to {
            tracing::info!(from = ?from, to = ?to, reason = why, "role phase changed");
            #[cfg(test)]
            super::tests::count_transition("phase", format!("{from:?}"), format!("{to:?}"));
        }
        std::mem::replace(&mut self.phase, next)
    }

    /// Whether this node may have acknowledged writes in its current data
    /// generation (it wrote, or it crashed while Primary).
    pub(super) fn may_have_written(&self) -> bool {
        let flags = self.meta.superblock().flags;
        flags.wrote_in_generation || (flags.primary_crashed && self.role() != Role::Primary)
    }

    /// This node's state as its peers see it.
    pub(super) fn report(&self) -> NodeReport {
        let sb = self.meta.superblock();
        NodeReport {
            role: self.role(),
            disk: self.disk,
            lineage: WireLineage::from(&sb.lineage),
            known: sb.known.0,
            data_size_bytes: sb.data_size_bytes,
            capacity_bytes: sb.layout.data_capacity_bytes,
            primary_crashed: sb.flags.primary_crashed && self.role() != Role::Primary,
            connections: self
                .peers
                .values()
                .filter(|p| p.connected())
                .map(|p| {
                    (
                        p.node.id,
                        p.report.as_ref().map_or(Role::Unknown, |r| r.role),
                    )
                })
                .collect(),
            fast_zero: self
                .volume
                .as_ref()
                .is_some_and(|v| v.storage().can_zero_fast()),
            needs_full_sync: sb.flags.needs_full_sync,
            discard_my_data: false,
            wrote_in_generation: self.may_have_written(),
            recording_generation: self.generation_change.is_some(),
            abandoned: sb
                .abandoned
                .iter()
                .map(|a| (a.generation.0, a.parent.0))
                .collect(),
        }
    }

    pub fn status(&self) -> Status {
        let sb = self.meta.superblock();
        let gate = self.volume.as_ref().map(|_| self.gate.clone());
        // A Primary has quorum only while a majority backs its writes: its
        // lease is valid and its generation recorded (the gate is open).
        // One that wakes from a pause sees its old peers again before it
        // learns whether it was replaced.
        let backed = self.lease.valid() && matches!(gate, Some(Gate::Open { .. }));
        Status {
            resource: self.config.resource.name.clone(),
            node: self.me.name.clone(),
            role: self.role(),
            disk: self.disk,
            quorum: self.quorum() && (self.role() != Role::Primary || backed),
            generation: sb.lineage.current.into(),
            known_generation: sb.known.into(),
            size_bytes: match (self.me.is_data(), sb.data_size_bytes) {
                (true, size) if size > 0 => Some(size),
                _ => None,
            },
            io_suspended: matches!(gate, Some(Gate::Held { .. })),
            lease_wait_ms: self.lease_wait_ms(),
            nbd: self.me.nbd().map(|listen| NbdStatus {
                listen: listen.to_string(),
                clients: self.clients.count(),
            }),
            peers: self
                .peers
                .values()
                .map(|p| p.status(self.tracker.as_deref()))
                .collect(),
        }
    }

    fn objects(&self) -> BTreeMap<ObjectKey, Map<String, Value>> {
        let status = self.status();
        let mut objects = BTreeMap::new();
        let mut resource = Map::new();
        resource.insert("resource".into(), json!(status.resource));
        resource.insert("role".into(), json!(status.role));
        resource.insert("disk".into(), json!(status.disk));
        resource.insert("quorum".into(), json!(status.quorum));
        resource.insert("generation".into(), json!(status.generation));
        resource.insert("known_generation".into(), json!(status.known_generation));
        resource.insert("size_bytes".into(), json!(status.size_bytes));
        resource.insert("io_suspended".into(), json!(status.io_suspended));
        resource.insert(
            "clients".into(),
            json!(status.nbd.map_or(0, |nbd| nbd.clients)),
        );
        objects.insert((ObjectKind::Resource, None), resource);
        for peer in &status.peers {
            let mut connection = Map::new();
            connection.insert("connection".into(), json!(peer.connection));
            connection.insert("role".into(), json!(peer.role));
            connection.insert("split_brain".into(), json!(peer.split_brain));
            objects.insert(
                (ObjectKind::Connection, Some(peer.node.clone())),
                connection,
            );
            let mut device = Map::new();
            device.insert("peer_disk".into(), json!(peer.peer_disk));
            device.insert("replication".into(), json!(peer.replication));
            objects.insert((ObjectKind::PeerDevice, Some(peer.node.clone())), device);
        }
        objects
    }

    fn publish(&mut self) {
        let objects = self.objects();
        for event in self.objects.publish(objects) {
            let fields = event
                .fields
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(" ");
            tracing::info!(object = ?event.object, peer = ?event.peer, "state {:?}: {fields}", event.kind);
        }
    }
}

/// Resolves with the volume's first-write flag whenever it changes.
async fn wrote_changed(wrote: &mut Option<watch::Receiver<bool>>) -> Option<bool> {
    match wrote {
        Some(receiver) => {
            receiver.changed().await.ok()?;
            Some(*receiver.borrow_and_update())
        }
        None => std::future::pending().await,
    }
}

async fn recv_signal(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}
