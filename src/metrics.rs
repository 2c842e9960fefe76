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
    /// Store health, 1 up, 0 down.
    pub const BACKEND_UP: &str = "backend_up";
    /// Time to connect (and TLS, greeting, CAPA) to a store.
    pub const BACKEND_CONNECT: &str = "backend_connect_seconds";
    /// Time for the store to answer a login.
    pub const BACKEND_LOGIN: &str = "backend_login_seconds";
    /// Pre-warmed connections waiting.
    pub const POOL_IDLE: &str = "pool_idle";
    /// Pool checkouts, by result (hit, miss).
    pub const POOL_CHECKOUTS: &str = "pool_checkouts_total";
    /// Logins that found every store of the tenant down (tried anyway).
    pub const BACKEND_ALL_DOWN: &str = "backend_all_down_total";
    /// Client TLS handshakes, by result and version.
    pub const TLS_HANDSHAKES: &str = "tls_handshakes_total";
    /// Refusals by the edge defences, by reason.
    pub const THROTTLED: &str = "throttled_total";
    /// Config reloads, by result.
    pub const CONFIG_RELOADS: &str = "config_reloads_total";
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
    backend_up: IntGaugeVec,
    backend_connect: HistogramVec,
    backend_login: HistogramVec,
    pool_idle: IntGaugeVec,
    pool_checkouts: IntCounterVec,
    all_down: IntCounterVec,
    tls_handshakes: IntCounterVec,
    throttled: IntCounterVec,
    config_reloads: IntCounterVec,
    tenants: Arc<Mutex<HashMap<String, Arc<TenantMetrics>>>>,
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
            backend_up: gauge(
                names::BACKEND_UP,
                "Store health: 1 up, 0 down.",
                &["tenant", "backend"],
            )?,
            backend_connect: histogram(
                names::BACKEND_CONNECT,
                "Time to connect to a store (TCP, TLS, greeting, CAPA).",
                &["tenant", "backend"],
                latency.clone(),
            )?,
            backend_login: histogram(
                names::BACKEND_LOGIN,
                "Time for a store to answer a login.",
                &["tenant", "backend"],
                latency,
            )?,
            pool_idle: gauge(
                names::POOL_IDLE,
                "Pre-warmed store connections waiting.",
                &["tenant", "backend"],
            )?,
            pool_checkouts: counter(
                names::POOL_CHECKOUTS,
                "Pool checkouts, by result.",
                &["tenant", "backend", "result"],
            )?,
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
            tenants: Arc::default(),
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
            self.remove_backend_series(&families, |l| drop_series(t, l));
        }
    }

    fn remove_backend_series(
        &self,
        families: &[prometheus::proto::MetricFamily],
        matches: impl Fn(&HashMap<&str, &str>) -> bool,
    ) {
        remove_matching(families, names::BACKEND_UP, &self.backend_up, &matches);
        remove_matching(families, names::POOL_IDLE, &self.pool_idle, &matches);
        remove_matching(
            families,
            names::POOL_CHECKOUTS,
            &self.pool_checkouts,
            &matches,
        );
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

    /// A store's health as seen now.
    pub fn backend_up(&self, tenant: &str, backend: &str, up: bool) {
        self.backend_up
            .with_label_values(&[tenant, backend])
            .set(i64::from(up));
    }

    /// Removes a store's series when it leaves its group.
    pub fn backend_gone(&self, tenant: &str, backend: &str) {
        let families = self.registry.gather();
        self.remove_backend_series(&families, |l| {
            l.get("tenant") == Some(&tenant) && l.get("backend") == Some(&backend)
        });
    }

    /// Time to prepare a store connection.
    pub fn backend_connect(&self, tenant: &str, backend: &str, secs: f64) {
        self.backend_connect
            .with_label_values(&[tenant, backend])
            .observe(secs);
    }

    /// Time for a store login.
    pub fn backend_login(&self, tenant: &str, backend: &str, secs: f64) {
        self.backend_login
            .with_label_values(&[tenant, backend])
            .observe(secs);
    }

    /// Pool size now.
    pub fn pool_idle(&self, tenant: &str, backend: &str, idle: usize) {
        self.pool_idle
            .with_label_values(&[tenant, backend])
            .set(i64::try_from(idle).unwrap_or(i64::MAX));
    }

    /// A pool checkout (hit or miss).
    pub fn pool_checkout(&self, tenant: &str, backend: &str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.pool_checkouts
            .with_label_values(&[tenant, backend, result])
            .inc();
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
        m.backend_up("acme", "10.0.0.1:110", true);
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
        m.retain_tenants(&["other".to_string()]);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("tenant=\"acme\""), "{text}");
    }
}
