//! The running process: the current config snapshot (swapped atomically on reload), the listeners (added
//! and removed by difference), the session registry (for kicks and status), and the two stop signals:
//! `draining` (stop accepting, end pre-login sessions) and `stop` (end relays too).
//!
//! Sessions keep the snapshot they started with; a reload never touches them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Config, ReadyWhen};
pub use crate::context::{Context, ReloadRecord, SessionEntry, SessionRegistry};
use crate::metrics::Metrics;
use crate::proxy::Shared;

/// Why popgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] crate::listener::BindError),
    /// Certificates, CA bundles or the DNS resolver could not be set up.
    #[error(transparent)]
    Setup(#[from] crate::proxy::SharedError),
    /// Metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The shared state's files or settings.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The admin HTTP server could not bind.
    #[error("admin server cannot bind {addr}: {source}")]
    Admin {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// What this replica does for the fleet's commands (held weakly: the shared state's tasks must not keep a
/// stopped runtime alive).
struct FleetCommandsOf(std::sync::Weak<Runtime>);

impl crate::cluster::FleetCommands for FleetCommandsOf {
    fn kick(&self, matches: &dyn Fn(&crate::context::SessionFacts<'_>) -> bool) -> usize {
        self.0
            .upgrade()
            .map_or(0, |rt| rt.context.sessions.kick_where(matches))
    }

    fn flush_auth_cache(&self) -> usize {
        self.0.upgrade().map_or(0, |rt| rt.flush_auth_cache())
    }

    fn store_control(&self, store: &str, state: Option<&str>, weight: Option<u32>) -> usize {
        self.0
            .upgrade()
            .map_or(0, |rt| rt.context.control_store(store, state, weight))
    }
}

/// Why a reload was refused; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// popgate was started from a config value, not a file.
    #[error("popgate was started without a config file")]
    NoConfigFile,
    /// The file cannot be read, parsed or validated.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Certificates, CA bundles, secrets or the resolver cannot be set up.
    #[error(transparent)]
    Setup(#[from] crate::proxy::SharedError),
    /// A new listener cannot bind.
    #[error(transparent)]
    Bind(#[from] crate::listener::BindError),
    /// The shared state's files or settings.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Why the config directory cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// popgate was started from a config value, not a file.
    #[error("no config file to watch")]
    NoConfigFile,
    /// The file-change notifier failed.
    #[error("watching {dir}: {source}")]
    Notify {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: notify::Error,
    },
}

#[derive(Debug)]
struct ListenerHandle {
    bind: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
    /// Cancelled once the accept loop has ended and its socket is closed.
    closed: CancellationToken,
}

/// The running process.
#[derive(Debug)]
pub struct Runtime {
    /// Shared with every session.
    pub context: Arc<Context>,
    current: ArcSwap<Shared>,
    listeners: Mutex<HashMap<String, ListenerHandle>>,
    permits: Arc<Semaphore>,
    /// `limits.max_connections` in force: what `permits` holds when no connection is open.
    permits_total: Mutex<usize>,
    tracker: TaskTracker,
    config_path: Option<PathBuf>,
    reloads: Mutex<Vec<ReloadRecord>>,
    reload_lock: tokio::sync::Mutex<()>,
    admin_addr: Mutex<Option<SocketAddr>>,
}

impl Runtime {
    /// Builds the first snapshot, binds every listener and starts serving. `stop` ends everything when
    /// cancelled; `config_path` is what reloads re-read (none: reloads are refused).
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        let metrics = Metrics::new()?;
        let context = Arc::new(Context::new(
            metrics,
            crate::throttle::Throttle::new(crate::throttle::ThrottleConfig::from_settings(
                &config.throttle,
            )),
            stop.clone(),
        ));
        let config = Arc::new(config);
        let shared = Arc::new(Shared::new(config.clone(), context.clone(), None).await?);
        let wanted: Vec<(String, SocketAddr)> = config
            .listeners
            .iter()
            .map(|l| (l.value.name.clone(), l.value.bind))
            .collect();
        let bound = crate::listener::bind_all(&wanted).await?;
        let rt = Arc::new(Self {
            context,
            current: ArcSwap::new(shared),
            listeners: Mutex::default(),
            permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            permits_total: Mutex::new(config.limits.max_connections),
            tracker: TaskTracker::new(),
            config_path,
            reloads: Mutex::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            admin_addr: Mutex::default(),
        });
        rt.configure_fleet(&config).await?;
        rt.context.metrics.config_loaded(true);
        rt.context
            .metrics
            .certificates(rt.snapshot().certificates());
        rt.context
            .metrics
            .set_connections_max(config.limits.max_connections);
        for ((name, bind), tcp) in wanted.into_iter().zip(bound) {
            rt.spawn_listener(name, bind, tcp);
        }
        // Forget idle throttle keys now and then, so memory stays bounded under a botnet.
        {
            let ctx = rt.context.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = ctx.stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(60)) => ctx.throttle.purge(),
                    }
                }
            });
        }
        if let Some(admin) = &config.admin {
            let addr = crate::admin::spawn(rt.clone(), admin)
                .await
                .map_err(|source| StartError::Admin {
                    addr: admin.bind,
                    source,
                })?;
            *rt.admin_addr.lock().unwrap_or_else(PoisonError::into_inner) = Some(addr);
        }
        Ok(rt)
    }

    /// Puts `cluster:` in force: connects to the shared state (anew when its settings changed), or
    /// turns it off.
    async fn configure_fleet(
        self: &Arc<Self>,
        config: &Config,
    ) -> Result<(), crate::cluster::ClusterError> {
        let commands = Arc::new(FleetCommandsOf(Arc::downgrade(self)));
        self.context
            .fleet
            .configure(
                config.cluster.as_ref(),
                &config.base_dir,
                &self.context.metrics,
                commands,
                &self.context.stop,
            )
            .await
    }

    /// Empties every tenant's auth_http answer cache; returns the answers dropped.
    pub fn flush_auth_cache(&self) -> usize {
        let shared = self.snapshot();
        let mut dropped = 0;
        for tenant in shared.tenants.iter() {
            if let Some(service) = &tenant.auth_http {
                dropped += service.cache_len();
                service.clear_cache();
            }
        }
        dropped
    }

    fn spawn_listener(
        self: &Arc<Self>,
        name: String,
        bind: SocketAddr,
        tcp: tokio::net::TcpListener,
    ) {
        let local = tcp.local_addr().unwrap_or(bind);
        info!(listener = %name, addr = %local, "listening");
        let stop = self.context.draining.child_token();
        let closed = CancellationToken::new();
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                name.clone(),
                ListenerHandle {
                    bind,
                    local,
                    stop: stop.clone(),
                    closed: closed.clone(),
                },
            );
        let accepting = crate::listener::accept_loop(
            tcp,
            name,
            self.context.clone(),
            self.clone(),
            self.permits.clone(),
            self.tracker.clone(),
            stop,
        );
        self.tracker.spawn(async move {
            // The loop owns the socket: it is closed once the loop's future has finished.
            accepting.await;
            closed.cancel();
        });
    }

    /// The current config snapshot.
    pub fn snapshot(&self) -> Arc<Shared> {
        self.current.load_full()
    }

    /// Every listener's name and bound address.
    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<(String, SocketAddr)> = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(n, h)| (n.clone(), h.local))
            .collect();
        v.sort();
        v
    }

    /// The admin server's address, when one runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        *self
            .admin_addr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Recent reloads, newest last.
    pub fn reloads(&self) -> Vec<ReloadRecord> {
        self.reloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ready: not draining, listening, and the stores `admin.ready_when` asks for are up.
    pub fn is_ready(&self) -> bool {
        if self.context.draining.is_cancelled() || self.addrs().is_empty() {
            return false;
        }
        let snapshot = self.snapshot();
        let mut store_up = snapshot
            .tenants
            .iter()
            // An auth_http tenant's stores are named per login by its service: none to wait for.
            .map(|t| t.auth_http.is_some() || t.group.status().iter().any(|s| s.up));
        match snapshot.config.admin.as_ref().map(|a| a.ready_when) {
            Some(ReadyWhen::AllTenants) => store_up.all(|up| up),
            Some(ReadyWhen::Listening) => true,
            Some(ReadyWhen::AnyTenant) | None => store_up.any(|up| up),
        }
    }

    /// Re-reads the config file; if it is valid, swaps it in (sessions in flight keep theirs). A bad file
    /// leaves the running config untouched and says why.
    pub async fn reload(self: &Arc<Self>) -> Result<(), ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let result = self.try_reload().await;
        let ok = result.is_ok();
        self.context.metrics.config_reload(ok);
        let message = match &result {
            Ok(msg) => {
                info!("config reloaded: {msg}");
                msg.clone()
            }
            Err(e) => {
                error!("config reload refused; the running config stays: {e}");
                e.to_string()
            }
        };
        let mut log = self.reloads.lock().unwrap_or_else(PoisonError::into_inner);
        log.push(ReloadRecord {
            at: SystemTime::now(),
            ok,
            message,
        });
        let excess = log.len().saturating_sub(20);
        log.drain(..excess);
        result.map(drop)
    }

    /// Changes the global connection cap. Growing adds permits now; shrinking takes free permits now and
    /// the rest as open connections end (none is cut).
    fn resize_permits(&self, wanted: usize) {
        let mut total = self
            .permits_total
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if wanted > *total {
            self.permits.add_permits(wanted - *total);
        } else if wanted < *total {
            let excess = *total - wanted;
            let taken = self.permits.forget_permits(excess);
            if let Ok(rest) = u32::try_from(excess - taken)
                && rest > 0
            {
                let permits = self.permits.clone();
                let stop = self.context.stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        got = permits.acquire_many_owned(rest) => {
                            if let Ok(p) = got {
                                p.forget();
                            }
                        }
                    }
                });
            }
        }
        *total = wanted;
        self.context.metrics.set_connections_max(wanted);
    }

    async fn try_reload(self: &Arc<Self>) -> Result<String, ReloadError> {
        let path = self
            .config_path
            .as_deref()
            .ok_or(ReloadError::NoConfigFile)?;
        let began = std::time::Instant::now();
        let config = Config::load(path)?;
        let parsed = began.elapsed();
        // Bind new listeners first: if one cannot bind, nothing changes.
        let current: HashMap<String, SocketAddr> = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(n, h)| (n.clone(), h.bind))
            .collect();
        let added: Vec<(String, SocketAddr)> = config
            .listeners
            .iter()
            .filter(|l| current.get(&l.value.name) != Some(&l.value.bind))
            .map(|l| (l.value.name.clone(), l.value.bind))
            .collect();
        let removed: Vec<String> = current
            .iter()
            .filter(|(n, b)| {
                !config
                    .listeners
                    .iter()
                    .any(|l| &l.value.name == *n && l.value.bind == **b)
            })
            .map(|(n, _)| n.clone())
            .collect();
        let config = Arc::new(config);
        let previous = self.snapshot();
        // A snapshot that is not swapped in (a failed reload) is dropped with what it built; what it
        // shares with the running one (stores, names, unchanged tenants) stays.
        let shared =
            Arc::new(Shared::new(config.clone(), self.context.clone(), Some(&previous)).await?);
        drop(previous);
        let built = shared.built;
        self.configure_fleet(&config).await?;
        // A listener leaving an address a new one needs (moved to another IP on the same port, or renamed)
        // is stopped first, so the new bind can work; if a bind fails anyway, the stopped ones come back.
        let freed = self.stop_conflicting(&removed, &added).await;
        let bound = match crate::listener::bind_all(&added).await {
            Ok(bound) => bound,
            Err(e) => {
                self.restore(freed).await;
                return Err(e.into());
            }
        };
        let tenant_names: Vec<String> = config.tenants.keys().cloned().collect();
        let admin_bind = |c: &Config| c.admin.as_ref().map(|a| a.bind);
        if admin_bind(&config) != admin_bind(&self.snapshot().config) {
            warn!("admin.bind changed: the admin server keeps its address until a restart");
        }
        self.context.metrics.certificates(shared.certificates());
        self.current.store(shared);
        // The operator's runtime store states and weights last until the next reload.
        self.context.stores.reset_controls();
        // The edge defences and the connection cap take the new settings; their counters stay.
        self.context
            .throttle
            .reconfigure(crate::throttle::ThrottleConfig::from_settings(
                &config.throttle,
            ));
        self.resize_permits(config.limits.max_connections);
        self.context.metrics.retain_tenants(&tenant_names);
        for name in &removed {
            if let Some(h) = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(name)
            {
                info!(listener = %name, "listener removed by reload");
                h.stop.cancel();
            }
        }
        for ((name, bind), tcp) in added.into_iter().zip(bound) {
            self.spawn_listener(name, bind, tcp);
        }
        Ok(format!(
            "{} listeners, {} tenants ({built} rebuilt); read in {} ms, applied in {} ms",
            config.listeners.len(),
            config.tenants.len(),
            parsed.as_millis(),
            (began.elapsed() - parsed).as_millis()
        ))
    }

    /// Stops each listener of `removed` whose address conflicts with one of `added` and waits until its
    /// socket is closed; returns their names, configured addresses and bound addresses.
    async fn stop_conflicting(
        &self,
        removed: &[String],
        added: &[(String, SocketAddr)],
    ) -> Vec<(String, SocketAddr, SocketAddr)> {
        let stopping: Vec<(String, ListenerHandle)> = {
            let mut listeners = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let names: Vec<&String> = removed
                .iter()
                .filter(|name| {
                    listeners.get(*name).is_some_and(|h| {
                        added
                            .iter()
                            .any(|(_, b)| crate::listener::overlap(h.local, *b))
                    })
                })
                .collect();
            names
                .into_iter()
                .filter_map(|name| listeners.remove(name).map(|h| (name.clone(), h)))
                .collect()
        };
        let mut freed = Vec::with_capacity(stopping.len());
        for (name, handle) in stopping {
            info!(listener = %name, addr = %handle.local, "stopping a listener whose address a new one needs");
            handle.stop.cancel();
            if tokio::time::timeout(Duration::from_secs(5), handle.closed.cancelled())
                .await
                .is_err()
            {
                warn!(listener = %name, "listener did not close within 5 s");
            }
            freed.push((name, handle.bind, handle.local));
        }
        freed
    }

    /// Binds and serves again listeners [`Self::stop_conflicting`] stopped (a reload that failed).
    /// Each comes back on the address it had (`local`; the same as `bind` unless that asked for port 0).
    async fn restore(self: &Arc<Self>, freed: Vec<(String, SocketAddr, SocketAddr)>) {
        for (name, bind, local) in freed {
            match crate::listener::bind_all(&[(name.clone(), local)]).await {
                Ok(mut tcp) => {
                    if let Some(tcp) = tcp.pop() {
                        self.spawn_listener(name, bind, tcp);
                    }
                }
                Err(e) => {
                    error!(error = %e, "a listener stopped for a failed reload cannot bind again")
                }
            }
        }
    }

    /// Graceful stop: readiness false and no new connections at once, pre-login sessions told to come back,
    /// relays allowed to finish for up to `grace`, then everything closes (without QUIT to stores).
    pub async fn drain(&self, grace: Duration) {
        info!(
            grace_s = grace.as_secs_f64(),
            sessions = self.context.sessions.len(),
            "draining"
        );
        self.context.draining.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = self.context.sessions.len(),
                "grace period over; closing the remaining sessions"
            );
        }
        self.context.stop.cancel();
        self.tracker.wait().await;
    }

    /// Stops at once.
    pub fn shutdown(&self) {
        self.context.draining.cancel();
        self.context.stop.cancel();
    }

    /// Waits until everything has stopped.
    pub async fn wait(&self) {
        self.context.stop.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// The config path reloads read.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }
}

/// How long the config directory must be quiet after a change before it is reloaded.
const CONFIG_SETTLE: Duration = Duration::from_millis(500);

/// Reloads when the config file's directory changes (debounced). Watching the directory rather than the file
/// catches editors that replace files and Kubernetes, which swaps a ConfigMap's `..data` symlink; a volume
/// swap also reloads the certificates beside the config.
pub fn watch_config_dir(runtime: &Arc<Runtime>) -> Result<(), WatchError> {
    let Some(path) = runtime.config_path() else {
        return Err(WatchError::NoConfigFile);
    };
    let path = path.to_path_buf();
    let mut watch = crate::watch::watch_file(&path).map_err(|source| WatchError::Notify {
        dir: crate::watch::watched_dir(&path),
        source,
    })?;
    // What the file held when last loaded: a change event that leaves the bytes as they were (a touch, an
    // editor's save without edits) is not worth a reload. Read before the watch task runs, so an edit made
    // right after this call is seen as one.
    let mut loaded = std::fs::read(&path).ok();
    let runtime = runtime.clone();
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                () = runtime.context.stop.cancelled() => break,
                change = watch.settled(CONFIG_SETTLE) => change,
            };
            let Some(change) = change else { break };
            let now = tokio::fs::read(&path).await.ok();
            if change == crate::watch::Change::File && now.is_some() && now == loaded {
                debug!(file = %path.display(), "config file touched but unchanged; not reloading");
                continue;
            }
            info!(dir = %watch.dir.display(), "config directory changed; reloading");
            let _ = runtime.reload().await;
            loaded = now;
        }
    });
    Ok(())
}

impl crate::listener::Snapshots for Runtime {
    fn current(&self) -> Arc<Shared> {
        self.snapshot()
    }
}

impl crate::admin::Control for Runtime {
    fn context(&self) -> &Context {
        &self.context
    }

    fn snapshot(&self) -> Arc<Shared> {
        Runtime::snapshot(self)
    }

    fn is_ready(&self) -> bool {
        Runtime::is_ready(self)
    }

    fn addrs(&self) -> Vec<(String, SocketAddr)> {
        Runtime::addrs(self)
    }

    fn flush_auth_cache(&self) -> usize {
        Runtime::flush_auth_cache(self)
    }

    fn reloads(&self) -> Vec<ReloadRecord> {
        Runtime::reloads(self)
    }

    type ReloadError = ReloadError;

    async fn reload(self: Arc<Self>) -> Result<(), ReloadError> {
        Runtime::reload(&self).await
    }
}
