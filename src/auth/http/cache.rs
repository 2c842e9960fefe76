//! The bounded, expiring cache of auth_http answers, keyed by an HMAC of everything an answer may depend
//! on (so no password is kept).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;

use super::AuthAnswer;

/// Answers by credential digest, expiring, evicting the oldest when full.
pub(super) struct AnswerCache {
    capacity: usize,
    /// Oldest insert first: a re-insert moves its key to the back.
    entries: Mutex<LinkedHashMap<CacheKey, CacheEntry>>,
}

pub(super) type CacheKey = [u8; 32];

pub(super) struct CacheEntry {
    answer: AuthAnswer,
    expires: Instant,
}

// === impl AnswerCache ===

impl AnswerCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::default(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, LinkedHashMap<CacheKey, CacheEntry>> {
        // A poisoned cache only lost an insert half-way: keep using it.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, key: &CacheKey, now: Instant) -> Option<AuthAnswer> {
        let mut entries = self.entries();
        let entry = entries.get(key)?;
        if entry.expires > now {
            return Some(entry.answer.clone());
        }
        entries.remove(key);
        None
    }

    pub(super) fn insert(&self, key: CacheKey, answer: AuthAnswer, ttl: Duration, now: Instant) {
        if self.capacity == 0 || ttl.is_zero() {
            return;
        }
        let Some(expires) = now.checked_add(ttl) else {
            return;
        };
        let mut entries = self.entries();
        entries.insert(key, CacheEntry { answer, expires });
        while entries.len() > self.capacity {
            entries.pop_front();
        }
    }

    pub(super) fn len(&self) -> usize {
        self.entries().len()
    }

    pub(super) fn clear(&self) {
        self.entries().clear();
    }
}
