//! Listeners and connections.
//!
//! Each accepted connection runs in its own task: handshake (bounded by
//! [`HANDSHAKE_TIMEOUT`], and the client's first bytes by
//! [`FIRST_BYTES_TIMEOUT`](super::handshake::FIRST_BYTES_TIMEOUT)), then
//! the transmission loop. A connection's failure — garbage instead of a
//! handshake, a client vanishing mid-write — is logged and ends only that
//! connection. At most [`MAX_PENDING_HANDSHAKES`] handshakes run at once (a
//! newcomer evicts the oldest) and [`MAX_CONNECTIONS`] clients are attached;
//! refusals are logged with a rate limit.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::handshake::{handshake, HandshakeError};
use super::transmission::{serve, BUDGET_UNIT_BYTES};
use super::ExportPolicy;
use crate::admission::{unix_owner, Owner, PendingSlots, RefusalLog, REFUSAL_LOG_INTERVAL};
use crate::config::NbdListen;
use crate::volume::Volume;

/// Clients attached (in the transmission phase) at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections still in their handshake: as many as may be attached, so a
/// burst of real clients (a host attaching many devices at once) all fit.
/// When all are taken, the source holding the most gives up its oldest,
/// so idle connections held open by one host cannot keep others out.
pub const MAX_PENDING_HANDSHAKES: usize = MAX_CONNECTIONS;
/// A client must reach the transmission phase (`OPT_GO`) within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request data buffered across all connections (write payloads and read
/// results in flight): the daemon's memory bound for client I/O.
pub const MAX_BUFFERED_BYTES_TOTAL: u64 = 512 << 20;
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The NBD clients in the transmission phase, and the switch that sends
/// them away.
#[derive(Debug)]
pub struct Clients {
    attached: watch::Sender<usize>,
    drain: Mutex<CancellationToken>,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            attached: watch::Sender::new(0),
            drain: Mutex::new(CancellationToken::new()),
        }
    }
}

/// Counts one attached client while alive.
#[derive(Debug)]
pub struct Attached {
    clients: Arc<Clients>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.clients.attached.send_modify(|n| *n -= 1);
    }
}

impl Clients {
    pub fn count(&self) -> usize {
        *self.attached.borrow()
    }

    /// Notified on every attach and detach.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.attached.subscribe()
    }

    fn drain_token(&self) -> CancellationToken {
        self.drain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tells every attached client to finish its in-flight requests and
    /// disconnect. Clients that attach later are not affected.
    pub fn disconnect_all(&self) {
        let mut token = self.drain.lock().unwrap_or_else(PoisonError::into_inner);
        token.cancel();
        *token = CancellationToken::new();
    }

    fn attach(self: &Arc<Self>) -> Attached {
        self.attached.send_modify(|n| *n += 1);
        Attached {
            clients: self.clone(),
        }
    }
}

/// The NBD server of one node.
#[derive(Debug)]
pub struct NbdServer<P> {
    volume: Arc<Volume>,
    policy: Arc<P>,
    clients: Arc<Clients>,
    connections: Arc<Semaphore>,
    pending: Arc<PendingSlots>,
    refusals: Arc<RefusalLog>,
    budget: Arc<Semaphore>,
}

impl<P> Clone for NbdServer<P> {
    fn clone(&self) -> Self {
        NbdServer {
            volume: self.volume.clone(),
            policy: self.policy.clone(),
            clients: self.clients.clone(),
            connections: self.connections.clone(),
            pending: self.pending.clone(),
            refusals: self.refusals.clone(),
            budget: self.budget.clone(),
        }
    }
}

/// A bound listener, ready to accept.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds the configured address; a stale unix socket file is replaced.
    pub async fn bind(listen: &NbdListen) -> io::Result<Listener> {
        match listen {
            NbdListen::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).await?)),
            NbdListen::Unix(path) => {
                remove_stale_socket(path)?;
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
        }
    }
}

/// Removes a leftover socket file (never a regular file).
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl<P: ExportPolicy + 'static> NbdServer<P> {
    pub fn new(volume: Arc<Volume>, policy: Arc<P>, clients: Arc<Clients>) -> NbdServer<P> {
        let budget_units = (MAX_BUFFERED_BYTES_TOTAL / BUDGET_UNIT_BYTES) as usize;
        NbdServer {
            volume,
            policy,
            clients,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            pending: PendingSlots::new(MAX_PENDING_HANDSHAKES),
            refusals: Arc::new(RefusalLog::new("NBD listener")),
            budget: Arc::new(Semaphore::new(budget_units)),
        }
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self, listener: Listener) {
        let mut flush = tokio::time::interval(REFUSAL_LOG_INTERVAL);
        loop {
            let accepted = tokio::select! {
                accepted = accept(&listener) => accepted,
                _ = flush.tick() => {
                    self.refusals.flush();
                    continue;
                }
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    continue;
                }
            };
            let server = self.clone();
            tokio::spawn(async move {
                match stream {
                    Stream::Tcp(s, owner) => server.connection(s, peer, owner).await,
                    Stream::Unix(s) => {
                        let owner = unix_owner(&s);
                        server.connection(s, peer, owner).await
                    }
                }
            });
        }
    }

    /// Serves one connection from handshake to close; `owner` is who holds
    /// it (for the fair eviction of pending handshakes).
    pub async fn connection<S>(&self, mut stream: S, peer: String, owner: Owner)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        tracing::debug!(client = %peer, "NBD connection");
        let (pending, evicted) = self.pending.admit(owner);
        if let Some(owner) = evicted {
            self.refusals.refused(
                &owner.to_string(),
                "too many handshakes in progress: its oldest gave way",
            );
        }
        let handshaken = tokio::select! {
            result = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &*self.policy)) => result,
            () = pending.evicted() => return,
        };
        drop(pending);
        let session = match handshaken {
            Ok(Ok(session)) => session,
            Ok(Err(HandshakeError::Aborted)) => {
                tracing::debug!(client = %peer, "NBD client ended the handshake");
                return;
            }
            Ok(Err(e)) => {
                self.refusals
                    .refused(&peer, &format!("handshake ended: {e}"));
                return;
            }
            Err(_) => {
                self.refusals.refused(
                    &peer,
                    &format!(
                        "handshake not finished within {} s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    ),
                );
                return;
            }
        };
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            self.refusals.refused(
                &peer,
                &format!("{MAX_CONNECTIONS} clients are attached already"),
            );
            return;
        };
        let attached = self.clients.attach();
        tracing::info!(client = %peer, size_bytes = session.export.size_bytes,
            structured = session.structured, clients = self.clients.count(), "NBD client attached");
        let drain = self.clients.drain_token();
        let result = serve(
            stream,
            session,
            self.volume.clone(),
            self.budget.clone(),
            drain,
            peer.clone(),
        )
        .await;
        drop(attached);
        match result {
            Ok(()) => {
                tracing::info!(client = %peer, clients = self.clients.count(), "NBD client detached")
            }
            Err(e) => {
                tracing::warn!(client = %peer, error = %e, clients = self.clients.count(), "NBD client dropped")
            }
        }
    }
}

/// Accepts one connection.
async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(tcp) => tcp.accept().await.map(|(stream, peer)| {
            // Replies are already batched; never let Nagle hold one.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
            (
                Stream::Tcp(stream, Owner::Host(peer.ip())),
                peer.to_string(),
            )
        }),
        Listener::Unix(unix) => unix
            .accept()
            .await
            .map(|(stream, _)| (Stream::Unix(stream), "unix".to_string())),
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream, Owner),
    Unix(tokio::net::UnixStream),
}
