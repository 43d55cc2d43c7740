//! Roles, states, quorum, generations and split-brain rules.
//!
//! - [`core`]: the single task that owns this node's state and decides;
//!   `peers.rs` holds its per-peer half (connect, exchange, resync).
//! - [`promotion`]: the promotion rules (a)–(d), a pure function.
//! - [`sync_rules`]: who resyncs whom when two data nodes meet.
//! - [`generation`]: generation ids and how two lineages relate.
//! - [`state`]: the state enums with DRBD's names.

pub mod core;
pub mod generation;
pub mod lease;
mod peers;
pub mod promotion;
mod roles;
pub mod state;
pub mod sync_rules;
