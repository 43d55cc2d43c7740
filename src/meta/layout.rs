//! Where each part of the metadata lives (docs/design.md, "Metadata on disk").
//!
//! Internal metadata sits at the end of the backing device, external
//! metadata at the start of its own file; the order of the parts is the same
//! and only the base differs:
//!
//! ```text
//! internal:  | data ........................ | bitmaps | activity log | SB0 SB1 |
//! external:  | SB0 SB1 | activity log | bitmaps |          (data: whole disk)
//! ```
//!
//! The two superblock copies sit at a fixed place (the last 8 KiB of the
//! device, or the first 8 KiB of the file) so they can be found from the
//! device alone; they record every other offset, so later releases can
//! change the arithmetic below without losing old disks.
//!
//! Bitmaps: one slot per peer (`max-peers`), one bit per 4 KiB data block,
//! stored in 4 KiB pages that each carry a small header with a crc32c.
//! A 1 TiB disk needs 2^28 bits = 32 MiB (plus headers) per slot, so 4
//! peers take 128 MiB, 7 take 224 MiB.

use super::MetaError;

/// The unit of metadata I/O and of the data area.
pub const META_BLOCK_BYTES: u64 = 4096;
/// One bit of a bitmap covers this many bytes of data.
pub const BITMAP_BLOCK_BYTES: u64 = 4096;
/// Two alternating superblock copies (crash-safe updates).
pub const SUPERBLOCK_COPIES: u64 = 2;
pub const SUPERBLOCK_AREA_BYTES: u64 = SUPERBLOCK_COPIES * META_BLOCK_BYTES;
/// Header of a bitmap page: magic, crc, slot, page index, instance.
pub const BITMAP_PAGE_HEADER_BYTES: u64 = 32;
/// Bits of bitmap carried by one 4 KiB page.
pub const BITS_PER_BITMAP_PAGE: u64 = (META_BLOCK_BYTES - BITMAP_PAGE_HEADER_BYTES) * 8;
/// The activity log ring: 256 transaction blocks of 4 KiB.
pub const AL_AREA_BYTES: u64 = 256 * META_BLOCK_BYTES;

const _: () = assert!(BITS_PER_BITMAP_PAGE % 64 == 0, "pages hold whole u64 words");
const _: () = assert!(META_BLOCK_BYTES % BITMAP_BLOCK_BYTES == 0);

/// Where the metadata lives relative to the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// At the end of the data device.
    Internal,
    /// In a file of its own (data uses the whole disk).
    External,
    /// A witness: only the superblock, no data at all.
    WitnessState,
}

/// Offsets of every metadata part, in the file that holds the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes usable for data (the most a data size can be).
    pub data_capacity_bytes: u64,
    pub superblock_offset: u64,
    pub al_offset: u64,
    pub al_bytes: u64,
    pub bitmap_offset: u64,
    pub bitmap_bytes_per_slot: u64,
    pub max_peers: u8,
}

/// Bitmap bytes (whole pages) needed to track `data_bytes`.
pub fn bitmap_bytes_per_slot(data_bytes: u64) -> u64 {
    let bits = data_bytes.div_ceil(BITMAP_BLOCK_BYTES);
    bits.div_ceil(BITS_PER_BITMAP_PAGE) * META_BLOCK_BYTES
}

impl Layout {
    /// Computes the layout for a data device of `device_bytes` bytes.
    pub fn compute(
        placement: Placement,
        device_bytes: u64,
        max_peers: u8,
    ) -> Result<Layout, MetaError> {
        let device_bytes = device_bytes - device_bytes % META_BLOCK_BYTES;
        let peers = u64::from(max_peers);
        match placement {
            Placement::WitnessState => Ok(Layout {
                data_capacity_bytes: 0,
                superblock_offset: 0,
                al_offset: SUPERBLOCK_AREA_BYTES,
                al_bytes: 0,
                bitmap_offset: SUPERBLOCK_AREA_BYTES,
                bitmap_bytes_per_slot: 0,
                max_peers,
            }),
            Placement::External => {
                let bitmap_bytes_per_slot = bitmap_bytes_per_slot(device_bytes);
                Ok(Layout {
                    data_capacity_bytes: device_bytes,
                    superblock_offset: 0,
                    al_offset: SUPERBLOCK_AREA_BYTES,
                    al_bytes: AL_AREA_BYTES,
                    bitmap_offset: SUPERBLOCK_AREA_BYTES + AL_AREA_BYTES,
                    bitmap_bytes_per_slot,
                    max_peers,
                })
            }
            Placement::Internal => {
                // Size the bitmaps for the whole device: a little more than
                // the data needs, never less.
                let bitmap_bytes_per_slot = bitmap_bytes_per_slot(device_bytes);
                let meta_bytes =
                    SUPERBLOCK_AREA_BYTES + AL_AREA_BYTES + peers * bitmap_bytes_per_slot;
                if device_bytes < meta_bytes + META_BLOCK_BYTES {
                    return Err(MetaError::DeviceTooSmall {
                        device_bytes,
                        meta_bytes,
                    });
                }
                let data_capacity_bytes = device_bytes - meta_bytes;
                Ok(Layout {
                    data_capacity_bytes,
                    bitmap_offset: data_capacity_bytes,
                    bitmap_bytes_per_slot,
                    al_offset: data_capacity_bytes + peers * bitmap_bytes_per_slot,
                    al_bytes: AL_AREA_BYTES,
                    superblock_offset: device_bytes - SUPERBLOCK_AREA_BYTES,
                    max_peers,
                })
            }
        }
    }

    /// Bytes the metadata file must have (external placement and witness).
    pub fn meta_file_bytes(&self) -> u64 {
        self.bitmap_offset + u64::from(self.max_peers) * self.bitmap_bytes_per_slot
    }

    /// Offset of one superblock copy.
    pub fn superblock_copy_offset(&self, copy: u64) -> u64 {
        assert!(copy < SUPERBLOCK_COPIES);
        self.superblock_offset + copy * META_BLOCK_BYTES
    }

    /// Offset of a bitmap slot's first page.
    pub fn bitmap_slot_offset(&self, slot: u8) -> u64 {
        assert!(slot < self.max_peers);
        self.bitmap_offset + u64::from(slot) * self.bitmap_bytes_per_slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    #[test]
    fn a_terabyte_with_four_peers_needs_about_128_mib_of_bitmaps() {
        let per_slot = bitmap_bytes_per_slot(TIB);
        assert!(per_slot >= 32 << 20, "2^28 bits need at least 32 MiB");
        let four = 4 * per_slot;
        assert!(four < 130 << 20, "{four} bytes for 4 peers");
    }

    #[test]
    fn internal_layout_parts_do_not_overlap() {
        for device in [64 << 20, GIB + 12345, 3 * TIB] {
            for peers in [1u8, 7, 31] {
                let l = Layout::compute(Placement::Internal, device, peers).unwrap();
                assert_eq!(l.data_capacity_bytes % META_BLOCK_BYTES, 0);
                assert!(bitmap_bytes_per_slot(l.data_capacity_bytes) <= l.bitmap_bytes_per_slot);
                assert_eq!(l.bitmap_offset, l.data_capacity_bytes);
                assert_eq!(
                    l.al_offset,
                    l.bitmap_offset + u64::from(peers) * l.bitmap_bytes_per_slot
                );
                assert_eq!(l.superblock_offset, l.al_offset + l.al_bytes);
                assert!(l.superblock_offset + SUPERBLOCK_AREA_BYTES <= device);
            }
        }
    }

    #[test]
    fn tiny_device_is_refused() {
        assert!(matches!(
            Layout::compute(Placement::Internal, 1 << 20, 7),
            Err(MetaError::DeviceTooSmall { .. })
        ));
    }

    #[test]
    fn external_layout_gives_the_whole_disk_to_data() {
        let l = Layout::compute(Placement::External, GIB, 7).unwrap();
        assert_eq!(l.data_capacity_bytes, GIB);
        assert_eq!(l.superblock_offset, 0);
        assert!(l.meta_file_bytes() > l.bitmap_offset);
    }
}
