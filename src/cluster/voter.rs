//! A voter's answer to another node's new generation (the compare-and-set
//! of docs/design.md, "Generations"), as pure functions: the core asks
//! them, then withdraws leases, writes the superblock and answers.
//!
//! A voter records a generation only if it is not competing (Primary or
//! promoting), the new lineage descends from the newest generation it knows
//! (`known`), and no other Primary's lease from it may still run. Recording
//! also says what happens to its data: a write target of the sender, in
//! sync with it, takes the generation as its data; an UpToDate node that
//! does not is now behind, so Outdated.

use std::fmt;

use crate::vocabulary::generation::{Generation, Lineage};
use crate::vocabulary::state::DiskState;

/// Why a voter does not record a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It is Primary or being promoted: backing another node would make
    /// a second Primary.
    Competing,
    /// The new lineage does not hold the newest generation this voter
    /// recorded: the sender may lack writes acknowledged in it.
    NotASuccessor { known: Generation },
    /// A Primary (or a node recording its own generation) whose lease from
    /// this voter may still run would be superseded.
    LeaseMayRun { holder: u8 },
    /// A superblock write failed on this node: a vote it cannot record
    /// would be forgotten in a crash.
    CannotRecord,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Competing => write!(f, "this node is Primary or being promoted"),
            Refusal::NotASuccessor { known } => write!(
                f,
                "its lineage does not hold generation {known}, which this node recorded"
            ),
            Refusal::LeaseMayRun { holder } => write!(
                f,
                "node {holder}'s lease from this node may still run and would be superseded"
            ),
            Refusal::CannotRecord => write!(
                f,
                "this node cannot write its superblock (restart it once its disk works)"
            ),
        }
    }
}

/// The checks that need no lease withdrawal. Only when they pass does the
/// core withdraw the leases it would supersede (and refuse with
/// [`Refusal::LeaseMayRun`] if one may still run).
pub fn may_record(
    competing: bool,
    cannot_record: bool,
    known: Generation,
    new: &Lineage,
) -> Result<(), Refusal> {
    if cannot_record {
        Err(Refusal::CannotRecord)
    } else if competing {
        Err(Refusal::Competing)
    } else if !new.contains(known) {
        Err(Refusal::NotASuccessor { known })
    } else {
        Ok(())
    }
}

/// What this voter's data is once it records the generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataAfter {
    /// It takes the new lineage as its data generation.
    Adopted,
    /// It was UpToDate in an older generation: now behind.
    Outdated,
    /// Unchanged (already behind, without data, or the same generation).
    Unchanged,
}

/// This voter, as the record sees it.
#[derive(Debug, Clone, Copy)]
pub struct VoterData {
    pub is_data: bool,
    pub disk: DiskState,
    pub current: Generation,
    /// A resync with the sender is running (or being set up).
    pub resyncing_with_sender: bool,
}

/// The same generation is not the same data: only a write target of the
/// sender (`may_adopt`), UpToDate in the generation the new one descends
/// from and with no resync running with it, holds every write of it.
pub fn data_after(me: VoterData, new: &Lineage, may_adopt: bool) -> DataAfter {
    let parent = new.history.first().copied();
    if me.is_data
        && may_adopt
        && me.disk == DiskState::UpToDate
        && Some(me.current) == parent
        && !me.resyncing_with_sender
    {
        DataAfter::Adopted
    } else if me.current != new.current && me.disk == DiskState::UpToDate {
        DataAfter::Outdated
    } else {
        DataAfter::Unchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lineage(ids: &[u64]) -> Lineage {
        Lineage {
            current: Generation(ids[0]),
            history: ids[1..].iter().map(|&g| Generation(g)).collect(),
        }
    }

    fn disk() -> impl Strategy<Value = DiskState> {
        prop::sample::select(vec![
            DiskState::Diskless,
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::Consistent,
            DiskState::UpToDate,
        ])
    }

    proptest! {
        /// The compare-and-set: a voter records only a lineage holding
        /// what it knows, never while competing, and never once it cannot
        /// write its superblock.
        #[test]
        fn a_record_always_descends_from_what_the_voter_knows(
            ids in prop::collection::vec(0u64..8, 1..6),
            known in 0u64..8,
            competing: bool,
            cannot_record: bool,
        ) {
            let new = lineage(&ids);
            let verdict = may_record(competing, cannot_record, Generation(known), &new);
            prop_assert_eq!(
                verdict.is_ok(),
                !competing && !cannot_record && new.contains(Generation(known))
            );
        }

        /// A voter takes the sender's generation as its data only when it
        /// has all of it; an UpToDate voter that does not take it is
        /// behind; nothing else changes a disk.
        #[test]
        fn only_a_write_target_in_sync_adopts(
            ids in prop::collection::vec(0u64..6, 1..5),
            current in 0u64..6,
            disk in disk(),
            is_data: bool,
            may_adopt: bool,
            resyncing_with_sender: bool,
        ) {
            let new = lineage(&ids);
            let me = VoterData { is_data, disk, current: Generation(current), resyncing_with_sender };
            match data_after(me, &new, may_adopt) {
                DataAfter::Adopted => {
                    prop_assert!(is_data && may_adopt && !resyncing_with_sender);
                    prop_assert_eq!(disk, DiskState::UpToDate);
                    prop_assert_eq!(new.history.first(), Some(&Generation(current)));
                }
                DataAfter::Outdated => {
                    prop_assert_eq!(disk, DiskState::UpToDate);
                    prop_assert_ne!(new.current, Generation(current));
                }
                DataAfter::Unchanged => prop_assert!(
                    disk != DiskState::UpToDate || new.current == Generation(current)
                ),
            }
        }
    }
}
