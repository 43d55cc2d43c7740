//! The control plane between the CLI and the daemon: a unix socket per
//! node ([`server`], [`client`]), its JSON protocol ([`protocol`]) and the
//! events stream ([`events`]).

pub mod client;
pub mod events;
pub mod protocol;
pub mod server;
