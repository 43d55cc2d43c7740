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
//! flush; a resync runs for minutes) run as background tasks that report
//! back as an [`Internal`] action; the core keeps the caller's reply until
//! then.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use super::generation::{Generation, Lineage};
use super::peers::PeerState;
use super::promotion::{self, PromotionInput};
use super::state::{DiskState, Role};
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
use crate::volume::{Gate, Refusal, Volume};

/// How often the core flushes changed bitmap pages and checks timers.
pub const TICK: Duration = Duration::from_millis(500);
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
}

/// Everything the core reacts to.
#[derive(Debug)]
pub enum Action {
    Call(ControlCall),
    ClientsChanged(usize),
    Internal(Internal),
    Established(Established),
    Peer(PeerEvent),
    Tick,
    Signal(&'static str),
}

/// A demotion under way.
#[derive(Debug)]
struct Demotion {
    waiting: Vec<oneshot::Sender<CoreReply>>,
    stop: bool,
    stop_reply: Option<oneshot::Sender<CoreReply>>,
}

/// A new generation being recorded on the connected voters.
#[derive(Debug)]
pub(super) struct GenerationChange {
    pub token: u64,
    pub generation: Generation,
    /// Voters asked and not yet answered.
    pub waiting: Vec<u8>,
    /// Voters that accepted (this node included).
    pub accepted: Vec<u8>,
    pub reason: String,
    /// `primary` callers answered once it is recorded.
    pub callers: Vec<oneshot::Sender<CoreReply>>,
    pub deadline: tokio::time::Instant,
}

/// A `skip-initial-sync` under way.
#[derive(Debug)]
pub(super) struct SkipSync {
    pub token: u64,
    pub generation: Generation,
    pub waiting: Vec<u8>,
    pub caller: oneshot::Sender<CoreReply>,
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
    pub(super) role: Role,
    pub(super) disk: DiskState,
    pub(super) peers: BTreeMap<u8, PeerState>,
    demotion: Option<Demotion>,
    pub(super) generation_change: Option<GenerationChange>,
    pub(super) skip_sync: Option<SkipSync>,
    pub(super) next_token: u64,
    /// `verify` callers by peer.
    pub(super) verify_callers: BTreeMap<u8, oneshot::Sender<CoreReply>>,
    flushing_bitmaps: bool,
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
        let data_nodes = parts.config.data_nodes().fold(0u32, |m, n| m | (1 << n.id));
        let session_config = SessionConfig {
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
        let core = Core {
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
            role: Role::Secondary,
            disk,
            peers,
            demotion: None,
            generation_change: None,
            skip_sync: None,
            next_token: 1,
            verify_callers: BTreeMap::new(),
            flushing_bitmaps: false,
            objects,
        };
        core.close_gate(Refusal::NotPrimary);
        core
    }

    /// Runs until the node is told to stop.
    pub async fn run(mut self) -> Stopped {
        self.publish();
        loop {
            let action = self.select().await;
            let stopped = self.apply(action);
            self.publish();
            if let Some(stopped) = stopped {
                self.shutdown_peers();
                return stopped;
            }
        }
    }

    async fn select(&mut self) -> Action {
        tokio::select! {
            Some(call) = self.calls.recv() => Action::Call(call),
            Some(internal) = self.internal_rx.recv() => Action::Internal(internal),
            Some(event) = self.peer_events.recv() => Action::Peer(event),
            Some(established) = self.established.recv() => Action::Established(established),
            Ok(()) = self.clients_seen.changed() => Action::ClientsChanged(*self.clients_seen.borrow_and_update()),
            _ = self.tick.tick() => Action::Tick,
            Some(()) = recv_signal(&mut self.terminate) => Action::Signal("SIGTERM"),
            Some(()) = recv_signal(&mut self.interrupt) => Action::Signal("SIGINT"),
        }
    }

    /// Applies one action; returns `Some` when the daemon should stop.
    pub fn apply(&mut self, action: Action) -> Option<Stopped> {
        match action {
            Action::Call(call) => self.call(call),
            Action::ClientsChanged(_) => None,
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
            Action::Established(established) => {
                self.established(established);
                None
            }
            Action::Peer(event) => {
                self.peer_event(event);
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
        if let Some(change) = &self.generation_change {
            if tokio::time::Instant::now() >= change.deadline {
                let waiting = change.waiting.clone();
                for peer in waiting {
                    tracing::warn!(peer = %self.peer_name(peer), "no answer to the new generation in time; closing the connection");
                    if let Some(link) = self.peers.get(&peer).and_then(|p| p.link.clone()) {
                        link.close("did not record the new generation in time");
                    }
                    self.generation_answer(peer, false);
                }
            }
        }
        if let Some(tracker) = &self.tracker {
            if !self.flushing_bitmaps {
                let tracker = tracker.clone();
                tokio::spawn(async move {
                    if let Err(e) = tracker.flush().await {
                        tracing::error!(error = %e, "cannot write bitmap pages");
                    }
                });
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
                let _ = reply.send(CoreReply::Response(response));
            }
            Request::Events { now } => {
                let (snapshot, stream) = self.objects.snapshot();
                let _ = reply.send(CoreReply::Events {
                    snapshot,
                    stream,
                    follow: !now,
                });
            }
            Request::Primary {
                force,
                override_quorum,
            } => self.promote(force, override_quorum, reply),
            Request::Secondary { force } => {
                if self.role != Role::Primary && self.demotion.is_none() {
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
                if let Some(refusal) = self.clients_refusal(force, "down") {
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

    /// Answers a command and records it as a `call` event (and a log line
    /// when not done).
    pub(super) fn answer(
        &self,
        request: &Request,
        reply: oneshot::Sender<CoreReply>,
        response: Response,
    ) {
        self.record_call(request.name(), &response);
        let _ = reply.send(CoreReply::Response(response));
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
            if peer.connected() {
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

    fn promote(&mut self, force: bool, override_quorum: bool, reply: oneshot::Sender<CoreReply>) {
        let request = Request::Primary {
            force,
            override_quorum,
        };
        if self.role == Role::Primary && self.demotion.is_none() {
            if let Some(change) = &mut self.generation_change {
                change.callers.push(reply);
                return;
            }
            self.answer(
                &request,
                reply,
                Response::done(format!("{} is already Primary", self.me.name)),
            );
            return;
        }
        if self.demotion.is_some() {
            let response = Response::refused(format!(
                "refused: {} is being demoted; wait for it to finish",
                self.me.name
            ));
            self.answer(&request, reply, response);
            return;
        }
        let Some(volume) = self.volume.clone() else {
            let response = Response::refused(format!(
                "refused: {} is a witness (no disk) and can never be Primary",
                self.me.name
            ));
            self.answer(&request, reply, response);
            return;
        };
        if self.disk_failed.load(std::sync::atomic::Ordering::Relaxed) {
            self.answer(
                &request,
                reply,
                Response::refused(format!("refused: {}'s disk has failed", self.me.name)),
            );
            return;
        }
        let seen = self.voters_seen();
        let seen_refs: Vec<&str> = seen.iter().map(String::as_str).collect();
        let primary_seen = self.primary_seen();
        let newer = self.newer_generation_seen();
        let input = PromotionInput {
            quorum_mode: self.config.resource.quorum,
            voters_total: self.config.nodes.len(),
            voters_seen: &seen_refs,
            override_quorum,
            force,
            disk: self.disk,
            primary_seen: primary_seen.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
            newer_generation_seen: newer.as_deref(),
        };
        if let Err(refusal) = promotion::check(&input) {
            self.answer(&request, reply, Response::refused(refusal.to_string()));
            return;
        }
        if force {
            if let Some(who) = self.forced_promotion_blocker() {
                let response = Response::refused(format!(
                    "refused: {who} has UpToDate or newer data; `primary --force` only accepts local \
                     data when no visible node has better"
                ));
                self.answer(&request, reply, response);
                return;
            }
        }
        let sb = self.meta.superblock();
        let capacity = sb.layout.data_capacity_bytes;
        let peer_size = self
            .peers
            .values()
            .filter_map(|p| p.report.as_ref().map(|r| r.data_size_bytes))
            .find(|&s| s > 0);
        let size_bytes = match (
            sb.data_size_bytes,
            self.config.resource.size_bytes,
            peer_size,
        ) {
            (0, Some(wanted), _) if wanted > capacity => {
                let response = Response::failed(format!(
                    "size {wanted} in {} is larger than {}'s usable disk ({capacity} bytes)",
                    self.config.path.display(),
                    self.me.name
                ));
                self.answer(&request, reply, response);
                return;
            }
            (0, Some(wanted), _) => wanted,
            (0, None, Some(size)) => size,
            (0, None, None) => self.smallest_capacity(capacity),
            (fixed, _, _) => fixed,
        };
        if let Err(e) = self.meta.update(|sb| {
            sb.disk = StoredDisk::UpToDate;
            sb.flags.primary_crashed = true;
            sb.data_size_bytes = size_bytes;
            if force {
                sb.flags.needs_full_sync = false;
            }
        }) {
            self.answer(
                &request,
                reply,
                Response::failed(format!("cannot record the promotion: {e}")),
            );
            return;
        }
        self.disk = DiskState::UpToDate;
        self.role = Role::Primary;
        if override_quorum && self.config.resource.quorum == QuorumMode::Majority {
            tracing::warn!("PROMOTED WITHOUT QUORUM (--override-quorum): split-brain is possible");
        }
        volume.set_gate(Gate::Held {
            size_bytes,
            reason: "recording the new generation".into(),
        });
        let how = if override_quorum {
            " (--override-quorum)"
        } else if force {
            " (--force: local data accepted as current)"
        } else {
            ""
        };
        self.start_generation(format!("promotion{how}"), vec![reply]);
        self.send_reports();
        self.re_evaluate_all();
    }

    /// Smallest usable disk among this node and the data peers it sees.
    fn smallest_capacity(&self, mine: u64) -> u64 {
        let smallest = self
            .peers
            .values()
            .filter(|p| p.node.is_data())
            .filter_map(|p| p.report.as_ref().map(|r| r.capacity_bytes))
            .fold(mine, u64::min);
        smallest - smallest % crate::config::DATA_BLOCK_BYTES
    }

    /// A visible node that knows a newer generation than our data's.
    fn newer_generation_seen(&self) -> Option<String> {
        let sb = self.meta.superblock();
        let mine = &sb.lineage;
        if sb.known != mine.current && !mine.history.contains(&sb.known) {
            return Some(self.me.name.clone());
        }
        for peer in self.peers.values() {
            let Some(report) = &peer.report else { continue };
            let theirs: Lineage = (&report.lineage).into();
            let known = Generation(report.known);
            let knows_newer = !mine.contains(known)
                || mine.relation_to(&theirs) == super::generation::Relation::Older;
            if knows_newer {
                return Some(peer.node.name.clone());
            }
        }
        None
    }

    /// For `--force`: a visible data node that is UpToDate or has newer data.
    fn forced_promotion_blocker(&self) -> Option<String> {
        let mine = &self.meta.superblock().lineage;
        self.peers.values().find_map(|peer| {
            let report = peer.report.as_ref()?;
            if !peer.node.is_data() {
                return None;
            }
            let theirs: Lineage = (&report.lineage).into();
            let newer = mine.relation_to(&theirs) == super::generation::Relation::Older;
            (report.disk == DiskState::UpToDate || newer).then(|| peer.node.name.clone())
        })
    }

    /// Starts a new generation: durable here first, then recorded on every
    /// connected voter. Writes are held until it is recorded.
    pub(super) fn start_generation(
        &mut self,
        reason: String,
        callers: Vec<oneshot::Sender<CoreReply>>,
    ) {
        let generation = Generation::random();
        let previous = self.meta.superblock().lineage.current;
        if let Err(e) = self.meta.update(|sb| {
            sb.lineage.advance(generation);
            sb.known = generation;
        }) {
            tracing::error!(error = %e, "cannot record a new generation");
            for caller in callers {
                self.answer(
                    &Request::Primary {
                        force: false,
                        override_quorum: false,
                    },
                    caller,
                    Response::failed(format!("cannot record the new generation: {e}")),
                );
            }
            return;
        }
        tracing::info!(%generation, %previous, reason = %reason, "new generation");
        if let (Some(volume), Role::Primary) = (&self.volume, self.role) {
            let size_bytes = self.meta.superblock().data_size_bytes;
            volume.set_gate(Gate::Held {
                size_bytes,
                reason: "recording a new generation".into(),
            });
        }
        let token = self.next_token;
        self.next_token += 1;
        let lineage = WireLineage::from(&self.meta.superblock().lineage);
        let mut waiting = Vec::new();
        for peer in self.peers.values() {
            if let Some(link) = &peer.link {
                if link.send(
                    Message::NewGeneration {
                        lineage: lineage.clone(),
                        token,
                    },
                    bytes::Bytes::new(),
                ) {
                    waiting.push(peer.node.id);
                }
            }
        }
        // Callers of an earlier, unfinished change are answered by this one.
        let mut callers = callers;
        if let Some(old) = self.generation_change.take() {
            callers.extend(old.callers);
        }
        self.generation_change = Some(GenerationChange {
            token,
            generation,
            waiting,
            accepted: vec![self.me.id],
            reason,
            callers,
            deadline: tokio::time::Instant::now() + self.config.resource.ping_timeout * 2,
        });
        self.maybe_finish_generation();
    }

    /// A voter answered (or was lost).
    pub(super) fn generation_answer(&mut self, peer: u8, accepted: bool) {
        let Some(change) = &mut self.generation_change else {
            return;
        };
        let before = change.waiting.len();
        change.waiting.retain(|&p| p != peer);
        if change.waiting.len() != before && accepted {
            change.accepted.push(peer);
        }
        self.maybe_finish_generation();
    }

    fn maybe_finish_generation(&mut self) {
        let Some(change) = &self.generation_change else {
            return;
        };
        if !change.waiting.is_empty() {
            return;
        }
        let Some(change) = self.generation_change.take() else {
            return;
        };
        let accepted: Vec<String> = change
            .accepted
            .iter()
            .map(|&id| self.peer_name(id))
            .collect();
        tracing::info!(generation = %change.generation, recorded_on = %accepted.join(","), reason = %change.reason, "generation recorded");
        if self.role == Role::Primary {
            self.open_gate();
        }
        let response = Response::done(format!(
            "{} is Primary in generation {} (recorded on {})",
            self.me.name,
            change.generation,
            accepted.join(", ")
        ));
        for caller in change.callers {
            self.answer(
                &Request::Primary {
                    force: false,
                    override_quorum: false,
                },
                caller,
                response.clone(),
            );
        }
    }

    pub(super) fn open_gate(&self) {
        if let Some(volume) = &self.volume {
            let size_bytes = self.meta.superblock().data_size_bytes;
            volume.set_gate(Gate::Open { size_bytes });
        }
    }

    fn begin_demotion(
        &mut self,
        force: bool,
        reply: Option<oneshot::Sender<CoreReply>>,
        stop: bool,
    ) {
        if force {
            self.clients.disconnect_all();
        }
        if let Some(demotion) = &mut self.demotion {
            demotion.stop |= stop;
            match reply {
                Some(reply) if stop && demotion.stop_reply.is_none() => {
                    demotion.stop_reply = Some(reply)
                }
                Some(reply) => demotion.waiting.push(reply),
                None => {}
            }
            return;
        }
        self.close_gate(Refusal::ShuttingDown);
        let (waiting, stop_reply) = match (stop, reply) {
            (true, reply) => (Vec::new(), reply),
            (false, reply) => (reply.into_iter().collect(), None),
        };
        self.demotion = Some(Demotion {
            waiting,
            stop,
            stop_reply,
        });
        let mut clients = self.clients.subscribe();
        let volume = self.volume.clone();
        let done = self.internal_tx.clone();
        tokio::spawn(async move {
            let _ = clients.wait_for(|&attached| attached == 0).await;
            let flushed = match volume {
                Some(volume) => volume.flush_all().await,
                None => Ok(()),
            };
            let _ = done.send(Internal::Drained(flushed)).await;
        });
    }

    fn finish_demotion(&mut self, flushed: io::Result<()>) -> Option<Stopped> {
        let demotion = self.demotion.take()?;
        let response = match flushed {
            Ok(()) => {
                self.become_secondary("demoted");
                if let Err(e) = self.meta.update(|sb| sb.flags.primary_crashed = false) {
                    tracing::error!(error = %e, "cannot record the clean demotion");
                }
                Response::done(format!("{} is Secondary", self.me.name))
            }
            Err(e) => {
                // Data the clients were told is written may not be on disk:
                // say so loudly.
                self.become_secondary("demoted after a failed flush");
                Response::failed(format!(
                    "{} is Secondary, but flushing the disk failed ({e}); check the backing disk",
                    self.me.name
                ))
            }
        };
        for reply in demotion.waiting {
            self.answer(
                &Request::Secondary { force: false },
                reply,
                response.clone(),
            );
        }
        if demotion.stop {
            self.clients.disconnect_all();
            return Some(Stopped {
                reply: demotion.stop_reply,
            });
        }
        None
    }

    /// Drops the Primary role (demotion, or meeting newer data).
    pub(super) fn become_secondary(&mut self, why: &str) {
        if self.role != Role::Primary {
            return;
        }
        tracing::info!(reason = why, "becoming Secondary");
        self.role = Role::Secondary;
        if let Some(volume) = &self.volume {
            volume.set_targets(Vec::new(), true);
        }
        for peer in self.peers.values_mut() {
            peer.receives_writes = false;
        }
        self.close_gate(Refusal::NotPrimary);
        self.send_reports();
    }

    /// Stops the node: demotes first if Primary.
    fn stop(&mut self, force: bool, reply: Option<oneshot::Sender<CoreReply>>) -> Option<Stopped> {
        if self.role == Role::Primary || self.demotion.is_some() {
            self.begin_demotion(force, reply, true);
            return None;
        }
        self.clients.disconnect_all();
        Some(Stopped { reply })
    }

    /// Tells peers we leave, and closes every session.
    fn shutdown_peers(&mut self) {
        for peer in self.peers.values() {
            let _ = peer.wanted.send(crate::replication::connector::Wanted::Off);
            if let Some(link) = &peer.link {
                link.send(Message::Leaving, bytes::Bytes::new());
            }
        }
    }

    pub(super) fn close_gate(&self, refusal: Refusal) {
        if let Some(volume) = &self.volume {
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
            volume.set_gate(Gate::Closed { refusal, reason });
        }
    }

    /// This node's state as its peers see it.
    pub(super) fn report(&self) -> NodeReport {
        let sb = self.meta.superblock();
        NodeReport {
            role: self.role,
            disk: self.disk,
            lineage: WireLineage::from(&sb.lineage),
            known: sb.known.0,
            data_size_bytes: sb.data_size_bytes,
            capacity_bytes: sb.layout.data_capacity_bytes,
            primary_crashed: sb.flags.primary_crashed && self.role != Role::Primary,
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
        }
    }

    pub fn status(&self) -> Status {
        let sb = self.meta.superblock();
        Status {
            resource: self.config.resource.name.clone(),
            node: self.me.name.clone(),
            role: self.role,
            disk: self.disk,
            quorum: self.quorum(),
            generation: sb.lineage.current.into(),
            known_generation: sb.known.into(),
            size_bytes: match (self.me.is_data(), sb.data_size_bytes) {
                (true, size) if size > 0 => Some(size),
                _ => None,
            },
            io_suspended: matches!(
                self.volume.as_ref().map(|v| v.gate()),
                Some(Gate::Held { .. })
            ),
            lease_wait_ms: 0,
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

async fn recv_signal(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}
