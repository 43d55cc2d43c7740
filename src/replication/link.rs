//! A live connection to one peer, as the rest of the node sees it: a queue
//! of frames to send and the acknowledgements still owed.
//!
//! The session task owns the socket; everything else talks to the peer
//! through a [`PeerLink`]. Bytes queued toward a peer and not yet
//! acknowledged are counted; past [`MAX_PEER_IN_FLIGHT_BYTES`] the peer is
//! too slow to keep up, and the link is closed rather than stall the
//! Primary: the write path then tracks the peer's blocks in the bitmap, and
//! it is resynced when it reconnects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::wire::{Frame, Message};

/// Bytes queued toward one peer and not yet acknowledged before it is
/// dropped to bitmap tracking.
pub const MAX_PEER_IN_FLIGHT_BYTES: u64 = 256 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One frame on its way out.
#[derive(Debug)]
pub struct Outgoing {
    pub message: Message,
    pub payload: Bytes,
    /// Close the link, for this reason, once this frame is on the wire.
    pub close_after: Option<String>,
}

/// A peer's acknowledgement of one write: `true` = done there.
pub type AckReceiver = oneshot::Receiver<bool>;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// This node's side of the peer's lease: the voter's promise
/// (docs/design.md, "Leases").
#[derive(Debug, Default)]
struct LeaseGrant {
    /// Off until the core has the peer's report and has seen no
    /// generation that supersedes the peer's.
    granting: bool,
    granted_at: u64,
    /// The newest heartbeat answered while not granting.
    refused_ping: Option<u64>,
}

/// The handle to a connected peer.
#[derive(Debug)]
pub struct PeerLink {
    pub peer: u8,
    pub name: String,
    /// Unique per connection: events of an old session are told apart.
    pub session: u64,
    outbox: mpsc::UnboundedSender<Outgoing>,
    in_flight_bytes: AtomicU64,
    acks: Mutex<HashMap<u64, (oneshot::Sender<bool>, u64)>>,
    barriers: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    /// Replies for a resync or verify this node drives toward the peer.
    sync_replies: Mutex<Option<mpsc::UnboundedSender<Frame>>>,
    closed: CancellationToken,
    close_reason: Mutex<Option<String>>,
    /// When the newest heartbeat the peer answered was sent (lease clock).
    confirmed_heartbeat: AtomicU64,
    /// Whether this node's heartbeat answers renew the peer's lease, and
    /// when it last answered one that did: one lock, so that a grant is
    /// never given after the core withdrew it unseen.
    lease_grant: Mutex<LeaseGrant>,
    /// Cancelled once the cluster core has dealt with this link's loss (a
    /// new generation under way, or no longer needed): a write whose copy
    /// to this peer failed is acknowledged only after that.
    loss_handled: CancellationToken,
}

impl PeerLink {
    /// A link and the receiving end of its outbox (for the session).
    pub fn new(peer: u8, name: String) -> (PeerLink, mpsc::UnboundedReceiver<Outgoing>) {
        let (outbox, queue) = mpsc::unbounded_channel();
        (
            PeerLink {
                peer,
                name,
                session: NEXT_SESSION.fetch_add(1, AtomicOrdering::Relaxed),
                outbox,
                in_flight_bytes: AtomicU64::new(0),
                acks: Mutex::new(HashMap::new()),
                barriers: Mutex::new(HashMap::new()),
                sync_replies: Mutex::new(None),
                closed: CancellationToken::new(),
                close_reason: Mutex::new(None),
                confirmed_heartbeat: AtomicU64::new(0),
                lease_grant: Mutex::new(LeaseGrant::default()),
                loss_handled: CancellationToken::new(),
            },
            queue,
        )
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the link closes.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }

    /// Resolves when the link closes; owns what it waits on, so a session
    /// can keep it beside the link.
    pub fn closed_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.closed.clone().cancelled_owned()
    }

    /// Closes the link; every owed acknowledgement resolves as failed.
    pub fn close(&self, reason: impl Into<String>) {
        let mut slot = lock(&self.close_reason);
        if slot.is_none() {
            *slot = Some(reason.into());
        }
        drop(slot);
        self.closed.cancel();
        lock(&self.acks).clear();
        lock(&self.barriers).clear();
        lock(&self.sync_replies).take();
        self.in_flight_bytes.store(0, AtomicOrdering::Relaxed);
    }

    pub fn close_reason(&self) -> Option<String> {
        lock(&self.close_reason).clone()
    }

    /// Queues a frame; `false` if the link is closed.
    pub fn send(&self, message: Message, payload: Bytes) -> bool {
        !self.is_closed()
            && self
                .outbox
                .send(Outgoing {
                    message,
                    payload,
                    close_after: None,
                })
                .is_ok()
    }

    /// Queues a last frame (a refusal, a split-brain notice) and closes the
    /// link once the session has written it, so the peer reads why before
    /// the connection drops. Closes at once if the frame cannot be queued.
    pub fn send_and_close(&self, message: Message, reason: impl Into<String>) {
        let reason = reason.into();
        let queued = !self.is_closed()
            && self
                .outbox
                .send(Outgoing {
                    message,
                    payload: Bytes::new(),
                    close_after: Some(reason.clone()),
                })
                .is_ok();
        if !queued {
            self.close(reason);
        }
    }

    /// Queues a replicated write and returns the acknowledgement to await,
    /// or `None` when the peer is gone (or just dropped for being slow).
    pub fn replicate(&self, seq: u64, message: Message, payload: Bytes) -> Option<AckReceiver> {
        let bytes = payload.len() as u64;
        let queued = self
            .in_flight_bytes
            .fetch_add(bytes, AtomicOrdering::Relaxed)
            + bytes;
        if queued > MAX_PEER_IN_FLIGHT_BYTES {
            self.close(format!(
                "peer too slow: {queued} bytes unacknowledged (limit {MAX_PEER_IN_FLIGHT_BYTES}); \
                 tracking its blocks in the bitmap instead"
            ));
            return None;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.acks).insert(seq, (tx, bytes));
        if !self.send(message, payload) {
            lock(&self.acks).remove(&seq);
            return None;
        }
        Some(rx)
    }

    /// The session calls this for each `WriteAck`.
    pub fn acked(&self, seq: u64, ok: bool) {
        if let Some((tx, bytes)) = lock(&self.acks).remove(&seq) {
            let _ = self.in_flight_bytes.fetch_update(
                AtomicOrdering::Relaxed,
                AtomicOrdering::Relaxed,
                |v| Some(v.saturating_sub(bytes)),
            );
            let _ = tx.send(ok);
        }
    }

    /// Sends a barrier and returns its acknowledgement.
    pub fn barrier(&self, epoch: u64) -> Option<AckReceiver> {
        let (tx, rx) = oneshot::channel();
        lock(&self.barriers).insert(epoch, tx);
        if !self.send(Message::Barrier { epoch }, Bytes::new()) {
            lock(&self.barriers).remove(&epoch);
            return None;
        }
        Some(rx)
    }

    pub fn barrier_acked(&self, epoch: u64, ok: bool) {
        if let Some(tx) = lock(&self.barriers).remove(&epoch) {
            let _ = tx.send(ok);
        }
    }

    /// Subscribes to resync/verify replies (one driver at a time).
    pub fn sync_replies(&self) -> mpsc::UnboundedReceiver<Frame> {
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&self.sync_replies) = Some(tx);
        rx
    }

    /// The session routes a resync/verify reply; `false` if nobody listens.
    pub fn route_sync_reply(&self, frame: Frame) -> bool {
        match &*lock(&self.sync_replies) {
            Some(tx) => tx.send(frame).is_ok(),
            None => false,
        }
    }

    /// Resolves once the core has handled the loss of this link.
    pub fn loss_handled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.loss_handled.cancelled()
    }

    /// The core calls this after handling the link's loss.
    pub fn mark_loss_handled(&self) {
        self.loss_handled.cancel();
    }

    /// The peer answered a heartbeat sent at `sent_nanos`.
    pub fn heartbeat_confirmed(&self, sent_nanos: u64) {
        self.confirmed_heartbeat
            .fetch_max(sent_nanos, AtomicOrdering::Relaxed);
    }

    pub fn confirmed_heartbeat_nanos(&self) -> u64 {
        self.confirmed_heartbeat.load(AtomicOrdering::Relaxed)
    }

    /// This node answers the peer's heartbeat `ping` now; `true` if the
    /// answer renews the peer's lease.
    pub fn answer_heartbeat(&self, ping: u64, now_nanos: u64) -> bool {
        let mut grant = lock(&self.lease_grant);
        if grant.granting {
            grant.granted_at = grant.granted_at.max(now_nanos);
            grant.refused_ping = None;
        } else {
            grant.refused_ping = Some(ping);
        }
        grant.granting
    }

    /// The core lets heartbeat answers renew the peer's lease. Returns the
    /// newest heartbeat answered without renewal, to be answered again now:
    /// a Primary that just connected need not wait for its next heartbeat.
    pub fn grant_lease(&self, now_nanos: u64) -> Option<u64> {
        let mut grant = lock(&self.lease_grant);
        if grant.granting {
            return None;
        }
        grant.granting = true;
        let ping = grant.refused_ping.take()?;
        grant.granted_at = grant.granted_at.max(now_nanos);
        Some(ping)
    }

    /// The core stops heartbeat answers from renewing the peer's lease;
    /// returns when the last renewing answer was given (0: never).
    pub fn withdraw_lease(&self) -> u64 {
        let mut grant = lock(&self.lease_grant);
        grant.granting = false;
        grant.granted_at
    }

    /// When this node last renewed the peer's lease (0: never).
    pub fn lease_granted_nanos(&self) -> u64 {
        lock(&self.lease_grant).granted_at
    }

    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes.load(AtomicOrdering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(seq: u64) -> Message {
        Message::Write {
            seq,
            epoch: 0,
            offset: 0,
            fua: false,
            sent_to: 3,
            complete_below: 0,
        }
    }

    #[test]
    fn a_last_frame_goes_out_before_the_link_closes() {
        let (link, mut queue) = PeerLink::new(1, "beta".into());
        link.send(Message::Ping { id: 1 }, Bytes::new());
        link.send_and_close(Message::SplitBrain, "split-brain detected");
        // Still open: the session closes it once the frame is written.
        assert!(!link.is_closed());
        let first = queue.try_recv().unwrap();
        assert_eq!(first.close_after, None);
        let last = queue.try_recv().unwrap();
        assert_eq!(last.message, Message::SplitBrain);
        assert_eq!(last.close_after.as_deref(), Some("split-brain detected"));
        // On a link already gone there is nothing to send: it stays closed
        // with its first reason.
        link.close("lost");
        link.send_and_close(Message::SplitBrain, "later");
        assert_eq!(link.close_reason().as_deref(), Some("lost"));
    }

    #[test]
    fn heartbeat_answers_renew_the_lease_only_while_granted() {
        let (link, _queue) = PeerLink::new(1, "beta".into());
        assert!(
            !link.answer_heartbeat(1, 10),
            "no grant before the core decides"
        );
        assert_eq!(link.lease_granted_nanos(), 0);
        assert_eq!(
            link.grant_lease(12),
            Some(1),
            "the refused heartbeat is answered again"
        );
        assert_eq!(link.lease_granted_nanos(), 12);
        assert_eq!(link.grant_lease(13), None, "already granting");
        assert!(link.answer_heartbeat(2, 20));
        assert!(link.answer_heartbeat(3, 15), "an answer is an answer");
        assert_eq!(link.lease_granted_nanos(), 20, "the newest grant counts");
        assert_eq!(
            link.withdraw_lease(),
            20,
            "withdrawing reports the last grant"
        );
        assert!(!link.answer_heartbeat(4, 30));
        assert_eq!(
            link.lease_granted_nanos(),
            20,
            "a refused answer grants nothing"
        );
        assert!(!link.answer_heartbeat(5, 31));
        assert_eq!(link.grant_lease(40), Some(5), "only the newest refused one");
    }

    #[tokio::test]
    async fn acks_resolve_and_close_fails_the_rest() {
        let (link, mut queue) = PeerLink::new(1, "beta".into());
        let first = link
            .replicate(1, write(1), Bytes::from_static(b"abcd"))
            .unwrap();
        let second = link
            .replicate(2, write(2), Bytes::from_static(b"efgh"))
            .unwrap();
        assert_eq!(link.in_flight_bytes(), 8);
        assert!(queue.recv().await.is_some());
        link.acked(1, true);
        assert!(first.await.unwrap());
        link.close("gone");
        assert!(second.await.is_err(), "a closed link fails what it owed");
        assert!(link.replicate(3, write(3), Bytes::new()).is_none());
        assert_eq!(link.close_reason().as_deref(), Some("gone"));
    }

    #[test]
    fn a_slow_peer_is_dropped() {
        let (link, _queue) = PeerLink::new(1, "beta".into());
        let big = Bytes::from(vec![0u8; (MAX_PEER_IN_FLIGHT_BYTES / 2 + 1) as usize]);
        assert!(link.replicate(1, write(1), big.clone()).is_some());
        assert!(link.replicate(2, write(2), big).is_none());
        assert!(link.is_closed());
        assert!(link.close_reason().unwrap().contains("too slow"));
    }
}
