//! The daemon's control socket: a unix socket of mode 0600 that forwards
//! each request to the cluster core and writes back its answer.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};
use tracing::Instrument;

use super::events::Event;
use super::protocol::{ExitCode, Request, Response, MAX_REQUEST_LINE_BYTES};

/// Control connections served at once (CLIs, `events` watchers).
pub const MAX_CONTROL_CONNECTIONS: usize = 64;
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
        let slots = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(
                    limit = MAX_CONTROL_CONNECTIONS,
                    "control connection refused: too many"
                );
                continue;
            };
            let core = core.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = serve(stream, core).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                    drop(permit);
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

async fn serve(stream: UnixStream, core: mpsc::Sender<ControlCall>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let n = (&mut reader)
        .take(MAX_REQUEST_LINE_BYTES as u64 + 1)
        .read_line(&mut line)
        .await?;
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
