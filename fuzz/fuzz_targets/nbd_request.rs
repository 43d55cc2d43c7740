//! One transmission request: a 28-byte header, then bytes choosing what was
//! negotiated (export size, structured replies, base:allocation, O_DIRECT
//! alignment, fast zero). Runs the same steps as the connection loop:
//! `RequestHeader::parse`, `payload`, `validate`.
#![no_main]

use bytes::BytesMut;
use hablk::nbd::proto::{
    validate, Command, Negotiated, Payload, RequestHeader, CMD_WRITE, MAX_DRAIN_BYTES,
    MAX_REQUEST_BYTES, REQUEST_HEADER_BYTES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((raw, rest)) = input.split_first_chunk::<REQUEST_HEADER_BYTES>() else {
        return;
    };
    let Ok(header) = RequestHeader::parse(raw) else {
        return;
    };

    // A parsed header encodes back to the same bytes.
    let mut encoded = BytesMut::new();
    header.encode(&mut encoded);
    assert_eq!(&encoded[..], &raw[..]);

    let (export_bytes, switches) = match rest.split_first_chunk::<8>() {
        Some((size, rest)) => (
            u64::from_be_bytes(*size),
            rest.first().copied().unwrap_or(0),
        ),
        None => (1 << 20, 0xff),
    };
    let negotiated = Negotiated {
        export_bytes,
        structured: switches & 1 != 0,
        base_allocation: switches & 2 != 0,
        min_block_bytes: if switches & 4 != 0 { 512 } else { 1 },
        fast_zero: switches & 8 != 0,
    };

    let payload = header.payload();
    match payload {
        Payload::None => assert_ne!(header.command, CMD_WRITE),
        Payload::Data(length) => assert!(length == header.length && length <= MAX_REQUEST_BYTES),
        Payload::Drain(length) => {
            assert!(
                length == header.length && length > MAX_REQUEST_BYTES && length <= MAX_DRAIN_BYTES
            )
        }
        Payload::TooLarge => assert!(header.length > MAX_DRAIN_BYTES),
    }

    let Ok(command) = validate(&header, &negotiated) else {
        return;
    };
    let ranged = match command {
        Command::Read { offset, length } => {
            assert!(length <= MAX_REQUEST_BYTES);
            Some((offset, length))
        }
        Command::Write { offset, length, .. } => {
            assert_eq!(
                payload,
                Payload::Data(length),
                "accepted write without its payload"
            );
            Some((offset, length))
        }
        Command::Trim { offset, length, .. } | Command::Cache { offset, length } => {
            Some((offset, length))
        }
        Command::WriteZeroes {
            offset,
            length,
            fast_only,
            ..
        } => {
            assert!(!fast_only || negotiated.fast_zero);
            Some((offset, length))
        }
        Command::BlockStatus { offset, length, .. } => {
            assert!(negotiated.base_allocation);
            Some((offset, length))
        }
        Command::Flush => {
            assert!(header.offset == 0 && header.length == 0);
            None
        }
        Command::Disconnect => None,
    };
    if let Some((offset, length)) = ranged {
        assert_eq!((offset, length), (header.offset, header.length));
        assert!(length > 0, "accepted a zero-length request");
        let end = offset.checked_add(u64::from(length));
        assert!(
            end.is_some_and(|end| end <= export_bytes),
            "accepted a request beyond the export"
        );
        let block = u64::from(negotiated.min_block_bytes);
        assert!(offset % block == 0 && u64::from(length) % block == 0);
    }
});
