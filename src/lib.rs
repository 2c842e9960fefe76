//! popgate: a multi-tenant POP3 proxy and load balancer.
//!
//! # Layout
//! - [`config`]: the YAML schema, defaults and validation.
//! - [`listener`]: bind, accept, connection cap; spawns a task per client.
//! - [`session`]: the AUTHORIZATION state machine (no I/O) and its driver (timeouts, STLS).
//! - [`router`]: login name → mailbox → tenant, and the name to use at the store.
//! - [`store`]: picking a store and logging in there.
//! - [`relay`]: bytes both ways after login; QUIT seen, never invented.
//! - [`proxy`]: the one place that composes the stages above.
//! - [`protocol`]: POP3 and SASL wire formats, no I/O.
//! - [`vocab`]: shared vocabulary (tenant ids, mechanisms, policies, name normalisation); imports nothing.
//! - [`runtime`]: the running process: config snapshots and reload, listeners, drain.
//! - [`cluster`]: state shared across replicas in Redis/Valkey (limits, leases, fleet commands).
//! - [`context`]: what every session shares: metrics, throttles, the session registry, stop signals.
//! - [`admin`]: the admin HTTP server (metrics, health, status, reload, kick).
//! - [`certs`]: certificate files and the crypto provider (a leaf).
//! - [`tls`], [`stream`], [`secret`], [`metrics`], [`proxy_protocol`]: side modules used by any stage.
//!
//! The demo's and the tests' store is the `maildrop` crate (crates/maildrop); the load tool is the
//! `popload` crate (crates/popload, binary `popgate-bench`).
//! - [`demo`]: `popgate demo`.
//! - [`logs`]: the log writer (a buffer written out by one thread every 50 ms).

pub mod admin;
pub mod auth;
pub mod certs;
pub mod cluster;
pub mod config;
pub mod context;
pub mod demo;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod placement;
pub mod protocol;
pub mod proxy;
pub mod proxy_protocol;
pub mod relay;
pub mod router;
pub mod runtime;
pub mod secret;
pub mod session;
pub mod store;
pub mod stream;
pub mod throttle;
pub mod tls;
pub mod vocab;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use runtime::StartError;

/// A running popgate.
#[derive(Debug, Clone)]
pub struct Running {
    runtime: Arc<runtime::Runtime>,
}

impl Running {
    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.runtime
            .addrs()
            .into_iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| a)
    }

    /// Every listener's name and bound address.
    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        self.runtime.addrs()
    }

    /// The admin HTTP server's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.runtime.admin_addr()
    }

    /// Every tenant's stores with their health, sessions and pool (for status pages and tests).
    pub fn stores(&self) -> Vec<(String, Vec<store::group::StoreStatus>)> {
        self.runtime
            .snapshot()
            .tenants
            .iter()
            .map(|t| (t.group.tenant().to_string(), t.group.status()))
            .collect()
    }

    /// Re-reads the config file and swaps it in when valid.
    pub async fn reload(&self) -> Result<(), runtime::ReloadError> {
        self.runtime.reload().await
    }

    /// Graceful stop (see [`runtime::Runtime::drain`]).
    pub async fn drain(&self, grace: Duration) {
        self.runtime.drain(grace).await;
    }

    /// Asks everything to stop at once (sessions close without QUIT to their stores).
    pub fn shutdown(&self) {
        self.runtime.shutdown();
    }

    /// Waits until everything has stopped.
    pub async fn wait(self) {
        self.runtime.wait().await;
    }

    /// The process state, for the admin server and tests.
    pub fn runtime(&self) -> &Arc<runtime::Runtime> {
        &self.runtime
    }
}

/// Binds every listener of a validated config and starts serving. Returns once all are bound.
/// Reloads are refused (there is no file to re-read); see [`start_from_file`].
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    let runtime = runtime::Runtime::start(config, None, shutdown).await?;
    Ok(Running { runtime })
}

/// Like [`start`], remembering the file so reloads (SIGHUP, `POST /reload`, file changes) can re-read it.
pub async fn start_from_file(
    config: Config,
    path: PathBuf,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    let runtime = runtime::Runtime::start(config, Some(path), shutdown).await?;
    Ok(Running { runtime })
}

/// Starts popgate and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}
