//! Roles, states, quorum, generations and split-brain rules.

pub mod generation;
pub mod state;
