#!/usr/bin/env python3
"""Writes long, well-formed request streams for the nbd_connection target.

The hand-made seeds hold one request of each command; these hold 100
pipelined ones (reads, writes of 1 byte to 64 KiB, FUA, FLUSH,
TRIM, WRITE_ZEROES with and without NO_HOLE, CACHE, BLOCK_STATUS), so the
fuzzer starts deep in the transmission phase. Deterministic: run it again
and the files come out the same.

    python3 fuzz/scripts/request_streams.py fuzz/seeds/nbd_connection
"""
import random
import struct
import sys
from pathlib import Path

EXPORT_BYTES = 256 << 10  # the target's export size
MAGIC = 0x25609513
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE = 1, 2, 4, 8


def request(cookie, command, flags, offset, length, payload=b""):
    return struct.pack(">IHHQQI", MAGIC, flags, command, cookie, offset, length) + payload


def stream(mode, seed, count):
    rng = random.Random(seed)
    out = bytearray([mode])
    structured, allocation = mode & 1, mode & 2
    for cookie in range(count):
        length = rng.choice([1, 512, 4096, 4096, 8192, rng.randrange(1, 16384)])
        if rng.random() < 0.02:
            length = 65536
        offset = rng.randrange(0, EXPORT_BYTES - min(length, EXPORT_BYTES))
        kind = rng.random()
        if kind < 0.35:
            payload = bytes([cookie & 0xFF]) * length
            out += request(cookie, WRITE, FUA if rng.random() < 0.2 else 0, offset, length, payload)
        elif kind < 0.65:
            flags = DF if structured and rng.random() < 0.3 else 0
            out += request(cookie, READ, flags, offset, length)
        elif kind < 0.72:
            out += request(cookie, FLUSH, 0, 0, 0)
        elif kind < 0.80:
            out += request(cookie, TRIM, 0, offset, length)
        elif kind < 0.88:
            out += request(cookie, ZEROES, NO_HOLE if rng.random() < 0.5 else 0, offset, length)
        elif kind < 0.92:
            out += request(cookie, CACHE, 0, offset, length)
        elif allocation:
            out += request(cookie, BLOCK_STATUS, REQ_ONE if rng.random() < 0.3 else 0, offset, length)
        else:
            out += request(cookie, READ, 0, offset, length)
    out += request(count, DISC, 0, 0, 0)
    return bytes(out)


def main():
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "fuzz/seeds/nbd_connection")
    target.mkdir(parents=True, exist_ok=True)
    for mode in range(4):
        (target / f"stream{mode}").write_bytes(stream(mode, seed=mode, count=100))


if __name__ == "__main__":
    main()
