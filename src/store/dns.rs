//! Store discovery by DNS: turning a configured store entry (`host:port` or an SRV name) into socket
//! addresses, and following those answers as their TTLs run out.
//!
//! This module owns the resolver, the TTL arithmetic and the "keep the last good answer" rule: a
//! failed or empty re-resolution never takes stores away, it is retried after `min_ttl` instead.
//! It must not pick a store, probe one or connect to one; callers read the published list from a
//! [`tokio::sync::watch`] receiver and decide for themselves.
//!
//! The resolver runs with its response cache switched off: [`Discovery::watch`] already waits for
//! each answer's TTL, so a cache could only hide changes, and every lookup here must see what the
//! nameserver says now.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as ResponseError, NetError};
use hickory_resolver::proto::ProtoError;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What to resolve for one configured store entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `host:port` — an IP literal (no DNS at all) or a name resolved with A and AAAA.
    Host { host: String, port: u16 },
    /// An SRV name such as `_pop3._tcp.store.mail.svc.cluster.local` (Kubernetes headless services
    /// publish these).
    Srv { name: String },
}

/// One resolved store address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The DNS name it came from (SRV target or A/AAAA name, no trailing dot), or the IP literal as
    /// text: used for TLS server names and labels.
    pub host: String,
    /// SRV priority (lower is preferred); 0 for Host targets.
    pub priority: u16,
    /// SRV weight (0 in DNS means "rarely": mapped to 1 so it still gets a share); 1 for Host targets.
    pub weight: u32,
}

/// How to reach DNS and how often to ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Nameservers to ask (UDP, with TCP for truncated answers), e.g. 127.0.0.1:5353 in tests;
    /// empty = the system's resolv.conf (with its search list and hosts file).
    pub nameservers: Vec<SocketAddr>,
    /// Re-resolve no sooner than this, whatever the TTL (also the retry interval after a failure).
    /// Must be above zero: a 0-TTL record would otherwise be re-queried in a busy loop.
    pub min_ttl: Duration,
    /// Re-resolve at least this often, whatever the TTL. At least `min_ttl`.
    pub max_ttl: Duration,
    /// One query's timeout. The resolver retries a timed-out query, so one lookup of an
    /// unresponsive nameserver can take a small multiple of this.
    pub timeout: Duration,
}

/// Why a resolution failed. Each variant names the query it was about.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS settings: {reason}")]
    InvalidSettings { reason: &'static str },
    #[error("cannot read the system resolver configuration: {source}")]
    SystemConfig {
        #[source]
        source: NetError,
    },
    #[error("cannot build the DNS resolver: {source}")]
    Resolver {
        #[source]
        source: NetError,
    },
    #[error("{name:?} is not a valid DNS name: {source}")]
    InvalidName {
        name: String,
        #[source]
        source: ProtoError,
    },
    /// The nameserver did not answer in time, answered with an error code, or could not be reached.
    #[error("{record_type} lookup of {name} failed: {source}")]
    Lookup {
        name: String,
        record_type: RecordType,
        #[source]
        source: NetError,
    },
    /// The nameserver answered that the name does not exist or has no records of this type.
    #[error("{name} has no {record_type} records")]
    NoRecords {
        name: String,
        record_type: RecordType,
    },
    /// The name exists but yields no store address (no A/AAAA, or no SRV target with one).
    #[error("{name} resolves to no store address")]
    NoAddresses { name: String },
}

/// Resolves store targets and follows them by TTL.
#[derive(Debug)]
pub struct Discovery {
    resolver: TokioResolver,
    settings: DnsSettings,
    /// Counts lookups and failures per name, when set.
    metrics: Option<crate::metrics::Metrics>,
}

/// The per-target answers behind one [`Discovery::watch`] and the channel publishing their union.
#[derive(Debug)]
struct Published {
    /// Last good answer per target, indexed like the `targets` given to `watch`.
    per_target: Mutex<Vec<Vec<Endpoint>>>,
    sender: watch::Sender<Vec<Endpoint>>,
}

/// One target's re-resolution loop inside [`Discovery::watch`].
struct Follow {
    discovery: Arc<Discovery>,
    published: Arc<Published>,
    index: usize,
    target: Arc<Target>,
    shutdown: CancellationToken,
}

// === impl Target ===

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host { host, port } if host.contains(':') && !host.starts_with('[') => {
                write!(f, "[{host}]:{port}")
            }
            Target::Host { host, port } => write!(f, "{host}:{port}"),
            Target::Srv { name } => write!(f, "SRV {name}"),
        }
    }
}

// === impl DnsError ===

impl DnsError {
    /// A bounded label for metrics and structured logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            DnsError::InvalidSettings { .. } => "invalid_settings",
            DnsError::SystemConfig { .. } => "system_config",
            DnsError::Resolver { .. } => "resolver",
            DnsError::InvalidName { .. } => "invalid_name",
            DnsError::Lookup {
                source: NetError::Timeout,
                ..
            } => "timeout",
            DnsError::Lookup { .. } => "lookup_failed",
            DnsError::NoRecords { .. } => "no_records",
            DnsError::NoAddresses { .. } => "no_addresses",
        }
    }
}

// === impl DnsSettings ===

impl DnsSettings {
    fn validate(&self) -> Result<(), DnsError> {
        let reason = if self.min_ttl.is_zero() {
            "min_ttl must be above zero"
        } else if self.max_ttl < self.min_ttl {
            "max_ttl must be at least min_ttl"
        } else if self.timeout.is_zero() {
            "timeout must be above zero"
        } else {
            return Ok(());
        };
        Err(DnsError::InvalidSettings { reason })
    }

    /// The wait before asking again after an answer with this TTL (seconds).
    fn clamp_ttl(&self, ttl_secs: u32) -> Duration {
        // max-then-min rather than `clamp`, which would panic if the bounds were ever inverted.
        Duration::from_secs(u64::from(ttl_secs))
            .max(self.min_ttl)
            .min(self.max_ttl)
    }
}

// === impl Discovery ===

impl Discovery {
    /// A resolver for these settings. Does no I/O apart from reading resolv.conf when
    /// `nameservers` is empty.
    pub fn new(settings: DnsSettings) -> Result<Self, DnsError> {
        settings.validate()?;
        let mut builder = if settings.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|source| DnsError::SystemConfig { source })?
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|addr| {
                    // ConnectionConfig defaults to port 53; tests and sidecars listen elsewhere.
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            );
            // Explicit nameservers mean "ask these": /etc/hosts must not shadow them.
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        let options = builder.options_mut();
        options.timeout = settings.timeout;
        // A moka cache of capacity 0 stores nothing; see the module comment for why.
        options.cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|source| DnsError::Resolver { source })?;
        Ok(Self {
            resolver,
            settings,
            metrics: None,
        })
    }

    /// Counts every lookup and failure per name in `metrics` (`popgate_dns_lookups_total`).
    #[must_use]
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// One resolution. IP literals return immediately with ttl = max_ttl. SRV: every record, with
    /// its target's A/AAAA addresses (from the additional section when the server supplies them,
    /// else looked up). Returns the endpoints (sorted, deduplicated, never empty) and the time to
    /// wait before asking again, clamped to [min_ttl, max_ttl].
    pub async fn resolve(&self, target: &Target) -> Result<(Vec<Endpoint>, Duration), DnsError> {
        let (mut endpoints, ttl_secs) = match target {
            Target::Host { host, port } => {
                let literal = host.trim_start_matches('[').trim_end_matches(']');
                if let Ok(ip) = literal.parse::<IpAddr>() {
                    let endpoint = Endpoint {
                        addr: SocketAddr::new(ip, *port),
                        host: ip.to_string(),
                        priority: 0,
                        weight: 1,
                    };
                    return Ok((vec![endpoint], self.settings.max_ttl));
                }
                self.counted(host, self.resolve_host(host, *port).await)?
            }
            Target::Srv { name } => self.counted(name, self.resolve_srv(name).await)?,
        };
        endpoints.sort();
        endpoints.dedup();
        Ok((endpoints, self.settings.clamp_ttl(ttl_secs)))
    }

    /// Resolves every target once (a failed target contributes nothing and is logged), then
    /// spawns one task per target that re-resolves it when its TTL runs out; on failure it keeps
    /// that target's last good answer (warning once per failure streak) and retries after
    /// min_ttl. The receiver carries the combined, sorted, deduplicated endpoint list; a new value
    /// is sent only when the list changes. The tasks end when `shutdown` is cancelled or every
    /// receiver is dropped.
    pub async fn watch(
        self: Arc<Self>,
        targets: Vec<Target>,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Vec<Endpoint>> {
        let targets: Vec<Arc<Target>> = targets.into_iter().map(Arc::new).collect();

        // First answers concurrently, so one dead name does not delay the others by its timeouts.
        let mut first = JoinSet::new();
        for (index, target) in targets.iter().enumerate() {
            let discovery = Arc::clone(&self);
            let target = Arc::clone(target);
            first.spawn(async move { (index, discovery.resolve(&target).await) });
        }
        // A target whose first lookup failed (or whose task died) retries after min_ttl.
        let mut answers = vec![None; targets.len()];
        loop {
            let joined = tokio::select! {
                _ = shutdown.cancelled() => break,
                joined = first.join_next() => joined,
            };
            match joined {
                None => break,
                Some(Ok((index, result))) => {
                    if let (Some(slot), Some(target)) = (answers.get_mut(index), targets.get(index))
                    {
                        match result {
                            Ok(answer) => *slot = Some(answer),
                            Err(error) => warn!(
                                %target, %error, kind = error.as_str(),
                                "store discovery: first lookup failed; retrying"
                            ),
                        }
                    }
                }
                Some(Err(error)) => warn!(%error, "store discovery: a first lookup task failed"),
            }
        }

        let per_target: Vec<Vec<Endpoint>> = answers
            .iter()
            .map(|answer| answer.as_ref().map(|(e, _)| e.clone()).unwrap_or_default())
            .collect();
        let (sender, receiver) = watch::channel(combine(&per_target));
        if shutdown.is_cancelled() {
            return receiver;
        }
        let published = Arc::new(Published {
            per_target: Mutex::new(per_target),
            sender,
        });
        for (index, (target, answer)) in targets.into_iter().zip(answers).enumerate() {
            let (wait, failing) = match answer {
                Some((_, ttl)) => (ttl, false),
                None => (self.settings.min_ttl, true),
            };
            let follow = Follow {
                discovery: Arc::clone(&self),
                published: Arc::clone(&published),
                index,
                target,
                shutdown: shutdown.clone(),
            };
            tokio::spawn(follow.run(wait, failing));
        }
        receiver
    }

    /// Counts a lookup of `name` and whether it failed.
    fn counted<T>(&self, name: &str, result: Result<T, DnsError>) -> Result<T, DnsError> {
        if let Some(m) = &self.metrics {
            m.dns_lookup(name, result.is_ok());
        }
        result
    }

    /// A and AAAA for `host`, each address on `port`.
    async fn resolve_host(&self, host: &str, port: u16) -> Result<(Vec<Endpoint>, u32), DnsError> {
        let name = parse_name(host)?;
        let (ips, ttl) = self.lookup_addresses(&name).await?;
        if ips.is_empty() {
            return Err(DnsError::NoAddresses {
                name: host_text(&name),
            });
        }
        let host = host_text(&name);
        let endpoints = ips
            .into_iter()
            .map(|ip| Endpoint {
                addr: SocketAddr::new(ip, port),
                host: host.clone(),
                priority: 0,
                weight: 1,
            })
            .collect();
        Ok((endpoints, ttl))
    }

    /// Every SRV record of `srv_name` with its target's addresses. A target without addresses is
    /// skipped (the others still serve); a target whose lookup fails fails the whole answer, so the
    /// caller keeps its last good one instead of publishing a partial list.
    async fn resolve_srv(&self, srv_name: &str) -> Result<(Vec<Endpoint>, u32), DnsError> {
        let name = parse_name(srv_name)?;
        let Some(lookup) = self.lookup(&name, RecordType::SRV).await? else {
            return Err(DnsError::NoRecords {
                name: host_text(&name),
                record_type: RecordType::SRV,
            });
        };
        let mut ttl = u32::MAX;
        let mut endpoints = Vec::new();
        // Several SRV records may share a target (one host, several ports): look it up once.
        let mut looked_up: HashMap<Name, (Vec<IpAddr>, u32)> = HashMap::new();
        for record in lookup.answers() {
            let RData::SRV(srv) = &record.data else {
                continue; // CNAMEs on the way to the SRV set
            };
            // RFC 2782: a lone "." target means the service is decidedly not offered here.
            if srv.target.is_root() {
                continue;
            }
            ttl = ttl.min(record.ttl);
            let glue = addresses_for(lookup.additionals(), &srv.target);
            let (ips, address_ttl) = if !glue.0.is_empty() {
                glue
            } else if let Some(known) = looked_up.get(&srv.target) {
                known.clone()
            } else {
                let found = self.lookup_addresses(&srv.target).await?;
                looked_up.insert(srv.target.clone(), found.clone());
                found
            };
            let host = host_text(&srv.target);
            if ips.is_empty() {
                debug!(srv = %host_text(&name), target = %host, "SRV target has no address; skipped");
                continue;
            }
            ttl = ttl.min(address_ttl);
            endpoints.extend(ips.into_iter().map(|ip| Endpoint {
                addr: SocketAddr::new(ip, srv.port),
                host: host.clone(),
                priority: srv.priority,
                weight: u32::from(srv.weight.max(1)),
            }));
        }
        if endpoints.is_empty() {
            return Err(DnsError::NoAddresses {
                name: host_text(&name),
            });
        }
        Ok((endpoints, ttl))
    }

    /// The name's A and AAAA addresses and the smallest TTL on the way to them (CNAMEs
    /// included); empty (with TTL `u32::MAX`) when the name has neither. Both queries must get an
    /// answer: a timeout on one family fails the lookup rather than silently dropping that
    /// family's stores.
    async fn lookup_addresses(&self, name: &Name) -> Result<(Vec<IpAddr>, u32), DnsError> {
        let (v4, v6) = tokio::join!(
            self.lookup(name, RecordType::A),
            self.lookup(name, RecordType::AAAA)
        );
        let mut ips = Vec::new();
        let mut ttl = u32::MAX;
        for lookup in [v4?, v6?].into_iter().flatten() {
            for record in lookup.answers() {
                ttl = ttl.min(record.ttl);
                ips.extend(record.data.ip_addr());
            }
        }
        Ok((ips, ttl))
    }

    /// One query. `Ok(None)` when the nameserver says there is nothing of this type (NXDOMAIN or
    /// an empty NOERROR); every other failure is an error.
    async fn lookup(
        &self,
        name: &Name,
        record_type: RecordType,
    ) -> Result<Option<Lookup>, DnsError> {
        match self.resolver.lookup(name.clone(), record_type).await {
            Ok(lookup) => Ok(Some(lookup)),
            Err(NetError::Dns(ResponseError::NoRecordsFound(no_records)))
                if matches!(
                    no_records.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ) =>
            {
                Ok(None)
            }
            Err(source) => Err(DnsError::Lookup {
                name: host_text(name),
                record_type,
                source,
            }),
        }
    }
}

// === impl Follow ===

impl Follow {
    /// Waits `wait`, re-resolves, repeats. `failing` says whether the last attempt failed, so a
    /// failure streak is warned about once and its end is logged.
    async fn run(self, mut wait: Duration, mut failing: bool) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.published.sender.closed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            // Shutdown must not wait for a lookup against a nameserver that stopped answering.
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = self.discovery.resolve(&self.target) => result,
            };
            match result {
                Ok((endpoints, ttl)) => {
                    if failing {
                        info!(target = %self.target, "store discovery: lookups succeed again");
                        failing = false;
                    }
                    self.published.update(self.index, endpoints);
                    wait = ttl;
                }
                Err(error) => {
                    if failing {
                        debug!(target = %self.target, %error, "store discovery: still failing");
                    } else {
                        warn!(
                            target = %self.target, %error, kind = error.as_str(),
                            "store discovery: lookup failed; keeping the last good answer"
                        );
                        failing = true;
                    }
                    wait = self.discovery.settings.min_ttl;
                }
            }
        }
    }
}

// === impl Published ===

impl Published {
    /// Records one target's new answer and publishes the union if it changed.
    fn update(&self, index: usize, endpoints: Vec<Endpoint>) {
        // A panic elsewhere while holding the lock cannot leave the Vec half-written (each write
        // is one assignment), so a poisoned lock is still safe to use.
        let mut per_target = self
            .per_target
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(slot) = per_target.get_mut(index) else {
            return;
        };
        if *slot == endpoints {
            return;
        }
        *slot = endpoints;
        let combined = combine(&per_target);
        // Sent while holding the lock so two targets updating at once cannot publish out of order.
        self.sender.send_if_modified(|current| {
            if *current == combined {
                return false;
            }
            *current = combined;
            true
        });
    }
}

// === helpers ===

/// The union of every target's endpoints, sorted and deduplicated.
fn combine(per_target: &[Vec<Endpoint>]) -> Vec<Endpoint> {
    let mut all: Vec<Endpoint> = per_target.iter().flatten().cloned().collect();
    all.sort();
    all.dedup();
    all
}

fn parse_name(text: &str) -> Result<Name, DnsError> {
    Name::from_ascii(text).map_err(|source| DnsError::InvalidName {
        name: text.to_owned(),
        source,
    })
}

/// The name as a host string: lower case, punycode, no trailing dot.
fn host_text(name: &Name) -> String {
    let text = name.to_lowercase().to_ascii();
    match text.strip_suffix('.') {
        Some(stripped) if !stripped.is_empty() => stripped.to_owned(),
        _ => text,
    }
}

/// The A/AAAA addresses owned by `name` among `records`, and their smallest TTL.
fn addresses_for(records: &[Record], name: &Name) -> (Vec<IpAddr>, u32) {
    let mut ips = Vec::new();
    let mut ttl = u32::MAX;
    for record in records.iter().filter(|r| r.name == *name) {
        if let Some(ip) = record.data.ip_addr() {
            ips.push(ip);
            ttl = ttl.min(record.ttl);
        }
    }
    (ips, ttl)
}
