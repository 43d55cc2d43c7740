//! The transmission phase of one connection.
//!
//! One task per connection drives three things from a single poll loop:
//! reading requests (two-phase: a whole header, then a whole payload, from
//! one receive buffer), running them (many in flight, each a future in a
//! `FuturesUnordered`), and writing replies (in completion order, batched
//! into one vectored write). No locks, no channels: the socket is never
//! split, and replies that complete together leave in one system call.
//!
//! Limits keep a connection's memory bounded: at most
//! [`MAX_IN_FLIGHT_REQUESTS`] requests and about [`MAX_IN_FLIGHT_BYTES`] of
//! data in flight, at most [`MAX_QUEUED_REPLY_BYTES`] of replies waiting for
//! a slow client; past any of them the loop stops reading until work
//! drains. Across all connections a shared byte budget
//! ([`super::server::MAX_BUFFERED_BYTES_TOTAL`]) bounds the daemon as a whole.
//!
//! A request the protocol allows to fail (bad range, unknown command or
//! flag, I/O error, refused by the gate) gets an error reply and the
//! connection goes on. Only a broken stream (bad request magic, a payload
//! too large to drain) ends it.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::io::{poll_read_buf, poll_write_buf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::handshake::Session;
use super::proto::*;
use crate::volume::{Refusal as GateRefusal, Volume, VolumeError};

/// Requests in flight on one connection (the Linux client sends up to 128).
pub const MAX_IN_FLIGHT_REQUESTS: usize = 256;
/// Data (write payloads and read results) in flight on one connection
/// before it stops reading; one request may overshoot it.
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// Replies waiting for a slow client before the connection stops reading.
pub const MAX_QUEUED_REPLY_BYTES: usize = 64 << 20;
/// Receive buffer kept ready between requests.
const READ_CHUNK_BYTES: usize = 256 << 10;
/// Read data up to this size is copied next to its reply header, so small
/// replies leave in one contiguous piece.
const INLINE_DATA_BYTES: usize = 16 << 10;
/// The shared byte budget counts in these units.
pub const BUDGET_UNIT_BYTES: u64 = 1024;

/// Why a connection ended abnormally.
#[derive(Debug, Error)]
pub enum TransmissionError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("{0}; closing the connection")]
    BadMagic(#[from] BadMagic),
    #[error("write request of {0} bytes is too large to drain; closing the connection")]
    PayloadTooLarge(u32),
}

/// Replies waiting to be written: small pieces gathered in `tail`, large
/// read data kept as its own chunk (no copy).
#[derive(Debug, Default)]
struct ReplyQueue {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    queued_bytes: usize,
}

impl ReplyQueue {
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let sealed = self.tail.split().freeze();
            self.chunks.push_back(sealed);
        }
    }

    fn push_data(&mut self, data: Bytes) {
        self.queued_bytes += data.len();
        if data.len() <= INLINE_DATA_BYTES {
            self.tail.extend_from_slice(&data);
        } else {
            self.seal_tail();
            self.chunks.push_back(data);
        }
    }

    /// Encodes a header (or small reply) into the queue.
    fn encode(&mut self, f: impl FnOnce(&mut BytesMut)) {
        let before = self.tail.len();
        f(&mut self.tail);
        self.queued_bytes += self.tail.len() - before;
    }
}

impl Buf for ReplyQueue {
    fn remaining(&self) -> usize {
        self.queued_bytes
    }

    fn chunk(&self) -> &[u8] {
        match self.chunks.front() {
            Some(chunk) => chunk,
            None => &self.tail,
        }
    }

    fn advance(&mut self, mut cnt: usize) {
        debug_assert!(cnt <= self.queued_bytes);
        self.queued_bytes -= cnt;
        while cnt > 0 {
            match self.chunks.front_mut() {
                Some(chunk) if chunk.len() <= cnt => {
                    cnt -= chunk.len();
                    self.chunks.pop_front();
                }
                Some(chunk) => {
                    chunk.advance(cnt);
                    cnt = 0;
                }
                None => {
                    self.tail.advance(cnt);
                    cnt = 0;
                }
            }
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for chunk in self
            .chunks
            .iter()
            .map(|c| &c[..])
            .chain(std::iter::once(&self.tail[..]))
        {
            if n == dst.len() {
                break;
            }
            if !chunk.is_empty() {
                dst[n] = IoSlice::new(chunk);
                n += 1;
            }
        }
        n
    }
}

/// The outcome of one request, ready to encode.
#[derive(Debug)]
enum Outcome {
    Done,
    Data { offset: u64, data: Bytes },
    Extents(Vec<(u32, u32)>),
    Failed { errno: Errno, message: String },
}

#[derive(Debug)]
struct Completed {
    handle: u64,
    command: Command,
    cost_bytes: u64,
    outcome: Outcome,
    _permit: Option<OwnedSemaphorePermit>,
}

fn errno_of(error: &VolumeError) -> Errno {
    match error {
        VolumeError::Refused { refusal, .. } => match refusal {
            GateRefusal::NotPrimary => Errno::Perm,
            GateRefusal::ShuttingDown => Errno::Shutdown,
            GateRefusal::NoQuorum => Errno::Io,
        },
        VolumeError::FastZeroUnsupported => Errno::NotSup,
        VolumeError::Meta(_) => Errno::Io,
        VolumeError::Io(e) => match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => Errno::NoSpc,
            Some(libc::EINVAL) => Errno::Inval,
            Some(libc::EOPNOTSUPP) => Errno::NotSup,
            _ => Errno::Io,
        },
    }
}

/// Turns allocation runs into BLOCK_STATUS descriptors.
fn extents(runs: Vec<(u64, bool)>, req_one: bool) -> Vec<(u32, u32)> {
    let limit = if req_one {
        1
    } else {
        MAX_BLOCK_STATUS_DESCRIPTORS
    };
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (length, hole) in runs {
        let flags = if hole { STATE_HOLE | STATE_ZERO } else { 0 };
        // Runs never exceed the request length, itself a u32.
        let length = u32::try_from(length).unwrap_or(u32::MAX);
        let full = out.len() == limit;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 = last.0.saturating_add(length),
            _ if full => break,
            _ => out.push((length, flags)),
        }
    }
    out
}

async fn execute(args: ExecuteArgs) -> Completed {
    let ExecuteArgs {
        volume,
        handle,
        command,
        payload,
        cost_bytes,
        permit,
    } = args;
    let result = match command {
        Command::Read { offset, length } => {
            volume.read(offset, length).await.map(|data| Outcome::Data {
                offset,
                data: data.freeze(),
            })
        }
        Command::Write { offset, fua, .. } => volume
            .write(offset, payload, fua)
            .await
            .map(|()| Outcome::Done),
        Command::Flush => volume.flush().await.map(|()| Outcome::Done),
        Command::Trim {
            offset,
            length,
            fua,
        } => volume
            .trim(offset, length, fua)
            .await
            .map(|()| Outcome::Done),
        Command::Cache { offset, length } => {
            volume.cache(offset, length).await.map(|()| Outcome::Done)
        }
        Command::WriteZeroes {
            offset,
            length,
            fua,
            may_punch,
            fast_only,
        } => volume
            .write_zeroes(offset, length, may_punch, fast_only, fua)
            .await
            .map(|()| Outcome::Done),
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => volume
            .allocation(offset, length)
            .await
            .map(|runs| Outcome::Extents(extents(runs, req_one))),
        Command::Disconnect => Ok(Outcome::Done),
    };
    let outcome = result.unwrap_or_else(|error| Outcome::Failed {
        errno: errno_of(&error),
        message: error.to_string(),
    });
    Completed {
        handle,
        command,
        cost_bytes,
        outcome,
        _permit: permit,
    }
}

/// What the connection is doing with the bytes after a header.
#[derive(Debug, Clone, Copy)]
enum Reading {
    Header,
    /// Dropping the payload of a too-large write; then answer `EINVAL`.
    Drain {
        handle: u64,
        remaining: u32,
    },
    /// Stopped: client disconnected, sent DISC, or the stream broke.
    Stopped,
}

/// The per-connection state driven by [`serve`].
struct Connection<S> {
    stream: S,
    volume: Arc<Volume>,
    session: Session,
    negotiated: Negotiated,
    peer: String,
    rbuf: BytesMut,
    /// The last payload was larger than a read chunk: read each request to
    /// its exact end, so a payload never has to be copied out of a buffer
    /// it shares with the next request.
    exact_reads: bool,
    reading: Reading,
    out: ReplyQueue,
    in_flight_bytes: u64,
    budget: Arc<Semaphore>,
    /// A permit granted after waiting, for the request at the head of rbuf.
    reserved: Option<OwnedSemaphorePermit>,
    budget_wait: Option<Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>>,
    drain: Pin<Box<WaitForCancellationFutureOwned>>,
    draining: bool,
    /// Set when the stream broke: finish writing what is queued, then fail.
    fatal: Option<TransmissionError>,
}

/// Serves requests until the client disconnects, a fatal protocol error,
/// or `drain` is cancelled (then in-flight requests finish first).
#[allow(clippy::too_many_arguments)]
pub async fn serve<S>(
    stream: S,
    session: Session,
    volume: Arc<Volume>,
    budget: Arc<Semaphore>,
    drain: CancellationToken,
    peer: String,
) -> Result<(), TransmissionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut connection = Connection {
        stream,
        volume,
        negotiated: session.negotiated(),
        session,
        peer,
        rbuf: BytesMut::with_capacity(READ_CHUNK_BYTES),
        exact_reads: false,
        reading: Reading::Header,
        out: ReplyQueue::default(),
        in_flight_bytes: 0,
        budget,
        reserved: None,
        budget_wait: None,
        drain: Box::pin(drain.cancelled_owned()),
        draining: false,
        fatal: None,
    };
    let mut in_flight = FuturesUnordered::new();
    std::future::poll_fn(|cx| connection.poll(cx, &mut in_flight, execute)).await
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn poll<F, M>(
        &mut self,
        cx: &mut Context<'_>,
        in_flight: &mut FuturesUnordered<F>,
        start: M,
    ) -> Poll<Result<(), TransmissionError>>
    where
        F: Future<Output = Completed>,
        M: Fn(ExecuteArgs) -> F + Copy,
    {
        loop {
            let mut progressed = false;

            if !self.draining && self.drain.as_mut().poll(cx).is_ready() {
                tracing::info!(client = %self.peer, "disconnecting NBD client: export is being withdrawn");
                self.draining = true;
                progressed = true;
            }

            while let Poll::Ready(Some(done)) = in_flight.poll_next_unpin(cx) {
                self.encode(done);
                progressed = true;
            }

            while self.out.has_remaining() {
                match poll_write_buf(Pin::new(&mut self.stream), cx, &mut self.out) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()))
                    }
                    Poll::Ready(Ok(_)) => progressed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => break,
                }
            }

            let stopped = matches!(self.reading, Reading::Stopped) || self.draining;
            if stopped && in_flight.is_empty() && !self.out.has_remaining() {
                return Poll::Ready(match self.fatal.take() {
                    Some(error) => Err(error),
                    None => Ok(()),
                });
            }

            if let Some(wait) = self.budget_wait.as_mut() {
                if let Poll::Ready(permit) = wait.as_mut().poll(cx) {
                    self.budget_wait = None;
                    self.reserved = permit;
                    progressed = true;
                }
            }

            if self.may_read(in_flight.len()) {
                match self.parse(in_flight, start) {
                    Parsed::Progress => continue,
                    Parsed::Blocked => {}
                    Parsed::NeedBytes(wanted) => {
                        let read = if wanted > 0 && (self.exact_reads || wanted > READ_CHUNK_BYTES)
                        {
                            self.rbuf.reserve(wanted);
                            let mut exact = (&mut self.rbuf).limit(wanted);
                            poll_read_buf(Pin::new(&mut self.stream), cx, &mut exact)
                        } else {
                            self.rbuf.reserve(READ_CHUNK_BYTES);
                            poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf)
                        };
                        match read {
                            Poll::Ready(Ok(0)) => {
                                if !self.rbuf.is_empty() {
                                    tracing::info!(client = %self.peer, "NBD client closed mid-request");
                                }
                                self.reading = Reading::Stopped;
                                progressed = true;
                            }
                            Poll::Ready(Ok(_)) => progressed = true,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                            Poll::Pending => {}
                        }
                    }
                }
            }

            if !progressed {
                return Poll::Pending;
            }
        }
    }

    fn may_read(&self, in_flight: usize) -> bool {
        !matches!(self.reading, Reading::Stopped)
            && !self.draining
            && self.budget_wait.is_none()
            && in_flight < MAX_IN_FLIGHT_REQUESTS
            && self.in_flight_bytes < MAX_IN_FLIGHT_BYTES
            && self.out.remaining() < MAX_QUEUED_REPLY_BYTES
    }

    /// Takes what it can from the receive buffer.
    fn parse<F, M>(&mut self, in_flight: &mut FuturesUnordered<F>, start: M) -> Parsed
    where
        F: Future<Output = Completed>,
        M: Fn(ExecuteArgs) -> F,
    {
        if let Reading::Drain { handle, remaining } = self.reading {
            let dropped = self.rbuf.len().min(remaining as usize);
            self.rbuf.advance(dropped);
            let remaining = remaining - dropped as u32;
            if remaining > 0 {
                self.reading = Reading::Drain { handle, remaining };
                return Parsed::NeedBytes(0);
            }
            self.reading = Reading::Header;
            self.reply_error(handle, Errno::Inval, "larger than the maximum block size");
            return Parsed::Progress;
        }
        let Some(head) = self.rbuf.get(..REQUEST_HEADER_BYTES) else {
            return Parsed::NeedBytes(REQUEST_HEADER_BYTES - self.rbuf.len());
        };
        let mut raw = [0u8; REQUEST_HEADER_BYTES];
        raw.copy_from_slice(head);
        let header = match RequestHeader::parse(&raw) {
            Ok(header) => header,
            Err(bad) => {
                tracing::warn!(client = %self.peer, error = %bad, "NBD protocol violation");
                self.fail(TransmissionError::BadMagic(bad));
                return Parsed::Progress;
            }
        };
        let payload_bytes = match header.payload() {
            Payload::None => 0,
            Payload::Data(length) => length as usize,
            Payload::Drain(length) => {
                tracing::info!(client = %self.peer, handle = header.handle, command = header.command,
                    offset = header.offset, length, reason = "larger than the maximum block size; draining its payload",
                    "NBD request refused");
                self.rbuf.advance(REQUEST_HEADER_BYTES);
                self.reading = Reading::Drain {
                    handle: header.handle,
                    remaining: length,
                };
                return Parsed::Progress;
            }
            Payload::TooLarge => {
                self.rbuf.advance(REQUEST_HEADER_BYTES);
                self.reply_error(
                    header.handle,
                    Errno::Inval,
                    "larger than the maximum block size",
                );
                self.fail(TransmissionError::PayloadTooLarge(header.length));
                return Parsed::Progress;
            }
        };
        let total = REQUEST_HEADER_BYTES + payload_bytes;
        self.exact_reads = payload_bytes > READ_CHUNK_BYTES;
        if self.rbuf.len() < total {
            return Parsed::NeedBytes(total - self.rbuf.len());
        }
        let command = match validate(&header, &self.negotiated) {
            Ok(command) => command,
            Err(refusal) => {
                self.rbuf.advance(total);
                tracing::info!(client = %self.peer, handle = header.handle, command = header.command,
                    offset = header.offset, length = header.length, reason = refusal.reason,
                    "NBD request refused");
                self.reply_error(header.handle, refusal.errno, refusal.reason);
                return Parsed::Progress;
            }
        };
        if command == Command::Disconnect {
            self.rbuf.advance(total);
            self.reading = Reading::Stopped;
            return Parsed::Progress;
        }
        let cost_bytes = match command {
            Command::Read { length, .. } | Command::Write { length, .. } => u64::from(length),
            _ => 0,
        };
        let permit = if cost_bytes == 0 {
            None
        } else if let Some(permit) = self.reserved.take() {
            Some(permit)
        } else {
            let units = budget_units(cost_bytes);
            match self.budget.clone().try_acquire_many_owned(units) {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let budget = self.budget.clone();
                    self.budget_wait = Some(Box::pin(async move {
                        budget.acquire_many_owned(units).await.ok()
                    }));
                    return Parsed::Blocked;
                }
            }
        };
        self.rbuf.advance(REQUEST_HEADER_BYTES);
        let payload = self.rbuf.split_to(payload_bytes).freeze();
        self.in_flight_bytes += cost_bytes;
        in_flight.push(start(ExecuteArgs {
            volume: self.volume.clone(),
            handle: header.handle,
            command,
            payload,
            cost_bytes,
            permit,
        }));
        Parsed::Progress
    }

    fn fail(&mut self, error: TransmissionError) {
        self.reading = Reading::Stopped;
        self.fatal = Some(error);
    }

    fn reply_error(&mut self, handle: u64, errno: Errno, message: &str) {
        let structured = self.session.structured;
        self.out.encode(|out| {
            if structured {
                structured_error(out, handle, errno, message);
            } else {
                simple_reply(out, handle, errno as u32);
            }
        });
    }

    fn encode(&mut self, done: Completed) {
        self.in_flight_bytes -= done.cost_bytes;
        let structured = self.session.structured;
        match done.outcome {
            Outcome::Done => self.out.encode(|out| simple_reply(out, done.handle, 0)),
            Outcome::Data { offset, data } => {
                self.out.encode(|out| {
                    if structured {
                        read_data_header(out, done.handle, offset, data.len() as u32);
                    } else {
                        simple_reply(out, done.handle, 0);
                    }
                });
                self.out.push_data(data);
            }
            Outcome::Extents(extents) => self
                .out
                .encode(|out| block_status_reply(out, done.handle, &extents)),
            Outcome::Failed { errno, message } => {
                tracing::info!(client = %self.peer, handle = done.handle, command = ?done.command,
                    errno = ?errno, reason = %message, "NBD request failed");
                self.reply_error(done.handle, errno, &message);
            }
        }
    }
}

fn budget_units(cost_bytes: u64) -> u32 {
    u32::try_from(cost_bytes.div_ceil(BUDGET_UNIT_BYTES)).unwrap_or(u32::MAX)
}

enum Parsed {
    Progress,
    Blocked,
    NeedBytes(usize),
}

/// Everything a request future needs.
struct ExecuteArgs {
    volume: Arc<Volume>,
    handle: u64,
    command: Command,
    payload: Bytes,
    cost_bytes: u64,
    permit: Option<OwnedSemaphorePermit>,
}
