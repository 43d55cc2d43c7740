//! Node ids and sets of them.
//!
//! A node id names a bitmap slot on disk and a bit in every set of nodes
//! (which peers a write was sent to, which voters answered): 0..=31, so a
//! set is one `u32`, copied freely and sent on the wire as is.

use std::fmt;

/// Node ids must stay stable (they name bitmap slots on disk): 0..=31.
pub const MAX_NODE_ID: u8 = 31;
/// One more than the largest id: no resource can have more nodes than this.
pub const MAX_NODES: usize = MAX_NODE_ID as usize + 1;

/// A set of node ids.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct NodeSet(u32);

impl NodeSet {
    pub const EMPTY: NodeSet = NodeSet(0);

    /// The set as a bit mask (bit `id` for node `id`), as the wire carries it.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Every `u32` is a valid set: each bit names an id in 0..=31.
    pub fn from_bits(bits: u32) -> NodeSet {
        NodeSet(bits)
    }

    pub fn of(id: u8) -> NodeSet {
        let mut set = NodeSet::EMPTY;
        set.insert(id);
        set
    }

    /// Adds `id`; an id beyond [`MAX_NODE_ID`] is a bug (config validation
    /// refuses one), and stops the node rather than alias another id.
    pub fn insert(&mut self, id: u8) {
        assert!(id <= MAX_NODE_ID, "node id {id} is beyond {MAX_NODE_ID}");
        self.0 |= 1 << id;
    }

    pub fn remove(&mut self, id: u8) {
        if id <= MAX_NODE_ID {
            self.0 &= !(1 << id);
        }
    }

    pub fn contains(self, id: u8) -> bool {
        id <= MAX_NODE_ID && self.0 & (1 << id) != 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The ids in `self` and not in `other`.
    pub fn without(self, other: NodeSet) -> NodeSet {
        NodeSet(self.0 & !other.0)
    }

    /// Ids in increasing order.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0..=MAX_NODE_ID).filter(move |&id| self.contains(id))
    }
}

impl FromIterator<u8> for NodeSet {
    fn from_iter<I: IntoIterator<Item = u8>>(ids: I) -> NodeSet {
        let mut set = NodeSet::EMPTY;
        for id in ids {
            set.insert(id);
        }
        set
    }
}

impl fmt::Debug for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A set built from ids holds exactly those ids, and its mask
        /// round-trips through the wire form.
        #[test]
        fn a_set_holds_exactly_its_ids(ids in prop::collection::vec(0..=MAX_NODE_ID, 0..40)) {
            let set: NodeSet = ids.iter().copied().collect();
            let mut expected = ids.clone();
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), expected.clone());
            prop_assert_eq!(set.len(), expected.len());
            prop_assert_eq!(NodeSet::from_bits(set.bits()), set);
            for id in 0..=MAX_NODE_ID {
                prop_assert_eq!(set.contains(id), expected.contains(&id));
                let mut less = set;
                less.remove(id);
                prop_assert!(!less.contains(id));
                prop_assert_eq!(less, set.without(NodeSet::of(id)));
            }
        }
    }

    #[test]
    fn ids_beyond_the_limit_are_never_members() {
        assert!(!NodeSet::from_bits(u32::MAX).contains(MAX_NODE_ID + 1));
        assert_eq!(NodeSet::from_bits(u32::MAX).len(), MAX_NODES);
    }
}
