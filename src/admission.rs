//! Admission of connections that have not proven themselves yet, shared by
//! the three listeners (NBD clients, peers, the control socket).
//!
//! A listener cannot tell a slow client from a hostile one holding a
//! connection open, so a flood of idle connections must never lock out
//! the real ones. Two tools here:
//!
//! - [`PendingSlots`]: a bounded set of connections still in their
//!   handshake (or, on the control socket, still to send their request).
//!   When it is full, a newcomer takes a slot from whoever holds the most
//!   (by source address, or by process on a unix socket): that owner's
//!   oldest pending connection is told to give up ([`Pending::evicted`]).
//!   A flood from one host or process therefore only ever evicts its own
//!   connections, however fast it reconnects, and a real client, holding
//!   one slot for the milliseconds its handshake takes, keeps it. Each
//!   listener also gives a pending connection only a short time to send
//!   its first bytes.
//! - [`RefusalLog`]: refused connections are logged with a rate limit —
//!   the first few of every interval in full, then one line with how many
//!   more there were and where the first of them came from — so a flood
//!   cannot fill a disk with log lines.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update below is complete before its guard drops.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Who holds a pending connection, for fair eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A TCP connection's source address.
    Host(IpAddr),
    /// A unix socket connection's process (`SO_PEERCRED`).
    Process(i32),
    /// A unix socket peer whose process is not known.
    Unknown,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Host(ip) => write!(f, "{ip}"),
            Owner::Process(pid) => write!(f, "local process {pid}"),
            Owner::Unknown => write!(f, "a local process"),
        }
    }
}

/// The owner of a unix socket connection: its peer process.
pub fn unix_owner(stream: &tokio::net::UnixStream) -> Owner {
    match stream.peer_cred().ok().and_then(|cred| cred.pid()) {
        Some(pid) => Owner::Process(pid),
        None => Owner::Unknown,
    }
}

/// A bounded set of pending connections; see the module docs.
#[derive(Debug)]
pub struct PendingSlots {
    limit: usize,
    queue: Mutex<SlotQueue>,
}

#[derive(Debug, Default)]
struct SlotQueue {
    next_id: u64,
    /// Oldest first.
    pending: VecDeque<(u64, Owner, CancellationToken)>,
}

impl SlotQueue {
    /// The owner holding the most slots (the oldest such on a tie).
    fn biggest_owner(&self) -> Option<Owner> {
        let mut counts: HashMap<Owner, usize> = HashMap::new();
        for (_, owner, _) in &self.pending {
            *counts.entry(*owner).or_default() += 1;
        }
        let most = counts.values().copied().max()?;
        self.pending
            .iter()
            .map(|(_, owner, _)| *owner)
            .find(|owner| counts.get(owner) == Some(&most))
    }
}

/// One pending connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Pending {
    slots: Arc<PendingSlots>,
    id: u64,
    evicted: CancellationToken,
}

impl PendingSlots {
    pub fn new(limit: usize) -> Arc<PendingSlots> {
        assert!(limit > 0, "a listener needs at least one pending slot");
        Arc::new(PendingSlots {
            limit,
            queue: Mutex::new(SlotQueue::default()),
        })
    }

    /// Takes a slot for a new connection of `owner`. If all are taken, the
    /// oldest pending connection of the owner holding the most gives way;
    /// returns that owner beside the slot.
    pub fn admit(self: &Arc<Self>, owner: Owner) -> (Pending, Option<Owner>) {
        let mut queue = lock(&self.queue);
        let mut evicted_from = None;
        if queue.pending.len() >= self.limit {
            if let Some(biggest) = queue.biggest_owner() {
                if let Some(at) = queue.pending.iter().position(|(_, o, _)| *o == biggest) {
                    if let Some((_, _, token)) = queue.pending.remove(at) {
                        token.cancel();
                        evicted_from = Some(biggest);
                    }
                }
            }
        }
        let id = queue.next_id;
        queue.next_id += 1;
        let evicted = CancellationToken::new();
        queue.pending.push_back((id, owner, evicted.clone()));
        debug_assert!(queue.pending.len() <= self.limit);
        (
            Pending {
                slots: self.clone(),
                id,
                evicted,
            },
            evicted_from,
        )
    }

    /// Connections pending now.
    pub fn len(&self) -> usize {
        lock(&self.queue).pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Pending {
    /// Resolves when a newer connection took this slot: give up.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut queue = lock(&self.slots.queue);
        if let Some(at) = queue.pending.iter().position(|(id, _, _)| *id == self.id) {
            queue.pending.remove(at);
        }
    }
}

/// Refusals logged in full per interval before the rest are only counted.
pub const REFUSALS_LOGGED_PER_INTERVAL: usize = 3;
/// The interval of [`RefusalLog`].
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Addresses named in a summary line.
const SUMMARY_ADDRESSES: usize = 3;

/// A rate-limited log of refused connections; see the module docs.
#[derive(Debug)]
pub struct RefusalLog {
    /// What refuses, e.g. "replication listener".
    what: &'static str,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: usize,
    /// Refusals counted but not logged in this window.
    suppressed: u64,
    addresses: Vec<String>,
}

impl RefusalLog {
    pub fn new(what: &'static str) -> RefusalLog {
        RefusalLog {
            what,
            window: Mutex::new(Window {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
                addresses: Vec::new(),
            }),
        }
    }

    /// Records one refused connection: logged in full while this interval
    /// has logged fewer than [`REFUSALS_LOGGED_PER_INTERVAL`], else counted.
    pub fn refused(&self, from: &str, reason: &str) {
        let mut window = lock(&self.window);
        self.roll(&mut window, Instant::now());
        if window.logged < REFUSALS_LOGGED_PER_INTERVAL {
            window.logged += 1;
            tracing::warn!(what = self.what, %from, reason, "connection refused");
            if window.logged == REFUSALS_LOGGED_PER_INTERVAL {
                tracing::warn!(
                    what = self.what,
                    "further refusals in the next {} s are counted, not logged one by one",
                    REFUSAL_LOG_INTERVAL.as_secs()
                );
            }
            return;
        }
        window.suppressed += 1;
        if window.addresses.len() < SUMMARY_ADDRESSES && !window.addresses.iter().any(|a| a == from)
        {
            window.addresses.push(from.to_owned());
        }
    }

    /// Logs the count of the interval that ended, if any refusal went
    /// unlogged in it. Listeners call it on a timer, so the count of the
    /// last interval of a flood is logged too.
    pub fn flush(&self) {
        let mut window = lock(&self.window);
        self.roll(&mut window, Instant::now());
    }

    fn roll(&self, window: &mut Window, now: Instant) {
        if now.duration_since(window.started) < REFUSAL_LOG_INTERVAL {
            return;
        }
        if window.suppressed > 0 {
            tracing::warn!(
                what = self.what,
                refused = window.suppressed,
                from = %window.addresses.join(", "),
                "{} more connections refused in the last {} s",
                window.suppressed,
                now.duration_since(window.started).as_secs()
            );
        }
        *window = Window {
            started: now,
            logged: 0,
            suppressed: 0,
            addresses: Vec::new(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(last: u8) -> Owner {
        Owner::Host(IpAddr::from([10, 0, 0, last]))
    }

    async fn is_evicted(pending: &Pending) -> bool {
        tokio::time::timeout(Duration::from_millis(10), pending.evicted())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_full_set_evicts_the_oldest_of_the_biggest_owner() {
        let slots = PendingSlots::new(3);
        let (client, evicted) = slots.admit(host(1));
        assert_eq!(evicted, None);
        let (flood_a, _) = slots.admit(host(9));
        let (flood_b, _) = slots.admit(host(9));
        assert_eq!(slots.len(), 3);
        // The flood holds the most: its oldest gives way, not the client,
        // however many more it opens.
        let (flood_c, evicted) = slots.admit(host(9));
        assert_eq!(evicted, Some(host(9)));
        assert!(is_evicted(&flood_a).await);
        let (flood_d, evicted) = slots.admit(host(9));
        assert_eq!(evicted, Some(host(9)));
        assert!(is_evicted(&flood_b).await);
        assert!(!is_evicted(&client).await, "the client keeps its slot");
        assert!(!is_evicted(&flood_c).await);
        assert_eq!(slots.len(), 3);
        drop((flood_a, flood_b));
        assert_eq!(slots.len(), 3, "evicted slots are gone already");
        drop((client, flood_c, flood_d));
        assert!(slots.is_empty());
    }

    #[tokio::test]
    async fn among_equal_owners_the_oldest_gives_way() {
        let slots = PendingSlots::new(2);
        let (first, _) = slots.admit(Owner::Process(10));
        let (second, _) = slots.admit(Owner::Process(11));
        let (_third, evicted) = slots.admit(Owner::Process(12));
        assert_eq!(evicted, Some(Owner::Process(10)));
        assert!(is_evicted(&first).await);
        assert!(!is_evicted(&second).await);
    }

    #[test]
    fn a_finished_connection_frees_its_slot_for_the_next() {
        let slots = PendingSlots::new(1);
        for _ in 0..10 {
            let (pending, evicted) = slots.admit(Owner::Unknown);
            assert_eq!(evicted, None);
            drop(pending);
        }
        assert!(slots.is_empty());
    }

    #[test]
    fn refusals_are_counted_past_the_first_few_of_an_interval() {
        let log = RefusalLog::new("test listener");
        for i in 0..100 {
            log.refused(&format!("10.0.0.{}", i % 5), "stranger");
        }
        let window = lock(&log.window);
        assert_eq!(window.logged, REFUSALS_LOGGED_PER_INTERVAL);
        assert_eq!(window.suppressed, 100 - REFUSALS_LOGGED_PER_INTERVAL as u64);
        assert_eq!(window.addresses.len(), SUMMARY_ADDRESSES);
    }

    #[test]
    fn a_new_interval_logs_in_full_again() {
        let log = RefusalLog::new("test listener");
        for _ in 0..10 {
            log.refused("10.0.0.1", "stranger");
        }
        {
            let mut window = lock(&log.window);
            window.started -= REFUSAL_LOG_INTERVAL;
        }
        log.flush();
        let window = lock(&log.window);
        assert_eq!((window.logged, window.suppressed), (0, 0));
    }
}
