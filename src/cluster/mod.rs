//! Roles, states, quorum, generations and split-brain rules.
//!
//! - [`core`]: the single task that owns this node's state and decides.
//! - [`promotion`]: the promotion rules (a)–(d), a pure function.
//! - [`generation`]: generation ids and how two lineages relate.
//! - [`state`]: the state enums with DRBD's names.

pub mod core;
pub mod generation;
pub mod promotion;
pub mod state;
