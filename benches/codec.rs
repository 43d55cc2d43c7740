//! Micro benchmarks of the per-request hot paths that are not I/O: NBD
//! request decoding and validation, peer frame encoding and decoding
//! (crc32c included), dirty-bitmap updates and the activity-log fast path.
//! Run with `cargo bench`; CI does not.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use hablk::meta::activity_log::AlTable;
use hablk::meta::bitmap::DirtyBitmap;
use hablk::nbd::proto::{validate, Negotiated, RequestHeader, CMD_WRITE, REQUEST_HEADER_BYTES};
use hablk::replication::wire::{self, Message};

fn nbd_requests(c: &mut Criterion) {
    let header = RequestHeader {
        flags: 0,
        command: CMD_WRITE,
        handle: 42,
        offset: 1 << 30,
        length: 4096,
    };
    let mut encoded = BytesMut::new();
    header.encode(&mut encoded);
    let raw: [u8; REQUEST_HEADER_BYTES] =
        encoded[..].try_into().unwrap_or([0; REQUEST_HEADER_BYTES]);
    let negotiated = Negotiated {
        export_bytes: 1 << 40,
        structured: true,
        base_allocation: true,
        min_block_bytes: 1,
        fast_zero: true,
    };
    c.bench_function("nbd request parse + validate", |b| {
        b.iter(|| {
            let header = RequestHeader::parse(black_box(&raw));
            header.map(|h| validate(&h, &negotiated))
        })
    });
}

fn peer_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("peer Write frame");
    for size in [4096usize, 1 << 20] {
        let payload = Bytes::from(vec![0xA5u8; size]);
        let message = Message::Write {
            seq: 7,
            epoch: 1,
            offset: 1 << 20,
            fua: false,
            sent_to: 3,
            complete_below: 6,
        };
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, payload| {
            b.iter(|| wire::encode_head(black_box(&message), payload))
        });
        let mut frame = BytesMut::new();
        let _ = wire::encode(&mut frame, &message, &payload);
        group.bench_with_input(BenchmarkId::new("decode", size), &frame, |b, frame| {
            b.iter(|| {
                let mut buf = frame.clone();
                wire::decode(black_box(&mut buf))
            })
        });
    }
    group.finish();
}

fn bitmaps(c: &mut Criterion) {
    // A 1 TiB disk's bitmap: 2^28 blocks.
    let mut bitmap = DirtyBitmap::new(1 << 28);
    let mut block = 0u64;
    c.bench_function("bitmap mark a 4 KiB write", |b| {
        b.iter(|| {
            block = (block + 7919) % (1 << 28);
            bitmap.set_range(black_box(block..block + 1))
        })
    });
    let mut table = AlTable::new(1237);
    let _ = table.plan(0..1).map(|plan| table.commit(&plan, 0..1, 1));
    c.bench_function("activity log hit (pin + unpin)", |b| {
        b.iter(|| {
            let hit = table.pin_if_present(black_box(0..1));
            table.unpin(0..1);
            hit
        })
    });
}

criterion_group!(benches, nbd_requests, peer_frames, bitmaps);
criterion_main!(benches);
