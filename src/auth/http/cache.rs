//! The bounded, expiring cache of auth_http answers, keyed by an HMAC of everything an answer may depend
//! on (so no password is kept).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::AuthAnswer;

/// Answers by credential digest, expiring, evicting the oldest when full.
pub(super) struct AnswerCache {
    capacity: usize,
    state: Mutex<CacheState>,
}

pub(super) type CacheKey = [u8; 32];

#[derive(Default)]
pub(super) struct CacheState {
    entries: HashMap<CacheKey, CacheEntry>,
    /// Insertion order; an item whose sequence number no longer matches its entry is stale.
    pub(super) order: VecDeque<(CacheKey, u64)>,
    next_seq: u64,
}

pub(super) struct CacheEntry {
    answer: AuthAnswer,
    expires: Instant,
    seq: u64,
}

// === impl AnswerCache ===

impl AnswerCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::default(),
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, CacheState> {
        // A poisoned cache only lost an insert half-way: keep using it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, key: &CacheKey, now: Instant) -> Option<AuthAnswer> {
        let mut state = self.state();
        let entry = state.entries.get(key)?;
        if entry.expires > now {
            return Some(entry.answer.clone());
        }
        state.entries.remove(key);
        None
    }

    pub(super) fn insert(&self, key: CacheKey, answer: AuthAnswer, ttl: Duration, now: Instant) {
        if self.capacity == 0 || ttl.is_zero() {
            return;
        }
        let Some(expires) = now.checked_add(ttl) else {
            return;
        };
        let mut state = self.state();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.entries.insert(
            key,
            CacheEntry {
                answer,
                expires,
                seq,
            },
        );
        state.order.push_back((key, seq));
        while state.entries.len() > self.capacity {
            let Some((old, old_seq)) = state.order.pop_front() else {
                break;
            };
            if state.entries.get(&old).is_some_and(|e| e.seq == old_seq) {
                state.entries.remove(&old);
            }
        }
        // Replaced and expired entries leave stale items behind: drop them before the queue outgrows
        // the map.
        if state.order.len() > 2 * self.capacity + 16 {
            let CacheState { entries, order, .. } = &mut *state;
            order.retain(|(k, s)| entries.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    pub(super) fn len(&self) -> usize {
        self.state().entries.len()
    }

    pub(super) fn clear(&self) {
        let mut state = self.state();
        state.entries.clear();
        state.order.clear();
    }
}
