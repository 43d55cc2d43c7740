//! Roles, states, quorum, generations and split-brain rules.
//!
//! - [`core`]: the single task that owns this node's state and decides;
//!   `peers.rs` holds its per-peer half (connect, exchange, resync).
//! - [`promotion`]: the promotion rules (a)–(d), a pure function.
//! - [`sync_rules`]: who resyncs whom when two data nodes meet.
//!
//! The states and generations it decides with live in
//! [`crate::vocabulary`], shared with the wire format.

pub mod core;
pub mod lease;
mod peers;
mod phase;
pub mod promotion;
mod roles;
pub use roles::abandon_interrupted_generation;
pub mod sync_rules;
#[cfg(test)]
mod tests;
