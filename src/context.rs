//! What every session of the process shares, whatever its config snapshot: metrics, the edge defences,
//! the registry of logged-in sessions (for kicks and status), the two stop signals, and the reload log.
//! Plain state with no behaviour of any stage, so every stage and the process setup may hold it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A logged-in session, as the registry knows it.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    /// Tenant name.
    pub tenant: String,
    /// Normalised mailbox (`local@domain`), what `/kick` matches.
    pub mailbox: String,
    /// Store id.
    pub store: String,
    /// Cancels this session's relay (closing the store connection without QUIT).
    pub kick: CancellationToken,
}

/// Logged-in sessions by id. Entries are shared with their sessions (which read the tenant and store from
/// them), and keep the table's buckets small.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    map: Mutex<HashMap<u64, Arc<SessionEntry>>>,
}

/// Removes its session from the registry when dropped.
#[derive(Debug)]
pub struct Registered<'a> {
    registry: &'a SessionRegistry,
    id: u64,
    entry: Arc<SessionEntry>,
}

impl Registered<'_> {
    /// The session's entry.
    pub fn entry(&self) -> &SessionEntry {
        &self.entry
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl SessionRegistry {
    /// Adds a session; it stays until the guard drops.
    pub fn register(&self, id: u64, entry: SessionEntry) -> Registered<'_> {
        let entry = Arc::new(entry);
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, entry.clone());
        Registered {
            registry: self,
            id,
            entry,
        }
    }

    /// Ends every session of `mailbox` (a mailbox key, compared exactly when `exact`, else ignoring ASCII
    /// case); returns how many.
    pub fn kick(&self, mailbox: &str, exact: bool) -> usize {
        self.kick_where(&|m| {
            if exact {
                m == mailbox
            } else {
                m.eq_ignore_ascii_case(mailbox)
            }
        })
    }

    /// Ends every session whose mailbox `matches`; returns how many.
    pub fn kick_where(&self, matches: &dyn Fn(&str) -> bool) -> usize {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let mut n = 0;
        for entry in map.values().filter(|e| matches(&e.mailbox)) {
            entry.kick.cancel();
            n += 1;
        }
        n
    }

    /// Sessions per tenant.
    pub fn per_tenant(&self) -> HashMap<String, usize> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = HashMap::new();
        for e in map.values() {
            *out.entry(e.tenant.clone()).or_default() += 1;
        }
        out
    }

    /// Sessions in total.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True when no session is logged in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What every session of the process shares, whatever its snapshot.
#[derive(Debug)]
pub struct Context {
    /// Metrics.
    pub metrics: Metrics,
    /// Logged-in sessions.
    pub sessions: SessionRegistry,
    /// Edge defences (process-wide, so their memory survives reloads).
    pub throttle: crate::throttle::Throttle,
    /// Cancelled on SIGTERM: stop accepting, end pre-login sessions.
    pub draining: CancellationToken,
    /// Cancelled when the grace period ends (or at once): end everything.
    pub stop: CancellationToken,
    /// The stores and DNS names every tenant and snapshot share (their pools, probes and health survive
    /// reloads).
    pub stores: Arc<crate::store::registry::Registry>,
    /// The state shared with the other replicas (off unless `cluster:` is configured).
    pub fleet: crate::cluster::Fleet,
    next_session: AtomicU64,
}

impl Context {
    /// A context with no session yet; `stop` ends everything, `draining` is its child.
    pub fn new(
        metrics: Metrics,
        throttle: crate::throttle::Throttle,
        stop: CancellationToken,
    ) -> Self {
        Self {
            stores: Arc::new(crate::store::registry::Registry::new(
                metrics.clone(),
                stop.clone(),
            )),
            metrics,
            fleet: crate::cluster::Fleet::off(),
            sessions: SessionRegistry::default(),
            throttle,
            draining: stop.child_token(),
            stop,
            next_session: AtomicU64::new(1),
        }
    }

    /// A new session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}

/// One reload, for the status page.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    /// When.
    pub at: SystemTime,
    /// Whether the new config was taken.
    pub ok: bool,
    /// What happened.
    pub message: String,
}
