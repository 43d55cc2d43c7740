//! Write ordering on the node that originates writes (the Primary, and a
//! resync source).
//!
//! Every write, and every resync read, registers its range here and gets a
//! sequence number. One that overlaps something still in flight waits for
//! it to finish first — for a write that means done on the local disk and
//! acknowledged by the peers — so overlapping writes reach every disk in
//! the same order, and a resync read of a block is never in flight
//! together with an application write to it.
//!
//! Non-overlapping writes do not wait for each other; the order in which
//! they reach a peer does not matter.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct InFlight {
    range: Range<u64>,
    done: CancellationToken,
    /// Resync reads are not writes: they do not hold `complete_below` back.
    is_write: bool,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    epoch: u64,
    in_flight: BTreeMap<u64, InFlight>,
}

/// The in-flight registry of one volume.
#[derive(Debug, Default)]
pub struct Ordering {
    state: Mutex<State>,
}

/// A registered write or read; finishing it (or dropping it) releases
/// whoever waits on its range.
#[derive(Debug)]
pub struct Ticket<'a> {
    ordering: &'a Ordering,
    pub seq: u64,
    pub epoch: u64,
    /// Every write with a lower sequence completed everywhere.
    pub complete_below: u64,
    waits: Vec<CancellationToken>,
}

impl Ticket<'_> {
    /// Waits until nothing registered earlier overlaps this range.
    pub async fn wait_turn(&mut self) {
        for done in self.waits.drain(..) {
            done.cancelled().await;
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let removed = lock(&self.ordering.state).in_flight.remove(&self.seq);
        assert!(removed.is_some(), "ticket released twice");
        if let Some(entry) = removed {
            entry.done.cancel();
        }
    }
}

impl Ordering {
    pub fn new() -> Ordering {
        Ordering::default()
    }

    /// Registers `[offset, offset+len)`.
    pub fn register(&self, offset: u64, len: u64, is_write: bool) -> Ticket<'_> {
        let range = offset..offset + len.max(1);
        let mut state = lock(&self.state);
        let seq = state.next_seq;
        state.next_seq += 1;
        let waits = state
            .in_flight
            .values()
            .filter(|other| other.range.start < range.end && range.start < other.range.end)
            .map(|other| other.done.clone())
            .collect();
        let complete_below = state
            .in_flight
            .iter()
            .find(|(_, entry)| entry.is_write)
            .map_or(seq, |(&oldest, _)| oldest);
        state.in_flight.insert(
            seq,
            InFlight {
                range,
                done: CancellationToken::new(),
                is_write,
            },
        );
        let epoch = state.epoch;
        Ticket {
            ordering: self,
            seq,
            epoch,
            complete_below,
            waits,
        }
    }

    /// Starts a new epoch (a flush point); returns the epoch that ended.
    pub fn next_epoch(&self) -> u64 {
        let mut state = lock(&self.state);
        state.epoch += 1;
        state.epoch - 1
    }

    /// Writes in flight right now.
    pub fn in_flight_writes(&self) -> usize {
        lock(&self.state)
            .in_flight
            .values()
            .filter(|e| e.is_write)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_registrations_wait_in_order() {
        let ordering = Ordering::new();
        let first = ordering.register(0, 8192, true);
        let mut disjoint = ordering.register(8192, 4096, true);
        let mut second = ordering.register(4096, 4096, true);
        assert_eq!(second.complete_below, first.seq);
        disjoint.wait_turn().await;
        let waited = tokio::time::timeout(Duration::from_millis(50), second.wait_turn()).await;
        assert!(waited.is_err(), "overlap must wait for the first");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), second.wait_turn())
            .await
            .unwrap();
    }

    #[test]
    fn resync_reads_do_not_hold_completion_back() {
        let ordering = Ordering::new();
        let read = ordering.register(0, 4096, false);
        let write = ordering.register(1 << 20, 4096, true);
        assert_eq!(write.complete_below, write.seq);
        drop(read);
    }
}
