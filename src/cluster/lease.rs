//! The Primary's lease (docs/design.md, "Leases"): no stale reads.
//!
//! A Primary may serve I/O only while a majority of voters (itself
//! included) has recently acknowledged its heartbeat. The lease runs from
//! the moment the Primary *sent* the heartbeat that the last needed voter
//! acknowledged, for 0.8 × the ping timeout. A voter, for its part, backs
//! no new Primary until the full ping timeout has passed since it last
//! acknowledged the old one — so the old Primary's lease has always expired
//! before a new one can be elected, even if the old one is merely slow or
//! cut off rather than dead.
//!
//! The voter's promise has two more halves, kept by the cluster core: an
//! answer renews a peer's lease only while the voter has recorded no
//! generation that supersedes the peer's (`Pong::lease_granted`), and a
//! voter records no new generation while a Primary whose lease it renewed
//! within the ping timeout would be superseded by it. A restarted voter
//! keeps no record of its grants, so it holds promotions ([`StartHold`]).
//!
//! Sessions record per link when the newest answered heartbeat was sent;
//! [`Lease::renewed`] recomputes the deadline; the I/O path only compares
//! the clock with an atomic.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::replication::link::PeerLink;

/// Where the lease clock starts: far from zero, so that a timestamp of 0
/// ("never": no heartbeat answered, no lease granted) is always long past,
/// even in a daemon's first seconds.
const CLOCK_START: Duration = Duration::from_secs(3600);

/// Nanoseconds since this process's first call, plus `CLOCK_START`: a
/// monotonic clock that fits an atomic.
#[cfg(not(test))]
pub fn now_nanos() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    nanos(CLOCK_START + epoch.elapsed())
}

#[cfg(test)]
thread_local! {
    /// When the test clock last started (see `restart_test_clock`).
    static TEST_EPOCH: std::cell::Cell<Option<tokio::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// In unit tests the lease clock is tokio's, which a test can pause and
/// advance, counted from the test thread's first call: leases and lease
/// waits expire when the test says so, not when the machine gets to it.
#[cfg(test)]
pub fn now_nanos() -> u64 {
    let now = tokio::time::Instant::now();
    let epoch = TEST_EPOCH.with(|epoch| {
        let started = epoch.get().unwrap_or(now);
        epoch.set(Some(started));
        started
    });
    nanos(CLOCK_START + now.saturating_duration_since(epoch))
}

/// Starts this thread's lease clock again at `CLOCK_START`: each
/// simulated history reads the same times whatever ran before it, so a
/// seed replays alone as it ran in a campaign.
#[cfg(test)]
pub fn restart_test_clock() {
    TEST_EPOCH.with(|epoch| epoch.set(Some(tokio::time::Instant::now())));
}

/// `duration` in nanoseconds, saturating: the unit of the lease clock.
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A node that just started may have renewed a Primary's lease just before
/// it went down, and has no record of it: it backs no promotion for one
/// ping timeout, or until every peer has reported on a new connection (a
/// Primary drops the grants of a link once a new connection replaces it).
#[derive(Debug)]
pub struct StartHold {
    until_nanos: u64,
    unheard: BTreeSet<u8>,
}

impl StartHold {
    /// No hold when leases are not enforced.
    pub fn new(
        ping_timeout: Duration,
        quorum_enforced: bool,
        peers: impl Iterator<Item = u8>,
    ) -> StartHold {
        let until_nanos = now_nanos().saturating_add(nanos(ping_timeout));
        StartHold {
            until_nanos,
            unheard: if quorum_enforced {
                peers.collect()
            } else {
                BTreeSet::new()
            },
        }
    }

    /// The peer reported on a connection made since this node started.
    pub fn heard(&mut self, peer: u8) {
        self.unheard.remove(&peer);
    }

    /// Until when promotions wait (0: no wait).
    pub fn until_nanos(&self) -> u64 {
        if self.unheard.is_empty() {
            0
        } else {
            self.until_nanos
        }
    }
}

/// A lease lasts this fraction of the ping timeout.
pub const LEASE_FRACTION: f64 = 0.8;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lease of this node (meaningful while it is Primary).
#[derive(Debug)]
pub struct Lease {
    /// Off with `quorum = "off"`, an override, or a single voter.
    enforce: AtomicBool,
    /// Voter peers whose acknowledgement is needed (majority − 1).
    peers_needed: AtomicUsize,
    voters: Mutex<Vec<Arc<PeerLink>>>,
    deadline_nanos: AtomicU64,
    duration: Duration,
    renewed: Notify,
}

impl Lease {
    pub fn new(ping_timeout: Duration) -> Lease {
        Lease {
            enforce: AtomicBool::new(false),
            peers_needed: AtomicUsize::new(0),
            voters: Mutex::new(Vec::new()),
            deadline_nanos: AtomicU64::new(0),
            duration: ping_timeout.mul_f64(LEASE_FRACTION),
            renewed: Notify::new(),
        }
    }

    /// The core sets which voter links count and how many are needed.
    pub fn configure(&self, voters: Vec<Arc<PeerLink>>, peers_needed: usize, enforce: bool) {
        *lock(&self.voters) = voters;
        self.peers_needed.store(peers_needed, Ordering::Relaxed);
        self.enforce
            .store(enforce && peers_needed > 0, Ordering::Relaxed);
        self.renewed();
    }

    /// A heartbeat was answered: recompute the deadline.
    pub fn renewed(&self) {
        let needed = self.peers_needed.load(Ordering::Relaxed);
        let mut confirmed: Vec<u64> = lock(&self.voters)
            .iter()
            .filter(|link| !link.is_closed())
            .map(|link| link.confirmed_heartbeat_nanos())
            .collect();
        confirmed.sort_unstable_by(|a, b| b.cmp(a));
        let deadline = match needed {
            0 => u64::MAX,
            n => confirmed
                .get(n - 1)
                .filter(|&&t| t > 0)
                .map_or(0, |&t| t.saturating_add(nanos(self.duration))),
        };
        self.deadline_nanos.store(deadline, Ordering::Relaxed);
        self.renewed.notify_waiters();
    }

    /// Whether I/O may be served right now.
    pub fn valid(&self) -> bool {
        !self.enforce.load(Ordering::Relaxed)
            || now_nanos() < self.deadline_nanos.load(Ordering::Relaxed)
    }

    /// Remaining lease time, for status.
    pub fn remaining(&self) -> Option<Duration> {
        if !self.enforce.load(Ordering::Relaxed) {
            return None;
        }
        let left = self
            .deadline_nanos
            .load(Ordering::Relaxed)
            .saturating_sub(now_nanos());
        Some(Duration::from_nanos(left))
    }

    /// Waits until the lease is valid again, at most `max`.
    pub async fn wait_valid(&self, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let renewed = self.renewed.notified();
            if self.valid() {
                return true;
            }
            if tokio::time::timeout_at(deadline, renewed).await.is_err() {
                return self.valid();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_voter_holds_until_every_peer_reported_again() {
        let mut hold = StartHold::new(Duration::from_secs(1), true, [1, 2].into_iter());
        let until = hold.until_nanos();
        assert!(
            until > now_nanos(),
            "holds for a ping timeout from the start"
        );
        hold.heard(1);
        assert_eq!(
            hold.until_nanos(),
            until,
            "peer 2 may still count an old grant"
        );
        hold.heard(2);
        assert_eq!(hold.until_nanos(), 0);
        let off = StartHold::new(Duration::from_secs(1), false, [1, 2].into_iter());
        assert_eq!(off.until_nanos(), 0, "no leases, no hold");
    }

    #[tokio::test]
    async fn lease_needs_a_majority_of_fresh_heartbeats() {
        let lease = Lease::new(Duration::from_millis(500));
        assert!(lease.valid(), "not enforced until configured");
        let (a, _qa) = PeerLink::new(1, "a".into());
        let (b, _qb) = PeerLink::new(2, "b".into());
        let (a, b) = (Arc::new(a), Arc::new(b));
        lease.configure(vec![a.clone(), b.clone()], 1, true);
        assert!(!lease.valid(), "no heartbeat answered yet");
        a.heartbeat_confirmed(now_nanos());
        lease.renewed();
        assert!(lease.valid());
        lease.configure(vec![a.clone(), b.clone()], 2, true);
        assert!(!lease.valid(), "two peers needed, one answered");
        b.heartbeat_confirmed(now_nanos());
        lease.renewed();
        assert!(lease.valid());
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(!lease.valid(), "expires after 0.8 x ping timeout");
        lease.configure(vec![], 0, true);
        assert!(lease.valid(), "a single voter needs nobody");
    }
}
