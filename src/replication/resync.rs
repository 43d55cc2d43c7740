//! Resync and online verify, driven by the source.
//!
//! The source walks its bitmap for the target and streams what is marked:
//! - bitmap mode: each run is read under the write-ordering lock (so no
//!   application write to those blocks is in flight at the same time) and
//!   queued on the same stream as application writes, as data or, for
//!   all-zero runs, as one compact `SyncZeroes`;
//! - hash mode (full sync, `invalidate`): each chunk's block hashes go
//!   first; the target answers which blocks differ, and only those cross.
//!
//! Bits are cleared when the target confirms the blocks are durable. Up to
//! a window of bytes is in flight; the window shrinks while application
//! writes are in flight (adaptive), and `resync-rate` caps the rate. The
//! bitmap lives on, so a resync interrupted by either side's crash resumes
//! where it stopped.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use super::link::PeerLink;
use super::ordering::Ordering;
use super::session::decode_mask;
use super::wire::{block_hashes, Message, SyncMode};
use crate::meta::bitmap::blocks_of;
use crate::meta::tracker::Tracker;
use crate::storage::Storage;

/// Blocks per resync or verify request (1 MiB).
pub const SYNC_CHUNK_BLOCKS: u64 = 256;
/// Bytes in flight while the application is idle.
pub const SYNC_WINDOW_BYTES: u64 = 128 << 20;
/// Bytes in flight while application writes are in flight.
pub const SYNC_BUSY_WINDOW_BYTES: u64 = 4 << 20;
const BLOCK: u64 = 4096;

#[derive(Debug, Error)]
pub enum SyncError {
    #[error("connection to the peer was lost")]
    PeerLost,
    #[error("local disk failed: {0}")]
    Disk(std::io::Error),
    #[error("the peer answered out of turn: {0}")]
    Protocol(String),
}

/// Progress shared with `status`.
#[derive(Debug)]
pub struct SyncStats {
    pub started: Instant,
    /// Out-of-sync bytes when the sync began (for the percentage).
    pub start_dirty_bytes: u64,
    /// Bytes confirmed by the target so far.
    pub done_bytes: AtomicU64,
    /// Bytes of data actually sent (hash matches send none).
    pub sent_bytes: AtomicU64,
}

impl SyncStats {
    pub fn new(start_dirty_bytes: u64) -> SyncStats {
        SyncStats {
            started: Instant::now(),
            start_dirty_bytes,
            done_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        let elapsed = self.started.elapsed().as_secs_f64();
        if elapsed < 0.001 {
            return 0;
        }
        (self.done_bytes.load(AtomicOrdering::Relaxed) as f64 / elapsed) as u64
    }
}

/// What the source needs.
#[derive(Debug, Clone)]
pub struct SourceContext {
    pub storage: Arc<Storage>,
    pub tracker: Arc<Tracker>,
    pub ordering: Arc<Ordering>,
    /// 0 = adaptive.
    pub rate_bytes_per_sec: u64,
    /// Data size: nothing beyond it is synced.
    pub data_bytes: u64,
}

struct Driver<'a> {
    link: &'a PeerLink,
    ctx: &'a SourceContext,
    stats: &'a SyncStats,
    in_flight: u64,
    /// Hash chunks awaiting a `SyncNeed`: offset → blocks.
    hashing: HashMap<u64, u32>,
}

impl Driver<'_> {
    fn window(&self) -> u64 {
        if self.ctx.ordering.in_flight_writes() > 0 {
            SYNC_BUSY_WINDOW_BYTES
        } else {
            SYNC_WINDOW_BYTES
        }
    }

    async fn pace(&self) {
        let rate = self.ctx.rate_bytes_per_sec;
        if rate == 0 {
            return;
        }
        let sent = self.stats.sent_bytes.load(AtomicOrdering::Relaxed);
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        let elapsed = self.stats.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }

    /// Reads `blocks` under the ordering lock and queues them.
    async fn send_blocks(&mut self, blocks: Range<u64>) -> Result<(), SyncError> {
        let offset = blocks.start * BLOCK;
        let len =
            ((blocks.end - blocks.start) * BLOCK).min(self.ctx.data_bytes.saturating_sub(offset));
        if len == 0 {
            // Beyond the data: nothing to send, nothing differs.
            self.ctx.tracker.clear_blocks(self.link.peer, blocks);
            return Ok(());
        }
        let mut ticket = self.ctx.ordering.register(offset, len, false);
        ticket.wait_turn().await;
        let data = self
            .ctx
            .storage
            .read_uncached(offset, len as usize)
            .await
            .map_err(SyncError::Disk)?;
        let sent = if data.iter().all(|&b| b == 0) {
            self.link
                .send(Message::SyncZeroes { offset, len }, Bytes::new())
        } else {
            self.stats
                .sent_bytes
                .fetch_add(len, AtomicOrdering::Relaxed);
            self.link.send(Message::SyncData { offset }, data.freeze())
        };
        drop(ticket);
        if !sent {
            return Err(SyncError::PeerLost);
        }
        self.in_flight += len;
        self.pace().await;
        Ok(())
    }

    async fn send_hashes(&mut self, blocks: Range<u64>) -> Result<(), SyncError> {
        let offset = blocks.start * BLOCK;
        let len =
            ((blocks.end - blocks.start) * BLOCK).min(self.ctx.data_bytes.saturating_sub(offset));
        if len == 0 {
            self.ctx.tracker.clear_blocks(self.link.peer, blocks);
            return Ok(());
        }
        let data = self
            .ctx
            .storage
            .read_uncached(offset, len as usize)
            .await
            .map_err(SyncError::Disk)?;
        let count = len.div_ceil(BLOCK) as u32;
        if !self.link.send(
            Message::SyncHashes {
                offset,
                blocks: count,
            },
            Bytes::from(block_hashes(&data)),
        ) {
            return Err(SyncError::PeerLost);
        }
        self.hashing.insert(offset, count);
        self.in_flight += len;
        Ok(())
    }

    async fn on_reply(&mut self, frame: super::wire::Frame) -> Result<(), SyncError> {
        match frame.message {
            Message::SyncAck { offset, len } => {
                self.ctx
                    .tracker
                    .clear_blocks(self.link.peer, blocks_of(offset, len));
                self.in_flight = self.in_flight.saturating_sub(len);
                self.stats
                    .done_bytes
                    .fetch_add(len, AtomicOrdering::Relaxed);
            }
            Message::SyncNeed { offset, blocks } => {
                if self.hashing.remove(&offset) != Some(blocks) {
                    return Err(SyncError::Protocol(format!(
                        "SyncNeed for {offset} was not asked for"
                    )));
                }
                let mask =
                    decode_mask(&frame, blocks).map_err(|e| SyncError::Protocol(e.to_string()))?;
                let chunk_bytes = u64::from(blocks) * BLOCK;
                self.in_flight = self.in_flight.saturating_sub(chunk_bytes);
                let first = offset / BLOCK;
                let mut block = 0;
                while block < mask.len() {
                    let differs = mask[block];
                    let start = block;
                    while block < mask.len() && mask[block] == differs {
                        block += 1;
                    }
                    let run = first + start as u64..first + block as u64;
                    if differs {
                        self.send_blocks(run).await?;
                    } else {
                        // Same on both, and durable on the target.
                        self.ctx.tracker.clear_blocks(self.link.peer, run.clone());
                        self.stats
                            .done_bytes
                            .fetch_add((run.end - run.start) * BLOCK, AtomicOrdering::Relaxed);
                    }
                }
            }
            other => return Err(SyncError::Protocol(other.name().to_owned())),
        }
        Ok(())
    }
}

/// Streams every marked block to the peer; returns once the bitmap toward
/// it is empty and the target confirmed everything.
pub async fn run_source(
    link: Arc<PeerLink>,
    ctx: SourceContext,
    mode: SyncMode,
    stats: Arc<SyncStats>,
) -> Result<(), SyncError> {
    let mut replies = link.sync_replies();
    let mut driver = Driver {
        link: &link,
        ctx: &ctx,
        stats: &stats,
        in_flight: 0,
        hashing: HashMap::new(),
    };
    let data_blocks = ctx.data_bytes.div_ceil(BLOCK);
    let mut cursor = 0;
    loop {
        while driver.in_flight < driver.window() {
            let run = ctx
                .tracker
                .with_bitmap(link.peer, |b| b.next_run(cursor, SYNC_CHUNK_BLOCKS))
                .flatten();
            let Some(run) = run.filter(|r| r.start < data_blocks) else {
                break;
            };
            cursor = run.end;
            match mode {
                SyncMode::Bitmap => driver.send_blocks(run).await?,
                SyncMode::Hash => driver.send_hashes(run).await?,
            }
        }
        if driver.in_flight == 0 && driver.hashing.is_empty() {
            let left = ctx
                .tracker
                .with_bitmap(link.peer, |b| {
                    b.next_run(0, 1).filter(|r| r.start < data_blocks)
                })
                .flatten();
            match left {
                None => return Ok(()),
                Some(_) => {
                    // Bits set behind the cursor (a failed write): go again.
                    cursor = 0;
                    continue;
                }
            }
        }
        tokio::select! {
            frame = replies.recv() => match frame {
                Some(frame) => driver.on_reply(frame).await?,
                None => return Err(SyncError::PeerLost),
            },
            () = link.closed() => return Err(SyncError::PeerLost),
        }
    }
}

/// Online verify toward the peer: compares every block's hash, marks the
/// differing ones out of sync (here and on the peer), and returns how many
/// blocks differ.
pub async fn run_verify(
    link: Arc<PeerLink>,
    ctx: SourceContext,
    stats: Arc<SyncStats>,
) -> Result<u64, SyncError> {
    let mut replies = link.sync_replies();
    let mut offset = 0;
    let mut pending: HashMap<u64, u32> = HashMap::new();
    let mut differing = 0;
    let chunk = SYNC_CHUNK_BLOCKS * BLOCK;
    loop {
        while offset < ctx.data_bytes && (pending.len() as u64) * chunk < SYNC_WINDOW_BYTES {
            let len = chunk.min(ctx.data_bytes - offset);
            let data = ctx
                .storage
                .read_uncached(offset, len as usize)
                .await
                .map_err(SyncError::Disk)?;
            let blocks = len.div_ceil(BLOCK) as u32;
            if !link.send(
                Message::VerifyHashes { offset, blocks },
                Bytes::from(block_hashes(&data)),
            ) {
                return Err(SyncError::PeerLost);
            }
            pending.insert(offset, blocks);
            offset += len;
        }
        if pending.is_empty() {
            return Ok(differing);
        }
        let frame = tokio::select! {
            frame = replies.recv() => frame.ok_or(SyncError::PeerLost)?,
            () = link.closed() => return Err(SyncError::PeerLost),
        };
        let Message::VerifyResult { offset: at, blocks } = frame.message else {
            return Err(SyncError::Protocol(frame.message.name().to_owned()));
        };
        if pending.remove(&at) != Some(blocks) {
            return Err(SyncError::Protocol(format!(
                "VerifyResult for {at} was not asked for"
            )));
        }
        let mask = decode_mask(&frame, blocks).map_err(|e| SyncError::Protocol(e.to_string()))?;
        for (i, &differs) in mask.iter().enumerate() {
            if differs {
                let block = at / BLOCK + i as u64;
                ctx.tracker
                    .with_bitmap(link.peer, |b| b.set_range(block..block + 1));
                differing += 1;
            }
        }
        stats
            .done_bytes
            .fetch_add(u64::from(blocks) * BLOCK, AtomicOrdering::Relaxed);
    }
}
