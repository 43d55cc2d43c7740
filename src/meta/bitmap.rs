//! A dirty-region bitmap: one bit per 4 KiB block that a peer has missed.
//!
//! In memory a bitmap is a vector of u64 words with a running count of set
//! bits and a record of which on-disk pages changed since they were last
//! written. On disk it is a run of 4 KiB pages (see `layout.rs`), each with a
//! header: magic, crc32c, the metadata instance, slot and page index. A page
//! that is all zeroes was never written and is empty; a page from another
//! `create-md` instance is stale and empty; a page whose crc fails is
//! treated as all-set, so damage costs a resync, never lost data.

use std::collections::BTreeSet;
use std::ops::Range;

use super::layout::{
    BITMAP_BLOCK_BYTES, BITMAP_PAGE_HEADER_BYTES, BITS_PER_BITMAP_PAGE, META_BLOCK_BYTES,
};

/// Words of bitmap carried by one page.
pub const WORDS_PER_PAGE: usize = (BITS_PER_BITMAP_PAGE / 64) as usize;
const PAGE_MAGIC: [u8; 4] = *b"HBMP";

/// Blocks covered by the byte range `[offset, offset+len)`.
pub fn blocks_of(offset: u64, len: u64) -> Range<u64> {
    let first = offset / BITMAP_BLOCK_BYTES;
    let end = (offset + len).div_ceil(BITMAP_BLOCK_BYTES);
    first..end
}

/// The in-memory bitmap of one peer slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    blocks: u64,
    set: u64,
    changed_pages: BTreeSet<u64>,
}

impl DirtyBitmap {
    /// An empty bitmap for `blocks` blocks.
    pub fn new(blocks: u64) -> DirtyBitmap {
        DirtyBitmap {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            set: 0,
            changed_pages: BTreeSet::new(),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Out-of-sync bytes.
    pub fn dirty_bytes(&self) -> u64 {
        self.set * BITMAP_BLOCK_BYTES
    }

    pub fn is_set(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn touch(&mut self, word: usize) {
        self.changed_pages
            .insert(word as u64 / WORDS_PER_PAGE as u64);
    }

    /// Sets the bits of `blocks` (clipped to the bitmap); returns how many
    /// were newly set.
    pub fn set_range(&mut self, blocks: Range<u64>) -> u64 {
        self.update_range(blocks, true)
    }

    /// Clears the bits of `blocks`; returns how many were cleared.
    pub fn clear_range(&mut self, blocks: Range<u64>) -> u64 {
        self.update_range(blocks, false)
    }

    fn update_range(&mut self, blocks: Range<u64>, value: bool) -> u64 {
        let end = blocks.end.min(self.blocks);
        let mut block = blocks.start;
        let mut changed = 0;
        while block < end {
            let word = (block / 64) as usize;
            let bit = block % 64;
            let span = (64 - bit).min(end - block);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            let before = self.words[word];
            let after = if value { before | mask } else { before & !mask };
            if after != before {
                self.words[word] = after;
                let delta = u64::from((before ^ after).count_ones());
                changed += delta;
                self.touch(word);
            }
            block += span;
        }
        if value {
            self.set += changed;
        } else {
            self.set -= changed;
        }
        assert!(self.set <= self.blocks);
        changed
    }

    pub fn set_all(&mut self) {
        let blocks = self.blocks;
        self.set_range(0..blocks);
    }

    pub fn clear_all(&mut self) {
        let blocks = self.blocks;
        self.clear_range(0..blocks);
    }

    /// The first run of set bits at or after `from`, at most `max_blocks`
    /// long.
    pub fn next_run(&self, from: u64, max_blocks: u64) -> Option<Range<u64>> {
        let mut block = from;
        // Find the first set bit, a word at a time.
        loop {
            if block >= self.blocks {
                return None;
            }
            let word = self.words[(block / 64) as usize] >> (block % 64);
            if word != 0 {
                block += u64::from(word.trailing_zeros());
                break;
            }
            block = (block / 64 + 1) * 64;
        }
        if block >= self.blocks {
            return None;
        }
        let start = block;
        let limit = (start + max_blocks).min(self.blocks);
        while block < limit && self.is_set(block) {
            block += 1;
        }
        Some(start..block)
    }

    /// Non-zero words in chunks of at most `max_words`, for the exchange on
    /// connect: (first word index, words).
    pub fn set_word_chunks(&self, max_words: usize) -> Vec<(u64, Vec<u64>)> {
        let mut chunks: Vec<(u64, Vec<u64>)> = Vec::new();
        for (index, &word) in self.words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            match chunks.last_mut() {
                Some((first, words))
                    if *first + words.len() as u64 == index as u64 && words.len() < max_words =>
                {
                    words.push(word)
                }
                _ => chunks.push((index as u64, vec![word])),
            }
        }
        chunks
    }

    /// ORs in words received from a peer (bits beyond the end are ignored).
    pub fn merge_words(&mut self, first_word: u64, words: &[u64]) {
        let last_word = self.words.len().saturating_sub(1);
        let tail_bits = self.blocks % 64;
        for (i, &word) in words.iter().enumerate() {
            let Some(index) = first_word
                .checked_add(i as u64)
                .and_then(|index| usize::try_from(index).ok())
            else {
                return;
            };
            if index > last_word || word == 0 {
                continue;
            }
            let word = if index == last_word && tail_bits != 0 {
                word & ((1u64 << tail_bits) - 1)
            } else {
                word
            };
            let new_bits = word & !self.words[index];
            if new_bits != 0 {
                self.words[index] |= new_bits;
                self.set += u64::from(new_bits.count_ones());
                self.touch(index);
            }
        }
    }

    /// Pages changed since the last call.
    pub fn take_changed_pages(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.changed_pages)
            .into_iter()
            .collect()
    }

    pub fn pages(&self) -> u64 {
        (self.words.len() as u64).div_ceil(WORDS_PER_PAGE as u64)
    }

    /// Pages covering `blocks`.
    pub fn pages_of(&self, blocks: Range<u64>) -> Range<u64> {
        if blocks.is_empty() {
            return 0..0;
        }
        let first = blocks.start / BITS_PER_BITMAP_PAGE;
        let last = (blocks.end - 1) / BITS_PER_BITMAP_PAGE;
        first..(last + 1).min(self.pages())
    }

    /// Encodes page `page` for slot `slot` of metadata instance `instance`.
    pub fn encode_page(&self, page: u64, slot: u8, instance: u64) -> Vec<u8> {
        let mut out = vec![0u8; META_BLOCK_BYTES as usize];
        out[..4].copy_from_slice(&PAGE_MAGIC);
        out[8..16].copy_from_slice(&instance.to_le_bytes());
        out[16] = slot;
        out[20..28].copy_from_slice(&page.to_le_bytes());
        let first = page as usize * WORDS_PER_PAGE;
        let header = BITMAP_PAGE_HEADER_BYTES as usize;
        for (i, word) in self
            .words
            .iter()
            .skip(first)
            .take(WORDS_PER_PAGE)
            .enumerate()
        {
            out[header + i * 8..header + i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Loads page `page` from its on-disk bytes.
    pub fn load_page(&mut self, page: u64, bytes: &[u8], slot: u8, instance: u64) -> PageState {
        let first = page as usize * WORDS_PER_PAGE;
        if first >= self.words.len() {
            return PageState::Empty;
        }
        let state = page_state(bytes, page, slot, instance);
        let header = BITMAP_PAGE_HEADER_BYTES as usize;
        let words = (self.words.len() - first).min(WORDS_PER_PAGE);
        match state {
            PageState::Valid => {
                for i in 0..words {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(&bytes[header + i * 8..header + i * 8 + 8]);
                    let word = u64::from_le_bytes(word);
                    if word != 0 {
                        self.merge_words((first + i) as u64, &[word]);
                    }
                }
            }
            PageState::Corrupt => {
                let start = first as u64 * 64;
                self.set_range(start..start + words as u64 * 64);
            }
            PageState::Empty => {}
        }
        state
    }
}

/// What an on-disk page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    Valid,
    /// Never written, or written by an earlier `create-md`.
    Empty,
    /// Damaged: its region must be resynced.
    Corrupt,
}

fn page_state(bytes: &[u8], page: u64, slot: u8, instance: u64) -> PageState {
    if bytes.len() != META_BLOCK_BYTES as usize {
        return PageState::Corrupt;
    }
    if bytes.iter().all(|&b| b == 0) {
        return PageState::Empty;
    }
    if bytes[..4] != PAGE_MAGIC {
        return PageState::Corrupt;
    }
    let mut copy = bytes.to_vec();
    copy[4..8].fill(0);
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if crc32c::crc32c(&copy) != crc {
        return PageState::Corrupt;
    }
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&bytes[8..16]);
    if u64::from_le_bytes(stored) != instance {
        return PageState::Empty;
    }
    stored.copy_from_slice(&bytes[20..28]);
    if bytes[16] != slot || u64::from_le_bytes(stored) != page {
        return PageState::Corrupt;
    }
    PageState::Valid
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_and_counts() {
        let mut bitmap = DirtyBitmap::new(1000);
        assert_eq!(bitmap.set_range(10..200), 190);
        assert_eq!(bitmap.set_range(100..300), 100);
        assert_eq!(bitmap.count(), 290);
        assert_eq!(bitmap.clear_range(0..50), 40);
        assert_eq!(bitmap.next_run(0, 1000), Some(50..300));
        assert_eq!(bitmap.next_run(0, 7), Some(50..57));
        assert_eq!(bitmap.next_run(300, 1000), None);
        assert_eq!(bitmap.set_range(990..2000), 10, "clipped at the end");
        assert_eq!(bitmap.next_run(301, 100), Some(990..1000));
    }

    #[test]
    fn merged_words_from_a_peer_stay_inside_the_bitmap() {
        let mut bitmap = DirtyBitmap::new(100);
        // A hostile or confused peer: words past the end, an index that
        // would overflow, and bits beyond the last block are all dropped.
        bitmap.merge_words(u64::MAX, &[u64::MAX, u64::MAX]);
        bitmap.merge_words(2, &[u64::MAX, u64::MAX]);
        bitmap.merge_words(1, &[u64::MAX]);
        assert_eq!(bitmap.count(), 36, "only blocks 64..100 exist in word 1");
        assert_eq!(bitmap.next_run(0, 1000), Some(64..100));
    }

    #[test]
    fn byte_ranges_round_out_to_blocks() {
        assert_eq!(blocks_of(0, 4096), 0..1);
        assert_eq!(blocks_of(4095, 2), 0..2);
        assert_eq!(blocks_of(8192, 1), 2..3);
    }

    #[test]
    fn pages_round_trip_and_damage_means_dirty() {
        let blocks = BITS_PER_BITMAP_PAGE * 2 + 100;
        let mut bitmap = DirtyBitmap::new(blocks);
        bitmap.set_range(5..9);
        bitmap.set_range(BITS_PER_BITMAP_PAGE * 2 + 3..BITS_PER_BITMAP_PAGE * 2 + 4);
        let pages = bitmap.take_changed_pages();
        assert_eq!(pages, vec![0, 2]);
        let mut loaded = DirtyBitmap::new(blocks);
        for page in 0..bitmap.pages() {
            let bytes = bitmap.encode_page(page, 3, 42);
            assert_eq!(loaded.load_page(page, &bytes, 3, 42), PageState::Valid);
        }
        assert_eq!(loaded.count(), bitmap.count());
        assert!(loaded.is_set(7) && !loaded.is_set(9));

        let mut fresh = DirtyBitmap::new(blocks);
        let stale = bitmap.encode_page(0, 3, 41);
        assert_eq!(fresh.load_page(0, &stale, 3, 42), PageState::Empty);
        assert_eq!(fresh.load_page(0, &vec![0; 4096], 3, 42), PageState::Empty);
        let mut torn = bitmap.encode_page(0, 3, 42);
        torn[100] ^= 1;
        assert_eq!(fresh.load_page(0, &torn, 3, 42), PageState::Corrupt);
        assert_eq!(
            fresh.count(),
            BITS_PER_BITMAP_PAGE,
            "a damaged page resyncs its region"
        );
    }

    proptest! {
        /// The bitmap agrees with a plain set-of-blocks model.
        #[test]
        fn matches_a_model(ops in prop::collection::vec((any::<bool>(), 0u64..3000, 0u64..300), 1..60)) {
            let blocks = 2500;
            let mut bitmap = DirtyBitmap::new(blocks);
            let mut model = vec![false; blocks as usize];
            for (set, start, len) in ops {
                let range = start..start + len;
                if set { bitmap.set_range(range.clone()); } else { bitmap.clear_range(range.clone()); }
                for b in range { if b < blocks { model[b as usize] = set; } }
            }
            prop_assert_eq!(bitmap.count(), model.iter().filter(|&&b| b).count() as u64);
            for (b, &m) in model.iter().enumerate() { prop_assert_eq!(bitmap.is_set(b as u64), m); }
            // Runs cover exactly the set bits.
            let mut covered = 0;
            let mut from = 0;
            while let Some(run) = bitmap.next_run(from, 97) {
                for b in run.clone() { prop_assert!(model[b as usize]); }
                covered += run.end - run.start;
                from = run.end;
            }
            prop_assert_eq!(covered, bitmap.count());
            // Exchange chunks rebuild the same bitmap.
            let mut copy = DirtyBitmap::new(blocks);
            for (first, words) in bitmap.set_word_chunks(5) { copy.merge_words(first, &words); }
            prop_assert_eq!(copy.count(), bitmap.count());
        }
    }
}
