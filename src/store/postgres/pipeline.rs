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

/// The session setting of a shared connection: no statement on it waits longer for a lock
/// than this (a lock another statement holds for a moment, not a handler's transaction).
pub(super) const LOCK_TIMEOUT: &str = "SET lock_timeout = '100ms'";

/// The shared connections: some of the pool's, each taken on its first use and kept, and
/// replaced once it closed or a statement's failure left it of no further use.
pub(super) struct Pipelines {
    slots: Box<[Mutex<Slot>]>,
    next: AtomicUsize,
    share: PoolShare,
}

/// The connections of one pool that the stores built on it share between them: at most half
/// of the pool, all stores together (two stores of one application pool, each with its table,
/// would otherwise keep half of it each: all of it).
pub(super) struct PoolShare {
    /// The pool's identity: the address of its manager, which lives as long as the pool (and so
    /// as long as the stores, and their shared connections, that hold the pool).
    pool: usize,
    most: usize,
}

/// How many connections each pool's stores share now, by [`PoolShare::pool`].
static SHARED_BY_POOL: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

impl PoolShare {
    /// The share of the pool whose manager is `manager`: at most `most` connections.
    pub(super) fn new<M>(manager: &M, most: usize) -> Self {
        Self {
            pool: std::ptr::from_ref(manager) as usize,
            most,
        }
    }

    /// Counts one more shared connection of the pool, unless its stores share `most` already.
    fn take(&self) -> bool {
        let mut shared = SHARED_BY_POOL
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match shared.iter_mut().find(|(pool, _)| *pool == self.pool) {
            Some((_, count)) if *count >= self.most => false,
            Some((_, count)) => {
                *count += 1;
                true
            }
            None if self.most == 0 => false,
            None => {
                shared.push((self.pool, 1));
                true
            }
        }
    }

    /// Counts one shared connection of the pool less.
    fn give_back(pool: usize) {
        let mut shared = SHARED_BY_POOL
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = shared.iter().position(|(p, _)| *p == pool) {
            shared[at].1 -= 1;
            if shared[at].1 == 0 {
                shared.swap_remove(at);
            }
        }
    }
}

/// A shared connection's place.
enum Slot {
    /// No connection: the next call that comes to it takes one.
    Empty,
    /// A call is taking one (from the pool, then setting its session): the calls that come to
    /// it meanwhile take a connection of their own, as they would without sharing, rather than
    /// each taking one for the slot that only one of them could fill.
    Filling,
    Open(Arc<Shared>),
}

/// What a call runs its statement on: see [`Pipelines::next`].
pub(super) enum Next<'a> {
    /// The slot's open connection.
    Shared(Lent<'a>),
    /// The slot is the caller's to fill: [`Filling::fill`], or it is empty again once the guard
    /// drops.
    Fill(Filling<'a>),
    /// A connection of the caller's own: the store shares none, or the slot is being filled.
    Own,
}

impl Pipelines {
    /// `count` connections, none of them taken yet, within the pool's `share`.
    pub(super) fn new(count: usize, share: PoolShare) -> Self {
        Self {
            slots: (0..count).map(|_| Mutex::new(Slot::Empty)).collect(),
            next: AtomicUsize::new(0),
            share,
        }
    }

    /// How many connections the store shares (none: each call takes one of its own).
    pub(super) fn count(&self) -> usize {
        self.slots.len()
    }

    /// The next slot in turn: its connection when it has one open; else the slot to fill (a
    /// connection that closed is replaced), unless another call is filling it or the pool's
    /// stores share their most already.
    pub(super) fn next(&self) -> Next<'_> {
        if self.slots.is_empty() {
            return Next::Own;
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut held = self.lock(slot);
        match &*held {
            Slot::Open(shared) if !shared.client().is_closed() => Next::Shared(Lent {
                pipelines: self,
                slot,
                shared: shared.clone(),
                kept: false,
            }),
            Slot::Filling => Next::Own,
            Slot::Empty | Slot::Open(_) => {
                // The closed connection goes first: it counts in the pool's share until then.
                *held = Slot::Empty;
                if !self.share.take() {
                    return Next::Own;
                }
                *held = Slot::Filling;
                Next::Fill(Filling {
                    pipelines: self,
                    slot,
                    filled: false,
                })
            }
        }
    }

    /// Takes `shared` out of `slot` (if it is still there). It closes once the statements under
    /// way on it have answered; the next call in that slot takes a new one from the pool.
    fn discard(&self, slot: usize, shared: &Arc<Shared>) {
        let mut held = self.lock(slot);
        if matches!(&*held, Slot::Open(s) if Arc::ptr_eq(s, shared)) {
            *held = Slot::Empty;
        }
    }

    fn lock(&self, slot: usize) -> std::sync::MutexGuard<'_, Slot> {
        // Nothing panics while a slot is locked; a poisoned slot holds a valid value.
        self.slots[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A slot one call is filling; empty again if the call drops it unfilled (taking a connection
/// failed, or the call was dropped meanwhile).
pub(super) struct Filling<'a> {
    pipelines: &'a Pipelines,
    slot: usize,
    filled: bool,
}

impl<'a> Filling<'a> {
    /// Puts `taken` (a connection just taken from the pool, its session set with
    /// [`LOCK_TIMEOUT`]) in the slot, and lends it to the call that filled it.
    pub(super) fn fill(mut self, taken: Client) -> Lent<'a> {
        let shared = Arc::new(Shared {
            client: Some(taken),
            pool: self.pipelines.share.pool,
        });
        *self.pipelines.lock(self.slot) = Slot::Open(shared.clone());
        self.filled = true;
        Lent {
            pipelines: self.pipelines,
            slot: self.slot,
            shared,
            kept: false,
        }
    }
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        if !self.filled {
            *self.pipelines.lock(self.slot) = Slot::Empty;
            PoolShare::give_back(self.pipelines.share.pool);
        }
    }
}

/// A shared connection lent to one call's statement. The call keeps it in its slot
/// ([`keep`](Self::keep)) once the statement answered and did not leave the connection of no
/// further use. Dropped otherwise (the statement failed so, or the call was dropped before its
/// answer came: the store's timeout, a request that went away), it takes the connection out of
/// its slot: a connection whose answers stopped coming (its network path lost, the old endpoint
/// of a failover) would time out every call that came to it in turn, for as long as TCP kept it
/// open.
pub(super) struct Lent<'a> {
    pipelines: &'a Pipelines,
    slot: usize,
    shared: Arc<Shared>,
    kept: bool,
}

impl Lent<'_> {
    pub(super) fn client(&self) -> &Client {
        self.shared.client()
    }

    /// Leaves the connection in its slot for the calls that come next.
    pub(super) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.pipelines.discard(self.slot, &self.shared);
        }
    }
}

/// A connection of the pool, shared by the statements of many calls. Closed once the last of
/// them is done with it, never given back: its session is set for sharing ([`LOCK_TIMEOUT`]),
/// which a connection the pool hands out (to a handler's transaction) must not be.
pub(super) struct Shared {
    client: Option<Client>,
    /// Its pool's [`PoolShare::pool`], whose count it is in.
    pool: usize,
}

impl Shared {
    fn client(&self) -> &Client {
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
        PoolShare::give_back(self.pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_slots_share_nothing() {
        let pipelines = Pipelines::new(0, PoolShare::new(&(), 8));
        assert_eq!(pipelines.count(), 0);
        assert!(matches!(pipelines.next(), Next::Own));
    }

    /// Two stores' connections on one pool: together, no more than the pool's share; a share
    /// given back (a fill given up, a shared connection closed) is the other store's to take.
    #[test]
    fn stores_on_one_pool_share_its_share_between_them() {
        let pool = 0u8;
        let (first, second) = (
            Pipelines::new(2, PoolShare::new(&pool, 2)),
            Pipelines::new(2, PoolShare::new(&pool, 2)),
        );
        let (Next::Fill(a), Next::Fill(b)) = (first.next(), first.next()) else {
            panic!("the first store fills both its slots");
        };
        assert!(matches!(second.next(), Next::Own));
        assert!(matches!(second.next(), Next::Own));
        drop(a);
        let Next::Fill(c) = second.next() else {
            panic!("a share given back is the other store's to take");
        };
        assert!(matches!(first.next(), Next::Own));
        drop((b, c));
        let other = 1u8;
        let elsewhere = Pipelines::new(1, PoolShare::new(&other, 1));
        assert!(
            matches!(elsewhere.next(), Next::Fill(_)),
            "another pool's share is its own"
        );
    }

    /// Each slot in turn is the first caller's to fill; while it is being filled the callers
    /// that come to it take a connection of their own; a fill given up leaves it empty.
    #[test]
    fn slots_are_filled_by_one_caller_each_in_turn() {
        let pool = 0u8;
        let pipelines = Pipelines::new(2, PoolShare::new(&pool, 8));
        let (Next::Fill(first), Next::Fill(second)) = (pipelines.next(), pipelines.next()) else {
            panic!("two empty slots, each the first caller's to fill");
        };
        assert_eq!((first.slot, second.slot), (0, 1));
        assert!(matches!(pipelines.next(), Next::Own));
        assert!(matches!(pipelines.next(), Next::Own));
        drop(first);
        drop(second);
        let Next::Fill(again) = pipelines.next() else {
            panic!("a fill given up leaves its slot empty");
        };
        assert_eq!(again.slot, 0);
    }
}
