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
///   (create-md) Inconsistent ──resync done──▶ UpToDate ◀──┐
///                    ▲                          │  ▲       │ quorum says current
///                    │ resync starts            │  │       │
///               Outdated ◀── newer generation ──┘  │   Consistent (restarted)
///                    └──────── resync done ────────┘
///   any ──I/O error──▶ Diskless (detached)
/// ```
/// `Failed` is what a peer whose disk failed may report; this node goes
/// straight to `Diskless`. `DUnknown` is a peer's disk we cannot see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    Diskless,
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
///        └─────────── disconnect / split-brain ──────────┘
/// ```
/// A disconnect closes the session at once: there is no `Disconnecting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    StandAlone,
    Connecting,
    Connected,
}

/// Replication with one peer, once connected. A resync is never paused
/// (its rate is limited instead), so there are no `PausedSync` states; the
/// node an online verify runs against serves hashes from its session and
/// stays `Established`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationState {
    Off,
    Established,
    SyncSource,
    SyncTarget,
    VerifyS,
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

impl DiskState {
    /// Whether this node's own disk may go from `self` to `to`: the
    /// diagram above, as code. Every change of the local disk state is
    /// checked against it; a change it refuses is a bug that would record
    /// data as something it is not, and stops the node.
    pub fn may_become(self, to: DiskState) -> bool {
        use DiskState::*;
        match (self, to) {
            (from, to) if from == to => true,
            // Detaching is always possible; coming back needs an attach,
            // which this version does not do.
            (_, Diskless) => true,
            (Diskless, _) => false,
            // A resync target, or `invalidate`.
            (_, Inconsistent) => true,
            // A peer recorded a generation this node is behind in, or a
            // restarted node learned it is behind.
            (Consistent | UpToDate, Outdated) => true,
            // A finished resync, `primary --force`, skip-initial-sync, or a
            // restarted node learned it is current.
            (Inconsistent | Outdated | Consistent, UpToDate) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DiskState::{self, *};

    const ALL: [DiskState; 7] = [
        Diskless,
        Inconsistent,
        Outdated,
        Consistent,
        UpToDate,
        Failed,
        DUnknown,
    ];

    #[test]
    fn a_detached_disk_never_becomes_data_again_without_an_attach() {
        for to in ALL {
            assert_eq!(Diskless.may_become(to), to == Diskless, "Diskless -> {to}");
            assert!(to.may_become(Diskless), "{to} -> Diskless");
        }
    }

    #[test]
    fn data_becomes_current_only_from_a_state_with_data() {
        for from in ALL {
            let allowed = matches!(from, Inconsistent | Outdated | Consistent | UpToDate);
            assert_eq!(from.may_become(UpToDate), allowed, "{from} -> UpToDate");
        }
        assert!(
            !Inconsistent.may_become(Outdated),
            "half-written data is never Outdated"
        );
        for from in ALL {
            assert!(
                from == Consistent || !from.may_become(Consistent),
                "{from} -> Consistent (only a restart makes it)"
            );
            assert!(
                from == DUnknown || !from.may_become(DUnknown),
                "{from} -> DUnknown"
            );
        }
    }
}
