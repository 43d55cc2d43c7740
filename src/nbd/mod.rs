//! The NBD front end (docs/design.md, "The NBD front end"): the server speaks the protocol itself
//! — fixed newstyle handshake, structured replies, `base:allocation`,
//! pipelined requests with replies in completion order, many connections.
//!
//! - [`proto`]: wire constants and pure codecs (fuzzed).
//! - [`handshake`]: option haggling up to the transmission phase.
//! - [`transmission`]: one connection's request loop.
//! - [`server`]: listeners, connection limits, and the [`Clients`] registry
//!   the cluster core consults ("are NBD clients attached?").

pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;

use std::future::Future;

pub use server::{Clients, NbdServer};

use crate::volume::ExportInfo;

/// Whether, and how, a client may attach to the export. The cluster side
/// implements it; the handshake only asks.
pub trait ExportPolicy: Send + Sync {
    /// The export's name (the resource name).
    fn export_name(&self) -> &str;
    /// A line for `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String;
    /// `OPT_INFO`: what attaching would give, without side effects.
    fn probe(&self) -> Result<ExportInfo, String>;
    /// `OPT_GO` / `OPT_EXPORT_NAME`: the client is about to enter the
    /// transmission phase (auto-promote may act here).
    fn attach(&self) -> impl Future<Output = Result<ExportInfo, String>> + Send;
}
