//! Prometheus metrics: one explicit registry (no globals, so every test makes its own), metric names as
//! constants in one place, and per-tenant handles cached so the hot path does no label hashing.
//!
//! Labels are bounded: tenant names come from the config (`_unknown` otherwise), listeners and stores
//! from the config and DNS, outcomes and results from fixed sets. A user name is never a label.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Metric names (without the `popgate_` namespace).
pub mod names {
    /// Client sessions ended, by outcome.
    pub const SESSIONS_TOTAL: &str = "sessions_total";
    /// Sessions open now.
    pub const SESSIONS_ACTIVE: &str = "sessions_active";
    /// Login attempts, by mechanism and result.
    pub const LOGINS_TOTAL: &str = "logins_total";
    /// Session length.
    pub const SESSION_DURATION: &str = "session_duration_seconds";
    /// Relayed bytes, by direction.
    pub const BYTES_TOTAL: &str = "bytes_total";
    /// Post-login commands, by verb (a fixed set plus `other`).
    pub const COMMANDS_TOTAL: &str = "commands_total";
    /// Store health, 1 up, 0 down; one series per store, whatever the number of tenants using it.
    pub const STORE_UP: &str = "store_up";
    /// Time to connect (and TLS, greeting, CAPA) to a store.
    pub const STORE_CONNECT: &str = "store_connect_seconds";
    /// Time for a store to answer a login.
    pub const STORE_LOGIN: &str = "store_login_seconds";
    /// Pre-warmed connections waiting, per store.
    pub const STORE_POOL_IDLE: &str = "store_pool_idle";
    /// Pool checkouts, by store and result (hit, miss).
    pub const STORE_POOL_CHECKOUTS: &str = "store_pool_checkouts_total";
    /// Logins waiting on a store now (connect, greeting and login answer).
    pub const STORE_LOGINS_IN_FLIGHT: &str = "store_logins_in_flight";
    /// Logins a store could not take because it had `max_logins_in_flight` already.
    pub const STORE_LOGINS_REFUSED: &str = "store_logins_refused_total";
    /// A tenant's stores that are up now (the tenant-level view of `store_up`).
    pub const TENANT_STORES_UP: &str = "tenant_stores_up";
    /// A tenant's stores now (configured and resolved).
    pub const TENANT_STORES: &str = "tenant_stores";
    /// Per tenant and store: time to connect to a store (off with `metrics.tenant_store_histograms`).
    pub const BACKEND_CONNECT: &str = "backend_connect_seconds";
    /// Per tenant and store: time for a store to answer a login (off with
    /// `metrics.tenant_store_histograms`).
    pub const BACKEND_LOGIN: &str = "backend_login_seconds";
    /// Logins that found every store of the tenant down (tried anyway).
    pub const BACKEND_ALL_DOWN: &str = "backend_all_down_total";
    /// Client TLS handshakes, by result and version.
    pub const TLS_HANDSHAKES: &str = "tls_handshakes_total";
    /// Refusals by the edge defences, by reason.
    pub const THROTTLED: &str = "throttled_total";
    /// Config reloads, by result.
    pub const CONFIG_RELOADS: &str = "config_reloads_total";
    /// Admin requests refused for a missing or wrong bearer token.
    pub const ADMIN_AUTH_FAILURES: &str = "admin_auth_failures_total";
    /// Round trips to the shared state (Redis/Valkey), by operation.
    pub const CLUSTER_ROUND_TRIP: &str = "cluster_round_trip_seconds";
    /// Shared-state operations that failed or timed out, by operation.
    pub const CLUSTER_ERRORS: &str = "cluster_errors_total";
    /// 1 while the shared state is unavailable and limits are per replica (or closed, per policy).
    pub const CLUSTER_DEGRADED: &str = "cluster_degraded";
    /// Session leases this replica holds in the shared state.
    pub const CLUSTER_LEASES: &str = "cluster_leases";
    /// Replicas that renewed their heartbeat within a lease TTL, as this replica last saw.
    pub const CLUSTER_REPLICAS: &str = "cluster_replicas";
    /// Fleet commands (kick, auth-cache flush) this replica carried out for another, by command.
    pub const CLUSTER_COMMANDS: &str = "cluster_commands_total";
}

/// The shared state's series, registered only when `cluster:` is configured.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    /// Round-trip time, by operation.
    pub round_trip: HistogramVec,
    /// Failures and timeouts, by operation.
    pub errors: IntCounterVec,
    /// 1 while degraded.
    pub degraded: IntGauge,
    /// Leases held by this replica.
    pub leases: IntGauge,
    /// Replicas seen.
    pub replicas: IntGauge,
    /// Fleet commands carried out for other replicas.
    pub commands: IntCounterVec,
}

/// The label value for sessions whose tenant is not (yet) known.
pub const UNKNOWN_TENANT: &str = "_unknown";

/// Commands counted by name after login; everything else is `other`, so the label set stays bounded.
const KNOWN_COMMANDS: &[&str] = &[
    "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT", "TOP", "UIDL", "CAPA", "LAST",
];

/// Every metric popgate exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    sessions_total: IntCounterVec,
    sessions_active: IntGaugeVec,
    logins_total: IntCounterVec,
    session_duration: HistogramVec,
    bytes_total: IntCounterVec,
    commands_total: IntCounterVec,
    store_up: IntGaugeVec,
    store_connect: HistogramVec,
    store_login: HistogramVec,
    store_pool_idle: IntGaugeVec,
    store_pool_checkouts: IntCounterVec,
    store_in_flight: IntGaugeVec,
    store_refused: IntCounterVec,
    tenant_stores_up: IntGaugeVec,
    tenant_stores: IntGaugeVec,
    backend_connect: HistogramVec,
    backend_login: HistogramVec,
    /// Whether the per-tenant-per-store histograms are kept (`metrics.tenant_store_histograms`).
    tenant_store: Arc<std::sync::atomic::AtomicBool>,
    all_down: IntCounterVec,
    tls_handshakes: IntCounterVec,
    throttled: IntCounterVec,
    config_reloads: IntCounterVec,
    admin_auth_failures: IntCounter,
    tenants: Arc<Mutex<HashMap<String, Arc<TenantMetrics>>>>,
    cluster: Arc<Mutex<Option<ClusterMetrics>>>,
}

/// Cached handles for one tenant (the hot path: every session and every relayed chunk).
#[derive(Debug)]
pub struct TenantMetrics {
    /// Sessions open now.
    pub active: IntGauge,
    /// Client-to-store bytes.
    pub bytes_to_store: IntCounter,
    /// Store-to-client bytes.
    pub bytes_to_client: IntCounter,
    /// Session length.
    pub duration: Histogram,
    commands: Vec<IntCounter>,
}

impl TenantMetrics {
    /// Counts a post-login command by verb.
    pub fn command(&self, verb: &[u8]) {
        let i = KNOWN_COMMANDS
            .iter()
            .position(|k| k.as_bytes().eq_ignore_ascii_case(verb))
            .unwrap_or(KNOWN_COMMANDS.len());
        if let Some(c) = self.commands.get(i) {
            c.inc();
        }
    }
}

/// One store's series, cached: health, pool, login timings and logins in flight. Dropping the handles
/// removes the series (the store left every tenant's group).
#[derive(Debug)]
pub struct StoreMetrics {
    /// 1 up, 0 down.
    pub up: IntGauge,
    /// Pre-warmed connections waiting.
    pub idle: IntGauge,
    hit: IntCounter,
    miss: IntCounter,
    /// Time to prepare a connection.
    pub connect: Histogram,
    /// Time for the store to answer a login.
    pub login: Histogram,
    /// Logins waiting on the store.
    pub in_flight: IntGauge,
    /// Logins refused at `max_logins_in_flight`.
    pub refused: IntCounter,
    label: String,
    owner: Metrics,
}

impl StoreMetrics {
    /// A pool checkout (hit or miss).
    pub fn checkout(&self, hit: bool) {
        if hit { &self.hit } else { &self.miss }.inc();
    }
}

impl Drop for StoreMetrics {
    fn drop(&mut self) {
        let o = &self.owner;
        let l = [self.label.as_str()];
        let _ = o.store_up.remove_label_values(&l);
        let _ = o.store_pool_idle.remove_label_values(&l);
        let _ = o.store_connect.remove_label_values(&l);
        let _ = o.store_login.remove_label_values(&l);
        let _ = o.store_in_flight.remove_label_values(&l);
        let _ = o.store_refused.remove_label_values(&l);
        for result in ["hit", "miss"] {
            let _ = o
                .store_pool_checkouts
                .remove_label_values(&[self.label.as_str(), result]);
        }
    }
}

/// Why metrics could not be registered (a programming error: duplicate names).
#[derive(Debug, thiserror::Error)]
#[error("metrics registration: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Registers every metric (and process metrics) in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        // Our metrics carry the `popgate_` namespace; process metrics keep their standard `process_` names.
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help).namespace("popgate"), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let g = IntGaugeVec::new(Opts::new(name, help).namespace("popgate"), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let histogram = |name: &str,
                         help: &str,
                         labels: &[&str],
                         buckets: Vec<f64>|
         -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help)
                    .namespace("popgate")
                    .buckets(buckets),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let durations = vec![0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];
        let m = Self {
            sessions_total: counter(
                names::SESSIONS_TOTAL,
                "Client sessions ended, by outcome.",
                &["tenant", "listener", "outcome"],
            )?,
            sessions_active: gauge(
                names::SESSIONS_ACTIVE,
                "Client sessions logged in now.",
                &["tenant"],
            )?,
            logins_total: counter(
                names::LOGINS_TOTAL,
                "Login attempts, by mechanism and result.",
                &["tenant", "mechanism", "result"],
            )?,
            session_duration: histogram(
                names::SESSION_DURATION,
                "Length of relayed sessions.",
                &["tenant"],
                durations,
            )?,
            bytes_total: counter(
                names::BYTES_TOTAL,
                "Relayed bytes, by direction.",
                &["tenant", "direction"],
            )?,
            commands_total: counter(
                names::COMMANDS_TOTAL,
                "Commands after login, by verb.",
                &["tenant", "command"],
            )?,
            store_up: gauge(names::STORE_UP, "Store health: 1 up, 0 down.", &["store"])?,
            store_connect: histogram(
                names::STORE_CONNECT,
                "Time to connect to a store (TCP, TLS, greeting, CAPA).",
                &["store"],
                latency.clone(),
            )?,
            store_login: histogram(
                names::STORE_LOGIN,
                "Time for a store to answer a login.",
                &["store"],
                latency.clone(),
            )?,
            store_pool_idle: gauge(
                names::STORE_POOL_IDLE,
                "Pre-warmed store connections waiting.",
                &["store"],
            )?,
            store_pool_checkouts: counter(
                names::STORE_POOL_CHECKOUTS,
                "Pool checkouts, by result.",
                &["store", "result"],
            )?,
            store_in_flight: gauge(
                names::STORE_LOGINS_IN_FLIGHT,
                "Logins waiting on the store now.",
                &["store"],
            )?,
            store_refused: counter(
                names::STORE_LOGINS_REFUSED,
                "Logins the store could not take: it had max_logins_in_flight already.",
                &["store"],
            )?,
            tenant_stores_up: gauge(
                names::TENANT_STORES_UP,
                "The tenant's stores that are up.",
                &["tenant"],
            )?,
            tenant_stores: gauge(
                names::TENANT_STORES,
                "The tenant's stores (configured and resolved).",
                &["tenant"],
            )?,
            backend_connect: histogram(
                names::BACKEND_CONNECT,
                "Time to connect to a store (TCP, TLS, greeting, CAPA), per tenant.",
                &["tenant", "backend"],
                latency.clone(),
            )?,
            backend_login: histogram(
                names::BACKEND_LOGIN,
                "Time for a store to answer a login, per tenant.",
                &["tenant", "backend"],
                latency,
            )?,
            tenant_store: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            all_down: counter(
                names::BACKEND_ALL_DOWN,
                "Logins that found every store of the tenant down (tried anyway).",
                &["tenant"],
            )?,
            tls_handshakes: counter(
                names::TLS_HANDSHAKES,
                "Client TLS handshakes, by result and version.",
                &["listener", "result", "version"],
            )?,
            throttled: counter(
                names::THROTTLED,
                "Refusals by the edge defences, by reason.",
                &["tenant", "reason"],
            )?,
            config_reloads: counter(
                names::CONFIG_RELOADS,
                "Config reloads, by result.",
                &["result"],
            )?,
            admin_auth_failures: {
                let c = IntCounter::with_opts(
                    Opts::new(
                        names::ADMIN_AUTH_FAILURES,
                        "Admin requests refused for a missing or wrong bearer token.",
                    )
                    .namespace("popgate"),
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            tenants: Arc::default(),
            cluster: Arc::default(),
            registry,
        };
        // Both reload results exist from the start, so alerts on `increase()` see the first failure.
        m.config_reloads.with_label_values(&["ok"]);
        m.config_reloads.with_label_values(&["error"]);
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(m)
    }

    /// The shared state's series, registered on the first call (a process that never configures
    /// `cluster:` exports none of them).
    ///
    /// # Errors
    /// Registration failed (a programming error).
    pub fn cluster(&self) -> Result<ClusterMetrics, MetricsError> {
        let mut slot = self.cluster.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("popgate");
        let m = ClusterMetrics {
            round_trip: HistogramVec::new(
                HistogramOpts::new(
                    names::CLUSTER_ROUND_TRIP,
                    "Round trips to the shared state, by operation.",
                )
                .namespace("popgate")
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                ]),
                &["op"],
            )?,
            errors: IntCounterVec::new(
                opts(
                    names::CLUSTER_ERRORS,
                    "Shared-state operations that failed or timed out.",
                ),
                &["op"],
            )?,
            degraded: IntGauge::with_opts(opts(
                names::CLUSTER_DEGRADED,
                "1 while the shared state is unavailable.",
            ))?,
            leases: IntGauge::with_opts(opts(
                names::CLUSTER_LEASES,
                "Session leases this replica holds in the shared state.",
            ))?,
            replicas: IntGauge::with_opts(opts(
                names::CLUSTER_REPLICAS,
                "Replicas with a live heartbeat, as last seen.",
            ))?,
            commands: IntCounterVec::new(
                opts(
                    names::CLUSTER_COMMANDS,
                    "Fleet commands carried out for another replica.",
                ),
                &["command"],
            )?,
        };
        self.registry.register(Box::new(m.round_trip.clone()))?;
        self.registry.register(Box::new(m.errors.clone()))?;
        self.registry.register(Box::new(m.degraded.clone()))?;
        self.registry.register(Box::new(m.leases.clone()))?;
        self.registry.register(Box::new(m.replicas.clone()))?;
        self.registry.register(Box::new(m.commands.clone()))?;
        *slot = Some(m.clone());
        Ok(m)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Cached handles for a tenant (created on first use).
    pub fn tenant(&self, tenant: &str) -> Arc<TenantMetrics> {
        let mut map = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = map.get(tenant) {
            return t.clone();
        }
        let mut commands: Vec<IntCounter> = KNOWN_COMMANDS
            .iter()
            .map(|c| self.commands_total.with_label_values(&[tenant, c]))
            .collect();
        commands.push(self.commands_total.with_label_values(&[tenant, "other"]));
        let t = Arc::new(TenantMetrics {
            active: self.sessions_active.with_label_values(&[tenant]),
            bytes_to_store: self.bytes_total.with_label_values(&[tenant, "to_store"]),
            bytes_to_client: self.bytes_total.with_label_values(&[tenant, "to_client"]),
            duration: self.session_duration.with_label_values(&[tenant]),
            commands,
        });
        map.insert(tenant.to_string(), t.clone());
        t
    }

    /// Drops every series of tenants that are no longer configured (after a reload).
    pub fn retain_tenants(&self, keep: &[String]) {
        let gone: Vec<String> = {
            let mut map = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
            let gone: Vec<String> = map.keys().filter(|t| !keep.contains(t)).cloned().collect();
            for t in &gone {
                map.remove(t);
            }
            gone
        };
        if gone.is_empty() {
            // The common reload: gathering every family costs a scrape, for nothing to remove.
            return;
        }
        let families = self.registry.gather();
        let drop_series = |t: &str, labels: &HashMap<&str, &str>| labels.get("tenant") == Some(&t);
        for t in gone.iter().map(String::as_str) {
            remove_matching(
                &families,
                names::SESSIONS_TOTAL,
                &self.sessions_total,
                |l| drop_series(t, l),
            );
            remove_matching(&families, names::LOGINS_TOTAL, &self.logins_total, |l| {
                drop_series(t, l)
            });
            remove_matching(&families, names::BYTES_TOTAL, &self.bytes_total, |l| {
                drop_series(t, l)
            });
            remove_matching(
                &families,
                names::COMMANDS_TOTAL,
                &self.commands_total,
                |l| drop_series(t, l),
            );
            remove_matching(
                &families,
                names::SESSIONS_ACTIVE,
                &self.sessions_active,
                |l| drop_series(t, l),
            );
            remove_matching(
                &families,
                names::SESSION_DURATION,
                &self.session_duration,
                |l| drop_series(t, l),
            );
            remove_matching(&families, names::THROTTLED, &self.throttled, |l| {
                drop_series(t, l)
            });
            remove_matching(&families, names::BACKEND_ALL_DOWN, &self.all_down, |l| {
                drop_series(t, l)
            });
            let _ = self.tenant_stores.remove_label_values(&[t]);
            let _ = self.tenant_stores_up.remove_label_values(&[t]);
            self.remove_backend_series(&families, |l| drop_series(t, l));
        }
    }

    fn remove_backend_series(
        &self,
        families: &[prometheus::proto::MetricFamily],
        matches: impl Fn(&HashMap<&str, &str>) -> bool,
    ) {
        remove_matching(
            families,
            names::BACKEND_CONNECT,
            &self.backend_connect,
            &matches,
        );
        remove_matching(
            families,
            names::BACKEND_LOGIN,
            &self.backend_login,
            &matches,
        );
    }

    /// Keeps or drops the per-tenant-per-store histograms (`metrics.tenant_store_histograms`); turning
    /// them off also removes the series already exported.
    pub fn set_tenant_store_histograms(&self, on: bool) {
        let was = self
            .tenant_store
            .swap(on, std::sync::atomic::Ordering::Relaxed);
        if was && !on {
            self.backend_connect.reset();
            self.backend_login.reset();
        }
    }

    fn tenant_store_on(&self) -> bool {
        self.tenant_store.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Handles for one store's series (one per store, shared by every tenant using it); the series are
    /// removed when the handles are dropped.
    pub fn store(&self, label: &str) -> StoreMetrics {
        StoreMetrics {
            up: self.store_up.with_label_values(&[label]),
            idle: self.store_pool_idle.with_label_values(&[label]),
            hit: self.store_pool_checkouts.with_label_values(&[label, "hit"]),
            miss: self
                .store_pool_checkouts
                .with_label_values(&[label, "miss"]),
            connect: self.store_connect.with_label_values(&[label]),
            login: self.store_login.with_label_values(&[label]),
            in_flight: self.store_in_flight.with_label_values(&[label]),
            refused: self.store_refused.with_label_values(&[label]),
            label: label.to_string(),
            owner: self.clone(),
        }
    }

    /// A session ended.
    pub fn session_ended(&self, tenant: &str, listener: &str, outcome: &str) {
        self.sessions_total
            .with_label_values(&[tenant, listener, outcome])
            .inc();
    }

    /// A login attempt finished.
    pub fn login(&self, tenant: &str, mechanism: &str, result: &str) {
        self.logins_total
            .with_label_values(&[tenant, mechanism, result])
            .inc();
    }

    /// A tenant's stores now: how many, and how many are up.
    pub fn tenant_stores(&self, tenant: &str, total: usize, up: usize) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.tenant_stores
            .with_label_values(&[tenant])
            .set(n(total));
        self.tenant_stores_up
            .with_label_values(&[tenant])
            .set(n(up));
    }

    /// Removes a tenant's per-store histograms when the store leaves the tenant's group.
    pub fn backend_gone(&self, tenant: &str, backend: &str) {
        // By label values, not by gathering every family: a DNS change can move a store out of
        // thousands of tenants' groups at once.
        let _ = self.backend_connect.remove_label_values(&[tenant, backend]);
        let _ = self.backend_login.remove_label_values(&[tenant, backend]);
    }

    /// Time to prepare a store connection, per tenant (when those histograms are on).
    pub fn backend_connect(&self, tenant: &str, backend: &str, secs: f64) {
        if self.tenant_store_on() {
            self.backend_connect
                .with_label_values(&[tenant, backend])
                .observe(secs);
        }
    }

    /// Time for a store login, per tenant (when those histograms are on).
    pub fn backend_login(&self, tenant: &str, backend: &str, secs: f64) {
        if self.tenant_store_on() {
            self.backend_login
                .with_label_values(&[tenant, backend])
                .observe(secs);
        }
    }

    /// A login found every store down.
    pub fn all_down(&self, tenant: &str) {
        self.all_down.with_label_values(&[tenant]).inc();
    }

    /// A client TLS handshake.
    pub fn tls_handshake(&self, listener: &str, ok: bool, version: &str) {
        let result = if ok { "ok" } else { "error" };
        self.tls_handshakes
            .with_label_values(&[listener, result, version])
            .inc();
    }

    /// An edge refusal.
    pub fn throttled(&self, tenant: &str, reason: &str) {
        self.throttled.with_label_values(&[tenant, reason]).inc();
    }

    /// An admin request refused for its bearer token.
    pub fn admin_auth_failed(&self) {
        self.admin_auth_failures.inc();
    }

    /// A config reload.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }
}

/// Removes every series of `vec` (family `name`) whose labels match.
fn remove_matching<T: prometheus::core::MetricVecBuilder>(
    families: &[prometheus::proto::MetricFamily],
    name: &str,
    vec: &prometheus::core::MetricVec<T>,
    matches: impl Fn(&HashMap<&str, &str>) -> bool,
) {
    let full = format!("popgate_{name}");
    for family in families.iter().filter(|f| f.name() == full) {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if matches(&labels) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn renders_namespaced_bounded_series_and_forgets_removed_tenants() {
        let m = Metrics::new().unwrap();
        let t = m.tenant("acme");
        t.active.inc();
        t.command(b"retr");
        t.command(b"XYZZY");
        m.login("acme", "user", "ok");
        m.session_ended("acme", "pop3", "quit");
        m.backend_login("acme", "10.0.0.1:110", 0.01);
        let store = m.store("10.0.0.1:110");
        store.up.set(1);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("popgate_sessions_active{tenant=\"acme\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("popgate_commands_total{command=\"RETR\",tenant=\"acme\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("popgate_commands_total{command=\"other\",tenant=\"acme\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "popgate_logins_total{mechanism=\"user\",result=\"ok\",tenant=\"acme\"} 1"
            )
        );
        assert!(
            text.contains("popgate_store_up{store=\"10.0.0.1:110\"} 1"),
            "{text}"
        );
        m.retain_tenants(&["other".to_string()]);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("tenant=\"acme\""), "{text}");
        drop(store);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("10.0.0.1:110"), "{text}");
    }

    #[test]
    fn a_store_leaving_a_tenant_takes_its_per_tenant_series_along() {
        let m = Metrics::new().unwrap();
        m.backend_login("acme", "10.0.0.1:110", 0.01);
        m.backend_connect("acme", "10.0.0.1:110", 0.01);
        m.backend_login("acme", "10.0.0.2:110", 0.01);
        m.backend_gone("acme", "10.0.0.1:110");
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("10.0.0.1:110"), "{text}");
        assert!(text.contains("10.0.0.2:110"), "{text}");
        m.set_tenant_store_histograms(false);
        m.backend_login("acme", "10.0.0.3:110", 0.01);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("backend_login_seconds_bucket"), "{text}");
    }
}
