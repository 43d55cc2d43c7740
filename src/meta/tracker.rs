//! The live dirty-tracking state of a data node: one bitmap per peer slot
//! and the activity log, shared by the write path, the replication
//! receiver, resync and the cluster core.
//!
//! Invariants, paired as TigerBeetle's style asks:
//! - an extent is in the activity log (durably) before any write to it is
//!   issued ([`Tracker::enter`] returns only then), and leaves it only after
//!   the bitmap pages covering it are on disk;
//! - a bit is set in memory before the write it covers is issued toward a
//!   peer that will not get it, and cleared only after the block is durable
//!   on that peer.
//!
//! At open, every extent left in the log (a crash) is marked dirty toward
//! every peer, those pages are written, and the log is emptied.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::activity_log::{extent_bytes, extents_of, AlTable, NoRoom, AL_RING_BLOCKS};
use super::bitmap::{blocks_of, DirtyBitmap};
use super::layout::{Layout, META_BLOCK_BYTES};
use super::superblock::Superblock;
use super::{write_durable, MetaError};
use crate::vocabulary::node::NodeSet;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update below is complete before its guard drops; a poisoned
    // lock holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bitmaps and activity log of one data node.
#[derive(Debug)]
pub struct Tracker {
    file: Arc<File>,
    path: PathBuf,
    layout: Layout,
    instance: u64,
    /// Slot index → peer node id.
    slots: Vec<Option<u8>>,
    bitmaps: Vec<Mutex<DirtyBitmap>>,
    al: Mutex<AlTable>,
    /// Serialises activity-log transactions.
    al_writer: tokio::sync::Mutex<()>,
    /// Signalled when an extent is unpinned (room may have appeared).
    al_room: Notify,
    /// The engine tests write in place rather than on a blocking thread,
    /// so that what completes when depends only on the order of steps.
    #[cfg(test)]
    in_place: bool,
}

/// Extents pinned in the activity log while a write is in flight.
#[derive(Debug)]
pub struct AlPin {
    tracker: Arc<Tracker>,
    extents: Range<u32>,
}

impl Drop for AlPin {
    fn drop(&mut self) {
        lock(&self.tracker.al).unpin(self.extents.clone());
        self.tracker.al_room.notify_waiters();
    }
}

fn io_error(what: &'static str, path: &std::path::Path, source: std::io::Error) -> MetaError {
    MetaError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl Tracker {
    /// Loads bitmaps and the activity log, applying crash recovery.
    pub fn open(path: PathBuf, superblock: &Superblock) -> Result<Arc<Tracker>, MetaError> {
        Self::open_with(path, superblock, false)
    }

    /// `open`, for the engine tests: every write done in place.
    #[cfg(test)]
    pub fn open_in_place(
        path: PathBuf,
        superblock: &Superblock,
    ) -> Result<Arc<Tracker>, MetaError> {
        Self::open_with(path, superblock, true)
    }

    fn open_with(
        path: PathBuf,
        superblock: &Superblock,
        #[cfg_attr(not(test), allow(unused_variables))] in_place: bool,
    ) -> Result<Arc<Tracker>, MetaError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("cannot open metadata", &path, e))?;
        let layout = superblock.layout;
        let blocks = layout.data_capacity_bytes / super::layout::BITMAP_BLOCK_BYTES;
        let slots: Vec<Option<u8>> = superblock.peer_slots.iter().map(|s| s.node_id).collect();
        let mut bitmaps = Vec::with_capacity(slots.len());
        for (slot, node) in slots.iter().enumerate() {
            let mut bitmap = DirtyBitmap::new(blocks);
            if node.is_some() {
                let base = layout.bitmap_slot_offset(slot as u8);
                let mut page_bytes = vec![0u8; META_BLOCK_BYTES as usize];
                for page in 0..bitmap.pages() {
                    file.read_exact_at(&mut page_bytes, base + page * META_BLOCK_BYTES)
                        .map_err(|e| io_error("cannot read bitmap of", &path, e))?;
                    bitmap.load_page(page, &page_bytes, slot as u8, superblock.instance);
                }
            }
            bitmap.take_changed_pages();
            bitmaps.push(Mutex::new(bitmap));
        }
        let mut ring = Vec::with_capacity(AL_RING_BLOCKS as usize);
        if layout.al_bytes > 0 {
            for index in 0..AL_RING_BLOCKS {
                let mut block = vec![0u8; META_BLOCK_BYTES as usize];
                file.read_exact_at(&mut block, layout.al_offset + index * META_BLOCK_BYTES)
                    .map_err(|e| io_error("cannot read activity log of", &path, e))?;
                ring.push(block);
            }
        }
        let al = AlTable::recover(superblock.al_extents, &ring, superblock.instance);
        let tracker = Tracker {
            file: Arc::new(file),
            path,
            layout,
            instance: superblock.instance,
            slots,
            bitmaps,
            al: Mutex::new(al),
            al_writer: tokio::sync::Mutex::new(()),
            al_room: Notify::new(),
            #[cfg(test)]
            in_place,
        };
        tracker.recover_crash()?;
        Ok(Arc::new(tracker))
    }

    /// Marks every extent left in the log dirty toward every peer, writes
    /// those pages, then empties the log.
    fn recover_crash(&self) -> Result<(), MetaError> {
        let active = lock(&self.al).active();
        if !active.is_empty() {
            tracing::warn!(
                extents = active.len(),
                "activity log not empty (unclean stop): marking its extents out of sync toward every peer"
            );
        }
        for extent in &active {
            let range = extent_bytes(*extent);
            for (slot, node) in self.slots.iter().enumerate() {
                if node.is_some() {
                    lock(&self.bitmaps[slot])
                        .set_range(blocks_of(range.start, range.end - range.start));
                }
            }
        }
        self.write_changed_pages_blocking()?;
        let blocks = lock(&self.al).clear(self.instance);
        self.write_al_blocking(&blocks)
    }

    fn write_al_blocking(&self, blocks: &[(u64, Vec<u8>)]) -> Result<(), MetaError> {
        for (index, block) in blocks {
            write_durable(
                &self.file,
                block,
                self.layout.al_offset + index * META_BLOCK_BYTES,
            )
            .map_err(|e| io_error("cannot write activity log of", &self.path, e))?;
        }
        Ok(())
    }

    /// Collects the changed pages of every bitmap.
    fn changed_pages(&self) -> Vec<(u64, Vec<u8>)> {
        let mut writes = Vec::new();
        for (slot, node) in self.slots.iter().enumerate() {
            if node.is_none() {
                continue;
            }
            let mut bitmap = lock(&self.bitmaps[slot]);
            let base = self.layout.bitmap_slot_offset(slot as u8);
            for page in bitmap.take_changed_pages() {
                writes.push((
                    base + page * META_BLOCK_BYTES,
                    bitmap.encode_page(page, slot as u8, self.instance),
                ));
            }
        }
        writes
    }

    fn write_changed_pages_blocking(&self) -> Result<(), MetaError> {
        let writes = self.changed_pages();
        self.write_blocking(&writes)
    }

    fn write_blocking(&self, writes: &[(u64, Vec<u8>)]) -> Result<(), MetaError> {
        for (offset, bytes) in writes {
            write_durable(&self.file, bytes, *offset)
                .map_err(|e| io_error("cannot write bitmap of", &self.path, e))?;
        }
        Ok(())
    }

    async fn write(self: &Arc<Self>, writes: Vec<(u64, Vec<u8>)>) -> Result<(), MetaError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.off_thread(move |me| me.write_blocking(&writes)).await
    }

    /// Runs `work` on a blocking thread: metadata writes wait for the disk.
    async fn off_thread(
        self: &Arc<Self>,
        work: impl FnOnce(&Tracker) -> Result<(), MetaError> + Send + 'static,
    ) -> Result<(), MetaError> {
        #[cfg(test)]
        if self.in_place {
            return work(self);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || work(&me))
            .await
            .map_err(|e| {
                io_error(
                    "metadata writer failed for",
                    &self.path,
                    std::io::Error::other(e),
                )
            })?
    }

    /// Enters the extents of `[offset, offset+len)` in the activity log and
    /// pins them until the returned guard drops. Returns once the log entry
    /// is durable.
    pub async fn enter(self: &Arc<Self>, offset: u64, len: u64) -> Result<AlPin, MetaError> {
        let extents = extents_of(offset, len);
        loop {
            if lock(&self.al).pin_if_present(extents.clone()) {
                return Ok(AlPin {
                    tracker: self.clone(),
                    extents,
                });
            }
            let writer = self.al_writer.lock().await;
            let room = self.al_room.notified();
            let plan = {
                let mut al = lock(&self.al);
                if al.pin_if_present(extents.clone()) {
                    return Ok(AlPin {
                        tracker: self.clone(),
                        extents,
                    });
                }
                al.plan(extents.clone())
            };
            let plan = match plan {
                Ok(plan) => plan,
                Err(NoRoom) => {
                    drop(writer);
                    room.await;
                    continue;
                }
            };
            // The evicted extents' bitmap pages go to disk before the log
            // stops covering them.
            let evicted: Vec<u32> = plan.evicted().collect();
            let mut writes = Vec::new();
            for extent in evicted {
                let range = extent_bytes(extent);
                let blocks = blocks_of(range.start, range.end - range.start);
                for (slot, node) in self.slots.iter().enumerate() {
                    if node.is_none() {
                        continue;
                    }
                    let bitmap = lock(&self.bitmaps[slot]);
                    let base = self.layout.bitmap_slot_offset(slot as u8);
                    for page in bitmap.pages_of(blocks.clone()) {
                        writes.push((
                            base + page * META_BLOCK_BYTES,
                            bitmap.encode_page(page, slot as u8, self.instance),
                        ));
                    }
                }
            }
            self.write(writes).await?;
            let (index, block) = lock(&self.al).commit(&plan, extents.clone(), self.instance);
            let pin = AlPin {
                tracker: self.clone(),
                extents,
            };
            self.write(vec![(
                self.layout.al_offset + index * META_BLOCK_BYTES,
                block,
            )])
            .await?;
            drop(writer);
            return Ok(pin);
        }
    }

    fn slot(&self, node: u8) -> Option<usize> {
        self.slots.iter().position(|s| *s == Some(node))
    }

    /// Whether this node keeps a bitmap for `node`.
    pub fn tracks(&self, node: u8) -> bool {
        self.slot(node).is_some()
    }

    /// Marks `[offset, offset+len)` out of sync toward `node`.
    pub fn mark(&self, node: u8, offset: u64, len: u64) {
        if let Some(slot) = self.slot(node) {
            lock(&self.bitmaps[slot]).set_range(blocks_of(offset, len));
        }
    }

    /// Marks the range toward every peer in `nodes`.
    pub fn mark_many(&self, nodes: NodeSet, offset: u64, len: u64) {
        for (slot, node) in self.slots.iter().enumerate() {
            if let Some(node) = node {
                if nodes.contains(*node) {
                    lock(&self.bitmaps[slot]).set_range(blocks_of(offset, len));
                }
            }
        }
    }

    /// Clears `blocks` toward `node` (they are durable there).
    pub fn clear_blocks(&self, node: u8, blocks: Range<u64>) {
        if let Some(slot) = self.slot(node) {
            lock(&self.bitmaps[slot]).clear_range(blocks);
        }
    }

    /// Runs `f` on the bitmap kept for `node`.
    pub fn with_bitmap<R>(&self, node: u8, f: impl FnOnce(&mut DirtyBitmap) -> R) -> Option<R> {
        self.slot(node)
            .map(|slot| f(&mut lock(&self.bitmaps[slot])))
    }

    /// Out-of-sync bytes toward `node`.
    pub fn dirty_bytes(&self, node: u8) -> u64 {
        self.with_bitmap(node, |b| b.dirty_bytes()).unwrap_or(0)
    }

    /// Writes every changed bitmap page (periodically, and when a resync
    /// clears bits).
    pub async fn flush(self: &Arc<Self>) -> Result<(), MetaError> {
        let writes = self.changed_pages();
        self.write(writes).await
    }

    /// Clean stop: every page on disk, then an empty activity log, so the
    /// next start marks nothing.
    pub async fn close(self: &Arc<Self>) -> Result<(), MetaError> {
        let _writer = self.al_writer.lock().await;
        self.flush().await?;
        self.off_thread(|me| {
            let blocks = lock(&me.al).clear(me.instance);
            me.write_al_blocking(&blocks)
        })
        .await
    }
}
