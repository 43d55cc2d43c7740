//! `hablk up`: wires one node's parts together and runs them until the node
//! is told to stop (`down`, SIGTERM, SIGINT).
//!
//! Start-up order matters: the metadata is checked first (a disk without
//! valid metadata is refused before anything listens), then the control
//! socket is bound (a second daemon for the same node is refused there),
//! then storage and the NBD listener.

use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;
use tracing::Instrument;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::core::{Core, CoreParts, Internal};
use crate::cluster::lease::Lease;
use crate::config::{Config, ConfigError, NodeKind};
use crate::control::protocol::{ExitCode, Response};
use crate::control::server::{ControlError, ControlServer, CoreReply, CONTROL_QUEUE};
use crate::meta::tracker::Tracker;
use crate::meta::{MetaError, MetaStore};
use crate::nbd::server::Listener;
use crate::nbd::{Clients, ExportPolicy, NbdServer};
use crate::replication::connector::{self, Wanted};
use crate::replication::handshake::Identity;
use crate::storage::{Storage, StorageError};
use crate::volume::{ExportInfo, Gate, Refusal, Volume, VolumeParts};

/// Handshaken connections waiting for the core.
const ESTABLISHED_QUEUE: usize = 16;

/// Linux's `PR_SET_IO_FLUSHER` (5.6+): the kernel does not throttle this
/// process's allocations on the writeback it is itself needed to finish.
const PR_SET_IO_FLUSHER: libc::c_int = 57;
/// How long a stopping daemon waits for its answer to `down` to be sent.
const LAST_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen for NBD clients on {listen}: {source}")]
    NbdListen {
        listen: String,
        source: std::io::Error,
    },
    #[error("cannot listen for peers on {address}: {source}")]
    PeerListen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Marks the daemon as an I/O flusher so that a filesystem mounted from
/// its own export cannot deadlock it under memory pressure.
fn set_io_flusher() {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let on: libc::c_ulong = 1;
    let unused: libc::c_ulong = 0;
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, on, unused, unused, unused) };
    if rc == 0 {
        return;
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EPERM) {
        // Usual in containers and under a hardened unit: not a fault, so
        // one line at info level says what it means.
        tracing::info!(
            "not an I/O flusher (PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE): a filesystem \
             mounted from this node's own export could stall under memory pressure"
        );
    } else {
        tracing::warn!(%error, "PR_SET_IO_FLUSHER failed; a filesystem mounted from this \
             node's own export could stall under memory pressure");
    }
}

/// Config keys that are accepted (so that a config written for a later
/// release loads) but do nothing yet: each is named once at start-up.
fn warn_unserved_keys(config: &Config) {
    if let Some(address) = config.resource.metrics {
        tracing::warn!(
            %address,
            "the `metrics` key is set but this version serves no metrics endpoint yet; nothing listens there"
        );
    }
    if config.resource.on_io_error == crate::config::OnIoError::PassOn {
        tracing::warn!(
            "on-io-error = \"pass-on\" is not supported yet: a failing disk is detached as with \"detach\""
        );
    }
}

/// The export policy of a node: only a Primary exports; with
/// `auto-promote`, a client attaching to a Secondary asks for promotion.
#[derive(Debug)]
struct NodeExport {
    name: String,
    node: String,
    volume: Arc<Volume>,
    auto_promote: bool,
    core: mpsc::Sender<Internal>,
}

impl ExportPolicy for NodeExport {
    fn export_name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        format!("hablk resource {} on {}", self.name, self.node)
    }

    fn probe(&self) -> Result<ExportInfo, String> {
        self.volume.export()
    }

    async fn attach(&self) -> Result<ExportInfo, String> {
        match self.volume.export() {
            Err(_) if self.auto_promote => {}
            verdict => return verdict,
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self
            .core
            .send(Internal::AutoPromote { reply })
            .await
            .is_err()
        {
            return Err(format!("{} is stopping on {}", self.name, self.node));
        }
        match answer.await {
            Ok(CoreReply::Response(response)) if response.exit == ExitCode::Done => {
                self.volume.export()
            }
            Ok(CoreReply::Response(response)) => Err(response.message.unwrap_or_default()),
            _ => Err(format!("{} is stopping on {}", self.name, self.node)),
        }
    }
}

/// The daemon allocates and frees megabyte-sized buffers at a high rate
/// (NBD payloads, replication frames, resync chunks). By default glibc maps
/// each such buffer afresh and the kernel zeroes every page of it on first
/// touch — most of a resync's CPU time. Keeping buffers up to the largest
/// request on the heap, and the freed heap around, lets them be reused.
fn tune_allocator() {
    const LARGEST_HEAP_BUFFER: libc::c_int = 32 << 20;
    const KEEP_FREED_BYTES: libc::c_int = 512 << 20;
    // SAFETY: mallopt takes two integers and changes allocator tunables.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGEST_HEAP_BUFFER) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1
    };
    if !ok {
        tracing::debug!("allocator tuning refused; large buffers are mapped per use");
    }
}

/// Runs the daemon of node `node_name` until it stops.
pub async fn up(config: Config, node_name: &str) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let me = config.node(node_name)?.clone();
    let span = tracing::info_span!("hablk", node = %me.name, resource = %config.resource.name);
    async move {
        set_io_flusher();
        tune_allocator();
        warn_unserved_keys(&config);
        let mut meta = MetaStore::open(&config, &me)?;
        crate::cluster::abandon_interrupted_generation(&mut meta)?;
        let control = ControlServer::bind(&me.control).await?;
        let clients = Arc::new(Clients::default());
        let mut tasks = Vec::new();
        let disk_failed = Arc::new(AtomicBool::new(false));
        let lease = Arc::new(Lease::new(config.resource.ping_timeout));
        let (volume, tracker, nbd_listener) = match &me.kind {
            NodeKind::Data { disk, nbd } => {
                let superblock = meta.superblock().clone();
                let storage = Arc::new(Storage::open(
                    disk,
                    config.resource.io,
                    config.resource.direct,
                    superblock.layout.data_capacity_bytes,
                )?);
                let tracker = Tracker::open(meta.path().to_owned(), &superblock)?;
                let gate = Gate::Closed {
                    refusal: Refusal::NotPrimary,
                    reason: "starting".into(),
                };
                let data_nodes = config.data_node_set();
                let volume = Arc::new(Volume::new(
                    VolumeParts {
                        resource: config.resource.name.clone(),
                        me: me.id,
                        protocol: config.resource.protocol,
                        data_nodes,
                        storage,
                        tracker: tracker.clone(),
                        lease: lease.clone(),
                    },
                    gate,
                ));
                let listener = Listener::bind(nbd).await.map_err(|source| DaemonError::NbdListen {
                    listen: nbd.to_string(),
                    source,
                })?;
                tracing::info!(listen = %nbd, disk = %disk.display(), "serving NBD");
                (Some(volume), Some(tracker), Some(listener))
            }
            NodeKind::Witness => (None, None, None),
        };
        let (established_tx, established) = mpsc::channel(ESTABLISHED_QUEUE);
        let mut wanted = BTreeMap::new();
        let mut wanted_by_listener = BTreeMap::new();
        let identity = Identity::of(&config, me.id);
        for peer in config.peers_of(&me) {
            let (tx, rx) = watch::channel(Wanted::Connect);
            wanted_by_listener.insert(peer.id, rx.clone());
            if peer.id > me.id {
                if let Some(identity) = identity.clone() {
                    tasks.push(tokio::spawn(
                        connector::dial(peer.id, config.clone(), identity, rx, established_tx.clone())
                            .in_current_span(),
                    ));
                }
            }
            wanted.insert(peer.id, tx);
        }
        if config.nodes.len() > 1 {
            let listener = TcpListener::bind(me.address)
                .await
                .map_err(|source| DaemonError::PeerListen { address: me.address, source })?;
            if let Some(identity) = identity {
                tasks.push(tokio::spawn(
                    connector::listen(listener, config.clone(), identity, wanted_by_listener, established_tx)
                        .in_current_span(),
                ));
            }
        }
        let (calls_tx, calls) = mpsc::channel(CONTROL_QUEUE);
        let control_path = control.path().to_owned();
        tasks.push(tokio::spawn(control.run(calls_tx).in_current_span()));
        tracing::info!(control = %control_path.display(), address = %me.address, "daemon up");
        let core = Core::new(CoreParts {
            config: config.clone(),
            me: me.clone(),
            meta,
            volume: volume.clone(),
            tracker: tracker.clone(),
            clients: clients.clone(),
            calls,
            established,
            wanted,
            disk_failed,
            lease,
        });
        if let (Some(volume), Some(listener)) = (volume, nbd_listener) {
            let policy = Arc::new(NodeExport {
                name: config.resource.name.clone(),
                node: me.name.clone(),
                volume: volume.clone(),
                auto_promote: config.resource.auto_promote,
                core: core.internal_sender(),
            });
            let server = NbdServer::new(volume, policy, clients.clone());
            tasks.push(tokio::spawn(server.run(listener).in_current_span()));
        }
        let stopped = core.run().await;
        for task in &tasks {
            task.abort();
        }
        if let Some(tracker) = &tracker {
            if let Err(e) = tracker.close().await {
                tracing::error!(error = %e, "cannot close the activity log cleanly; the next start resyncs its extents");
            }
        }
        let _ = std::fs::remove_file(&control_path);
        if let NodeKind::Data {
            nbd: crate::config::NbdListen::Unix(path),
            ..
        } = &me.kind
        {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("daemon stopped");
        if let Some(reply) = stopped.reply {
            let (written, on_socket) = tokio::sync::oneshot::channel();
            let response = Response::done(format!("{} stopped", me.name));
            if reply.send(CoreReply::Last { response, written }).is_ok() {
                let _ = tokio::time::timeout(LAST_ANSWER_TIMEOUT, on_socket).await;
            }
        }
        Ok(())
    }
    .instrument(span)
    .await
}
