//! Peer frames: any bytes on the replication port go through the two-phase
//! frame decoder; whatever decodes re-encodes to the same frame.
#![no_main]

use bytes::BytesMut;
use hablk::replication::wire::{check, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(0) = check(&buf) {
        match decode(&mut buf) {
            Ok(frame) => {
                let mut again = BytesMut::new();
                if encode(&mut again, &frame.message, &frame.payload).is_ok() {
                    let reparsed = decode(&mut again).expect("a frame we encoded decodes");
                    assert_eq!(reparsed, frame);
                }
            }
            Err(_) => break,
        }
    }
});
