//! The portable engine: a fixed pool of threads doing plain `pread`,
//! `pwritev2`, `fdatasync` and `fallocate`, the way nbdkit's file plugin
//! serves requests. Use it where io_uring is unavailable or restricted.

use std::fs::File;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{run_blocking, Engine, IoCompleter, IoCompletion, IoOp};

/// Worker threads: enough to keep a device's queue busy while some block in
/// fdatasync, few enough not to thrash two cores.
pub const THREAD_ENGINE_WORKERS: usize = 8;
/// Operations queued for the workers. Callers bound their own in-flight
/// requests (NBD connections, peers) far below this, so a full queue means a
/// broken bound, reported as an I/O error rather than blocking a task.
pub const THREAD_ENGINE_QUEUE: usize = 1 << 16;

struct Job {
    op: IoOp,
    done: IoCompleter,
}

/// A pool of blocking I/O threads.
#[derive(Debug)]
pub struct ThreadEngine {
    jobs: crossbeam_channel::Sender<Job>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadEngine {
    pub fn new(file: Arc<File>) -> ThreadEngine {
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(THREAD_ENGINE_QUEUE);
        let workers = (0..THREAD_ENGINE_WORKERS)
            .filter_map(|i| {
                let queue = queue.clone();
                let file = file.clone();
                std::thread::Builder::new()
                    .name(format!("hablk-io-{i}"))
                    .spawn(move || {
                        for job in queue {
                            // The caller may have gone away; its loss is fine.
                            let _ = job.done.send(run_blocking(&file, job.op));
                        }
                    })
                    .ok()
            })
            .collect();
        ThreadEngine { jobs, workers }
    }
}

impl Engine for ThreadEngine {
    fn submit(&self, op: IoOp) -> IoCompletion {
        let (done, completion) = IoCompletion::channel();
        if self.workers.is_empty() {
            let _ = done.send(Err(std::io::Error::other(
                "no I/O worker thread could start",
            )));
            return completion;
        }
        if let Err(err) = self.jobs.try_send(Job { op, done }) {
            let job = err.into_inner();
            let _ = job.done.send(Err(std::io::Error::other(
                "I/O queue full: in-flight bound broken",
            )));
        }
        completion
    }
}
