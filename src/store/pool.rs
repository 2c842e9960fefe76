//! Pre-warmed idle store connections for one store, generic over the connection type.
//!
//! A connection enters the pool already connected, TLS/STLS'd, greeted and CAPA'd (by the caller) and
//! waits in the AUTHORIZATION state. This module owns keeping it fresh: while idle, a watcher task holds
//! it and closes it if the store speaks unsolicited (typically a timeout message), closes it, or it reaches
//! its maximum age; and a refill task keeps a minimum number ready. It must never write to a pooled
//! connection, never hand one out after reading a byte from it, and never learn what protocol runs on it:
//! tests pool `tokio::io::DuplexStream`s. Modelled on pingora-pool, which is generic over the stream type
//! and closes an idle connection that becomes readable.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Notify, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

/// First wait after a failed refill connect; doubled after each further consecutive failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between refill connects that keep failing.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How many idle connections one store's pool keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Connections the refill task keeps ready (0: no pre-warming, connections only come from `put`).
    pub min_idle: usize,
    /// Idle connections kept at most; a connection offered beyond this is closed.
    pub max_idle: usize,
    /// Age (from when the connection was made) at which an idle connection is closed. Set it below the
    /// store's pre-login timeout, so the pool closes the connection before the store does.
    pub max_age: Duration,
    /// Refill connects in flight at most (0 counts as 1), so a cold pool does not hit a store with a burst.
    pub max_concurrent_connects: usize,
}

/// A cap on idle connections (and refill connects in progress) across every pool that shares it: the
/// process's `limits.max_idle_store_connections`. Each idle connection and each refill connect holds one
/// slot; a pool that finds none free waits until another pool frees one.
#[derive(Debug, Default)]
pub struct IdleBudget {
    /// 0: no cap.
    cap: AtomicUsize,
    used: AtomicUsize,
    freed: Notify,
}

impl IdleBudget {
    /// A budget of `cap` slots (0: no cap).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: AtomicUsize::new(cap),
            ..Self::default()
        })
    }

    /// Changes the cap (a reload); slots already held stay held until released.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    /// Slots held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (cap == 0 || n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
        self.freed.notify_waiters();
    }
}

/// Counters for metrics and status pages, all since the pool was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// `take` returned a pooled connection.
    pub hits: u64,
    /// `take` found no connection.
    pub misses: u64,
    /// Idle connections closed because the store sent something unsolicited.
    pub discarded_readable: u64,
    /// Idle connections closed because the store closed them or reading failed.
    pub discarded_closed: u64,
    /// Idle connections closed at `max_age` (including ones offered already too old).
    pub discarded_expired: u64,
    /// Connections closed on `put` because the pool already held `max_idle`.
    pub rejected_full: u64,
}

/// One store's idle connections; shared via `Arc`.
pub struct Pool<T> {
    settings: PoolSettings,
    /// Idle connections, freshest last (taken first).
    idle: Mutex<Vec<Idle<T>>>,
    /// Numbers idle entries so a watcher can remove its own entry.
    next_id: AtomicU64,
    /// Signalled on every change of the idle set; wakes the refill task.
    changed: Notify,
    /// How many idle connections the refill task aims for: `min_idle`, raised by one for each `take` that
    /// found none (up to `max_idle`) and lowered by one for each connection that expired unused, so the
    /// pool follows the login rate without a setting per deployment.
    demand: AtomicUsize,
    counters: Counters,
    /// The cap shared with other pools, when there is one.
    budget: Option<Arc<IdleBudget>>,
}

/// The pool's side of one idle connection; the connection itself is with its watcher.
struct Idle<T> {
    id: u64,
    /// Asks the watcher to hand the connection back on the enclosed channel. Dropping it tells the
    /// watcher to close the connection.
    hand_back: oneshot::Sender<oneshot::Sender<T>>,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    discarded_readable: AtomicU64,
    discarded_closed: AtomicU64,
    discarded_expired: AtomicU64,
    rejected_full: AtomicU64,
}

/// Why a watcher stopped watching.
enum Watched<T> {
    /// `take` wants the connection, on this channel.
    Wanted(oneshot::Sender<T>),
    /// The store sent a byte: the connection is out of step and must not be used.
    Readable,
    /// The store closed the connection, or reading failed.
    Closed,
    /// The connection reached `max_age`.
    Expired,
    /// The pool dropped the entry (the pool itself is gone).
    Abandoned,
}

/// Consecutive refill failures and the wait they earn.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

// === impl Pool ===

impl<T: AsyncRead + Unpin + Send + 'static> Pool<T> {
    /// An empty pool.
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        Self::with_budget(settings, None)
    }

    /// An empty pool whose idle connections also count against `budget`, shared with other pools.
    pub fn with_budget(settings: PoolSettings, budget: Option<Arc<IdleBudget>>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            idle: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            changed: Notify::new(),
            demand: AtomicUsize::new(settings.min_idle.min(settings.max_idle)),
            counters: Counters::default(),
            budget,
        })
    }

    /// Takes a budget slot for a connection about to be made or added (always granted without a budget).
    fn reserve(&self) -> bool {
        self.budget.as_ref().is_none_or(|b| b.try_take())
    }

    /// Returns `n` budget slots.
    fn release(&self, n: usize) {
        if let Some(b) = &self.budget {
            b.give(n);
        }
    }

    /// Adds an idle connection made at `created`. A connection already at `max_age`, or offered while the
    /// pool holds `max_idle`, is closed. While idle, a spawned watcher owns it (so this needs a tokio
    /// runtime) and closes it, without writing anything, when it becomes readable, closes, or expires.
    pub fn put(self: &Arc<Self>, conn: T, created: Instant) {
        if !self.reserve() {
            self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.put_reserved(conn, created);
    }

    /// [`Self::put`] for a connection that already holds a budget slot (the refill's).
    fn put_reserved(self: &Arc<Self>, conn: T, created: Instant) {
        // An age that overflows Instant means the connection never expires.
        let deadline = created.checked_add(self.settings.max_age);
        if deadline.is_some_and(|d| d <= Instant::now()) {
            self.counters
                .discarded_expired
                .fetch_add(1, Ordering::Relaxed);
            self.release(1);
            return;
        }
        let (hand_back, wanted) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut idle = self.lock_idle();
            if idle.len() >= self.settings.max_idle {
                drop(idle);
                self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
                self.release(1);
                return;
            }
            idle.push(Idle { id, hand_back });
        }
        // Weak, so that idle connections do not keep a dropped pool alive: dropping the pool drops every
        // `hand_back`, and each watcher then closes its connection.
        tokio::spawn(watch(Arc::downgrade(self), id, conn, deadline, wanted));
        self.changed.notify_waiters();
    }

    /// Takes the freshest idle connection (least likely to be near the store's timeout), or `None`.
    ///
    /// Never returns a connection that its watcher found readable, closed or expired, nor one a byte was
    /// read from. If this future is dropped while a watcher is handing a connection back, that connection
    /// is closed (not lost into the pool), and the refill task replaces it.
    pub async fn take(&self) -> Option<T> {
        loop {
            let entry = self.lock_idle().pop();
            let Some(entry) = entry else {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                self.adjust_demand(true);
                return None;
            };
            // The entry has left the idle set: its slot goes back whatever becomes of the connection.
            self.release(1);
            self.changed.notify_waiters();
            let (reply, conn) = oneshot::channel();
            // A failed send or a dropped reply means the watcher discarded the connection first.
            if entry.hand_back.send(reply).is_err() {
                continue;
            }
            if let Ok(conn) = conn.await {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Some(conn);
            }
        }
    }

    /// The number of idle connections the refill task aims for now (see `demand`).
    pub fn target(&self) -> usize {
        self.demand.load(Ordering::Relaxed)
    }

    /// One step of demand up (a take found the pool empty) or down (a connection expired unused), within
    /// `min_idle..=max_idle`. A pool without pre-warming (`min_idle` 0) stays without.
    fn adjust_demand(&self, up: bool) {
        let floor = self.settings.min_idle.min(self.settings.max_idle);
        if floor == 0 {
            return;
        }
        let ceiling = self.settings.max_idle;
        let step = |d: usize| {
            let next = if up { d + 1 } else { d.saturating_sub(1) };
            Some(next.clamp(floor, ceiling))
        };
        let before = self
            .demand
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, step)
            .unwrap_or(floor);
        if up && before < ceiling {
            self.changed.notify_waiters();
        }
    }

    /// Idle connections now.
    pub fn idle(&self) -> usize {
        self.lock_idle().len()
    }

    /// The settings the pool was made with.
    pub fn settings(&self) -> PoolSettings {
        self.settings
    }

    /// Counters so far.
    pub fn stats(&self) -> PoolStats {
        let c = &self.counters;
        PoolStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            discarded_readable: c.discarded_readable.load(Ordering::Relaxed),
            discarded_closed: c.discarded_closed.load(Ordering::Relaxed),
            discarded_expired: c.discarded_expired.load(Ordering::Relaxed),
            rejected_full: c.rejected_full.load(Ordering::Relaxed),
        }
    }

    /// Keeps at least `min_idle` connections: a background task calls `connect` whenever the idle
    /// connections plus those being made fall short, at most `max_concurrent_connects` at a time. It sleeps
    /// until the idle set changes rather than polling. After consecutive failures it waits 100 ms, doubling
    /// up to 5 s, and starts over after a success. Each error goes to `on_error` (the caller logs or counts
    /// it, without secrets). On `shutdown` it stops and abandons connects in flight; the returned handle
    /// completes then. Run one per pool.
    pub fn spawn_refill<F, Fut, E>(
        self: &Arc<Self>,
        connect: F,
        on_error: impl Fn(E) + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> JoinHandle<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        E: Send + 'static,
    {
        tokio::spawn(refill(Arc::clone(self), connect, on_error, shutdown))
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle<T>>> {
        // Nothing panics while holding the lock, and the Vec is valid at every step anyway.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A watcher closed its connection: drop its entry (unless `take` already popped it) and count why.
    fn discarded(&self, id: u64, why: &Watched<T>) {
        let removed = {
            let mut idle = self.lock_idle();
            let before = idle.len();
            idle.retain(|e| e.id != id);
            before - idle.len()
        };
        self.release(removed);
        let counter = match why {
            Watched::Readable => &self.counters.discarded_readable,
            Watched::Closed => &self.counters.discarded_closed,
            Watched::Expired => {
                self.adjust_demand(false);
                &self.counters.discarded_expired
            }
            Watched::Wanted(_) | Watched::Abandoned => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }
}

impl<T> Drop for Pool<T> {
    fn drop(&mut self) {
        let idle = self
            .idle
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if let Some(b) = &self.budget {
            b.give(idle);
        }
    }
}

impl<T> fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Pool")
            .field("settings", &self.settings)
            .field("idle", &idle)
            .field("counters", &self.counters)
            .finish()
    }
}

/// Holds one idle connection until `take` wants it or it must be closed.
async fn watch<T: AsyncRead + Unpin + Send + 'static>(
    pool: Weak<Pool<T>>,
    id: u64,
    mut conn: T,
    deadline: Option<Instant>,
    wanted: oneshot::Receiver<oneshot::Sender<T>>,
) {
    let mut byte = [0u8; 1];
    let outcome = tokio::select! {
        // Readability first: when the store's bytes and a take arrive together, the connection is out of
        // step and must be closed, not handed out. When the take wins, the pending read is dropped, which
        // loses nothing for cancel-safe streams (TcpStream, tokio-rustls), so no byte was consumed.
        biased;
        read = conn.read(&mut byte) => match read {
            Ok(0) | Err(_) => Watched::Closed,
            Ok(_) => Watched::Readable,
        },
        () = sleep_until_some(deadline) => Watched::Expired,
        request = wanted => match request {
            Ok(reply) => Watched::Wanted(reply),
            Err(_) => Watched::Abandoned,
        },
    };
    match outcome {
        Watched::Wanted(reply) => {
            // Err only when that take was cancelled: the connection comes back and closes on drop.
            let _unclaimed = reply.send(conn);
        }
        why => {
            drop(conn);
            if let Some(pool) = pool.upgrade() {
                pool.discarded(id, &why);
            }
        }
    }
}

/// The refill task behind [`Pool::spawn_refill`].
async fn refill<T, F, Fut, E>(
    pool: Arc<Pool<T>>,
    connect: F,
    on_error: impl Fn(E),
    shutdown: CancellationToken,
) where
    T: AsyncRead + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    E: Send + 'static,
{
    let limit = pool.settings.max_concurrent_connects.max(1);
    let mut connecting: JoinSet<(Instant, Result<T, E>)> = JoinSet::new();
    let mut backoff = Backoff::default();
    let mut retry_at: Option<Instant> = None;
    loop {
        // Registered before reading the idle count, so a change in between still wakes us.
        let changed = pool.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // Never above max_idle (`demand` is kept within it): every connection beyond it is closed on put.
        let target = pool.target();
        // Created before reserving, so a slot freed in between still wakes us (notify_waiters reaches
        // every Notified created before it); awaited only when the shared budget stopped the refill.
        let freed = pool.budget.as_ref().map(|b| b.freed.notified());
        tokio::pin!(freed);
        let mut starved = false;
        if retry_at.is_none() {
            while connecting.len() < limit && pool.idle() + connecting.len() < target {
                if !pool.reserve() {
                    starved = true;
                    break;
                }
                // The store's clock starts when it accepts, so age counts from before the connect.
                let started = Instant::now();
                let attempt = connect();
                connecting.spawn(async move { (started, attempt.await) });
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                pool.release(connecting.len());
                connecting.abort_all();
                return;
            }
            Some(joined) = connecting.join_next() => match joined {
                Ok((started, Ok(conn))) => {
                    backoff.reset();
                    retry_at = None;
                    pool.put_reserved(conn, started);
                }
                Ok((_, Err(e))) => {
                    pool.release(1);
                    on_error(e);
                    retry_at = Some(Instant::now() + backoff.next_wait());
                }
                // A connector that panicked is a failure too, with nothing to report but the backoff.
                Err(_) => {
                    pool.release(1);
                    retry_at = Some(Instant::now() + backoff.next_wait());
                }
            },
            // Another pool gave back a slot of the shared budget: maybe this one can refill now.
            () = async {
                match freed.as_mut().as_pin_mut() {
                    Some(f) if starved => f.await,
                    _ => std::future::pending().await,
                }
            } => {}
            () = sleep_until_some(retry_at) => retry_at = None,
            () = &mut changed => {}
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

// === impl Backoff ===

impl Backoff {
    /// The wait after one more failure: 100 ms, 200 ms, 400 ms, … capped at 5 s.
    fn next_wait(&mut self) -> Duration {
        let wait = BACKOFF_FIRST
            .saturating_mul(1u32 << self.failures.min(16))
            .min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncWriteExt, DuplexStream, duplex};
    use tokio::time::timeout;

    use super::*;

    /// Bound on any wait for a condition; reached only when a test fails.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn settings(min_idle: usize, max_idle: usize) -> PoolSettings {
        PoolSettings {
            min_idle,
            max_idle,
            max_age: Duration::from_secs(60),
            max_concurrent_connects: 2,
        }
    }

    /// Waits, without polling, until `cond` holds of the pool; re-checked on every change of the idle set.
    async fn until<T>(pool: &Pool<T>, cond: impl Fn(&Pool<T>) -> bool)
    where
        T: AsyncRead + Unpin + Send + 'static,
    {
        timeout(PATIENCE, async {
            loop {
                let changed = pool.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if cond(pool) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .expect("condition not reached");
    }

    /// Puts a fresh connection and returns the store's end of it.
    fn put_fresh(pool: &Arc<Pool<DuplexStream>>) -> DuplexStream {
        let (conn, store) = duplex(64);
        pool.put(conn, Instant::now());
        store
    }

    #[tokio::test]
    async fn take_returns_the_freshest_first() {
        let pool = Pool::new(settings(0, 4));
        let mut stores = Vec::new();
        for _ in 0..3 {
            stores.push(put_fresh(&pool));
        }
        assert_eq!(pool.idle(), 3);
        for i in (0..3).rev() {
            let mut conn = pool.take().await.unwrap();
            // The store that was put last answers on it, and every byte it sends after the take arrives:
            // nothing was read while pooled. (A wrong connection would time out here.)
            stores[i].write_all(b"+OK\r\n").await.unwrap();
            let mut got = [0u8; 5];
            timeout(PATIENCE, conn.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&got, b"+OK\r\n");
        }
        assert_eq!(pool.idle(), 0);
        assert_eq!(pool.stats().hits, 3);
    }

    #[tokio::test]
    async fn take_on_empty_counts_a_miss() {
        let pool = Pool::<DuplexStream>::new(settings(0, 4));
        assert!(pool.take().await.is_none());
        assert_eq!(
            pool.stats(),
            PoolStats {
                misses: 1,
                ..PoolStats::default()
            }
        );
    }

    #[tokio::test]
    async fn a_connection_the_store_spoke_on_is_never_taken() {
        let pool = Pool::new(settings(0, 4));
        let mut store = put_fresh(&pool);
        // Taken at once: the watcher may not have run since the write, and must still refuse it.
        store.write_all(b"-ERR timeout\r\n").await.unwrap();
        assert!(pool.take().await.is_none());
        assert_eq!(pool.stats().discarded_readable, 1);

        // And discarded on its own, without a take.
        let mut store = put_fresh(&pool);
        store.write_all(b"-ERR timeout\r\n").await.unwrap();
        until(&pool, |p| p.idle() == 0).await;
        assert_eq!(pool.stats().discarded_readable, 2);
        assert!(pool.take().await.is_none());
        // Closed, not written to: the store sees EOF and nothing else.
        let mut got = Vec::new();
        store.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn a_connection_the_store_closed_is_discarded() {
        let pool = Pool::new(settings(0, 4));
        let store = put_fresh(&pool);
        drop(store);
        until(&pool, |p| p.idle() == 0).await;
        assert_eq!(pool.stats().discarded_closed, 1);
        assert!(pool.take().await.is_none());
    }

    #[tokio::test]
    async fn a_connection_at_max_age_is_discarded() {
        // Real time (tokio's test-util, which pauses the clock, is not enabled in this crate), so the age is
        // short and the test waits for the discard itself, not for a fixed time.
        let pool = Pool::new(PoolSettings {
            max_age: Duration::from_millis(50),
            ..settings(0, 4)
        });
        let (conn, _store) = duplex(64);
        pool.put(conn, Instant::now());
        let (old, _old_store) = duplex(64);
        pool.put(old, Instant::now() - Duration::from_secs(1));
        assert_eq!(pool.idle(), 1, "an already expired connection is not kept");
        until(&pool, |p| p.idle() == 0).await;
        assert_eq!(pool.stats().discarded_expired, 2);
        assert!(pool.take().await.is_none());
    }

    #[tokio::test]
    async fn max_idle_is_enforced() {
        let pool = Pool::new(settings(0, 2));
        let _a = put_fresh(&pool);
        let _b = put_fresh(&pool);
        let mut c = put_fresh(&pool);
        assert_eq!(pool.idle(), 2);
        assert_eq!(pool.stats().rejected_full, 1);
        // The rejected connection was closed.
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn dropping_the_pool_closes_idle_connections() {
        let pool = Pool::new(settings(0, 2));
        let mut store = put_fresh(&pool);
        drop(pool);
        let mut got = Vec::new();
        timeout(PATIENCE, store.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
    }

    /// A connector to an in-memory store; keeps the stores' ends open and counts attempts.
    #[derive(Clone, Default)]
    struct Connector {
        attempts: Arc<AtomicUsize>,
        stores: Arc<Mutex<Vec<DuplexStream>>>,
    }

    impl Connector {
        fn connect(&self) -> impl Future<Output = Result<DuplexStream, &'static str>> + use<> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let (conn, store) = duplex(64);
            self.stores.lock().unwrap().push(store);
            std::future::ready(Ok(conn))
        }
    }

    #[tokio::test]
    async fn refill_keeps_min_idle_after_takes() {
        let pool = Pool::new(settings(3, 5));
        let connector = Connector::default();
        let c = connector.clone();
        let shutdown = CancellationToken::new();
        let task = pool.spawn_refill(move || c.connect(), |_| {}, shutdown.clone());
        until(&pool, |p| p.idle() == 3).await;
        assert_eq!(connector.attempts.load(Ordering::SeqCst), 3);
        for _ in 0..2 {
            assert!(pool.take().await.is_some());
        }
        until(&pool, |p| p.idle() == 3).await;
        assert_eq!(connector.attempts.load(Ordering::SeqCst), 5);
        assert_eq!(pool.stats().hits, 2);

        // Shutdown stops the refill: takes are no longer replaced.
        shutdown.cancel();
        timeout(PATIENCE, task).await.unwrap().unwrap();
        assert!(pool.take().await.is_some());
        tokio::task::yield_now().await;
        assert_eq!(pool.idle(), 2);
        assert_eq!(connector.attempts.load(Ordering::SeqCst), 5);
    }

    /// Pools sharing a budget hold no more idle connections together than it allows; a slot one pool
    /// gives back (a take, or the pool going away) lets another fill.
    #[tokio::test]
    async fn pools_sharing_a_budget_stay_within_it() {
        let budget = IdleBudget::new(3);
        let a = Pool::with_budget(settings(2, 4), Some(budget.clone()));
        let b = Pool::with_budget(settings(2, 4), Some(budget.clone()));
        let connector = Connector::default();
        let (ca, cb) = (connector.clone(), connector.clone());
        let shutdown = CancellationToken::new();
        let _ta = a.spawn_refill(move || ca.connect(), |_| {}, shutdown.clone());
        let _tb = b.spawn_refill(move || cb.connect(), |_| {}, shutdown.clone());
        eventually(|| a.idle() + b.idle() == 3).await;
        assert_eq!(budget.used(), 3);
        // A take frees a slot; the pool short of its target may take it, never beyond 3 in all.
        let taken = a.take().await.unwrap();
        eventually(|| a.idle() + b.idle() == 3).await;
        assert_eq!(budget.used(), 3);
        drop(taken);
        // Pool a goes (b keeps what it holds): a's slots come back and a new pool can fill.
        shutdown.cancel();
        let c = Pool::with_budget(settings(1, 4), Some(budget.clone()));
        drop(a);
        let cc = connector.clone();
        let _t = c.spawn_refill(move || cc.connect(), |_| {}, CancellationToken::new());
        eventually(|| c.idle() == 1).await;
        assert!(budget.used() <= 3, "{}", budget.used());
    }

    /// Polls `cond` (every few ms, until PATIENCE): for conditions spanning several pools, whose changes
    /// no single pool's notification covers.
    async fn eventually(cond: impl Fn() -> bool) {
        timeout(PATIENCE, async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition not reached");
    }

    #[tokio::test]
    async fn the_pool_grows_with_misses_and_shrinks_with_expiries() {
        let pool = Pool::new(PoolSettings {
            max_age: Duration::from_millis(300),
            ..settings(1, 4)
        });
        assert_eq!(pool.target(), 1);
        // Logins that find the pool empty: each raises the target by one, up to max_idle...
        for _ in 0..6 {
            assert!(pool.take().await.is_none());
        }
        assert_eq!(pool.target(), 4);
        // ...and the refill follows.
        let connector = Connector::default();
        let c = connector.clone();
        let task = pool.spawn_refill(move || c.connect(), |_| {}, CancellationToken::new());
        until(&pool, |p| p.idle() == 4).await;
        // Nobody takes: connections expire unused, each lowering the target, back to min_idle.
        until(&pool, |p| p.target() == 1).await;
        assert!(pool.stats().discarded_expired >= 3);
        task.abort();
    }

    #[tokio::test]
    async fn a_pool_without_pre_warming_stays_without() {
        let pool = Pool::<DuplexStream>::new(settings(0, 4));
        for _ in 0..3 {
            assert!(pool.take().await.is_none());
        }
        assert_eq!(pool.target(), 0);
    }

    #[tokio::test]
    async fn refill_aims_no_higher_than_max_idle() {
        let pool = Pool::new(settings(3, 1));
        let connector = Connector::default();
        let c = connector.clone();
        let task = pool.spawn_refill(move || c.connect(), |_| {}, CancellationToken::new());
        until(&pool, |p| p.idle() == 1).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(connector.attempts.load(Ordering::SeqCst), 1);
        assert_eq!(pool.stats().rejected_full, 0);
        task.abort();
    }

    #[tokio::test]
    async fn refill_backs_off_after_failures_and_recovers() {
        let pool = Pool::<DuplexStream>::new(settings(1, 2));
        let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let errors = Arc::new(AtomicUsize::new(0));
        let (a, e) = (Arc::clone(&attempts), Arc::clone(&errors));
        let stores: Arc<Mutex<Vec<DuplexStream>>> = Arc::default();
        let s = Arc::clone(&stores);
        let task = pool.spawn_refill(
            move || {
                let mut attempts = a.lock().unwrap();
                attempts.push(Instant::now());
                // Four failures, then the store comes back.
                let result = if attempts.len() <= 4 {
                    Err("connection refused")
                } else {
                    let (conn, store) = duplex(64);
                    s.lock().unwrap().push(store);
                    Ok(conn)
                };
                std::future::ready(result)
            },
            move |_| {
                e.fetch_add(1, Ordering::SeqCst);
            },
            CancellationToken::new(),
        );
        until(&pool, |p| p.idle() == 1).await;
        let times = attempts.lock().unwrap().clone();
        assert_eq!(times.len(), 5, "one attempt per wait, no tight loop");
        assert_eq!(errors.load(Ordering::SeqCst), 4);
        // Timers never fire early, so these lower bounds hold however loaded the machine is.
        for (i, want_ms) in [100, 200, 400, 800].into_iter().enumerate() {
            let gap = times[i + 1] - times[i];
            assert!(
                gap >= Duration::from_millis(want_ms),
                "wait {i} was {gap:?}"
            );
        }
        task.abort();
    }

    #[tokio::test]
    async fn shutdown_abandons_a_hanging_connect() {
        let pool = Pool::<DuplexStream>::new(settings(1, 2));
        let shutdown = CancellationToken::new();
        let started = Arc::new(Notify::new());
        let s = Arc::clone(&started);
        let task = pool.spawn_refill(
            move || {
                s.notify_one();
                std::future::pending::<Result<DuplexStream, ()>>()
            },
            |_| {},
            shutdown.clone(),
        );
        timeout(PATIENCE, started.notified()).await.unwrap();
        shutdown.cancel();
        timeout(PATIENCE, task).await.unwrap().unwrap();
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..8).map(|_| b.next_wait().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        for _ in 0..100 {
            b.next_wait();
        }
        assert_eq!(b.next_wait(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next_wait(), BACKOFF_FIRST);
    }
}
