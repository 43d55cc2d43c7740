//! Where quorum is decided and roles change: promotion, demotion, new
//! generations, quorum loss and return (docs/design.md, "Safety rules").
//!
//! **Promotion** is a cluster-wide step: the candidate asks every connected
//! node afresh (`PromoteQuery`), checks rules (a)–(d) on the answers, waits
//! out any voter's lease wait (I/O held), retries rule (b) for up to the
//! ping timeout (a peer may still believe in a Primary that just died), and
//! finally records a new generation on a majority of voters. Only then does
//! it acknowledge writes.
//!
//! **A new generation** is recorded by compare-and-set on each voter (a
//! voter accepts only a generation descending from the one it knows). With
//! a majority (itself plus every connected voter when quorum is off or
//! overridden) it takes effect; without one it fails, the node goes back to
//! its previous data generation and keeps the failed id in its history (so
//! voters that did record it still accept its later generations).
//!
//! **Quorum loss**: a Primary without quorum stops acknowledging writes —
//! `on-no-quorum = "io-error"` fails them with EIO, `"suspend-io"` holds
//! them — until quorum returns and a new generation is recorded (its own
//! generation still current), or it meets a newer one and steps down
//! (held writes then fail with EIO).

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::core::{Core, Demotion, GenerationChange, Stopped};
use super::lease;
use super::peer_state::PeerSync;
use super::phase::{PrimaryPhase, Promotion, RolePhase};
use super::promotion::{self, PromotionInput, PromotionRefusal};
use crate::config::{OnNoQuorum, QuorumMode};
use crate::control::protocol::{Request, Response};
use crate::control::server::CoreReply;
use crate::meta::superblock::StoredDisk;
use crate::meta::{MetaError, MetaStore};
use crate::replication::wire::{Message, WireLineage};
use crate::vocabulary::generation::{Generation, Lineage, Relation};
use crate::vocabulary::node::NodeSet;
use crate::vocabulary::state::{DiskState, Role};
use crate::volume::{Gate, Refusal};

/// Before the core starts: a node that stopped while a generation it
/// started was being recorded goes back to the generation before it. No
/// write was acknowledged in the new one (writes wait for the record), and
/// without a majority it was never this cluster's generation: coming back
/// in it would look like a split-brain to any node promoted meanwhile.
/// Voters that recorded it hear it was abandoned from this node's reports.
pub fn abandon_interrupted_generation(meta: &mut MetaStore) -> Result<(), MetaError> {
    let sb = meta.superblock();
    let Some(parent) = sb.recording_from else {
        return Ok(());
    };
    let Some((mut lineage, given_up)) = sb.lineage.back_to(parent) else {
        // The parent fell out of the bounded history: nothing to go back
        // to. Staying is safe; a peer may then report a split-brain.
        tracing::warn!(generation = %sb.lineage.current, %parent, "stopped while recording a generation whose parent is no longer in the history; keeping it");
        return meta.update(|sb| sb.recording_from = None);
    };
    let interrupted = sb.lineage.current;
    tracing::warn!(generation = %interrupted, back_to = %parent, "stopped while recording a new generation: going back to the one before it");
    meta.update(|sb| {
        lineage.remember_failed(interrupted);
        if given_up.contains(&sb.known) {
            sb.known = parent;
        }
        sb.lineage = lineage;
        sb.abandon(&given_up, parent);
        sb.recording_from = None;
    })
}

/// How often a promotion waiting on rule (b) or a lease asks again.
const PROMOTION_RETRY: Duration = Duration::from_millis(50);
/// How soon a Primary whose new generation was refused tries again.
const GENERATION_RETRY: Duration = Duration::from_millis(100);

impl Core {
    pub(super) fn promote(
        &mut self,
        force: bool,
        override_quorum: bool,
        reply: oneshot::Sender<CoreReply>,
    ) {
        let request = Request::Primary {
            force,
            override_quorum,
        };
        if matches!(self.phase, RolePhase::Primary(_)) {
            if let Some(change) = &mut self.generation_change {
                change.callers.push(reply);
                return;
            }
            self.answer(
                &request,
                reply,
                Response::done(format!("{} is already Primary", self.me.name)),
            );
            return;
        }
        let refusal = if self.demotion.is_some() {
            Some(format!(
                "refused: {} is being demoted; wait for it to finish",
                self.me.name
            ))
        } else if self.volume.is_none() {
            Some(format!(
                "refused: {} is a witness (no disk) and can never be Primary",
                self.me.name
            ))
        } else if self.disk_failed.load(std::sync::atomic::Ordering::Relaxed)
            || self.disk == DiskState::Diskless
        {
            Some(format!(
                "refused: {}'s disk has failed (Diskless)",
                self.me.name
            ))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.answer(&request, reply, Response::refused(refusal));
            return;
        }
        if let RolePhase::Promoting(promotion) = &mut self.phase {
            promotion.callers.push(reply);
            promotion.force |= force;
            promotion.override_quorum |= override_quorum;
            return;
        }
        let promotion = Promotion {
            token: 0,
            force,
            override_quorum,
            callers: vec![reply],
            waiting: NodeSet::EMPTY,
            lease_wait_ms: 0,
            started: self.now.instant,
            retry_at: None,
            auto: false,
            known_at_start: self.meta.superblock().known,
        };
        self.set_phase(RolePhase::Promoting(promotion), "primary asked for");
        self.promotion_round();
    }

    /// Asks every connected node afresh.
    pub(super) fn promotion_round(&mut self) {
        let token = self.next_token;
        self.next_token += 1;
        let mut waiting = NodeSet::EMPTY;
        for peer in self.peers.values() {
            if let Some(link) = peer.link.as_ref().filter(|l| !l.is_closed()) {
                self.effects
                    .send(link, Message::PromoteQuery { token }, Bytes::new());
                waiting.insert(peer.node.id);
            }
        }
        let RolePhase::Promoting(promotion) = &mut self.phase else {
            return;
        };
        promotion.token = token;
        promotion.waiting = waiting;
        promotion.lease_wait_ms = 0;
        promotion.retry_at = None;
        self.evaluate_promotion();
    }

    /// A node answered a promotion query.
    pub(super) fn promote_reply(&mut self, peer: u8, token: u64, lease_wait_ms: u64) {
        let RolePhase::Promoting(promotion) = &mut self.phase else {
            return;
        };
        if promotion.token != token {
            return;
        }
        promotion.waiting.remove(peer);
        promotion.lease_wait_ms = promotion.lease_wait_ms.max(lease_wait_ms);
        self.evaluate_promotion();
    }

    /// A node we were asking is gone.
    pub(super) fn promotion_peer_lost(&mut self, peer: u8) {
        if let RolePhase::Promoting(promotion) = &mut self.phase {
            promotion.waiting.remove(peer);
            self.evaluate_promotion();
        }
    }

    /// Checks the rules once every connected node answered.
    fn evaluate_promotion(&mut self) {
        let RolePhase::Promoting(promotion) = &self.phase else {
            return;
        };
        if !promotion.waiting.is_empty() || promotion.retry_at.is_some() {
            return;
        }
        let (force, override_quorum, started) = (
            promotion.force,
            promotion.override_quorum,
            promotion.started,
        );
        if self.meta.superblock().known != promotion.known_at_start {
            // Another node recorded a generation while this one asked
            // around: its answers are stale. Give up; the caller may retry.
            if let Some(promotion) = self.end_promotion("another node was promoted meanwhile") {
                let refusal = Response::refused(format!(
                    "refused: {} recorded another node's new generation while promoting; \
                     another node was promoted — check `hablk status`",
                    self.me.name
                ));
                for caller in promotion.callers {
                    self.answer(
                        &Request::Primary {
                            force,
                            override_quorum,
                        },
                        caller,
                        refusal.clone(),
                    );
                }
            }
            return;
        }
        let lease_wait_ms = promotion.lease_wait_ms.max(self.lease_wait_ms());
        let seen = self.voters_seen();
        let seen_refs: Vec<&str> = seen.iter().map(String::as_str).collect();
        let primary_seen = self.primary_seen();
        let newer = self.newer_generation_seen();
        let input = PromotionInput {
            quorum_mode: self.config.resource.quorum,
            voters_total: self.config.nodes.len(),
            voters_seen: &seen_refs,
            override_quorum,
            force,
            disk: self.disk,
            primary_seen: primary_seen.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
            newer_generation_seen: newer.as_deref(),
        };
        let mut verdict = promotion::check(&input).map_err(|e| {
            (
                e.to_string(),
                matches!(e, PromotionRefusal::PrimaryExists { .. }),
            )
        });
        if verdict.is_ok() && force {
            if let Some(who) = self.forced_promotion_blocker() {
                verdict = Err((
                    format!(
                        "refused: {who} has UpToDate or newer data; `primary --force` only accepts \
                         local data when no visible node has better"
                    ),
                    false,
                ));
            }
        }
        let within_timeout = started.elapsed() < self.config.resource.ping_timeout;
        match verdict {
            Err((_, true)) if within_timeout => {
                // Rule (b): a peer may still believe in a Primary that just
                // died; ask again until the ping timeout has passed.
                self.retry_promotion(PROMOTION_RETRY);
            }
            Err((reason, _)) => {
                if let Some(promotion) = self.end_promotion("refused") {
                    for caller in promotion.callers {
                        self.answer(
                            &Request::Primary {
                                force,
                                override_quorum,
                            },
                            caller,
                            Response::refused(reason.clone()),
                        );
                    }
                }
            }
            Ok(()) if lease_wait_ms > 0 => {
                tracing::info!(
                    lease_wait_ms,
                    "promotion waits for the old Primary's lease to expire"
                );
                self.retry_promotion(Duration::from_millis(lease_wait_ms));
            }
            Ok(()) => self.become_primary(force, override_quorum),
        }
    }

    fn retry_promotion(&mut self, after: Duration) {
        if let RolePhase::Promoting(promotion) = &mut self.phase {
            promotion.retry_at = Some(self.now.instant + after);
        }
    }

    /// The tick: a promotion whose retry time came asks again.
    pub(super) fn promotion_tick(&mut self) {
        let RolePhase::Promoting(promotion) = &self.phase else {
            return;
        };
        if promotion.retry_at.is_some_and(|at| self.now.instant >= at) {
            self.promotion_round();
        }
    }

    /// Ends a promotion under way (`secondary`, `down`): its callers are
    /// refused. Whether there was one.
    pub(super) fn cancel_promotion(&mut self, why: &str) -> bool {
        let Some(promotion) = self.end_promotion(why) else {
            return false;
        };
        let request = Request::Primary {
            force: promotion.force,
            override_quorum: promotion.override_quorum,
        };
        let refusal = Response::refused(format!("refused: the promotion was cancelled: {why}"));
        for caller in promotion.callers {
            self.answer(&request, caller, refusal.clone());
        }
        true
    }

    /// A promotion that ends without the role: back to Secondary, with
    /// its callers to answer.
    fn end_promotion(&mut self, why: &str) -> Option<Promotion> {
        if !matches!(self.phase, RolePhase::Promoting(_)) {
            return None;
        }
        let ended = match self.set_phase(RolePhase::Secondary, why) {
            RolePhase::Promoting(promotion) => Some(promotion),
            _ => None,
        };
        // What the peers reported while this node was promoting (a vote
        // to give back, an abandoned data generation to leave) was set
        // aside: take it up now, or nothing may ever repeat it.
        self.reconsider_peer_reports();
        ended
    }

    /// How long this node still backs a Primary it lost (lease wait).
    pub(super) fn lease_wait_ms(&self) -> u64 {
        self.lease_hold_until
            .max(self.start_hold.until_nanos())
            .saturating_sub(self.now.lease_nanos)
            / 1_000_000
    }

    /// All rules passed: take the role and record the new generation.
    fn become_primary(&mut self, force: bool, override_quorum: bool) {
        let request = Request::Primary {
            force,
            override_quorum,
        };
        if self.volume.is_none() {
            return;
        }
        let sb = self.meta.superblock();
        let capacity = sb.layout.data_capacity_bytes;
        let peer_size = self
            .peers
            .values()
            .filter_map(|p| p.report.as_ref().map(|r| r.data_size_bytes))
            .find(|&s| s > 0);
        let size_bytes = match (
            sb.data_size_bytes,
            self.config.resource.size_bytes,
            peer_size,
        ) {
            (0, Some(wanted), _) if wanted > capacity => {
                let response = Response::failed(format!(
                    "size {wanted} in {} is larger than {}'s usable disk ({capacity} bytes)",
                    self.config.path.display(),
                    self.me.name
                ));
                if let Some(promotion) = self.end_promotion("the configured size does not fit") {
                    for caller in promotion.callers {
                        self.answer(&request, caller, response.clone());
                    }
                }
                return;
            }
            (0, Some(wanted), _) => wanted,
            (0, None, Some(size)) => size,
            (0, None, None) => self.smallest_capacity(capacity),
            (fixed, _, _) => fixed,
        };
        self.persist("the promotion", |sb| {
            sb.disk = StoredDisk::UpToDate;
            sb.data_size_bytes = size_bytes;
            if force {
                sb.flags.needs_full_sync = false;
            }
        });
        self.set_disk(DiskState::UpToDate, "promoted");
        let callers = match self.set_phase(RolePhase::Primary(PrimaryPhase::Recording), "promoted")
        {
            RolePhase::Promoting(promotion) => {
                self.auto_promoted = promotion.auto;
                promotion.callers
            }
            _ => Vec::new(),
        };
        self.quorum_overridden = override_quorum
            && self.config.resource.quorum == QuorumMode::Majority
            && !self.quorum();
        if self.quorum_overridden {
            tracing::warn!("PROMOTED WITHOUT QUORUM (--override-quorum): split-brain is possible until quorum returns");
            self.record_call(
                "primary",
                &Response::done(
                    "promoted WITHOUT QUORUM (--override-quorum): split-brain is possible",
                ),
            );
        }
        self.set_gate(Gate::Held {
            size_bytes,
            reason: "recording the new generation".into(),
        });
        // Data peers in sync with this node, and those it is resyncing, get
        // every write from the first one on; the others join after a bitmap
        // exchange.
        let current = self.meta.superblock().lineage.current;
        for peer in self.peers.values_mut() {
            let in_sync = peer.report.as_ref().is_some_and(|r| {
                Generation(r.lineage.current) == current && r.disk == DiskState::UpToDate
            }) && !peer.sync.is_running();
            let resyncing = matches!(peer.sync, PeerSync::SourceStreaming(_));
            if peer.node.is_data() && peer.connected() && (in_sync || resyncing) {
                peer.receives_writes = true;
            }
        }
        self.refresh_targets();
        let how = if self.quorum_overridden {
            " (--override-quorum)"
        } else if force {
            " (--force: local data accepted as current)"
        } else {
            ""
        };
        self.start_generation(format!("promotion{how}"), callers);
        // Peers in sync start receiving writes after a fresh exchange.
        self.send_reports();
        self.re_evaluate_all();
    }

    /// Smallest usable disk among this node and the data peers it sees.
    fn smallest_capacity(&self, mine: u64) -> u64 {
        let smallest = self
            .peers
            .values()
            .filter(|p| p.node.is_data())
            .filter_map(|p| p.report.as_ref().map(|r| r.capacity_bytes))
            .fold(mine, u64::min);
        smallest - smallest % crate::config::DATA_BLOCK_BYTES
    }

    /// A visible node (or this one) that knows a generation newer than
    /// this node's data generation — rule (d).
    pub(super) fn newer_generation_seen(&self) -> Option<String> {
        let sb = self.meta.superblock();
        let mine = &sb.lineage;
        if !mine.contains(sb.known) {
            return Some(self.me.name.clone());
        }
        for peer in self.peers.values().filter(|p| p.connected()) {
            let Some(report) = &peer.report else { continue };
            let theirs: Lineage = (&report.lineage).into();
            let known = Generation(report.known);
            let knows_newer = !mine.contains(known)
                || (peer.node.is_data() && mine.relation_to(&theirs) == Relation::Older);
            if knows_newer {
                return Some(peer.node.name.clone());
            }
        }
        None
    }

    /// For `--force`: a visible data node that is UpToDate or has newer data.
    fn forced_promotion_blocker(&self) -> Option<String> {
        let mine = &self.meta.superblock().lineage;
        self.peers
            .values()
            .filter(|p| p.connected())
            .find_map(|peer| {
                let report = peer.report.as_ref()?;
                if !peer.node.is_data() {
                    return None;
                }
                let theirs: Lineage = (&report.lineage).into();
                let newer = mine.relation_to(&theirs) == Relation::Older;
                (report.disk == DiskState::UpToDate || newer).then(|| peer.node.name.clone())
            })
    }

    /// Starts a new generation: durable here first, then recorded on every
    /// connected voter. Writes are held until it is recorded.
    pub(super) fn start_generation(
        &mut self,
        reason: String,
        callers: Vec<oneshot::Sender<CoreReply>>,
    ) {
        let generation = Generation::random();
        let previous = self.meta.superblock().lineage.clone();
        let known_before = self.meta.superblock().known;
        let wrote_before = self.meta.superblock().flags.wrote_in_generation;
        // A failure detaches the disk, and a Primary steps down: going on
        // without the new generation would acknowledge writes a lost peer
        // lacks while it still passes for current.
        self.persist("a new generation", |sb| {
            // A superseded change keeps the parent it started from.
            sb.recording_from = sb.recording_from.or(Some(sb.lineage.current));
            sb.lineage.advance(generation);
            sb.known = generation;
            sb.flags.wrote_in_generation = false;
        });
        tracing::info!(%generation, previous = %previous.current, reason = %reason, "new generation");
        if let Some(volume) = &self.volume {
            volume.reset_wrote();
        }
        // A demoting Primary records too (its lost peer must not pass for
        // current), but its gate stays closed.
        if matches!(self.phase, RolePhase::Primary(_)) {
            self.set_phase(RolePhase::Primary(PrimaryPhase::Recording), &reason);
            let size_bytes = self.meta.superblock().data_size_bytes;
            self.set_gate(Gate::Held {
                size_bytes,
                reason: "recording a new generation".into(),
            });
        }
        let token = self.next_token;
        self.next_token += 1;
        let lineage = WireLineage::from(&self.meta.superblock().lineage);
        let mut waiting = NodeSet::EMPTY;
        for peer in self.peers.values_mut() {
            if let Some(link) = peer.link.as_ref().filter(|l| !l.is_closed()) {
                let ask = Message::NewGeneration {
                    lineage: lineage.clone(),
                    token,
                    may_adopt: peer.receives_writes,
                };
                self.effects.send(link, ask, Bytes::new());
                waiting.insert(peer.node.id);
                if peer.node.is_data() {
                    // It may take the generation as its data before its
                    // answer arrives: losing it then is rule A.
                    peer.saw_generation = Some(generation);
                }
            }
        }
        let mut callers = callers;
        let (mut previous, mut known_before, mut wrote_before) =
            (previous, known_before, wrote_before);
        let mut superseded_asked = false;
        let mut for_promotion = !callers.is_empty();
        if let Some(old) = self.generation_change.take() {
            // A change still unrecorded is superseded by this one.
            callers.extend(old.callers);
            previous = old.previous;
            known_before = old.known_before;
            wrote_before = old.wrote_before;
            superseded_asked = old.superseded_asked || old.asked > 0;
            for_promotion |= old.for_promotion;
        }
        let asked = waiting.len();
        self.generation_change = Some(GenerationChange {
            token,
            generation,
            previous,
            known_before,
            wrote_before,
            asked,
            waiting,
            accepted: NodeSet::of(self.me.id),
            reason,
            callers,
            adopted: NodeSet::EMPTY,
            refused: NodeSet::EMPTY,
            superseded_asked,
            for_promotion,
            deadline: self.now.instant + self.config.resource.ping_timeout * 2,
        });
        self.maybe_finish_generation();
    }

    /// Answers the `primary` commands that wait for a generation's record.
    pub(super) fn answer_generation_callers(
        &self,
        callers: Vec<oneshot::Sender<CoreReply>>,
        response: Response,
    ) {
        let request = Request::Primary {
            force: false,
            override_quorum: false,
        };
        for caller in callers {
            self.answer(&request, caller, response.clone());
        }
    }

    /// A voter answered (or was lost).
    pub(super) fn generation_answer(&mut self, peer: u8, accepted: bool) {
        let Some(change) = &mut self.generation_change else {
            return;
        };
        let was_waiting = change.waiting.contains(peer);
        change.waiting.remove(peer);
        if was_waiting && accepted {
            change.accepted.insert(peer);
        }
        self.maybe_finish_generation();
    }

    /// Voters a new generation must reach.
    fn generation_majority(&self, asked: usize) -> usize {
        if self.config.resource.quorum == QuorumMode::Off || self.quorum_overridden {
            // Itself plus every connected voter.
            1 + asked.min(self.peers.values().filter(|p| p.connected()).count())
        } else {
            promotion::majority(self.config.nodes.len())
        }
    }

    fn maybe_finish_generation(&mut self) {
        let Some(change) = &self.generation_change else {
            return;
        };
        if !change.waiting.is_empty() {
            return;
        }
        let Some(change) = self.generation_change.take() else {
            return;
        };
        let needed = self.generation_majority(change.asked);
        let accepted: Vec<String> = change
            .accepted
            .iter()
            .map(|id| self.peer_name(id))
            .collect();
        if accepted.len() >= needed {
            // From here a crash may leave acknowledged writes behind: the
            // restarted node is a crashed Primary (a promotion whose record
            // fails never acknowledged one, and is not).
            let serves_next = matches!(self.phase, RolePhase::Primary(_));
            // If this fails, the gate opened below stays shut: after a
            // crash this node would go back to the parent generation and
            // lose what it acknowledged.
            self.persist("the settled generation", |sb| {
                sb.recording_from = None;
                sb.flags.primary_crashed |= serves_next;
            });
            tracing::info!(generation = %change.generation, recorded_on = %accepted.join(","), reason = %change.reason, "generation recorded");
            if self.role() == Role::Primary {
                // Every peer that took the generation as its data must get
                // every write acknowledged in it.
                for id in change.adopted.iter() {
                    if let Some(peer) = self.peers.get_mut(&id).filter(|p| p.connected()) {
                        peer.receives_writes = true;
                    }
                }
                self.refresh_targets();
            }
            if matches!(self.phase, RolePhase::Primary(_)) {
                self.set_phase(
                    RolePhase::Primary(PrimaryPhase::Serving),
                    "generation recorded",
                );
                self.open_gate();
            }
            let response = Response::done(format!(
                "{} is Primary in generation {} (recorded on {})",
                self.me.name,
                change.generation,
                accepted.join(", ")
            ));
            self.answer_generation_callers(change.callers, response);
            self.send_reports();
            self.re_evaluate_all();
            return;
        }
        // No majority: back to the previous data generation, keeping the
        // failed id in the history.
        tracing::warn!(
            generation = %change.generation,
            accepted = accepted.len(),
            needed,
            reason = %change.reason,
            "new generation NOT recorded on a majority"
        );
        let failed = change.generation;
        let previous = change.previous.clone();
        // Only a voter that may have recorded the failed generation needs
        // it in the history (to accept this node's later ones). When every
        // voter asked said no, keeping it would only push real ancestors
        // out of the bounded history with each retry, until nodes that are
        // merely behind look diverged (a false split-brain).
        let someone_may_know = change.superseded_asked || change.refused.len() < change.asked;
        self.persist("the return to the previous generation", |sb| {
            let given_up = sb
                .lineage
                .back_to(previous.current)
                .map_or_else(|| vec![failed], |(_, given_up)| given_up);
            sb.lineage = previous.clone();
            if someone_may_know {
                // Voters that recorded it hear it was given up, even once
                // this node's lineage has moved on.
                sb.lineage.remember_failed(failed);
                sb.abandon(&given_up, previous.current);
            }
            sb.recording_from = None;
            // No write was acknowledged in the failed generation, so this
            // node need not hold out for it as a voter: kept, it would
            // refuse every generation of a Primary the majority chose.
            if sb.known == failed {
                sb.known = change.known_before;
            }
            sb.flags.wrote_in_generation |= change.wrote_before;
        });
        let refusal = format!(
            "refused: could not record the new generation on a majority (accepted by {} of {} voters: {}); \
             needs {needed}",
            accepted.len(),
            self.config.nodes.len(),
            accepted.join(", ")
        );
        let promoting = change.for_promotion;
        self.answer_generation_callers(change.callers, Response::refused(refusal));
        // Reports set aside while the record ran.
        self.reconsider_peer_reports();
        if promoting && self.role() == Role::Primary {
            self.drop_source_resyncs("promotion could not record its generation");
            self.become_secondary("promotion could not record its generation");
        } else {
            self.retry_generation_later("its new generation was not recorded on a majority");
        }
        self.send_reports();
        self.re_evaluate_all();
    }

    pub(super) fn open_gate(&mut self) {
        let size_bytes = self.meta.superblock().data_size_bytes;
        self.set_gate(Gate::Open { size_bytes });
    }

    /// The Primary has no quorum: fail or hold writes per `on-no-quorum`.
    fn apply_no_quorum(&mut self) {
        let size_bytes = self.meta.superblock().data_size_bytes;
        let seen = self.voters_seen();
        let reason = format!(
            "{} on {} has no quorum (sees {} of {} voters: {})",
            self.config.resource.name,
            self.me.name,
            seen.len(),
            self.config.nodes.len(),
            seen.join(", ")
        );
        match self.config.resource.on_no_quorum {
            OnNoQuorum::IoError => self.set_gate(Gate::Closed {
                refusal: Refusal::NoQuorum,
                reason,
            }),
            OnNoQuorum::SuspendIo => self.set_gate(Gate::Held { size_bytes, reason }),
        }
    }

    /// A Primary whose generation is not backed by a majority: writes fail
    /// or wait (`on-no-quorum`) until a new one is recorded, tried again
    /// after a pause (every voter may refuse for a while, one of them
    /// promoting, and each try costs two superblock writes).
    fn retry_generation_later(&mut self, why: &str) {
        if matches!(self.phase, RolePhase::Primary(_)) {
            let retry_at = Some(self.now.instant + GENERATION_RETRY);
            self.set_phase(
                RolePhase::Primary(PrimaryPhase::WithoutQuorum { retry_at }),
                why,
            );
            self.apply_no_quorum();
        }
    }

    /// After every step: a Primary whose quorum went or came back.
    pub(super) fn check_quorum(&mut self) {
        let RolePhase::Primary(phase) = self.phase else {
            return;
        };
        let quorum = self.quorum();
        if quorum && self.quorum_overridden && self.config.resource.quorum == QuorumMode::Majority {
            tracing::info!("quorum is back: --override-quorum no longer in effect");
            self.quorum_overridden = false;
        }
        let effective = quorum || self.quorum_overridden;
        if !effective {
            if phase == PrimaryPhase::Serving {
                tracing::warn!(policy = ?self.config.resource.on_no_quorum, "Primary lost quorum: no write is acknowledged until it returns");
                let lost = PrimaryPhase::WithoutQuorum { retry_at: None };
                self.set_phase(RolePhase::Primary(lost), "quorum lost");
            }
            if phase != PrimaryPhase::Recording {
                self.apply_no_quorum();
            }
            return;
        }
        // A peer recording a generation reports it as known before a
        // majority took it: judged on it, this Primary would step down
        // for a generation that may yet fail. Its record's end sends a
        // settled report.
        let reports_pending = self
            .peers
            .values()
            .any(|p| p.connected() && p.report.as_ref().map_or(true, |r| r.recording_generation));
        let PrimaryPhase::WithoutQuorum { retry_at } = phase else {
            return;
        };
        let retry_due = retry_at.map_or(true, |at| self.now.instant >= at);
        if self.generation_change.is_none() && !reports_pending && retry_due {
            if let Some(who) = self.newer_generation_seen() {
                tracing::error!(peer = %who, "quorum is back, but a newer generation exists: stepping down");
                self.become_secondary("a newer generation exists");
                return;
            }
            tracing::info!(
                "quorum is back: recording a new generation before acknowledging writes"
            );
            self.start_generation("quorum returned".into(), Vec::new());
        }
    }

    pub(super) fn begin_demotion(
        &mut self,
        force: bool,
        reply: Option<oneshot::Sender<CoreReply>>,
        stop: bool,
    ) {
        if force {
            self.clients.disconnect_all();
        }
        if let Some(demotion) = &mut self.demotion {
            demotion.stop |= stop;
            match reply {
                Some(reply) if stop && demotion.stop_reply.is_none() => {
                    demotion.stop_reply = Some(reply)
                }
                Some(reply) => demotion.waiting.push(reply),
                None => {}
            }
            return;
        }
        self.close_gate(Refusal::ShuttingDown);
        if self.role() == Role::Primary {
            self.set_phase(RolePhase::Demoting, "demotion asked for");
        }
        let (waiting, stop_reply) = match (stop, reply) {
            (true, reply) => (Vec::new(), reply),
            (false, reply) => (reply.into_iter().collect(), None),
        };
        self.demotion = Some(Demotion {
            waiting,
            stop,
            stop_reply,
        });
        self.jobs.push(super::jobs::Job::Drain);
    }

    pub(super) fn finish_demotion(&mut self, flushed: io::Result<()>) -> Option<Stopped> {
        let demotion = self.demotion.take()?;
        let response = match flushed {
            Ok(()) => {
                self.become_secondary("demoted");
                // The first write may not be noted yet (the core hears of
                // it asynchronously): record it with the clean demotion,
                // or the split-brain rules would take this node's writes
                // for none.
                let wrote = self.wrote_now();
                self.persist("the clean demotion", |sb| {
                    sb.flags.primary_crashed = false;
                    sb.flags.wrote_in_generation |= wrote;
                });
                Response::done(format!("{} is Secondary", self.me.name))
            }
            Err(e) => {
                // Data the clients were told is written may not be on disk:
                // say so loudly.
                self.become_secondary("demoted after a failed flush");
                Response::failed(format!(
                    "{} is Secondary, but flushing the disk failed ({e}); check the backing disk",
                    self.me.name
                ))
            }
        };
        for reply in demotion.waiting {
            self.answer(
                &Request::Secondary { force: false },
                reply,
                response.clone(),
            );
        }
        if demotion.stop {
            self.clients.disconnect_all();
            return Some(Stopped {
                reply: demotion.stop_reply,
            });
        }
        None
    }

    /// Drops the Primary role (demotion, or meeting newer data).
    pub(super) fn become_secondary(&mut self, why: &str) {
        if self.role() != Role::Primary {
            return;
        }
        self.set_phase(RolePhase::Secondary, why);
        self.quorum_overridden = false;
        self.auto_promoted = false;
        self.effects.set_targets(Vec::new(), true);
        for peer in self.peers.values_mut() {
            peer.receives_writes = false;
        }
        // Writes held for a generation that will never be recorded now fail
        // (the volume turns a closed gate into EIO for them).
        self.close_gate(Refusal::NotPrimary);
        self.send_reports();
    }

    /// Stops the node: demotes first if Primary.
    pub(super) fn stop(
        &mut self,
        force: bool,
        reply: Option<oneshot::Sender<CoreReply>>,
    ) -> Option<Stopped> {
        if self.role() == Role::Primary || self.demotion.is_some() {
            self.begin_demotion(force, reply, true);
            return None;
        }
        self.cancel_promotion("the node is going down");
        self.clients.disconnect_all();
        Some(Stopped { reply })
    }

    /// This voter lost a Primary it last acknowledged at
    /// `lost_primary_answered_nanos`: it backs no new Primary for a ping
    /// timeout from then.
    pub(super) fn lease_hold_from(&mut self, lost_primary_answered_nanos: u64) {
        let hold = lost_primary_answered_nanos
            .saturating_add(lease::nanos(self.config.resource.ping_timeout));
        self.lease_hold_until = self.lease_hold_until.max(hold);
    }

    /// The voter's promise, second half: this node's heartbeat answers
    /// renew a peer's lease only while it has recorded no generation that
    /// supersedes the peer's — the same test as the compare-and-set of
    /// `on_new_generation`. A Primary cut off and replaced cannot regain a
    /// lease (and serve stale reads) from a voter that has heard of its
    /// successor.
    pub(super) fn grants_lease(&self, peer: u8, known: Generation) -> bool {
        self.known_from == Some((peer, known))
            || self
                .peers
                .get(&peer)
                .and_then(|p| p.report.as_ref())
                .is_some_and(|r| r.lineage.contains(known))
    }

    pub(super) fn refresh_lease_grants(&self) {
        let known = self.meta.superblock().known;
        for (&id, state) in &self.peers {
            let Some(link) = &state.link else {
                continue;
            };
            if !self.grants_lease(id, known) {
                link.withdraw_lease();
            } else if let Some(ping) = link.grant_lease(self.now.lease_nanos) {
                let pong = Message::Pong {
                    id: ping,
                    lease_granted: true,
                };
                self.effects.send(link, pong, Bytes::new());
            }
        }
    }

    /// Keeps the lease's voter set current.
    pub(super) fn refresh_lease(&self) {
        let voters: Vec<_> = self
            .peers
            .values()
            .filter_map(|p| p.link.clone().filter(|l| !l.is_closed()))
            .collect();
        let enforce = self.role() == Role::Primary
            && self.config.resource.quorum == QuorumMode::Majority
            && !self.quorum_overridden;
        let needed = promotion::majority(self.config.nodes.len()).saturating_sub(1);
        self.lease.configure(voters, needed, enforce);
    }
}
