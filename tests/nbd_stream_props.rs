//! Random client byte streams against the whole NBD connection.
//!
//! The same decoders the fuzz targets under `fuzz/` exercise, here in the
//! normal test suite: each case feeds one client byte stream to the real
//! [`handshake`] and, if the client got that far, the real [`serve`], over an
//! in-memory pipe, against a real [`Volume`] on a small temp file. The
//! streams are fully random; framed options with random codes and data; a
//! well-formed handshake followed by random request headers and payloads;
//! and such streams with a few bytes flipped or cut short.
//!
//! Every case asserts that the server
//! - does not panic,
//! - finishes soon after the client has sent everything and closed its
//!   side,
//! - wrote a byte stream that parses, with only the protocol spec and the
//!   bytes the client sent as a guide, as a valid NBD reply sequence: the
//!   greeting; for every option the client completed (but
//!   `NBD_OPT_EXPORT_NAME`) replies about that option ending in exactly one
//!   ACK or error; the export-name reply if that is how the client entered
//!   transmission; then exactly one reply (or chunk sequence ending in DONE)
//!   for every request the client completed before disconnecting or
//!   breaking the stream, none for any other, and no success for a request
//!   outside the export.
//!
//! The checker is written from the spec (its constants are its own, not
//! the server's), so it does not share the server's mistakes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hablk::cluster::lease::Lease;
use hablk::config::{Config as HablkConfig, IoEngineKind, Protocol};
use hablk::meta::tracker::Tracker;
use hablk::meta::MetaStore;
use hablk::nbd::handshake::{handshake, Session};
use hablk::nbd::transmission::serve;
use hablk::nbd::ExportPolicy;
use hablk::storage::Storage;
use hablk::volume::{ExportInfo, Gate, Volume, VolumeParts};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

// --- The protocol, from the spec (doc/proto.md of the NBD project). ---

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;
const TFLAG_HAS_FLAGS: u16 = 1 << 0;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
/// Largest option the server reads (the spec leaves it to the server; 4096
/// for a name plus room for queries). Options beyond it end the handshake.
const MAX_OPTION_BYTES: u32 = 64 << 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;
/// ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_PLATFORM, ERR_TLS_REQD,
/// ERR_UNKNOWN, ERR_SHUTDOWN, ERR_BLOCK_SIZE_REQD, ERR_TOO_BIG,
/// ERR_EXT_HEADER_REQD.
const REP_ERRORS: [u32; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN.
const ERRNOS: [u32; 8] = [1, 5, 12, 22, 28, 75, 95, 108];
const STATE_HOLE: u32 = 1 << 0;
const STATE_ZERO: u32 = 1 << 1;

const REQUEST_HEADER_BYTES: usize = 28;
/// What the server advertises as its maximum block size; larger writes
/// are drained (up to [`MAX_DRAIN_BYTES`]) or end the connection.
const MAX_REQUEST_BYTES: u32 = 32 << 20;
const MAX_DRAIN_BYTES: u32 = 64 << 20;

// --- The server under test. ---

const EXPORT: &str = "r0";
const EXPORT_BYTES: u64 = 1 << 20;
/// The disk holds the export and the internal metadata behind it.
const DISK_BYTES: u64 = 8 << 20;
/// Ample for any case here (they take milliseconds); only a hang hits it.
const CONNECTION_LIMIT: Duration = Duration::from_secs(20);
/// The shared byte budget in 1 KiB units (the daemon's default size).
const BUDGET_UNITS: usize = 512 << 10;
/// Each write's payload bytes are at most this (longer writes send none).
const MAX_SENT_PAYLOAD_BYTES: u32 = 64 << 10;

/// A real volume of a single-node resource on a temp file (metadata made
/// as `create-md` makes it, internal); one per test, shared by its cases.
struct Fixture {
    _dir: tempfile::TempDir,
    volume: Arc<Volume>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("alpha.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        let config_path = dir.path().join("hablk.toml");
        let text = format!(
            "[resource]\nname = \"{EXPORT}\"\n\n[[node]]\nname = \"alpha\"\nid = 0\n\
             address = \"127.0.0.1:7789\"\ncontrol = \"{}\"\n\
             nbd = \"127.0.0.1:10809\"\ndisk = \"{}\"\n",
            dir.path().join("alpha.sock").display(),
            disk.display()
        );
        let config = HablkConfig::parse(&config_path, &text).unwrap();
        let node = config.node("alpha").unwrap().clone();
        let meta = MetaStore::create(&config, &node, false).unwrap();
        let superblock = meta.superblock().clone();
        assert!(superblock.layout.data_capacity_bytes >= EXPORT_BYTES);
        let storage = Storage::open(
            &disk,
            IoEngineKind::Threads,
            false,
            superblock.layout.data_capacity_bytes,
        )
        .unwrap();
        let tracker = Tracker::open(meta.path().to_owned(), &superblock).unwrap();
        let parts = VolumeParts {
            resource: EXPORT.to_owned(),
            me: node.id,
            protocol: Protocol::C,
            data_nodes: hablk::vocabulary::node::NodeSet::of(node.id),
            storage: Arc::new(storage),
            tracker,
            lease: Arc::new(Lease::new(Duration::from_secs(5))),
        };
        let gate = Gate::Open {
            size_bytes: EXPORT_BYTES,
        };
        let volume = Arc::new(Volume::new(parts, gate));
        Fixture { _dir: dir, volume }
    }
}

struct VolumePolicy(Arc<Volume>);

impl ExportPolicy for VolumePolicy {
    fn export_name(&self) -> &str {
        self.0.resource()
    }
    fn description(&self) -> String {
        "property-test export".to_owned()
    }
    fn probe(&self) -> Result<ExportInfo, String> {
        self.0.export()
    }
    async fn attach(&self) -> Result<ExportInfo, String> {
        self.0.export()
    }
}

/// Counts the bytes the server reads and writes, so the checker knows
/// where the handshake ended on both sides.
struct Counting<S> {
    inner: S,
    read_bytes: usize,
    written_bytes: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            this.read_bytes += buf.filled().len() - before;
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.written_bytes += n;
        }
        poll
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            this.written_bytes += n;
        }
        poll
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What one connection did.
#[derive(Debug)]
struct Run {
    /// Client bytes the handshake read, and server bytes it wrote.
    handshake_read: usize,
    handshake_written: usize,
    session: Option<Session>,
    /// `None` if the handshake did not reach transmission.
    served: Option<Result<(), String>>,
    /// Everything the server wrote.
    out: Vec<u8>,
}

/// Runs one connection: the client sends `input`, closes its side, and
/// reads until the server closes. `Err` if the server did not finish.
fn run_connection(volume: &Arc<Volume>, input: &[u8]) -> Result<Run, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let volume = volume.clone();
    runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(64 << 10);
        let server_side = async move {
            let mut stream = Counting {
                inner: server,
                read_bytes: 0,
                written_bytes: 0,
            };
            let policy = VolumePolicy(volume.clone());
            let result = handshake(&mut stream, &policy).await;
            let (handshake_read, handshake_written) = (stream.read_bytes, stream.written_bytes);
            let (session, served) = match result {
                Ok(session) => {
                    let budget = Arc::new(Semaphore::new(BUDGET_UNITS));
                    let drain = CancellationToken::new();
                    let served = serve(stream, session, volume, budget, drain, "proptest".into())
                        .await
                        .map_err(|e| e.to_string());
                    (Some(session), Some(served))
                }
                Err(_) => (None, None),
            };
            (handshake_read, handshake_written, session, served)
        };
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async move {
            // The server may hang up before reading everything.
            let _ = to_server.write_all(input).await;
            let _ = to_server.shutdown().await;
        };
        let receive = async move {
            let mut out = Vec::new();
            let _ = from_server.read_to_end(&mut out).await;
            out
        };
        let everything = async { tokio::join!(server_side, send, receive) };
        match tokio::time::timeout(CONNECTION_LIMIT, everything).await {
            Ok(((handshake_read, handshake_written, session, served), (), out)) => Ok(Run {
                handshake_read,
                handshake_written,
                session,
                served,
                out,
            }),
            Err(_) => Err(format!(
                "the server did not finish within {CONNECTION_LIMIT:?} of the client closing"
            )),
        }
    })
}

// --- The checker. ---

/// Reads big-endian fields off a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!(
                "{}: wanted {n} more bytes, {} left",
                self.what,
                self.bytes.len()
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if condition {
        Ok(())
    } else {
        Err(message())
    }
}

/// An option the client sent in full.
struct SentOption {
    code: u32,
}

/// The options the client completed within the bytes the handshake read.
fn sent_options(client: &[u8]) -> (u32, Vec<SentOption>) {
    let mut r = Reader {
        bytes: client,
        what: "client",
    };
    let Ok(flags) = r.u32() else {
        return (0, Vec::new());
    };
    let mut options = Vec::new();
    while let (Ok(magic), Ok(code), Ok(length)) = (r.u64(), r.u32(), r.u32()) {
        if magic != IHAVEOPT || length > MAX_OPTION_BYTES || r.take(length as usize).is_err() {
            break;
        }
        options.push(SentOption { code });
        if code == OPT_EXPORT_NAME {
            break;
        }
    }
    (flags, options)
}

/// Checks the replies to one option, up to and including the final one.
fn check_option_replies(r: &mut Reader<'_>, code: u32) -> Result<(), String> {
    let mut saw_export = false;
    loop {
        let magic = r.u64()?;
        ensure(magic == OPTION_REPLY_MAGIC, || {
            format!("option reply magic {magic:#x}")
        })?;
        let option = r.u32()?;
        ensure(option == code, || {
            format!("reply about option {option} while option {code} was pending")
        })?;
        let reply_type = r.u32()?;
        let length = r.u32()?;
        let data = r.take(length as usize)?;
        let mut d = Reader {
            bytes: data,
            what: "option reply data",
        };
        match reply_type {
            REP_ACK => {
                ensure(data.is_empty(), || "ACK with data".into())?;
                ensure((code != OPT_INFO && code != OPT_GO) || saw_export, || {
                    format!("option {code} acknowledged without NBD_INFO_EXPORT")
                })?;
                return Ok(());
            }
            t if t & REP_FLAG_ERROR != 0 => {
                ensure(REP_ERRORS.contains(&(t & !REP_FLAG_ERROR)), || {
                    format!("unknown option error {t:#x}")
                })?;
                ensure(std::str::from_utf8(data).is_ok(), || {
                    "error message is not UTF-8".into()
                })?;
                return Ok(());
            }
            REP_SERVER => {
                ensure(code == OPT_LIST, || format!("REP_SERVER for option {code}"))?;
                let name_len = d.u32()? as usize;
                ensure(name_len == d.bytes.len(), || {
                    "REP_SERVER name length".into()
                })?;
            }
            REP_INFO => {
                ensure(code == OPT_INFO || code == OPT_GO, || {
                    format!("REP_INFO for option {code}")
                })?;
                match d.u16()? {
                    INFO_EXPORT => {
                        let size = d.u64()?;
                        let flags = d.u16()?;
                        ensure(d.is_empty(), || "NBD_INFO_EXPORT length".into())?;
                        ensure(size == EXPORT_BYTES, || format!("export size {size}"))?;
                        ensure(flags & TFLAG_HAS_FLAGS != 0, || "HAS_FLAGS missing".into())?;
                        saw_export = true;
                    }
                    INFO_BLOCK_SIZE => {
                        let (min, preferred, max) = (d.u32()?, d.u32()?, d.u32()?);
                        ensure(d.is_empty(), || "NBD_INFO_BLOCK_SIZE length".into())?;
                        ensure(
                            min.is_power_of_two()
                                && preferred.is_power_of_two()
                                && min <= preferred
                                && preferred <= max,
                            || format!("block sizes {min}/{preferred}/{max}"),
                        )?;
                    }
                    INFO_NAME | INFO_DESCRIPTION => {
                        ensure(std::str::from_utf8(d.bytes).is_ok(), || {
                            "info text is not UTF-8".into()
                        })?;
                    }
                    other => return Err(format!("unrequested info type {other}")),
                }
            }
            REP_META_CONTEXT => {
                ensure(
                    code == OPT_LIST_META_CONTEXT || code == OPT_SET_META_CONTEXT,
                    || format!("REP_META_CONTEXT for option {code}"),
                )?;
                let _id = d.u32()?;
                ensure(
                    !d.is_empty() && std::str::from_utf8(d.bytes).is_ok(),
                    || "bad context name".into(),
                )?;
            }
            other => return Err(format!("unknown option reply type {other:#x}")),
        }
    }
}

/// Checks the handshake part of the server's output against the options
/// the client completed.
fn check_handshake(client: &[u8], run: &Run) -> Result<(), String> {
    let out = &run.out[..run.handshake_written];
    let mut r = Reader {
        bytes: out,
        what: "handshake",
    };
    ensure(r.u64()? == NBDMAGIC, || "greeting magic".into())?;
    ensure(r.u64()? == IHAVEOPT, || "greeting IHAVEOPT".into())?;
    let flags = r.u16()?;
    ensure(flags & FLAG_FIXED_NEWSTYLE != 0, || {
        "not fixed newstyle".into()
    })?;

    let (client_flags, options) = sent_options(&client[..run.handshake_read]);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        ensure(options.is_empty() && run.session.is_none(), || {
            "options served after unknown client flags".into()
        })?;
    }
    for option in &options {
        if option.code == OPT_EXPORT_NAME {
            // No option reply: success is the export-name reply, failure a
            // closed connection.
            if let Some(session) = &run.session {
                let size = r.u64()?;
                let flags = r.u16()?;
                ensure(size == session.export.size_bytes, || {
                    "export-name reply size".into()
                })?;
                ensure(flags & TFLAG_HAS_FLAGS != 0, || "HAS_FLAGS missing".into())?;
                if client_flags & FLAG_C_NO_ZEROES == 0 {
                    ensure(r.take(124)?.iter().all(|&b| b == 0), || {
                        "export-name reply padding".into()
                    })?;
                }
            }
            continue;
        }
        check_option_replies(&mut r, option.code)?;
    }
    ensure(r.is_empty(), || {
        format!("{} stray bytes after the option replies", r.bytes.len())
    })?;
    if run.session.is_some() {
        let last = options.last().map(|o| o.code);
        ensure(
            last == Some(OPT_GO) || last == Some(OPT_EXPORT_NAME),
            || format!("transmission entered after option {last:?}"),
        )?;
    }
    Ok(())
}

/// A request the server read in full, as the client sent it.
#[derive(Debug, Clone, Copy)]
struct SentRequest {
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
}

/// What the server must answer: every request read in full up to the end
/// of the stream, a disconnect, or a break of the stream. Also whether
/// the connection is to end in error (the stream broke).
fn expected_requests(mut stream: &[u8]) -> (Vec<(u64, SentRequest)>, bool) {
    let mut requests = Vec::new();
    loop {
        let Some(header) = stream.get(..REQUEST_HEADER_BYTES) else {
            return (requests, false);
        };
        let mut r = Reader {
            bytes: header,
            what: "request",
        };
        let magic = r.u32().unwrap();
        if magic != REQUEST_MAGIC {
            return (requests, true);
        }
        let flags = r.u16().unwrap();
        let command = r.u16().unwrap();
        let handle = r.u64().unwrap();
        let offset = r.u64().unwrap();
        let length = r.u32().unwrap();
        let request = SentRequest {
            command,
            flags,
            offset,
            length,
        };
        let payload = if command == CMD_WRITE { length } else { 0 };
        if payload > MAX_DRAIN_BYTES {
            // Too large to drain: answered with an error, then closed.
            requests.push((handle, request));
            return (requests, true);
        }
        let total = REQUEST_HEADER_BYTES + payload as usize;
        if stream.len() < total {
            return (requests, false);
        }
        stream = &stream[total..];
        if command == CMD_DISC && flags & !CMD_FLAG_FUA == 0 {
            return (requests, false);
        }
        requests.push((handle, request));
    }
}

/// A successful reply must be for a request inside the export.
fn check_success(request: &SentRequest) -> Result<(), String> {
    let ranged = matches!(
        request.command,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if ranged {
        let end = request.offset.checked_add(u64::from(request.length));
        ensure(
            request.length > 0 && end.is_some_and(|end| end <= EXPORT_BYTES),
            || format!("{request:?} succeeded outside the export"),
        )?;
    }
    if request.command == CMD_FLUSH {
        ensure(request.offset == 0 && request.length == 0, || {
            format!("{request:?} succeeded")
        })?;
    }
    ensure(request.command <= CMD_BLOCK_STATUS, || {
        format!("unknown command {request:?} succeeded")
    })
}

/// Checks the transmission part of the server's output against the
/// requests the client sent.
fn check_transmission(
    client: &[u8],
    run: &Run,
    session: &Session,
    coverage: &mut Coverage,
) -> Result<(), String> {
    let (expected, broken) = expected_requests(&client[run.handshake_read..]);
    let served_ok = matches!(run.served, Some(Ok(())));
    ensure(served_ok != broken, || {
        format!("serve returned {:?}; stream broken: {broken}", run.served)
    })?;
    let mut pending: HashMap<u64, SentRequest> = HashMap::new();
    for &(handle, request) in &expected {
        if pending.insert(handle, request).is_some() {
            // The client reused a handle (a mutated stream): its replies
            // cannot be told apart, so only the rest is checked.
            coverage.ambiguous += 1;
            return Ok(());
        }
    }
    // Bytes of data seen so far for each structured READ.
    let mut read_bytes: HashMap<u64, u64> = HashMap::new();
    let mut r = Reader {
        bytes: &run.out[run.handshake_written..],
        what: "transmission",
    };
    while !r.is_empty() {
        match r.u32()? {
            SIMPLE_REPLY_MAGIC => {
                let error = r.u32()?;
                let handle = r.u64()?;
                let request = pending
                    .remove(&handle)
                    .ok_or_else(|| format!("simple reply for unknown handle {handle:#x}"))?;
                coverage.replies += 1;
                if error != 0 {
                    ensure(ERRNOS.contains(&error), || format!("errno {error}"))?;
                    continue;
                }
                coverage.successes += 1;
                check_success(&request)?;
                if session.structured {
                    // Data never follows a simple reply, and neither READ
                    // nor BLOCK_STATUS can succeed without it.
                    ensure(
                        request.command != CMD_READ && request.command != CMD_BLOCK_STATUS,
                        || format!("{request:?} answered with a simple reply"),
                    )?;
                } else {
                    ensure(request.command != CMD_BLOCK_STATUS, || {
                        "BLOCK_STATUS without a context".into()
                    })?;
                    if request.command == CMD_READ {
                        r.take(request.length as usize)?;
                    }
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                ensure(session.structured, || {
                    "structured reply without negotiation".into()
                })?;
                let flags = r.u16()?;
                let reply_type = r.u16()?;
                let handle = r.u64()?;
                let length = r.u32()?;
                let data = r.take(length as usize)?;
                let request = *pending
                    .get(&handle)
                    .ok_or_else(|| format!("structured reply for unknown handle {handle:#x}"))?;
                ensure(flags & !REPLY_FLAG_DONE == 0, || {
                    format!("reply flags {flags:#x}")
                })?;
                check_chunk(&request, reply_type, data, &mut read_bytes, handle)?;
                if flags & REPLY_FLAG_DONE != 0 {
                    pending.remove(&handle);
                    let errored = reply_type & (1 << 15) != 0;
                    coverage.replies += 1;
                    coverage.structured_replies += 1;
                    coverage.successes += usize::from(!errored);
                    if request.command == CMD_READ && !errored {
                        let got = read_bytes.get(&handle).copied().unwrap_or(0);
                        ensure(got == u64::from(request.length), || {
                            format!("{request:?} answered with {got} bytes")
                        })?;
                    }
                }
            }
            magic => return Err(format!("reply magic {magic:#010x}")),
        }
    }
    ensure(pending.is_empty(), || {
        format!("requests without a reply: {pending:?}")
    })
}

fn check_chunk(
    request: &SentRequest,
    reply_type: u16,
    data: &[u8],
    read_bytes: &mut HashMap<u64, u64>,
    handle: u64,
) -> Result<(), String> {
    let mut d = Reader {
        bytes: data,
        what: "chunk",
    };
    match reply_type {
        REPLY_TYPE_NONE => ensure(data.is_empty(), || "NONE chunk with data".into()),
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            ensure(request.command == CMD_READ, || {
                format!("read chunk for {request:?}")
            })?;
            check_success(request)?;
            let offset = d.u64()?;
            let covered = if reply_type == REPLY_TYPE_OFFSET_DATA {
                d.bytes.len() as u64
            } else {
                u64::from(d.u32()?)
            };
            ensure(covered > 0, || "empty read chunk".into())?;
            let end = u64::from(request.length) + request.offset;
            ensure(offset >= request.offset && offset + covered <= end, || {
                format!("chunk {offset}+{covered} outside {request:?}")
            })?;
            *read_bytes.entry(handle).or_default() += covered;
            Ok(())
        }
        REPLY_TYPE_BLOCK_STATUS => {
            ensure(request.command == CMD_BLOCK_STATUS, || {
                format!("block status for {request:?}")
            })?;
            check_success(request)?;
            let _context = d.u32()?;
            ensure(!d.is_empty() && d.bytes.len() % 8 == 0, || {
                format!("block status of {} bytes", data.len())
            })?;
            let count = d.bytes.len() / 8;
            ensure(request.flags & CMD_FLAG_REQ_ONE == 0 || count == 1, || {
                format!("{count} extents for REQ_ONE")
            })?;
            let mut total = 0u64;
            while !d.is_empty() {
                let (length, state) = (d.u32()?, d.u32()?);
                ensure(length > 0, || "empty extent".into())?;
                ensure(state & !(STATE_HOLE | STATE_ZERO) == 0, || {
                    format!("extent state {state:#x}")
                })?;
                total += u64::from(length);
            }
            ensure(total <= EXPORT_BYTES - request.offset, || {
                format!("extents of {total} bytes past the export for {request:?}")
            })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let errno = d.u32()?;
            let message_len = d.u16()? as usize;
            let message = d.take(message_len)?;
            ensure(ERRNOS.contains(&errno), || format!("errno {errno}"))?;
            ensure(std::str::from_utf8(message).is_ok(), || {
                "error message is not UTF-8".into()
            })?;
            if reply_type == REPLY_TYPE_ERROR_OFFSET {
                d.u64()?;
            }
            ensure(d.is_empty(), || "bytes after the error message".into())
        }
        other => Err(format!("unknown chunk type {other:#x}")),
    }
}

/// What a test's cases reached, to catch generators that stopped
/// reaching the interesting parts.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    cases: usize,
    /// Cases that entered the transmission phase.
    transmissions: usize,
    /// Requests answered, answered successfully, answered with chunks.
    replies: usize,
    successes: usize,
    structured_replies: usize,
    /// Cases whose client reused a handle (replies not matched).
    ambiguous: usize,
}

/// Runs one case and checks everything the server wrote.
fn check_stream(fixture: &Fixture, client: &[u8], coverage: &mut Coverage) -> Result<(), String> {
    let run = run_connection(&fixture.volume, client)?;
    coverage.cases += 1;
    check_handshake(client, &run)?;
    if let Some(session) = &run.session {
        coverage.transmissions += 1;
        check_transmission(client, &run, session, coverage)?;
    } else {
        ensure(run.out.len() == run.handshake_written, || {
            "bytes written after a failed handshake".into()
        })?;
    }
    Ok(())
}

/// Runs `cases` cases (or `PROPTEST_CASES`, for a longer soak).
fn run_cases(cases: u32, strategy: impl Strategy<Value = Vec<u8>>) -> Coverage {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    let fixture = Fixture::new();
    let coverage = Cell::new(Coverage::default());
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |client| {
        let mut now = coverage.get();
        let checked = check_stream(&fixture, &client, &mut now);
        coverage.set(now);
        checked.map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let coverage = coverage.get();
    eprintln!("{coverage:?}");
    coverage
}

// --- Client byte streams. ---

fn put_option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn framed(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_option(&mut out, code, data);
    out
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn info_data(export: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

fn meta_data(export: &str, queries: &[String]) -> Vec<u8> {
    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        put_string(&mut data, query);
    }
    data
}

fn export_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(EXPORT.to_owned()),
        Just("nope".to_owned()),
        "[a-z0-9:]{0,6}",
    ]
}

fn good_export_name() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), Just(EXPORT.to_owned())]
}

fn info_request() -> impl Strategy<Value = u16> {
    prop_oneof![0u16..4, any::<u16>()]
}

fn client_flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => Just(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES),
        3 => Just(FLAG_C_FIXED_NEWSTYLE),
        1 => Just(0),
        1 => any::<u32>(),
    ]
}

/// One option, well formed or not.
fn option() -> impl Strategy<Value = Vec<u8>> {
    let query = prop_oneof![
        Just("base:allocation".to_owned()),
        Just("base:".to_owned()),
        Just("qemu:dirty-bitmap:x".to_owned()),
        "[a-z:]{0,12}",
    ];
    let known_code = prop_oneof![
        Just(OPT_EXPORT_NAME),
        Just(OPT_LIST),
        Just(OPT_INFO),
        Just(OPT_GO),
        Just(OPT_STRUCTURED_REPLY),
        Just(OPT_LIST_META_CONTEXT),
        Just(OPT_SET_META_CONTEXT),
    ];
    prop_oneof![
        3 => Just(framed(OPT_STRUCTURED_REPLY, &[])),
        1 => Just(framed(OPT_LIST, &[])),
        1 => Just(framed(OPT_STARTTLS, &[])),
        2 => (export_name(), prop::collection::vec(info_request(), 0..4))
            .prop_map(|(name, requests)| framed(OPT_INFO, &info_data(&name, &requests))),
        3 => (
            prop_oneof![Just(OPT_LIST_META_CONTEXT), Just(OPT_SET_META_CONTEXT)],
            export_name(),
            prop::collection::vec(query, 0..3),
        )
            .prop_map(|(code, name, queries)| framed(code, &meta_data(&name, &queries))),
        1 => (11u32..64, prop::collection::vec(any::<u8>(), 0..24))
            .prop_map(|(code, data)| framed(code, &data)),
        1 => (known_code, prop::collection::vec(any::<u8>(), 0..24))
            .prop_map(|(code, data)| framed(code, &data)),
    ]
}

/// How the client ends the handshake.
fn finish() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => (good_export_name(), prop::collection::vec(info_request(), 0..3))
            .prop_map(|(name, requests)| framed(OPT_GO, &info_data(&name, &requests))),
        2 => good_export_name().prop_map(|name| framed(OPT_EXPORT_NAME, name.as_bytes())),
        1 => export_name().prop_map(|name| framed(OPT_GO, &info_data(&name, &[]))),
        1 => Just(framed(OPT_ABORT, &[])),
        1 => Just(Vec::new()),
    ]
}

/// A request header's fields, before the handle is assigned.
#[derive(Debug, Clone)]
struct RequestSpec {
    magic: u32,
    flags: u16,
    command: u16,
    offset: u64,
    length: u32,
}

fn request() -> impl Strategy<Value = RequestSpec> {
    let magic = prop_oneof![40 => Just(REQUEST_MAGIC), 1 => any::<u32>()];
    let command = prop_oneof![12 => 0u16..=7, 1 => 8u16..=16, 1 => any::<u16>()];
    let flags = prop_oneof![6 => Just(0u16), 4 => 0u16..32, 1 => any::<u16>()];
    let offset = prop_oneof![
        6 => (0..EXPORT_BYTES / 512).prop_map(|block| block * 512),
        3 => 0..=EXPORT_BYTES + 8192,
        1 => Just(u64::MAX - 511),
        1 => any::<u64>(),
    ];
    let length = prop_oneof![
        1 => Just(0u32),
        6 => 1u32..=8192,
        3 => (1u32..=64).prop_map(|blocks| blocks * 4096),
        1 => Just(MAX_REQUEST_BYTES + 1),
        1 => Just(MAX_DRAIN_BYTES + 1),
        1 => any::<u32>(),
    ];
    // Flush and disconnect mostly carry a zero range, as they must.
    let tidy = prop::bool::weighted(0.7);
    (magic, command, flags, offset, length, tidy).prop_map(
        |(magic, command, flags, offset, length, tidy)| {
            let zero_range = tidy && (command == CMD_FLUSH || command == CMD_DISC);
            RequestSpec {
                magic,
                flags,
                command,
                offset: if zero_range { 0 } else { offset },
                length: if zero_range { 0 } else { length },
            }
        },
    )
}

/// Encodes requests with distinct handles; a write carries its payload
/// when it is at most [`MAX_SENT_PAYLOAD_BYTES`] (else the stream runs out
/// inside it).
fn requests_bytes(requests: &[RequestSpec]) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, spec) in requests.iter().enumerate() {
        // Multiplying by an odd constant is a bijection: distinct handles.
        let handle = (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        out.extend_from_slice(&spec.magic.to_be_bytes());
        out.extend_from_slice(&spec.flags.to_be_bytes());
        out.extend_from_slice(&spec.command.to_be_bytes());
        out.extend_from_slice(&handle.to_be_bytes());
        out.extend_from_slice(&spec.offset.to_be_bytes());
        out.extend_from_slice(&spec.length.to_be_bytes());
        if spec.command == CMD_WRITE && spec.length <= MAX_SENT_PAYLOAD_BYTES {
            out.resize(out.len() + spec.length as usize, index as u8);
        }
    }
    out
}

/// A valid greeting, options, a way into transmission, then requests.
fn session_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        client_flags(),
        prop::collection::vec(option(), 0..5),
        finish(),
        prop::collection::vec(request(), 0..24),
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 0..40)],
    )
        .prop_map(|(flags, options, finish, requests, tail)| {
            let mut out = flags.to_be_bytes().to_vec();
            options.iter().for_each(|o| out.extend_from_slice(o));
            out.extend_from_slice(&finish);
            out.extend_from_slice(&requests_bytes(&requests));
            out.extend_from_slice(&tail);
            out
        })
}

/// Options framed correctly, with random codes and data.
fn framed_random_options() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![4 => 0u32..16, 1 => any::<u32>()];
    (
        client_flags(),
        prop::collection::vec((code, prop::collection::vec(any::<u8>(), 0..48)), 0..8),
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(flags, options, tail)| {
            let mut out = flags.to_be_bytes().to_vec();
            for (code, data) in options {
                put_option(&mut out, code, &data);
            }
            out.extend_from_slice(&tail);
            out
        })
}

/// A session stream with a few bytes flipped and maybe cut short.
fn mutated_session_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        session_stream(),
        prop::collection::vec((any::<Index>(), 1u8..=255), 1..4),
        prop::option::weighted(0.3, any::<Index>()),
    )
        .prop_map(|(mut bytes, flips, cut)| {
            if !bytes.is_empty() {
                for (at, mask) in flips {
                    let at = at.index(bytes.len());
                    bytes[at] ^= mask;
                }
                if let Some(cut) = cut {
                    bytes.truncate(cut.index(bytes.len()));
                }
            }
            bytes
        })
}

#[test]
fn fully_random_streams() {
    run_cases(256, prop::collection::vec(any::<u8>(), 0..600));
}

#[test]
fn framed_options_with_random_codes_and_data() {
    run_cases(256, framed_random_options());
}

#[test]
fn valid_handshake_then_random_requests() {
    let coverage = run_cases(256, session_stream());
    // Most cases reach transmission, and requests are answered both with
    // success and with errors, in both reply styles.
    let cases = coverage.cases;
    assert!(coverage.transmissions >= cases / 2, "{coverage:?}");
    assert!(coverage.successes >= cases / 2, "{coverage:?}");
    assert!(
        coverage.replies >= coverage.successes + cases / 2,
        "{coverage:?}"
    );
    assert!(coverage.structured_replies >= cases / 4, "{coverage:?}");
}

#[test]
fn mutated_sessions() {
    let coverage = run_cases(256, mutated_session_stream());
    assert!(coverage.transmissions >= coverage.cases / 4, "{coverage:?}");
}

/// A fixed session whose replies the checker accepts, so that the checks
/// below are known to start from a valid stream.
fn known_good_session(structured: bool) -> Vec<u8> {
    let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if structured {
        put_option(&mut out, OPT_STRUCTURED_REPLY, &[]);
        let queries = ["base:allocation".to_owned()];
        put_option(&mut out, OPT_SET_META_CONTEXT, &meta_data("", &queries));
    }
    put_option(&mut out, OPT_GO, &info_data(EXPORT, &[INFO_BLOCK_SIZE]));
    let request = |command, offset, length| RequestSpec {
        magic: REQUEST_MAGIC,
        flags: 0,
        command,
        offset,
        length,
    };
    out.extend_from_slice(&requests_bytes(&[
        request(CMD_WRITE, 4096, 512),
        request(CMD_READ, 0, 8192),
        request(CMD_READ, EXPORT_BYTES, 1),
        request(CMD_FLUSH, 0, 0),
        request(CMD_BLOCK_STATUS, 0, 65536),
        request(CMD_TRIM, 0, 4096),
    ]));
    out
}

/// Damages a server's output; gets where transmission starts in it.
type Damage = fn(&mut Vec<u8>, usize);

/// The checker is not vacuous: it accepts the server's own replies and
/// rejects them once a reply is lost, cut short or garbled.
#[test]
fn the_checker_rejects_damaged_reply_streams() {
    let fixture = Fixture::new();
    for structured in [false, true] {
        let client = known_good_session(structured);
        let mut coverage = Coverage::default();
        let run = run_connection(&fixture.volume, &client).unwrap();
        let check = |run: &Run| -> Result<(), String> {
            check_handshake(&client, run)?;
            let session = run.session.as_ref().ok_or("no session")?;
            check_transmission(&client, run, session, &mut Coverage::default())
        };
        check_handshake(&client, &run).unwrap();
        check_transmission(&client, &run, &run.session.unwrap(), &mut coverage).unwrap();
        // All but the read past the end succeed, and BLOCK_STATUS needs
        // the context only structured replies can carry.
        assert_eq!(coverage.replies, 6, "structured: {structured}");
        assert_eq!(coverage.successes, 4 + usize::from(structured));

        // Each damage gets the output and where transmission starts in it.
        let damaged = |damage: fn(&mut Vec<u8>, usize)| {
            let mut out = run.out.clone();
            damage(&mut out, run.handshake_written);
            Run {
                handshake_read: run.handshake_read,
                handshake_written: run.handshake_written,
                session: run.session,
                served: run.served.clone(),
                out,
            }
        };
        let cases: [(&str, Damage); 4] = [
            ("last byte lost", |out, _| _ = out.pop()),
            ("replies lost", |out, start| out.truncate(start)),
            ("first reply magic garbled", |out, start| out[start] ^= 1),
            ("greeting garbled", |out, _| out[0] ^= 1),
        ];
        for (what, damage) in cases {
            assert!(
                check(&damaged(damage)).is_err(),
                "{what} went unnoticed (structured: {structured})"
            );
        }
    }
}

/// Found by these tests: `NBD_OPT_EXPORT_NAME` has no error reply (the
/// client would read one as the export's size and flags), so a name that
/// does not parse (not UTF-8, here) must close the connection, as an
/// unknown name does, instead of drawing `NBD_REP_ERR_INVALID`.
#[test]
fn an_export_name_that_does_not_parse_closes_the_connection() {
    let fixture = Fixture::new();
    let mut client = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    put_option(&mut client, OPT_EXPORT_NAME, &[0x80]);
    put_option(&mut client, OPT_GO, &info_data("", &[]));
    let run = run_connection(&fixture.volume, &client).unwrap();
    check_handshake(&client, &run).unwrap();
    assert!(run.session.is_none());
    assert_eq!(run.out.len(), 18, "only the greeting: {:x?}", run.out);
}
