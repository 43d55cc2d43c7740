//! Bad input gets a clear error and nothing is lost (docs/design.md, "The NBD front end").
//!
//! Each test feeds the daemon one kind of bad input with a small raw-socket
//! NBD client written here against the protocol spec (big-endian, simple
//! replies only, so every error is a bare errno), asserts the exact answer,
//! and then checks that the daemon is unharmed: a client that was attached
//! all along and a brand-new one both read back the data written before,
//! and the new one can still write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;

const DISK: u64 = 64 << 20;
const ADDRESS: &str = "127.0.0.1:10809";
/// A broken server must fail the test, not hang it.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const INFO_EXPORT: u16 = 0;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_SEND_DF: u16 = 1 << 7;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const TFLAG_SEND_CACHE: u16 = 1 << 10;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_DF: u16 = 1 << 2;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

const MIB: u64 = 1 << 20;
const MAX_REQUEST_BYTES: u64 = 32 * MIB;
const MAX_DRAIN_BYTES: u64 = 64 * MIB;

/// Deterministic bytes that differ per seed (xorshift).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes[..2].try_into().unwrap())
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().unwrap())
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().unwrap())
}

/// One option reply.
#[derive(Debug)]
struct OptionReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

impl OptionReply {
    fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What OPT_GO told us about the export.
#[derive(Debug, Clone, Copy)]
struct Export {
    size_bytes: u64,
    flags: u16,
}

/// A raw NBD client over one TCP connection.
#[derive(Debug)]
struct Client {
    stream: TcpStream,
    next_handle: u64,
}

impl Client {
    /// Connects and reads the 18-byte greeting; returns the server's
    /// handshake flags.
    fn connect() -> (Client, u16) {
        let stream = TcpStream::connect(ADDRESS).unwrap();
        stream.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(SOCKET_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut client = Client {
            stream,
            next_handle: 1,
        };
        let greeting = client.receive(18);
        assert_eq!(be_u64(&greeting[0..]), NBDMAGIC, "greeting magic");
        assert_eq!(be_u64(&greeting[8..]), IHAVEOPT, "newstyle magic");
        (client, be_u16(&greeting[16..]))
    }

    /// Connects and sends the client flags: ready for options.
    fn start() -> Client {
        let (mut client, flags) = Client::connect();
        assert_ne!(flags & FLAG_FIXED_NEWSTYLE, 0, "fixed newstyle offered");
        client.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        client
    }

    /// A client in the transmission phase (simple replies).
    fn attach() -> (Client, Export) {
        let mut client = Client::start();
        let export = client
            .go("r0")
            .unwrap_or_else(|reply| panic!("OPT_GO refused: {reply:?} {}", reply.message()));
        (client, export)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn receive(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.stream
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("reading {len} bytes from the server: {e}"));
        buf
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::with_capacity(16 + data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.send(&out);
    }

    fn option_reply(&mut self) -> OptionReply {
        let header = self.receive(20);
        assert_eq!(be_u64(&header), OPTION_REPLY_MAGIC, "option reply magic");
        let option = be_u32(&header[8..]);
        let kind = be_u32(&header[12..]);
        let len = be_u32(&header[16..]) as usize;
        let data = self.receive(len);
        OptionReply { option, kind, data }
    }

    /// Data of OPT_GO / OPT_INFO: the name, no info requests.
    fn go_data(name: &str) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        data
    }

    /// Sends OPT_GO (or OPT_INFO) and reads its replies up to the ACK or
    /// the error.
    fn haggle(&mut self, option: u32, name: &str) -> Result<Export, OptionReply> {
        self.send_option(option, &Client::go_data(name));
        let mut export = None;
        loop {
            let reply = self.option_reply();
            assert_eq!(reply.option, option, "reply to the option asked");
            match reply.kind {
                REP_INFO => {
                    if be_u16(&reply.data) == INFO_EXPORT {
                        assert_eq!(reply.data.len(), 12, "NBD_INFO_EXPORT length");
                        export = Some(Export {
                            size_bytes: be_u64(&reply.data[2..]),
                            flags: be_u16(&reply.data[10..]),
                        });
                    }
                }
                REP_ACK => return Ok(export.expect("NBD_INFO_EXPORT before the ACK")),
                kind if kind & 0x8000_0000 != 0 => return Err(reply),
                kind => panic!("unexpected option reply type {kind:#x}"),
            }
        }
    }

    fn go(&mut self, name: &str) -> Result<Export, OptionReply> {
        self.haggle(OPT_GO, name)
    }

    /// Sends one request header and its payload; returns its handle.
    fn request(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut out = Vec::with_capacity(28 + payload.len());
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&handle.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(payload);
        self.send(&out);
        handle
    }

    /// Reads a simple reply header for `handle`; returns its error.
    fn reply(&mut self, handle: u64) -> u32 {
        let header = self.receive(16);
        assert_eq!(be_u32(&header), SIMPLE_REPLY_MAGIC, "simple reply magic");
        assert_eq!(be_u64(&header[8..]), handle, "reply to the request sent");
        be_u32(&header[4..])
    }

    /// A request without payload that must fail; returns its error.
    fn failing(&mut self, flags: u16, command: u16, offset: u64, length: u32) -> u32 {
        let handle = self.request(flags, command, offset, length, &[]);
        let error = self.reply(handle);
        assert_ne!(
            error, 0,
            "command {command} at {offset}+{length} should fail"
        );
        error
    }

    fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        let handle = self.request(0, CMD_READ, offset, length, &[]);
        match self.reply(handle) {
            0 => Ok(self.receive(length as usize)),
            error => Err(error),
        }
    }

    fn write_flags(&mut self, flags: u16, offset: u64, data: &[u8]) -> Result<(), u32> {
        let handle = self.request(flags, CMD_WRITE, offset, data.len() as u32, data);
        match self.reply(handle) {
            0 => Ok(()),
            error => Err(error),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.write_flags(0, offset, data)
    }

    fn trim(&mut self, offset: u64, length: u32) -> Result<(), u32> {
        let handle = self.request(0, CMD_TRIM, offset, length, &[]);
        match self.reply(handle) {
            0 => Ok(()),
            error => Err(error),
        }
    }

    fn flush(&mut self) {
        let handle = self.request(0, CMD_FLUSH, 0, 0, &[]);
        assert_eq!(self.reply(handle), 0, "flush");
    }

    /// NBD_CMD_DISC; the server closes the connection.
    fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, &[]);
        self.assert_closed("after NBD_CMD_DISC");
    }

    /// The server closed the connection (end of stream, or a reset because
    /// it closed with our bytes unread) and sent nothing more.
    fn assert_closed(&mut self, what: &str) {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => panic!(
                    "{what}: expected the connection closed, got {n} bytes: {:02x?}",
                    &buf[..n.min(64)]
                ),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("{what}: expected the connection closed, got {e}"),
            }
        }
    }
}

/// Data written before the bad input, at both ends of the export.
const HEAD_BYTES: usize = MIB as usize;
const TAIL_BYTES: usize = 64 << 10;

/// A Primary with known data, and a client attached all along.
struct Fixture {
    cluster: Cluster,
    export: Export,
    bystander: Client,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Fixture {
    fn tail_offset(&self) -> u64 {
        self.export.size_bytes - TAIL_BYTES as u64
    }

    fn wait_for_only_the_bystander(&self) {
        wait_for("only the bystander to be attached", || {
            (self.cluster.status("alpha")["nbd"]["clients"] == 1).then_some(())
        });
    }

    /// Once the daemon is done with the bad client (only the bystander is
    /// attached), both the bystander and a new client read back the data
    /// written at the start; the new one can write, read back and leave.
    fn assert_unharmed(&mut self) {
        self.wait_for_only_the_bystander();
        let tail_offset = self.tail_offset();
        assert_eq!(
            self.bystander.read(0, HEAD_BYTES as u32).unwrap(),
            self.head,
            "the attached client reads the head intact"
        );
        assert_eq!(
            self.bystander.read(tail_offset, TAIL_BYTES as u32).unwrap(),
            self.tail,
            "the attached client reads the tail intact"
        );
        let (mut fresh, export) = Client::attach();
        assert_eq!(export.size_bytes, self.export.size_bytes);
        assert_eq!(fresh.read(0, HEAD_BYTES as u32).unwrap(), self.head);
        assert_eq!(
            fresh.read(tail_offset, TAIL_BYTES as u32).unwrap(),
            self.tail
        );
        let scratch = pattern(99, 8192);
        fresh.write(SCRATCH_OFFSET, &scratch).unwrap();
        assert_eq!(fresh.read(SCRATCH_OFFSET, 8192).unwrap(), scratch);
        fresh.disconnect();
        self.wait_for_only_the_bystander();
    }
}

/// Where `assert_unharmed` writes: away from the head and the tail.
const SCRATCH_OFFSET: u64 = 16 * MIB;

fn start_primary(cluster: &mut Cluster) {
    cluster.up("alpha");
    let (code, _, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0, "primary: {stderr}");
}

/// Writes the head and tail patterns with a client that then leaves.
fn write_known_data(size_bytes: u64) -> (Vec<u8>, Vec<u8>) {
    let (mut writer, _) = Client::attach();
    let head = pattern(1, HEAD_BYTES);
    let tail = pattern(2, TAIL_BYTES);
    writer.write(0, &head).unwrap();
    writer.write(size_bytes - TAIL_BYTES as u64, &tail).unwrap();
    writer.flush();
    writer.disconnect();
    (head, tail)
}

fn fixture() -> Fixture {
    isolate_network();
    let mut cluster = Cluster::single(DISK, "");
    start_primary(&mut cluster);
    let size_bytes = cluster.status("alpha")["size_bytes"].as_u64().unwrap();
    let (head, tail) = write_known_data(size_bytes);
    let (bystander, export) = Client::attach();
    assert_eq!(
        export.size_bytes, size_bytes,
        "OPT_GO reports the status size"
    );
    Fixture {
        cluster,
        export,
        bystander,
        head,
        tail,
    }
}

#[test]
fn garbage_instead_of_a_handshake_closes_only_that_connection() {
    let mut fx = fixture();

    // Not an NBD client at all: the "client flags" are unknown bits.
    let (mut client, _) = Client::connect();
    client.send(b"GET / HTTP/1.1\r\nHost: hablk\r\n\r\n");
    client.assert_closed("HTTP instead of client flags");
    fx.assert_unharmed();

    // Valid flags, then junk where the option magic belongs.
    let mut client = Client::start();
    client.send(&[0xa5; 64]);
    client.assert_closed("junk instead of an option");
    fx.assert_unharmed();

    // An option header announcing 4 GiB of data is not waited for.
    let mut client = Client::start();
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    client.send(&header);
    client.assert_closed("an option of 4 GiB");
    fx.assert_unharmed();
}

#[test]
fn clients_that_vanish_mid_handshake_or_mid_request_harm_nothing() {
    let mut fx = fixture();

    // Right after the greeting.
    drop(Client::connect());
    // After the client flags.
    drop(Client::start());
    // A polite leaver: OPT_ABORT is acknowledged, then the server closes.
    let mut client = Client::start();
    client.send_option(OPT_ABORT, &[]);
    let ack = client.option_reply();
    assert_eq!((ack.option, ack.kind), (OPT_ABORT, REP_ACK));
    client.assert_closed("after OPT_ABORT");
    // Half an option header.
    let mut client = Client::start();
    client.send(&IHAVEOPT.to_be_bytes());
    client.send(&OPT_GO.to_be_bytes()[..2]);
    drop(client);
    // An OPT_GO header without its data.
    let mut client = Client::start();
    let data = Client::go_data("r0");
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    header.extend_from_slice(&data[..3]);
    client.send(&header);
    drop(client);
    fx.assert_unharmed();

    // Half a request header.
    let (mut client, _) = Client::attach();
    let mut header = Vec::new();
    header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&CMD_WRITE.to_be_bytes());
    header.extend_from_slice(&7u64.to_be_bytes()[..2]);
    client.send(&header);
    drop(client);
    fx.assert_unharmed();

    // A WRITE over the head, and only half of its payload: nothing of it
    // may reach the disk.
    let (mut client, _) = Client::attach();
    let mut header = Vec::new();
    header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&CMD_WRITE.to_be_bytes());
    header.extend_from_slice(&7u64.to_be_bytes());
    header.extend_from_slice(&0u64.to_be_bytes());
    header.extend_from_slice(&(HEAD_BYTES as u32).to_be_bytes());
    client.send(&header);
    client.send(&vec![0xee; HEAD_BYTES / 2]);
    drop(client);
    fx.assert_unharmed();
}

#[test]
fn unknown_option_gets_unsup_and_the_handshake_goes_on() {
    let mut fx = fixture();
    let mut client = Client::start();

    client.send_option(0x4242, b"what is this");
    let reply = client.option_reply();
    assert_eq!(reply.option, 0x4242, "the reply names the option");
    assert_eq!(reply.kind, REP_ERR_UNSUP, "{reply:?}");

    // An export that does not exist: NBD_REP_ERR_UNKNOWN, and on we go.
    let reply = client.go("nope").unwrap_err();
    assert_eq!(reply.kind, REP_ERR_UNKNOWN, "{}", reply.message());
    assert!(
        reply.message().contains("r0"),
        "names the real export: {}",
        reply.message()
    );

    // OPT_LIST still works, then OPT_GO with "" selects the resource.
    client.send_option(OPT_LIST, &[]);
    let server = client.option_reply();
    assert_eq!((server.option, server.kind), (OPT_LIST, REP_SERVER));
    assert_eq!(be_u32(&server.data) as usize, 2);
    assert_eq!(&server.data[4..], b"r0");
    let ack = client.option_reply();
    assert_eq!((ack.option, ack.kind), (OPT_LIST, REP_ACK));

    let export = client.go("").unwrap();
    assert_eq!(export.size_bytes, fx.export.size_bytes);
    let expected = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_CACHE
        | TFLAG_CAN_MULTI_CONN;
    assert_eq!(
        export.flags & expected,
        expected,
        "flags {:#x}",
        export.flags
    );
    assert_eq!(export.flags & TFLAG_READ_ONLY, 0, "writable");
    assert_eq!(
        export.flags & TFLAG_SEND_DF,
        0,
        "no DF without structured replies"
    );
    assert_eq!(client.read(0, HEAD_BYTES as u32).unwrap(), fx.head);
    client.disconnect();
    fx.assert_unharmed();
}

#[test]
fn unknown_commands_and_flags_get_einval_and_the_connection_goes_on() {
    let mut fx = fixture();
    let (mut client, _) = Client::attach();

    assert_eq!(client.failing(0, 0x42, 0, 4096), EINVAL, "unknown command");
    assert_eq!(client.failing(0, 0xffff, 0, 0), EINVAL, "unknown command");
    assert_eq!(
        client.failing(1 << 9, CMD_READ, 0, 4096),
        EINVAL,
        "unknown flag"
    );
    assert_eq!(
        client.failing(CMD_FLAG_DF, CMD_READ, 0, 4096),
        EINVAL,
        "DF without structured replies"
    );
    // A WRITE with a flag it cannot take: its payload is consumed, and it
    // is not applied.
    let other = pattern(3, 4096);
    assert_eq!(client.write_flags(CMD_FLAG_NO_HOLE, 0, &other), Err(EINVAL));
    assert_eq!(client.write_flags(1 << 15, 0, &other), Err(EINVAL));
    assert_eq!(client.read(0, HEAD_BYTES as u32).unwrap(), fx.head);
    // FUA is a valid flag on a write.
    let data = pattern(4, 4096);
    client
        .write_flags(CMD_FLAG_FUA, SCRATCH_OFFSET, &data)
        .unwrap();
    assert_eq!(client.read(SCRATCH_OFFSET, 4096).unwrap(), data);
    client.disconnect();
    fx.assert_unharmed();
}

#[test]
fn structured_replies_carry_the_same_errors() {
    let mut fx = fixture();
    let uri = fx.cluster.nbd_uri("alpha");
    // libnbd negotiates structured replies; with strict mode off it sends
    // what it would otherwise refuse itself.
    let script = format!(
        r#"
import errno
h.set_strict_mode(0)
assert h.get_structured_replies_negotiated()
size = h.get_size()
def expect(what, want, fn):
    try:
        fn()
    except nbd.Error as e:
        # libnbd gives the errno's name ("EINVAL").
        got = e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)
        assert got == want, (what, e.errno, e.string)
    else:
        raise AssertionError(what + ": no error")
expect("read across the end", errno.EINVAL, lambda: h.pread(1024, size - 512))
expect("trim across the end", errno.EINVAL, lambda: h.trim(1024, size - 512))
expect("write across the end", errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size - 2048))
expect("zero across the end", errno.ENOSPC, lambda: h.zero(4096, size - 2048))
expect("read over 32 MiB", errno.EINVAL, lambda: h.pread(32 * 1024 * 1024 + 1, 0))
expect("write of 33 MiB", errno.EINVAL, lambda: h.pwrite(b"\xee" * (33 * 1024 * 1024), 0))
assert h.pread(16, 0) == bytes.fromhex("{head}")
assert h.pread(16, size - 16) == bytes.fromhex("{tail}")
"#,
        head = hex(&fx.head[..16]),
        tail = hex(&fx.tail[TAIL_BYTES - 16..]),
    );
    let refusals = || {
        std::fs::read_to_string(fx.cluster.log("alpha"))
            .unwrap()
            .matches("NBD request refused")
            .count()
    };
    let refused_before = refusals();
    let output = nbdsh(&uri, &script);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // All six went to the server (libnbd did not refuse them itself).
    assert_eq!(refusals() - refused_before, 6);
    fx.assert_unharmed();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn requests_beyond_the_end_get_einval_or_enospc() {
    let mut fx = fixture();
    let size = fx.export.size_bytes;
    let (mut client, _) = Client::attach();

    assert_eq!(
        client.read(size - 512, 1024),
        Err(EINVAL),
        "read across the end"
    );
    assert_eq!(client.read(size, 1), Err(EINVAL), "read at the end");
    assert_eq!(
        client.read(u64::MAX - 10, 100),
        Err(EINVAL),
        "offset overflow"
    );
    assert_eq!(
        client.trim(size - 512, 1024),
        Err(EINVAL),
        "trim across the end"
    );
    assert_eq!(client.trim(size, 4096), Err(EINVAL), "trim at the end");

    let data = pattern(5, 4096);
    assert_eq!(
        client.write(size - 2048, &data),
        Err(ENOSPC),
        "write across the end"
    );
    assert_eq!(
        client.write(size, &data[..1]),
        Err(ENOSPC),
        "write at the end"
    );
    assert_eq!(
        client.failing(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, size - 2048, 4096),
        ENOSPC,
        "write zeroes across the end"
    );

    // Nothing of the refused writes landed; the last byte is still usable.
    assert_eq!(
        client.read(fx.tail_offset(), TAIL_BYTES as u32).unwrap(),
        fx.tail
    );
    client.write(size - 1, &[0x5a]).unwrap();
    assert_eq!(client.read(size - 1, 1).unwrap(), vec![0x5a_u8]);
    client.write(size - 1, &fx.tail[TAIL_BYTES - 1..]).unwrap();
    client.disconnect();
    fx.assert_unharmed();
}

#[test]
fn a_read_over_32_mib_gets_einval() {
    let mut fx = fixture();
    let (mut client, _) = Client::attach();

    let too_big = (MAX_REQUEST_BYTES + 1) as u32;
    assert_eq!(client.read(0, too_big), Err(EINVAL));
    // Exactly the maximum is served.
    let data = client.read(0, MAX_REQUEST_BYTES as u32).unwrap();
    assert_eq!(data.len(), MAX_REQUEST_BYTES as usize);
    assert_eq!(&data[..HEAD_BYTES], &fx.head[..]);
    client.disconnect();
    fx.assert_unharmed();
}

#[test]
fn a_write_of_33_mib_gets_einval_after_its_payload_is_drained() {
    let mut fx = fixture();
    let (mut client, _) = Client::attach();

    let payload = vec![0xee; 33 * MIB as usize];
    assert_eq!(client.write(0, &payload), Err(EINVAL));
    // The connection is in step: the next request is answered, and the
    // refused write did not land.
    assert_eq!(client.read(0, HEAD_BYTES as u32).unwrap(), fx.head);
    let data = pattern(6, 4096);
    client.write(SCRATCH_OFFSET, &data).unwrap();
    assert_eq!(client.read(SCRATCH_OFFSET, 4096).unwrap(), data);
    client.disconnect();
    fx.assert_unharmed();
}

#[test]
fn a_write_header_over_64_mib_closes_the_connection() {
    let mut fx = fixture();
    let (mut client, _) = Client::attach();

    let length = (MAX_DRAIN_BYTES + 1) as u32;
    let handle = client.request(0, CMD_WRITE, 0, length, &[]);
    // The server answers EINVAL for it, then closes: the payload is too
    // large to drain, so the stream cannot be followed any further.
    assert_eq!(client.reply(handle), EINVAL);
    client.assert_closed("after a write announcing more than 64 MiB");
    fx.assert_unharmed();

    // A bad request magic cannot be resynchronised either.
    let (mut client, _) = Client::attach();
    let mut bad = vec![0u8; 28];
    bad[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    client.send(&bad);
    client.assert_closed("after a bad request magic");
    fx.assert_unharmed();
}

#[test]
fn a_secondary_refuses_go_with_its_role_and_closes_export_name() {
    isolate_network();
    let mut cluster = Cluster::single(DISK, "");
    start_primary(&mut cluster);
    let size_bytes = cluster.status("alpha")["size_bytes"].as_u64().unwrap();
    let (head, tail) = write_known_data(size_bytes);
    wait_for("the writer to detach", || {
        (cluster.status("alpha")["nbd"]["clients"] == 0).then_some(())
    });
    let (code, _, stderr) = cluster.cmd("alpha", &["secondary"]);
    assert_eq!(code, 0, "secondary: {stderr}");

    let mut client = Client::start();
    let reply = client.go("r0").unwrap_err();
    assert_eq!(reply.option, OPT_GO);
    assert_eq!(reply.kind, REP_ERR_POLICY, "{}", reply.message());
    assert!(reply.message().contains("Secondary"), "{}", reply.message());
    assert!(reply.message().contains("r0"), "{}", reply.message());
    // The handshake goes on: OPT_INFO is refused the same way, and
    // OPT_LIST still lists the resource.
    let reply = client.haggle(OPT_INFO, "r0").unwrap_err();
    assert_eq!((reply.option, reply.kind), (OPT_INFO, REP_ERR_POLICY));
    assert!(reply.message().contains("Secondary"), "{}", reply.message());
    client.send_option(OPT_LIST, &[]);
    let server = client.option_reply();
    assert_eq!((server.option, server.kind), (OPT_LIST, REP_SERVER));
    assert_eq!(&server.data[4..], b"r0");
    assert_eq!(client.option_reply().kind, REP_ACK);
    // OPT_EXPORT_NAME cannot carry an error: the connection is closed,
    // without the export's size and flags.
    client.send_option(OPT_EXPORT_NAME, b"r0");
    client.assert_closed("OPT_EXPORT_NAME on a Secondary");
    assert_eq!(cluster.status("alpha")["nbd"]["clients"], 0);

    // Promoted again, it serves the data written before.
    let (code, _, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0, "primary: {stderr}");
    let (mut client, export) = Client::attach();
    assert_eq!(export.size_bytes, size_bytes);
    assert_eq!(client.read(0, HEAD_BYTES as u32).unwrap(), head);
    assert_eq!(
        client
            .read(size_bytes - TAIL_BYTES as u64, TAIL_BYTES as u32)
            .unwrap(),
        tail
    );
    client.disconnect();

    // OPT_EXPORT_NAME on the Primary: size, flags and (without
    // NO_ZEROES) 124 zero bytes, then transmission.
    let (mut client, _) = Client::connect();
    client.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    client.send_option(OPT_EXPORT_NAME, b"r0");
    let reply = client.receive(134);
    assert_eq!(be_u64(&reply), size_bytes);
    assert_ne!(be_u16(&reply[8..]) & TFLAG_HAS_FLAGS, 0);
    assert!(reply[10..].iter().all(|&b| b == 0), "124 zero bytes");
    assert_eq!(client.read(0, HEAD_BYTES as u32).unwrap(), head);
    client.disconnect();
}

#[test]
fn a_hundred_clients_at_once_all_succeed() {
    const CLIENTS: usize = 100;
    const BLOCK: usize = 4096;
    let mut fx = fixture();
    let start = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let (mut client, _) = Client::attach();
                let offset = SCRATCH_OFFSET + (i * BLOCK) as u64;
                let data = pattern(1000 + i as u64, BLOCK);
                client.write(offset, &data).unwrap();
                assert_eq!(client.read(offset, BLOCK as u32).unwrap(), data);
                assert_eq!(
                    client.read(0, 4096).unwrap(),
                    pattern(1, HEAD_BYTES)[..4096]
                );
                client.disconnect();
            })
        })
        .collect();
    let failed = threads
        .into_iter()
        .map(|t| t.join())
        .filter(Result::is_err)
        .count();
    assert_eq!(failed, 0, "{failed} of {CLIENTS} clients failed");

    // Every client's block is where it wrote it.
    let all = fx
        .bystander
        .read(SCRATCH_OFFSET, (CLIENTS * BLOCK) as u32)
        .unwrap();
    for (i, block) in all.chunks(BLOCK).enumerate() {
        assert!(
            block == pattern(1000 + i as u64, BLOCK),
            "block of client {i}"
        );
    }
    fx.assert_unharmed();
}

/// A small tmpfs, unmounted when dropped (after the daemon using it).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "hablk-test"])
                .arg(dir.path()),
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn a_full_backing_disk_gives_enospc_and_keeps_earlier_data(io: &str) {
    isolate_network();
    // The tmpfs must outlive the daemon: declared first, dropped last.
    let tmpfs = Tmpfs::mount("8M");
    let disk_dir: PathBuf = tmpfs.path().to_owned();
    let mut cluster = Cluster::new(
        vec![NodeSpec {
            name: "alpha".into(),
            id: 0,
            address: "127.0.0.1:7789".into(),
            nbd_port: 10809,
            disk_bytes: Some(32 * MIB),
            disk_dir: Some(disk_dir),
        }],
        io,
    );
    start_primary(&mut cluster);
    let size = cluster.status("alpha")["size_bytes"].as_u64().unwrap();
    assert!(size > 16 * MIB, "the sparse disk is larger than the tmpfs");

    let (mut client, _) = Client::attach();
    let first = pattern(7, MIB as usize);
    client.write(0, &first).unwrap();
    client.flush();

    // Fill the rest until the tmpfs is full.
    let chunk = pattern(8, MIB as usize);
    let mut offset = MIB;
    let error = loop {
        assert!(offset + MIB <= size, "the tmpfs never filled up");
        match client.write(offset, &chunk) {
            Ok(()) => offset += MIB,
            Err(error) => break error,
        }
    };
    assert_eq!(error, ENOSPC, "a write that finds no space gets ENOSPC");
    assert!(
        offset >= 4 * MIB,
        "most of the 8 MiB was usable ({offset} bytes)"
    );

    // The connection and the daemon go on; earlier data is intact.
    assert_eq!(client.read(0, MIB as u32).unwrap(), first);
    assert_eq!(client.read(MIB, MIB as u32).unwrap(), chunk);
    let (mut other, _) = Client::attach();
    assert_eq!(other.read(0, MIB as u32).unwrap(), first);
    assert_eq!(other.write(offset, &chunk), Err(ENOSPC), "still full");

    // Freeing space makes writes work again.
    other.trim(MIB, (2 * MIB) as u32).unwrap();
    other.write(offset, &chunk).unwrap();
    assert_eq!(other.read(offset, MIB as u32).unwrap(), chunk);
    assert_eq!(other.read(0, MIB as u32).unwrap(), first);
    other.disconnect();
    client.disconnect();
    assert_eq!(cluster.status("alpha")["role"], "Primary");
}

#[test]
fn a_full_backing_disk_gives_enospc_and_keeps_earlier_data_uring() {
    a_full_backing_disk_gives_enospc_and_keeps_earlier_data("");
}

#[test]
fn a_full_backing_disk_gives_enospc_and_keeps_earlier_data_threads() {
    a_full_backing_disk_gives_enospc_and_keeps_earlier_data("io = \"threads\"");
}
