//! The volume: the write path, where a client request meets the cluster's
//! verdict and fans out to the local disk and the peers.
//!
//! Every NBD request goes through here. The volume first reads the gate —
//! the cluster core's current verdict on whether this node may serve I/O
//! (it is Primary, its generation is recorded, it has quorum). The core is
//! the only writer of the gate; the I/O path only reads it.
//!
//! **Where a write is acknowledged** ([`Volume::write`]): the extents enter
//! the activity log; the write registers with the [`Ordering`] (sequence
//! number; waits for overlapping earlier writes); bits are set toward every
//! data peer it will not reach; then, in parallel, the local disk write and
//! one frame per replicating peer. Under protocol C the write is done when
//! the local write and every peer's acknowledgement are in (B: peers have
//! it in memory; A: it was queued). A peer that fails or vanishes gets its
//! bit set instead. Finally the gate must not be holding (a new generation
//! being recorded after a peer loss): only then does the client hear
//! "done".

use std::io;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::sync::watch;

use crate::cluster::lease::Lease;
use crate::config::Protocol;
use crate::meta::activity_log::AL_EXTENT_BYTES;
use crate::meta::tracker::Tracker;
use crate::meta::MetaError;
use crate::replication::link::{AckReceiver, PeerLink};
use crate::replication::ordering::Ordering;
use crate::replication::wire::Message;
use crate::storage::Storage;
use crate::vocabulary::node::NodeSet;

/// TRIM and WRITE_ZEROES are split into pieces of at most this many bytes,
/// so one request never pins more of the activity log than this.
pub const MAX_ZEROES_PIECE_BYTES: u64 = 16 * AL_EXTENT_BYTES;
/// How often a request held for a lapsed lease looks at the gate again.
const LEASE_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// Why the gate refuses I/O, mapped to the NBD error a client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not Primary: `EPERM`.
    NotPrimary,
    /// Being demoted or shut down: `ESHUTDOWN`.
    ShuttingDown,
    /// Lost quorum (or lease) under `on-no-quorum = "io-error"`: `EIO`.
    NoQuorum,
}

/// The cluster core's verdict, as the I/O path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Serve I/O on an export of this size.
    Open { size_bytes: u64 },
    /// Hold I/O (and acknowledgements) until the verdict changes: a new
    /// generation is being recorded, or I/O is suspended.
    Held { size_bytes: u64, reason: String },
    /// Refuse I/O; `reason` is shown to NBD clients at `OPT_GO`.
    Closed { refusal: Refusal, reason: String },
}

/// A failed volume operation.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("refused: {reason}")]
    Refused { refusal: Refusal, reason: String },
    #[error("fast zeroing is not supported by this disk")]
    FastZeroUnsupported,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
}

/// What an NBD client needs to know to use the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub fast_zero: bool,
    /// O_DIRECT backing: requests must be 512-byte aligned.
    pub direct: bool,
}

/// The resource's block device as this node serves it.
#[derive(Debug)]
pub struct Volume {
    resource: String,
    me: u8,
    protocol: Protocol,
    /// Every data node id (bit per id).
    data_nodes: NodeSet,
    storage: Arc<Storage>,
    tracker: Arc<Tracker>,
    ordering: Arc<Ordering>,
    /// Peers that receive every write (Established or SyncTarget).
    targets: ArcSwap<Vec<Arc<PeerLink>>>,
    /// Whether every peer that gets our writes can zero fast too.
    peers_zero_fast: std::sync::atomic::AtomicBool,
    gate: watch::Sender<Gate>,
    /// Without a current lease the Primary serves no I/O (no stale reads).
    lease: Arc<Lease>,
    /// Set by the first write of a generation; the core records it.
    wrote: watch::Sender<bool>,
}

/// The pieces a volume is made of.
#[derive(Debug)]
pub struct VolumeParts {
    pub resource: String,
    pub me: u8,
    pub protocol: Protocol,
    pub data_nodes: NodeSet,
    pub storage: Arc<Storage>,
    pub tracker: Arc<Tracker>,
    pub lease: Arc<Lease>,
}

/// Acknowledgements owed by peers for one replicated request.
struct Fanout {
    sent_to: NodeSet,
    acks: Vec<(Arc<PeerLink>, AckReceiver)>,
    /// Targets whose link was already gone: the write waits until the core
    /// has handled their loss, as for a failed acknowledgement.
    lost: Vec<Arc<PeerLink>>,
}

impl Volume {
    pub fn new(parts: VolumeParts, gate: Gate) -> Volume {
        Volume {
            resource: parts.resource,
            me: parts.me,
            protocol: parts.protocol,
            data_nodes: parts.data_nodes,
            storage: parts.storage,
            tracker: parts.tracker,
            ordering: Arc::new(Ordering::new()),
            targets: ArcSwap::from_pointee(Vec::new()),
            peers_zero_fast: std::sync::atomic::AtomicBool::new(true),
            gate: watch::Sender::new(gate),
            lease: parts.lease,
            wrote: watch::Sender::new(false),
        }
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    pub fn ordering(&self) -> &Arc<Ordering> {
        &self.ordering
    }

    /// Only the cluster core calls this.
    pub fn set_gate(&self, gate: Gate) {
        self.gate.send_replace(gate);
    }

    pub fn gate(&self) -> Gate {
        self.gate.borrow().clone()
    }

    /// The core watches this to record the first write of a generation.
    pub fn subscribe_wrote(&self) -> watch::Receiver<bool> {
        self.wrote.subscribe()
    }

    /// The core clears it when a new generation starts.
    pub fn reset_wrote(&self) {
        self.wrote.send_replace(false);
    }

    fn note_write(&self) {
        if !*self.wrote.borrow() {
            self.wrote.send_replace(true);
        }
    }

    /// Only the cluster core calls this: the peers that get every write
    /// from now on.
    pub fn set_targets(&self, targets: Vec<Arc<PeerLink>>, peers_zero_fast: bool) {
        self.targets.store(Arc::new(targets));
        self.peers_zero_fast
            .store(peers_zero_fast, std::sync::atomic::Ordering::Relaxed);
    }

    fn fast_zero(&self) -> bool {
        self.storage.can_zero_fast()
            && self
                .peers_zero_fast
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a client may attach now, and to what.
    pub fn export(&self) -> Result<ExportInfo, String> {
        match &*self.gate.borrow() {
            Gate::Open { size_bytes } | Gate::Held { size_bytes, .. } => Ok(ExportInfo {
                size_bytes: *size_bytes,
                fast_zero: self.fast_zero(),
                direct: self.storage.direct(),
            }),
            Gate::Closed { reason, .. } => Err(reason.clone()),
        }
    }

    /// Waits while the gate holds I/O (or the lease has lapsed); fails if
    /// the gate is closed.
    async fn admit(&self) -> Result<(), VolumeError> {
        if matches!(*self.gate.borrow(), Gate::Open { .. }) && self.lease.valid() {
            return Ok(());
        }
        let mut gate = self.gate.subscribe();
        let mut held = false;
        loop {
            let lease_lapsed = match &*gate.borrow_and_update() {
                Gate::Open { .. } if self.lease.valid() => return Ok(()),
                Gate::Open { .. } => true,
                Gate::Held { .. } => false,
                Gate::Closed { refusal, reason } => {
                    // A request this node held as Primary and can no longer
                    // serve is an I/O error, whatever the new role.
                    let refusal = if held && *refusal != Refusal::ShuttingDown {
                        Refusal::NoQuorum
                    } else {
                        *refusal
                    };
                    return Err(VolumeError::Refused {
                        refusal,
                        reason: reason.clone(),
                    });
                }
            };
            held = true;
            if lease_lapsed {
                // Hold until the lease is renewed or the core decides
                // (quorum loss), then look again.
                self.lease.wait_valid(LEASE_RECHECK).await;
            } else if gate.changed().await.is_err() {
                return Err(VolumeError::Refused {
                    refusal: Refusal::ShuttingDown,
                    reason: "the volume is gone".into(),
                });
            }
        }
    }

    /// Before acknowledging a write: wait while the gate holds (a new
    /// generation is being recorded, or I/O is suspended). If the gate then
    /// closes — quorum lost, or a newer generation made this node step
    /// down — the write cannot be acknowledged: EIO. A demotion does not
    /// fail writes already in flight.
    async fn settle(&self) -> Result<(), VolumeError> {
        if matches!(*self.gate.borrow(), Gate::Open { .. }) && self.lease.valid() {
            return Ok(());
        }
        let mut gate = self.gate.subscribe();
        loop {
            let lease_lapsed = match &*gate.borrow_and_update() {
                Gate::Open { .. } if self.lease.valid() => return Ok(()),
                Gate::Open { .. } => true,
                Gate::Held { .. } => false,
                Gate::Closed {
                    refusal: Refusal::ShuttingDown,
                    ..
                } => return Ok(()),
                Gate::Closed { reason, .. } => {
                    return Err(VolumeError::Refused {
                        refusal: Refusal::NoQuorum,
                        reason: reason.clone(),
                    })
                }
            };
            if lease_lapsed {
                self.lease.wait_valid(LEASE_RECHECK).await;
            } else if gate.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    /// Sends one replicated request to every target; marks the data nodes
    /// it will not reach before anything is issued.
    fn fan_out(
        &self,
        offset: u64,
        len: u64,
        message: impl Fn(u32) -> Message,
        payload: &Bytes,
        seq: u64,
    ) -> Fanout {
        let targets = self.targets.load();
        let mut sent_to = NodeSet::of(self.me);
        for link in targets.iter() {
            if !link.is_closed() {
                sent_to.insert(link.peer);
            }
        }
        let message = message(sent_to.bits());
        let mut acks = Vec::with_capacity(targets.len());
        let mut lost = Vec::new();
        let mut reached = NodeSet::of(self.me);
        for link in targets.iter() {
            let ack = if !sent_to.contains(link.peer) {
                None
            } else {
                link.replicate(seq, message.clone(), payload.clone())
            };
            match ack {
                Some(ack) => {
                    acks.push((link.clone(), ack));
                    reached.insert(link.peer);
                }
                None => lost.push(link.clone()),
            }
        }
        let missed = self.data_nodes.without(reached);
        if !missed.is_empty() {
            self.tracker.mark_many(missed, offset, len);
        }
        Fanout {
            sent_to: reached,
            acks,
            lost,
        }
    }

    /// Waits for the peers as the protocol requires. A peer that failed
    /// gets the range marked out of sync, its link is dropped, and the write
    /// waits until the cluster core has dealt with that loss (rule A: a new
    /// generation before another acknowledgement) — only then may `settle`
    /// let the acknowledgement through.
    async fn collect(&self, fanout: Fanout, offset: u64, len: u64) {
        if self.protocol == Protocol::A {
            return;
        }
        let mut failed = fanout.lost;
        for (link, ack) in fanout.acks {
            match ack.await {
                Ok(true) => {}
                Ok(false) => {
                    self.tracker.mark(link.peer, offset, len);
                    link.close(format!(
                        "{} could not write a replicated request",
                        link.name
                    ));
                    failed.push(link);
                }
                Err(_) => {
                    self.tracker.mark(link.peer, offset, len);
                    failed.push(link);
                }
            }
        }
        for link in failed {
            link.loss_handled().await;
        }
        assert!(fanout.sent_to.contains(self.me));
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<BytesMut, VolumeError> {
        self.admit().await?;
        Ok(self.storage.read(offset, len as usize).await?)
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        self.admit().await?;
        let len = data.len() as u64;
        let _pin = self.tracker.enter(offset, len).await?;
        let mut ticket = self.ordering.register(offset, len, true);
        ticket.wait_turn().await;
        let (seq, epoch, complete_below) = (ticket.seq, ticket.epoch, ticket.complete_below);
        let fanout = self.fan_out(
            offset,
            len,
            |sent_to| Message::Write {
                seq,
                epoch,
                offset,
                fua,
                sent_to,
                complete_below,
            },
            &data,
            seq,
        );
        self.note_write();
        let local = self.storage.write(offset, data, fua);
        let (local, ()) = tokio::join!(local, self.collect(fanout, offset, len));
        local?;
        self.settle().await?;
        drop(ticket);
        Ok(())
    }

    /// Makes every acknowledged write durable here and on every peer.
    ///
    /// A peer that cannot confirm the flush may not hold the flushed writes
    /// durably: like a peer that failed a write (rule A), it is dropped and
    /// the flush is acknowledged only once the cluster core has dealt with
    /// its loss, so it can never be promoted as if it had them.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.admit().await?;
        let epoch = self.ordering.next_epoch();
        let mut failed = Vec::new();
        let mut barriers = Vec::new();
        for link in self.targets.load().iter() {
            match link.barrier(epoch) {
                Some(ack) => barriers.push((link.clone(), ack)),
                None => failed.push(link.clone()),
            }
        }
        self.storage.flush().await?;
        for (link, ack) in barriers {
            if !matches!(ack.await, Ok(true)) {
                tracing::warn!(
                    peer = %link.name,
                    "peer could not confirm a flush; dropping it until it resyncs"
                );
                link.close(format!("{} could not confirm a flush", link.name));
                failed.push(link);
            }
        }
        for link in failed {
            link.loss_handled().await;
        }
        self.settle().await
    }

    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), VolumeError> {
        self.zeroes(offset, u64::from(len), true, false, fua).await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        if fast_only && !self.fast_zero() {
            self.admit().await?;
            return Err(VolumeError::FastZeroUnsupported);
        }
        self.zeroes(offset, u64::from(len), may_punch, fast_only, fua)
            .await
    }

    /// TRIM and WRITE_ZEROES, replicated as such (never as data), in
    /// pieces that each pin a bounded part of the activity log.
    async fn zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.admit().await?;
        self.note_write();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let piece = (end - at).min(MAX_ZEROES_PIECE_BYTES - at % MAX_ZEROES_PIECE_BYTES);
            let _pin = self.tracker.enter(at, piece).await?;
            let mut ticket = self.ordering.register(at, piece, true);
            ticket.wait_turn().await;
            let (seq, epoch, complete_below) = (ticket.seq, ticket.epoch, ticket.complete_below);
            let fanout = self.fan_out(
                at,
                piece,
                |sent_to| Message::Zeroes {
                    seq,
                    epoch,
                    offset: at,
                    len: piece,
                    may_punch,
                    fua,
                    sent_to,
                    complete_below,
                },
                &Bytes::new(),
                seq,
            );
            let local = async {
                if fast_only {
                    self.storage.write_zeroes_fast(at, piece, may_punch).await
                } else {
                    self.storage.write_zeroes(at, piece, may_punch).await
                }
            };
            let (local, ()) = tokio::join!(local, self.collect(fanout, at, piece));
            local?;
            at += piece;
        }
        if fua {
            self.storage.flush().await?;
        }
        self.settle().await
    }

    /// CACHE: a read-ahead hint.
    pub async fn cache(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        self.admit().await?;
        Ok(self.storage.prefetch(offset, u64::from(len))?)
    }

    /// Allocation map for BLOCK_STATUS: runs of (length, is_hole).
    pub async fn allocation(&self, offset: u64, len: u32) -> Result<Vec<(u64, bool)>, VolumeError> {
        self.admit().await?;
        Ok(self.storage.allocation(offset, u64::from(len))?)
    }

    /// Flushes everything written so far (used on demotion and shutdown,
    /// whatever the gate says).
    pub async fn flush_all(&self) -> io::Result<()> {
        self.storage.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::IoEngineKind;
    use crate::meta::MetaStore;
    use std::time::Duration;

    /// A Primary's volume on a temp disk with one peer `beta` (id 1)
    /// receiving every write through `link`.
    fn volume_with_peer(
        dir: &std::path::Path,
    ) -> (
        Volume,
        Arc<PeerLink>,
        tokio::sync::mpsc::UnboundedReceiver<crate::replication::link::Outgoing>,
    ) {
        let disk = dir.join("alpha.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let text = format!(
            "[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\nid = 0\naddress = \"127.0.0.1:7789\"\n\
             nbd = \"127.0.0.1:10809\"\ndisk = \"{}\"\n\n[[node]]\nname = \"beta\"\nid = 1\n\
             address = \"127.0.0.2:7789\"\nnbd = \"127.0.0.2:10809\"\ndisk = \"{}\"\n",
            disk.display(),
            dir.join("beta.img").display()
        );
        let config = Config::parse(&dir.join("r0.toml"), &text).unwrap();
        let store = MetaStore::create(&config, config.node("alpha").unwrap(), false).unwrap();
        let superblock = store.superblock().clone();
        let tracker = Tracker::open(store.path().to_owned(), &superblock).unwrap();
        let data_bytes = superblock.layout.data_capacity_bytes;
        let storage =
            Arc::new(Storage::open(&disk, IoEngineKind::Threads, false, data_bytes).unwrap());
        let volume = Volume::new(
            VolumeParts {
                resource: "r0".into(),
                me: 0,
                protocol: Protocol::C,
                data_nodes: NodeSet::from_bits(0b11),
                storage,
                tracker,
                lease: Arc::new(Lease::new(Duration::from_secs(1))),
            },
            Gate::Open {
                size_bytes: data_bytes,
            },
        );
        let (link, outbox) = PeerLink::new(1, "beta".into());
        let link = Arc::new(link);
        volume.set_targets(vec![link.clone()], true);
        (volume, link, outbox)
    }

    /// Rule A for FLUSH as for writes: a peer that could not make the
    /// flushed writes durable must be dealt with by the cluster core (a new
    /// generation, so it cannot be promoted as if it had them) before the
    /// client hears that its data is safe.
    #[tokio::test]
    async fn a_flush_a_peer_failed_waits_until_the_loss_is_handled() {
        let dir = tempfile::tempdir().unwrap();
        let (volume, link, mut outbox) = volume_with_peer(dir.path());
        let volume = Arc::new(volume);
        let flush = tokio::spawn({
            let volume = volume.clone();
            async move { volume.flush().await }
        });
        let epoch = loop {
            let sent = outbox.recv().await.unwrap();
            if let Message::Barrier { epoch } = sent.message {
                break epoch;
            }
        };
        link.barrier_acked(epoch, false);
        let mut flush = flush;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut flush)
                .await
                .is_err(),
            "FLUSH acknowledged before the peer's loss was handled"
        );
        assert!(
            link.is_closed(),
            "the peer that failed the barrier is dropped"
        );
        link.mark_loss_handled();
        flush.await.unwrap().unwrap();
    }
}
