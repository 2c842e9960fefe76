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
    /// Client TLS handshakes, by result, version and kind (full or resumed).
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
    /// Always 1; the labels say which build runs.
    pub const BUILD_INFO: &str = "build_info";
    /// Client connections open now, on every listener.
    pub const CONNECTIONS_OPEN: &str = "connections_open";
    /// `limits.max_connections` in force.
    pub const CONNECTIONS_MAX: &str = "connections_max";
    /// A login as the client sees it: from the command carrying the credentials to popgate's answer.
    pub const LOGIN_DURATION: &str = "login_duration_seconds";
    /// A served certificate's notAfter, as Unix seconds.
    pub const CERTIFICATE_EXPIRY: &str = "tls_certificate_expiry_timestamp_seconds";
    /// Time for an auth_http lookup that went to the service.
    pub const AUTH_HTTP_DURATION: &str = "auth_http_request_duration_seconds";
    /// auth_http lookups that gave no answer, by reason.
    pub const AUTH_HTTP_ERRORS: &str = "auth_http_errors_total";
    /// auth_http lookups answered from the cache (hit) or not (miss).
    pub const AUTH_HTTP_CACHE: &str = "auth_http_cache_total";
    /// DNS lookups of store names (A/AAAA or SRV), per name.
    pub const DNS_LOOKUPS: &str = "dns_lookups_total";
    /// DNS lookups of store names that failed, per name.
    pub const DNS_LOOKUP_FAILURES: &str = "dns_lookup_failures_total";
    /// 1 when the last config load (start or reload) succeeded, 0 when it was refused.
    pub const RELOAD_SUCCESSFUL: &str = "config_last_reload_successful";
    /// Unix time of the last successful config load (start or reload).
    pub const RELOAD_SUCCESS_TIME: &str = "config_last_reload_success_timestamp_seconds";
    /// 1 for a store's runtime state (ready, drain, maint), 0 for the others.
    pub const STORE_STATE: &str = "store_state";
    /// A store's weight in force.
    pub const STORE_WEIGHT: &str = "store_weight";
    /// Placement lookups, by tenant, source and result (found, not_found, error, refused).
    pub const PLACEMENT_LOOKUPS: &str = "placement_lookups_total";
    /// Time for a placement lookup that went to its directory.
    pub const PLACEMENT_DURATION: &str = "placement_lookup_duration_seconds";
    /// Placement answers from the cache: hit (fresh), stale (past its TTL, the directory failing), miss.
    pub const PLACEMENT_CACHE: &str = "placement_cache_total";
    /// Mailboxes in a placement map file now.
    pub const PLACEMENT_MAP_ENTRIES: &str = "placement_map_entries";
}

/// Placement lookup results, as the `result` label.
pub const PLACEMENT_RESULTS: [&str; 4] = ["found", "not_found", "error", "refused"];

/// One tenant's placement series, for one source.
#[derive(Debug, Clone)]
pub struct PlacementMetrics {
    /// Time for lookups that went to the directory.
    pub duration: Histogram,
    results: Vec<IntCounter>,
    /// Fresh answers from the cache.
    pub hit: IntCounter,
    /// Stale answers served while the directory failed.
    pub stale: IntCounter,
    /// Lookups the cache could not answer.
    pub miss: IntCounter,
}

impl PlacementMetrics {
    /// A lookup's result, one of [`PLACEMENT_RESULTS`].
    pub fn result(&self, result: &str) {
        if let Some(c) = PLACEMENT_RESULTS
            .iter()
            .position(|r| *r == result)
            .and_then(|i| self.results.get(i))
        {
            c.inc();
        }
    }
}

pub use crate::vocab::CertificateInfo;

/// A store's runtime states, as the `state` label of `store_state`.
pub const STORE_STATES: [&str; 3] = ["ready", "drain", "maint"];

/// auth_http's error reasons, as the `reason` label.
pub const AUTH_HTTP_ERROR_REASONS: [&str; 4] =
    ["timeout", "connect", "bad_response", "bad_request"];

/// One tenant's auth_http series, cached per tenant runtime.
#[derive(Debug, Clone)]
pub struct AuthHttpMetrics {
    /// Time for a lookup that went to the service (every WAIT round included).
    pub duration: Histogram,
    /// Answers from the cache.
    pub hit: IntCounter,
    /// Lookups the cache could not answer.
    pub miss: IntCounter,
    errors: Vec<IntCounter>,
}

impl AuthHttpMetrics {
    /// A lookup that gave no answer; `reason` is one of [`AUTH_HTTP_ERROR_REASONS`].
    pub fn error(&self, reason: &str) {
        if let Some(c) = AUTH_HTTP_ERROR_REASONS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.errors.get(i))
        {
            c.inc();
        }
    }
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
    connections_open: IntGauge,
    connections_max: IntGauge,
    login_duration: HistogramVec,
    certificate_expiry: IntGaugeVec,
    auth_http_duration: HistogramVec,
    auth_http_errors: IntCounterVec,
    auth_http_cache: IntCounterVec,
    dns_lookups: IntCounterVec,
    dns_failures: IntCounterVec,
    reload_successful: IntGauge,
    reload_success_time: IntGauge,
    store_state: IntGaugeVec,
    store_weight: IntGaugeVec,
    placement_lookups: IntCounterVec,
    placement_duration: HistogramVec,
    placement_cache: IntCounterVec,
    placement_entries: IntGaugeVec,
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
    /// One gauge per runtime state, in [`STORE_STATES`]'s order.
    states: [IntGauge; 3],
    /// The weight in force.
    pub weight: IntGauge,
    label: String,
    owner: Metrics,
}

impl StoreMetrics {
    /// The 95th percentile of connect and login times since the start, as bucket upper bounds (`None`
    /// before the first, or above the last bucket).
    pub fn p95s(&self) -> (Option<f64>, Option<f64>) {
        (p95(&self.connect), p95(&self.login))
    }

    /// A pool checkout (hit or miss).
    pub fn checkout(&self, hit: bool) {
        if hit { &self.hit } else { &self.miss }.inc();
    }

    /// The store's runtime state now: `state` is one of [`STORE_STATES`].
    pub fn state(&self, state: &str) {
        for (gauge, name) in self.states.iter().zip(STORE_STATES) {
            gauge.set(i64::from(name == state));
        }
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
        let _ = o.store_weight.remove_label_values(&l);
        for state in STORE_STATES {
            let _ = o
                .store_state
                .remove_label_values(&[self.label.as_str(), state]);
        }
        for result in ["hit", "miss"] {
            let _ = o
                .store_pool_checkouts
                .remove_label_values(&[self.label.as_str(), result]);
        }
    }
}

/// A gauge without labels, registered.
fn plain_gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::with_opts(Opts::new(name, help).namespace("popgate"))?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Counts one open client connection for as long as it lives.
#[derive(Debug)]
pub struct OpenConnection(IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
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
                "Client TLS handshakes, by result, version and kind (full, resumed).",
                &["listener", "result", "version", "kind"],
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
            connections_open: plain_gauge(
                &registry,
                names::CONNECTIONS_OPEN,
                "Client connections open now, on every listener.",
            )?,
            connections_max: plain_gauge(
                &registry,
                names::CONNECTIONS_MAX,
                "limits.max_connections in force.",
            )?,
            login_duration: histogram(
                names::LOGIN_DURATION,
                "Logins as clients see them: from the credentials to popgate's answer, by result.",
                &["tenant", "result"],
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            )?,
            certificate_expiry: gauge(
                names::CERTIFICATE_EXPIRY,
                "A served certificate's notAfter, as Unix seconds.",
                &["tenant", "certificate"],
            )?,
            auth_http_duration: histogram(
                names::AUTH_HTTP_DURATION,
                "Time for auth_http lookups that went to the service.",
                &["tenant"],
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )?,
            auth_http_errors: counter(
                names::AUTH_HTTP_ERRORS,
                "auth_http lookups that gave no answer, by reason.",
                &["tenant", "reason"],
            )?,
            auth_http_cache: counter(
                names::AUTH_HTTP_CACHE,
                "auth_http lookups answered from the cache (hit) or not (miss).",
                &["tenant", "result"],
            )?,
            dns_lookups: counter(
                names::DNS_LOOKUPS,
                "DNS lookups of store names (A/AAAA or SRV).",
                &["name"],
            )?,
            dns_failures: counter(
                names::DNS_LOOKUP_FAILURES,
                "DNS lookups of store names that failed.",
                &["name"],
            )?,
            reload_successful: plain_gauge(
                &registry,
                names::RELOAD_SUCCESSFUL,
                "1 when the last config load (start or reload) succeeded, 0 when it was refused.",
            )?,
            reload_success_time: plain_gauge(
                &registry,
                names::RELOAD_SUCCESS_TIME,
                "Unix time of the last successful config load (start or reload).",
            )?,
            store_state: gauge(
                names::STORE_STATE,
                "1 for the store's runtime state (ready, drain, maint), 0 for the others.",
                &["store", "state"],
            )?,
            store_weight: gauge(
                names::STORE_WEIGHT,
                "The store's weight in force.",
                &["store"],
            )?,
            placement_lookups: counter(
                names::PLACEMENT_LOOKUPS,
                "Placement lookups, by result.",
                &["tenant", "source", "result"],
            )?,
            placement_duration: histogram(
                names::PLACEMENT_DURATION,
                "Time for placement lookups that went to their directory.",
                &["tenant", "source"],
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )?,
            placement_cache: counter(
                names::PLACEMENT_CACHE,
                "Placement answers from the cache: hit, stale (the directory failing) or miss.",
                &["tenant", "source", "result"],
            )?,
            placement_entries: gauge(
                names::PLACEMENT_MAP_ENTRIES,
                "Mailboxes in a placement map file.",
                &["tenant"],
            )?,
            tenants: Arc::default(),
            cluster: Arc::default(),
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new(
                names::BUILD_INFO,
                "Always 1; the labels say which build runs.",
            )
            .namespace("popgate"),
            &["version", "tls_provider"],
        )?;
        m.registry.register(Box::new(build.clone()))?;
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::certs::PROVIDER_NAME])
            .set(1);
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
            remove_matching(
                &families,
                names::LOGIN_DURATION,
                &self.login_duration,
                |l| drop_series(t, l),
            );
            remove_matching(
                &families,
                names::AUTH_HTTP_ERRORS,
                &self.auth_http_errors,
                |l| drop_series(t, l),
            );
            remove_matching(
                &families,
                names::AUTH_HTTP_CACHE,
                &self.auth_http_cache,
                |l| drop_series(t, l),
            );
            let _ = self.auth_http_duration.remove_label_values(&[t]);
            for family in [names::PLACEMENT_LOOKUPS, names::PLACEMENT_CACHE] {
                let vec = if family == names::PLACEMENT_LOOKUPS {
                    &self.placement_lookups
                } else {
                    &self.placement_cache
                };
                remove_matching(&families, family, vec, |l| drop_series(t, l));
            }
            remove_matching(
                &families,
                names::PLACEMENT_DURATION,
                &self.placement_duration,
                |l| drop_series(t, l),
            );
            let _ = self.placement_entries.remove_label_values(&[t]);
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
            states: STORE_STATES.map(|s| self.store_state.with_label_values(&[label, s])),
            weight: self.store_weight.with_label_values(&[label]),
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

    /// A client TLS handshake: `kind` is `full`, `resumed` (a session ticket or id was accepted) or
    /// `none` for one that failed.
    pub fn tls_handshake(&self, listener: &str, ok: bool, version: &str, kind: &str) {
        let result = if ok { "ok" } else { "error" };
        self.tls_handshakes
            .with_label_values(&[listener, result, version, kind])
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

    /// A config reload: counted, and the last-reload gauges set.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        self.config_loaded(ok);
    }

    /// A config load (at start, or a reload): the last-reload gauges.
    pub fn config_loaded(&self, ok: bool) {
        self.reload_successful.set(i64::from(ok));
        if ok {
            self.reload_success_time.set(unix_now());
        }
    }

    /// A client connection opened; it counts as open until the guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections_open.inc();
        OpenConnection(self.connections_open.clone())
    }

    /// `limits.max_connections` in force.
    pub fn set_connections_max(&self, max: usize) {
        self.connections_max
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// Login attempts since the start, per tenant and result (every mechanism summed), for `/status`.
    pub fn logins_by_tenant(&self) -> HashMap<String, HashMap<String, u64>> {
        let mut out: HashMap<String, HashMap<String, u64>> = HashMap::new();
        let full = format!("popgate_{}", names::LOGINS_TOTAL);
        for family in self.registry.gather().iter().filter(|f| f.name() == full) {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                };
                let (Some(tenant), Some(result)) = (label("tenant"), label("result")) else {
                    continue;
                };
                // Counters hold whole numbers.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let n = metric.get_counter().get_value() as u64;
                *out.entry(tenant).or_default().entry(result).or_default() += n;
            }
        }
        out
    }

    /// A login as the client saw it.
    pub fn login_duration(&self, tenant: &str, result: &str, secs: f64) {
        self.login_duration
            .with_label_values(&[tenant, result])
            .observe(secs);
    }

    /// The served certificates now: replaces every expiry series.
    pub fn certificates(&self, certs: &[CertificateInfo]) {
        self.certificate_expiry.reset();
        for c in certs {
            self.certificate_expiry
                .with_label_values(&[c.tenant.as_str(), c.certificate.as_str()])
                .set(c.not_after);
        }
    }

    /// A tenant's auth_http series.
    pub fn auth_http(&self, tenant: &str) -> AuthHttpMetrics {
        AuthHttpMetrics {
            duration: self.auth_http_duration.with_label_values(&[tenant]),
            hit: self.auth_http_cache.with_label_values(&[tenant, "hit"]),
            miss: self.auth_http_cache.with_label_values(&[tenant, "miss"]),
            errors: AUTH_HTTP_ERROR_REASONS
                .iter()
                .map(|r| self.auth_http_errors.with_label_values(&[tenant, r]))
                .collect(),
        }
    }

    /// A tenant's placement series for `source` (`map`, `ldap`, `sql`).
    pub fn placement(&self, tenant: &str, source: &str) -> PlacementMetrics {
        let cache = |r: &str| self.placement_cache.with_label_values(&[tenant, source, r]);
        PlacementMetrics {
            duration: self.placement_duration.with_label_values(&[tenant, source]),
            results: PLACEMENT_RESULTS
                .iter()
                .map(|r| {
                    self.placement_lookups
                        .with_label_values(&[tenant, source, r])
                })
                .collect(),
            hit: cache("hit"),
            stale: cache("stale"),
            miss: cache("miss"),
        }
    }

    /// The gauge of a tenant's placement map entries.
    pub fn placement_map_entries(&self, tenant: &str) -> IntGauge {
        self.placement_entries.with_label_values(&[tenant])
    }

    /// A DNS lookup of a store name.
    pub fn dns_lookup(&self, name: &str, ok: bool) {
        self.dns_lookups.with_label_values(&[name]).inc();
        if !ok {
            self.dns_failures.with_label_values(&[name]).inc();
        }
    }
}

/// The upper bound of the bucket holding a histogram's 95th percentile.
fn p95(h: &Histogram) -> Option<f64> {
    use prometheus::core::Collector;
    let families = h.collect();
    let hist = families.first()?.get_metric().first()?.get_histogram();
    let count = hist.get_sample_count();
    if count == 0 {
        return None;
    }
    // Counts are far below 2^52: exact as f64.
    #[allow(clippy::cast_precision_loss)]
    let wanted = (count as f64 * 0.95).ceil();
    #[allow(clippy::cast_precision_loss)]
    hist.get_bucket()
        .iter()
        .find(|b| b.cumulative_count() as f64 >= wanted)
        .map(|b| b.upper_bound())
}

/// Now, as Unix seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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
