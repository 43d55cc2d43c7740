//! Who resyncs whom when two data nodes meet (docs/design.md,
//! "Resync sources"), as one pure function both sides evaluate on the same
//! inputs, so both reach the same, mirrored, conclusion.
//!
//! - equal generations: in sync up to the bitmaps; the union of both
//!   bitmaps is resynced from the Primary if one of them is, else from a
//!   node that crashed while Primary (its activity-log extents), else from
//!   the node that wrote in that generation, else from the lower id;
//! - one generation in the other's history: the older node is the target;
//! - neither: split-brain — nothing is overwritten;
//! - only an UpToDate node is ever a source, and while either node is
//!   connected to a Primary, only that Primary may be the source;
//! - a node that knows a generation its data does not descend from is
//!   resynced only by a source whose history holds that generation.

use crate::vocabulary::generation::{Generation, Lineage, Relation};
use crate::vocabulary::state::{DiskState, Role};

/// One side of a connection, as both sides see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub id: u8,
    pub role: Role,
    pub disk: DiskState,
    pub lineage: Lineage,
    pub primary_crashed: bool,
    /// Never synced, or invalidated: a resync toward it must be full.
    pub needs_full_sync: bool,
    /// Connected to a Primary other than the other side.
    pub connected_to_other_primary: bool,
    /// The operator chose this side as the split-brain victim.
    pub discard_my_data: bool,
    /// The newest generation this side knows was recorded (`known`).
    pub known: Generation,
    /// It may have acknowledged writes in its current generation. Only the
    /// node that started a generation writes in it; a node that joined it
    /// by a resync from a third node may lack what that writer wrote since.
    pub wrote_in_generation: bool,
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The lines of history diverged.
    SplitBrain,
    /// No resync now (nothing to sync, or no valid source).
    None,
    /// `source` resyncs `target`; `full` = hash-compare everything.
    Sync { source: u8, target: u8, full: bool },
}

/// Only an UpToDate disk may serve as a resync source (a Consistent one is
/// resolved to UpToDate or Outdated before this is asked).
fn can_source(side: &Side) -> bool {
    side.disk == DiskState::UpToDate && !side.discard_my_data
}

/// Decides for the pair (a, b); symmetric in its arguments.
pub fn decide(a: &Side, b: &Side) -> Decision {
    let relation = if a.discard_my_data && !b.discard_my_data {
        Relation::Older
    } else if b.discard_my_data && !a.discard_my_data {
        Relation::Newer
    } else {
        a.lineage.relation_to(&b.lineage)
    };
    let (source, target) = match relation {
        Relation::Diverged if a.lineage.current.0 == 0 && a.needs_full_sync => (b, a),
        Relation::Diverged if b.lineage.current.0 == 0 && b.needs_full_sync => (a, b),
        Relation::Diverged => return Decision::SplitBrain,
        Relation::Older => (b, a),
        Relation::Newer => (a, b),
        Relation::Equal => {
            let (first, second) = if a.id < b.id { (a, b) } else { (b, a) };
            let ranked = [first, second];
            let pick = ranked
                .iter()
                .copied()
                .filter(|s| can_source(s))
                .max_by_key(|s| {
                    (
                        s.role == Role::Primary,
                        s.primary_crashed,
                        s.wrote_in_generation,
                        s.id == first.id,
                    )
                });
            match pick {
                Some(source) if source.id == a.id => (a, b),
                Some(_) => (b, a),
                None => return Decision::None,
            }
        }
    };
    if !can_source(source) {
        return Decision::None;
    }
    let source_is_primary = source.role == Role::Primary;
    if !source_is_primary
        && (source.connected_to_other_primary || target.connected_to_other_primary)
    {
        return Decision::None;
    }
    if !target.lineage.contains(target.known)
        && !source.lineage.contains(target.known)
        && !target.needs_full_sync
        && !target.discard_my_data
    {
        // The target took a generation it is behind in (recorded it, then
        // was that generation's resync target and lost the source before
        // the end): it may hold writes acknowledged in it. A source whose
        // history lacks that generation lacks those writes and must not
        // overwrite them; rule (d) already keeps both from promotion.
        return Decision::None;
    }
    if target.role == Role::Primary && relation == Relation::Equal {
        // A Primary is never the target of a peer with the same history.
        return Decision::None;
    }
    Decision::Sync {
        source: source.id,
        target: target.id,
        full: target.needs_full_sync || target.discard_my_data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn side(id: u8, gens: &[u64]) -> Side {
        let mut lineage = Lineage::initial();
        for &g in gens {
            if lineage.current != Generation(g) {
                lineage.advance(Generation(g));
            }
        }
        Side {
            id,
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            lineage,
            primary_crashed: false,
            needs_full_sync: false,
            connected_to_other_primary: false,
            discard_my_data: false,
            known: Generation::INITIAL,
            wrote_in_generation: false,
        }
    }

    #[test]
    fn a_node_behind_a_generation_it_knows_takes_only_a_source_holding_it() {
        // b recorded 7 as a behind voter, then took writes of 7 as its
        // Primary's resync target and lost it; a never saw 7.
        let a = side(0, &[5]);
        let mut b = side(1, &[5]);
        b.disk = DiskState::Outdated;
        b.known = Generation(7);
        assert_eq!(decide(&a, &b), Decision::None);
        assert_eq!(decide(&b, &a), Decision::None);
        let holder = side(0, &[5, 7]);
        assert_eq!(
            decide(&holder, &b),
            Decision::Sync {
                source: 0,
                target: 1,
                full: false
            }
        );
        // Its own failed generation is in its history: no restriction.
        let mut failed = side(1, &[5]);
        failed.lineage.history.insert(0, Generation(8));
        failed.known = Generation(8);
        let newer = side(0, &[5, 9]);
        assert_eq!(
            decide(&newer, &failed),
            Decision::Sync {
                source: 0,
                target: 1,
                full: false
            }
        );
    }

    #[test]
    fn equal_generations_sync_from_the_node_that_wrote_in_it() {
        // b started generation 6 and wrote in it; a joined 6 by a resync
        // from a third node and has missed b's writes since.
        let a = side(0, &[5, 6]);
        let mut b = side(1, &[5, 6]);
        b.wrote_in_generation = true;
        let from_writer = Decision::Sync {
            source: 1,
            target: 0,
            full: false,
        };
        assert_eq!(decide(&a, &b), from_writer);
        assert_eq!(decide(&b, &a), from_writer);
        b.wrote_in_generation = false;
        assert_eq!(
            decide(&a, &b),
            Decision::Sync {
                source: 0,
                target: 1,
                full: false
            },
            "nobody wrote: the lower id"
        );
    }

    #[test]
    fn older_generation_is_the_target() {
        let a = side(0, &[5, 6]);
        let b = side(1, &[5]);
        assert_eq!(
            decide(&a, &b),
            Decision::Sync {
                source: 0,
                target: 1,
                full: false
            }
        );
        assert_eq!(decide(&b, &a), decide(&a, &b));
    }

    #[test]
    fn diverged_is_split_brain_unless_a_side_discards() {
        let mut a = side(0, &[5, 6]);
        let b = side(1, &[5, 7]);
        assert_eq!(decide(&a, &b), Decision::SplitBrain);
        a.discard_my_data = true;
        assert_eq!(
            decide(&a, &b),
            Decision::Sync {
                source: 1,
                target: 0,
                full: true
            }
        );
    }

    #[test]
    fn a_fresh_node_is_fully_synced_from_the_cluster() {
        let a = side(0, &[5, 6]);
        let mut b = side(1, &[]);
        b.disk = DiskState::Inconsistent;
        b.needs_full_sync = true;
        assert_eq!(
            decide(&a, &b),
            Decision::Sync {
                source: 0,
                target: 1,
                full: true
            }
        );
    }

    #[test]
    fn equal_prefers_the_primary_then_the_crashed_primary() {
        let mut a = side(0, &[5]);
        let mut b = side(1, &[5]);
        b.role = Role::Primary;
        assert_eq!(
            decide(&a, &b),
            Decision::Sync {
                source: 1,
                target: 0,
                full: false
            }
        );
        b.role = Role::Secondary;
        b.primary_crashed = true;
        assert_eq!(
            decide(&a, &b),
            Decision::Sync {
                source: 1,
                target: 0,
                full: false
            }
        );
        b.primary_crashed = false;
        assert_eq!(
            decide(&a, &b),
            Decision::Sync {
                source: 0,
                target: 1,
                full: false
            }
        );
        a.disk = DiskState::Inconsistent;
        assert_eq!(
            decide(&a, &b),
            Decision::Sync {
                source: 1,
                target: 0,
                full: false
            }
        );
    }

    #[test]
    fn only_up_to_date_nodes_source_and_only_the_primary_while_one_is_near() {
        let mut a = side(0, &[5, 6]);
        let b = side(1, &[5]);
        a.disk = DiskState::Inconsistent;
        assert_eq!(
            decide(&a, &b),
            Decision::None,
            "an Inconsistent newer node sources nothing"
        );
        a.disk = DiskState::UpToDate;
        let mut b = b;
        b.connected_to_other_primary = true;
        assert_eq!(
            decide(&a, &b),
            Decision::None,
            "rule F: the Primary resyncs b"
        );
    }

    /// A side whose lineage is a shared prefix plus a suffix of its own
    /// (generation ids are unique, as random 64-bit ids are).
    fn arb_side(id: u8) -> impl Strategy<Value = Side> {
        (
            0u64..4,
            0u64..3,
            prop::sample::select(vec![
                DiskState::UpToDate,
                DiskState::Inconsistent,
                DiskState::Outdated,
                DiskState::Consistent,
            ]),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u64..3,
        )
            .prop_map(
                move |(shared, own, disk, primary, crashed, full, near, known)| {
                    let gens: Vec<u64> = (1..=shared)
                        .chain((1..=own).map(|g| u64::from(id + 1) * 100 + g))
                        .collect();
                    let mut s = side(id, &gens);
                    s.disk = disk;
                    s.role = if primary {
                        Role::Primary
                    } else {
                        Role::Secondary
                    };
                    s.primary_crashed = crashed;
                    s.needs_full_sync = full;
                    s.connected_to_other_primary = near;
                    // Its own current generation, a shared one, or one it
                    // recorded from a third node without taking it.
                    s.known = match known {
                        0 => s.lineage.current,
                        1 => Generation(shared),
                        _ => Generation(900 + u64::from(id)),
                    };
                    s
                },
            )
    }

    proptest! {
        /// Both sides agree, and every source is a valid one.
        #[test]
        fn symmetric_and_safe(a in arb_side(0), b in arb_side(1)) {
            let d = decide(&a, &b);
            prop_assert_eq!(d, decide(&b, &a));
            if let Decision::Sync { source, target, .. } = d {
                let (s, t) = if source == a.id { (&a, &b) } else { (&b, &a) };
                prop_assert_eq!(t.id, target);
                prop_assert!(can_source(s));
                // A target never holds a newer generation than its source.
                prop_assert_ne!(t.lineage.relation_to(&s.lineage), Relation::Newer);
                if s.role != Role::Primary {
                    prop_assert!(!s.connected_to_other_primary && !t.connected_to_other_primary);
                }
                if !t.needs_full_sync && !t.discard_my_data {
                    prop_assert!(
                        t.lineage.contains(t.known) || s.lineage.contains(t.known)
                    );
                }
            }
        }
    }
}
