//! What the cluster core knows of one peer: its connection, its last
//! report, the resync or verify running with it, and whether it receives
//! writes. The core's handlers that change it are in `peers.rs`.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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

/// A resync or verify running with one peer.
#[derive(Debug)]
pub(super) struct SyncRun {
    pub mode: SyncMode,
    pub stats: Arc<SyncStats>,
    /// Ends the job streaming blocks or hashes, if this node runs one.
    pub stop: Option<CancellationToken>,
    /// This node's data generation when the exchange began.
    pub generation: Generation,
}

/// Replication with one peer: what runs with it, and the run itself, in
/// one value (no flag can disagree with the run). Changed only by
/// [`PeerState::set_sync`].
#[derive(Debug)]
pub(super) enum PeerSync {
    /// Not connected, not decided yet, or the peer has no disk.
    Off,
    /// Decided: nothing to copy.
    Established,
    /// This node offered a resync and waits for the target's bitmap.
    SourceExchanging(SyncRun),
    /// This node streams the out-of-sync blocks to the peer.
    SourceStreaming(SyncRun),
    /// The peer streams blocks to this node.
    Target(SyncRun),
    /// An online verify against the peer.
    Verifying(SyncRun),
}

/// [`PeerSync`] without its run, for the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SyncKind {
    Off,
    Established,
    SourceExchanging,
    SourceStreaming,
    Target,
    Verifying,
}

impl SyncKind {
    #[cfg(test)]
    pub const ALL: [SyncKind; 6] = [
        SyncKind::Off,
        SyncKind::Established,
        SyncKind::SourceExchanging,
        SyncKind::SourceStreaming,
        SyncKind::Target,
        SyncKind::Verifying,
    ];

    /// The transition table. A resync starts only on a connection with
    /// nothing running; any run may end (done, refused, dropped, or the
    /// connection lost); a source streams only after the bitmap exchange.
    pub fn may_become(self, to: SyncKind) -> bool {
        use SyncKind::*;
        match (self, to) {
            (from, to) if from == to => true,
            (_, Off | Established) => true,
            (Off | Established, SourceExchanging | Target) => true,
            // Verify compares data a decided connection holds in sync.
            (Established, Verifying) => true,
            (SourceExchanging, SourceStreaming) => true,
            _ => false,
        }
    }
}

impl PeerSync {
    pub fn kind(&self) -> SyncKind {
        match self {
            PeerSync::Off => SyncKind::Off,
            PeerSync::Established => SyncKind::Established,
            PeerSync::SourceExchanging(_) => SyncKind::SourceExchanging,
            PeerSync::SourceStreaming(_) => SyncKind::SourceStreaming,
            PeerSync::Target(_) => SyncKind::Target,
            PeerSync::Verifying(_) => SyncKind::Verifying,
        }
    }

    /// As `status` and `events` show it.
    pub fn state(&self) -> ReplicationState {
        match self {
            PeerSync::Off => ReplicationState::Off,
            PeerSync::Established => ReplicationState::Established,
            PeerSync::SourceExchanging(_) | PeerSync::SourceStreaming(_) => {
                ReplicationState::SyncSource
            }
            PeerSync::Target(_) => ReplicationState::SyncTarget,
            PeerSync::Verifying(_) => ReplicationState::VerifyS,
        }
    }

    pub fn run(&self) -> Option<&SyncRun> {
        match self {
            PeerSync::Off | PeerSync::Established => None,
            PeerSync::SourceExchanging(run)
            | PeerSync::SourceStreaming(run)
            | PeerSync::Target(run)
            | PeerSync::Verifying(run) => Some(run),
        }
    }

    /// A resync or verify runs (or is being agreed on).
    pub fn is_running(&self) -> bool {
        self.run().is_some()
    }
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
    pub sync: PeerSync,
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
            receives_writes: false,
            in_sync_at: None,
            left_cleanly: false,
            corrupt_frames: 0,
            saw_generation: None,
            sync_end_sent: None,
            incoming_bits: None,
            retry_exchange_at: None,
            sync: PeerSync::Off,
        }
    }

    pub fn connected(&self) -> bool {
        self.link.as_ref().is_some_and(|l| !l.is_closed())
    }

    /// This node is the source of a resync to the peer.
    pub fn streams_resync(&self) -> bool {
        matches!(
            self.sync,
            PeerSync::SourceExchanging(_) | PeerSync::SourceStreaming(_)
        )
    }

    /// Moves replication with this peer to `next`: the one place it
    /// changes. The transition is checked against [`SyncKind::may_become`]
    /// (in release builds too: a run that starts over another would
    /// stream two resyncs into one disk); a run left behind is stopped.
    pub(super) fn set_sync(&mut self, next: PeerSync, why: &str) {
        let (from, to) = (self.sync.kind(), next.kind());
        assert!(
            from.may_become(to),
            "replication with {} may not go from {from:?} to {to:?} ({why})",
            self.node.name
        );
        if from != to {
            tracing::debug!(peer = %self.node.name, ?from, ?to, reason = why, "replication changed");
            #[cfg(test)]
            super::tests::count_transition("replication", format!("{from:?}"), format!("{to:?}"));
        }
        let left = std::mem::replace(&mut self.sync, next);
        if let Some(stop) = left.run().and_then(|run| run.stop.as_ref()) {
            stop.cancel();
        }
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
        let streaming = match &self.sync {
            PeerSync::SourceStreaming(run) => Some((run, "source")),
            PeerSync::Target(run) => Some((run, "target")),
            _ => None,
        };
        let sync = match streaming {
            Some((run, direction)) => {
                let start = run.stats.start_dirty_bytes.max(oos);
                let percent = if start == 0 {
                    100.0
                } else {
                    100.0 * (1.0 - oos as f64 / start as f64)
                };
                let rate = run.stats.bytes_per_sec();
                SyncStatus {
                    active: true,
                    direction: Some(direction.into()),
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
                self.sync.state()
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
        self.set_sync(PeerSync::Off, "the connection ended");
        self.link = None;
        self.report = None;
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

#[cfg(test)]
mod tests {
    use super::SyncKind::{self, *};

    #[test]
    fn a_run_starts_only_from_a_connection_with_nothing_running() {
        for from in SyncKind::ALL {
            for to in [SourceExchanging, Target] {
                if from != to {
                    assert_eq!(
                        from.may_become(to),
                        matches!(from, Off | Established),
                        "{from:?} -> {to:?}"
                    );
                }
            }
            if from != Verifying {
                assert_eq!(
                    from.may_become(Verifying),
                    from == Established,
                    "{from:?} -> Verifying"
                );
            }
        }
    }

    #[test]
    fn a_source_streams_only_after_the_bitmap_exchange_and_every_run_may_end() {
        for from in SyncKind::ALL {
            assert_eq!(
                from.may_become(SourceStreaming),
                matches!(from, SourceExchanging | SourceStreaming),
                "{from:?} -> SourceStreaming"
            );
            assert!(from.may_become(Off) && from.may_become(Established));
        }
    }
}
