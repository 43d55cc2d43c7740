//! The promotion rules (docs/design.md, "Promotion"), as one pure function.
//!
//! A node may become Primary only if
//! (a) it has quorum,
//! (b) no node it sees is Primary or reports a connection to a Primary,
//! (c) its disk is UpToDate, and
//! (d) no node it sees, itself included, knows a generation newer than its
//!     data generation (the witness counts: it remembers the newest
//!     generation it recorded).
//!
//! `--force` overrides (c) and (d) but is refused while a visible data node
//! is UpToDate or holds a newer data generation; `--override-quorum`
//! overrides (a) only. Each refusal says what is missing and what would fix
//! it.

use std::fmt;

use crate::config::QuorumMode;
use crate::vocabulary::state::DiskState;

/// What the cluster-wide check found, fresh from every connected node.
#[derive(Debug, Clone)]
pub struct PromotionInput<'a> {
    pub quorum_mode: QuorumMode,
    /// Voters in the config, witnesses included.
    pub voters_total: usize,
    /// Voters this node is connected to, itself included.
    pub voters_seen: &'a [&'a str],
    pub override_quorum: bool,
    pub force: bool,
    pub disk: DiskState,
    /// A visible node that is Primary, or that reports a connection to
    /// one: (node, the Primary it names).
    pub primary_seen: Option<(&'a str, &'a str)>,
    /// A visible node (or this one) that knows a newer generation than
    /// this node's data generation.
    pub newer_generation_seen: Option<&'a str>,
}

/// Why a promotion was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromotionRefusal {
    NoQuorum {
        seen: Vec<String>,
        total: usize,
        needs: usize,
    },
    PrimaryExists {
        reporter: String,
        primary: String,
    },
    DiskNotUpToDate(DiskState),
    NewerGeneration(String),
}

impl fmt::Display for PromotionRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromotionRefusal::NoQuorum { seen, total, needs } => write!(
                f,
                "refused: no quorum (sees {} of {total} voters: {}); needs {needs}. \
                 Reconnect the other nodes, or accept split-brain risk with \
                 `primary --override-quorum`",
                seen.len(),
                seen.join(", ")
            ),
            PromotionRefusal::PrimaryExists { reporter, primary } if reporter == primary => write!(
                f,
                "refused: {primary} is Primary; demote it first (`hablk secondary` on {primary})"
            ),
            PromotionRefusal::PrimaryExists { reporter, primary } => write!(
                f,
                "refused: {reporter} is connected to Primary {primary}; demote {primary} first, \
                 or wait until {reporter} loses it"
            ),
            PromotionRefusal::DiskNotUpToDate(DiskState::Consistent) => write!(
                f,
                "refused: disk is Consistent (restarted; not yet known whether current), needs \
                 UpToDate; it is decided when this node meets a quorum — bring the other nodes up"
            ),
            PromotionRefusal::DiskNotUpToDate(DiskState::Outdated) => write!(
                f,
                "refused: disk is Outdated (a newer generation exists elsewhere), needs UpToDate; \
                 promote the node with the newest data, or accept losing data with `primary --force`"
            ),
            PromotionRefusal::DiskNotUpToDate(disk) => write!(
                f,
                "refused: disk is {disk}, needs UpToDate; wait for the resync (`hablk wait-sync`), \
                 or accept this node's data as current with `primary --force` (first sync, disaster)"
            ),
            PromotionRefusal::NewerGeneration(who) => write!(
                f,
                "refused: {who} knows a newer generation than this node's data; promote the node \
                 holding the newest data, wait for the old Primary to return, or accept losing \
                 data with `primary --force`"
            ),
        }
    }
}

/// Strict majority of `total` voters.
pub fn majority(total: usize) -> usize {
    total / 2 + 1
}

/// Checks rules (a)–(d) with the overrides.
pub fn check(input: &PromotionInput<'_>) -> Result<(), PromotionRefusal> {
    let needs = majority(input.voters_total);
    let quorum = match input.quorum_mode {
        QuorumMode::Off => true,
        QuorumMode::Majority => input.voters_seen.len() >= needs,
    };
    if !quorum && !input.override_quorum {
        return Err(PromotionRefusal::NoQuorum {
            seen: input.voters_seen.iter().map(|s| s.to_string()).collect(),
            total: input.voters_total,
            needs,
        });
    }
    if let Some((reporter, primary)) = input.primary_seen {
        return Err(PromotionRefusal::PrimaryExists {
            reporter: reporter.to_owned(),
            primary: primary.to_owned(),
        });
    }
    if input.force {
        return Ok(());
    }
    if input.disk != DiskState::UpToDate {
        return Err(PromotionRefusal::DiskNotUpToDate(input.disk));
    }
    if let Some(who) = input.newer_generation_seen {
        return Err(PromotionRefusal::NewerGeneration(who.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(seen: &'a [&'a str]) -> PromotionInput<'a> {
        PromotionInput {
            quorum_mode: QuorumMode::Majority,
            voters_total: 3,
            voters_seen: seen,
            override_quorum: false,
            force: false,
            disk: DiskState::UpToDate,
            primary_seen: None,
            newer_generation_seen: None,
        }
    }

    #[test]
    fn quorum_refusal_names_who_is_seen() {
        let seen = ["alpha"];
        let err = check(&input(&seen)).unwrap_err();
        assert_eq!(
            err.to_string().split(". ").next().unwrap(),
            "refused: no quorum (sees 1 of 3 voters: alpha); needs 2"
        );
        let mut overridden = input(&seen);
        overridden.override_quorum = true;
        assert!(check(&overridden).is_ok());
        let mut off = input(&seen);
        off.quorum_mode = QuorumMode::Off;
        assert!(check(&off).is_ok());
    }

    #[test]
    fn force_does_not_override_quorum_or_a_primary() {
        let seen = ["alpha"];
        let mut forced = input(&seen);
        forced.force = true;
        assert!(matches!(
            check(&forced),
            Err(PromotionRefusal::NoQuorum { .. })
        ));
        let seen = ["alpha", "beta"];
        let mut forced = input(&seen);
        forced.force = true;
        forced.primary_seen = Some(("witness", "beta"));
        assert!(matches!(
            check(&forced),
            Err(PromotionRefusal::PrimaryExists { .. })
        ));
    }

    #[test]
    fn force_overrides_disk_and_generation() {
        let seen = ["alpha", "witness"];
        let mut i = input(&seen);
        i.disk = DiskState::Outdated;
        i.newer_generation_seen = Some("witness");
        assert_eq!(
            check(&i),
            Err(PromotionRefusal::DiskNotUpToDate(DiskState::Outdated))
        );
        i.disk = DiskState::UpToDate;
        assert_eq!(
            check(&i),
            Err(PromotionRefusal::NewerGeneration("witness".into()))
        );
        i.force = true;
        assert!(check(&i).is_ok());
    }
}
