//! popgate: a multi-tenant POP3 proxy and load balancer.
//!
//! # Layout
//! - [`config`]: the YAML schema, defaults and validation.
//! - [`listener`]: bind, accept, connection cap; spawns a task per client.
//! - [`session`]: the AUTHORIZATION state machine (no I/O) and its driver (timeouts, STLS).
//! - [`router`]: login name → mailbox → tenant, and the name to use at the store.
//! - [`upstream`]: picking a store and logging in there.
//! - [`relay`]: bytes both ways after login; QUIT seen, never invented.
//! - [`proxy`]: the one place that composes the stages above.
//! - [`protocol`]: POP3 and SASL wire formats, no I/O.
//! - [`tls`], [`stream`], [`secret`]: side modules used by any stage.
//! - [`maildrop`]: a small in-memory POP3 server for the demo and for fault-injection tests.
//! - [`demo`]: `popgate demo`.

pub mod config;
pub mod demo;
pub mod listener;
pub mod maildrop;
pub mod protocol;
pub mod proxy;
pub mod proxy_protocol;
pub mod relay;
pub mod router;
pub mod secret;
pub mod session;
pub mod stream;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// Why popgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("listener `{name}` cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Certificates, CA bundles or the DNS resolver could not be set up.
    #[error(transparent)]
    Setup(#[from] proxy::SharedError),
}

/// A running popgate: its bound addresses and its tasks.
#[derive(Debug)]
pub struct Running {
    addrs: Vec<(String, SocketAddr)>,
    shared: Arc<proxy::Shared>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Running {
    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
    }

    /// Every listener's name and bound address.
    pub fn addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// Every tenant's stores with their health, sessions and pool (for status pages and tests).
    pub fn stores(&self) -> Vec<(String, Vec<upstream::group::StoreStatus>)> {
        self.shared
            .tenants
            .iter()
            .map(|t| (t.group.tenant().to_string(), t.group.status()))
            .collect()
    }

    /// Asks everything to stop (sessions close without QUIT to their stores).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the shutdown token is cancelled and every task has finished.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Binds every listener of a validated config and starts serving. Returns once all are bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let shared = Arc::new(proxy::Shared::new(config.clone(), shutdown.clone()).await?);
    let wanted: Vec<(String, SocketAddr)> = config
        .listeners
        .iter()
        .map(|l| (l.value.name.clone(), l.value.bind))
        .collect();
    let bound = listener::bind_all(&wanted).await?;
    let permits = Arc::new(Semaphore::new(config.limits.max_connections));
    let tracker = TaskTracker::new();
    let mut addrs = Vec::new();
    for (l, tcp) in config.listeners.iter().zip(bound) {
        let l = &l.value;
        let local = tcp.local_addr().unwrap_or(l.bind);
        tracing::info!(listener = %l.name, addr = %local, tls = ?l.tls, "listening");
        addrs.push((l.name.clone(), local));
        let info = Arc::new(proxy::ListenerInfo {
            name: l.name.clone(),
            tls: l.tls,
            tenant: l
                .tenant
                .as_deref()
                .and_then(|t| shared.table.tenant_by_name(t)),
            proxy_from: l
                .proxy_protocol
                .as_ref()
                .map(|p| p.trusted_networks.clone()),
        });
        tracker.spawn(listener::accept_loop(
            tcp,
            info,
            shared.clone(),
            permits.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    Ok(Running {
        addrs,
        shared,
        tracker,
        shutdown,
    })
}

/// Starts popgate and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}
