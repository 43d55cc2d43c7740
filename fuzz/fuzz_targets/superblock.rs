//! Metadata superblocks read from disk: decoding never panics, and anything
//! that decodes encodes and decodes back to the same value.
//!
//! A random block almost never carries a valid crc32c, which would stop the
//! fuzzer at the checksum; so each input is decoded twice: as it is, and
//! padded with zeroes to a whole block with its checksum fixed up.
#![no_main]

use hablk::meta::superblock::Superblock;
use libfuzzer_sys::fuzz_target;

/// A superblock occupies one metadata block.
const BLOCK_BYTES: usize = 4096;
/// Where the crc32c sits: after the 8-byte magic and the 4-byte version.
const CRC_OFFSET: usize = 12;

fn check(block: &[u8]) {
    let Ok(superblock) = Superblock::decode(block) else {
        return;
    };
    let encoded = superblock.encode();
    assert_eq!(encoded.len(), BLOCK_BYTES);
    match Superblock::decode(&encoded) {
        Ok(again) => assert_eq!(again, superblock),
        Err(e) => panic!("a decoded superblock does not decode after encoding: {e}"),
    }
}

fuzz_target!(|input: &[u8]| {
    check(input);

    let mut block = input.to_vec();
    block.resize(BLOCK_BYTES.max(block.len()), 0);
    block[CRC_OFFSET..CRC_OFFSET + 4].fill(0);
    let crc = crc32c::crc32c(&block[..BLOCK_BYTES]);
    block[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    check(&block);
});
