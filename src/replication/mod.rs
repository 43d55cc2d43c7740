//! Peer wire format, connections, write streaming, resync, verify.

pub mod wire;
