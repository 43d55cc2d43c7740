//! Background work the core asks for. A handler never starts a task: it
//! queues a [`Job`], and after the step `start_jobs` runs each one as a
//! task whose result comes back as an [`Internal`] input, which the core
//! decides on like any other. A job the core may stop (a resync, a verify)
//! carries a `stop` token the core keeps in the run; cancelling it ends
//! the job without a report.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::core::{Core, Internal};
use crate::replication::link::PeerLink;
use crate::replication::resync::{self, SourceContext, SyncStats};
use crate::replication::session;
use crate::replication::wire::SyncMode;

/// One piece of background work.
#[derive(Debug)]
pub(super) enum Job {
    /// Runs the session of a connection the core took: frames both ways,
    /// heartbeats, replicated writes.
    Session {
        stream: tokio::net::TcpStream,
        leftover: bytes::BytesMut,
        link: Arc<PeerLink>,
        outbox: tokio::sync::mpsc::UnboundedReceiver<crate::replication::link::Outgoing>,
    },
    /// Waits until no NBD client is attached, then flushes the disk: a
    /// demotion ends with its result (`Internal::Drained`).
    Drain,
    /// Writes the bitmap pages changed since the last flush
    /// (`Internal::BitmapsFlushed`).
    FlushBitmaps,
    /// Streams a resync's out-of-sync blocks to `link`'s peer
    /// (`Internal::SyncDone`).
    Resync {
        link: Arc<PeerLink>,
        ctx: SourceContext,
        mode: SyncMode,
        stats: Arc<SyncStats>,
        stop: CancellationToken,
    },
    /// Compares every block with `link`'s peer by hash
    /// (`Internal::VerifyDone`).
    Verify {
        link: Arc<PeerLink>,
        ctx: SourceContext,
        stats: Arc<SyncStats>,
        stop: CancellationToken,
    },
}

impl Core {
    /// Starts the jobs the last step queued, in order.
    pub(super) fn start_jobs(&mut self) {
        for job in std::mem::take(&mut self.jobs) {
            let internal = self.internal_tx.clone();
            match job {
                Job::Session {
                    stream,
                    leftover,
                    link,
                    outbox,
                } => {
                    // Frames are small and acknowledged one by one: no
                    // waiting to fill a segment.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(session::run(
                        stream,
                        leftover,
                        link,
                        outbox,
                        self.session_config.clone(),
                        self.peer_events_tx.clone(),
                    ));
                }
                Job::Drain => {
                    let mut clients = self.clients.subscribe();
                    let volume = self.volume.clone();
                    tokio::spawn(async move {
                        let _ = clients.wait_for(|&attached| attached == 0).await;
                        let flushed = match volume {
                            Some(volume) => volume.flush_all().await,
                            None => Ok(()),
                        };
                        let _ = internal.send(Internal::Drained(flushed)).await;
                    });
                }
                Job::FlushBitmaps => {
                    let Some(tracker) = self.tracker.clone() else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let result = tracker.flush().await;
                        let _ = internal.send(Internal::BitmapsFlushed(result)).await;
                    });
                }
                Job::Resync {
                    link,
                    ctx,
                    mode,
                    stats,
                    stop,
                } => {
                    let (peer, session) = (link.peer, link.session);
                    let work = resync::run_source(link, ctx, mode, stats);
                    spawn_stoppable(internal, stop, work, move |result| Internal::SyncDone {
                        peer,
                        session,
                        result,
                    });
                }
                Job::Verify {
                    link,
                    ctx,
                    stats,
                    stop,
                } => {
                    let (peer, session) = (link.peer, link.session);
                    let work = resync::run_verify(link, ctx, stats);
                    spawn_stoppable(internal, stop, work, move |result| Internal::VerifyDone {
                        peer,
                        session,
                        result,
                    });
                }
            }
        }
    }
}

/// Runs `work` until it ends (its result goes back to the core as
/// `report` says) or `stop` is cancelled (nothing goes back: the core
/// already left the run).
fn spawn_stoppable<T: Send + 'static>(
    internal: mpsc::Sender<Internal>,
    stop: CancellationToken,
    work: impl Future<Output = T> + Send + 'static,
    report: impl FnOnce(T) -> Internal + Send + 'static,
) {
    tokio::spawn(async move {
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            result = work => result,
        };
        let _ = internal.send(report(result)).await;
    });
}
