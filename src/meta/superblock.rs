//! The superblock: a node's durable identity and state, one 4 KiB block.
//!
//! Two copies alternate; each write carries a sequence number one higher
//! than the last, so a torn write damages only the copy being written (its
//! crc32c fails) and the other, one step older, is read instead. A block
//! never parses as valid but wrong: magic, version, crc and every length are
//! checked before a field is trusted.
//!
//! Encoding (little endian, v1): magic, version, crc32c of the block with the
//! crc field zeroed, then the fields in the order of [`Superblock`], padded
//! with zeroes to 4096 bytes.

use super::layout::{Layout, META_BLOCK_BYTES};
use crate::config::MAX_NAME_LEN;
use crate::vocabulary::generation::{
    keep_abandoned, Abandoned, Generation, Lineage, MAX_ABANDONED, MAX_GENERATION_HISTORY,
};

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"HABLK\0SB";

/// Format versions of the metadata; each variant's doc line is the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum FormatVersion {
    /// Superblock, alternating copies, per-peer bitmap slots, activity log.
    V1 = 1,
}

pub const CURRENT_FORMAT: FormatVersion = FormatVersion::V1;

const CRC_OFFSET: usize = 12;
const BLOCK: usize = META_BLOCK_BYTES as usize;

/// What kind of node wrote the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    Data,
    Witness,
}

/// The disk state that survives a restart. A node restarting with
/// `UpToDate` comes up `Consistent` until a quorum confirms it is current
/// (a lone data node without peers is current by definition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDisk {
    Inconsistent,
    Outdated,
    UpToDate,
}

/// A bitmap slot: which peer it tracks, and since which generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSlot {
    /// `None` = free slot.
    pub node_id: Option<u8>,
    /// The bitmap holds every block written since the peer last had this
    /// data generation. `None`: the bitmap says nothing reliable about the
    /// peer (never synced), so a resync toward it must be full.
    pub tracking: Option<Generation>,
}

/// Durable flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SuperblockFlags {
    /// Set on promotion, cleared on a clean demotion: a node that restarts
    /// with it set crashed while Primary, and its activity log extents are
    /// suspect toward every peer.
    pub primary_crashed: bool,
    /// The data was never synced (fresh `create-md`) or was invalidated: a
    /// resync toward this node must compare everything.
    pub needs_full_sync: bool,
    /// A write was acknowledged in the current data generation (a Primary
    /// that wrote nothing can be discarded after a split-brain).
    pub wrote_in_generation: bool,
}

const FLAG_PRIMARY_CRASHED: u32 = 1;
const FLAG_NEEDS_FULL_SYNC: u32 = 2;
const FLAG_WROTE_IN_GENERATION: u32 = 4;
const KNOWN_FLAGS: u32 = FLAG_PRIMARY_CRASHED | FLAG_NEEDS_FULL_SYNC | FLAG_WROTE_IN_GENERATION;

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Write sequence: the copy with the higher valid one is current.
    pub seq: u64,
    /// Random per `create-md`: bitmap pages and activity-log blocks carry it,
    /// so leftovers of an earlier `create-md --force` are never mistaken for
    /// current metadata.
    pub instance: u64,
    pub resource: String,
    pub node_id: u8,
    pub node_name: String,
    pub kind: StoredKind,
    /// Size of the device when the metadata was created.
    pub device_bytes: u64,
    pub layout: Layout,
    /// The resource's data size; 0 until the first generation fixes it.
    pub data_size_bytes: u64,
    pub disk: StoredDisk,
    pub flags: SuperblockFlags,
    pub lineage: Lineage,
    /// The newest generation recorded as a voter.
    pub known: Generation,
    pub peer_slots: Vec<PeerSlot>,
    /// Activity log size in extents.
    pub al_extents: u32,
    /// Set while the current generation is being recorded on the voters:
    /// the generation to go back to if this node restarts before the
    /// record settles (no write was acknowledged in the new one yet).
    pub recording_from: Option<Generation>,
    /// Generations given up before a majority recorded them, by this node
    /// or by the nodes it heard from (see [`keep_abandoned`]): reported,
    /// so a node holding one gives it back.
    pub abandoned: Vec<Abandoned>,
}

/// Why a superblock block was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("no hablk metadata (magic missing)")]
    NoMagic,
    #[error("metadata format version {0} is not understood by this hablk (it reads version {CURRENT})", CURRENT = CURRENT_FORMAT as u32)]
    UnknownVersion(u32),
    #[error("metadata checksum mismatch (torn or corrupted write)")]
    BadChecksum,
    #[error("metadata block is truncated")]
    Truncated,
    #[error("metadata field {0} holds an impossible value")]
    BadField(&'static str),
}

impl DecodeError {
    /// What the operator can do about it.
    pub fn advice(&self) -> &'static str {
        match self {
            DecodeError::NoMagic => "run `hablk create-md` first",
            DecodeError::UnknownVersion(_) => {
                "run the hablk release that wrote it; `create-md --force` would make this node \
                 forget its generations and need a full resync"
            }
            DecodeError::BadChecksum | DecodeError::Truncated | DecodeError::BadField(_) => {
                "both copies are damaged; `create-md --force` starts this node over (a full \
                 resync from a peer)"
            }
        }
    }
}

struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn name(&mut self, s: &str) {
        assert!(s.len() <= MAX_NAME_LEN);
        self.u8(s.len() as u8);
        self.buf.extend_from_slice(s.as_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let slice = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let mut b = [0; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn name(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        if len > MAX_NAME_LEN {
            return Err(DecodeError::BadField(field));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadField(field))
    }
}

impl Superblock {
    /// Encodes into one 4 KiB block with its crc.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer {
            buf: Vec::with_capacity(BLOCK),
        };
        w.buf.extend_from_slice(&SUPERBLOCK_MAGIC);
        w.u32(CURRENT_FORMAT as u32);
        w.u32(0); // crc, filled in below
        w.u64(self.seq);
        w.u64(self.instance);
        w.name(&self.resource);
        w.u8(self.node_id);
        w.name(&self.node_name);
        w.u8(match self.kind {
            StoredKind::Data => 0,
            StoredKind::Witness => 1,
        });
        w.u64(self.device_bytes);
        let l = &self.layout;
        for v in [
            l.data_capacity_bytes,
            l.superblock_offset,
            l.al_offset,
            l.al_bytes,
            l.bitmap_offset,
            l.bitmap_bytes_per_slot,
        ] {
            w.u64(v);
        }
        w.u8(l.max_peers);
        w.u64(self.data_size_bytes);
        w.u8(match self.disk {
            StoredDisk::Inconsistent => 0,
            StoredDisk::Outdated => 1,
            StoredDisk::UpToDate => 2,
        });
        let mut flags = 0;
        if self.flags.primary_crashed {
            flags |= FLAG_PRIMARY_CRASHED;
        }
        if self.flags.needs_full_sync {
            flags |= FLAG_NEEDS_FULL_SYNC;
        }
        if self.flags.wrote_in_generation {
            flags |= FLAG_WROTE_IN_GENERATION;
        }
        w.u32(flags);
        w.u64(self.lineage.current.0);
        assert!(self.lineage.history.len() <= MAX_GENERATION_HISTORY);
        w.u16(self.lineage.history.len() as u16);
        for g in &self.lineage.history {
            w.u64(g.0);
        }
        w.u64(self.known.0);
        assert_eq!(self.peer_slots.len(), usize::from(l.max_peers));
        for slot in &self.peer_slots {
            w.u8(slot.node_id.unwrap_or(u8::MAX));
            w.u8(u8::from(slot.tracking.is_some()));
            w.u64(slot.tracking.map_or(0, |g| g.0));
        }
        w.u32(self.al_extents);
        // Fields added after v1 shipped: a v1 block has zeroes here, which
        // read as "not recording" and "nothing abandoned".
        w.u8(u8::from(self.recording_from.is_some()));
        w.u64(self.recording_from.map_or(0, |g| g.0));
        assert!(self.abandoned.len() <= MAX_ABANDONED);
        w.u8(self.abandoned.len() as u8);
        for entry in &self.abandoned {
            w.u64(entry.generation.0);
            w.u64(entry.parent.0);
        }
        assert!(w.buf.len() <= BLOCK, "superblock overflows its block");
        w.buf.resize(BLOCK, 0);
        let crc = crc32c::crc32c(&w.buf);
        w.buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        w.buf
    }

    /// Decodes and verifies one block.
    pub fn decode(block: &[u8]) -> Result<Superblock, DecodeError> {
        if block.len() < BLOCK {
            return Err(DecodeError::Truncated);
        }
        let block = &block[..BLOCK];
        if block[..8] != SUPERBLOCK_MAGIC {
            return Err(DecodeError::NoMagic);
        }
        let mut r = Reader { buf: block, pos: 8 };
        let version = r.u32()?;
        if version != CURRENT_FORMAT as u32 {
            return Err(DecodeError::UnknownVersion(version));
        }
        let stored_crc = r.u32()?;
        let mut copy = block.to_vec();
        copy[CRC_OFFSET..CRC_OFFSET + 4].fill(0);
        if crc32c::crc32c(&copy) != stored_crc {
            return Err(DecodeError::BadChecksum);
        }
        let seq = r.u64()?;
        let instance = r.u64()?;
        let resource = r.name("resource")?;
        let node_id = r.u8()?;
        let node_name = r.name("node name")?;
        let kind = match r.u8()? {
            0 => StoredKind::Data,
            1 => StoredKind::Witness,
            _ => return Err(DecodeError::BadField("kind")),
        };
        let device_bytes = r.u64()?;
        let layout = Layout {
            data_capacity_bytes: r.u64()?,
            superblock_offset: r.u64()?,
            al_offset: r.u64()?,
            al_bytes: r.u64()?,
            bitmap_offset: r.u64()?,
            bitmap_bytes_per_slot: r.u64()?,
            max_peers: r.u8()?,
        };
        let data_size_bytes = r.u64()?;
        if data_size_bytes > layout.data_capacity_bytes {
            return Err(DecodeError::BadField("data size"));
        }
        let disk = match r.u8()? {
            0 => StoredDisk::Inconsistent,
            1 => StoredDisk::Outdated,
            2 => StoredDisk::UpToDate,
            _ => return Err(DecodeError::BadField("disk state")),
        };
        let flag_bits = r.u32()?;
        if flag_bits & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::BadField("flags"));
        }
        let flags = SuperblockFlags {
            primary_crashed: flag_bits & FLAG_PRIMARY_CRASHED != 0,
            needs_full_sync: flag_bits & FLAG_NEEDS_FULL_SYNC != 0,
            wrote_in_generation: flag_bits & FLAG_WROTE_IN_GENERATION != 0,
        };
        let current = Generation(r.u64()?);
        let history_len = usize::from(r.u16()?);
        if history_len > MAX_GENERATION_HISTORY {
            return Err(DecodeError::BadField("generation history"));
        }
        let mut history = Vec::with_capacity(history_len);
        for _ in 0..history_len {
            history.push(Generation(r.u64()?));
        }
        let known = Generation(r.u64()?);
        if layout.max_peers > crate::config::MAX_PEERS_LIMIT {
            return Err(DecodeError::BadField("max peers"));
        }
        let mut peer_slots = Vec::with_capacity(usize::from(layout.max_peers));
        for _ in 0..layout.max_peers {
            let id = r.u8()?;
            let node_id = match id {
                u8::MAX => None,
                id if id <= crate::config::MAX_NODE_ID => Some(id),
                _ => return Err(DecodeError::BadField("peer slot")),
            };
            let tracked = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::BadField("peer slot tracking")),
            };
            let generation = Generation(r.u64()?);
            peer_slots.push(PeerSlot {
                node_id,
                tracking: tracked.then_some(generation),
            });
        }
        let al_extents = r.u32()?;
        let recording_from = match r.u8()? {
            0 => None,
            1 => Some(Generation(r.u64()?)),
            _ => return Err(DecodeError::BadField("recording")),
        };
        if recording_from.is_none() {
            r.u64()?;
        }
        let abandoned_len = usize::from(r.u8()?);
        if abandoned_len > MAX_ABANDONED {
            return Err(DecodeError::BadField("abandoned generations"));
        }
        let mut abandoned = Vec::with_capacity(abandoned_len);
        for _ in 0..abandoned_len {
            abandoned.push(Abandoned {
                generation: Generation(r.u64()?),
                parent: Generation(r.u64()?),
            });
        }
        Ok(Superblock {
            seq,
            instance,
            resource,
            node_id,
            node_name,
            kind,
            device_bytes,
            layout,
            data_size_bytes,
            disk,
            flags,
            lineage: Lineage { current, history },
            known,
            peer_slots,
            al_extents,
            recording_from,
            abandoned,
        })
    }

    /// Remembers generations given up before a majority recorded them,
    /// all branching off `parent`, keeping what [`keep_abandoned`] keeps;
    /// call it once the lineage is back in `parent`.
    pub fn abandon(&mut self, given_up: &[Generation], parent: Generation) {
        let entries = given_up
            .iter()
            .map(|&generation| Abandoned { generation, parent });
        self.abandoned =
            keep_abandoned(&self.lineage, self.abandoned.iter().copied().chain(entries));
    }

    /// Bitmap slot that tracks `peer`, if one is assigned.
    pub fn slot_of(&self, peer: u8) -> Option<u8> {
        self.peer_slots
            .iter()
            .position(|slot| slot.node_id == Some(peer))
            .map(|index| index as u8)
    }

    /// Picks the newer valid copy of two.
    pub fn newest(
        a: Result<Superblock, DecodeError>,
        b: Result<Superblock, DecodeError>,
    ) -> Result<Superblock, DecodeError> {
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if a.seq >= b.seq { a } else { b }),
            (Ok(one), Err(_)) | (Err(_), Ok(one)) => Ok(one),
            // Prefer the more telling error: a version from the future over a
            // missing magic.
            (Err(a), Err(b)) => Err(match (&a, &b) {
                (DecodeError::NoMagic, _) => b,
                _ => a,
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::meta::layout::Placement;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Superblock {
        let layout = Layout::compute(Placement::Internal, 64 << 20, 7).unwrap();
        Superblock {
            seq: 3,
            instance: 0xfeed,
            resource: "r0".into(),
            node_id: 1,
            node_name: "beta".into(),
            kind: StoredKind::Data,
            device_bytes: 64 << 20,
            layout,
            data_size_bytes: 32 << 20,
            disk: StoredDisk::UpToDate,
            flags: SuperblockFlags {
                primary_crashed: true,
                needs_full_sync: true,
                wrote_in_generation: true,
            },
            lineage: Lineage {
                current: Generation(99),
                history: vec![Generation(5), Generation(0)],
            },
            known: Generation(99),
            peer_slots: (0..7)
                .map(|i| PeerSlot {
                    node_id: if i < 2 { Some(i * 2) } else { None },
                    tracking: (i > 0).then_some(Generation(u64::from(i))),
                })
                .collect(),
            al_extents: 1237,
            recording_from: Some(Generation(5)),
            abandoned: vec![Abandoned {
                generation: Generation(42),
                parent: Generation(5),
            }],
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let block = sb.encode();
        assert_eq!(block.len(), BLOCK);
        assert_eq!(Superblock::decode(&block).unwrap(), sb);
    }

    #[test]
    fn the_largest_superblock_fits_its_block() {
        let mut sb = sample();
        sb.layout.max_peers = crate::config::MAX_PEERS_LIMIT;
        sb.peer_slots = vec![
            PeerSlot {
                node_id: Some(3),
                tracking: Some(Generation(1))
            };
            usize::from(sb.layout.max_peers)
        ];
        sb.lineage.history = vec![Generation(7); MAX_GENERATION_HISTORY];
        sb.abandoned = vec![sb.abandoned[0]; MAX_ABANDONED];
        sb.resource = "r".repeat(MAX_NAME_LEN);
        sb.node_name = "n".repeat(MAX_NAME_LEN);
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let block = sample().encode();
        for i in 0..BLOCK {
            let mut bad = block.clone();
            bad[i] ^= 0x40;
            assert!(
                Superblock::decode(&bad).is_err(),
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn newest_valid_copy_wins() {
        let mut older = sample();
        older.seq = 1;
        let newer = sample();
        let torn = Err(DecodeError::BadChecksum);
        assert_eq!(
            Superblock::newest(Ok(older.clone()), Ok(newer.clone())).unwrap(),
            newer
        );
        assert_eq!(Superblock::newest(Ok(older.clone()), torn).unwrap(), older);
        assert_eq!(
            Superblock::newest(
                Err(DecodeError::NoMagic),
                Err(DecodeError::UnknownVersion(9))
            ),
            Err(DecodeError::UnknownVersion(9))
        );
    }

    proptest! {
        #[test]
        fn random_blocks_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn random_bodies_behind_a_valid_header_never_panic(
            body in prop::collection::vec(any::<u8>(), BLOCK - 16..=BLOCK - 16)
        ) {
            let mut block = SUPERBLOCK_MAGIC.to_vec();
            block.extend_from_slice(&1u32.to_le_bytes());
            block.extend_from_slice(&0u32.to_le_bytes());
            block.extend_from_slice(&body);
            let crc = crc32c::crc32c(&block);
            block[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
            let _ = Superblock::decode(&block);
        }
    }
}
