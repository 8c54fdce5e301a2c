//! The connections a [`PostgresStore`](super::PostgresStore)'s single statements share,
//! pipelined: tokio-postgres sends a statement on a connection without waiting for the answers
//! of those sent before it, so many requests' statements go out and come back together, in
//! fewer writes, reads and wake-ups on both sides than one connection per statement takes.
//!
//! A statement waits for the statements sent before it on its connection, lock waits included:
//! a shared connection's session waits at most [`LOCK_TIMEOUT`] for a lock, then fails the
//! statement (`lock_not_available`), which the store runs again on a connection of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use deadpool_postgres::{Client, Object};

/// The session setting of a shared connection: no statement on it waits longer for a row lock
/// than this (a lock another statement holds for a moment, not a handler's transaction).
pub(super) const LOCK_TIMEOUT: &str = "SET lock_timeout = '100ms'";

/// The shared connections: some of the pool's, each taken on its first use and kept, and
/// replaced once it closed or a statement's failure left it of no further use.
pub(super) struct Pipelines {
    slots: Box<[Mutex<Option<Arc<Shared>>>]>,
    next: AtomicUsize,
}

impl Pipelines {
    /// `count` connections, none of them taken yet.
    pub(super) fn new(count: usize) -> Self {
        Self {
            slots: (0..count).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// How many connections the store shares (none: each call takes one of its own).
    pub(super) fn count(&self) -> usize {
        self.slots.len()
    }

    /// The next slot in turn, and its connection when it has one still open. `None` when there
    /// are no slots.
    pub(super) fn next(&self) -> Option<(usize, Option<Arc<Shared>>)> {
        if self.slots.is_empty() {
            return None;
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let held = self.lock(slot);
        let open = held.as_ref().filter(|shared| !shared.client().is_closed());
        Some((slot, open.cloned()))
    }

    /// Puts `taken` (a connection just taken from the pool, its session set with
    /// [`LOCK_TIMEOUT`]) in `slot`, unless a call filled it meanwhile with one still open: then
    /// that one is used, and `taken` is closed.
    pub(super) fn fill(&self, slot: usize, taken: Client) -> Arc<Shared> {
        let taken = Arc::new(Shared::new(taken));
        let mut held = self.lock(slot);
        if let Some(shared) = held.as_ref().filter(|s| !s.client().is_closed()) {
            return shared.clone();
        }
        *held = Some(taken.clone());
        taken
    }

    /// Takes `shared` out of `slot` (if it is still there): a failure left it of no further use
    /// (see [`discards_connection`](crate::store::sql::discards_connection)). It closes once the
    /// statements under way on it have answered; the next call in that slot takes a new one from
    /// the pool.
    pub(super) fn discard(&self, slot: usize, shared: &Arc<Shared>) {
        let mut held = self.lock(slot);
        if held.as_ref().is_some_and(|s| Arc::ptr_eq(s, shared)) {
            *held = None;
        }
    }

    fn lock(&self, slot: usize) -> std::sync::MutexGuard<'_, Option<Arc<Shared>>> {
        // Nothing panics while a slot is locked; a poisoned slot holds a valid value.
        self.slots[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection of the pool, shared by the statements of many calls. Closed once the last of
/// them is done with it, never given back: its session is set for sharing ([`LOCK_TIMEOUT`]),
/// which a connection the pool hands out (to a handler's transaction) must not be.
pub(super) struct Shared {
    client: Option<Client>,
}

impl Shared {
    fn new(client: Client) -> Self {
        Self {
            client: Some(client),
        }
    }

    pub(super) fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a shared connection is taken only when it is dropped")
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_slots_share_nothing() {
        let pipelines = Pipelines::new(0);
        assert_eq!(pipelines.count(), 0);
        assert!(pipelines.next().is_none());
    }

    #[test]
    fn slots_are_taken_in_turn_and_start_empty() {
        let pipelines = Pipelines::new(3);
        let slots: Vec<_> = (0..7).map(|_| pipelines.next().unwrap()).collect();
        let turns: Vec<_> = slots.iter().map(|(slot, _)| *slot).collect();
        assert_eq!(turns, [0, 1, 2, 0, 1, 2, 0]);
        assert!(slots.iter().all(|(_, shared)| shared.is_none()));
    }
}
