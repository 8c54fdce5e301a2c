//! The order in which a shard's completed records expire.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use super::Nanos;

/// A completed record's place in the queue: its expiry, and what finds it in the table. An
/// entry whose record is gone (forgotten, or expired and taken over by a new request) is
/// stale; the shard drops it when it reaches the front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Due {
    pub(super) at: Nanos,
    pub(super) id: u64,
    pub(super) hash: u64,
}

/// Completed records by expiry, nearest first.
///
/// Records of one layer share its TTL, so they complete in the order they expire: those go to
/// the back of a FIFO queue, in O(1), and leave from its front in O(1). Only a record that
/// expires before the last one queued (a shorter TTL, or two completions racing for the
/// shard) goes to a binary heap beside it. The front is the nearer of the two fronts.
#[derive(Debug, Default)]
pub(super) struct Expiries {
    in_order: VecDeque<Due>,
    out_of_order: BinaryHeap<Reverse<Due>>,
}

impl Expiries {
    /// Room for `n` records that complete in order.
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            in_order: VecDeque::with_capacity(n),
            out_of_order: BinaryHeap::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.in_order.len() + self.out_of_order.len()
    }

    pub(super) fn push(&mut self, due: Due) {
        match self.in_order.back() {
            Some(last) if *last > due => self.out_of_order.push(Reverse(due)),
            _ => self.in_order.push_back(due),
        }
    }

    /// The entry nearest its expiry.
    pub(super) fn peek(&self) -> Option<Due> {
        match (self.in_order.front(), self.out_of_order.peek()) {
            (Some(a), Some(Reverse(b))) => Some(*a.min(b)),
            (Some(a), None) => Some(*a),
            (None, Some(Reverse(b))) => Some(*b),
            (None, None) => None,
        }
    }

    pub(super) fn pop(&mut self) -> Option<Due> {
        let front = self.in_order.front();
        let heap = self.out_of_order.peek().map(|Reverse(due)| due);
        match (front, heap) {
            (Some(a), Some(b)) if b < a => self.out_of_order.pop().map(|Reverse(due)| due),
            (Some(_), _) => self.in_order.pop_front(),
            (None, _) => self.out_of_order.pop().map(|Reverse(due)| due),
        }
    }

    /// Takes every entry out, in no order.
    pub(super) fn take_all(&mut self) -> Vec<Due> {
        let mut all: Vec<Due> = std::mem::take(&mut self.in_order).into();
        all.extend(
            std::mem::take(&mut self.out_of_order)
                .into_iter()
                .map(|r| r.0),
        );
        all
    }

    /// Replaces the queue by `entries`, in any order.
    pub(super) fn rebuild(&mut self, entries: impl Iterator<Item = Due>) {
        let mut entries: Vec<Due> = entries.collect();
        entries.sort_unstable();
        self.in_order = entries.into();
        self.out_of_order = BinaryHeap::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_order_whatever_the_order_of_pushes() {
        let mut queue = Expiries::default();
        let ats = [5, 7, 7, 3, 9, 1, 10, 8, 2, 12];
        for (id, at) in ats.into_iter().enumerate() {
            queue.push(Due {
                at,
                id: id as u64,
                hash: 0,
            });
        }
        assert_eq!(queue.len(), ats.len());
        assert!(!queue.out_of_order.is_empty() && !queue.in_order.is_empty());
        let mut popped = Vec::new();
        while let Some(due) = queue.peek() {
            assert_eq!(queue.pop(), Some(due));
            popped.push(due.at);
        }
        let mut sorted = ats.to_vec();
        sorted.sort_unstable();
        assert_eq!(popped, sorted);
        assert_eq!(queue.len(), 0);

        queue.rebuild([3, 1, 2].into_iter().map(|at| Due {
            at,
            id: at,
            hash: 0,
        }));
        assert_eq!(queue.pop().map(|d| d.at), Some(1));
        assert!(queue.out_of_order.is_empty());
    }
}
