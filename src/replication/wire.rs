//! The peer wire format.
//!
//! Every frame is `[u32 body length][u32 crc32c of body][body]`, body =
//! a [`Message`] header (postcard-encoded) followed by the message's bulk
//! payload (write data, resync data, hashes, bitmap words) as raw bytes.
//! Keeping bulk data out of the serde header means it is never copied: it
//! is sliced out of the receive buffer and handed to the disk as is.
//!
//! A frame longer than [`MAX_FRAME_BYTES`] or with a bad crc is never
//! decoded: the connection is dropped (and counted), and no byte of it
//! reaches a disk. Decoding is two-phase as in mini-redis: [`check`] says
//! whether a whole frame is buffered, [`decode`] parses it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::vocabulary::generation::{Generation, Lineage};
use crate::vocabulary::state::{DiskState, Role};

/// Versions of the peer protocol; each variant's doc line is the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ProtocolVersion {
    /// Handshake with digest and HMAC, replication, bitmaps, resync, verify,
    /// generations.
    V1 = 1,
    /// A `Pong` says whether it renews the sender's lease (a voter grants
    /// none to a Primary whose generation it has seen superseded).
    V2 = 2,
    /// A `Report` lists the generations its sender abandoned; `DiskState`
    /// no longer has `Attaching` (the tags after it moved down by one).
    V3 = 3,
}

pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion::V3;

/// Bytes of frame header: length and crc.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Largest body: a 32 MiB write plus its header, with room to spare.
pub const MAX_FRAME_BYTES: usize = (32 << 20) + 4096;
/// Largest postcard header of a message.
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// Hash of one 4 KiB block (BLAKE3, truncated to 128 bits).
pub const BLOCK_HASH_BYTES: usize = 16;

const _: () = assert!(MAX_HEADER_BYTES < MAX_FRAME_BYTES);

/// A node's state as it reports it to its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub role: Role,
    pub disk: DiskState,
    pub lineage: WireLineage,
    /// The newest generation recorded as a voter.
    pub known: u64,
    /// The resource's data size (0 = not fixed yet).
    pub data_size_bytes: u64,
    /// What this node's disk can hold.
    pub capacity_bytes: u64,
    /// Crashed while Primary: its activity-log extents are suspect.
    pub primary_crashed: bool,
    /// Peers it is connected to, with the role it sees for each.
    pub connections: Vec<(u8, Role)>,
    /// Whether it can zero ranges without writing data.
    pub fast_zero: bool,
    /// Never synced or invalidated: a resync toward it must be full.
    pub needs_full_sync: bool,
    /// The operator chose it as the split-brain victim.
    pub discard_my_data: bool,
    /// It may have acknowledged writes in its current data generation
    /// (for `after-split-brain = "discard-zero-changes"`).
    pub wrote_in_generation: bool,
    /// Its current generation is not recorded on a majority yet (it may
    /// never be): peers decide nothing on it until it is settled.
    pub recording_generation: bool,
    /// Generations it gave up before a majority recorded them, as
    /// (generation, the parent it went back to), newest first.
    pub abandoned: Vec<(u64, u64)>,
}

/// A lineage on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLineage {
    pub current: u64,
    pub history: Vec<u64>,
}

impl WireLineage {
    /// Whether `generation` is this lineage's current id or an ancestor
    /// (`Lineage::contains`, without converting).
    pub fn contains(&self, generation: Generation) -> bool {
        self.current == generation.0 || self.history.contains(&generation.0)
    }
}

impl From<&Lineage> for WireLineage {
    fn from(lineage: &Lineage) -> Self {
        WireLineage {
            current: lineage.current.0,
            history: lineage.history.iter().map(|g| g.0).collect(),
        }
    }
}

impl From<&WireLineage> for Lineage {
    fn from(wire: &WireLineage) -> Self {
        Lineage {
            current: Generation(wire.current),
            history: wire
                .history
                .iter()
                .take(crate::vocabulary::generation::MAX_GENERATION_HISTORY)
                .map(|&g| Generation(g))
                .collect(),
        }
    }
}

/// How a resync decides what to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncMode {
    /// Send the blocks the bitmap marks.
    Bitmap,
    /// Compare block hashes first; send only blocks that differ.
    Hash,
}

/// Every message between peers. Bulk data travels in the frame's payload;
/// the comment on a variant says what the payload holds.
///
/// postcard encodes a variant (here, and of `Role`, `DiskState`,
/// `SyncMode`) by its position: add new variants at the end only. The
/// bytes of every message are pinned by `encodings_are_pinned`, so a
/// reorder or a changed field fails the tests instead of the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message both ways.
    Hello {
        version: u16,
        digest: [u8; 32],
        resource: String,
        node_id: u8,
        node_name: String,
        nonce: [u8; 32],
    },
    /// HMAC-SHA256 proof of the shared secret over the peer's nonce.
    Auth {
        proof: [u8; 32],
    },
    /// The handshake is refused; the connection closes after this.
    Refuse {
        reason: String,
    },
    /// The handshake is accepted; the session starts.
    Welcome,
    /// Full state report: after the handshake and on every change.
    Report(NodeReport),
    Ping {
        id: u64,
    },
    Pong {
        id: u64,
        /// The answering voter backs the sender's lease: it has recorded
        /// no generation that supersedes the sender's.
        lease_granted: bool,
    },
    /// The sender's bitmap for the receiver; payload: little-endian u64
    /// words starting at `first_word`.
    Bitmap {
        first_word: u64,
    },
    /// End of the bitmap exchange (the sender sent all its set words).
    BitmapDone,
    /// Replicated write; payload: the data.
    Write {
        seq: u64,
        epoch: u64,
        offset: u64,
        fua: bool,
        /// Data node ids this write was sent to (bit per id).
        sent_to: u32,
        /// Every write with a lower sequence completed on all nodes.
        complete_below: u64,
    },
    /// Replicated TRIM or WRITE_ZEROES: the range reads back as zeroes.
    Zeroes {
        seq: u64,
        epoch: u64,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
        sent_to: u32,
        complete_below: u64,
    },
    /// Protocol B: received. Protocol C: written.
    WriteAck {
        seq: u64,
        ok: bool,
    },
    /// Flush point: acknowledge once every earlier write is durable.
    Barrier {
        epoch: u64,
    },
    BarrierAck {
        epoch: u64,
        ok: bool,
    },
    /// A resync starts, from the sender to the receiver.
    SyncBegin {
        mode: SyncMode,
        total_bytes: u64,
    },
    /// The receiver of `SyncBegin` does not agree to be the target.
    SyncRefuse {
        reason: String,
    },
    /// Resync data; payload: the blocks at `offset`.
    SyncData {
        offset: u64,
    },
    /// Resync of a zero run, sent compactly.
    SyncZeroes {
        offset: u64,
        len: u64,
    },
    /// Hash-based resync: payload holds one hash per 4 KiB block.
    SyncHashes {
        offset: u64,
        blocks: u32,
    },
    /// Reply to `SyncHashes`: payload holds a bitmask (LE u64 words) of the
    /// blocks that differ and must be sent.
    SyncNeed {
        offset: u64,
        blocks: u32,
    },
    /// These blocks are durable on the target.
    SyncAck {
        offset: u64,
        len: u64,
    },
    /// The resync is complete; the target takes this lineage.
    SyncEnd {
        lineage: WireLineage,
    },
    /// Online verify: payload holds one hash per block.
    VerifyHashes {
        offset: u64,
        blocks: u32,
    },
    /// Reply: payload holds a bitmask of differing blocks.
    VerifyResult {
        offset: u64,
        blocks: u32,
    },
    /// Record a new generation (compare-and-set on each voter).
    /// `may_adopt`: the voter is one of the sender's write targets, so it
    /// holds every write of the sender's current generation and may take
    /// the new one as its data generation.
    NewGeneration {
        lineage: WireLineage,
        token: u64,
        may_adopt: bool,
    },
    /// The answer; `adopted`: the voter, a data node in sync with the
    /// sender, took the generation as its data generation (so it must get
    /// every write from now on).
    GenerationRecorded {
        token: u64,
        accepted: bool,
        adopted: bool,
        known: u64,
    },
    /// `skip-initial-sync`: take this generation and be UpToDate.
    SkipSync {
        generation: u64,
        token: u64,
    },
    SkipSyncDone {
        token: u64,
        ok: bool,
    },
    /// The sender leaves cleanly (`down`): no lease wait is needed.
    Leaving,
    /// The sender found the two lines of history diverged.
    SplitBrain,
    /// A promotion asks every connected node afresh.
    PromoteQuery {
        token: u64,
    },
    /// The answer: the node's state right now, and how long it still backs
    /// a Primary it lost (lease wait).
    PromoteReply {
        token: u64,
        report: NodeReport,
        lease_wait_ms: u64,
    },
}

impl Message {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Auth { .. } => "Auth",
            Message::Refuse { .. } => "Refuse",
            Message::Welcome => "Welcome",
            Message::Report(_) => "Report",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Bitmap { .. } => "Bitmap",
            Message::BitmapDone => "BitmapDone",
            Message::Write { .. } => "Write",
            Message::Zeroes { .. } => "Zeroes",
            Message::WriteAck { .. } => "WriteAck",
            Message::Barrier { .. } => "Barrier",
            Message::BarrierAck { .. } => "BarrierAck",
            Message::SyncBegin { .. } => "SyncBegin",
            Message::SyncRefuse { .. } => "SyncRefuse",
            Message::SyncData { .. } => "SyncData",
            Message::SyncZeroes { .. } => "SyncZeroes",
            Message::SyncHashes { .. } => "SyncHashes",
            Message::SyncNeed { .. } => "SyncNeed",
            Message::SyncAck { .. } => "SyncAck",
            Message::SyncEnd { .. } => "SyncEnd",
            Message::VerifyHashes { .. } => "VerifyHashes",
            Message::VerifyResult { .. } => "VerifyResult",
            Message::NewGeneration { .. } => "NewGeneration",
            Message::GenerationRecorded { .. } => "GenerationRecorded",
            Message::SkipSync { .. } => "SkipSync",
            Message::SkipSyncDone { .. } => "SkipSyncDone",
            Message::Leaving => "Leaving",
            Message::SplitBrain => "SplitBrain",
            Message::PromoteQuery { .. } => "PromoteQuery",
            Message::PromoteReply { .. } => "PromoteReply",
        }
    }
}

/// A decoded frame: the message and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub message: Message,
    pub payload: Bytes,
}

/// Why bytes from a peer were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("frame checksum mismatch (corrupted in transit)")]
    BadChecksum,
    #[error("undecodable message: {0}")]
    Malformed(String),
    #[error("message header of {0} bytes is too large")]
    HeaderTooLarge(usize),
}

/// Encodes a frame into `out`.
pub fn encode(out: &mut BytesMut, message: &Message, payload: &[u8]) -> Result<(), WireError> {
    let header = postcard::to_stdvec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
    if header.len() > MAX_HEADER_BYTES {
        return Err(WireError::HeaderTooLarge(header.len()));
    }
    let body = header.len() + payload.len();
    if body > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(body));
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header), payload);
    out.reserve(FRAME_HEADER_BYTES + body);
    out.put_u32_le(body as u32);
    out.put_u32_le(crc);
    out.put_slice(&header);
    out.put_slice(payload);
    Ok(())
}

/// Encodes a frame whose payload is sent separately (no copy): returns the
/// bytes that go before the payload on the wire.
pub fn encode_head(message: &Message, payload: &[u8]) -> Result<BytesMut, WireError> {
    let header = postcard::to_stdvec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
    if header.len() > MAX_HEADER_BYTES {
        return Err(WireError::HeaderTooLarge(header.len()));
    }
    let body = header.len() + payload.len();
    if body > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(body));
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header), payload);
    let mut out = BytesMut::with_capacity(FRAME_HEADER_BYTES + header.len());
    out.put_u32_le(body as u32);
    out.put_u32_le(crc);
    out.put_slice(&header);
    Ok(out)
}

/// Phase one: how many more bytes a whole frame needs (0 = complete), or
/// an error for a frame that can never be valid.
pub fn check(buf: &[u8]) -> Result<usize, WireError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(FRAME_HEADER_BYTES - buf.len());
    }
    let body = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if body > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(body));
    }
    Ok((FRAME_HEADER_BYTES + body).saturating_sub(buf.len()))
}

/// Phase two: takes one complete frame off the front of `buf`.
pub fn decode(buf: &mut BytesMut) -> Result<Frame, WireError> {
    // Callers check first; a short buffer is still an error, never a panic.
    if buf.len() < FRAME_HEADER_BYTES {
        return Err(WireError::Malformed("truncated frame header".into()));
    }
    let body = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if body > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(body));
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if buf.len() < FRAME_HEADER_BYTES + body {
        return Err(WireError::Malformed("truncated frame".into()));
    }
    if crc32c::crc32c(&buf[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body]) != crc {
        return Err(WireError::BadChecksum);
    }
    buf.advance(FRAME_HEADER_BYTES);
    let mut body_bytes = buf.split_to(body);
    let (message, rest) = postcard::take_from_bytes::<Message>(&body_bytes)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let header_len = body - rest.len();
    body_bytes.advance(header_len);
    Ok(Frame {
        message,
        payload: body_bytes.freeze(),
    })
}

/// Hashes each 4 KiB block of `data` (the last may be short).
pub fn block_hashes(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(4096) * BLOCK_HASH_BYTES);
    for block in data.chunks(4096) {
        out.extend_from_slice(&blake3::hash(block).as_bytes()[..BLOCK_HASH_BYTES]);
    }
    out
}

/// Encodes a block mask as little-endian u64 words.
pub fn mask_bytes(mask: &[bool]) -> Vec<u8> {
    let mut words = vec![0u64; mask.len().div_ceil(64)];
    for (i, &set) in mask.iter().enumerate() {
        if set {
            words[i / 64] |= 1 << (i % 64);
        }
    }
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Decodes a block mask of `blocks` entries.
pub fn mask_from_bytes(bytes: &[u8], blocks: usize) -> Result<Vec<bool>, WireError> {
    if bytes.len() != blocks.div_ceil(64) * 8 {
        return Err(WireError::Malformed(
            "block mask has the wrong length".into(),
        ));
    }
    Ok((0..blocks)
        .map(|i| bytes[(i / 64) * 8 + (i % 64) / 8] & (1 << (i % 8)) != 0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(message: Message, payload: &[u8]) {
        let mut buf = BytesMut::new();
        encode(&mut buf, &message, payload).unwrap();
        assert_eq!(check(&buf), Ok(0));
        let frame = decode(&mut buf).unwrap();
        assert_eq!(frame.message, message);
        assert_eq!(&frame.payload[..], payload);
        assert!(buf.is_empty());
        // encode_head + payload is the same bytes.
        let mut split = encode_head(&message, payload).unwrap();
        split.extend_from_slice(payload);
        let mut whole = BytesMut::new();
        encode(&mut whole, &message, payload).unwrap();
        assert_eq!(split, whole);
    }

    fn report() -> NodeReport {
        NodeReport {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            lineage: WireLineage {
                current: 7,
                history: vec![3, 0],
            },
            known: 7,
            data_size_bytes: 1 << 30,
            capacity_bytes: 2 << 30,
            primary_crashed: true,
            connections: vec![(1, Role::Secondary), (2, Role::Unknown)],
            fast_zero: true,
            needs_full_sync: false,
            discard_my_data: true,
            wrote_in_generation: true,
            recording_generation: true,
            abandoned: vec![(11, 7)],
        }
    }

    /// One of every message.
    fn every_message() -> Vec<Message> {
        let lineage = WireLineage {
            current: 9,
            history: vec![1],
        };
        vec![
            Message::Hello {
                version: 1,
                digest: [3; 32],
                resource: "r0".into(),
                node_id: 4,
                node_name: "beta".into(),
                nonce: [9; 32],
            },
            Message::Auth { proof: [1; 32] },
            Message::Refuse {
                reason: "no".into(),
            },
            Message::Welcome,
            Message::Report(report()),
            Message::Ping { id: 1 },
            Message::Pong {
                id: 1,
                lease_granted: true,
            },
            Message::Bitmap { first_word: 77 },
            Message::BitmapDone,
            Message::Write {
                seq: 1,
                epoch: 2,
                offset: 4096,
                fua: true,
                sent_to: 0b101,
                complete_below: 1,
            },
            Message::Zeroes {
                seq: 1,
                epoch: 2,
                offset: 0,
                len: 1 << 20,
                may_punch: true,
                fua: false,
                sent_to: 3,
                complete_below: 0,
            },
            Message::WriteAck { seq: 5, ok: true },
            Message::Barrier { epoch: 3 },
            Message::BarrierAck {
                epoch: 3,
                ok: false,
            },
            Message::SyncBegin {
                mode: SyncMode::Hash,
                total_bytes: 99,
            },
            Message::SyncRefuse {
                reason: "stale".into(),
            },
            Message::SyncData { offset: 8192 },
            Message::SyncZeroes {
                offset: 0,
                len: 4096,
            },
            Message::SyncHashes {
                offset: 0,
                blocks: 2,
            },
            Message::SyncNeed {
                offset: 0,
                blocks: 2,
            },
            Message::SyncAck {
                offset: 0,
                len: 8192,
            },
            Message::SyncEnd {
                lineage: lineage.clone(),
            },
            Message::VerifyHashes {
                offset: 0,
                blocks: 1,
            },
            Message::VerifyResult {
                offset: 0,
                blocks: 1,
            },
            Message::NewGeneration {
                lineage,
                token: 4,
                may_adopt: true,
            },
            Message::GenerationRecorded {
                token: 4,
                accepted: true,
                adopted: true,
                known: 9,
            },
            Message::SkipSync {
                generation: 5,
                token: 1,
            },
            Message::SkipSyncDone { token: 1, ok: true },
            Message::Leaving,
            Message::SplitBrain,
            Message::PromoteQuery { token: 3 },
            Message::PromoteReply {
                token: 3,
                report: report(),
                lease_wait_ms: 250,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for message in every_message() {
            round_trip(message.clone(), b"");
            round_trip(message, &[0xAB; 5000]);
        }
    }

    /// The tag each message carries on the wire (postcard writes a
    /// variant's position). A new variant must get the next free tag here
    /// before it compiles; moving one changes its tag and fails
    /// `encodings_are_pinned`.
    fn stable_tag(message: &Message) -> u8 {
        match message {
            Message::Hello { .. } => 0,
            Message::Auth { .. } => 1,
            Message::Refuse { .. } => 2,
            Message::Welcome => 3,
            Message::Report(_) => 4,
            Message::Ping { .. } => 5,
            Message::Pong { .. } => 6,
            Message::Bitmap { .. } => 7,
            Message::BitmapDone => 8,
            Message::Write { .. } => 9,
            Message::Zeroes { .. } => 10,
            Message::WriteAck { .. } => 11,
            Message::Barrier { .. } => 12,
            Message::BarrierAck { .. } => 13,
            Message::SyncBegin { .. } => 14,
            Message::SyncRefuse { .. } => 15,
            Message::SyncData { .. } => 16,
            Message::SyncZeroes { .. } => 17,
            Message::SyncHashes { .. } => 18,
            Message::SyncNeed { .. } => 19,
            Message::SyncAck { .. } => 20,
            Message::SyncEnd { .. } => 21,
            Message::VerifyHashes { .. } => 22,
            Message::VerifyResult { .. } => 23,
            Message::NewGeneration { .. } => 24,
            Message::GenerationRecorded { .. } => 25,
            Message::SkipSync { .. } => 26,
            Message::SkipSyncDone { .. } => 27,
            Message::Leaving => 28,
            Message::SplitBrain => 29,
            Message::PromoteQuery { .. } => 30,
            Message::PromoteReply { .. } => 31,
        }
    }

    fn role_tag(role: Role) -> u8 {
        match role {
            Role::Primary => 0,
            Role::Secondary => 1,
            Role::Unknown => 2,
        }
    }

    fn disk_tag(disk: DiskState) -> u8 {
        match disk {
            DiskState::Diskless => 0,
            DiskState::Inconsistent => 1,
            DiskState::Outdated => 2,
            DiskState::Consistent => 3,
            DiskState::UpToDate => 4,
            DiskState::Failed => 5,
            DiskState::DUnknown => 6,
        }
    }

    fn sync_mode_tag(mode: SyncMode) -> u8 {
        match mode {
            SyncMode::Bitmap => 0,
            SyncMode::Hash => 1,
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The header bytes of every message, as peers of this protocol
    /// version send them. A change here is a wire change: it needs a new
    /// `ProtocolVersion`.
    const PINNED: [&str; 32] = [
        "000103030303030303030303030303030303030303030303030303030303030303030272300404626574610909090909090909090909090909090909090909090909090909090909090909",
        "010101010101010101010101010101010101010101010101010101010101010101",
        "02026e6f",
        "03",
        "0400040702030007808080800480808080080102010102020100010101010b07",
        "0501",
        "060101",
        "074d",
        "08",
        "0901028020010501",
        "0a01020080804001000300",
        "0b0501",
        "0c03",
        "0d0300",
        "0e0163",
        "0f057374616c65",
        "108040",
        "11008020",
        "120002",
        "130002",
        "14008040",
        "15090101",
        "160001",
        "170001",
        "180901010401",
        "1904010109",
        "1a0501",
        "1b0101",
        "1c",
        "1d",
        "1e03",
        "1f0300040702030007808080800480808080080102010102020100010101010b07fa01",
    ];

    #[test]
    fn encodings_are_pinned() {
        let messages = every_message();
        let tags: Vec<u8> = messages.iter().map(stable_tag).collect();
        assert_eq!(
            tags,
            (0..32).collect::<Vec<u8>>(),
            "one message per tag, in order"
        );
        for (message, pinned) in messages.iter().zip(PINNED) {
            let bytes = postcard::to_stdvec(message).unwrap();
            assert_eq!(bytes[0], stable_tag(message), "{}", message.name());
            assert_eq!(
                hex(&bytes),
                pinned,
                "{} changed on the wire",
                message.name()
            );
        }
        for role in [Role::Primary, Role::Secondary, Role::Unknown] {
            assert_eq!(postcard::to_stdvec(&role).unwrap(), [role_tag(role)]);
        }
        for disk in [
            DiskState::Diskless,
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::Consistent,
            DiskState::UpToDate,
            DiskState::Failed,
            DiskState::DUnknown,
        ] {
            assert_eq!(postcard::to_stdvec(&disk).unwrap(), [disk_tag(disk)]);
        }
        for mode in [SyncMode::Bitmap, SyncMode::Hash] {
            assert_eq!(postcard::to_stdvec(&mode).unwrap(), [sync_mode_tag(mode)]);
        }
    }

    #[test]
    fn corruption_is_detected() {
        let mut buf = BytesMut::new();
        encode(
            &mut buf,
            &Message::Write {
                seq: 1,
                epoch: 0,
                offset: 0,
                fua: false,
                sent_to: 1,
                complete_below: 0,
            },
            &[7; 4096],
        )
        .unwrap();
        for i in FRAME_HEADER_BYTES..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert_eq!(decode(&mut bad), Err(WireError::BadChecksum), "flip at {i}");
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32_le((MAX_FRAME_BYTES + 1) as u32);
        buf.put_u32_le(0);
        assert_eq!(check(&buf), Err(WireError::TooLarge(MAX_FRAME_BYTES + 1)));
        let mut out = BytesMut::new();
        let big = vec![0u8; MAX_FRAME_BYTES];
        assert!(matches!(
            encode(&mut out, &Message::SyncData { offset: 0 }, &big),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn masks_round_trip() {
        let mask = [true, false, false, true, true];
        let bytes = mask_bytes(&mask);
        assert_eq!(mask_from_bytes(&bytes, mask.len()).unwrap(), mask);
        assert!(mask_from_bytes(&bytes[..4], mask.len()).is_err());
        let wide: Vec<bool> = (0..200).map(|i| i % 7 == 0).collect();
        assert_eq!(mask_from_bytes(&mask_bytes(&wide), 200).unwrap(), wide);
    }

    proptest! {
        #[test]
        fn decoder_is_total(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            // Whatever `check` says: a caller that skips it gets an error,
            // not a panic.
            let complete = check(&bytes) == Ok(0);
            let mut buf = BytesMut::from(&bytes[..]);
            let decoded = decode(&mut buf);
            if !complete {
                prop_assert!(decoded.is_err());
            }
        }

        #[test]
        fn random_bodies_with_valid_crc_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::new();
            buf.put_u32_le(body.len() as u32);
            buf.put_u32_le(crc32c::crc32c(&body));
            buf.put_slice(&body);
            let _ = decode(&mut buf);
        }
    }
}
