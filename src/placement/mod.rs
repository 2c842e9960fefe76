//! Placement: where a tenant's mailbox lives, from the directory the ISP already runs. After the domain
//! picked the tenant and before its balance policy is asked, the tenant's source (a map file, LDAP or SQL)
//! may name the store and the name to log in with there, or say it does not know the mailbox.
//!
//! - [`map`]: the map file, held in memory and swapped whole when the file changes;
//! - [`ldap`], [`sql`]: the directories, behind [`cache`] (found and not-found TTLs, single-flight,
//!   stale-while-error).
//!
//! auth_http, which both authenticates and places, keeps its own path (`proxy::auth_http_login`). What an
//! answer names is checked by the caller against the tenant's stores and `allowed_networks`, so a
//! compromised directory cannot send logins to arbitrary hosts.

pub mod cache;
pub mod ldap;
pub mod map;
pub mod sql;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, NotFound, PlacementConfig};
use crate::metrics::{Metrics, PlacementMetrics};
use crate::vocab::LoginCase;

use self::cache::{Cache, Cached, Lifetimes};
use self::map::MapIndex;

/// Where a mailbox lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// `host`, `host:port`, or the name of one of the tenant's stores.
    pub store: String,
    /// The name to log in with at the store, instead of the client's.
    pub login: Option<String>,
}

/// A source's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The mailbox's store.
    Found(Placed),
    /// The source does not know the mailbox.
    NotFound,
}

/// Why a lookup gave no answer (the client gets `-ERR [SYS/TEMP]`, never a guessed store).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No answer within the lookup's time.
    #[error("placement lookup timed out")]
    Timeout,
    /// The directory failed (the message names no mailbox).
    #[error("placement lookup failed: {0}")]
    Failed(String),
}

/// Why a tenant's placement could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PlacementSetupError {
    /// The map file was refused.
    #[error(transparent)]
    Map(#[from] map::MapError),
    /// A file (password, CA) cannot be read, or a setting cannot be used.
    #[error("{0}")]
    Setting(String),
}

enum Source {
    Map(Arc<MapSource>),
    Ldap(Box<ldap::LdapSource>),
    Sql(sql::SqlSource),
}

/// A map file and the index loaded from it, swapped whole on a change.
struct MapSource {
    path: PathBuf,
    case: LoginCase,
    index: ArcSwap<MapIndex>,
    entries: prometheus::IntGauge,
}

/// One tenant's placement.
pub struct Placement {
    source: Source,
    name: &'static str,
    cache: Cache,
    timeout: Duration,
    /// What a mailbox the source does not know gets.
    pub not_found: NotFound,
    allowed: Vec<ipnet::IpNet>,
    default_port: u16,
    metrics: PlacementMetrics,
    /// The last failure (message, Unix seconds) until a lookup succeeds again, for `/status`.
    failing: Mutex<Option<(String, u64)>>,
    /// Stops the map watcher.
    _stop: Option<tokio_util::sync::DropGuard>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("source", &self.name)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Placement {
    /// Sets up `tenant`'s source: loads a map file (and watches it), or prepares the LDAP or SQL
    /// connections (made at the first lookup).
    ///
    /// # Errors
    /// The map file is refused, or a password or CA file cannot be read.
    pub fn new(
        settings: &PlacementConfig,
        config: &Config,
        tenant: &str,
        case: LoginCase,
        metrics: &Metrics,
    ) -> Result<Self, PlacementSetupError> {
        let read_password =
            |path: &Option<PathBuf>| -> Result<Option<String>, PlacementSetupError> {
                path.as_ref()
                    .map(|p| {
                        crate::secret::files::read_token_file(&config.resolve_path(p))
                            .map(|s| s.expose().to_string())
                            .map_err(|e| PlacementSetupError::Setting(e.to_string()))
                    })
                    .transpose()
            };
        let timeout = settings.timeout.get();
        let mut stop = None;
        let (source, name) = if let Some(path) = &settings.map {
            let path = config.resolve_path(path);
            let index = MapIndex::load(&path, case)?;
            let entries = metrics.placement_map_entries(tenant);
            entries.set(i64::try_from(index.len()).unwrap_or(i64::MAX));
            info!(tenant, file = %path.display(), mailboxes = index.len(), bytes = index.heap_bytes(), "placement map loaded");
            let map = Arc::new(MapSource {
                path,
                case,
                index: ArcSwap::from_pointee(index),
                entries,
            });
            let token = CancellationToken::new();
            if let Err(e) = watch_map(&map, tenant, token.clone()) {
                warn!(tenant, error = %e, "placement map: cannot watch the file; it is read again at the next reload");
            }
            stop = Some(token.drop_guard());
            (Source::Map(map), "map")
        } else if let Some(l) = &settings.ldap {
            let tls = match &l.ca {
                Some(ca) => Some(
                    crate::certs::load_roots(&config.resolve_path(ca))
                        .and_then(crate::certs::client_config_with_roots)
                        .map_err(|e| PlacementSetupError::Setting(e.to_string()))?,
                ),
                None => None,
            };
            let password = read_password(&l.password_file)?;
            (
                Source::Ldap(Box::new(ldap::LdapSource::new(
                    l.clone(),
                    password,
                    tls,
                    timeout,
                ))),
                "ldap",
            )
        } else if let Some(s) = &settings.sql {
            let password = read_password(&s.password_file)?;
            let source = sql::SqlSource::new(s, password.as_deref(), timeout)
                .map_err(PlacementSetupError::Setting)?;
            (Source::Sql(source), "sql")
        } else {
            return Err(PlacementSetupError::Setting(
                "placement has no source".into(),
            ));
        };
        let c = &settings.cache;
        Ok(Self {
            source,
            name,
            cache: Cache::new(
                c.size,
                Lifetimes {
                    ttl: c.ttl.get(),
                    negative_ttl: c.negative_ttl.get(),
                    stale_for: c.stale_for.get(),
                },
            ),
            timeout,
            not_found: settings.not_found,
            allowed: settings.allowed_networks.clone(),
            default_port: settings.default_port,
            metrics: metrics.placement(tenant, name),
            failing: Mutex::default(),
            _stop: stop,
        })
    }

    /// The source's kind: `map`, `ldap` or `sql`.
    pub fn source(&self) -> &'static str {
        self.name
    }

    /// Where `mailbox` (the normalised key) lives. Never waits past `limit` (nor the source's own
    /// timeout); a failing directory serves cached answers for `cache.stale_for` past their time.
    ///
    /// # Errors
    /// No answer in time, or the directory failed with nothing cached.
    pub async fn lookup(&self, mailbox: &str, limit: Duration) -> Result<Lookup, PlacementError> {
        let answer = self.answer(mailbox, limit).await;
        self.metrics.result(match &answer {
            Ok(Lookup::Found(_)) => "found",
            Ok(Lookup::NotFound) => "not_found",
            Err(_) => "error",
        });
        answer
    }

    async fn answer(&self, mailbox: &str, limit: Duration) -> Result<Lookup, PlacementError> {
        if let Source::Map(map) = &self.source {
            // Memory already: no cache, no flight.
            let index = map.index.load();
            return Ok(index
                .get(mailbox)
                .map_or(Lookup::NotFound, |(store, login)| {
                    Lookup::Found(Placed {
                        store: store.to_string(),
                        login: login.map(str::to_string),
                    })
                }));
        }
        let stale = match self.cache.get(mailbox, Instant::now()) {
            Cached::Fresh(lookup) => {
                self.metrics.hit.inc();
                return Ok(lookup);
            }
            Cached::Stale(lookup) => Some(lookup),
            Cached::Missing => None,
        };
        let limit = limit.min(self.timeout);
        let fetched =
            tokio::time::timeout(limit, self.cache.fly(mailbox, self.ask(mailbox, limit))).await;
        let error = match fetched {
            Ok(Ok(lookup)) => {
                self.metrics.miss.inc();
                self.cache.insert(mailbox, lookup.clone(), Instant::now());
                self.recovered();
                return Ok(lookup);
            }
            Ok(Err(message)) => PlacementError::Failed(message),
            Err(_) => PlacementError::Timeout,
        };
        self.failed(&error);
        match stale {
            Some(lookup) => {
                self.metrics.stale.inc();
                Ok(lookup)
            }
            None => Err(error),
        }
    }

    /// One question to the directory, timed.
    async fn ask(&self, mailbox: &str, limit: Duration) -> Result<Lookup, String> {
        let started = Instant::now();
        let answer = tokio::time::timeout(limit, async {
            match &self.source {
                Source::Ldap(l) => l.lookup(mailbox).await,
                Source::Sql(s) => s.lookup(mailbox).await,
                Source::Map(_) => Ok(Lookup::NotFound),
            }
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    fn failed(&self, error: &PlacementError) {
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        if failing.is_none() {
            warn!(source = self.name, error = %error, "placement directory failing; cached answers serve while they last");
        }
        let since = failing.as_ref().map_or_else(unix_now, |(_, since)| *since);
        *failing = Some((error.to_string(), since));
    }

    fn recovered(&self) {
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        if failing.take().is_some() {
            info!(source = self.name, "placement directory answers again");
        }
    }

    /// Counts an answer the caller refused (a store outside the tenant and its allowed networks).
    pub fn refused(&self) {
        self.metrics.result("refused");
    }

    /// Whether an answer may name a host at `ip` that is not one of the tenant's stores.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allowed.iter().any(|n| n.contains(&ip))
    }

    /// The port for an answer that names a host without one.
    pub fn default_port(&self) -> u16 {
        self.default_port
    }

    /// For `/status`: the source, whether it is failing (and since when, and why), what it holds.
    pub fn status(&self) -> serde_json::Value {
        let failing = self
            .failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut out = serde_json::json!({
            "source": self.name,
            "failing": failing.is_some(),
            "error": failing.as_ref().map(|(e, _)| e),
            "failing_since": failing.as_ref().map(|(_, since)| since),
            "cached": self.cache.len(),
        });
        if let Source::Map(map) = &self.source {
            let index = map.index.load();
            out["mailboxes"] = serde_json::json!(index.len());
            out["bytes"] = serde_json::json!(index.heap_bytes());
            out["file"] = serde_json::json!(map.path.display().to_string());
        }
        out
    }
}

/// How long the map's directory must be quiet after a change before the file is read again.
const MAP_SETTLE: Duration = Duration::from_millis(200);

/// Reads the map again when its file (or, on Kubernetes, the volume's `..data`) changes; a bad file is
/// logged and the running map stays.
fn watch_map(
    map: &Arc<MapSource>,
    tenant: &str,
    stop: CancellationToken,
) -> Result<(), notify::Error> {
    let mut watch = crate::watch::watch_file(&map.path)?;
    let map = map.clone();
    let tenant = tenant.to_string();
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                () = stop.cancelled() => break,
                change = watch.settled(MAP_SETTLE) => change,
            };
            if change.is_none() {
                break;
            }
            let (path, case) = (map.path.clone(), map.case);
            let loaded = tokio::task::spawn_blocking(move || MapIndex::load(&path, case)).await;
            match loaded {
                Ok(Ok(index)) => {
                    map.entries
                        .set(i64::try_from(index.len()).unwrap_or(i64::MAX));
                    info!(tenant = %tenant, mailboxes = index.len(), bytes = index.heap_bytes(), "placement map reloaded");
                    map.index.store(Arc::new(index));
                }
                Ok(Err(e)) => {
                    warn!(tenant = %tenant, error = %e, "placement map refused; the running map stays")
                }
                Err(e) => warn!(tenant = %tenant, error = %e, "placement map reload failed"),
            }
        }
    });
    Ok(())
}
