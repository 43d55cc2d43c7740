//! The daemon's control socket: a unix socket of mode 0600 that forwards
//! each request to the cluster core and writes back its answer.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};
use tracing::Instrument;

use super::events::Event;
use super::protocol::{ExitCode, Request, Response, MAX_REQUEST_LINE_BYTES};
use crate::admission::{unix_owner, PendingSlots, RefusalLog, REFUSAL_LOG_INTERVAL};

/// Connections still to send their request line. When all are taken, the
/// oldest gives way to a newcomer: a process that leaks silent connections
/// cannot lock the CLI (or a cluster manager) out.
pub const MAX_PENDING_CONTROL: usize = 32;
/// A client must send its request line within this time (the CLI sends it
/// at once).
pub const REQUEST_LINE_TIMEOUT: Duration = Duration::from_secs(2);
/// Short requests (status, primary, ...) being answered at once.
pub const MAX_CONTROL_REQUESTS: usize = 64;
/// `events` watchers followed at once: long-lived, so they have slots of
/// their own and can never take the short requests' slots.
pub const MAX_EVENT_WATCHERS: usize = 64;
/// Requests queued for the cluster core.
pub const CONTROL_QUEUE: usize = 64;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("a daemon is already running for this node (control socket {} answers)", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("cannot create control socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
}

/// The core's answer to a control request.
#[derive(Debug)]
pub enum CoreReply {
    Response(Response),
    /// The daemon's last answer (to `down`): `written` fires once it is on
    /// the socket, so the daemon can exit without cutting it off.
    Last {
        response: Response,
        written: oneshot::Sender<()>,
    },
    /// For `events`: the snapshot, and the stream of what follows.
    Events {
        snapshot: Vec<Event>,
        stream: broadcast::Receiver<Event>,
        follow: bool,
    },
}

/// A request on its way to the cluster core.
#[derive(Debug)]
pub struct ControlCall {
    pub request: Request,
    pub reply: oneshot::Sender<CoreReply>,
}

/// A bound control socket.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
}

impl ControlServer {
    /// Binds `path`, refusing if a live daemon answers there and replacing
    /// a stale socket file.
    pub async fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let bind_error = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ControlError::AlreadyRunning {
                    path: path.to_owned(),
                });
            }
            crate::nbd::server::remove_stale_socket(path).map_err(bind_error)?;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(bind_error)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        Ok(ControlServer {
            path: path.to_owned(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts control connections until the task is dropped.
    pub async fn run(self, core: mpsc::Sender<ControlCall>) {
        let limits = Arc::new(Limits {
            pending: PendingSlots::new(MAX_PENDING_CONTROL),
            requests: Arc::new(Semaphore::new(MAX_CONTROL_REQUESTS)),
            watchers: Arc::new(Semaphore::new(MAX_EVENT_WATCHERS)),
            refusals: RefusalLog::new("control socket"),
        });
        let mut flush = tokio::time::interval(REFUSAL_LOG_INTERVAL);
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = flush.tick() => {
                    limits.refusals.flush();
                    continue;
                }
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let core = core.clone();
            let limits = limits.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = serve(stream, core, &limits).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// Removes the socket file (on shutdown).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn write_line<T: serde::Serialize>(
    stream: &mut (impl AsyncWriteExt + Unpin),
    value: &T,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

/// The control socket's slots; see the constants.
#[derive(Debug)]
struct Limits {
    pending: Arc<PendingSlots>,
    requests: Arc<Semaphore>,
    watchers: Arc<Semaphore>,
    refusals: RefusalLog,
}

async fn serve(
    stream: UnixStream,
    core: mpsc::Sender<ControlCall>,
    limits: &Limits,
) -> io::Result<()> {
    let owner = unix_owner(&stream);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let (pending, evicted) = limits.pending.admit(owner);
    if let Some(owner) = evicted {
        limits.refusals.refused(
            &owner.to_string(),
            "too many silent connections: its oldest gave way",
        );
    }
    let mut limited = (&mut reader).take(MAX_REQUEST_LINE_BYTES as u64 + 1);
    let read = tokio::select! {
        read = tokio::time::timeout(REQUEST_LINE_TIMEOUT, limited.read_line(&mut line)) => read,
        () = pending.evicted() => return Ok(()),
    };
    drop(pending);
    let n = match read {
        Ok(read) => read?,
        Err(_) => {
            limits.refusals.refused(
                &owner.to_string(),
                &format!(
                    "no request within {} s of connecting",
                    REQUEST_LINE_TIMEOUT.as_secs()
                ),
            );
            return Ok(());
        }
    };
    if n == 0 {
        return Ok(());
    }
    let request: Request = match serde_json::from_str(line.trim_end()) {
        Ok(request) => request,
        Err(e) => {
            let response = Response {
                exit: ExitCode::Usage,
                message: Some(format!("bad control request: {e}")),
                status: None,
            };
            return write_line(&mut write, &response).await;
        }
    };
    let (slots, limit, kind) = match request {
        Request::Events { now: false } => (&limits.watchers, MAX_EVENT_WATCHERS, "events watchers"),
        _ => (&limits.requests, MAX_CONTROL_REQUESTS, "requests"),
    };
    let Ok(_slot) = slots.clone().try_acquire_owned() else {
        limits.refusals.refused(
            &owner.to_string(),
            &format!("{limit} {kind} already being served"),
        );
        let response = Response::failed(format!(
            "the daemon already serves {limit} {kind}; try again when some have ended"
        ));
        return write_line(&mut write, &response).await;
    };
    let (reply, answer) = oneshot::channel();
    if core.send(ControlCall { request, reply }).await.is_err() {
        return write_line(&mut write, &Response::failed("the daemon is shutting down")).await;
    }
    match answer.await {
        Ok(CoreReply::Response(response)) => write_line(&mut write, &response).await,
        Ok(CoreReply::Last { response, written }) => {
            let result = write_line(&mut write, &response).await;
            let _ = written.send(());
            result
        }
        Ok(CoreReply::Events {
            snapshot,
            mut stream,
            follow,
        }) => {
            for event in &snapshot {
                write_line(&mut write, event).await?;
            }
            if !follow {
                return Ok(());
            }
            let mut probe = [0u8; 1];
            loop {
                tokio::select! {
                    event = stream.recv() => match event {
                        Ok(event) => write_line(&mut write, &event).await?,
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let response = Response::failed(format!(
                                "events: this watcher fell {missed} events behind; run `hablk events` again"
                            ));
                            return write_line(&mut write, &response).await;
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    read = reader.read(&mut probe) => {
                        // The watcher hung up (or sent something it should not).
                        if matches!(read, Ok(0) | Err(_)) {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Err(_) => {
            write_line(
                &mut write,
                &Response::failed("the daemon stopped before answering"),
            )
            .await
        }
    }
}
