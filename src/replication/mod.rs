//! Peer wire format, connections, write streaming, resync, verify.
//!
//! - [`wire`]: the versioned frame format (crc32c, bounded length).
//! - [`handshake`]: identities, version, config digest, HMAC auth.
//! - [`connector`]: the full mesh: listening, dialing with backoff.
//! - [`session`]: one connection's loop; applies what a peer sends.
//! - [`link`]: the handle the rest of the node sends through.
//! - [`ordering`]: sequence numbers and overlap ordering of writes.
//! - [`resync`]: bitmap- and hash-driven resync, and online verify.

pub mod connector;
pub mod handshake;
pub mod link;
pub mod ordering;
pub mod resync;
pub mod session;
pub mod wire;
