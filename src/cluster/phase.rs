//! Where this node stands in its role: one enum, so that "promoting while
//! demoting" or "serving while a record is pending" cannot be written down.
//!
//! ```text
//!               primary                rules a-d passed
//!   Secondary ───────────▶ Promoting ──────────────────▶ Recording ◀─────────┐
//!       ▲  ▲                   │ refused                  │     │ peer lost  │
//!       │  └───────────────────┘           recorded │     │     │ (rule A)   │
//!       │                                           ▼     │     │            │
//!       │                              Serving ◀──────────┘     │ failed     │
//!       │                                 │ quorum lost         ▼            │
//!       │                                 └────────────▶ WithoutQuorum ──────┘
//!       │                                                 quorum back
//!       └── Demoting ◀── secondary / down (from any Primary phase)
//! ```
//! Every Primary phase may also step down at once on meeting newer data,
//! and a promotion whose record fails goes straight back to Secondary.

use tokio::sync::oneshot;

use crate::control::server::CoreReply;
use crate::vocabulary::generation::Generation;
use crate::vocabulary::node::NodeSet;
use crate::vocabulary::state::Role;

/// The role and, while Primary, what its writes do; a promotion's data
/// lives in its variant.
#[derive(Debug)]
pub(super) enum RolePhase {
    Secondary,
    /// Asking every node afresh and checking rules (a)–(d); still a
    /// Secondary to everyone else.
    Promoting(Promotion),
    Primary(PrimaryPhase),
    /// Clients drain and the disk is flushed before it becomes Secondary.
    /// The demotion's callers live in `Core::demotion`: it may step down
    /// at once meanwhile (meeting newer data), and the drain still ends it.
    Demoting,
}

/// A promotion under way (asking every node afresh, waiting out leases).
#[derive(Debug)]
pub(super) struct Promotion {
    pub token: u64,
    pub force: bool,
    pub override_quorum: bool,
    pub callers: Vec<oneshot::Sender<CoreReply>>,
    /// Peers asked and not yet answered.
    pub waiting: NodeSet,
    /// The longest lease wait any voter reported.
    pub lease_wait_ms: u64,
    pub started: tokio::time::Instant,
    /// When to ask again (rule (b) retry, lease wait).
    pub retry_at: Option<tokio::time::Instant>,
    /// Asked for by an attaching NBD client (auto-promote).
    pub auto: bool,
    /// The newest generation this node knew when the promotion started: if
    /// it changes meanwhile, another node was promoted.
    pub known_at_start: Generation,
}

/// What a Primary's writes do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PrimaryPhase {
    /// A new generation is being recorded on the voters: writes wait.
    Recording,
    /// Its generation is recorded on a majority: writes are acknowledged.
    Serving,
    /// Its generation is not (or no longer) backed by a majority: writes
    /// fail or wait (`on-no-quorum`) until a new one is recorded, tried no
    /// sooner than `retry_at`.
    WithoutQuorum {
        retry_at: Option<tokio::time::Instant>,
    },
}

/// A phase without its data: what transitions are checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    Secondary,
    Promoting,
    Recording,
    Serving,
    WithoutQuorum,
    Demoting,
}

impl PhaseKind {
    #[cfg(test)]
    pub const ALL: [PhaseKind; 6] = [
        PhaseKind::Secondary,
        PhaseKind::Promoting,
        PhaseKind::Recording,
        PhaseKind::Serving,
        PhaseKind::WithoutQuorum,
        PhaseKind::Demoting,
    ];

    /// Whether a node may go from `self` to `next` (staying is always
    /// allowed: a superseded record, a retry moved).
    pub fn may_become(self, next: PhaseKind) -> bool {
        use PhaseKind::*;
        self == next
            || matches!(
                (self, next),
                (Secondary, Promoting)
                    | (Promoting, Secondary | Recording)
                    | (Recording, Serving | WithoutQuorum)
                    | (Serving | WithoutQuorum, Recording)
                    | (Serving, WithoutQuorum)
                    | (Recording | Serving | WithoutQuorum, Demoting | Secondary)
                    | (Demoting, Secondary)
            )
    }

    pub fn role(self) -> Role {
        match self {
            PhaseKind::Secondary | PhaseKind::Promoting => Role::Secondary,
            _ => Role::Primary,
        }
    }
}

impl RolePhase {
    pub(super) fn kind(&self) -> PhaseKind {
        match self {
            RolePhase::Secondary => PhaseKind::Secondary,
            RolePhase::Promoting(_) => PhaseKind::Promoting,
            RolePhase::Primary(PrimaryPhase::Recording) => PhaseKind::Recording,
            RolePhase::Primary(PrimaryPhase::Serving) => PhaseKind::Serving,
            RolePhase::Primary(PrimaryPhase::WithoutQuorum { .. }) => PhaseKind::WithoutQuorum,
            RolePhase::Demoting => PhaseKind::Demoting,
        }
    }

    /// The role peers and operators see: a demoting node is Primary until
    /// its disk is flushed.
    pub(super) fn role(&self) -> Role {
        self.kind().role()
    }
}

#[cfg(test)]
mod tests {
    use super::PhaseKind::{self, *};
    use crate::vocabulary::state::Role;

    const ALL: [PhaseKind; 6] = PhaseKind::ALL;

    #[test]
    fn writes_are_acknowledged_only_after_a_record() {
        for from in ALL {
            if from != Recording && from != Serving {
                assert!(!from.may_become(Serving), "{from:?} -> Serving");
            }
        }
    }

    #[test]
    fn a_primary_is_made_only_by_a_promotion() {
        for from in ALL {
            for to in ALL {
                let becomes_primary = from.role() == Role::Secondary && to.role() == Role::Primary;
                if becomes_primary && from.may_become(to) {
                    assert_eq!((from, to), (Promoting, Recording));
                }
            }
        }
    }

    #[test]
    fn a_demotion_ends_only_as_secondary() {
        for to in ALL {
            assert_eq!(Demoting.may_become(to), to == Demoting || to == Secondary);
        }
    }
}
