//! The answers of one tenant's directory: bounded, expiring (found and not-found apart), kept past their
//! time for as long as the directory cannot be asked (stale-while-error), and asked once however many
//! logins of one mailbox arrive together (single-flight).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;
use tokio::sync::OnceCell;

use super::Lookup;

/// How long answers live.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// A found store.
    pub ttl: Duration,
    /// "Not found".
    pub negative_ttl: Duration,
    /// Past its lifetime, while the directory fails.
    pub stale_for: Duration,
}

/// What the cache holds for a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Within its lifetime.
    Fresh(Lookup),
    /// Past it, but usable while the directory fails.
    Stale(Lookup),
    /// Nothing usable.
    Missing,
}

/// A directory's answers by mailbox key.
#[derive(Debug)]
pub struct Cache {
    capacity: usize,
    lifetimes: Lifetimes,
    /// Oldest insert first: a re-insert moves its mailbox to the back.
    entries: Mutex<LinkedHashMap<String, Entry>>,
    /// Lookups under way, one per mailbox: later logins of the mailbox wait for its answer.
    inflight: Mutex<HashMap<String, Flight>>,
}

/// One lookup under way, shared by every login waiting on it.
type Flight = Arc<OnceCell<Result<Lookup, String>>>;

#[derive(Debug)]
struct Entry {
    lookup: Lookup,
    /// Fresh until then.
    fresh_until: Instant,
    /// Usable while the directory fails until then.
    stale_until: Instant,
}

impl Cache {
    /// A cache of at most `capacity` mailboxes (0: nothing kept; lookups still fly single).
    pub fn new(capacity: usize, lifetimes: Lifetimes) -> Self {
        Self {
            capacity,
            lifetimes,
            entries: Mutex::default(),
            inflight: Mutex::default(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, LinkedHashMap<String, Entry>> {
        // A poisoned cache only lost an insert half-way: keep using it.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What is kept for `key` at `now`; an entry past its stale time is dropped.
    pub fn get(&self, key: &str, now: Instant) -> Cached {
        let mut entries = self.entries();
        let Some(entry) = entries.get(key) else {
            return Cached::Missing;
        };
        if now < entry.fresh_until {
            return Cached::Fresh(entry.lookup.clone());
        }
        if now < entry.stale_until {
            return Cached::Stale(entry.lookup.clone());
        }
        entries.remove(key);
        Cached::Missing
    }

    /// Keeps an answer; the oldest entry goes when full.
    pub fn insert(&self, key: &str, lookup: Lookup, now: Instant) {
        let ttl = match lookup {
            Lookup::Found(_) => self.lifetimes.ttl,
            Lookup::NotFound => self.lifetimes.negative_ttl,
        };
        if self.capacity == 0 || ttl.is_zero() {
            return;
        }
        let (Some(fresh_until), Some(stale_until)) = (
            now.checked_add(ttl),
            now.checked_add(ttl.saturating_add(self.lifetimes.stale_for)),
        ) else {
            return;
        };
        let mut entries = self.entries();
        entries.insert(
            key.to_string(),
            Entry {
                lookup,
                fresh_until,
                stale_until,
            },
        );
        while entries.len() > self.capacity {
            entries.pop_front();
        }
    }

    /// Mailboxes kept now.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks the directory through `fetch` unless a lookup of `key` is already under way, in which case
    /// this waits for that one's answer. The first caller's `fetch` runs; if that caller goes away before
    /// the answer, a waiting one runs its own.
    pub async fn fly<F>(&self, key: &str, fetch: F) -> Result<Lookup, String>
    where
        F: Future<Output = Result<Lookup, String>>,
    {
        let flight: Flight = {
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            inflight.entry(key.to_string()).or_default().clone()
        };
        let answer = flight.get_or_init(|| fetch).await.clone();
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if inflight.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            inflight.remove(key);
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::placement::Placed;

    fn found(store: &str) -> Lookup {
        Lookup::Found(Placed {
            store: store.into(),
            login: None,
        })
    }

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            ttl: Duration::from_secs(10),
            negative_ttl: Duration::from_secs(2),
            stale_for: Duration::from_secs(100),
        }
    }

    #[test]
    fn answers_are_fresh_then_stale_then_gone() {
        let cache = Cache::new(10, lifetimes());
        let t0 = Instant::now();
        cache.insert("a@x", found("s1"), t0);
        cache.insert("b@x", Lookup::NotFound, t0);
        assert_eq!(cache.get("a@x", t0), Cached::Fresh(found("s1")));
        assert_eq!(
            cache.get("a@x", t0 + Duration::from_secs(11)),
            Cached::Stale(found("s1"))
        );
        assert_eq!(
            cache.get("b@x", t0 + Duration::from_secs(3)),
            Cached::Stale(Lookup::NotFound)
        );
        assert_eq!(
            cache.get("a@x", t0 + Duration::from_secs(111)),
            Cached::Missing
        );
        assert_eq!(cache.len(), 1, "the expired entry is dropped");
    }

    #[test]
    fn the_oldest_goes_when_full_and_a_zero_capacity_keeps_nothing() {
        let cache = Cache::new(2, lifetimes());
        let t0 = Instant::now();
        for k in ["a", "b", "c"] {
            cache.insert(k, found(k), t0);
        }
        assert_eq!(cache.get("a", t0), Cached::Missing);
        assert_eq!(cache.get("c", t0), Cached::Fresh(found("c")));
        let none = Cache::new(0, lifetimes());
        none.insert("a", found("a"), t0);
        assert!(none.is_empty());
    }

    // On the test's current-thread runtime a task runs until it awaits, so a task that counted itself in
    // has already joined the flight (or started it).
    #[tokio::test]
    async fn logins_of_one_mailbox_at_once_make_one_lookup() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let cache = Arc::new(Cache::new(10, lifetimes()));
        let (asked, arrived) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut waiting = Vec::new();
        for _ in 0..50 {
            let (cache, asked, arrived, mut gate) =
                (cache.clone(), asked.clone(), arrived.clone(), gate.clone());
            waiting.push(tokio::spawn(async move {
                arrived.fetch_add(1, SeqCst);
                cache
                    .fly("a@x", async move {
                        asked.fetch_add(1, SeqCst);
                        gate.wait_for(|open| *open).await.unwrap();
                        Ok(found("s1"))
                    })
                    .await
            }));
        }
        while arrived.load(SeqCst) < 50 {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        for w in waiting {
            assert_eq!(w.await.unwrap(), Ok(found("s1")));
        }
        assert_eq!(asked.load(SeqCst), 1);
        // The next one asks again (the flight is over; caching is the caller's choice).
        let again = cache.fly("a@x", async { Ok(found("s2")) }).await;
        assert_eq!(again, Ok(found("s2")));
    }
}
