//! Backing I/O: the engine seam.
//!
//! One trait, [`Engine`], with two implementations: an io_uring engine
//! ([`uring`], the default) and a portable pool of threads doing
//! `pread`/`pwrite` ([`threads`], `io = "threads"`). Everything above this
//! module talks to [`Storage`] and never knows which engine is running.
//!
//! An engine takes ownership of the buffers of an operation until it
//! completes: a caller that goes away (a client disconnecting mid-request)
//! drops only its half of the completion channel, and the buffer lives until
//! the kernel is done with it.
//!
//! [`Storage`] adds what is the same for both engines: the bounds check that
//! keeps data I/O out of internal metadata (always on, it guards against
//! corruption), O_DIRECT alignment, and the fallbacks of TRIM and
//! WRITE_ZEROES (punch a hole, else zero a range, else write zeroes).

pub mod threads;
pub mod uring;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use rustix::fs::{FallocateFlags, SeekFrom};
use thiserror::Error;
use tokio::sync::oneshot;

use crate::config::IoEngineKind;

/// O_DIRECT needs buffers, offsets and lengths aligned to the device's
/// logical block; 4096 covers every common device.
pub const DIRECT_IO_ALIGN: usize = 4096;
/// Zeroes are written in pieces of this size when the file system can
/// neither punch holes nor zero ranges.
const ZERO_WRITE_CHUNK_BYTES: u64 = 1 << 20;
/// [`Storage::evict`] widens its range to this alignment: the largest
/// page-cache folio the kernel builds on x86-64 (a PMD, 2 MiB).
const EVICT_ALIGN_BYTES: u64 = 2 << 20;

/// Storage failures when opening the backing disk.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("cannot open disk {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot start the io_uring engine ({source}); set io = \"threads\" in the config")]
    Uring { source: io::Error },
}

/// One operation on the backing file.
#[derive(Debug)]
pub enum IoOp {
    Read {
        offset: u64,
        len: usize,
        buf: BytesMut,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// fdatasync.
    Flush,
    Fallocate {
        offset: u64,
        len: u64,
        mode: FallocateFlags,
    },
}

/// The result of a completed operation.
#[derive(Debug)]
pub enum IoDone {
    Read(BytesMut),
    Done,
}

/// The engine seam: submit an operation, get a future of its completion.
pub trait Engine: Send + Sync + fmt::Debug {
    fn submit(&self, op: IoOp) -> IoCompletion;
}

/// Completion of one submitted operation.
#[derive(Debug)]
pub struct IoCompletion {
    state: CompletionState,
}

#[derive(Debug)]
enum CompletionState {
    /// Completed at submission (served inline).
    Ready(Option<io::Result<IoDone>>),
    Pending(oneshot::Receiver<io::Result<IoDone>>),
}

/// The sending half an engine keeps until the operation is done.
pub type IoCompleter = oneshot::Sender<io::Result<IoDone>>;

impl IoCompletion {
    pub fn channel() -> (IoCompleter, IoCompletion) {
        let (sender, receiver) = oneshot::channel();
        (
            sender,
            IoCompletion {
                state: CompletionState::Pending(receiver),
            },
        )
    }

    /// An operation that already completed.
    pub fn ready(result: io::Result<IoDone>) -> IoCompletion {
        IoCompletion {
            state: CompletionState::Ready(Some(result)),
        }
    }
}

impl Future for IoCompletion {
    type Output = io::Result<IoDone>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            CompletionState::Ready(result) => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(io::Error::other("completion polled twice"))),
            ),
            CompletionState::Pending(receiver) => Pin::new(receiver).poll(cx).map(|result| {
                result.unwrap_or_else(|_| Err(io::Error::other("storage engine stopped")))
            }),
        }
    }
}

/// Runs one operation synchronously with plain system calls: the thread
/// engine's worker body, and the io_uring engine's fallback.
pub fn run_blocking(file: &File, op: IoOp) -> io::Result<IoDone> {
    use std::os::unix::fs::FileExt;
    match op {
        IoOp::Read {
            offset,
            len,
            mut buf,
        } => {
            assert_eq!(buf.len(), len);
            file.read_exact_at(&mut buf[..len], offset)?;
            Ok(IoDone::Read(buf))
        }
        IoOp::Write { offset, data, fua } => {
            let flags = if fua {
                rustix::io::ReadWriteFlags::DSYNC
            } else {
                rustix::io::ReadWriteFlags::empty()
            };
            let mut done = 0usize;
            while done < data.len() {
                let slices = [io::IoSlice::new(&data[done..])];
                let n = rustix::io::pwritev2(file.as_fd(), &slices, offset + done as u64, flags)?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                done += n;
            }
            Ok(IoDone::Done)
        }
        IoOp::Flush => {
            file.sync_data()?;
            Ok(IoDone::Done)
        }
        IoOp::Fallocate { offset, len, mode } => {
            rustix::fs::fallocate(file.as_fd(), mode, offset, len)?;
            Ok(IoDone::Done)
        }
    }
}

/// Runs each operation at submission (see `Storage::open_in_place`).
#[cfg(test)]
#[derive(Debug)]
struct InPlaceEngine {
    file: Arc<File>,
}

#[cfg(test)]
impl Engine for InPlaceEngine {
    fn submit(&self, op: IoOp) -> IoCompletion {
        IoCompletion::ready(run_blocking(&self.file, op))
    }
}

/// The backing disk behind one engine.
#[derive(Debug)]
pub struct Storage {
    engine: Box<dyn Engine>,
    file: Arc<File>,
    direct: bool,
    regular_file: bool,
    can_zero_fast: bool,
    /// The data area: nothing at or beyond it is data.
    data_bytes: u64,
}

fn out_of_data_area(offset: u64, len: u64, data_bytes: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("I/O at {offset}+{len} reaches past the data area ({data_bytes} bytes)"),
    )
}

impl Storage {
    /// Opens `path` with the chosen engine. `data_bytes` bounds all data I/O
    /// (internal metadata lies beyond it).
    pub fn open(
        path: &Path,
        kind: IoEngineKind,
        direct: bool,
        data_bytes: u64,
    ) -> Result<Storage, StorageError> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| StorageError::Open {
            path: path.to_owned(),
            source,
        })?;
        let regular_file = file
            .metadata()
            .map(|m| !m.file_type().is_block_device())
            .unwrap_or(true);
        let can_zero_fast = regular_file && probe_fast_zero(path);
        let file = Arc::new(file);
        let engine: Box<dyn Engine> = match kind {
            IoEngineKind::Uring => Box::new(
                uring::UringEngine::new(file.clone(), direct)
                    .map_err(|source| StorageError::Uring { source })?,
            ),
            IoEngineKind::Threads => Box::new(threads::ThreadEngine::new(file.clone())),
        };
        Ok(Storage {
            engine,
            file,
            direct,
            regular_file,
            can_zero_fast,
            data_bytes,
        })
    }

    /// Opens `path` with every operation done in place, at submission:
    /// the engine tests' disks, so that what completes when depends only on
    /// the order of the steps.
    #[cfg(test)]
    pub fn open_in_place(path: &Path, data_bytes: u64) -> Result<Storage, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| StorageError::Open {
                path: path.to_owned(),
                source,
            })?;
        let file = Arc::new(file);
        Ok(Storage {
            engine: Box::new(InPlaceEngine { file: file.clone() }),
            file,
            direct: false,
            regular_file: true,
            can_zero_fast: false,
            data_bytes,
        })
    }

    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Whether zeroing a range is a metadata operation (no data written).
    pub fn can_zero_fast(&self) -> bool {
        self.can_zero_fast
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.data_bytes => Ok(()),
            _ => Err(out_of_data_area(offset, len, self.data_bytes)),
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> io::Result<BytesMut> {
        self.check(offset, len as u64)?;
        let buf = if self.direct {
            aligned_zeroed(len)
        } else {
            let mut buf = BytesMut::with_capacity(len);
            buf.resize(len, 0);
            buf
        };
        match self.engine.submit(IoOp::Read { offset, len, buf }).await? {
            IoDone::Read(buf) => Ok(buf),
            IoDone::Done => Err(io::Error::other("engine returned no buffer for a read")),
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let data = if self.direct && data.as_ptr() as usize % DIRECT_IO_ALIGN != 0 {
            let mut aligned = aligned_zeroed(data.len());
            aligned.copy_from_slice(&data);
            aligned.freeze()
        } else {
            data
        };
        self.engine
            .submit(IoOp::Write { offset, data, fua })
            .await
            .map(|_| ())
    }

    /// Reads a range for resync or verify, then lets the kernel drop it
    /// from the page cache (see [`Storage::evict`]).
    pub async fn read_uncached(&self, offset: u64, len: usize) -> io::Result<BytesMut> {
        let data = self.read(offset, len).await?;
        self.evict(offset, len as u64);
        Ok(data)
    }

    /// Drops the clean page-cache pages of a range that resync or verify
    /// touched (dirty ones are left, and start their writeback).
    ///
    /// A full resync or verify reads or writes the whole disk in 1 MiB
    /// pieces. Left in the cache, those pages would push out the
    /// application's own, and on kernels that cache files in large folios
    /// (ext4 and XFS on Linux 6.x) every later 4 KiB application write into
    /// such a folio costs several times a write into a fresh page: after
    /// an initial sync, random writes ran at a quarter of their speed. The
    /// range is widened to [`EVICT_ALIGN_BYTES`] because the kernel only
    /// drops folios that lie wholly inside it. Best effort: a file system
    /// that ignores the advice costs speed, never data.
    pub fn evict(&self, offset: u64, len: u64) {
        if self.direct || len == 0 {
            return;
        }
        let start = offset - offset % EVICT_ALIGN_BYTES;
        let end = (offset + len)
            .div_ceil(EVICT_ALIGN_BYTES)
            .saturating_mul(EVICT_ALIGN_BYTES)
            .min(self.data_bytes);
        if end > start {
            let _ = rustix::fs::fadvise(
                self.file.as_fd(),
                start,
                end - start,
                rustix::fs::Advice::DontNeed,
            );
        }
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        self.engine.submit(IoOp::Flush).await.map(|_| ())
    }

    /// TRIM: the range reads back as zeroes afterwards, on every node alike.
    pub async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true).await
    }

    /// Zeroes a range; `may_punch` allows deallocating it.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> io::Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut modes = Vec::with_capacity(2);
        if may_punch {
            modes.push(FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE);
        }
        modes.push(FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE);
        for mode in modes {
            match self
                .engine
                .submit(IoOp::Fallocate { offset, len, mode })
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if is_unsupported(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        self.write_zero_buffers(offset, len).await
    }

    /// Fails at once with `EOPNOTSUPP` unless zeroing is fast.
    pub async fn write_zeroes_fast(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
    ) -> io::Result<()> {
        if !self.can_zero_fast {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.write_zeroes(offset, len, may_punch).await
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = if self.direct {
            aligned_zeroed(ZERO_WRITE_CHUNK_BYTES as usize).freeze()
        } else {
            Bytes::from(vec![0u8; ZERO_WRITE_CHUNK_BYTES as usize])
        };
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(ZERO_WRITE_CHUNK_BYTES);
            self.engine
                .submit(IoOp::Write {
                    offset: offset + done,
                    data: chunk.slice(..piece as usize),
                    fua: false,
                })
                .await?;
            done += piece;
        }
        Ok(())
    }

    /// Asks the kernel to read a range ahead (NBD CACHE).
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        rustix::fs::fadvise(self.file.as_fd(), offset, len, rustix::fs::Advice::WillNeed)?;
        Ok(())
    }

    /// Allocation map of `[offset, offset+len)`: runs of (length, is_hole).
    /// Block devices, and file systems without SEEK_HOLE, report all data.
    pub fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.check(offset, len)?;
        let end = offset + len;
        if !self.regular_file {
            return Ok(vec![(len, false)]);
        }
        let fd = self.file.as_fd();
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next_data = match rustix::fs::seek(fd, SeekFrom::Data(pos as i64)) {
                Ok(data) => data,
                // ENXIO: no data at or after pos (the rest is a hole).
                Err(rustix::io::Errno::NXIO) => end,
                Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                    runs.push((end - pos, false));
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if next_data > pos {
                let hole_end = next_data.min(end);
                runs.push((hole_end - pos, true));
                pos = hole_end;
                continue;
            }
            let next_hole = match rustix::fs::seek(fd, SeekFrom::Hole(pos as i64)) {
                Ok(hole) => hole,
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            let data_end = next_hole.clamp(pos + 1, end);
            runs.push((data_end - pos, false));
            pos = data_end;
        }
        assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), len);
        Ok(runs)
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// A zeroed buffer whose start is aligned for O_DIRECT.
pub fn aligned_zeroed(len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(len + DIRECT_IO_ALIGN);
    buf.resize(len + DIRECT_IO_ALIGN, 0);
    let misalignment = buf.as_ptr() as usize % DIRECT_IO_ALIGN;
    let skip = (DIRECT_IO_ALIGN - misalignment) % DIRECT_IO_ALIGN;
    buf.advance(skip);
    buf.truncate(len);
    debug_assert_eq!(buf.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
    buf
}

/// Whether the file system under `path` can zero a range without writing
/// data, tried on an unnamed temporary file beside it (nothing is touched).
fn probe_fast_zero(path: &Path) -> bool {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(probe) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    else {
        return false;
    };
    if probe.set_len(2 * ZERO_WRITE_CHUNK_BYTES).is_err() {
        return false;
    }
    let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    let zero = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(probe.as_fd(), punch, 0, 4096).is_ok()
        && rustix::fs::fallocate(probe.as_fd(), zero, 0, 4096).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn engine_suite(kind: IoEngineKind) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(8 << 20).unwrap();
        let storage = Storage::open(&path, kind, false, 4 << 20).unwrap();

        // Write then read back, including an unaligned range.
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        storage
            .write(4097, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        let back = storage.read(4097, data.len()).await.unwrap();
        assert_eq!(&back[..], &data[..]);

        // FUA write and flush succeed.
        storage
            .write(0, Bytes::from(vec![7u8; 4096]), true)
            .await
            .unwrap();
        storage.flush().await.unwrap();
        assert_eq!(&storage.read(0, 4096).await.unwrap()[..], &[7u8; 4096][..]);

        // Trim leaves zeroes and a hole.
        storage
            .write(1 << 20, Bytes::from(vec![9u8; 1 << 20]), false)
            .await
            .unwrap();
        storage.trim(1 << 20, 1 << 20).await.unwrap();
        assert!(storage
            .read(1 << 20, 1 << 20)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        let map = storage.allocation(1 << 20, 1 << 20).unwrap();
        assert_eq!(map, vec![(1 << 20, true)], "trimmed range is a hole");

        // Zeroes without punching keep the range allocated.
        storage
            .write(2 << 20, Bytes::from(vec![5u8; 8192]), false)
            .await
            .unwrap();
        storage.write_zeroes(2 << 20, 8192, false).await.unwrap();
        assert!(storage
            .read(2 << 20, 8192)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));

        // Nothing reaches past the data area.
        let err = storage
            .write(4 << 20, Bytes::from(vec![1u8; 1]), false)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(storage.read((4 << 20) - 1, 2).await.is_err());

        // Many operations in flight at once complete, each with its own data.
        let mut pending = Vec::new();
        for i in 0..200u64 {
            let block = Bytes::from(vec![(i % 256) as u8; 4096]);
            pending.push(storage.write(i * 4096, block, false));
        }
        for result in futures::future::join_all(pending).await {
            result.unwrap();
        }
        let reads: Vec<_> = (0..200u64).map(|i| storage.read(i * 4096, 4096)).collect();
        for (i, result) in futures::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            assert!(result.unwrap().iter().all(|&b| b == (i % 256) as u8));
        }
    }

    #[tokio::test]
    async fn thread_engine_passes_the_suite() {
        engine_suite(IoEngineKind::Threads).await;
    }

    #[tokio::test]
    async fn uring_engine_passes_the_suite() {
        engine_suite(IoEngineKind::Uring).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_passes_the_suite_on_many_threads() {
        engine_suite(IoEngineKind::Uring).await;
    }

    /// Pages of `[offset, offset+len)` of `file` in the page cache.
    fn resident_pages(file: &File, offset: u64, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        // SAFETY: a shared read-only mapping of a file we hold open, used
        // only for mincore and unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; len / page];
        // SAFETY: `map` is a live mapping of `len` bytes and `vec` holds one
        // byte per page of it.
        let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
        // SAFETY: unmaps exactly what was mapped above.
        unsafe { libc::munmap(map, len) };
        assert_eq!(rc, 0);
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[tokio::test]
    async fn resync_reads_leave_nothing_in_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(16 << 20).unwrap();
        let storage = Storage::open(&path, IoEngineKind::Uring, false, 16 << 20).unwrap();
        let chunk = 1 << 20;
        // Part data, part hole: both end up cached by a plain read.
        storage
            .write(4 << 20, Bytes::from(vec![3u8; chunk]), false)
            .await
            .unwrap();
        storage.flush().await.unwrap();
        storage.read(6 << 20, chunk).await.unwrap();
        assert!(resident_pages(&storage.file, 6 << 20, chunk) > 0);

        for offset in [4 << 20, 6 << 20, 9 << 20] {
            let data = storage.read_uncached(offset, chunk).await.unwrap();
            assert_eq!(data.len(), chunk);
            assert_eq!(
                resident_pages(&storage.file, offset, chunk),
                0,
                "a resync read at {offset} stayed in the page cache"
            );
        }
        let data = storage.read_uncached(4 << 20, chunk).await.unwrap();
        assert!(data.iter().all(|&b| b == 3), "the read returns the data");
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [0, 1, 512, 4096, 100_000] {
            let buf = aligned_zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        }
    }
}
