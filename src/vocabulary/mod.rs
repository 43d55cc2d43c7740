//! The words every layer shares, at the bottom of the module graph:
//! [`state`] (roles, disk, connection and replication states with DRBD's
//! names), [`generation`] (generation ids and how two lineages relate) and
//! [`node`] (node ids and sets of them).
//! They import nothing from the crate, so `cluster` (which decides with
//! them) and `replication` (which carries them on the wire) both depend on
//! this module and never on each other for them.

pub mod generation;
pub mod node;
pub mod state;
