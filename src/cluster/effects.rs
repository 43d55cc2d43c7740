//! What a step changes outside the core: frames to peers, the volume's
//! gate and write targets, a lost connection's writes released, answers
//! to commands. A handler never does these itself: it queues an
//! [`Effect`], and once the step is over (`Core::settle`) the effects are
//! carried out in the order queued, after the superblock changes the step
//! staged are durable. So a peer never hears of a state (a recorded vote,
//! a finished resync, a new generation) this node has not made durable,
//! and the I/O path sees the gate a handler closed before the writes that
//! waited on a lost peer are released, whatever the order of a handler's
//! lines.
//!
//! When that superblock write fails, the step's effects that could rest on
//! it are dropped ([`Effects::apply_after_failed_record`]): no frame goes
//! out, the gate does not open, and a command is answered with the
//! failure. What only holds I/O back still happens.
//!
//! Closing a connection is not queued: the core stops counting it at once.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::control::protocol::Response;
use crate::control::server::CoreReply;

use crate::replication::link::PeerLink;
use crate::replication::wire::Message;
use crate::volume::{Gate, Volume};

/// One change outside the core.
#[derive(Debug)]
enum Effect {
    Frame {
        link: Arc<PeerLink>,
        message: Message,
        payload: Bytes,
        /// Close the connection once the frame is out.
        close_after: Option<String>,
    },
    Gate(Gate),
    /// The data peers that get every write (and whether all of them zero
    /// ranges fast).
    Targets {
        links: Vec<Arc<PeerLink>>,
        zero_fast: bool,
    },
    /// Writes that waited on this lost connection may go on: its loss is
    /// handled (rule A's generation started, the gate held).
    LossHandled(Arc<PeerLink>),
    /// The answer to an operator's command: queued like the rest, so the
    /// caller hears "done" only once the gate and the peers show it (a
    /// client that connects right after `secondary` returns finds a
    /// Secondary, not a node still being demoted).
    Answer {
        to: oneshot::Sender<CoreReply>,
        reply: CoreReply,
        /// The command, when the answer is recorded as a `call` event
        /// (and logged): once it is known whether it goes out as queued.
        recorded_as: Option<&'static str>,
        /// It reports the state (`status`, `events`) rather than a change
        /// the caller asked for.
        informational: bool,
    },
}

/// Effects queued by the current step. Interior mutability lets handlers
/// that only read the core's state (a report to every peer) queue them.
#[derive(Debug, Default)]
pub(super) struct Effects {
    queued: RefCell<Vec<Effect>>,
}

impl Effects {
    pub fn send(&self, link: &Arc<PeerLink>, message: Message, payload: Bytes) {
        self.push(Effect::Frame {
            link: link.clone(),
            message,
            payload,
            close_after: None,
        });
    }

    /// The frame, then the connection closes (a refusal, a split-brain).
    pub fn send_and_close(
        &self,
        link: &Arc<PeerLink>,
        message: Message,
        reason: impl Into<String>,
    ) {
        self.push(Effect::Frame {
            link: link.clone(),
            message,
            payload: Bytes::new(),
            close_after: Some(reason.into()),
        });
    }

    pub fn set_gate(&self, gate: Gate) {
        self.push(Effect::Gate(gate));
    }

    pub fn set_targets(&self, links: Vec<Arc<PeerLink>>, zero_fast: bool) {
        self.push(Effect::Targets { links, zero_fast });
    }

    pub fn loss_handled(&self, link: &Arc<PeerLink>) {
        self.push(Effect::LossHandled(link.clone()));
    }

    pub fn answer(
        &self,
        to: oneshot::Sender<CoreReply>,
        reply: CoreReply,
        recorded_as: Option<&'static str>,
    ) {
        self.push(Effect::Answer {
            to,
            reply,
            recorded_as,
            informational: false,
        });
    }

    /// An answer that only reports the state: it goes out even when the
    /// step's superblock write failed.
    pub fn inform(&self, to: oneshot::Sender<CoreReply>, reply: CoreReply) {
        self.push(Effect::Answer {
            to,
            reply,
            recorded_as: None,
            informational: true,
        });
    }

    /// The commands answered by the queued effects that are recorded as
    /// `call` events, with their answers.
    pub fn recorded_calls(&self) -> Vec<(&'static str, Response)> {
        self.queued
            .borrow()
            .iter()
            .filter_map(|effect| match effect {
                Effect::Answer {
                    reply: CoreReply::Response(response),
                    recorded_as: Some(command),
                    ..
                } => Some((*command, response.clone())),
                _ => None,
            })
            .collect()
    }

    fn push(&self, effect: Effect) {
        self.queued.borrow_mut().push(effect);
    }

    /// Carries out the queued effects, in order. A frame for a connection
    /// closed meanwhile is dropped, as the session would.
    pub fn apply(&self, volume: Option<&Volume>) {
        for effect in self.queued.take() {
            effect.carry_out(volume);
        }
    }

    /// Takes the effects queued so far out of the queue.
    pub fn take(&self) -> Effects {
        Effects {
            queued: RefCell::new(self.queued.take()),
        }
    }

    /// Carries out what these effects may do when the superblock write
    /// they followed failed: what holds I/O back (a gate that holds or
    /// closes, the write targets, a connection closed) and answers that
    /// report the state. The rest is dropped: frames (a peer would act on
    /// a state that is not durable), an opening gate; a command is answered
    /// with `failure`. An answer to a peer's request goes out as a
    /// refusal (a vote, with the generation this node `knows` durably): the
    /// asking node need not wait for an answer that never comes. Writes that waited on a lost connection go on only once
    /// the gate no longer lets them through (they then fail): they are
    /// returned, for the core to queue after it has handled the failure.
    pub fn apply_after_failed_record(
        &self,
        volume: Option<&Volume>,
        failure: &str,
        knows: u64,
    ) -> Effects {
        let kept = Effects::default();
        for effect in self.queued.take() {
            let still = match effect {
                Effect::Frame {
                    link,
                    close_after: Some(reason),
                    ..
                } => {
                    link.close(reason);
                    continue;
                }
                Effect::Frame {
                    link,
                    message: Message::GenerationRecorded { token, .. },
                    ..
                } => Effect::Frame {
                    link,
                    message: Message::GenerationRecorded {
                        token,
                        accepted: false,
                        adopted: false,
                        known: knows,
                    },
                    payload: Bytes::new(),
                    close_after: None,
                },
                Effect::Frame {
                    link,
                    message: Message::SkipSyncDone { token, .. },
                    ..
                } => Effect::Frame {
                    link,
                    message: Message::SkipSyncDone { token, ok: false },
                    payload: Bytes::new(),
                    close_after: None,
                },
                Effect::Frame { .. } | Effect::Gate(Gate::Open { .. }) => continue,
                Effect::LossHandled(link) => {
                    kept.loss_handled(&link);
                    continue;
                }
                Effect::Answer {
                    to,
                    recorded_as,
                    informational: false,
                    ..
                } => Effect::Answer {
                    to,
                    reply: CoreReply::Response(Response::failed(failure.to_owned())),
                    recorded_as,
                    informational: false,
                },
                other => other,
            };
            still.carry_out(volume);
        }
        kept
    }

    /// Queues `other`'s effects after these.
    pub fn append(&self, other: Effects) {
        self.queued.borrow_mut().extend(other.queued.take());
    }
}

impl Effect {
    fn carry_out(self, volume: Option<&Volume>) {
        #[cfg(test)]
        APPLIED.with(|applied| applied.borrow_mut().push(self.describe()));
        match self {
            Effect::Frame {
                link,
                message,
                close_after: Some(reason),
                ..
            } => link.send_and_close(message, reason),
            Effect::Frame {
                link,
                message,
                payload,
                close_after: None,
            } => {
                link.send(message, payload);
            }
            Effect::Gate(gate) => {
                if let Some(volume) = volume {
                    volume.set_gate(gate);
                }
            }
            Effect::Targets { links, zero_fast } => {
                if let Some(volume) = volume {
                    volume.set_targets(links, zero_fast);
                }
            }
            Effect::LossHandled(link) => link.mark_loss_handled(),
            Effect::Answer { to, reply, .. } => {
                // A caller that went away needs no answer.
                let _ = to.send(reply);
            }
        }
    }
}

#[cfg(test)]
thread_local! {
    /// What the cores of this thread carried out, in order (tests only).
    static APPLIED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Takes what the cores of this thread carried out since the last call.
#[cfg(test)]
pub(super) fn take_applied() -> Vec<String> {
    APPLIED.with(|applied| applied.take())
}

#[cfg(test)]
impl Effect {
    fn describe(&self) -> String {
        match self {
            Effect::Frame { link, message, .. } => {
                format!("frame {} to {}", message.name(), link.peer)
            }
            Effect::Gate(Gate::Open { .. }) => "gate open".into(),
            Effect::Gate(Gate::Held { .. }) => "gate held".into(),
            Effect::Gate(Gate::Closed { refusal, .. }) => format!("gate closed ({refusal:?})"),
            Effect::Targets { links, .. } => format!("{} targets", links.len()),
            Effect::LossHandled(link) => format!("loss of {} handled", link.peer),
            Effect::Answer { .. } => "answer".into(),
        }
    }
}
