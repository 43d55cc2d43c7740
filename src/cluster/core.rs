//! The cluster core: the single owner of this node's role, disk state and
//! generations. It decides; the I/O path only reads its verdict (the
//! volume's gate).
//!
//! One task runs `loop { let action = self.select().await; self.apply(action) }`.
//! `select` holds the only `tokio::select!` and turns control requests,
//! client counts, signals and finished background steps into an
//! [`Action`]; `apply` is synchronous and does all the deciding. After every
//! step the core republishes its objects, so every state change becomes an
//! event line and a log line without any handler having to remember it.
//!
//! Steps that must wait (a demotion waits for in-flight client writes and a
//! flush) run as small background tasks that report back as an
//! [`Action::Internal`]; the core keeps the caller's reply until then.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use super::generation::Generation;
use super::promotion::{self, PromotionInput};
use super::state::{DiskState, Role};
use crate::config::{Config, Node, QuorumMode};
use crate::control::events::{ObjectKey, ObjectKind, ObjectTracker};
use crate::control::protocol::{NbdStatus, Request, Response, Status};
use crate::control::server::{ControlCall, CoreReply};
use crate::meta::superblock::StoredDisk;
use crate::meta::MetaStore;
use crate::nbd::Clients;
use crate::volume::{Gate, Refusal, Volume};

/// Internal results of background steps.
#[derive(Debug)]
pub enum Internal {
    /// Clients are gone and the disk is flushed: the demotion can finish.
    Drained(io::Result<()>),
}

/// Everything the core reacts to.
#[derive(Debug)]
pub enum Action {
    Call(ControlCall),
    ClientsChanged(usize),
    Internal(Internal),
    Signal(&'static str),
}

/// A demotion under way.
#[derive(Debug)]
struct Demotion {
    /// `secondary` callers, answered when it finishes.
    waiting: Vec<oneshot::Sender<CoreReply>>,
    /// Stop the daemon afterwards (`down`, SIGTERM).
    stop: bool,
    /// The `down` caller, answered once the daemon has torn down.
    stop_reply: Option<oneshot::Sender<CoreReply>>,
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
    pub clients: Arc<Clients>,
    pub calls: mpsc::Receiver<ControlCall>,
}

/// The cluster core of one node.
#[derive(Debug)]
pub struct Core {
    config: Arc<Config>,
    me: Node,
    meta: MetaStore,
    volume: Option<Arc<Volume>>,
    clients: Arc<Clients>,
    clients_seen: watch::Receiver<usize>,
    calls: mpsc::Receiver<ControlCall>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    terminate: Option<Signal>,
    interrupt: Option<Signal>,
    role: Role,
    disk: DiskState,
    demotion: Option<Demotion>,
    tracker: ObjectTracker,
}

/// Background steps report through a tiny queue: at most one demotion runs.
const INTERNAL_QUEUE: usize = 4;

impl Core {
    pub fn new(parts: CoreParts) -> Core {
        let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
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
        let tracker = ObjectTracker::new(parts.me.name.clone());
        let core = Core {
            config: parts.config,
            me: parts.me,
            meta: parts.meta,
            volume: parts.volume,
            clients: parts.clients,
            clients_seen,
            calls: parts.calls,
            internal_tx,
            internal_rx,
            terminate,
            interrupt,
            role: Role::Secondary,
            disk,
            demotion: None,
            tracker,
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
                return stopped;
            }
        }
    }

    async fn select(&mut self) -> Action {
        tokio::select! {
            Some(call) = self.calls.recv() => Action::Call(call),
            Some(internal) = self.internal_rx.recv() => Action::Internal(internal),
            Ok(()) = self.clients_seen.changed() => Action::ClientsChanged(*self.clients_seen.borrow_and_update()),
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
            Action::Signal(name) => {
                tracing::info!(
                    signal = name,
                    "stopping: demoting, disconnecting clients, flushing"
                );
                self.stop(true, None)
            }
        }
    }

    fn call(&mut self, call: ControlCall) -> Option<Stopped> {
        let ControlCall { request, reply } = call;
        match request {
            Request::Status => {
                let response = Response {
                    status: Some(self.status()),
                    ..Response::done("")
                };
                let _ = reply.send(CoreReply::Response(response));
                None
            }
            Request::Events { now } => {
                let (snapshot, stream) = self.tracker.snapshot();
                let _ = reply.send(CoreReply::Events {
                    snapshot,
                    stream,
                    follow: !now,
                });
                None
            }
            Request::Primary {
                force,
                override_quorum,
            } => {
                let response = self.promote(force, override_quorum);
                self.answer(&request, reply, response);
                None
            }
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
                None
            }
            Request::Down { force } => {
                if let Some(refusal) = self.clients_refusal(force, "down") {
                    self.answer(&request, reply, refusal);
                    return None;
                }
                self.stop(force, Some(reply))
            }
        }
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
    /// when refused).
    fn answer(&self, request: &Request, reply: oneshot::Sender<CoreReply>, response: Response) {
        let result = match response.exit {
            crate::control::protocol::ExitCode::Done => "done",
            crate::control::protocol::ExitCode::Refused => "refused",
            _ => "failed",
        };
        let message = response.message.clone().unwrap_or_default();
        if result == "done" {
            tracing::info!(command = request.name(), message = %message, "command done");
        } else {
            tracing::warn!(command = request.name(), result, reason = %message, "command not done");
        }
        let mut fields = Map::new();
        fields.insert("command".into(), json!(request.name()));
        fields.insert("result".into(), json!(result));
        fields.insert("reason".into(), json!(message));
        self.tracker.call(fields);
        let _ = reply.send(CoreReply::Response(response));
    }

    fn promote(&mut self, force: bool, override_quorum: bool) -> Response {
        if self.role == Role::Primary && self.demotion.is_none() {
            return Response::done(format!("{} is already Primary", self.me.name));
        }
        if self.demotion.is_some() {
            return Response::refused(format!(
                "refused: {} is being demoted; wait for it to finish",
                self.me.name
            ));
        }
        let Some(volume) = self.volume.clone() else {
            return Response::refused(format!(
                "refused: {} is a witness (no disk) and can never be Primary",
                self.me.name
            ));
        };
        let voters: Vec<&str> = vec![self.me.name.as_str()];
        let input = PromotionInput {
            quorum_mode: self.config.resource.quorum,
            voters_total: self.config.nodes.len(),
            voters_seen: &voters,
            override_quorum,
            force,
            disk: self.disk,
            primary_seen: None,
            newer_generation_seen: None,
        };
        if let Err(refusal) = promotion::check(&input) {
            return Response::refused(refusal.to_string());
        }
        let sb = self.meta.superblock();
        let capacity = sb.layout.data_capacity_bytes;
        let size_bytes = match (sb.data_size_bytes, self.config.resource.size_bytes) {
            (0, Some(wanted)) if wanted > capacity => {
                return Response::failed(format!(
                    "size {wanted} in {} is larger than {}'s usable disk ({capacity} bytes)",
                    self.config.path.display(),
                    self.me.name
                ));
            }
            (0, Some(wanted)) => wanted,
            (0, None) => capacity - capacity % crate::config::DATA_BLOCK_BYTES,
            (fixed, _) => fixed,
        };
        let generation = Generation::random();
        let result = self.meta.update(|sb| {
            sb.lineage.advance(generation);
            sb.known = generation;
            sb.disk = StoredDisk::UpToDate;
            sb.flags.primary_crashed = true;
            sb.data_size_bytes = size_bytes;
        });
        if let Err(e) = result {
            return Response::failed(format!("cannot record the new generation: {e}"));
        }
        self.disk = DiskState::UpToDate;
        self.role = Role::Primary;
        volume.set_gate(Gate::Open { size_bytes });
        let how = if override_quorum && self.config.resource.quorum == QuorumMode::Majority {
            tracing::warn!("PROMOTED WITHOUT QUORUM (--override-quorum): split-brain is possible");
            " without quorum (--override-quorum)"
        } else if force {
            " with --force (local data accepted as current)"
        } else {
            ""
        };
        Response::done(format!(
            "{} is Primary{how} in generation {generation}",
            self.me.name
        ))
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
                self.role = Role::Secondary;
                if let Err(e) = self.meta.update(|sb| sb.flags.primary_crashed = false) {
                    tracing::error!(error = %e, "cannot record the clean demotion");
                }
                Response::done(format!("{} is Secondary", self.me.name))
            }
            Err(e) => {
                // Data the clients were told is written may not be on disk:
                // say so loudly.
                self.role = Role::Secondary;
                Response::failed(format!(
                    "{} is Secondary, but flushing the disk failed ({e}); check the backing disk",
                    self.me.name
                ))
            }
        };
        self.close_gate(Refusal::NotPrimary);
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

    /// Stops the node: demotes first if Primary.
    fn stop(&mut self, force: bool, reply: Option<oneshot::Sender<CoreReply>>) -> Option<Stopped> {
        if self.role == Role::Primary || self.demotion.is_some() {
            self.begin_demotion(force, reply, true);
            return None;
        }
        self.clients.disconnect_all();
        Some(Stopped { reply })
    }

    fn close_gate(&self, refusal: Refusal) {
        if let Some(volume) = &self.volume {
            let reason = match refusal {
                Refusal::ShuttingDown => format!(
                    "{} is being demoted on {}",
                    self.config.resource.name, self.me.name
                ),
                _ => format!(
                    "{} is {} on {}; Primary: none",
                    self.config.resource.name, self.role, self.me.name
                ),
            };
            volume.set_gate(Gate::Closed { refusal, reason });
        }
    }

    fn quorum(&self) -> bool {
        let seen = 1;
        match self.config.resource.quorum {
            QuorumMode::Off => true,
            QuorumMode::Majority => 2 * seen > self.config.nodes.len(),
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
            io_suspended: false,
            lease_wait_ms: 0,
            nbd: self.me.nbd().map(|listen| NbdStatus {
                listen: listen.to_string(),
                clients: self.clients.count(),
            }),
            peers: Vec::new(),
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
        objects
    }

    fn publish(&mut self) {
        let objects = self.objects();
        for event in self.tracker.publish(objects) {
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
