//! Connections between nodes: a full mesh, one logical connection per pair.
//!
//! Every node listens on its `address`; of each pair, the node with the
//! lower id dials, from its own `address` IP (so a firewall rule on a
//! node's IP cuts exactly its traffic). A dialer retries with backoff while
//! the core wants the peer connected and no session is live. Handshakes run
//! here; the established socket goes to the cluster core, which decides
//! whether to start a session (it refuses a second one, or a StandAlone
//! peer).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::handshake::{handshake, Identity};
use crate::admission::{Owner, PendingSlots, RefusalLog, REFUSAL_LOG_INTERVAL};
use crate::config::Config;
use std::collections::BTreeMap;

/// First retry delay after a failed dial; doubles up to the maximum.
pub const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Only the lower id dials, so a returning peer waits up to this long to be
/// found again (and its resync to start). Kept short: a refused dial costs
/// nothing, and one to a silent host is paced by its own timeout.
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// A session that lived this long was a real connection: the next dial
/// after it ends needs no backoff.
const SESSION_STABLE: Duration = Duration::from_secs(2);
/// Handshakes running at once per configured peer on the listener. A
/// peer dials one connection at a time; more come only from a host that
/// misbehaves, which then crowds out nobody but itself.
pub const MAX_PENDING_HANDSHAKES_PER_PEER: usize = 4;

/// What the core wants for one peer's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Keep dialing until a session is live.
    Connect,
    /// A session is live: do nothing.
    Live,
    /// StandAlone (operator `disconnect`, split-brain): do not dial.
    Off,
}

/// A handshaken connection, ready for a session.
#[derive(Debug)]
pub struct Established {
    pub peer: u8,
    pub stream: TcpStream,
    /// Bytes read past the handshake.
    pub leftover: BytesMut,
}

/// Handshake slots of the listener, one set per host of the config: a
/// connection from any other address is refused before it takes a slot,
/// and a host that opens too many cannot crowd out the others.
#[derive(Debug)]
struct HostSlots {
    by_host: HashMap<IpAddr, Arc<PendingSlots>>,
}

impl HostSlots {
    fn of(config: &Config, me: u8) -> HostSlots {
        let mut peers_on: HashMap<IpAddr, usize> = HashMap::new();
        for node in config.nodes.iter().filter(|n| n.id != me) {
            *peers_on
                .entry(node.address.ip().to_canonical())
                .or_default() += 1;
        }
        HostSlots {
            by_host: peers_on
                .into_iter()
                .map(|(host, peers)| {
                    (
                        host,
                        PendingSlots::new(peers * MAX_PENDING_HANDSHAKES_PER_PEER),
                    )
                })
                .collect(),
        }
    }

    fn get(&self, host: IpAddr) -> Option<&Arc<PendingSlots>> {
        self.by_host.get(&host.to_canonical())
    }
}

/// Accepts peer connections on `address` until the task is dropped; a
/// peer the core keeps StandAlone (`wanted` is Off) is refused in the
/// handshake. Connections from addresses that are no node of the config
/// are closed at once, and every refusal is logged with a rate limit.
pub async fn listen(
    listener: TcpListener,
    config: Arc<Config>,
    identity: Identity,
    wanted: BTreeMap<u8, watch::Receiver<Wanted>>,
    established: mpsc::Sender<Established>,
) {
    let wanted = Arc::new(wanted);
    let hosts = HostSlots::of(&config, identity.node_id);
    let refusals = Arc::new(RefusalLog::new("replication listener"));
    let mut flush = tokio::time::interval(REFUSAL_LOG_INTERVAL);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = flush.tick() => {
                refusals.flush();
                continue;
            }
        };
        let (mut stream, from) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "replication accept failed");
                tokio::time::sleep(DIAL_BACKOFF_MIN).await;
                continue;
            }
        };
        let Some(slots) = hosts.get(from.ip()) else {
            refusals.refused(
                &from.to_string(),
                "not the address of any node in the config",
            );
            continue;
        };
        let (pending, evicted) = slots.admit(Owner::Host(from.ip()));
        if let Some(owner) = evicted {
            refusals.refused(
                &owner.to_string(),
                "too many handshakes from this host: its oldest gave way",
            );
        }
        let config = config.clone();
        let identity = identity.clone();
        let established = established.clone();
        let wanted = wanted.clone();
        let refusals = refusals.clone();
        tokio::spawn(
            async move {
                let admit = |peer: u8| match wanted.get(&peer).map(|w| *w.borrow()) {
                    Some(Wanted::Off) => Err(format!(
                        "{} keeps this connection StandAlone (operator disconnect or split-brain); \
                         run `hablk connect` there",
                        identity.node_name
                    )),
                    _ => Ok(()),
                };
                let result = tokio::select! {
                    result = handshake(&mut stream, &identity, &config, None, &admit) => result,
                    () = pending.evicted() => return,
                };
                drop(pending);
                match result {
                    Ok((peer, leftover)) => {
                        let _ = established
                            .send(Established {
                                peer,
                                stream,
                                leftover,
                            })
                            .await;
                    }
                    Err(e) => refusals.refused(&from.to_string(), &e.to_string()),
                }
            }
            .in_current_span(),
        );
    }
}

async fn dial_once(
    my_ip: std::net::IpAddr,
    address: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(my_ip, 0))?;
    tokio::time::timeout(timeout, socket.connect(address))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Dials `peer` whenever the core wants it connected.
pub async fn dial(
    peer: u8,
    config: Arc<Config>,
    identity: Identity,
    mut wanted: watch::Receiver<Wanted>,
    established: mpsc::Sender<Established>,
) {
    let Some(me) = config.node_by_id(identity.node_id) else {
        return;
    };
    let Some(target) = config.node_by_id(peer) else {
        return;
    };
    let my_ip = me.address.ip();
    let address = target.address;
    let timeout = config.resource.ping_timeout.max(Duration::from_millis(500));
    let mut backoff = DIAL_BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        let state = *wanted.borrow_and_update();
        if state != Wanted::Connect {
            backoff = DIAL_BACKOFF_MIN;
            if wanted.changed().await.is_err() {
                return;
            }
            continue;
        }
        let result = match dial_once(my_ip, address, timeout).await {
            Ok(mut stream) => handshake(
                &mut stream,
                &identity,
                &config,
                Some(peer),
                &super::handshake::admit_all,
            )
            .await
            .map(|(_, leftover)| (stream, leftover))
            .map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot connect to {address}: {e}")),
        };
        match result {
            Ok((stream, leftover)) => {
                last_error.clear();
                if established
                    .send(Established {
                        peer,
                        stream,
                        leftover,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                // Wait for the core to take it (Live), then for the session
                // to end. A session that dies at once (the peer dropped it)
                // counts as a failed attempt: back off rather than spin.
                let _ =
                    tokio::time::timeout(timeout, wanted.wait_for(|w| *w == Wanted::Live)).await;
                let live_since = tokio::time::Instant::now();
                if wanted.wait_for(|w| *w != Wanted::Live).await.is_err() {
                    return;
                }
                if live_since.elapsed() >= SESSION_STABLE {
                    backoff = DIAL_BACKOFF_MIN;
                } else {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
                }
            }
            Err(error) => {
                if error != last_error {
                    tracing::info!(peer = %target.name, reason = %error, "cannot connect to peer; retrying");
                    last_error = error;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    changed = wanted.changed() => if changed.is_err() { return },
                }
                backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
            }
        }
    }
}
