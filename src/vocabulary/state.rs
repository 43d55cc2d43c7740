//! The states (docs/design.md, "States"), with DRBD's names so that DRBD
//! users feel at home. Liveness (connection), data (disk) and role are separate enums, as
//! they change for separate reasons.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The role of a node.
///
/// ```text
///            primary (rules a-d, new generation recorded)
///   Secondary ─────────────────────────────────────────▶ Primary
///       ▲                                                   │
///       └──────── secondary / down / newer generation ──────┘
/// ```
/// `Unknown` is only ever the role of a peer we cannot see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
    Unknown,
}

/// The state of a disk (ours, or a peer's as we know it).
///
/// ```text
///   Attaching ──▶ Inconsistent ──resync done──▶ UpToDate ◀──┐
///       │              ▲                          │  ▲       │ quorum says current
///       │              │ resync starts            │  │       │
///       ├──▶ Outdated ─┘◀── newer generation ─────┘  │   Consistent (restarted alone)
///       │                                            │
///       └──▶ Consistent ─────────────────────────────┘
///   any ──I/O error──▶ Failed ──detach──▶ Diskless
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    Diskless,
    Attaching,
    Inconsistent,
    Outdated,
    Consistent,
    UpToDate,
    Failed,
    DUnknown,
}

/// A connection to one peer.
///
/// ```text
///   StandAlone ──connect──▶ Connecting ──handshake──▶ Connected
///        ▲                      ▲                        │
///        │                      └──── lost / refused ────┤
///        └─────────── disconnect / split-brain ──────────┘ (via Disconnecting)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    StandAlone,
    Connecting,
    Connected,
    Disconnecting,
}

/// Replication with one peer, once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationState {
    Off,
    Established,
    SyncSource,
    SyncTarget,
    PausedSyncS,
    PausedSyncT,
    VerifyS,
    VerifyT,
}

macro_rules! display_as_debug {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    )*};
}
display_as_debug!(Role, DiskState, ConnectionState, ReplicationState);
