//! What every session of the process shares, whatever its config snapshot: metrics, the edge defences,
//! the registry of logged-in sessions (for kicks and status), the two stop signals, and the reload log.
//! Plain state with no behaviour of any stage, so every stage and the process setup may hold it; the
//! operator's store controls live here because they act on two of its parts (stores and sessions) at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
pub use crate::vocab::{MailboxMatch, SessionFacts, SessionFilter};

/// A logged-in session, as the registry knows it.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    /// Tenant name.
    pub tenant: String,
    /// Normalised mailbox (`local@domain`), what `/kick` matches.
    pub mailbox: String,
    /// The store's label (as in `/status` and the metrics), or `host:port` from auth_http.
    pub store: String,
    /// The client's address (the PROXY-protocol one when trusted).
    pub client: std::net::SocketAddr,
    /// The listener it came in on.
    pub listener: String,
    /// When the login succeeded.
    pub since: SystemTime,
    /// Cancels this session's relay (closing the store connection without QUIT).
    pub kick: CancellationToken,
}

impl SessionEntry {
    /// What an operator's filter looks at.
    pub fn facts(&self) -> SessionFacts<'_> {
        SessionFacts {
            tenant: &self.tenant,
            store: &self.store,
            mailbox: &self.mailbox,
            client: self.client.ip(),
        }
    }
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
        let wanted = MailboxMatch::Exact {
            key: mailbox.to_string(),
            fold: !exact,
        };
        self.kick_where(&|e| wanted.matches(e.mailbox))
    }

    /// Ends every session that `matches`; returns how many.
    pub fn kick_where(&self, matches: &dyn Fn(&SessionFacts<'_>) -> bool) -> usize {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let mut n = 0;
        for entry in map.values().filter(|e| matches(&e.facts())) {
            entry.kick.cancel();
            n += 1;
        }
        n
    }

    /// The sessions `filter` matches, oldest first (ties by id), with their ids.
    pub fn list(&self, filter: &SessionFilter) -> Vec<(u64, Arc<SessionEntry>)> {
        let mut out: Vec<(u64, Arc<SessionEntry>)> = {
            let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            map.iter()
                .filter(|(_, e)| filter.matches(&e.facts()))
                .map(|(id, e)| (*id, e.clone()))
                .collect()
        };
        out.sort_by_key(|(id, e)| (e.since, *id));
        out
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
    /// When the process started serving (for uptime).
    pub started: SystemTime,
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
            started: SystemTime::now(),
            next_session: AtomicU64::new(1),
        }
    }

    /// A new session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Sets the runtime state (`ready`, `drain`, `maint`) and weight of the stores named `store` on
    /// this replica; `maint` also ends their sessions (without QUIT: nothing a client did is committed).
    /// Returns how many stores matched. An unknown state name changes nothing (the admin API checks it
    /// first).
    pub fn control_store(&self, store: &str, state: Option<&str>, weight: Option<u32>) -> usize {
        use crate::store::registry::StoreState;
        let state = match state.map(StoreState::parse) {
            Some(None) => return 0,
            Some(Some(s)) => Some(s),
            None => None,
        };
        let stores = self.stores.stores_named(store);
        for s in &stores {
            s.control(state, weight);
            if state == Some(StoreState::Maint) {
                let label = s.label.as_str();
                let ended = self.sessions.kick_where(&|e| e.store == label);
                tracing::info!(store = %label, sessions = ended, "maintenance: ended the store's sessions");
            }
        }
        stores.len()
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
