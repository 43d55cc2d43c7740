//! One peer connection after its handshake: a single task that reads
//! frames, applies what it is asked to apply, and writes what the rest of
//! the node queued — one poll loop, like the NBD connection's.
//!
//! Receiving side (a Secondary, a sync target, a verify target):
//! - replicated writes enter the activity log, mark the data nodes they did
//!   not reach, and go to the local disk; overlapping ones wait for the
//!   earlier one, so they land in stream order. Protocol B acknowledges on
//!   receipt, C once written.
//! - a barrier waits for every earlier write, then fdatasync, then acks.
//! - resync data and hash comparisons are answered only after a flush
//!   makes the blocks durable (flushes are batched).
//!
//! Acknowledgements go to the [`PeerLink`]; resync/verify replies to their
//! driver; everything else (state reports, generations, sync start/end) to
//! the cluster core. Silence longer than the ping timeout ends the session.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::io::{poll_read_buf, poll_write_buf};
use tokio_util::sync::CancellationToken;

use super::link::{Outgoing, PeerLink};
use super::wire::{
    self, block_hashes, mask_bytes, mask_from_bytes, Frame, Message, BLOCK_HASH_BYTES,
};
use crate::cluster::lease::{now_nanos, Lease};
use crate::config::Protocol;
use crate::meta::bitmap::blocks_of;
use crate::meta::tracker::Tracker;
use crate::storage::Storage;
use crate::vocabulary::node::NodeSet;

/// Receive buffer kept ready.
const READ_CHUNK_BYTES: usize = 1 << 20;
/// Frames with a body larger than this are read to their exact end (and,
/// while they come, every frame is): a large payload then never has to be
/// copied out of a buffer it shares with the next frame.
const EXACT_READ_BYTES: usize = 256 << 10;
/// Applies in flight on one session (the Primary bounds its own side).
pub const MAX_SESSION_APPLIES: usize = 4096;
/// Frames queued for the cluster core from one session.
pub const CORE_EVENT_QUEUE: usize = 1024;
/// Resync replies wait for one flush until this many bytes are pending or
/// no resync write is in flight (fewer, larger flushes).
pub const SYNC_FLUSH_BATCH_BYTES: u64 = 32 << 20;
/// Writes remembered as not yet complete on every node (see `Unconfirmed`).
pub const MAX_UNCONFIRMED_WRITES: usize = 1 << 16;

/// Why a session ended. Its text is what `status`, `events` and the log
/// show as the reason; the core decides on the variant, never on the text.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// This node closed the link (the reason its closer gave).
    #[error("{0}")]
    Closed(String),
    #[error("peer has not answered heartbeats for {0} ms (ping timeout)")]
    Unanswered(u128),
    #[error("peer silent for {0} ms (ping timeout)")]
    Silent(u128),
    #[error("cannot encode {what}: {error}")]
    Encode {
        what: &'static str,
        error: wire::WireError,
    },
    #[error("flush failed on this node's disk: {0}")]
    Flush(io::Error),
    #[error("connection closed while writing")]
    ClosedWhileWriting,
    #[error("connection lost: {0}")]
    Lost(io::Error),
    #[error("bad frame from peer: {0}")]
    BadFrame(wire::WireError),
    #[error("peer closed the connection")]
    PeerClosed,
    #[error("peer sent data to a diskless node")]
    DataToDiskless,
    #[error("peer repeated its handshake mid-session")]
    RepeatedHandshake,
    #[error("cluster core is not keeping up with this peer's messages")]
    CoreBehind,
}

impl SessionEnd {
    /// The session ended on a frame that failed its checksum.
    pub fn corrupt(&self) -> bool {
        matches!(self, SessionEnd::BadFrame(wire::WireError::BadChecksum))
    }
}

/// What a session tells the cluster core.
#[derive(Debug)]
pub enum PeerEvent {
    /// A control frame from the peer.
    Frame { peer: u8, frame: Frame },
    /// The session ended; `unconfirmed` are writes from this peer not yet
    /// known complete on all nodes.
    Closed {
        peer: u8,
        session: u64,
        reason: String,
        /// The session ended on a frame that failed its checksum.
        corrupt: bool,
        unconfirmed: Vec<(u64, u64)>,
    },
    /// The local disk failed while applying a peer's write.
    DiskFailed { error: String },
}

/// The local disk as the receiving side uses it.
#[derive(Debug, Clone)]
pub struct LocalDisk {
    pub storage: Arc<Storage>,
    pub tracker: Arc<Tracker>,
    /// Every data node id of the resource (bit per id).
    pub data_nodes: NodeSet,
    /// Set once the backing disk failed: nothing more is written.
    pub failed: Arc<AtomicBool>,
}

/// What one session needs to know.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub me: u8,
    pub protocol: Protocol,
    pub ping_timeout: Duration,
    pub disk: Option<LocalDisk>,
    /// Renewed whenever the peer answers a heartbeat.
    pub lease: Arc<Lease>,
}

/// Heartbeats per ping timeout: the lease (0.8 × timeout) is renewed
/// several times over before it could expire.
const HEARTBEATS_PER_TIMEOUT: u32 = 5;
/// Heartbeats whose send time is remembered until answered.
const HEARTBEAT_MEMORY: usize = 16;

/// Writes received from a Primary and not yet known complete everywhere:
/// if the Primary is lost, they are marked out of sync toward every peer.
#[derive(Debug, Default)]
struct Unconfirmed {
    writes: VecDeque<(u64, u64, u64)>,
}

impl Unconfirmed {
    fn push(
        &mut self,
        seq: u64,
        offset: u64,
        len: u64,
        complete_below: u64,
        disk: Option<&LocalDisk>,
    ) {
        while self.writes.front().is_some_and(|w| w.0 < complete_below) {
            self.writes.pop_front();
        }
        if self.writes.len() >= MAX_UNCONFIRMED_WRITES {
            // Too many to remember: mark the oldest now, which is safe.
            if let (Some((_, offset, len)), Some(disk)) = (self.writes.pop_front(), disk) {
                disk.tracker.mark_many(disk.data_nodes, offset, len);
            }
        }
        self.writes.push_back((seq, offset, len));
    }
}

/// Frames waiting to be written, bulk payloads kept as their own chunks.
#[derive(Debug, Default)]
struct OutQueue {
    chunks: VecDeque<Bytes>,
    bytes: usize,
}

/// Fault point (`failpoints` feature, tests only): damage this frame on the
/// wire, after its checksum, as a bad link would.
fn corrupt_frame_fault() -> bool {
    fail::fail_point!("peer-corrupt-frame", |_| true);
    false
}

impl OutQueue {
    fn push(&mut self, message: &Message, payload: Bytes) -> Result<(), wire::WireError> {
        let mut head = wire::encode_head(message, &payload)?;
        if corrupt_frame_fault() {
            if let Some(last) = head.last_mut() {
                *last ^= 0x5a;
            }
        }
        self.bytes += head.len() + payload.len();
        self.chunks.push_back(head.freeze());
        if !payload.is_empty() {
            self.chunks.push_back(payload);
        }
        Ok(())
    }
}

impl Buf for OutQueue {
    fn remaining(&self) -> usize {
        self.bytes
    }
    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }
    fn advance(&mut self, mut cnt: usize) {
        self.bytes -= cnt;
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if front.len() <= cnt {
                cnt -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }
    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for chunk in &self.chunks {
            if n == dst.len() {
                break;
            }
            dst[n] = IoSlice::new(chunk);
            n += 1;
        }
        n
    }
}

/// Work the receiving side does for the peer.
#[derive(Debug)]
enum Job {
    Write {
        seq: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
        missing: NodeSet,
        ack_after: bool,
    },
    Zeroes {
        seq: u64,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
        missing: NodeSet,
        ack_after: bool,
    },
    Barrier {
        epoch: u64,
    },
    SyncData {
        offset: u64,
        data: Bytes,
    },
    SyncZeroes {
        offset: u64,
        len: u64,
    },
    SyncHashes {
        offset: u64,
        blocks: u32,
        hashes: Bytes,
    },
    VerifyHashes {
        offset: u64,
        blocks: u32,
        hashes: Bytes,
    },
}

/// A finished job.
#[derive(Debug)]
struct Done {
    id: u64,
    reply: Option<(Message, Bytes)>,
    /// The reply may only leave after a flush (resync durability).
    after_flush: bool,
    /// Blocks to clear toward the peer once durable.
    clear: Vec<Range<u64>>,
    failure: Option<String>,
}

async fn run_job(
    disk: Option<LocalDisk>,
    peer: u8,
    id: u64,
    waits: Vec<CancellationToken>,
    job: Job,
) -> Done {
    for wait in waits {
        wait.cancelled().await;
    }
    let mut done = Done {
        id,
        reply: None,
        after_flush: false,
        clear: Vec::new(),
        failure: None,
    };
    let Some(disk) = disk else {
        done.failure = Some("this node has no disk".into());
        return done;
    };
    let failed = disk.failed.load(AtomicOrdering::Relaxed);
    match job {
        Job::Write {
            seq,
            offset,
            data,
            fua,
            missing,
            ack_after,
        } => {
            let ok = !failed
                && apply_write(&disk, offset, &data, fua, missing)
                    .await
                    .map_err(|e| done.failure = Some(e))
                    .is_ok();
            if ack_after {
                done.reply = Some((Message::WriteAck { seq, ok }, Bytes::new()));
            }
        }
        Job::Zeroes {
            seq,
            offset,
            len,
            may_punch,
            fua,
            missing,
            ack_after,
        } => {
            let ok = !failed
                && apply_zeroes(&disk, offset, len, may_punch, fua, missing)
                    .await
                    .map_err(|e| done.failure = Some(e))
                    .is_ok();
            if ack_after {
                done.reply = Some((Message::WriteAck { seq, ok }, Bytes::new()));
            }
        }
        Job::Barrier { epoch } => {
            let ok = !failed
                && disk
                    .storage
                    .flush()
                    .await
                    .map_err(|e| done.failure = Some(e.to_string()))
                    .is_ok();
            done.reply = Some((Message::BarrierAck { epoch, ok }, Bytes::new()));
        }
        Job::SyncData { offset, data } => {
            let len = data.len() as u64;
            match apply_sync_write(&disk, offset, &data).await {
                Ok(()) => {
                    done.reply = Some((Message::SyncAck { offset, len }, Bytes::new()));
                    done.after_flush = true;
                    done.clear.push(blocks_of(offset, len));
                }
                Err(e) => done.failure = Some(e),
            }
        }
        Job::SyncZeroes { offset, len } => {
            match apply_zeroes(&disk, offset, len, true, false, NodeSet::EMPTY).await {
                Ok(()) => {
                    done.reply = Some((Message::SyncAck { offset, len }, Bytes::new()));
                    done.after_flush = true;
                    done.clear.push(blocks_of(offset, len));
                }
                Err(e) => done.failure = Some(e),
            }
        }
        Job::SyncHashes {
            offset,
            blocks,
            hashes,
        }
        | Job::VerifyHashes {
            offset,
            blocks,
            hashes,
        } if failed => {
            let _ = (offset, blocks, hashes);
            done.failure = Some("local disk failed".into());
        }
        Job::SyncHashes {
            offset,
            blocks,
            hashes,
        } => match differing_blocks(&disk, offset, blocks, &hashes).await {
            Ok(mask) => {
                let first = offset / 4096;
                done.clear = mask
                    .iter()
                    .enumerate()
                    .filter(|(_, &differs)| !differs)
                    .map(|(i, _)| first + i as u64..first + i as u64 + 1)
                    .collect();
                done.reply = Some((
                    Message::SyncNeed { offset, blocks },
                    Bytes::from(mask_bytes(&mask)),
                ));
                done.after_flush = true;
            }
            Err(e) => done.failure = Some(e),
        },
        Job::VerifyHashes {
            offset,
            blocks,
            hashes,
        } => match differing_blocks(&disk, offset, blocks, &hashes).await {
            Ok(mask) => {
                for (i, &differs) in mask.iter().enumerate() {
                    if differs {
                        let block = offset / 4096 + i as u64;
                        disk.tracker
                            .with_bitmap(peer, |b| b.set_range(block..block + 1));
                    }
                }
                done.reply = Some((
                    Message::VerifyResult { offset, blocks },
                    Bytes::from(mask_bytes(&mask)),
                ));
            }
            Err(e) => done.failure = Some(e),
        },
    }
    done
}

/// Writes resync data: no activity-log entry — until the target confirms
/// the blocks durable, the source keeps them marked, so a crash here costs
/// nothing but a resend.
async fn apply_sync_write(disk: &LocalDisk, offset: u64, data: &Bytes) -> Result<(), String> {
    disk.storage
        .write(offset, data.clone(), false)
        .await
        .map_err(|e| e.to_string())
}

async fn apply_write(
    disk: &LocalDisk,
    offset: u64,
    data: &Bytes,
    fua: bool,
    missing: NodeSet,
) -> Result<(), String> {
    let _pin = disk
        .tracker
        .enter(offset, data.len() as u64)
        .await
        .map_err(|e| e.to_string())?;
    if !missing.is_empty() {
        disk.tracker.mark_many(missing, offset, data.len() as u64);
    }
    disk.storage
        .write(offset, data.clone(), fua)
        .await
        .map_err(|e| e.to_string())
}

async fn apply_zeroes(
    disk: &LocalDisk,
    offset: u64,
    len: u64,
    may_punch: bool,
    fua: bool,
    missing: NodeSet,
) -> Result<(), String> {
    let _pin = disk
        .tracker
        .enter(offset, len)
        .await
        .map_err(|e| e.to_string())?;
    if !missing.is_empty() {
        disk.tracker.mark_many(missing, offset, len);
    }
    disk.storage
        .write_zeroes(offset, len, may_punch)
        .await
        .map_err(|e| e.to_string())?;
    if fua {
        disk.storage.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Compares the peer's block hashes with the local blocks.
async fn differing_blocks(
    disk: &LocalDisk,
    offset: u64,
    blocks: u32,
    hashes: &[u8],
) -> Result<Vec<bool>, String> {
    if hashes.len() != blocks as usize * BLOCK_HASH_BYTES {
        return Err("hash list has the wrong length".into());
    }
    let len = (u64::from(blocks) * 4096).min(disk.storage.data_bytes().saturating_sub(offset));
    let data = disk
        .storage
        .read_uncached(offset, len as usize)
        .await
        .map_err(|e| e.to_string())?;
    let local = block_hashes(&data);
    Ok((0..blocks as usize)
        .map(|i| {
            local.get(i * BLOCK_HASH_BYTES..(i + 1) * BLOCK_HASH_BYTES)
                != hashes.get(i * BLOCK_HASH_BYTES..(i + 1) * BLOCK_HASH_BYTES)
        })
        .collect())
}

fn config_ping_interval(config: &SessionConfig) -> Duration {
    (config.ping_timeout / HEARTBEATS_PER_TIMEOUT).max(Duration::from_millis(10))
}

/// What a session runs over: a TCP connection in the daemon; the engine
/// tests can run one over an in-memory stream.
pub trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> PeerStream for S {}

/// Runs a session until the peer goes away, the link is closed, or the
/// peer falls silent.
pub async fn run<S: PeerStream>(
    stream: S,
    leftover: BytesMut,
    link: Arc<PeerLink>,
    outbox: mpsc::UnboundedReceiver<Outgoing>,
    config: SessionConfig,
    events: mpsc::Sender<PeerEvent>,
) {
    let peer = link.peer;
    let ping_interval = config_ping_interval(&config);
    let mut session = Session {
        stream,
        link_closed: Box::pin(link.closed_owned()),
        rbuf: leftover,
        exact_reads: false,
        out: OutQueue::default(),
        outbox,
        link: link.clone(),
        config,
        events: events.clone(),
        last_heard: Instant::now(),
        last_pong: Instant::now(),
        ping: tokio::time::interval(ping_interval),
        ping_id: 0,
        pings_sent: VecDeque::with_capacity(HEARTBEAT_MEMORY),
        next_job: 0,
        ranges: HashMap::new(),
        all_done: HashMap::new(),
        unflushed: Vec::new(),
        flushing: None,
        unconfirmed: Unconfirmed::default(),
        closing: None,
        sync_jobs: 0,
        sync_job_ids: std::collections::HashSet::new(),
    };
    session
        .ping
        .set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut jobs = FuturesUnordered::new();
    let end = std::future::poll_fn(|cx| session.poll(cx, &mut jobs, run_job)).await;
    let reason = end.to_string();
    link.close(reason.clone());
    let unconfirmed = session
        .unconfirmed
        .writes
        .iter()
        .map(|w| (w.1, w.2))
        .collect();
    let session = link.session;
    let corrupt = end.corrupt();
    let _ = events
        .send(PeerEvent::Closed {
            peer,
            session,
            reason,
            corrupt,
            unconfirmed,
        })
        .await;
}

type FlushFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;
/// A reply that may only leave after a flush, with the blocks it lets us
/// clear toward the peer.
type DurableReply = ((Message, Bytes), Vec<Range<u64>>);

struct Session<S> {
    stream: S,
    /// Resolves when the node closes the link.
    link_closed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    rbuf: BytesMut,
    exact_reads: bool,
    out: OutQueue,
    outbox: mpsc::UnboundedReceiver<Outgoing>,
    link: Arc<PeerLink>,
    config: SessionConfig,
    events: mpsc::Sender<PeerEvent>,
    last_heard: Instant,
    /// When the peer last answered a heartbeat: a peer that still talks but
    /// no longer hears this node (a one-way cut) is lost too.
    last_pong: Instant,
    ping: tokio::time::Interval,
    ping_id: u64,
    /// (heartbeat id, send time) of recent heartbeats.
    pings_sent: VecDeque<(u64, u64)>,
    next_job: u64,
    /// Ranges being written for the peer, with the latch that frees them.
    ranges: HashMap<u64, (Range<u64>, CancellationToken)>,
    /// Every job's latch (barriers wait for all earlier jobs).
    all_done: HashMap<u64, CancellationToken>,
    /// Replies waiting for the next flush, and blocks to clear then.
    unflushed: Vec<DurableReply>,
    flushing: Option<(FlushFuture, Vec<DurableReply>)>,
    unconfirmed: Unconfirmed,
    /// A last frame was queued: close once it is written, with this reason.
    closing: Option<String>,
    /// Resync jobs (data, zeroes, hashes) not finished yet.
    sync_jobs: usize,
    /// Ids of those jobs.
    sync_job_ids: std::collections::HashSet<u64>,
}

impl<S: PeerStream> Session<S> {
    fn poll<F, M>(
        &mut self,
        cx: &mut Context<'_>,
        jobs: &mut FuturesUnordered<F>,
        start: M,
    ) -> Poll<SessionEnd>
    where
        F: Future<Output = Done>,
        M: Fn(Option<LocalDisk>, u8, u64, Vec<CancellationToken>, Job) -> F + Copy,
    {
        loop {
            let mut progressed = false;
            // Polled, not only checked, so a close wakes the session at
            // once rather than at its next heartbeat.
            if self.link_closed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(SessionEnd::Closed(
                    self.link.close_reason().unwrap_or_else(|| "closed".into()),
                ));
            }
            // Keepalive and silence detection.
            while self.ping.poll_tick(cx).is_ready() {
                let unanswered = self.last_pong.elapsed();
                if unanswered > self.config.ping_timeout {
                    return Poll::Ready(SessionEnd::Unanswered(unanswered.as_millis()));
                }
                let silent = self.last_heard.elapsed();
                if silent > self.config.ping_timeout {
                    return Poll::Ready(SessionEnd::Silent(silent.as_millis()));
                }
                self.ping_id += 1;
                if self.pings_sent.len() == HEARTBEAT_MEMORY {
                    self.pings_sent.pop_front();
                }
                self.pings_sent.push_back((self.ping_id, now_nanos()));
                if let Err(e) = self
                    .out
                    .push(&Message::Ping { id: self.ping_id }, Bytes::new())
                {
                    return Poll::Ready(SessionEnd::Encode {
                        what: "ping",
                        error: e,
                    });
                }
                progressed = true;
            }
            // Frames queued by the node; nothing after a last frame.
            while self.closing.is_none() {
                let Poll::Ready(Some(outgoing)) = self.outbox.poll_recv(cx) else {
                    break;
                };
                if let Err(e) = self.out.push(&outgoing.message, outgoing.payload) {
                    return Poll::Ready(SessionEnd::Encode {
                        what: outgoing.message.name(),
                        error: e,
                    });
                }
                self.closing = outgoing.close_after;
                progressed = true;
            }
            // Finished jobs.
            while let Poll::Ready(Some(done)) = jobs.poll_next_unpin(cx) {
                if let Some(reason) = self.finish(done) {
                    return Poll::Ready(reason);
                }
                progressed = true;
            }
            // Batched flush for durable replies.
            if let Some((flush, _)) = self.flushing.as_mut() {
                if let Poll::Ready(result) = flush.as_mut().poll(cx) {
                    let Some((_, replies)) = self.flushing.take() else {
                        continue;
                    };
                    if let Err(e) = result {
                        return Poll::Ready(SessionEnd::Flush(e));
                    }
                    for ((message, payload), clear) in replies {
                        if let Some(disk) = &self.config.disk {
                            for blocks in clear {
                                disk.tracker.clear_blocks(self.link.peer, blocks);
                            }
                        }
                        if let Err(e) = self.out.push(&message, payload) {
                            return Poll::Ready(SessionEnd::Encode {
                                what: "reply",
                                error: e,
                            });
                        }
                    }
                    progressed = true;
                }
            }
            let unflushed_bytes: u64 = self
                .unflushed
                .iter()
                .map(|((message, _), _)| match message {
                    Message::SyncAck { len, .. } => *len,
                    _ => 0,
                })
                .sum();
            let batch_ready = self.sync_jobs == 0 || unflushed_bytes >= SYNC_FLUSH_BATCH_BYTES;
            if self.flushing.is_none() && !self.unflushed.is_empty() && batch_ready {
                if let Some(disk) = &self.config.disk {
                    let storage = disk.storage.clone();
                    let replies = std::mem::take(&mut self.unflushed);
                    // Resync data, once durable, leaves the page cache
                    // (clean pages drop): see `Storage::evict`.
                    let written: Vec<(u64, u64)> = replies
                        .iter()
                        .filter_map(|((message, _), _)| match message {
                            Message::SyncAck { offset, len } => Some((*offset, *len)),
                            _ => None,
                        })
                        .collect();
                    let flush = async move {
                        storage.flush().await?;
                        for (offset, len) in written {
                            storage.evict(offset, len);
                        }
                        Ok(())
                    };
                    self.flushing = Some((Box::pin(flush), replies));
                    progressed = true;
                }
            }
            // Write out.
            while self.out.has_remaining() {
                match poll_write_buf(Pin::new(&mut self.stream), cx, &mut self.out) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(SessionEnd::ClosedWhileWriting),
                    Poll::Ready(Ok(_)) => progressed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(SessionEnd::Lost(e)),
                    Poll::Pending => break,
                }
            }
            // The last frame is written: now the link may close.
            if !self.out.has_remaining() {
                if let Some(reason) = self.closing.take() {
                    return Poll::Ready(SessionEnd::Closed(reason));
                }
            }
            // Read in.
            if jobs.len() < MAX_SESSION_APPLIES {
                loop {
                    match wire::check(&self.rbuf) {
                        Err(e) => return Poll::Ready(SessionEnd::BadFrame(e)),
                        Ok(0) => {
                            let frame = match wire::decode(&mut self.rbuf) {
                                Ok(frame) => frame,
                                Err(e) => return Poll::Ready(SessionEnd::BadFrame(e)),
                            };
                            self.last_heard = Instant::now();
                            self.exact_reads = frame.payload.len() > EXACT_READ_BYTES;
                            if let Some(reason) = self.dispatch(frame, jobs, start) {
                                return Poll::Ready(reason);
                            }
                            progressed = true;
                            if jobs.len() >= MAX_SESSION_APPLIES {
                                break;
                            }
                        }
                        Ok(needed) => {
                            let read = if self.exact_reads || needed > EXACT_READ_BYTES {
                                self.rbuf.reserve(needed);
                                let mut exact = (&mut self.rbuf).limit(needed);
                                poll_read_buf(Pin::new(&mut self.stream), cx, &mut exact)
                            } else {
                                self.rbuf.reserve(READ_CHUNK_BYTES);
                                poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf)
                            };
                            match read {
                                Poll::Ready(Ok(0)) => return Poll::Ready(SessionEnd::PeerClosed),
                                Poll::Ready(Ok(_)) => {
                                    progressed = true;
                                    continue;
                                }
                                Poll::Ready(Err(e)) => return Poll::Ready(SessionEnd::Lost(e)),
                                Poll::Pending => break,
                            }
                        }
                    }
                }
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    fn finish(&mut self, done: Done) -> Option<SessionEnd> {
        if self.sync_job_ids.remove(&done.id) {
            self.sync_jobs -= 1;
        }
        if let Some((_, latch)) = self.ranges.remove(&done.id) {
            latch.cancel();
        }
        if let Some(latch) = self.all_done.remove(&done.id) {
            latch.cancel();
        }
        if let Some(error) = done.failure {
            if let Some(disk) = &self.config.disk {
                if !disk.failed.swap(true, AtomicOrdering::Relaxed) {
                    let _ = self.events.try_send(PeerEvent::DiskFailed {
                        error: error.clone(),
                    });
                }
            }
        }
        if let Some(reply) = done.reply {
            if done.after_flush {
                self.unflushed.push((reply, done.clear));
            } else if let Err(e) = self.out.push(&reply.0, reply.1) {
                return Some(SessionEnd::Encode {
                    what: "reply",
                    error: e,
                });
            }
        }
        None
    }

    /// The bookkeeping every replicated write (data or zeroes) shares
    /// before it is applied: refused on a diskless node, remembered as
    /// unconfirmed, and acknowledged at once under protocols A and B.
    fn take_replicated_write(
        &mut self,
        seq: u64,
        offset: u64,
        len: u64,
        complete_below: u64,
        ack_on_receipt: bool,
    ) -> Result<(), SessionEnd> {
        if self.config.disk.is_none() {
            return Err(SessionEnd::DataToDiskless);
        }
        self.unconfirmed
            .push(seq, offset, len, complete_below, self.config.disk.as_ref());
        if ack_on_receipt {
            self.out
                .push(&Message::WriteAck { seq, ok: true }, Bytes::new())
                .map_err(|error| SessionEnd::Encode { what: "ack", error })?;
        }
        Ok(())
    }

    fn start_job<F, M>(
        &mut self,
        jobs: &mut FuturesUnordered<F>,
        start: M,
        range: Option<Range<u64>>,
        job: Job,
    ) where
        F: Future<Output = Done>,
        M: Fn(Option<LocalDisk>, u8, u64, Vec<CancellationToken>, Job) -> F,
    {
        let id = self.next_job;
        self.next_job += 1;
        let waits: Vec<CancellationToken> = match (&job, &range) {
            (Job::Barrier { .. }, _) => self.all_done.values().cloned().collect(),
            (_, Some(range)) => self
                .ranges
                .values()
                .filter(|(other, _)| other.start < range.end && range.start < other.end)
                .map(|(_, latch)| latch.clone())
                .collect(),
            _ => Vec::new(),
        };
        if matches!(
            job,
            Job::SyncData { .. } | Job::SyncZeroes { .. } | Job::SyncHashes { .. }
        ) {
            self.sync_jobs += 1;
            self.sync_job_ids.insert(id);
        }
        let latch = CancellationToken::new();
        if let Some(range) = range {
            self.ranges.insert(id, (range, latch.clone()));
        }
        self.all_done.insert(id, latch);
        jobs.push(start(
            self.config.disk.clone(),
            self.link.peer,
            id,
            waits,
            job,
        ));
    }

    fn dispatch<F, M>(
        &mut self,
        frame: Frame,
        jobs: &mut FuturesUnordered<F>,
        start: M,
    ) -> Option<SessionEnd>
    where
        F: Future<Output = Done>,
        M: Fn(Option<LocalDisk>, u8, u64, Vec<CancellationToken>, Job) -> F,
    {
        let us = NodeSet::from_iter([self.config.me, self.link.peer]);
        let missing_of = |sent_to: u32, data_nodes: NodeSet| {
            data_nodes.without(NodeSet::from_bits(sent_to)).without(us)
        };
        let data_nodes = self
            .config
            .disk
            .as_ref()
            .map_or(NodeSet::EMPTY, |d| d.data_nodes);
        let ack_on_receipt = self.config.protocol != Protocol::C;
        match frame.message {
            Message::Ping { id } => {
                let lease_granted = self.link.answer_heartbeat(id, now_nanos());
                let pong = Message::Pong { id, lease_granted };
                if let Err(e) = self.out.push(&pong, Bytes::new()) {
                    return Some(SessionEnd::Encode {
                        what: "pong",
                        error: e,
                    });
                }
            }
            Message::Pong { id, lease_granted } => {
                self.last_pong = Instant::now();
                let sent = self.pings_sent.iter().find(|(ping, _)| *ping == id);
                if let Some(&(_, sent)) = sent.filter(|_| lease_granted) {
                    self.link.heartbeat_confirmed(sent);
                    self.config.lease.renewed();
                }
            }
            Message::WriteAck { seq, ok } => self.link.acked(seq, ok),
            Message::BarrierAck { epoch, ok } => self.link.barrier_acked(epoch, ok),
            Message::Write {
                seq,
                offset,
                fua,
                sent_to,
                complete_below,
                ..
            } => {
                let len = frame.payload.len() as u64;
                if let Err(refusal) =
                    self.take_replicated_write(seq, offset, len, complete_below, ack_on_receipt)
                {
                    return Some(refusal);
                }
                let job = Job::Write {
                    seq,
                    offset,
                    data: frame.payload,
                    fua,
                    missing: missing_of(sent_to, data_nodes),
                    ack_after: !ack_on_receipt,
                };
                self.start_job(jobs, start, Some(offset..offset + len.max(1)), job);
            }
            Message::Zeroes {
                seq,
                offset,
                len,
                may_punch,
                fua,
                sent_to,
                complete_below,
                ..
            } => {
                if let Err(refusal) =
                    self.take_replicated_write(seq, offset, len, complete_below, ack_on_receipt)
                {
                    return Some(refusal);
                }
                let job = Job::Zeroes {
                    seq,
                    offset,
                    len,
                    may_punch,
                    fua,
                    missing: missing_of(sent_to, data_nodes),
                    ack_after: !ack_on_receipt,
                };
                self.start_job(jobs, start, Some(offset..offset + len.max(1)), job);
            }
            Message::Barrier { epoch } => self.start_job(jobs, start, None, Job::Barrier { epoch }),
            Message::SyncData { offset } => {
                let len = frame.payload.len() as u64;
                let job = Job::SyncData {
                    offset,
                    data: frame.payload,
                };
                self.start_job(jobs, start, Some(offset..offset + len.max(1)), job);
            }
            Message::SyncZeroes { offset, len } => {
                self.start_job(
                    jobs,
                    start,
                    Some(offset..offset + len.max(1)),
                    Job::SyncZeroes { offset, len },
                );
            }
            Message::SyncHashes { offset, blocks } => {
                let range = offset..offset + u64::from(blocks) * 4096;
                let job = Job::SyncHashes {
                    offset,
                    blocks,
                    hashes: frame.payload,
                };
                self.start_job(jobs, start, Some(range), job);
            }
            Message::VerifyHashes { offset, blocks } => {
                let range = offset..offset + u64::from(blocks) * 4096;
                let job = Job::VerifyHashes {
                    offset,
                    blocks,
                    hashes: frame.payload,
                };
                self.start_job(jobs, start, Some(range), job);
            }
            Message::SyncAck { .. } | Message::SyncNeed { .. } | Message::VerifyResult { .. } => {
                if !self.link.route_sync_reply(frame) {
                    tracing::debug!(peer = %self.link.name, "sync reply with no driver (resync ended)");
                }
            }
            Message::Hello { .. } | Message::Auth { .. } => {
                return Some(SessionEnd::RepeatedHandshake);
            }
            Message::NewGeneration { .. } => {
                // Writes from the sender not yet confirmed everywhere may be
                // missing on whichever peer the sender just lost: mark them
                // toward every other data node before taking the new
                // generation.
                if let Some(disk) = &self.config.disk {
                    let others = disk.data_nodes.without(us);
                    for &(_, offset, len) in &self.unconfirmed.writes {
                        disk.tracker.mark_many(others, offset, len);
                    }
                }
                let peer = self.link.peer;
                if self
                    .events
                    .try_send(PeerEvent::Frame { peer, frame })
                    .is_err()
                {
                    return Some(SessionEnd::CoreBehind);
                }
            }
            message => {
                let peer = self.link.peer;
                let frame = Frame {
                    message,
                    payload: frame.payload,
                };
                if self
                    .events
                    .try_send(PeerEvent::Frame { peer, frame })
                    .is_err()
                {
                    return Some(SessionEnd::CoreBehind);
                }
            }
        }
        None
    }
}

/// Checks a resync/verify mask reply.
pub fn decode_mask(frame: &Frame, blocks: u32) -> Result<Vec<bool>, wire::WireError> {
    mask_from_bytes(&frame.payload, blocks as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bad_checksum_counts_as_a_corrupt_frame() {
        let corrupt = SessionEnd::BadFrame(wire::WireError::BadChecksum);
        assert!(corrupt.corrupt());
        assert_eq!(
            corrupt.to_string(),
            format!("bad frame from peer: {}", wire::WireError::BadChecksum)
        );
        // A reason that merely mentions a checksum is not one.
        let closed = SessionEnd::Closed(format!("{}", wire::WireError::BadChecksum));
        assert!(!closed.corrupt());
        assert!(!SessionEnd::PeerClosed.corrupt());
        assert_eq!(
            SessionEnd::Silent(1500).to_string(),
            "peer silent for 1500 ms (ping timeout)"
        );
    }
}
