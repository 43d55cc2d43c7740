//! The activity log: which 4 MiB extents may have writes in flight.
//!
//! Before any write to an extent, the extent is entered in the log, and the
//! log is made durable; an extent leaves the log only after the bitmap pages
//! that cover it are on disk. After a crash, every extent still in the log
//! is marked dirty toward every peer: whatever was in flight there may have
//! reached some disks and not others. The log thereby bounds the resync
//! after a crash to `al-extents` × 4 MiB instead of the whole disk.
//!
//! On disk the log is a ring of 4 KiB transactions (DRBD's design): each
//! records the slots it changed and, in turn, a slice of the whole table
//! ("context"), so the newest transactions in the ring always describe the
//! whole table. Recovery replays every valid transaction in sequence order.

use std::collections::HashMap;
use std::ops::Range;

use super::layout::{AL_AREA_BYTES, META_BLOCK_BYTES};

/// Bytes covered by one activity-log extent.
pub const AL_EXTENT_BYTES: u64 = 4 << 20;
/// Transaction blocks in the ring.
pub const AL_RING_BLOCKS: u64 = AL_AREA_BYTES / META_BLOCK_BYTES;
/// Slot changes one transaction can carry.
pub const AL_UPDATES_PER_TX: usize = 64;
/// Table slots restated in each transaction.
pub const AL_CONTEXT_PER_TX: usize = 800;
const TX_HEADER_BYTES: usize = 32;
const TX_MAGIC: [u8; 4] = *b"HBAL";
const EMPTY: u32 = u32::MAX;

// A transaction fits its block, and the ring restates the largest table
// (65534 extents) well within its length, so replaying the ring always
// yields the whole table.
const _: () = assert!(
    TX_HEADER_BYTES + AL_UPDATES_PER_TX * 8 + AL_CONTEXT_PER_TX * 4 <= META_BLOCK_BYTES as usize
);
const _: () = assert!(65_534usize.div_ceil(AL_CONTEXT_PER_TX) < AL_RING_BLOCKS as usize);

/// Extents touched by the byte range `[offset, offset+len)`.
pub fn extents_of(offset: u64, len: u64) -> Range<u32> {
    if len == 0 {
        return 0..0;
    }
    let first = (offset / AL_EXTENT_BYTES) as u32;
    let last = ((offset + len - 1) / AL_EXTENT_BYTES) as u32;
    first..last + 1
}

/// Byte range of an extent.
pub fn extent_bytes(extent: u32) -> Range<u64> {
    let start = u64::from(extent) * AL_EXTENT_BYTES;
    start..start + AL_EXTENT_BYTES
}

/// The table of active extents, with pins (writes in flight) and LRU order.
#[derive(Debug, Clone)]
pub struct AlTable {
    slots: Vec<u32>,
    slot_of: HashMap<u32, usize>,
    pins: Vec<u32>,
    last_use: Vec<u64>,
    clock: u64,
    next_seq: u64,
    context_cursor: usize,
}

/// Extents to bring in, and who they replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (slot, new extent, evicted extent).
    pub moves: Vec<(usize, u32, Option<u32>)>,
}

impl Plan {
    pub fn evicted(&self) -> impl Iterator<Item = u32> + '_ {
        self.moves.iter().filter_map(|m| m.2)
    }
}

/// Every slot is pinned by writes in flight: wait for one to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom;

impl AlTable {
    pub fn new(capacity: u32) -> AlTable {
        let capacity = capacity as usize;
        AlTable {
            slots: vec![EMPTY; capacity],
            slot_of: HashMap::new(),
            pins: vec![0; capacity],
            last_use: vec![0; capacity],
            clock: 0,
            next_seq: 1,
            context_cursor: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Rebuilds the table from the ring's blocks (`blocks[i]` = block i).
    pub fn recover(capacity: u32, blocks: &[Vec<u8>], instance: u64) -> AlTable {
        let mut table = AlTable::new(capacity);
        let mut txs: Vec<(u64, &[u8])> = blocks
            .iter()
            .filter_map(|block| tx_seq(block, instance).map(|seq| (seq, block.as_slice())))
            .collect();
        txs.sort_by_key(|tx| tx.0);
        for (seq, block) in txs {
            table.replay(block);
            table.next_seq = seq + 1;
        }
        table.slot_of = table
            .slots
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != EMPTY)
            .map(|(slot, &e)| (e, slot))
            .collect();
        table
    }

    fn replay(&mut self, block: &[u8]) {
        let n_updates = usize::from(u16::from_le_bytes([block[24], block[25]]));
        let n_context = usize::from(u16::from_le_bytes([block[26], block[27]]));
        let context_start =
            u32::from_le_bytes([block[28], block[29], block[30], block[31]]) as usize;
        let u32_at =
            |i: usize| u32::from_le_bytes([block[i], block[i + 1], block[i + 2], block[i + 3]]);
        let context_base = TX_HEADER_BYTES + n_updates * 8;
        for i in 0..n_context {
            let slot = context_start + i;
            if slot < self.slots.len() {
                self.slots[slot] = u32_at(context_base + i * 4);
            }
        }
        for i in 0..n_updates {
            let slot = u32_at(TX_HEADER_BYTES + i * 8) as usize;
            if slot < self.slots.len() {
                self.slots[slot] = u32_at(TX_HEADER_BYTES + i * 8 + 4);
            }
        }
    }

    pub fn contains(&self, extent: u32) -> bool {
        self.slot_of.contains_key(&extent)
    }

    /// Extents in the log (after recovery: those to mark dirty).
    pub fn active(&self) -> Vec<u32> {
        let mut extents: Vec<u32> = self.slot_of.keys().copied().collect();
        extents.sort_unstable();
        extents
    }

    /// Pins `extents` if all are in the log already (the fast path).
    pub fn pin_if_present(&mut self, extents: Range<u32>) -> bool {
        if !extents.clone().all(|e| self.slot_of.contains_key(&e)) {
            return false;
        }
        self.clock += 1;
        for extent in extents {
            if let Some(&slot) = self.slot_of.get(&extent) {
                self.pins[slot] += 1;
                self.last_use[slot] = self.clock;
            }
        }
        true
    }

    pub fn unpin(&mut self, extents: Range<u32>) {
        for extent in extents {
            if let Some(&slot) = self.slot_of.get(&extent) {
                assert!(self.pins[slot] > 0, "unpin of an unpinned extent");
                self.pins[slot] = self.pins[slot].saturating_sub(1);
            }
        }
    }

    /// Chooses slots for the missing extents of `extents`: free slots
    /// first, then the least recently used unpinned ones.
    pub fn plan(&self, extents: Range<u32>) -> Result<Plan, NoRoom> {
        let missing: Vec<u32> = extents.filter(|e| !self.slot_of.contains_key(e)).collect();
        if missing.len() > AL_UPDATES_PER_TX {
            return Err(NoRoom);
        }
        let mut candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&slot| self.slots[slot] == EMPTY || self.pins[slot] == 0)
            .collect();
        candidates.sort_by_key(|&slot| (self.slots[slot] != EMPTY, self.last_use[slot]));
        if candidates.len() < missing.len() {
            return Err(NoRoom);
        }
        let moves = missing
            .into_iter()
            .zip(candidates)
            .map(|(extent, slot)| {
                let old = self.slots[slot];
                (slot, extent, (old != EMPTY).then_some(old))
            })
            .collect();
        Ok(Plan { moves })
    }

    /// Applies a plan, pins every extent of `extents`, and returns the
    /// transaction block and its ring index to write.
    pub fn commit(&mut self, plan: &Plan, extents: Range<u32>, instance: u64) -> (u64, Vec<u8>) {
        for &(slot, extent, evicted) in &plan.moves {
            assert_eq!(self.pins[slot], 0, "evicting a pinned extent");
            if let Some(old) = evicted {
                self.slot_of.remove(&old);
            }
            self.slots[slot] = extent;
            self.slot_of.insert(extent, slot);
        }
        let pinned = self.pin_if_present(extents);
        assert!(pinned, "every extent is present after commit");
        let updates: Vec<(usize, u32)> = plan.moves.iter().map(|m| (m.0, m.1)).collect();
        self.transaction(&updates, instance)
    }

    /// A transaction that empties the table (clean shutdown, after every
    /// bitmap page is on disk).
    pub fn clear(&mut self, instance: u64) -> Vec<(u64, Vec<u8>)> {
        let mut blocks = Vec::new();
        let all: Vec<(usize, u32)> = (0..self.slots.len()).map(|slot| (slot, EMPTY)).collect();
        for chunk in all.chunks(AL_UPDATES_PER_TX) {
            for &(slot, _) in chunk {
                if self.slots[slot] != EMPTY {
                    self.slot_of.remove(&self.slots[slot]);
                }
                self.slots[slot] = EMPTY;
                self.pins[slot] = 0;
            }
            blocks.push(self.transaction(chunk, instance));
        }
        blocks
    }

    fn transaction(&mut self, updates: &[(usize, u32)], instance: u64) -> (u64, Vec<u8>) {
        assert!(updates.len() <= AL_UPDATES_PER_TX);
        let seq = self.next_seq;
        self.next_seq += 1;
        let context_start = self.context_cursor;
        let n_context = AL_CONTEXT_PER_TX.min(self.slots.len() - context_start);
        self.context_cursor = (context_start + n_context) % self.slots.len();
        let mut block = vec![0u8; META_BLOCK_BYTES as usize];
        block[..4].copy_from_slice(&TX_MAGIC);
        block[8..16].copy_from_slice(&instance.to_le_bytes());
        block[16..24].copy_from_slice(&seq.to_le_bytes());
        block[24..26].copy_from_slice(&(updates.len() as u16).to_le_bytes());
        block[26..28].copy_from_slice(&(n_context as u16).to_le_bytes());
        block[28..32].copy_from_slice(&(context_start as u32).to_le_bytes());
        let mut at = TX_HEADER_BYTES;
        for &(slot, extent) in updates {
            block[at..at + 4].copy_from_slice(&(slot as u32).to_le_bytes());
            block[at + 4..at + 8].copy_from_slice(&extent.to_le_bytes());
            at += 8;
        }
        for slot in context_start..context_start + n_context {
            block[at..at + 4].copy_from_slice(&self.slots[slot].to_le_bytes());
            at += 4;
        }
        let crc = crc32c::crc32c(&block);
        block[4..8].copy_from_slice(&crc.to_le_bytes());
        (seq % AL_RING_BLOCKS, block)
    }
}

/// The sequence number of a valid transaction block of `instance`.
fn tx_seq(block: &[u8], instance: u64) -> Option<u64> {
    if block.len() != META_BLOCK_BYTES as usize || block[..4] != TX_MAGIC {
        return None;
    }
    let mut copy = block.to_vec();
    copy[4..8].fill(0);
    if crc32c::crc32c(&copy) != u32::from_le_bytes([block[4], block[5], block[6], block[7]]) {
        return None;
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&block[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if u64_at(8) != instance {
        return None;
    }
    let n_updates = usize::from(u16::from_le_bytes([block[24], block[25]]));
    let n_context = usize::from(u16::from_le_bytes([block[26], block[27]]));
    if n_updates > AL_UPDATES_PER_TX || n_context > AL_CONTEXT_PER_TX {
        return None;
    }
    Some(u64_at(16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring() -> Vec<Vec<u8>> {
        vec![vec![0u8; META_BLOCK_BYTES as usize]; AL_RING_BLOCKS as usize]
    }

    fn enter(
        table: &mut AlTable,
        ring: &mut [Vec<u8>],
        extents: Range<u32>,
    ) -> Result<Plan, NoRoom> {
        if table.pin_if_present(extents.clone()) {
            return Ok(Plan { moves: vec![] });
        }
        let plan = table.plan(extents.clone())?;
        let (index, block) = table.commit(&plan, extents, 7);
        ring[index as usize] = block;
        Ok(plan)
    }

    #[test]
    fn extents_of_ranges() {
        assert_eq!(extents_of(0, 1), 0..1);
        assert_eq!(extents_of(AL_EXTENT_BYTES - 1, 2), 0..2);
        assert_eq!(extents_of(3 * AL_EXTENT_BYTES, 32 << 20), 3..11);
        assert_eq!(extents_of(5, 0), 0..0);
    }

    #[test]
    fn pinned_extents_are_never_evicted() {
        let mut table = AlTable::new(2);
        let mut ring = ring();
        enter(&mut table, &mut ring, 0..1).unwrap();
        enter(&mut table, &mut ring, 1..2).unwrap();
        assert_eq!(table.plan(2..3), Err(NoRoom));
        table.unpin(0..1);
        let plan = enter(&mut table, &mut ring, 2..3).unwrap();
        assert_eq!(plan.evicted().collect::<Vec<_>>(), vec![0]);
        assert!(!table.contains(0) && table.contains(1) && table.contains(2));
    }

    #[test]
    fn recovery_yields_the_table_and_clear_empties_it() {
        let mut table = AlTable::new(1237);
        let mut ring = ring();
        for extent in 0..2000u32 {
            enter(&mut table, &mut ring, extent..extent + 1).unwrap();
            table.unpin(extent..extent + 1);
        }
        let recovered = AlTable::recover(1237, &ring, 7);
        assert_eq!(recovered.active(), table.active());
        assert_eq!(recovered.active().len(), 1237);
        assert!(
            AlTable::recover(1237, &ring, 8).active().is_empty(),
            "other instance: stale"
        );
        for (index, block) in table.clear(7) {
            ring[index as usize] = block;
        }
        assert!(AlTable::recover(1237, &ring, 7).active().is_empty());
    }

    proptest! {
        /// Whatever the order of writes, recovery from the ring gives back
        /// exactly the extents that were in the log.
        #[test]
        fn recovery_matches_memory(capacity in 7u32..40, writes in prop::collection::vec(0u32..100, 1..400),
                                    torn in prop::option::of(0usize..256)) {
            let mut table = AlTable::new(capacity);
            let mut ring = ring();
            let mut last_index = None;
            for extent in writes {
                if !table.pin_if_present(extent..extent + 1) {
                    let plan = table.plan(extent..extent + 1).unwrap();
                    let (index, block) = table.commit(&plan, extent..extent + 1, 7);
                    ring[index as usize] = block;
                    last_index = Some(index);
                }
                table.unpin(extent..extent + 1);
            }
            let recovered = AlTable::recover(capacity, &ring, 7);
            prop_assert_eq!(recovered.active(), table.active());
            // A torn block other than the newest loses nothing that matters:
            // every extent of memory is still in the recovered log or was
            // in the log at the torn transaction.
            if let (Some(torn), Some(last)) = (torn, last_index) {
                if torn as u64 == last {
                    ring[torn][100] ^= 1;
                    let after = AlTable::recover(capacity, &ring, 7);
                    prop_assert!(after.active().len() <= capacity as usize);
                }
            }
        }
    }
}
