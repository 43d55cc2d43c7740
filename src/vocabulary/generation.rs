//! Generations: the identity of a line of data history (docs/design.md, "Safety rules").
//!
//! A generation is a random 64-bit id. `create-md` starts every node at the
//! fixed generation 0; a Primary starts a fresh one when it is promoted and
//! whenever it loses a data peer. Each data node remembers the ids its data
//! descends from (its history, newest first), so two nodes can tell on
//! connect whether one's data is an ancestor of the other's (the older one
//! resyncs) or whether the lines diverged (split-brain).

use std::fmt;

use serde::{Serialize, Serializer};

/// At most this many ancestors are remembered. A generation starts on each
/// promotion and each peer loss, so 64 covers far more history than two
/// nodes can drift apart between connections; beyond it, a node whose
/// generation has fallen out of the window is treated as unrelated (a
/// reported split-brain, never a silent overwrite).
pub const MAX_GENERATION_HISTORY: usize = 64;

/// At most this many abandoned generations are remembered (see
/// [`Abandoned`] and [`keep_abandoned`]). One is added per failed record;
/// a node still holding one this old has been away for that many failed
/// promotions, and is told again by the next report of a lineage that
/// moved past it.
pub const MAX_ABANDONED: usize = 8;

/// One line of data history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub u64);

impl Generation {
    /// What `create-md` writes: no history yet, never promoted.
    pub const INITIAL: Generation = Generation(0);

    /// A fresh random id, never 0.
    pub fn random() -> Generation {
        loop {
            let id: u64 = rand::random();
            if id != 0 {
                return Generation(id);
            }
        }
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for Generation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A data generation with the ids it descends from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub current: Generation,
    /// Ancestors, newest first, at most [`MAX_GENERATION_HISTORY`].
    pub history: Vec<Generation>,
}

/// A generation its recorder gave up before a majority recorded it (the
/// record failed, or the recorder crashed while recording). No write was
/// acknowledged in it, so a voter that recorded it may give the vote back
/// and follow `parent`, the generation the recorder went back to. Kept
/// apart from the lineage: the recorder may later take another node's
/// lineage whole, and the voters must still hear that this one is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned {
    pub generation: Generation,
    pub parent: Generation,
}

/// The abandoned generations a node keeps out of `entries` (its own list,
/// and those it gave up or heard of): the ones branching off `lineage`,
/// newest branch point first (ties by id), at most [`MAX_ABANDONED`].
///
/// Every node passes on what it keeps, not only the recorder: the node
/// holding an abandoned generation (it took it as its data or its vote
/// before the record failed) may next meet only nodes that never talked
/// to the recorder, and its line would look diverged from theirs. A
/// generation branching off elsewhere cannot look diverged from this
/// node's line, so it is not kept. The result depends only on the lineage
/// and the set of entries: nodes of one lineage that pass lists to each
/// other settle on the same list instead of trading entries forever.
pub fn keep_abandoned(
    lineage: &Lineage,
    entries: impl IntoIterator<Item = Abandoned>,
) -> Vec<Abandoned> {
    let mut kept: Vec<(usize, Abandoned)> = entries
        .into_iter()
        .filter_map(|entry| Some((lineage.depth_of(entry.parent)?, entry)))
        .collect();
    // One entry per generation (a peer may send anything): the one that
    // branches off nearest.
    kept.sort_by_key(|&(depth, entry)| (entry.generation, depth));
    kept.dedup_by_key(|&mut (_, entry)| entry.generation);
    kept.sort_by_key(|&(depth, entry)| (depth, entry.generation));
    kept.truncate(MAX_ABANDONED);
    kept.into_iter().map(|(_, entry)| entry).collect()
}

/// How two lineages relate, from the point of view of `self`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Same generation: in sync up to the bitmaps.
    Equal,
    /// The other lineage descends from ours: we are behind.
    Older,
    /// Ours descends from the other: it is behind.
    Newer,
    /// Neither descends from the other: split-brain.
    Diverged,
}

impl Lineage {
    pub fn initial() -> Lineage {
        Lineage {
            current: Generation::INITIAL,
            history: Vec::new(),
        }
    }

    /// Whether `generation` is this lineage's current id or one of its ancestors.
    pub fn contains(&self, generation: Generation) -> bool {
        self.current == generation || self.history.contains(&generation)
    }

    /// How far back `generation` lies: 0 for the current id, `i + 1` for
    /// the ancestor at `history[i]`.
    pub fn depth_of(&self, generation: Generation) -> Option<usize> {
        if self.current == generation {
            return Some(0);
        }
        self.history
            .iter()
            .position(|&g| g == generation)
            .map(|i| i + 1)
    }

    /// Moves to `next`, pushing the current id into the history.
    pub fn advance(&mut self, next: Generation) {
        assert_ne!(next, self.current, "a new generation must differ");
        self.history.insert(0, self.current);
        self.history.truncate(MAX_GENERATION_HISTORY);
        self.current = next;
    }

    /// Keeps `failed`, a generation given up before a majority recorded
    /// it, at the head of the history: a peer may have taken it as its
    /// data, and the two must still relate (see `relation_to`).
    pub fn remember_failed(&mut self, failed: Generation) {
        self.history.insert(0, failed);
        self.history.truncate(MAX_GENERATION_HISTORY);
    }

    /// The lineage as it was at `parent`, an ancestor, and the ids after
    /// it, newest first. `None` if `parent` is not in this lineage.
    pub fn back_to(&self, parent: Generation) -> Option<(Lineage, Vec<Generation>)> {
        let depth = self.history.iter().position(|&g| g == parent)?;
        let mut given_up = vec![self.current];
        given_up.extend_from_slice(&self.history[..depth]);
        let lineage = Lineage {
            current: parent,
            history: self.history[depth + 1..].to_vec(),
        };
        Some((lineage, given_up))
    }

    pub fn relation_to(&self, other: &Lineage) -> Relation {
        let we_are_behind = other.history.contains(&self.current);
        let they_are_behind = self.history.contains(&other.current);
        match (
            self.current == other.current,
            we_are_behind,
            they_are_behind,
        ) {
            (true, _, _) => Relation::Equal,
            // Each holds the other's current id in its history: one of the
            // two ids is a generation whose record failed (the recorder went
            // back to its previous id and kept the failed one in its history,
            // while a peer had already taken it). No write is acknowledged in
            // a generation that was never recorded, so the data is the same.
            (false, true, true) => Relation::Equal,
            (false, true, false) => Relation::Older,
            (false, false, true) => Relation::Newer,
            (false, false, false) => Relation::Diverged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn relations() {
        let mut a = Lineage::initial();
        let b = a.clone();
        assert_eq!(a.relation_to(&b), Relation::Equal);
        a.advance(Generation(7));
        assert_eq!(a.relation_to(&b), Relation::Newer);
        assert_eq!(b.relation_to(&a), Relation::Older);
        let mut c = b.clone();
        c.advance(Generation(9));
        assert_eq!(a.relation_to(&c), Relation::Diverged);
        assert_eq!(c.relation_to(&a), Relation::Diverged);
    }

    #[test]
    fn a_failed_record_is_not_a_cycle_of_older_nodes() {
        // The recorder went back to g0 keeping the failed g1 in its history;
        // a peer took g1 before the record failed.
        let recorder = Lineage {
            current: Generation(0),
            history: vec![Generation(1)],
        };
        let peer = Lineage {
            current: Generation(1),
            history: vec![Generation(0)],
        };
        assert_eq!(recorder.relation_to(&peer), Relation::Equal);
        assert_eq!(peer.relation_to(&recorder), Relation::Equal);
    }

    #[test]
    fn back_to_a_parent() {
        let mut lineage = Lineage::initial();
        lineage.advance(Generation(5));
        let parent = lineage.clone();
        lineage.advance(Generation(6));
        lineage.advance(Generation(7));
        let (back, given_up) = lineage.back_to(Generation(5)).unwrap();
        assert_eq!(given_up, vec![Generation(7), Generation(6)]);
        assert_eq!(back, parent);
        assert!(lineage.back_to(Generation(99)).is_none());
    }

    proptest! {
        /// Relations are antisymmetric: if a is older than b, b is newer than a,
        /// and divergence is mutual.
        #[test]
        fn relation_is_antisymmetric(steps_a in prop::collection::vec(1u64..20, 0..10),
                                     steps_b in prop::collection::vec(1u64..20, 0..10),
                                     shared in 0usize..10) {
            let mut base = Lineage::initial();
            let mut next = 100u64;
            for _ in 0..shared { base.advance(Generation(next)); next += 1; }
            let mut a = base.clone();
            let mut b = base.clone();
            for s in steps_a { a.advance(Generation(next * 1000 + s)); next += 1; }
            for s in steps_b { b.advance(Generation(next * 1000 + s)); next += 1; }
            let expected = match a.relation_to(&b) {
                Relation::Equal => Relation::Equal,
                Relation::Older => Relation::Newer,
                Relation::Newer => Relation::Older,
                Relation::Diverged => Relation::Diverged,
            };
            prop_assert_eq!(b.relation_to(&a), expected);
        }

        /// Nodes of one lineage that pass abandoned lists to each other, in
        /// any order and any number of times, settle on one list: what
        /// each keeps depends only on the set it saw.
        #[test]
        fn abandoned_lists_settle(
            depth in 0usize..12,
            heard in prop::collection::vec(prop::collection::vec((0u64..40, 0usize..16), 0..10), 1..4),
        ) {
            let mut lineage = Lineage::initial();
            for id in 1..=depth as u64 { lineage.advance(Generation(1000 + id)); }
            let entry = |(generation, parent): (u64, usize)| Abandoned {
                generation: Generation(generation),
                // Parents past the lineage's depth are not in it.
                parent: Generation(if parent == 0 { 0 } else { 1000 + parent as u64 }),
            };
            let lists: Vec<Vec<Abandoned>> = heard
                .iter()
                .map(|h| keep_abandoned(&lineage, h.iter().copied().map(entry)))
                .collect();
            let all = keep_abandoned(&lineage, heard.iter().flatten().copied().map(entry));
            // Merging every node's list, in either order, gives the list
            // kept from everything heard.
            let forward = lists.iter().fold(Vec::new(), |acc, l| keep_abandoned(&lineage, acc.into_iter().chain(l.iter().copied())));
            let backward = lists.iter().rev().fold(Vec::new(), |acc, l| keep_abandoned(&lineage, acc.into_iter().chain(l.iter().copied())));
            prop_assert_eq!(&forward, &all);
            prop_assert_eq!(&backward, &all);
            prop_assert_eq!(keep_abandoned(&lineage, all.iter().copied()), all.clone());
            prop_assert!(all.len() <= MAX_ABANDONED);
            for kept in &all {
                prop_assert!(lineage.contains(kept.parent));
            }
        }

        #[test]
        fn history_is_bounded(count in 0usize..200) {
            let mut lineage = Lineage::initial();
            for i in 0..count { lineage.advance(Generation(i as u64 + 1)); }
            prop_assert!(lineage.history.len() <= MAX_GENERATION_HISTORY);
        }
    }
}
