//! The io_uring engine.
//!
//! One ring per backing file, shared by every task. Submitting tasks push
//! their entries under the submission lock and enter the kernel once; reads
//! from the page cache and buffered writes often complete during that very
//! call, so the submitter reaps the completion queue right after — no thread
//! hop. Completions that arrive later (io-wq workers, device interrupts)
//! signal an eventfd registered with the ring, which wakes a reaper task in
//! the tokio runtime.
//!
//! Buffered I/O takes a shorter road where io_uring would only add thread
//! switches: a read first tries the page cache inline (`RWF_NOWAIT`), and a
//! small buffered write is copied into the page cache inline — ext4 cannot
//! do buffered writes without blocking, so io_uring would hand them to a
//! kernel worker thread and back, tripling the latency of a 4 KiB write.
//! Large writes, O_DIRECT, flushes and fallocate go through the ring.
//!
//! Every operation is boxed as a `Pending` that owns its buffer; the box's
//! address is the entry's `user_data`, and only the completion frees it. A
//! caller that stops waiting therefore never frees memory the kernel is
//! still using. Short reads and writes are resubmitted for the remainder.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{Engine, IoCompleter, IoCompletion, IoDone, IoOp};

/// Submission queue entries. Callers bound their in-flight operations; when
/// more arrive at once, the submitter flushes the queue to the kernel and
/// goes on (the kernel keeps overflowing completions, it never drops them).
pub const URING_ENTRIES: u32 = 1024;

/// One operation in flight, owned by the ring until its completion.
struct Pending {
    op: IoOp,
    done: IoCompleter,
    /// Bytes already transferred (reads and writes may complete short).
    progress: usize,
}

struct Shared {
    ring: IoUring,
    /// Guards the submission queue: only its holder may create one.
    submission: Mutex<()>,
    /// Guards the completion queue likewise.
    completion: Mutex<()>,
    fd: RawFd,
    /// Keeps the backing file open while the ring refers to its descriptor.
    _file: Arc<File>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

/// Buffered writes up to this size are done inline (a page-cache copy of
/// microseconds); larger ones go through the ring, where the kernel's
/// workers copy several in parallel.
pub const INLINE_WRITE_MAX_BYTES: usize = 128 << 10;

/// The io_uring engine.
#[derive(Debug)]
pub struct UringEngine {
    shared: Arc<Shared>,
    reaper: tokio::task::JoinHandle<()>,
    /// O_DIRECT: every operation goes through the ring.
    direct: bool,
}

fn lock(mutex: &Mutex<()>) -> MutexGuard<'_, ()> {
    // The guarded state lives in the kernel's rings, not in the mutex, so a
    // panic elsewhere leaves nothing half-updated here.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl UringEngine {
    /// Creates the ring and its reaper; must run inside a tokio runtime.
    pub fn new(file: Arc<File>, direct: bool) -> io::Result<UringEngine> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("the io_uring engine needs a tokio runtime"))?;
        let ring = IoUring::new(URING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor (or -1, checked), which we
        // own from here on.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let shared = Arc::new(Shared {
            ring,
            submission: Mutex::new(()),
            completion: Mutex::new(()),
            fd: file.as_raw_fd(),
            _file: file,
        });
        let _runtime = runtime.enter();
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open
        // and the same for the AsyncFd's whole life.
        let notifications =
            unsafe { AsyncFd::register_with_interest(eventfd, Interest::READABLE) }?;
        let reaper = runtime.spawn(reap_on_notification(shared.clone(), notifications));
        Ok(UringEngine {
            shared,
            reaper,
            direct,
        })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

async fn reap_on_notification(shared: Arc<Shared>, notifications: AsyncFd<OwnedFd>) {
    loop {
        let mut guard = match notifications.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "io_uring completion notifications failed");
                return;
            }
        };
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from our own eventfd.
        let n = unsafe {
            libc::read(
                notifications.get_ref().as_raw_fd(),
                counter.as_mut_ptr().cast(),
                counter.len(),
            )
        };
        if n < 0 {
            guard.clear_ready();
        }
        shared.reap();
    }
}

impl Pending {
    /// The submission entry for the operation's remaining part.
    fn entry(&mut self, fd: RawFd) -> squeue::Entry {
        let fd = types::Fd(fd);
        match &mut self.op {
            IoOp::Read { offset, len, buf } => {
                assert!(self.progress < *len);
                let rest = &mut buf[self.progress..*len];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(*offset + self.progress as u64)
                    .build()
            }
            IoOp::Write { offset, data, fua } => {
                assert!(self.progress < data.len());
                let rest = &data[self.progress..];
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(*offset + self.progress as u64)
                    .rw_flags(flags)
                    .build()
            }
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(mode.bits() as i32)
                .build(),
        }
    }

    /// Bytes the operation still has to move; 0 when nothing is left.
    fn remaining(&self) -> usize {
        match &self.op {
            IoOp::Read { len, .. } => len - self.progress,
            IoOp::Write { data, .. } => data.len() - self.progress,
            IoOp::Flush | IoOp::Fallocate { .. } => 0,
        }
    }

    fn finish(self, result: io::Result<()>) {
        let outcome = result.map(|()| match self.op {
            IoOp::Read { buf, .. } => IoDone::Read(buf),
            _ => IoDone::Done,
        });
        // The caller may have stopped waiting; the buffer is dropped here.
        let _ = self.done.send(outcome);
    }
}

impl Shared {
    /// Queues entries and enters the kernel once for all of them.
    fn push(&self, pendings: impl IntoIterator<Item = Box<Pending>>) {
        let _guard = lock(&self.submission);
        for mut pending in pendings {
            let entry = pending.entry(self.fd);
            let user_data = Box::into_raw(pending) as u64;
            let entry = entry.user_data(user_data);
            loop {
                // SAFETY: we hold the submission lock, so this is the only
                // submission queue in existence.
                let mut queue = unsafe { self.ring.submission_shared() };
                // SAFETY: the entry points into the boxed Pending's buffer,
                // which stays alive (leaked as `user_data`) until its
                // completion is reaped.
                if unsafe { queue.push(&entry) }.is_ok() {
                    break;
                }
                drop(queue);
                if let Err(e) = self.ring.submit() {
                    // SAFETY: the entry was not queued, so we still own the box.
                    let pending = unsafe { Box::from_raw(user_data as *mut Pending) };
                    pending.finish(Err(e));
                    break;
                }
            }
        }
        if let Err(e) = self.ring.submit() {
            tracing::error!(error = %e, "io_uring submit failed; completions will report it");
        }
    }

    /// Drains the completion queue, finishing or resubmitting each operation.
    fn reap(&self) {
        let _guard = lock(&self.completion);
        loop {
            let completed: Vec<(u64, i32)> = {
                // SAFETY: we hold the completion lock, so this is the only
                // completion queue in existence.
                let queue = unsafe { self.ring.completion_shared() };
                queue.map(|cqe| (cqe.user_data(), cqe.result())).collect()
            };
            if completed.is_empty() {
                return;
            }
            let mut again = Vec::new();
            for (user_data, result) in completed {
                // SAFETY: every entry's user_data is a Box<Pending> leaked by
                // `push`, and each is completed exactly once.
                let mut pending = unsafe { Box::from_raw(user_data as *mut Pending) };
                if result < 0 {
                    pending.finish(Err(io::Error::from_raw_os_error(-result)));
                    continue;
                }
                let moved = result as usize;
                let expecting = pending.remaining();
                if expecting == 0 {
                    pending.finish(Ok(()));
                } else if moved == 0 {
                    pending.finish(Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
                } else if moved >= expecting {
                    pending.progress += expecting;
                    pending.finish(Ok(()));
                } else {
                    pending.progress += moved;
                    again.push(pending);
                }
            }
            if !again.is_empty() {
                self.push(again);
            }
        }
    }
}

impl UringEngine {
    /// Serves `op` without the ring when that is quicker; gives it back
    /// otherwise.
    fn try_inline(&self, op: IoOp) -> Result<IoCompletion, IoOp> {
        if self.direct {
            return Err(op);
        }
        let fd = self.shared._file.as_fd();
        match op {
            IoOp::Read {
                offset,
                len,
                mut buf,
            } => {
                let mut done = 0;
                while done < len {
                    let mut slices = [io::IoSliceMut::new(&mut buf[done..len])];
                    match rustix::io::preadv2(
                        fd,
                        &mut slices,
                        offset + done as u64,
                        rustix::io::ReadWriteFlags::NOWAIT,
                    ) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(_) => break,
                    }
                }
                if done == len {
                    Ok(IoCompletion::ready(Ok(IoDone::Read(buf))))
                } else {
                    // Not (all) in the page cache: the ring reads the rest.
                    let (tx, completion) = IoCompletion::channel();
                    let pending = Box::new(Pending {
                        op: IoOp::Read { offset, len, buf },
                        done: tx,
                        progress: done,
                    });
                    self.shared.push(std::iter::once(pending));
                    self.shared.reap();
                    Ok(completion)
                }
            }
            IoOp::Write {
                offset,
                data,
                fua: false,
            } if data.len() <= INLINE_WRITE_MAX_BYTES => {
                let result = super::run_blocking(
                    &self.shared._file,
                    IoOp::Write {
                        offset,
                        data,
                        fua: false,
                    },
                );
                Ok(IoCompletion::ready(result))
            }
            other => Err(other),
        }
    }
}

impl Engine for UringEngine {
    fn submit(&self, op: IoOp) -> IoCompletion {
        let op = match self.try_inline(op) {
            Ok(completion) => return completion,
            Err(op) => op,
        };
        let (done, completion) = IoCompletion::channel();
        let pending = Box::new(Pending {
            op,
            done,
            progress: 0,
        });
        self.shared.push(std::iter::once(pending));
        // Page-cache hits complete inside the submit call: reap them now
        // rather than wait for the reaper's wake-up.
        self.shared.reap();
        completion
    }
}
