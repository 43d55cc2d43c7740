//! The cluster core's side of each peer: connection lifecycle, state
//! reports, the bitmap exchange, who resyncs whom, generations recorded by
//! peers, verify, invalidate, skip-initial-sync.
//!
//! The connect sequence between two data nodes:
//!
//! ```text
//!   handshake ─▶ both send Report ─▶ decide() on both sides (same inputs)
//!        split-brain: both StandAlone, nothing overwritten
//!        source:  Bitmap* (its bits for the target), SyncBegin{mode}
//!        target:  merges; Bitmap* (its bits), BitmapDone; SyncTarget
//!        source:  merges (now both hold the union); a Primary source adds
//!                 the target to its write targets *now*; streams the union
//!                 (or, if empty, ends at once) ─▶ SyncEnd{lineage}
//!        target:  takes the lineage, UpToDate
//! ```
//!
//! The same sequence re-runs without reconnecting whenever either side's
//! generation, disk or role changes (e.g. a promotion makes a peer behind).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::core::{Core, SkipSync};
use super::jobs::Job;
use super::lease;
use super::peer_state::{PeerSync, SyncRun};
use super::sync_rules::{decide, Decision, Side};
use super::voter;
use crate::control::protocol::{Request, Response};
use crate::control::server::CoreReply;
use crate::meta::bitmap::DirtyBitmap;
use crate::meta::superblock::{StoredDisk, Superblock};
use crate::replication::connector::{Established, Wanted};
use crate::replication::link::PeerLink;
use crate::replication::resync::{SourceContext, SyncError, SyncStats};
use crate::replication::session::PeerEvent;
use crate::replication::wire::{Frame, Message, NodeReport, SyncMode, WireLineage};
use crate::vocabulary::generation::{keep_abandoned, Abandoned, Generation, Lineage, Relation};
use crate::vocabulary::node::NodeSet;
use crate::vocabulary::state::{DiskState, Role};

/// Bitmap words per `Bitmap` frame during the exchange.
const BITMAP_WORDS_PER_FRAME: usize = 64 << 10;
/// After a peer refused a resync offer, the next offer waits this long:
/// a refusal while it promotes would otherwise repeat at network speed.
const RESYNC_RETRY_AFTER_REFUSAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The parent the peer's recorder went back to from `generation`, if the
/// peer reports it abandoned.
fn abandoned_parent(report: &NodeReport, generation: Generation) -> Option<Generation> {
    report
        .abandoned
        .iter()
        .find(|&&(abandoned, _)| abandoned == generation.0)
        .map(|&(_, parent)| Generation(parent))
}

/// Whether the peer's lineage ends in a settled generation, one a vote or
/// a restarted disk may be judged by: not one still being recorded (it may
/// fail and be abandoned), and not a Diskless peer's (it may end in a
/// generation whose failed record it could not write back).
fn settled_lineage(report: &NodeReport) -> bool {
    !report.recording_generation && !matches!(report.disk, DiskState::Diskless | DiskState::Failed)
}

fn side_from_report(id: u8, report: &NodeReport, other: u8) -> Side {
    Side {
        id,
        role: report.role,
        disk: report.disk,
        lineage: (&report.lineage).into(),
        primary_crashed: report.primary_crashed,
        needs_full_sync: report.needs_full_sync,
        connected_to_other_primary: report
            .connections
            .iter()
            .any(|&(node, role)| node != other && role == Role::Primary),
        discard_my_data: report.discard_my_data,
        known: Generation(report.known),
        wrote_in_generation: report.wrote_in_generation,
    }
}

impl Core {
    /// This node's report as sent to `peer` (discard-my-data is per peer).
    fn report_for(&self, peer: u8) -> NodeReport {
        let mut report = self.report();
        report.discard_my_data = self.peers.get(&peer).is_some_and(|p| p.discard_my_data);
        report
    }

    pub(super) fn send_reports(&self) {
        for peer in self.peers.values() {
            if let Some(link) = &peer.link {
                self.effects.send(
                    link,
                    Message::Report(self.report_for(peer.node.id)),
                    Bytes::new(),
                );
            }
        }
    }

    /// A node this one sees as Primary, or as connected to one:
    /// (reporter, Primary).
    pub(super) fn primary_seen(&self) -> Option<(String, String)> {
        for peer in self.peers.values() {
            let Some(report) = peer.report.as_ref().filter(|_| peer.connected()) else {
                continue;
            };
            if report.role == Role::Primary {
                return Some((peer.node.name.clone(), peer.node.name.clone()));
            }
            // A connection whose role the peer has not heard yet may be to a
            // Primary: the promotion asks again once it has.
            if let Some(&(id, role)) = report.connections.iter().find(|&&(id, role)| {
                matches!(role, Role::Primary | Role::Unknown) && id != self.me.id
            }) {
                let name = self.peer_name(id);
                let primary = if role == Role::Unknown {
                    format!("{name} (its role not yet reported)")
                } else {
                    name
                };
                return Some((peer.node.name.clone(), primary));
            }
        }
        None
    }

    /// A handshaken connection arrived from the connector: its session
    /// task starts if the core takes the link.
    pub(super) fn established(&mut self, established: Established) {
        let Established {
            peer,
            stream,
            leftover,
        } = established;
        let Some(name) = self.peers.get(&peer).map(|p| p.node.name.clone()) else {
            return;
        };
        let (link, outbox) = PeerLink::new(peer, name);
        let link = Arc::new(link);
        if self.link_up(link.clone()) {
            self.jobs.push(Job::Session {
                stream,
                leftover,
                link,
                outbox,
            });
        }
    }

    /// Takes a new link to a peer, replacing any old one; `false` if the
    /// peer is StandAlone (the connection is dropped).
    pub(super) fn link_up(&mut self, link: Arc<PeerLink>) -> bool {
        let peer = link.peer;
        let Some(state) = self.peers.get(&peer) else {
            return false;
        };
        if state.standalone.is_some() {
            // The handshake raced with `disconnect`: drop it.
            return false;
        }
        if let Some(old) = state.link.clone() {
            // Only one side dials: a new connection means the peer gave up
            // on the old one, which is dead even if this side has not
            // noticed yet. Its loss is handled here even when the session
            // already ended and its close event is still queued: writes
            // waiting on that loss, and rule A, must not be skipped.
            tracing::info!(peer = %state.node.name, "peer reconnected; replacing the old connection");
            old.close("replaced by a new connection from the peer");
            self.peer_closed(
                peer,
                old.session,
                "replaced by a new connection from the peer",
                Vec::new(),
            );
        }
        let report = self.report_for(peer);
        let Some(state) = self.peers.get_mut(&peer) else {
            return false;
        };
        tracing::info!(peer = %state.node.name, "peer connected");
        state.forget_connection();
        state.link = Some(link.clone());
        state.left_cleanly = false;
        state.set_wanted(Wanted::Live);
        self.effects
            .send(&link, Message::Report(report), Bytes::new());
        // Others learn of the new connection (rule (b) reads them).
        self.send_reports();
        true
    }

    pub(super) fn peer_event(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::Frame { peer, frame } => self.peer_frame(peer, frame),
            PeerEvent::Closed {
                peer,
                session,
                reason,
                corrupt,
                unconfirmed,
            } => {
                if corrupt {
                    if let Some(state) = self.peers.get_mut(&peer) {
                        state.corrupt_frames += 1;
                    }
                }
                self.peer_closed(peer, session, &reason, unconfirmed)
            }
            PeerEvent::DiskFailed { error } => self.disk_failed(&error),
        }
    }

    pub(super) fn peer_closed(
        &mut self,
        peer: u8,
        session: u64,
        reason: &str,
        unconfirmed: Vec<(u64, u64)>,
    ) {
        if let Some(tracker) = &self.tracker {
            // Writes from a lost Primary that may not have reached every
            // node: out of sync toward every other data peer (not the lost
            // Primary: what it did not write is in its own activity log).
            let others = self
                .config
                .data_node_set()
                .without(NodeSet::from_iter([self.me.id, peer]));
            for (offset, len) in unconfirmed {
                tracker.mark_many(others, offset, len);
            }
        }
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.link.as_ref().map(|l| l.session) != Some(session) {
            return;
        }
        let was_target = state.receives_writes;
        let was_data = state.node.is_data();
        let answered = state.link.as_ref().map_or(0, |l| l.lease_granted_nanos());
        let left_cleanly = state.left_cleanly;
        let lost_link = state.link.clone();
        let peer_generation = state.saw_generation;
        let was_primary = state
            .report
            .as_ref()
            .is_some_and(|r| r.role == Role::Primary);
        // A peer whose generation this node recorded, or that was recording
        // one, may be a Primary whose report has not arrived yet.
        let may_hold_lease = was_primary
            || state
                .report
                .as_ref()
                .is_some_and(|r| r.recording_generation)
            || self.known_from.is_some_and(|(from, _)| from == peer);
        state.forget_connection();
        if state.standalone.is_none() {
            state.set_wanted(Wanted::Connect);
        }
        let name = state.node.name.clone();
        tracing::warn!(peer = %name, reason, "peer connection lost");
        if let Some(caller) = self.verify_callers.remove(&peer) {
            self.effects.answer(
                caller,
                CoreReply::Response(Response::failed(format!(
                    "verify aborted: lost {name} ({reason})"
                ))),
                Some("verify"),
            );
        }
        self.generation_answer(peer, false);
        self.promotion_peer_lost(peer);
        if may_hold_lease && !left_cleanly {
            // Back no new Primary until the lost one's lease has surely
            // expired.
            self.lease_hold_from(answered);
        }
        if let Some(skip) = &mut self.skip_sync {
            if skip.waiting.contains(peer) {
                if let Some(skip) = self.skip_sync.take() {
                    let response =
                        Response::failed(format!("skip-initial-sync aborted: lost {name}"));
                    self.answer(&Request::SkipInitialSync, skip.caller, response);
                }
            }
        }
        if was_target {
            self.refresh_targets();
        }
        // Rule A: a Primary that loses a data peer holding its generation
        // starts a new one before it acknowledges another write, so the
        // lost peer can never pass for current. (A peer already behind is
        // told apart by its older generation.)
        if self.role() == Role::Primary
            && was_data
            && peer_generation == Some(self.meta.superblock().lineage.current)
        {
            self.start_generation(format!("lost data peer {name}"), Vec::new());
        }
        if was_primary {
            self.refresh_refusal();
        }
        self.send_reports();
        if let Some(link) = lost_link {
            self.effects.loss_handled(&link);
        }
    }

    pub(super) fn disk_failed(&mut self, error: &str) {
        if self.disk == DiskState::Diskless {
            return;
        }
        tracing::error!(
            error,
            "backing disk failed: detaching (on-io-error = detach); this node goes Diskless"
        );
        self.set_disk(DiskState::Diskless, "the backing disk failed");
        // After a restart its stale generation shows the disk as behind,
        // even if this is not recorded either.
        self.persist("the failed disk", |sb| sb.disk = StoredDisk::Inconsistent);
        // A node without its disk takes no role (a Diskless Primary that
        // serves through its peers is not built yet): a promotion under
        // way is cancelled, and a Primary steps down. Its clients get EIO,
        // nothing it could not make durable is acknowledged, and another
        // node can be promoted.
        self.cancel_promotion("the backing disk failed");
        // A resync into a detached disk cannot go on: the source stops
        // with the connection, and decides again on the next one.
        let targets: Vec<u8> = self
            .peers
            .values()
            .filter(|p| matches!(p.sync, PeerSync::Target(_)))
            .map(|p| p.node.id)
            .collect();
        for peer in targets {
            self.close_link(peer, "this node's disk failed during the resync");
        }
        if self.role() == Role::Primary && self.demotion.is_none() {
            self.drop_source_resyncs("the backing disk failed");
            self.become_secondary("the backing disk failed");
        }
        self.send_reports();
    }

    /// A superblock write failed (`failure` says which). The metadata is
    /// given up on until a restart: this node records nothing more, so it
    /// gives no vote, and its disk is detached (`on-io-error`). What the
    /// failed step would have told its peers was dropped: they hear this
    /// node's state again.
    pub(super) fn metadata_failed(&mut self, failure: &str) {
        tracing::error!(
            failure,
            "superblock write failed: this node records and votes no more until it is restarted"
        );
        self.meta.detach();
        if self.me.is_data() {
            self.disk_failed(failure);
        }
        // A generation this node can no longer record: its callers hear
        // so now rather than of a record that never comes.
        if let Some(change) = self.generation_change.take() {
            let response = Response::refused(format!("refused: {failure}"));
            self.answer_generation_callers(change.callers, response);
        }
        self.send_reports();
    }

    /// Stages a superblock change, written once the step is over, before
    /// anything of the step leaves the node (see `effects.rs`). If that
    /// write fails, the failure is the next input (`metadata_failed`):
    /// a handler goes on as if the change were durable, and nothing it
    /// queued that could rest on it is carried out.
    pub(super) fn persist(&mut self, what: &'static str, change: impl FnOnce(&mut Superblock)) {
        self.meta.stage(change);
        self.unrecorded.push(what);
    }

    fn peer_frame(&mut self, peer: u8, frame: Frame) {
        let Frame { message, payload } = frame;
        match message {
            Message::Report(report) => self.on_report(peer, report),
            Message::Bitmap { first_word } => self.on_bitmap_words(peer, first_word, &payload),
            Message::SyncBegin { mode, total_bytes } => self.on_sync_begin(peer, mode, total_bytes),
            Message::BitmapDone => self.on_bitmap_done(peer),
            Message::SyncRefuse { reason } => {
                tracing::info!(peer = %self.peer_name(peer), reason = %reason, "resync refused by the target");
                let report = self.report_for(peer);
                if let Some(state) = self.peers.get_mut(&peer) {
                    if !state.streams_resync() {
                        return;
                    }
                    state.set_sync(PeerSync::Established, "the target refused the resync");
                    // The target may have refused on a stale view of this
                    // node: give it a fresh one, and a moment, before the
                    // next offer.
                    state.retry_exchange_at = Some(self.now.instant + RESYNC_RETRY_AFTER_REFUSAL);
                    if let Some(link) = &state.link {
                        self.effects
                            .send(link, Message::Report(report), Bytes::new());
                    }
                }
            }
            Message::SyncEnd { lineage } => self.on_sync_end(peer, &lineage),
            Message::NewGeneration {
                lineage,
                token,
                may_adopt,
            } => self.on_new_generation(peer, &lineage, token, may_adopt),
            Message::GenerationRecorded {
                token,
                accepted,
                adopted,
                known,
            } => {
                let current = self.generation_change.as_ref().map(|c| c.token);
                if current == Some(token) {
                    if !accepted {
                        tracing::warn!(peer = %self.peer_name(peer), known = %Generation(known), "peer refused to record the new generation");
                    }
                    if let Some(change) = &mut self.generation_change {
                        if adopted {
                            change.adopted.insert(peer);
                        }
                        if !accepted && change.waiting.contains(peer) {
                            change.refused.insert(peer);
                        }
                    }
                    self.generation_answer(peer, accepted);
                }
            }
            Message::SkipSync { generation, token } => {
                self.on_skip_sync(peer, Generation(generation), token)
            }
            Message::SkipSyncDone { token, ok } => self.on_skip_sync_done(peer, token, ok),
            Message::Refuse { reason } => {
                tracing::error!(peer = %self.peer_name(peer), reason = %reason, "peer refused this node");
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.standalone = Some(format!("refused by the peer: {reason}"));
                    state.set_wanted(Wanted::Off);
                    if let Some(link) = &state.link {
                        link.close(format!("refused by the peer: {reason}"));
                    }
                }
            }
            Message::SplitBrain => {
                tracing::error!(
                    peer = %self.peer_name(peer),
                    "SPLIT-BRAIN reported by the peer: nothing was overwritten. Pick the victim and \
                     run `hablk connect --discard-my-data` on it"
                );
                self.mark_split_brain(peer, false);
            }
            Message::Leaving => {
                tracing::info!(peer = %self.peer_name(peer), "peer is leaving cleanly");
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.left_cleanly = true;
                }
            }
            Message::PromoteQuery { token } => {
                let reply = Message::PromoteReply {
                    token,
                    report: self.report_for(peer),
                    lease_wait_ms: self.lease_wait_ms(),
                };
                if let Some(link) = self.peers.get(&peer).and_then(|p| p.link.clone()) {
                    self.effects.send(&link, reply, Bytes::new());
                }
            }
            Message::PromoteReply {
                token,
                report,
                lease_wait_ms,
            } => {
                self.on_report(peer, report);
                self.promote_reply(peer, token, lease_wait_ms);
            }
            other => {
                tracing::warn!(peer = %self.peer_name(peer), message = other.name(), "unexpected message; dropping the connection");
                if let Some(link) = self.peers.get(&peer).and_then(|p| p.link.clone()) {
                    link.close(format!("unexpected {}", other.name()));
                }
            }
        }
    }

    fn refuse_peer(&mut self, peer: u8, reason: String) {
        tracing::error!(peer = %self.peer_name(peer), reason = %reason, "peer refused");
        if let Some(state) = self.peers.get_mut(&peer) {
            state.standalone = Some(reason.clone());
            state.set_wanted(Wanted::Off);
            if let Some(link) = &state.link {
                self.effects.send_and_close(
                    link,
                    Message::Refuse {
                        reason: reason.clone(),
                    },
                    reason,
                );
            }
        }
    }

    /// A voter's `known` generation was moved past: a settled lineage holds
    /// it in its history (a successor, or its recorder went back from it),
    /// or its recorder reports it abandoned (no write was acknowledged in
    /// it). The vote follows that lineage's current generation, or the
    /// abandoned one's parent; kept, a generation whose record failed would
    /// make this voter refuse every generation of a Primary the majority
    /// chose.
    fn follow_superseded_vote(&mut self, peer_name: &str, report: &NodeReport) {
        let known = self.meta.superblock().known;
        if self.primary_or_promoting()
            || self.generation_change.is_some()
            || known == Generation::INITIAL
        {
            return;
        }
        let theirs = Generation(report.lineage.current);
        let (to, why) = match abandoned_parent(report, known) {
            Some(parent) => (parent, "its recorder abandoned it"),
            None if settled_lineage(report)
                && known != theirs
                && report.lineage.history.contains(&known.0) =>
            {
                (theirs, "superseded in the peer's lineage")
            }
            None => return,
        };
        self.persist("the superseded vote", |sb| sb.known = to);
        tracing::info!(peer = %peer_name, from = %known, to = %to, reason = %why, "recorded generation given up; this voter follows");
    }

    /// Applies the peers' last reports again to this node's vote and data
    /// generation (see `follow_superseded_vote`,
    /// `leave_abandoned_data_generation`), which are set aside while it
    /// promotes or records; tells the peers if either moved.
    pub(super) fn reconsider_peer_reports(&mut self) {
        let sb = self.meta.superblock();
        let before = (sb.known, sb.lineage.current);
        let reports: Vec<(String, NodeReport)> = self
            .peers
            .values()
            .filter(|p| p.connected())
            .filter_map(|p| Some((p.node.name.clone(), p.report.clone()?)))
            .collect();
        for (name, report) in &reports {
            self.follow_superseded_vote(name, report);
            self.leave_abandoned_data_generation(name, report);
        }
        let sb = self.meta.superblock();
        if (sb.known, sb.lineage.current) != before {
            self.send_reports();
        }
    }

    /// This node took a peer's new generation as its data (it was a write
    /// target), and the peer reports it abandoned: no write was
    /// acknowledged in it, and no other node will carry it on. Its data is
    /// back in the parent generation, with the abandoned id kept in the
    /// history as the recorder keeps it; kept current, it would look like
    /// a diverged line to every node that moved on from the parent.
    fn leave_abandoned_data_generation(&mut self, peer_name: &str, report: &NodeReport) {
        if self.primary_or_promoting() || self.generation_change.is_some() {
            return;
        }
        let lineage = self.meta.superblock().lineage.clone();
        let Some(parent) = abandoned_parent(report, lineage.current) else {
            return;
        };
        let Some((mut back, _)) = lineage.back_to(parent) else {
            return;
        };
        back.remember_failed(lineage.current);
        self.persist("the return from an abandoned generation", |sb| {
            sb.lineage = back;
        });
        tracing::warn!(peer = %peer_name, abandoned = %lineage.current, back_to = %parent, "this node's data generation was abandoned by its recorder: back in the generation before it");
    }

    /// Keeps the generations the peer reports abandoned that branch off
    /// this node's line, to pass them on (see `keep_abandoned`). Whether
    /// this node's list changed: its peers must hear it.
    fn learn_abandoned(&mut self, report: &NodeReport) -> bool {
        let heard = report
            .abandoned
            .iter()
            .map(|&(generation, parent)| Abandoned {
                generation: Generation(generation),
                parent: Generation(parent),
            });
        let sb = self.meta.superblock();
        let kept = keep_abandoned(&sb.lineage, sb.abandoned.iter().copied().chain(heard));
        if kept == sb.abandoned {
            return false;
        }
        self.persist("the generations other nodes abandoned", |sb| {
            sb.abandoned = kept;
        });
        true
    }

    /// The peer holds a generation this node knows was abandoned: it goes
    /// back to the parent once it hears (this node's reports say so). Its
    /// line only looks diverged, or newer, until then.
    fn peer_leaves_abandoned(&self, report: &NodeReport) -> bool {
        self.meta.superblock().abandoned.iter().any(|a| {
            a.generation.0 == report.lineage.current && report.lineage.history.contains(&a.parent.0)
        })
    }

    fn on_report(&mut self, peer: u8, report: NodeReport) {
        let (disk_before, role_before) = (self.disk, self.role());
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let first = state.report.is_none();
        let peer_is_data = state.node.is_data();
        let old = state.report.replace(report.clone());
        self.start_hold.heard(peer);
        if old.as_ref().is_some_and(|o| o.role == Role::Primary) && report.role != Role::Primary {
            // A clean demotion: its lease ended with it.
            state.left_cleanly = true;
        }
        if report.role == Role::Primary {
            state.left_cleanly = false;
        }
        let role_changed = old.as_ref().map(|o| o.role) != Some(report.role);
        let name = state.node.name.clone();
        // Only ever raised by a report: one sent before the peer recorded
        // a generation it was asked to take may arrive after the ask.
        let current = self.meta.superblock().lineage.current;
        if peer_is_data && Generation(report.lineage.current) == current {
            state.saw_generation = Some(current);
        }
        if report.disk == DiskState::UpToDate
            && state.sync_end_sent == Some(Generation(report.lineage.current))
        {
            state.sync_end_sent = None;
        }
        let lineage_before = self.meta.superblock().lineage.current;
        self.follow_superseded_vote(&name, &report);
        self.leave_abandoned_data_generation(&name, &report);
        let passes_on = self.learn_abandoned(&report);
        if first && peer_is_data && self.me.is_data() {
            let sb = self.meta.superblock();
            if sb.data_size_bytes > 0 && report.capacity_bytes < sb.data_size_bytes {
                let reason = format!(
                    "{name}'s disk holds {} bytes, less than {}'s data size of {} bytes",
                    report.capacity_bytes, self.config.resource.name, sb.data_size_bytes
                );
                self.refuse_peer(peer, reason);
                return;
            }
            if sb.data_size_bytes > 0
                && report.data_size_bytes > 0
                && report.data_size_bytes != sb.data_size_bytes
            {
                let reason = format!(
                    "{name} has data size {} bytes, this node {} bytes",
                    report.data_size_bytes, sb.data_size_bytes
                );
                self.refuse_peer(peer, reason);
                return;
            }
            if sb.data_size_bytes == 0 && report.data_size_bytes > sb.layout.data_capacity_bytes {
                let reason = format!(
                    "this node's disk holds {} bytes, less than {}'s data size of {} bytes",
                    sb.layout.data_capacity_bytes,
                    self.config.resource.name,
                    report.data_size_bytes
                );
                self.refuse_peer(peer, reason);
                return;
            }
        }
        // A Primary that meets newer data gives up the role at once.
        if self.role() == Role::Primary && peer_is_data {
            let theirs: Lineage = (&report.lineage).into();
            if self.meta.superblock().lineage.relation_to(&theirs) == Relation::Older
                && report.disk == DiskState::UpToDate
            {
                tracing::error!(peer = %name, "peer holds a newer generation: this Primary steps down");
                self.become_secondary("met a newer generation");
            }
        }
        let peer_tells =
            peer_is_data && settled_lineage(&report) && !self.peer_leaves_abandoned(&report);
        if self.disk == DiskState::Consistent && peer_tells {
            let theirs: Lineage = (&report.lineage).into();
            let relation = self.meta.superblock().lineage.relation_to(&theirs);
            self.resolve_disk(
                relation != Relation::Older,
                "resolved against a data peer's generation",
            );
        } else if self.disk == DiskState::Consistent
            && self.me.is_data()
            && !peer_is_data
            && self.quorum()
        {
            // Restarted alone and now with a quorum that includes a witness:
            // the newest generation a voter recorded says whether this data
            // is current. (Any generation recorded on a majority reached the
            // witness or this node.)
            let mine = self.meta.superblock().lineage.clone();
            let known = Generation(report.known);
            tracing::info!(witness = %name, %known, "resolving the disk state with a quorum");
            self.resolve_disk(mine.contains(known), "resolved with a quorum");
        }
        if matches!(report.disk, DiskState::Diskless | DiskState::Failed) && peer_is_data {
            let was_target = self.peers.get(&peer).is_some_and(|p| p.receives_writes);
            if let Some(state) = self.peers.get_mut(&peer) {
                state.receives_writes = false;
                state.set_sync(PeerSync::Off, "the peer has no disk");
            }
            if was_target {
                tracing::warn!(peer = %name, "peer's disk failed: replicating without it");
                self.refresh_targets();
                if self.role() == Role::Primary {
                    self.start_generation(format!("data peer {name} lost its disk"), Vec::new());
                }
            }
        }
        self.refresh_tracking(peer);
        if role_changed {
            self.refresh_refusal();
        }
        let my_state_changed = self.disk != disk_before
            || self.role() != role_before
            || self.meta.superblock().lineage.current != lineage_before;
        if first || my_state_changed || passes_on {
            // Peers learn our view of the new connection, and our resolved
            // state, before any resync this report leads to.
            self.send_reports();
        }
        // Every fresh report is a chance to agree on a resync (a refused
        // one is retried here once both views are current).
        self.re_evaluate(peer);
    }

    /// A restarted `Consistent` disk learned whether it is current:
    /// durable first, then the state.
    fn resolve_disk(&mut self, current: bool, why: &str) {
        let (resolved, stored) = if current {
            (DiskState::UpToDate, StoredDisk::UpToDate)
        } else {
            (DiskState::Outdated, StoredDisk::Outdated)
        };
        self.persist("the resolved disk state", |sb| sb.disk = stored);
        self.set_disk(resolved, why);
    }

    /// While a peer is in sync with us (same data generation, both
    /// UpToDate, nothing marked), the bitmap toward it tracks since the
    /// current generation.
    fn refresh_tracking(&mut self, peer: u8) {
        let Some(tracker) = &self.tracker else { return };
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        let Some(report) = &state.report else { return };
        let sb = self.meta.superblock();
        let in_sync = !state.sync.is_running()
            && report.disk == DiskState::UpToDate
            && self.disk == DiskState::UpToDate
            && Generation(report.lineage.current) == sb.lineage.current
            && tracker.dirty_bytes(peer) == 0;
        let Some(slot) = sb.slot_of(peer) else { return };
        let current = Some(sb.lineage.current);
        if in_sync && sb.peer_slots[usize::from(slot)].tracking != current {
            self.persist("the bitmap's tracking generation", |sb| {
                sb.peer_slots[usize::from(slot)].tracking = current
            });
        }
    }

    fn my_side(&self, peer: u8) -> Side {
        let report = self.report_for(peer);
        side_from_report(self.me.id, &report, peer)
    }

    /// Offers a resync again to peers whose refusal has aged.
    pub(super) fn retry_refused_exchanges(&mut self) {
        let now = self.now.instant;
        let due: Vec<u8> = self
            .peers
            .iter_mut()
            .filter(|(_, p)| p.retry_exchange_at.is_some_and(|at| at <= now))
            .map(|(&id, p)| {
                p.retry_exchange_at = None;
                id
            })
            .collect();
        for peer in due {
            self.re_evaluate(peer);
        }
    }

    pub(super) fn re_evaluate_all(&mut self) {
        let ids: Vec<u8> = self.peers.keys().copied().collect();
        for id in ids {
            self.re_evaluate(id);
        }
    }

    /// Runs the connect decision for a connected data peer.
    pub(super) fn re_evaluate(&mut self, peer: u8) {
        if !self.me.is_data() || self.disk == DiskState::Diskless {
            return;
        }
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        // A generation being recorded may yet fail: deciding on it (this
        // node's or the peer's) could see a divergence that never happens.
        // The end of the record sends reports and decides again.
        if !state.node.is_data()
            || !state.connected()
            || state.sync.is_running()
            || state.split_brain
            || state.sync_end_sent.is_some()
            || state.retry_exchange_at.is_some()
            || self.generation_change.is_some()
        {
            return;
        }
        let Some(report) = &state.report else { return };
        if !settled_lineage(report) || self.peer_leaves_abandoned(report) {
            return;
        }
        let theirs = side_from_report(peer, report, self.me.id);
        let mine = self.my_side(peer);
        let current = self.meta.superblock().lineage.current;
        let still_in_sync = state.in_sync_at == Some(current)
            && Generation(report.lineage.current) == current
            && report.disk == DiskState::UpToDate
            && self.disk == DiskState::UpToDate
            && !report.needs_full_sync
            && (self.role() != Role::Primary || state.receives_writes);
        if still_in_sync {
            return;
        }
        match decide(&mine, &theirs) {
            Decision::SplitBrain => self.split_brain(peer, report.wrote_in_generation),
            Decision::None => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.set_sync(PeerSync::Established, "nothing to resync");
                }
            }
            Decision::Sync { source, full, .. } if source == self.me.id => {
                self.start_exchange(peer, full)
            }
            Decision::Sync { .. } => {}
        }
    }

    fn split_brain(&mut self, peer: u8, peer_wrote: bool) {
        let name = self.peer_name(peer);
        if self.config.resource.after_split_brain
            == crate::config::AfterSplitBrain::DiscardZeroChanges
        {
            let i_wrote = self.may_have_written();
            // The side that wrote nothing since the split is discarded; if
            // neither wrote, the higher id yields.
            let i_yield = !i_wrote && (peer_wrote || self.me.id > peer);
            if !i_wrote || !peer_wrote {
                if i_yield && self.role() != Role::Primary {
                    tracing::warn!(peer = %name, "split-brain with {name}: this node wrote nothing since the split; discarding its data (after-split-brain = discard-zero-changes)");
                    if let Some(state) = self.peers.get_mut(&peer) {
                        state.discard_my_data = true;
                    }
                    self.send_reports();
                    return;
                }
                if !i_yield {
                    tracing::warn!(peer = %name, "split-brain with {name}: it wrote nothing since the split and will be resynced from this node (after-split-brain = discard-zero-changes)");
                    return;
                }
            }
        }
        tracing::error!(
            peer = %name,
            "SPLIT-BRAIN: this node and {name} both wrote in diverged generations; nothing was \
             overwritten. Pick the victim and run `hablk connect --discard-my-data` on it"
        );
        self.mark_split_brain(peer, true);
    }

    /// Records a split-brain with `peer`: StandAlone, nothing overwritten.
    /// The side that detects it tells the other before closing, so both
    /// report it.
    fn mark_split_brain(&mut self, peer: u8, tell_peer: bool) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.split_brain = true;
            state.standalone = Some("split-brain".into());
            state.set_wanted(Wanted::Off);
            if let Some(link) = state.link.clone() {
                if tell_peer {
                    self.effects
                        .send_and_close(&link, Message::SplitBrain, "split-brain detected");
                } else {
                    link.close("split-brain detected by the peer");
                }
            }
        }
    }

    fn data_bytes(&self) -> u64 {
        self.meta.superblock().data_size_bytes
    }

    fn start_exchange(&mut self, peer: u8, full: bool) {
        let Some(tracker) = self.tracker.clone() else {
            return;
        };
        let sb = self.meta.superblock();
        let generation = sb.lineage.current;
        let report = self.peers.get(&peer).and_then(|p| p.report.clone());
        let Some(report) = report else { return };
        let tracking = sb
            .slot_of(peer)
            .and_then(|slot| sb.peer_slots[usize::from(slot)].tracking);
        let mode = if full || tracking != Some(Generation(report.lineage.current)) {
            SyncMode::Hash
        } else {
            SyncMode::Bitmap
        };
        let data_blocks = self.data_bytes().div_ceil(4096);
        if mode == SyncMode::Hash {
            tracker.with_bitmap(peer, |b| b.set_range(0..data_blocks));
        }
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(link) = state.link.clone() else {
            return;
        };
        let chunks = tracker
            .with_bitmap(peer, |b| b.set_word_chunks(BITMAP_WORDS_PER_FRAME))
            .unwrap_or_default();
        for (first_word, words) in chunks {
            let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            self.effects
                .send(&link, Message::Bitmap { first_word }, Bytes::from(payload));
        }
        let total_bytes = tracker.dirty_bytes(peer);
        self.effects.send(
            &link,
            Message::SyncBegin { mode, total_bytes },
            Bytes::new(),
        );
        tracing::info!(peer = %state.node.name, ?mode, out_of_sync_bytes = total_bytes, "resync: exchanging bitmaps as source");
        let run = SyncRun {
            mode,
            stats: Arc::new(SyncStats::new(total_bytes)),
            stop: None,
            generation,
        };
        state.set_sync(PeerSync::SourceExchanging(run), "offered a resync");
    }

    fn on_bitmap_words(&mut self, peer: u8, first_word: u64, payload: &[u8]) {
        let Some(tracker) = &self.tracker else { return };
        let Some(blocks) = tracker.with_bitmap(peer, |b| b.blocks()) else {
            return;
        };
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let words: Vec<u64> = payload
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        if matches!(state.sync, PeerSync::SourceExchanging(_)) {
            // The target's answer to this node's exchange.
            tracker.with_bitmap(peer, |b| b.merge_words(first_word, &words));
        } else {
            state
                .incoming_bits
                .get_or_insert_with(|| DirtyBitmap::new(blocks))
                .merge_words(first_word, &words);
        }
    }

    /// We are the target: answer with our bits, then receive.
    fn on_sync_begin(&mut self, peer: u8, mode: SyncMode, _total: u64) {
        let Some(tracker) = self.tracker.clone() else {
            return;
        };
        if let Some(state) = self.peers.get_mut(&peer) {
            if state.streams_resync() {
                // Both believed themselves source: the lower id wins, the
                // higher one drops its own attempt and answers this one.
                if self.me.id < peer {
                    return;
                }
                state.set_sync(PeerSync::Established, "the peer offered a resync too");
            }
        }
        if matches!(
            self.peers.get(&peer).map(|p| &p.sync),
            Some(PeerSync::Verifying(_))
        ) {
            self.end_verify(
                peer,
                Response::failed("verify interrupted: the peer started a resync"),
            );
        }
        // The source decided on what it knew of this node; check, with this
        // node's state as it is now, that the rules agree — a stale view
        // must never make a Primary, a promoting node or a newer node a
        // target.
        let agreed = self
            .peers
            .get(&peer)
            .and_then(|p| p.report.as_ref())
            .is_some_and(|report| {
                let theirs = side_from_report(peer, report, self.me.id);
                matches!(decide(&self.my_side(peer), &theirs),
                Decision::Sync { source, target, .. } if source == peer && target == self.me.id)
            });
        let other_source = self
            .peers
            .iter()
            .any(|(&id, p)| id != peer && matches!(p.sync, PeerSync::Target(_)));
        // While another node is Primary, this node may be taking its
        // writes: only that Primary may overwrite them.
        let other_primary = self.other_primary_connected(peer);
        // A detached disk takes no data, whatever the source last heard.
        if !agreed
            || other_source
            || other_primary
            || self.primary_or_promoting()
            || self.disk == DiskState::Diskless
        {
            let reason = format!(
                "{} will not be a resync target of {} now (role {}, generation {})",
                self.me.name,
                self.peer_name(peer),
                self.role(),
                self.meta.superblock().lineage.current
            );
            tracing::info!(peer = %self.peer_name(peer), "resync refused: the source's view of this node is stale");
            if let Some(state) = self.peers.get_mut(&peer) {
                state.incoming_bits = None;
            }
            if let Some(link) = self.peers.get(&peer).and_then(|p| p.link.clone()) {
                self.effects
                    .send(&link, Message::SyncRefuse { reason }, Bytes::new());
                self.effects
                    .send(&link, Message::Report(self.report_for(peer)), Bytes::new());
            }
            return;
        }
        let generation = self.meta.superblock().lineage.current;
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(link) = state.link.clone() else {
            return;
        };
        if let Some(incoming) = state.incoming_bits.take() {
            for (first_word, words) in incoming.set_word_chunks(BITMAP_WORDS_PER_FRAME) {
                tracker.with_bitmap(peer, |b| b.merge_words(first_word, &words));
            }
        }
        let union = tracker.dirty_bytes(peer);
        let overwritten = mode == SyncMode::Hash || union > 0;
        // Durable before the source may send a block: a crash mid-resync
        // must leave a disk recorded Inconsistent, never one recorded as
        // current with half of it overwritten.
        if overwritten {
            self.persist_sync_target();
        }
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let chunks = tracker
            .with_bitmap(peer, |b| b.set_word_chunks(BITMAP_WORDS_PER_FRAME))
            .unwrap_or_default();
        for (first_word, words) in chunks {
            let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            self.effects
                .send(&link, Message::Bitmap { first_word }, Bytes::from(payload));
        }
        self.effects.send(&link, Message::BitmapDone, Bytes::new());
        let run = SyncRun {
            mode,
            stats: Arc::new(SyncStats::new(union)),
            stop: None,
            generation,
        };
        state.set_sync(PeerSync::Target(run), "took the peer's resync offer");
        let name = state.node.name.clone();
        if overwritten {
            tracing::info!(peer = %name, ?mode, out_of_sync_bytes = union, "resync: this node is the target");
            self.set_disk(DiskState::Inconsistent, "resync target");
            self.send_reports();
        }
    }

    /// Records the disk as Inconsistent before a resync overwrites it: the
    /// bitmap this node answers with (and so the source's first block)
    /// goes out only once that is durable.
    fn persist_sync_target(&mut self) {
        #[cfg(feature = "failpoints")]
        if sync_target_persist_fault() {
            self.meta.set_failing(true);
        }
        self.persist("its disk as Inconsistent (resync target)", |sb| {
            sb.disk = StoredDisk::Inconsistent
        });
    }

    /// We are the source and both hold the union: start streaming.
    fn on_bitmap_done(&mut self, peer: u8) {
        let (Some(tracker), Some(volume)) = (self.tracker.clone(), self.volume.clone()) else {
            return;
        };
        let is_primary = self.role() == Role::Primary;
        let data_bytes = self.data_bytes();
        let rate = self.config.resource.resync_rate_bytes_per_sec;
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(link) = state.link.clone() else {
            return;
        };
        let PeerSync::SourceExchanging(exchanged) = &state.sync else {
            tracing::debug!(peer = %state.node.name, "BitmapDone without an exchange");
            return;
        };
        let (mode, generation) = (exchanged.mode, exchanged.generation);
        let union = tracker.dirty_bytes(peer);
        let stats = Arc::new(SyncStats::new(union));
        if is_primary {
            state.receives_writes = true;
        }
        let run_stats = stats.clone();
        let ctx = SourceContext {
            storage: volume.storage().clone(),
            tracker,
            ordering: volume.ordering().clone(),
            rate_bytes_per_sec: rate,
            data_bytes,
        };
        let stop = CancellationToken::new();
        let run = SyncRun {
            mode,
            stats: run_stats,
            stop: Some(stop.clone()),
            generation,
        };
        state.set_sync(PeerSync::SourceStreaming(run), "the target sent its bitmap");
        self.jobs.push(Job::Resync {
            link,
            ctx,
            mode,
            stats,
            stop,
        });
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        tracing::info!(peer = %state.node.name, ?mode, out_of_sync_bytes = union, "resync: streaming");
        if is_primary {
            self.refresh_targets();
        }
    }

    pub(super) fn sync_done(&mut self, peer: u8, session: u64, result: Result<(), SyncError>) {
        let lineage = WireLineage::from(&self.meta.superblock().lineage);
        let generation = self.meta.superblock().lineage.current;
        let primary = self.role() == Role::Primary;
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.link.as_ref().map(|l| l.session) != Some(session) {
            return;
        }
        // A run dropped meanwhile (invalidate, the peer's own offer) hands
        // nothing over, even if its last block went out.
        let PeerSync::SourceStreaming(run) = &state.sync else {
            return;
        };
        let name = state.node.name.clone();
        let began_in = run.generation;
        let bytes = run
            .stats
            .sent_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        match result {
            Ok(()) if !primary && began_in != generation => {
                // This node took another node's generation while streaming
                // (adopted a Primary's, or finished a resync of its own):
                // the target does not get that generation's writes, so no
                // SyncEnd may hand it over. The reconnection decides again.
                tracing::warn!(peer = %name, "resync done, but this node's generation moved on meanwhile; reconnecting to decide again");
                if let Some(link) = &state.link {
                    link.close("the resync source's generation moved on");
                }
            }
            Ok(()) => {
                state.set_sync(PeerSync::Established, "resync done");
                state.in_sync_at = Some(generation);
                // The SyncEnd hands it this generation before its next
                // report can say so.
                state.saw_generation = Some(generation);
                state.sync_end_sent = Some(generation);
                let link = state.link.clone();
                // The bitmap toward the peer now tracks since this
                // generation: durable before the SyncEnd says so.
                if let Some(slot) = self.meta.superblock().slot_of(peer) {
                    self.persist("the bitmap's tracking generation", |sb| {
                        sb.peer_slots[usize::from(slot)].tracking = Some(generation)
                    });
                }
                if let Some(link) = link {
                    self.effects
                        .send(&link, Message::SyncEnd { lineage }, Bytes::new());
                }
                tracing::info!(peer = %name, data_bytes_sent = bytes, "resync done (source)");
            }
            Err(SyncError::PeerLost) => {}
            Err(e) => {
                tracing::error!(peer = %name, error = %e, "resync failed; dropping the connection to retry");
                if let Some(link) = &state.link {
                    link.close(format!("resync failed: {e}"));
                }
            }
        }
    }

    /// We were the target: the data now equals the source's.
    fn on_sync_end(&mut self, peer: u8, lineage: &WireLineage) {
        let expected = self
            .peers
            .get(&peer)
            .is_some_and(|p| matches!(p.sync, PeerSync::Target(_)));
        if !expected || self.role() == Role::Primary {
            tracing::info!(peer = %self.peer_name(peer), "ignoring SyncEnd: this node is not its resync target; reconnecting to decide again");
            self.close_link(peer, "a SyncEnd this node cannot take");
            return;
        }
        let other_primary = self.other_primary_connected(peer);
        if other_primary {
            // A Primary appeared during the resync and its writes may have
            // reached this node; the reconnection decides again.
            tracing::warn!(peer = %self.peer_name(peer), "ignoring SyncEnd: another node is Primary now; reconnecting to decide again");
            self.close_link(peer, "resync source is not the Primary");
            return;
        }
        let lineage: Lineage = lineage.into();
        let mine = self.meta.superblock().lineage.clone();
        // Discarding this node's data (`--discard-my-data`, split-brain
        // resolution) is the one case where any source is taken.
        let discarding = self.peers.get(&peer).is_some_and(|p| p.discard_my_data);
        let relation = mine.relation_to(&lineage);
        if !discarding && matches!(relation, Relation::Newer | Relation::Diverged) {
            tracing::warn!(peer = %self.peer_name(peer), "ignoring SyncEnd: the source's generation is not newer than this node's; reconnecting to decide again");
            self.close_link(peer, "a SyncEnd from an older generation");
            return;
        }
        let size = self
            .peers
            .get(&peer)
            .and_then(|p| p.report.as_ref())
            .map_or(0, |r| r.data_size_bytes);
        if let Some(tracker) = &self.tracker {
            tracker.with_bitmap(peer, |b| b.clear_all());
        }
        let generation = lineage.current;
        self.persist("the finished resync", |sb| {
            sb.lineage = lineage.clone();
            if sb.known != generation && !lineage.history.contains(&sb.known) {
                // Keep the newest known generation.
            } else {
                sb.known = generation;
            }
            sb.disk = StoredDisk::UpToDate;
            sb.flags.needs_full_sync = false;
            sb.flags.wrote_in_generation = false;
            sb.flags.primary_crashed = false;
            if sb.data_size_bytes == 0 {
                sb.data_size_bytes = size;
            }
            if let Some(slot) = sb.slot_of(peer) {
                sb.peer_slots[usize::from(slot)].tracking = Some(generation);
            }
        });
        self.set_disk(DiskState::UpToDate, "resync done");
        if let Some(state) = self.peers.get_mut(&peer) {
            state.set_sync(PeerSync::Established, "resync done");
            state.discard_my_data = false;
            state.in_sync_at = Some(generation);
            // The SyncEnd is the source's newest word on its data: a report
            // it sent before (an older generation) must not make this node
            // resync it back.
            if let Some(report) = state.report.as_mut() {
                report.lineage = WireLineage::from(&lineage);
                report.disk = DiskState::UpToDate;
            }
        }
        tracing::info!(peer = %self.peer_name(peer), %generation, "resync done (target): UpToDate");
        self.send_reports();
        self.re_evaluate_all();
    }

    /// A peer asks us to record a new generation (compare-and-set).
    fn on_new_generation(&mut self, peer: u8, lineage: &WireLineage, token: u64, may_adopt: bool) {
        let new: Lineage = lineage.into();
        let generation = new.current;
        let sb = self.meta.superblock();
        let verdict = voter::may_record(
            self.primary_or_promoting(),
            self.meta.is_detached(),
            sb.known,
            &new,
        )
        .and_then(
            |()| match self.withdraw_superseded_grants(peer, generation) {
                Some(holder) => Err(voter::Refusal::LeaseMayRun { holder }),
                None => Ok(()),
            },
        );
        let me = voter::VoterData {
            is_data: self.me.is_data(),
            disk: self.disk,
            current: sb.lineage.current,
            resyncing_with_sender: self.peers.get(&peer).map_or(true, |p| p.sync.is_running()),
        };
        let data_after = voter::data_after(me, &new, may_adopt);
        // An answer says the vote is durable: one this node could not
        // write is a refusal (after a crash it would not know the vote).
        let accepted = match verdict {
            Err(refusal) => {
                tracing::warn!(peer = %self.peer_name(peer), %generation, reason = %refusal, "refusing to record another node's generation");
                false
            }
            Ok(()) => {
                self.persist("a peer's new generation", |sb| {
                    sb.known = generation;
                    match data_after {
                        voter::DataAfter::Adopted => {
                            sb.lineage = new.clone();
                            sb.flags.wrote_in_generation = false;
                            if let Some(slot) = sb.slot_of(peer) {
                                sb.peer_slots[usize::from(slot)].tracking = Some(generation);
                            }
                        }
                        voter::DataAfter::Outdated => sb.disk = StoredDisk::Outdated,
                        voter::DataAfter::Unchanged => {}
                    }
                });
                true
            }
        };
        let adopted = accepted && data_after == voter::DataAfter::Adopted;
        if accepted {
            self.known_from = Some((peer, generation));
            if data_after == voter::DataAfter::Outdated {
                self.set_disk(
                    DiskState::Outdated,
                    "a peer recorded a generation this node is behind in",
                );
            }
        }
        let known = self.meta.superblock().known.0;
        tracing::info!(peer = %self.peer_name(peer), %generation, accepted, adopted, "generation recorded for peer");
        if let Some(link) = self.peers.get(&peer).and_then(|p| p.link.clone()) {
            self.effects.send(
                &link,
                Message::GenerationRecorded {
                    token,
                    accepted,
                    adopted,
                    known,
                },
                Bytes::new(),
            );
        }
        self.send_reports();
    }

    /// The voter's promise, first half: before recording `generation` for
    /// `sender`, stop renewing the lease of every other peer whose lineage
    /// it would supersede, then refuse (returning that peer) if one of them
    /// is a Primary, or records a generation of its own, whose lease from
    /// this node may still run. Withdrawing first means no heartbeat answer
    /// can slip in between the check and the record. A refusal is undone by
    /// the next `refresh_lease_grants`.
    fn withdraw_superseded_grants(&self, sender: u8, generation: Generation) -> Option<u8> {
        let now = self.now.lease_nanos;
        let lease_life = lease::nanos(self.config.resource.ping_timeout);
        let mut holder = None;
        for (&id, state) in &self.peers {
            let (Some(link), Some(report)) = (&state.link, &state.report) else {
                continue;
            };
            if id == sender || report.lineage.contains(generation) {
                continue;
            }
            let granted_at = link.withdraw_lease();
            let may_hold_lease = (report.role == Role::Primary || report.recording_generation)
                && granted_at > 0
                && now.saturating_sub(granted_at) < lease_life;
            if may_hold_lease && holder.is_none() {
                holder = Some(id);
            }
        }
        holder
    }

    /// Drops the connection to a peer; the reconnection starts over with a
    /// fresh exchange of states.
    fn close_link(&self, peer: u8, why: &str) {
        if let Some(link) = self.peers.get(&peer).and_then(|p| p.link.as_ref()) {
            link.close(why);
        }
    }

    /// A connected node other than `peer` reports Primary.
    fn other_primary_connected(&self, peer: u8) -> bool {
        self.peers.iter().any(|(&id, p)| {
            id != peer
                && p.connected()
                && p.report.as_ref().is_some_and(|r| r.role == Role::Primary)
        })
    }

    /// Only an UpToDate node is a resync source, and while it is connected
    /// to a Primary only that Primary is (docs/design.md, "Resync sources"). A source whose
    /// disk or view changed since its exchange began — it became a target
    /// itself, recorded a generation it is behind in, or a Primary appeared
    /// — stops streaming; the reconnection decides again.
    pub(super) fn drop_invalid_source_resyncs(&self) {
        for (&id, state) in &self.peers {
            if !state.streams_resync() || !state.connected() {
                continue;
            }
            let why = if self.disk != DiskState::UpToDate {
                "this node's disk is no longer UpToDate"
            } else if self.role() != Role::Primary && self.other_primary_connected(id) {
                "a Primary is connected: only it may be a resync source"
            } else {
                continue;
            };
            tracing::warn!(peer = %state.node.name, reason = why, "dropping the resync this node streams");
            self.close_link(id, why);
        }
    }

    /// Ends every resync this node streams: its data no longer outranks
    /// what the targets may have taken since. The reconnection decides
    /// again who syncs whom.
    pub(super) fn drop_source_resyncs(&mut self, why: &str) {
        for state in self.peers.values() {
            if state.streams_resync() {
                tracing::info!(peer = %state.node.name, reason = why, "dropping the resync this node streams");
                self.close_link(state.node.id, why);
            }
        }
    }

    /// The write targets: peers past the bitmap exchange.
    pub(super) fn refresh_targets(&self) {
        if self.volume.is_none() {
            return;
        }
        // A link that closed but whose loss is not handled yet stays a
        // target: a write finds it closed and waits for that handling
        // (rule A) before its acknowledgement.
        let targets: Vec<Arc<PeerLink>> = self
            .peers
            .values()
            .filter(|p| p.receives_writes && self.role() == Role::Primary)
            .filter_map(|p| p.link.clone())
            .collect();
        let zero_fast = self
            .peers
            .values()
            .filter(|p| p.receives_writes)
            .all(|p| p.report.as_ref().is_some_and(|r| r.fast_zero));
        self.effects.set_targets(targets, zero_fast);
    }

    fn select_peers(&self, name: Option<&str>) -> Result<Vec<u8>, Box<Response>> {
        match name {
            None => Ok(self.peers.keys().copied().collect()),
            Some(name) => self
                .peers
                .values()
                .find(|p| p.node.name == name)
                .map(|p| vec![p.node.id])
                .ok_or_else(|| {
                    Box::new(Response {
                        exit: crate::control::protocol::ExitCode::Usage,
                        message: Some(format!(
                            "'{name}' is not a peer of {} in the config",
                            self.me.name
                        )),
                        status: None,
                    })
                }),
        }
    }

    pub(super) fn connect(&mut self, name: Option<&str>, discard_my_data: bool) -> Response {
        let ids = match self.select_peers(name) {
            Ok(ids) => ids,
            Err(response) => return *response,
        };
        if discard_my_data && self.role() == Role::Primary {
            return Response::refused(
                "refused: a Primary cannot discard its data; demote it first",
            );
        }
        for id in &ids {
            if let Some(state) = self.peers.get_mut(id) {
                state.standalone = None;
                state.split_brain = false;
                state.discard_my_data = discard_my_data;
                if !state.connected() {
                    state.set_wanted(Wanted::Connect);
                }
            }
        }
        if discard_my_data {
            tracing::warn!("connect --discard-my-data: this node becomes the resync target and loses its diverged writes");
        }
        Response::done(format!(
            "connecting to {}",
            ids.iter()
                .map(|&id| self.peer_name(id))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    pub(super) fn disconnect(&mut self, name: Option<&str>) -> Response {
        let ids = match self.select_peers(name) {
            Ok(ids) => ids,
            Err(response) => return *response,
        };
        for id in &ids {
            if let Some(state) = self.peers.get_mut(id) {
                state.standalone = Some("disconnected by the operator".into());
                state.set_wanted(Wanted::Off);
                if let Some(link) = &state.link {
                    let reason = "disconnected by the operator";
                    self.effects.send_and_close(link, Message::Leaving, reason);
                }
            }
        }
        Response::done(format!(
            "disconnected from {}",
            ids.iter()
                .map(|&id| self.peer_name(id))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    pub(super) fn verify(&mut self, name: Option<&str>, reply: oneshot::Sender<CoreReply>) {
        let request = Request::Verify {
            peer: name.map(str::to_owned),
        };
        let candidates = match self.select_peers(name) {
            Ok(ids) => ids,
            Err(response) => return self.answer(&request, reply, *response),
        };
        let peer = candidates.into_iter().find(|id| {
            self.peers.get(id).is_some_and(|p| {
                p.node.is_data()
                    && p.connected()
                    && matches!(p.sync, PeerSync::Established)
                    && p.report
                        .as_ref()
                        .is_some_and(|r| r.disk == DiskState::UpToDate)
            })
        });
        let (Some(peer), Some(tracker), Some(volume)) =
            (peer, self.tracker.clone(), self.volume.clone())
        else {
            let response = Response::refused(
                "refused: verify needs a connected, UpToDate data peer with no resync running",
            );
            return self.answer(&request, reply, response);
        };
        if self.disk != DiskState::UpToDate {
            return self.answer(
                &request,
                reply,
                Response::refused(format!("refused: this node's disk is {}", self.disk)),
            );
        }
        let data_bytes = self.data_bytes();
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(link) = state.link.clone() else {
            return;
        };
        let stats = Arc::new(SyncStats::new(data_bytes));
        let ctx = SourceContext {
            storage: volume.storage().clone(),
            tracker,
            ordering: volume.ordering().clone(),
            rate_bytes_per_sec: 0,
            data_bytes,
        };
        let stop = CancellationToken::new();
        self.jobs.push(Job::Verify {
            link,
            ctx,
            stats: stats.clone(),
            stop: stop.clone(),
        });
        let run = SyncRun {
            mode: SyncMode::Hash,
            stats,
            stop: Some(stop),
            generation: self.meta.superblock().lineage.current,
        };
        state.set_sync(PeerSync::Verifying(run), "verify asked for");
        tracing::info!(peer = %state.node.name, "online verify started");
        self.verify_callers.insert(peer, reply);
    }

    pub(super) fn verify_done(&mut self, peer: u8, session: u64, result: Result<u64, SyncError>) {
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        if state.link.as_ref().map(|l| l.session) != Some(session)
            || !matches!(state.sync, PeerSync::Verifying(_))
        {
            return;
        }
        let name = state.node.name.clone();
        let response = match result {
            Ok(0) => Response::done(format!("verify with {name}: all blocks identical")),
            Ok(blocks) => {
                tracing::warn!(peer = %name, blocks, "verify found differing blocks; marked out of sync");
                Response::done(format!(
                    "verify with {name}: {blocks} block(s) ({} bytes) differ; marked out of sync — \
                     they are resynced on the next connect (`hablk disconnect {name}; hablk connect {name}`)",
                    blocks * 4096
                ))
            }
            Err(e) => Response::failed(format!("verify with {name} failed: {e}")),
        };
        self.end_verify(peer, response);
    }

    /// Ends the verify running against `peer` and answers its caller.
    fn end_verify(&mut self, peer: u8, response: Response) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.set_sync(PeerSync::Established, "verify ended");
        let name = state.node.name.clone();
        if let Some(caller) = self.verify_callers.remove(&peer) {
            self.answer(&Request::Verify { peer: Some(name) }, caller, response);
        }
    }

    pub(super) fn invalidate(&mut self) -> Response {
        if self.disk == DiskState::Diskless && self.me.is_data() {
            return Response::refused(format!(
                "refused: {}'s disk is detached (Diskless): there is no data to invalidate",
                self.me.name
            ));
        }
        if self.role() == Role::Primary {
            return Response::refused(
                "refused: a Primary cannot invalidate its own data; demote it first",
            );
        }
        let Some(tracker) = self.tracker.clone() else {
            return Response::refused("refused: a witness has no data to invalidate");
        };
        // A source behind this node's data could never resync it:
        // invalidating would throw away the newest copy.
        let mine = self.meta.superblock().lineage.clone();
        let source = self.peers.values().find(|p| {
            p.node.is_data()
                && p.connected()
                && p.report.as_ref().is_some_and(|r| {
                    let theirs: Lineage = (&r.lineage).into();
                    r.disk == DiskState::UpToDate
                        && matches!(mine.relation_to(&theirs), Relation::Equal | Relation::Older)
                })
        });
        let Some(source) = source else {
            return Response::refused(
                "refused: invalidate needs a connected UpToDate peer with this node's data \
                 generation or a newer one to resync from",
            );
        };
        let source_name = source.node.name.clone();
        let data_blocks = self.data_bytes().div_ceil(4096);
        let ids: Vec<u8> = self.peers.keys().copied().collect();
        for id in ids {
            tracker.with_bitmap(id, |b| b.set_range(0..data_blocks));
            if self.peers.get(&id).is_some_and(|p| p.sync.is_running()) {
                if matches!(self.peers[&id].sync, PeerSync::Verifying(_)) {
                    self.end_verify(id, Response::failed("verify interrupted: invalidate"));
                } else {
                    // The peer's side of the run ends with the connection;
                    // both decide again (a full resync) on the next one.
                    if let Some(state) = self.peers.get_mut(&id) {
                        state.set_sync(PeerSync::Established, "invalidate");
                    }
                    self.close_link(id, "invalidate: the resync starts over");
                }
            }
        }
        self.persist("the invalidation", |sb| {
            sb.disk = StoredDisk::Inconsistent;
            sb.flags.needs_full_sync = true;
        });
        self.set_disk(DiskState::Inconsistent, "invalidate");
        self.send_reports();
        Response::done(format!(
            "{} invalidated: resyncing everything from {source_name} (only differing blocks cross); \
             `hablk wait-sync` waits for it",
            self.me.name
        ))
    }

    pub(super) fn skip_initial_sync(&mut self, reply: oneshot::Sender<CoreReply>) {
        let request = Request::SkipInitialSync;
        let sb = self.meta.superblock();
        if !self.me.is_data() {
            return self.answer(
                &request,
                reply,
                Response::refused("refused: run skip-initial-sync on a data node"),
            );
        }
        if sb.lineage.current != Generation::INITIAL {
            return self.answer(&request, reply, Response::refused("refused: this node is past its first generation; skip-initial-sync is only for a new cluster"));
        }
        let mut waiting = NodeSet::EMPTY;
        for peer in self.peers.values().filter(|p| p.node.is_data()) {
            match &peer.report {
                Some(report) if peer.connected() && report.lineage.current == 0 => {
                    waiting.insert(peer.node.id)
                }
                Some(_) if peer.connected() => {
                    let response = Response::refused(format!(
                        "refused: {} is past its first generation",
                        peer.node.name
                    ));
                    return self.answer(&request, reply, response);
                }
                _ => {
                    let response = Response::refused(format!(
                        "refused: skip-initial-sync needs every data node connected; {} is not",
                        peer.node.name
                    ));
                    return self.answer(&request, reply, response);
                }
            }
        }
        let generation = Generation::random();
        let token = self.next_token;
        self.next_token += 1;
        for id in waiting.iter() {
            if let Some(link) = self.peers.get(&id).and_then(|p| p.link.clone()) {
                self.effects.send(
                    &link,
                    Message::SkipSync {
                        generation: generation.0,
                        token,
                    },
                    Bytes::new(),
                );
            }
        }
        self.skip_sync = Some(SkipSync {
            token,
            generation,
            waiting,
            caller: reply,
        });
        self.maybe_finish_skip_sync();
    }

    /// Takes `generation` as UpToDate data with nothing out of sync.
    fn adopt_skipped_sync(&mut self, generation: Generation) {
        if let Some(tracker) = &self.tracker {
            for id in self.peers.keys() {
                tracker.with_bitmap(*id, |b| b.clear_all());
            }
        }
        let data_size = self.meta.superblock().data_size_bytes;
        let size = match (data_size, self.config.resource.size_bytes) {
            (0, Some(size)) => size,
            (0, None) => self.meta.superblock().layout.data_capacity_bytes,
            (fixed, _) => fixed,
        };
        let size = size - size % crate::config::DATA_BLOCK_BYTES;
        self.persist("skip-initial-sync", |sb| {
            sb.lineage.advance(generation);
            sb.known = generation;
            sb.disk = StoredDisk::UpToDate;
            sb.flags.needs_full_sync = false;
            sb.data_size_bytes = size;
            for slot in sb.peer_slots.iter_mut().filter(|s| s.node_id.is_some()) {
                slot.tracking = Some(generation);
            }
        });
        self.set_disk(DiskState::UpToDate, "skip-initial-sync");
    }

    /// Whether this node can take a skipped initial sync: it has its disk
    /// and can record.
    fn may_adopt_skipped_sync(&self) -> bool {
        self.disk != DiskState::Diskless && !self.meta.is_detached()
    }

    fn on_skip_sync(&mut self, peer: u8, generation: Generation, token: u64) {
        let ok = self.meta.superblock().lineage.current == Generation::INITIAL
            && self.role() != Role::Primary
            && self.may_adopt_skipped_sync();
        if ok {
            self.adopt_skipped_sync(generation);
        }
        tracing::info!(peer = %self.peer_name(peer), ok, "skip-initial-sync from peer");
        if let Some(link) = self.peers.get(&peer).and_then(|p| p.link.clone()) {
            self.effects
                .send(&link, Message::SkipSyncDone { token, ok }, Bytes::new());
        }
        self.send_reports();
    }

    fn on_skip_sync_done(&mut self, peer: u8, token: u64, ok: bool) {
        let Some(skip) = &mut self.skip_sync else {
            return;
        };
        if skip.token != token {
            return;
        }
        if !ok {
            if let Some(skip) = self.skip_sync.take() {
                let response = Response::failed(format!(
                    "skip-initial-sync refused by {}",
                    self.peer_name(peer)
                ));
                self.answer(&Request::SkipInitialSync, skip.caller, response);
            }
            return;
        }
        skip.waiting.remove(peer);
        self.maybe_finish_skip_sync();
    }

    fn maybe_finish_skip_sync(&mut self) {
        if !self
            .skip_sync
            .as_ref()
            .is_some_and(|s| s.waiting.is_empty())
        {
            return;
        }
        let Some(skip) = self.skip_sync.take() else {
            return;
        };
        let response = if self.may_adopt_skipped_sync() {
            self.adopt_skipped_sync(skip.generation);
            Response::done(format!(
                "all data nodes UpToDate in generation {} without a sync",
                skip.generation
            ))
        } else {
            Response::failed(format!(
                "cannot apply skip-initial-sync on {}: its disk is detached",
                self.me.name
            ))
        };
        self.send_reports();
        self.answer(&Request::SkipInitialSync, skip.caller, response);
    }
}

/// Fault point (`failpoints` feature, tests only): recording a resync
/// target's Inconsistent disk fails.
#[cfg(feature = "failpoints")]
fn sync_target_persist_fault() -> bool {
    fail::fail_point!("sync-target-persist-fails", |_| true);
    false
}
