//! Roles, states, quorum, generations and split-brain rules.
//!
//! - [`core`]: the single task that owns this node's state and decides;
//!   `peers.rs` holds its per-peer handlers (connect, exchange, resync),
//!   `roles.rs` promotion, demotion, generations and quorum; both only
//!   add methods to the core. `peer_state.rs` and `phase.rs` hold the
//!   state they change.
//! - [`promotion`]: the promotion rules (a)–(d), a pure function.
//! - [`sync_rules`]: who resyncs whom when two data nodes meet.
//! - [`voter`]: whether a voter records another node's new generation,
//!   and what that does to its data.
//!
//! The states and generations it decides with live in
//! [`crate::vocabulary`], shared with the wire format.

pub mod core;
mod effects;
mod jobs;
pub mod lease;
mod peer_state;
mod peers;
mod phase;
pub mod promotion;
mod roles;
pub use roles::abandon_interrupted_generation;
pub mod sync_rules;
#[cfg(test)]
mod tests;
pub mod voter;
