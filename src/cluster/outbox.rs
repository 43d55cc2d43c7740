//! The frames the core sends its peers. A handler never writes to a
//! connection: it queues the frame here, and the frames of a step leave in
//! the order they were queued once the step is over (`Core::settle`), so
//! after every superblock write the step made: a peer never hears of a
//! state (a recorded vote, a finished resync, a new generation) this node
//! has not made durable, whatever order a handler's lines are in.
//! Closing a connection is not queued: the core stops counting it at once.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;

use crate::replication::link::PeerLink;
use crate::replication::wire::Message;

/// One queued frame.
#[derive(Debug)]
struct Queued {
    link: Arc<PeerLink>,
    message: Message,
    payload: Bytes,
    /// Close the connection once the frame is out.
    close_after: Option<String>,
}

/// Frames queued by the current step. Interior mutability lets handlers
/// that only read the core's state (a report to every peer) queue frames.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    queued: RefCell<Vec<Queued>>,
}

impl Outbox {
    pub fn send(&self, link: &Arc<PeerLink>, message: Message, payload: Bytes) {
        self.queue(link, message, payload, None);
    }

    /// The frame, then the connection closes (a refusal, a split-brain).
    pub fn send_and_close(
        &self,
        link: &Arc<PeerLink>,
        message: Message,
        reason: impl Into<String>,
    ) {
        self.queue(link, message, Bytes::new(), Some(reason.into()));
    }

    fn queue(
        &self,
        link: &Arc<PeerLink>,
        message: Message,
        payload: Bytes,
        close_after: Option<String>,
    ) {
        self.queued.borrow_mut().push(Queued {
            link: link.clone(),
            message,
            payload,
            close_after,
        });
    }

    /// Hands the queued frames to their connections, in order. A frame for
    /// a connection closed meanwhile is dropped, as the session would.
    pub fn flush(&self) {
        for frame in self.queued.take() {
            match frame.close_after {
                Some(reason) => frame.link.send_and_close(frame.message, reason),
                None => {
                    frame.link.send(frame.message, frame.payload);
                }
            }
        }
    }
}
