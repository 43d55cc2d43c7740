//! What the cluster core knows of one peer: its connection, its last
//! report, the resync or verify running with it, and whether it receives
//! writes. The core's handlers that change it are in `peers.rs`.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Node;
use crate::control::protocol::{PeerStatus, SyncStatus};
use crate::meta::bitmap::DirtyBitmap;
use crate::meta::tracker::Tracker;
use crate::replication::connector::Wanted;
use crate::replication::link::PeerLink;
use crate::replication::resync::SyncStats;
use crate::replication::wire::{NodeReport, SyncMode};
use crate::vocabulary::generation::Generation;
use crate::vocabulary::state::{ConnectionState, DiskState, ReplicationState, Role};

/// A resync or verify with one peer.
#[derive(Debug)]
pub(super) struct SyncRun {
    pub source: bool,
    pub mode: SyncMode,
    /// Past the bitmap exchange.
    pub streaming: bool,
    pub verify: bool,
    pub stats: Arc<SyncStats>,
    pub task: Option<tokio::task::AbortHandle>,
    /// This node's data generation when the exchange began.
    pub generation: Generation,
}

/// What the core knows of one peer.
#[derive(Debug)]
pub(super) struct PeerState {
    pub node: Node,
    pub wanted: watch::Sender<Wanted>,
    pub link: Option<Arc<PeerLink>>,
    pub report: Option<NodeReport>,
    /// Why the peer is StandAlone (operator, split-brain, refusal).
    pub standalone: Option<String>,
    pub split_brain: bool,
    /// `connect --discard-my-data` toward this peer.
    pub discard_my_data: bool,
    pub replication: ReplicationState,
    /// Gets every write from this (Primary) node.
    pub receives_writes: bool,
    /// The generation both sides held when an exchange on this connection
    /// last ended with nothing out of sync: no new exchange is needed while
    /// neither side moves on.
    pub in_sync_at: Option<Generation>,
    /// The peer said it leaves cleanly (`down`, or demoted): losing it
    /// needs no lease wait.
    pub left_cleanly: bool,
    /// Connections to it dropped for a frame that failed its checksum.
    pub corrupt_frames: u64,
    /// The newest of this node's generations the peer may hold: one it was
    /// asked to record, or one its report showed. Losing a peer that may
    /// hold the current generation starts a new one (rule A).
    pub saw_generation: Option<Generation>,
    /// A SyncEnd for this generation went out and no report since shows
    /// the peer took it: reports sent before it are stale, and deciding on
    /// them would start a needless full resync.
    pub sync_end_sent: Option<Generation>,
    /// Bits a source sent ahead of its SyncBegin: merged into this node's
    /// bitmap only once it agrees to be the target, so a refused exchange
    /// leaves no stale out-of-sync bits behind.
    pub incoming_bits: Option<DirtyBitmap>,
    /// The peer refused this node's resync offer: no new offer before
    /// then (it may be busy promoting, or still see this node as it was).
    pub retry_exchange_at: Option<tokio::time::Instant>,
    pub sync: Option<SyncRun>,
}

impl PeerState {
    pub fn new(node: Node, wanted: watch::Sender<Wanted>) -> PeerState {
        PeerState {
            node,
            wanted,
            link: None,
            report: None,
            standalone: None,
            split_brain: false,
            discard_my_data: false,
            replication: ReplicationState::Off,
            receives_writes: false,
            in_sync_at: None,
            left_cleanly: false,
            corrupt_frames: 0,
            saw_generation: None,
            sync_end_sent: None,
            incoming_bits: None,
            retry_exchange_at: None,
            sync: None,
        }
    }

    pub fn connected(&self) -> bool {
        self.link.as_ref().is_some_and(|l| !l.is_closed())
    }

    /// This node streams a resync (not a verify) to the peer.
    pub fn streams_resync(&self) -> bool {
        self.sync.as_ref().is_some_and(|r| r.source && !r.verify)
    }

    pub fn connection_state(&self) -> ConnectionState {
        if self.connected() {
            ConnectionState::Connected
        } else if self.standalone.is_some() {
            ConnectionState::StandAlone
        } else {
            ConnectionState::Connecting
        }
    }

    pub fn status(&self, tracker: Option<&Tracker>) -> PeerStatus {
        let oos = tracker.map_or(0, |t| t.dirty_bytes(self.node.id));
        let sync = match &self.sync {
            Some(run) if run.streaming && !run.verify => {
                let start = run.stats.start_dirty_bytes.max(oos);
                let percent = if start == 0 {
                    100.0
                } else {
                    100.0 * (1.0 - oos as f64 / start as f64)
                };
                let rate = run.stats.bytes_per_sec();
                SyncStatus {
                    active: true,
                    direction: Some(if run.source { "source" } else { "target" }.into()),
                    percent: (percent * 10.0).round() / 10.0,
                    bytes_per_sec: rate,
                    eta_seconds: (rate > 0).then(|| oos / rate),
                }
            }
            _ => SyncStatus {
                active: false,
                direction: None,
                percent: 100.0,
                bytes_per_sec: 0,
                eta_seconds: None,
            },
        };
        let connected = self.connected();
        PeerStatus {
            node: self.node.name.clone(),
            connection: self.connection_state(),
            role: match (&self.report, connected) {
                (Some(r), true) => r.role,
                _ => Role::Unknown,
            },
            peer_disk: match (&self.report, connected) {
                (Some(r), true) => r.disk,
                _ => DiskState::DUnknown,
            },
            replication: if connected {
                self.replication
            } else {
                ReplicationState::Off
            },
            split_brain: self.split_brain,
            out_of_sync_bytes: oos,
            corrupt_frames: self.corrupt_frames,
            sync,
        }
    }

    /// Forgets everything learned on the current connection (its link,
    /// report, exchange and resync), which ended or is being replaced.
    pub(super) fn forget_connection(&mut self) {
        if let Some(run) = self.sync.take() {
            if let Some(task) = run.task {
                task.abort();
            }
        }
        self.link = None;
        self.report = None;
        self.replication = ReplicationState::Off;
        self.receives_writes = false;
        self.in_sync_at = None;
        self.sync_end_sent = None;
        self.incoming_bits = None;
        self.retry_exchange_at = None;
    }

    pub(super) fn set_wanted(&self, wanted: Wanted) {
        self.wanted.send_replace(wanted);
    }
}
