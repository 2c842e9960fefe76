//! Shared state across replicas, in Redis or Valkey (standalone, Sentinel or Cluster): failed-login counts
//! and lockouts, session caps as leases, LOGIN-DELAY times, connection-rate buckets, and fleet commands
//! (`/kick`, the auth_http cache flush) published to every replica.
//!
//! Off by default ([`Fleet::off`]): then every call here answers [`Unavailable::Off`] at once and the
//! process-local throttle is the whole story, as it always was. With `cluster:` configured, the local
//! throttle stays the first tier (what it already knows, e.g. a lockout seen, costs the server nothing)
//! and this module is the second: the proxy takes the stricter of the two answers.
//!
//! Every call is bounded by `cluster.timeout`. A call that fails or times out marks the shared state
//! *degraded*: from then on calls answer [`Unavailable::Degraded`] without asking the server, a log line
//! says so, `popgate_cluster_degraded` is 1, and a probe pings the server until it answers. Then the
//! replica's leases are put back (so caps converge without a restart) and the log says it is back. What a
//! limit does meanwhile is the operator's choice per kind (`cluster.when_unavailable`): enforce it per
//! replica (open, the default) or refuse (closed).
//!
//! The key space and what each key holds are in [`keys`]; the Lua script and its ops in [`scripts`].
//! A successful login costs two round trips: before the store is asked, the address's and the mailbox's
//! locks, the tenant's lease and (on the connection's first attempt) the address's connection rate and
//! lease; after, the mailbox's lease, LOGIN-DELAY and the failures forgotten. Leases of ended sessions are
//! released in batches, not awaited.

pub mod keys;
pub mod scripts;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface, SortedSetsInterface};
use fred::prelude::{Client, Value};
use fred::types::config::{Config as FredConfig, ReconnectPolicy, Server, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ClusterConfig, ClusterMode, FailPolicy, WhenUnavailable};
use crate::metrics::ClusterMetrics;
use crate::vocab::{MailboxMatch, SessionFacts, SessionFilter};

use keys::Keys;
use scripts::{Op, Script};

/// Why the shared state gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No `cluster:` configured.
    Off,
    /// Configured, but not answering (or not in time).
    Degraded,
}

/// The whole fleet's answer to an address's new connection.
#[derive(Debug)]
pub enum IpAdmission {
    /// Admitted; the lease (when the per-IP session cap is on) is held until dropped.
    Admitted(Option<Lease>),
    /// Refused: `"rate"` or `"ip_sessions"`, as the local throttle names them.
    Refused(&'static str),
}

/// An address's limits checked fleet-wide on its connection's first login attempt.
#[derive(Debug, Clone, Copy)]
pub struct AddressLimits {
    /// The connection rate: `(burst, one token per)`.
    pub rate: Option<(u32, Duration)>,
    /// Sessions (connections) at once.
    pub max_sessions: Option<usize>,
}

/// The fleet's locks and the tenant's lease, before a store is asked.
#[derive(Debug)]
pub struct BeforeLogin {
    /// The address's admission, when it was asked for (the lease is held for the connection's life).
    pub address: Option<IpAdmission>,
    /// Time left of the address's lockout, if any.
    pub ip_locked: Option<Duration>,
    /// Time left of the mailbox's lockout (none when it spares this address), if any.
    pub mailbox_locked: Option<Duration>,
    /// The tenant's lease: `Ok(None)` when the tenant has no cap, `Err(())` when the cap is reached.
    pub tenant: Result<Option<Lease>, ()>,
}

/// The fleet's word after a store accepted the credentials.
#[derive(Debug)]
pub struct AfterLogin {
    /// The mailbox's lease: `Ok(None)` when no cap, `Err(())` when the cap is reached.
    pub mailbox: Result<Option<Lease>, ()>,
    /// LOGIN-DELAY time left when the previous login was less than the minimum interval ago (the lease
    /// is then not taken).
    pub login_delay: Option<Duration>,
}

/// A failed login as the fleet counted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// The larger of the address's and the mailbox's failure counts.
    pub failures: u32,
    /// Time left of the address's lockout, if any.
    pub ip_locked: Option<Duration>,
    /// Time left of the mailbox's lockout (none when it spares this address), if any.
    pub mailbox_locked: Option<Duration>,
}

/// What the limits in force are, as the fleet needs them (from the throttle's settings).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub lockout_after: u32,
    pub lockout_for: Duration,
    pub forget_after: Duration,
    /// `known_address_for` when `spare_known_addresses` is on.
    pub known_for: Option<Duration>,
}

/// A session lease held in the shared state; released when dropped (or, if this replica dies, gone
/// within `lease_ttl`).
#[derive(Debug)]
pub struct Lease {
    fleet: Arc<FleetInner>,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let held = lock(&self.fleet.held).remove(&self.id);
        self.fleet.count_leases();
        let (Some(held), Some(link)) = (held, self.fleet.link.load_full()) else {
            return;
        };
        // Released in batches by the link's releaser: one call for every session that ended meanwhile;
        // while Redis does not answer, kept until it does (or until the lease would have expired anyway).
        let _ = link.releases.send(held);
    }
}

/// A lease as its replica remembers it, to renew it.
#[derive(Debug, Clone)]
struct Held {
    key: String,
    member: String,
}

/// The process's handle on the shared state (in `Context`): off until configured; a reload may
/// reconfigure it.
#[derive(Debug, Clone)]
pub struct Fleet {
    inner: Arc<FleetInner>,
}

#[derive(Debug)]
struct FleetInner {
    link: ArcSwapOption<Link>,
    /// This replica's id: random per process.
    replica: String,
    next_lease: AtomicU64,
    held: Mutex<HashMap<u64, Held>>,
    leases_gauge: Mutex<Option<prometheus::IntGauge>>,
    /// Requests of this replica waiting for other replicas' answers.
    waiting: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<usize>>>,
}

impl FleetInner {
    fn count_leases(&self) {
        if let Some(g) = lock(&self.leases_gauge).as_ref() {
            g.set(i64::try_from(lock(&self.held).len()).unwrap_or(i64::MAX));
        }
    }
}

/// What a replica does for a fleet command another replica published.
pub trait FleetCommands: Send + Sync {
    /// Ends the sessions whose mailbox matches `matches`; returns how many.
    fn kick(&self, matches: &dyn Fn(&SessionFacts<'_>) -> bool) -> usize;
    /// Empties the auth_http answer caches; returns how many entries were dropped.
    fn flush_auth_cache(&self) -> usize;
    /// Sets a store's runtime state (`ready`, `drain`, `maint`) and weight; returns 1 when the store
    /// exists here, else 0.
    fn store_control(&self, store: &str, state: Option<&str>, weight: Option<u32>) -> usize;
}

/// A fleet command's result: what this replica did and what the others said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FleetResult {
    /// Sessions ended (or entries dropped) in all, this replica included.
    pub total: usize,
    /// Replicas that answered, this one included.
    pub replicas_answered: usize,
    /// Replicas with a live heartbeat when the command went out, this one included.
    pub replicas_expected: usize,
}

/// A message on the command channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum BusMessage {
    Kick {
        id: String,
        from: String,
        /// An exact mailbox's keyed digest (never the name).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mailbox: Option<String>,
        /// Matched ignoring ASCII case (a name that does not normalise).
        #[serde(default)]
        fold: bool,
        /// A mailbox pattern (`*`, `?`): an operator's pattern travels as typed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pattern: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        store: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<ipnet::IpNet>,
    },
    /// A store's runtime state and weight, set on every replica.
    Store {
        id: String,
        from: String,
        store: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
    },
    Flush {
        id: String,
        from: String,
    },
    Done {
        id: String,
        to: String,
        count: usize,
    },
}

impl Default for Fleet {
    fn default() -> Self {
        Self::off()
    }
}

impl Fleet {
    /// No shared state: every call answers [`Unavailable::Off`].
    pub fn off() -> Self {
        let mut id = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        Self {
            inner: Arc::new(FleetInner {
                link: ArcSwapOption::empty(),
                replica: id.iter().map(|b| format!("{b:02x}")).collect(),
                next_lease: AtomicU64::new(1),
                held: Mutex::default(),
                leases_gauge: Mutex::default(),
                waiting: Mutex::default(),
            }),
        }
    }

    /// Whether `cluster:` is configured.
    pub fn is_on(&self) -> bool {
        self.inner.link.load().is_some()
    }

    /// The policy for each kind of limit while unavailable (all open when off: the local limits apply).
    pub fn when_unavailable(&self) -> WhenUnavailable {
        self.inner
            .link
            .load()
            .as_ref()
            .map(|l| l.when_unavailable)
            .unwrap_or_default()
    }

    /// Puts `config` in force (at start and on every reload): connects anew when anything of the
    /// connection changed (servers, mode, credentials, TLS, key secret, prefix), else only takes the
    /// new timeouts and policies. `None` turns the shared state off. Waits at most a few seconds for the
    /// first connection; a replica that cannot reach the server starts degraded.
    ///
    /// # Errors
    /// A file the block names cannot be read, or the client cannot be built from it.
    pub async fn configure(
        &self,
        config: Option<&ClusterConfig>,
        base_dir: &std::path::Path,
        metrics: &crate::metrics::Metrics,
        commands: Arc<dyn FleetCommands>,
        stop: &CancellationToken,
    ) -> Result<(), ClusterError> {
        let Some(config) = config else {
            if let Some(old) = self.inner.link.swap(None) {
                info!("shared state turned off: limits are per replica");
                old.stop.cancel();
            }
            return Ok(());
        };
        let settings = Settings::read(config, base_dir)?;
        if let Some(current) = self.inner.link.load_full()
            && current.settings == settings
        {
            return Ok(());
        }
        let metrics = metrics.cluster().map_err(ClusterError::Metrics)?;
        *lock(&self.inner.leases_gauge) = Some(metrics.leases.clone());
        let link = Link::connect(settings, metrics, &self.inner, stop.child_token()).await?;
        let link = Arc::new(link);
        spawn_tasks(&link, &self.inner, commands);
        if let Some(old) = self.inner.link.swap(Some(link)) {
            old.stop.cancel();
        }
        Ok(())
    }

    /// The link when configured and not degraded.
    fn live(&self) -> Result<Arc<Link>, Unavailable> {
        let link = self.inner.link.load_full().ok_or(Unavailable::Off)?;
        if link.is_degraded() {
            return Err(Unavailable::Degraded);
        }
        Ok(link)
    }

    /// Whether the shared state is configured and answering: `None` when off.
    pub fn status(&self) -> Option<FleetStatus> {
        let link = self.inner.link.load_full()?;
        Some(FleetStatus {
            mode: link.mode,
            degraded: link.is_degraded(),
            since: *lock(&link.since),
            replicas: usize::try_from(link.metrics.replicas.get()).unwrap_or(0),
            leases: lock(&self.inner.held).len(),
        })
    }

    fn new_lease(&self, key: String) -> (Lease, String) {
        let id = self.inner.next_lease.fetch_add(1, Ordering::Relaxed);
        let member = format!("{}:{id}", self.inner.replica);
        lock(&self.inner.held).insert(
            id,
            Held {
                key,
                member: member.clone(),
            },
        );
        self.inner.count_leases();
        (
            Lease {
                fleet: self.inner.clone(),
                id,
            },
            member,
        )
    }

    /// Before a store is asked: the address's and the mailbox's fleet-wide locks (a mailbox's lock
    /// spares an address it logged in from lately, when `known_for` is set), the tenant's lease
    /// (`tenant_max` 0: no cap), and, on a connection's first attempt, the address's connection rate and
    /// session lease (`address`: the rate and the cap, when on). `ip` is `None` for a trusted client (its
    /// locks, rate and leases are not kept). One round trip.
    ///
    /// # Errors
    /// The shared state cannot be asked.
    pub async fn before_login(
        &self,
        ip: Option<IpAddr>,
        mailbox: &str,
        tenant: (&str, usize),
        known_for: Option<Duration>,
        address: Option<AddressLimits>,
    ) -> Result<BeforeLogin, Unavailable> {
        let (tenant, tenant_max) = tenant;
        let address = address.filter(|a| a.rate.is_some() || a.max_sessions.is_some());
        if ip.is_none() && tenant_max == 0 {
            // A trusted client has no locks, rate or address lease, and the tenant no cap: nothing to ask.
            self.live()?;
            return Ok(BeforeLogin {
                ip_locked: None,
                mailbox_locked: None,
                tenant: Ok(None),
                address: None,
            });
        }
        let link = self.live()?;
        let mb = link.keys.mailbox(mailbox);
        let ipk = ip.map(|ip| link.keys.ip(ip));
        let ttl = millis(link.settings.lease_ttl).to_string();
        let mut batch = Batch::new(&link);
        let mut address_lease = None;
        if let Some(ipk) = &ipk {
            if let Some(limits) = address {
                let (burst, per) = limits.rate.map_or((0, 0), |(b, p)| (b, millis(p).max(1)));
                let member = match limits.max_sessions {
                    Some(_) => {
                        let (lease, member) = self.new_lease(ipk.leases.clone());
                        address_lease = Some(lease);
                        member
                    }
                    None => String::new(),
                };
                batch.op(
                    Op::AdmitIp,
                    vec![ipk.rate.clone(), ipk.leases.clone()],
                    vec![
                        burst.to_string(),
                        per.to_string(),
                        limits.max_sessions.unwrap_or(0).to_string(),
                        member,
                        ttl.clone(),
                    ],
                );
            }
            batch.op(Op::IpLock, vec![ipk.lock.clone()], Vec::new());
            batch.op(
                Op::Locked,
                vec![mb.lock.clone(), mb.known.clone()],
                vec![ipk.digest.clone(), known_for.map_or(0, millis).to_string()],
            );
        }
        let tenant_lease = if tenant_max > 0 {
            let key = link.keys.tenant(tenant);
            let (lease, member) = self.new_lease(key.clone());
            let args = vec![tenant_max.to_string(), member, ttl];
            batch.op(Op::Lease, vec![key], args);
            Some(lease)
        } else {
            None
        };
        let answers = match batch.send("before_login").await {
            Ok(a) => a,
            Err(e) => {
                // The script may have run before the answer was lost: released (once Redis answers).
                drop((tenant_lease, address_lease));
                return Err(e);
            }
        };
        let mut answers = answers.into_iter().map(|a| a.first().copied());
        let mut next = || answers.next().flatten();
        let mut result = BeforeLogin {
            ip_locked: None,
            mailbox_locked: None,
            tenant: Ok(None),
            address: None,
        };
        if ipk.is_some() {
            if address.is_some() {
                result.address = Some(match next() {
                    Some(1) => {
                        forget(address_lease.take());
                        IpAdmission::Refused("rate")
                    }
                    Some(2) => {
                        forget(address_lease.take());
                        IpAdmission::Refused("ip_sessions")
                    }
                    _ => IpAdmission::Admitted(address_lease.take()),
                });
            }
            result.ip_locked = next().and_then(left_ms);
            result.mailbox_locked = next().and_then(left_ms);
        }
        if let Some(lease) = tenant_lease {
            if next() == Some(1) {
                result.tenant = Ok(Some(lease));
            } else {
                forget(Some(lease));
                result.tenant = Err(());
            }
        }
        Ok(result)
    }

    /// After a failed login: counts it for the mailbox (when the name routed) and, unless that secret
    /// was counted for the mailbox lately, for the address (`None`: a trusted client, not counted).
    ///
    /// # Errors
    /// The shared state cannot be asked.
    pub async fn failed(
        &self,
        ip: Option<IpAddr>,
        mailbox: Option<&str>,
        secret: Option<&[u8]>,
        limits: Limits,
    ) -> Result<Counted, Unavailable> {
        let link = self.live()?;
        let ipk = ip.map(|ip| link.keys.ip(ip));
        let common = |secret: String, address: String, known_for: u64| {
            vec![
                limits.lockout_after.to_string(),
                millis(limits.lockout_for).max(1).to_string(),
                millis(limits.forget_after).max(1).to_string(),
                secret,
                address,
                known_for.to_string(),
            ]
        };
        let mut counted = Counted {
            failures: 0,
            ip_locked: None,
            mailbox_locked: None,
        };
        let mut repeat = false;
        if let Some(mailbox) = mailbox {
            let mb = link.keys.mailbox(mailbox);
            let secret = secret
                .map(|s| link.keys.secret(mailbox, s))
                .unwrap_or_default();
            let address = ipk.as_ref().map(|k| k.digest.clone()).unwrap_or_default();
            let answer = link
                .call(
                    "failed",
                    &[mb.failures, mb.lock, mb.known],
                    &ops_args(
                        Op::Failed,
                        common(secret, address, limits.known_for.map_or(0, millis)),
                    ),
                )
                .await?;
            counted.failures = counted.failures.max(failures_in(&answer));
            counted.mailbox_locked = answer.get(1).copied().and_then(left_ms);
            repeat = answer.get(2) == Some(&1);
        }
        if let Some(ipk) = ipk
            && !repeat
        {
            // The third key is not read for an address; it is one of its own, for the cluster slot.
            let answer = link
                .call(
                    "failed",
                    &[ipk.failures, ipk.lock, ipk.rate],
                    &ops_args(Op::Failed, common(String::new(), String::new(), 0)),
                )
                .await?;
            counted.failures = counted.failures.max(failures_in(&answer));
            counted.ip_locked = answer.get(1).copied().and_then(left_ms);
        }
        Ok(counted)
    }

    /// After a store accepted the credentials: the mailbox's failures (and the address's) forgotten, the
    /// address remembered as known, LOGIN-DELAY (`min_interval`), and the mailbox's lease
    /// (`mailbox_max` 0: no cap). `ip` is `None` for a trusted client. One round trip.
    ///
    /// # Errors
    /// The shared state cannot be asked.
    pub async fn after_login(
        &self,
        ip: Option<IpAddr>,
        mailbox: &str,
        mailbox_max: usize,
        min_interval: Option<Duration>,
        known_for: Option<Duration>,
    ) -> Result<AfterLogin, Unavailable> {
        let link = self.live()?;
        let mb = link.keys.mailbox(mailbox);
        let ipk = ip.map(|ip| link.keys.ip(ip));
        let (lease, member) = if mailbox_max > 0 {
            let (lease, member) = self.new_lease(mb.leases.clone());
            (Some(lease), member)
        } else {
            (None, String::new())
        };
        let keys = vec![mb.failures, mb.lock, mb.known, mb.leases, mb.next_login];
        let args = vec![
            ipk.as_ref().map(|k| k.digest.clone()).unwrap_or_default(),
            known_for.map_or(0, millis).to_string(),
            mailbox_max.to_string(),
            member,
            millis(link.settings.lease_ttl).to_string(),
            min_interval.map_or(0, millis).to_string(),
        ];
        let mut batch = Batch::new(&link);
        batch.op(Op::LoggedIn, keys, args);
        if let Some(ipk) = &ipk {
            batch.op(
                Op::Forget,
                vec![ipk.failures.clone(), ipk.lock.clone()],
                Vec::new(),
            );
        }
        let answers = match batch.send("after_login").await {
            Ok(a) => a,
            Err(e) => {
                // The script may have run before the answer was lost: released (once Redis answers).
                drop(lease);
                return Err(e);
            }
        };
        let mine = answers.into_iter().next().unwrap_or_default();
        let taken = mine.first().copied().unwrap_or(-1);
        let login_delay = mine.get(1).copied().and_then(left_ms);
        let mailbox = match (taken, lease) {
            (0, lease) => {
                forget(lease);
                Err(())
            }
            (_, lease) if login_delay.is_some() => {
                forget(lease);
                Ok(None)
            }
            (_, lease) => Ok(lease),
        };
        Ok(AfterLogin {
            mailbox,
            login_delay,
        })
    }

    /// A lease kept locally while the shared state is degraded (the open policy), put back in the
    /// shared state when it answers again, so caps converge without a restart. `None` when off.
    pub fn local_lease(&self, kind: LeaseKind<'_>) -> Option<Lease> {
        let link = self.inner.link.load_full()?;
        let key = match kind {
            LeaseKind::Ip(ip) => link.keys.ip(ip).leases,
            LeaseKind::Mailbox(m) => link.keys.mailbox(m).leases,
            LeaseKind::Tenant(t) => link.keys.tenant(t),
        };
        Some(self.new_lease(key).0)
    }

    /// Ends the sessions `filter` matches on every replica: this one through `here`, the others through
    /// the command channel. An exact mailbox travels as its keyed digest, a pattern as typed.
    ///
    /// # Errors
    /// The shared state cannot be asked (this replica's sessions were still ended: see the count).
    pub async fn kick(
        &self,
        here: &dyn FleetCommands,
        filter: &SessionFilter,
    ) -> Result<FleetResult, (Unavailable, usize)> {
        let local = here.kick(&|e| filter.matches(e));
        let link = self.live().map_err(|e| (e, local))?;
        let (mailbox, fold, pattern) = match &filter.mailbox {
            Some(MailboxMatch::Exact { key, fold }) => (
                Some(link.keys.mailbox(&fold_if(key, *fold)).digest),
                *fold,
                None,
            ),
            Some(MailboxMatch::Pattern(p)) => (None, false, Some(p.clone())),
            None => (None, false, None),
        };
        let id = self.request_id();
        let message = BusMessage::Kick {
            id: id.clone(),
            from: self.inner.replica.clone(),
            mailbox,
            fold,
            pattern,
            tenant: filter.tenant.clone(),
            store: filter.store.clone(),
            network: filter.network,
        };
        self.broadcast(&link, id, &message, local)
            .await
            .map_err(|e| (e, local))
    }

    /// Sets a store's runtime state and weight on every replica; the count is the replicas where the
    /// store exists.
    ///
    /// # Errors
    /// The shared state cannot be asked (this replica's store was still set).
    pub async fn store_control(
        &self,
        here: &dyn FleetCommands,
        store: &str,
        state: Option<&str>,
        weight: Option<u32>,
    ) -> Result<FleetResult, (Unavailable, usize)> {
        let local = here.store_control(store, state, weight);
        let link = self.live().map_err(|e| (e, local))?;
        let id = self.request_id();
        let message = BusMessage::Store {
            id: id.clone(),
            from: self.inner.replica.clone(),
            store: store.to_string(),
            state: state.map(str::to_string),
            weight,
        };
        self.broadcast(&link, id, &message, local)
            .await
            .map_err(|e| (e, local))
    }

    /// Empties the auth_http answer caches of every replica.
    ///
    /// # Errors
    /// The shared state cannot be asked (this replica's caches were still emptied).
    pub async fn flush_auth_cache(
        &self,
        here: &dyn FleetCommands,
    ) -> Result<FleetResult, (Unavailable, usize)> {
        let local = here.flush_auth_cache();
        let link = self.live().map_err(|e| (e, local))?;
        let id = self.request_id();
        let message = BusMessage::Flush {
            id: id.clone(),
            from: self.inner.replica.clone(),
        };
        self.broadcast(&link, id, &message, local)
            .await
            .map_err(|e| (e, local))
    }

    fn request_id(&self) -> String {
        format!(
            "{}-{}",
            self.inner.replica,
            self.inner.next_lease.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Publishes `message` and sums the answers of the other live replicas (waiting at most a second).
    async fn broadcast(
        &self,
        link: &Link,
        id: String,
        message: &BusMessage,
        local: usize,
    ) -> Result<FleetResult, Unavailable> {
        let replicas_key = link.keys.replicas();
        let live: i64 = link
            .timed("replicas", async {
                link.fast
                    .zcount::<i64, _>(replicas_key.as_str(), now_score() as f64, 9.0e15)
                    .await
            })
            .await?;
        // This replica's own heartbeat may have lapsed (it was degraded): it counts itself anyway.
        let others = usize::try_from(live).unwrap_or(0).saturating_sub(1);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.inner.waiting).insert(id.clone(), tx);
        let published = link.publish(message).await;
        let mut result = FleetResult {
            total: local,
            replicas_answered: 1,
            replicas_expected: others + 1,
        };
        if published.is_ok() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while result.replicas_answered <= others {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(n)) => {
                        result.total += n;
                        result.replicas_answered += 1;
                    }
                    _ => break,
                }
            }
        }
        lock(&self.inner.waiting).remove(&id);
        published.map(|_| result)
    }
}

/// Which lease a locally kept lease stands for.
#[derive(Debug, Clone, Copy)]
pub enum LeaseKind<'a> {
    /// A client address's session (grouped as the throttle counts it).
    Ip(IpAddr),
    /// A normalised mailbox's session.
    Mailbox(&'a str),
    /// A tenant's session.
    Tenant(&'a str),
}

/// The shared state as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FleetStatus {
    pub mode: ClusterMode,
    pub degraded: bool,
    /// When it last became degraded or answering again.
    #[serde(serialize_with = "unix_seconds")]
    pub since: SystemTime,
    pub replicas: usize,
    pub leases: usize,
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

impl Serialize for ClusterMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            ClusterMode::Standalone => "standalone",
            ClusterMode::Cluster => "cluster",
            ClusterMode::Sentinel => "sentinel",
        })
    }
}

/// The failure count in a `failed` script's answer.
fn failures_in(answer: &[i64]) -> u32 {
    u32::try_from(answer.first().copied().unwrap_or(0).max(0)).unwrap_or(u32::MAX)
}

/// A time left in milliseconds as the scripts answer it (0 or less: none).
fn left_ms(ms: i64) -> Option<Duration> {
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// Why the shared state could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file `cluster:` names.
    #[error("cluster.{field}: {message}")]
    File {
        field: &'static str,
        message: String,
    },
    /// The client rejected the settings.
    #[error("cluster: {0}")]
    Client(String),
    /// Metrics registration.
    #[error(transparent)]
    Metrics(crate::metrics::MetricsError),
}

/// What of `cluster:` decides the connection, with the files read: equal settings keep the link.
#[derive(PartialEq, Eq)]
struct Settings {
    mode: ClusterMode,
    servers: Vec<String>,
    sentinel_service: Option<String>,
    username: Option<String>,
    password: Option<crate::secret::SecretString>,
    key_secret: crate::secret::SecretString,
    tls: Option<(Option<Vec<u8>>, Option<String>)>,
    prefix: String,
    timeout: Duration,
    lease_ttl: Duration,
    when_unavailable: WhenUnavailable,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("mode", &self.mode)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl Settings {
    fn read(config: &ClusterConfig, base: &std::path::Path) -> Result<Self, ClusterError> {
        let resolve = |p: &std::path::Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let file = |field: &'static str, p: &std::path::Path| {
            crate::secret::files::read_token_file(&resolve(p)).map_err(|e| ClusterError::File {
                field,
                message: e.to_string(),
            })
        };
        let key_secret = file("key_secret_file", &config.key_secret_file)?;
        let password = match &config.password_file {
            Some(p) => Some(file("password_file", p)?),
            None => None,
        };
        let tls = match &config.tls {
            None => None,
            Some(t) => {
                let ca = match &t.ca {
                    Some(p) => Some(std::fs::read(resolve(p)).map_err(|e| ClusterError::File {
                        field: "tls.ca",
                        message: e.to_string(),
                    })?),
                    None => None,
                };
                Some((ca, t.server_name.clone()))
            }
        };
        Ok(Self {
            mode: config.mode,
            servers: config.servers.clone(),
            sentinel_service: config.sentinel_service.clone(),
            username: config.username.clone(),
            password,
            key_secret,
            tls,
            prefix: config.key_prefix.clone(),
            timeout: config.timeout.get(),
            lease_ttl: config.lease_ttl.get(),
            when_unavailable: config.when_unavailable,
        })
    }
}

/// One connection to the shared state (a client and a subscriber) and its health.
struct Link {
    client: Client,
    /// The client for the checks: a call fails at once while disconnected (instead of waiting in fred's
    /// queue to run after a reconnect, when the login has long given up on it) and is dropped by its own
    /// timeout if not yet written.
    fast: fred::clients::WithOptions<Client>,
    subscriber: SubscriberClient,
    keys: Keys,
    script: Script,
    settings: Settings,
    mode: ClusterMode,
    when_unavailable: WhenUnavailable,
    degraded: AtomicBool,
    since: Mutex<SystemTime>,
    metrics: ClusterMetrics,
    /// Leases to release, for the releaser task.
    releases: tokio::sync::mpsc::UnboundedSender<Held>,
    released: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Held>>>,
    /// Ends this link's tasks (a reload replaced it, or the process stops).
    stop: CancellationToken,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("mode", &self.mode)
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

impl Link {
    async fn connect(
        settings: Settings,
        metrics: ClusterMetrics,
        fleet: &FleetInner,
        stop: CancellationToken,
    ) -> Result<Self, ClusterError> {
        let servers: Vec<Server> = settings
            .servers
            .iter()
            .filter_map(|s| {
                let (host, port) = s.rsplit_once(':')?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Some(Server::new(host, port.parse().ok()?))
            })
            .collect();
        let first = servers
            .first()
            .cloned()
            .ok_or_else(|| ClusterError::Client("no server".into()))?;
        let password = settings.password.as_ref().map(|p| p.expose().to_string());
        let server = match settings.mode {
            ClusterMode::Standalone => ServerConfig::Centralized { server: first },
            ClusterMode::Cluster => ServerConfig::Clustered {
                hosts: servers,
                policy: fred::types::config::ClusterDiscoveryPolicy::default(),
            },
            ClusterMode::Sentinel => ServerConfig::Sentinel {
                hosts: servers,
                service_name: settings.sentinel_service.clone().unwrap_or_default(),
                username: settings.username.clone(),
                password: password.clone(),
            },
        };
        let tls = match &settings.tls {
            None => None,
            Some((ca, name)) => Some(tls_config(ca.as_deref(), name.clone())?),
        };
        let fred_config = FredConfig {
            fail_fast: false,
            username: settings.username.clone(),
            password,
            server,
            tls,
            ..FredConfig::default()
        };
        let timeout = settings.timeout;
        let mut builder = fred::types::Builder::from_config(fred_config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_buffer_len = 10_000;
                c.tcp = fred::types::config::TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout.max(Duration::from_millis(50)) * 4;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        let client = builder
            .build()
            .map_err(|e| ClusterError::Client(e.to_string()))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| ClusterError::Client(e.to_string()))?;
        client.connect();
        subscriber.connect();
        // Re-subscribes after every reconnection; everything ends with the link.
        let resubscribe = subscriber.manage_subscriptions();
        {
            let (client, subscriber, stop) = (client.clone(), subscriber.clone(), stop.clone());
            tokio::spawn(async move {
                stop.cancelled().await;
                resubscribe.abort();
                let _ = client.quit().await;
                let _ = subscriber.quit().await;
            });
        }
        let (releases, released) = tokio::sync::mpsc::unbounded_channel();
        let link = Self {
            releases,
            released: Mutex::new(Some(released)),
            keys: Keys::new(&settings.prefix, settings.key_secret.expose().as_bytes()),
            script: Script::checks(),
            mode: settings.mode,
            when_unavailable: settings.when_unavailable,
            settings,
            fast: client.with_options(&fred::types::config::Options {
                // One attempt only would be safer still, but fred then fails cluster-mode calls that it
                // routes after a redirect; a call retried after a reconnect is undone by the release that
                // follows its failure (see `release`).
                fail_fast: true,
                timeout: Some(timeout),
                ..fred::types::config::Options::default()
            }),
            client,
            subscriber,
            degraded: AtomicBool::new(true),
            since: Mutex::new(SystemTime::now()),
            metrics,
            stop,
        };
        let connected = tokio::time::timeout(Duration::from_secs(3), async {
            link.client.wait_for_connect().await?;
            link.subscriber.wait_for_connect().await?;
            link.subscriber.subscribe(link.keys.bus().as_str()).await
        })
        .await;
        match connected {
            Ok(Ok(())) => {
                link.degraded.store(false, Ordering::Relaxed);
                link.metrics.degraded.set(0);
                info!(mode = ?link.mode, replica = %fleet.replica, "shared state connected");
            }
            Ok(Err(e)) => {
                link.metrics.degraded.set(1);
                warn!(error = %e, "shared state unavailable at start: limits are per replica until it answers");
            }
            Err(_) => {
                link.metrics.degraded.set(1);
                warn!(
                    "shared state not answering at start: limits are per replica until it answers"
                );
            }
        }
        Ok(link)
    }

    fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Marks the link degraded after `op` failed (once: the log line is for the flip).
    fn trip(&self, op: &str, why: &str) {
        self.metrics.errors.with_label_values(&[op]).inc();
        if !self.degraded.swap(true, Ordering::Relaxed) {
            *lock(&self.since) = SystemTime::now();
            self.metrics.degraded.set(1);
            warn!(
                op,
                error = why,
                "shared state unavailable: limits are per replica (or closed, per cluster.when_unavailable) until it answers"
            );
        }
    }

    fn failed(&self, op: &str, e: &fred::error::Error) -> Unavailable {
        self.trip(op, &e.to_string());
        Unavailable::Degraded
    }

    /// `fut` within the timeout, timed, and any failure marking the link degraded.
    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, Unavailable> {
        let began = std::time::Instant::now();
        match tokio::time::timeout(self.settings.timeout, fut).await {
            Ok(Ok(v)) => {
                self.metrics
                    .round_trip
                    .with_label_values(&[op])
                    .observe(began.elapsed().as_secs_f64());
                Ok(v)
            }
            Ok(Err(e)) => Err(self.failed(op, &e)),
            Err(_) => {
                self.trip(op, "timed out");
                Err(Unavailable::Degraded)
            }
        }
    }

    /// Publishes a message on the command channel.
    async fn publish(&self, message: &BusMessage) -> Result<i64, Unavailable> {
        let text = serde_json::to_string(message).unwrap_or_default();
        self.timed("publish", async {
            self.fast
                .publish::<i64, _, _>(self.keys.bus().as_str(), text.as_str())
                .await
        })
        .await
    }

    /// One call of the `checks` script (EVALSHA, then EVAL if the server does not know it): its answers.
    async fn call(
        &self,
        op: &'static str,
        keys: &[String],
        args: &[String],
    ) -> Result<Vec<i64>, Unavailable> {
        let answer = self
            .timed(op, async {
                match self
                    .fast
                    .custom::<Value, String>(evalsha(), eval_args(&self.script.sha, keys, args))
                    .await
                {
                    Err(e) if is_noscript(&e) => {
                        self.fast
                            .custom::<Value, String>(eval(), eval_args(self.script.lua, keys, args))
                            .await
                    }
                    other => other,
                }
            })
            .await?;
        Ok(integers(answer))
    }

    /// Several calls, pipelined (one round trip; in a Redis Cluster, one call per node that owns their
    /// keys): their answers in order. A call a server did not know the script for is made again with EVAL.
    async fn call_all(
        &self,
        op: &'static str,
        calls: &[(Vec<String>, Vec<String>)],
    ) -> Result<Vec<Vec<i64>>, Unavailable> {
        if let [(keys, args)] = calls {
            return Ok(vec![self.call(op, keys, args).await?]);
        }
        let pipeline = fred::clients::Pipeline::from(self.fast.clone());
        for (keys, args) in calls {
            let queued = pipeline
                .custom::<Value, String>(evalsha(), eval_args(&self.script.sha, keys, args))
                .await;
            if let Err(e) = queued {
                return Err(self.failed(op, &e));
            }
        }
        let answers = self
            .timed(op, async { Ok(pipeline.try_all::<Value>().await) })
            .await?;
        let mut out = Vec::with_capacity(calls.len());
        for (answer, (keys, args)) in answers.into_iter().zip(calls) {
            match answer {
                Ok(v) => out.push(integers(v)),
                Err(e) if is_noscript(&e) => out.push(self.call(op, keys, args).await?),
                Err(e) => return Err(self.failed(op, &e)),
            }
        }
        Ok(out)
    }

    /// Renews every lease this replica holds (or puts them back after an outage).
    async fn renew(&self, held: Vec<Held>) -> Result<(), Unavailable> {
        let ttl = millis(self.settings.lease_ttl).to_string();
        for chunk in held.chunks(500) {
            let mut batch = Batch::new(self);
            for h in chunk {
                batch.op(
                    Op::Renew,
                    vec![h.key.clone()],
                    vec![h.member.clone(), ttl.clone()],
                );
            }
            batch.send("renew").await?;
        }
        Ok(())
    }
}

/// Ops for one round trip: one call of the `checks` script for all of them, or, in a Redis Cluster, one
/// call per entity (hash tag), pipelined.
struct Batch<'a> {
    link: &'a Link,
    ops: Vec<(Op, Vec<String>, Vec<String>)>,
}

impl<'a> Batch<'a> {
    fn new(link: &'a Link) -> Self {
        Self {
            link,
            ops: Vec::new(),
        }
    }

    fn op(&mut self, op: Op, keys: Vec<String>, args: Vec<String>) {
        self.ops.push((op, keys, args));
    }

    /// Sends the ops; each op's answers, in the order the ops were added.
    async fn send(self, name: &'static str) -> Result<Vec<Vec<i64>>, Unavailable> {
        if self.ops.is_empty() {
            return Ok(Vec::new());
        }
        // Groups of op indexes, one call each: every op in one call, or one call per hash tag.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, (_, keys, _)) in self.ops.iter().enumerate() {
            let tag = if self.link.mode == ClusterMode::Cluster {
                keys.first().map_or("", |k| hash_tag(k))
            } else {
                ""
            };
            match groups.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, members)) => members.push(i),
                None => groups.push((tag, vec![i])),
            }
        }
        let calls: Vec<(Vec<String>, Vec<String>)> = groups
            .iter()
            .map(|(_, members)| {
                let mut keys = Vec::new();
                let mut names = Vec::new();
                let mut args = Vec::new();
                for &i in members {
                    let (op, k, a) = &self.ops[i];
                    names.push(op.name());
                    keys.extend(k.iter().cloned());
                    args.extend(a.iter().cloned());
                }
                args.insert(0, names.join(","));
                (keys, args)
            })
            .collect();
        let answers = self.link.call_all(name, &calls).await?;
        let mut out = vec![Vec::new(); self.ops.len()];
        for ((_, members), answer) in groups.iter().zip(answers) {
            let mut values = answer.into_iter();
            for &i in members {
                let (_, _, count) = self.ops[i].0.shape();
                out[i] = values.by_ref().take(count).collect();
            }
        }
        Ok(out)
    }
}

/// The hash tag of a key (`{...}`), which picks its Redis Cluster slot.
fn hash_tag(key: &str) -> &str {
    match (key.find('{'), key.rfind('}')) {
        (Some(a), Some(b)) if b > a + 1 => &key[a + 1..b],
        _ => key,
    }
}

/// The integers of a script's answer (an array of them).
fn integers(v: Value) -> Vec<i64> {
    v.into_array().iter().filter_map(Value::as_i64).collect()
}

fn tls_config(
    ca: Option<&[u8]>,
    server_name: Option<String>,
) -> Result<fred::types::config::TlsConfig, ClusterError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ClusterError::File {
                    field: "tls.ca",
                    message: e.to_string(),
                })?;
                roots.add(cert).map_err(|e| ClusterError::File {
                    field: "tls.ca",
                    message: e.to_string(),
                })?;
            }
        }
        None => roots = crate::certs::system_roots(),
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::certs::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClusterError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tls: fred::types::config::TlsConfig =
        fred::types::config::TlsConnector::from(config).into();
    if let Some(name) = server_name {
        tls.hostnames = fred::types::config::TlsHostMapping::Custom(Arc::new(FixedName(name)));
    }
    Ok(tls)
}

/// Checks every server's certificate against one configured name.
#[derive(Debug)]
struct FixedName(String);

impl fred::types::config::HostMapping for FixedName {
    fn map(&self, _ip: &std::net::IpAddr, _default_host: &str) -> Option<String> {
        Some(self.0.clone())
    }
}

/// Starts the link's tasks: the probe and renewals, and the command channel's reader.
fn spawn_tasks(link: &Arc<Link>, fleet: &Arc<FleetInner>, commands: Arc<dyn FleetCommands>) {
    let (l, f) = (link.clone(), fleet.clone());
    tokio::spawn(async move { upkeep(l, f).await });
    let (l, f) = (link.clone(), fleet.clone());
    tokio::spawn(async move { listen(l, f, commands).await });
    if let Some(rx) = lock(&link.released).take() {
        tokio::spawn(release(link.clone(), rx));
    }
}

/// Releases ended sessions' leases: whatever has queued up since the last call goes out as one call (up
/// to 512 at a time), so a busy replica pays one round trip for many sessions. While the shared state
/// does not answer, releases wait (a lease whose answer was lost may still exist: Redis may have been
/// slow, not gone), and those older than `lease_ttl` are dropped, their leases having expired.
async fn release(link: Arc<Link>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Held>) {
    let ttl = link.settings.lease_ttl;
    let mut pending: Vec<(std::time::Instant, Held)> = Vec::new();
    let mut batch = Vec::with_capacity(64);
    loop {
        let retry = if pending.is_empty() {
            Duration::MAX
        } else {
            Duration::from_millis(500)
        };
        tokio::select! {
            () = link.stop.cancelled() => return,
            n = rx.recv_many(&mut batch, 512) => if n == 0 { return },
            () = tokio::time::sleep(retry) => {}
        }
        let now = std::time::Instant::now();
        pending.extend(batch.drain(..).map(|h| (now, h)));
        pending.retain(|(at, _)| now.duration_since(*at) < ttl);
        if link.is_degraded() || pending.is_empty() {
            continue;
        }
        while !pending.is_empty() {
            let take = pending.len().min(512);
            let mut ops = Batch::new(&link);
            for (_, h) in &pending[..take] {
                ops.op(Op::Release, vec![h.key.clone()], vec![h.member.clone()]);
            }
            if ops.send("release").await.is_err() {
                break; // kept for the next try
            }
            pending.drain(..take);
        }
    }
}

/// While degraded: pings every half second and, once the server answers, puts the leases back and
/// says so. While answering: renews the leases and the heartbeat every third of the lease TTL.
async fn upkeep(link: Arc<Link>, fleet: Arc<FleetInner>) {
    let renew_every = link.settings.lease_ttl / 3;
    let mut next_renewal = tokio::time::Instant::now();
    loop {
        let wait = if link.is_degraded() {
            Duration::from_millis(500)
        } else {
            next_renewal.saturating_duration_since(tokio::time::Instant::now())
        };
        tokio::select! {
            () = link.stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let was_degraded = link.is_degraded();
        if was_degraded {
            let pinged = tokio::time::timeout(link.settings.timeout * 5, async {
                link.client.ping::<String>(None).await?;
                if link.subscriber.tracked_channels().is_empty() {
                    link.subscriber.subscribe(link.keys.bus().as_str()).await?;
                }
                Ok::<_, fred::error::Error>(())
            })
            .await;
            if !matches!(pinged, Ok(Ok(()))) {
                continue;
            }
        }
        let held: Vec<Held> = lock(&fleet.held).values().cloned().collect();
        let count = held.len();
        // Renewals run as if answering; a failure trips the link again.
        link.degraded.store(false, Ordering::Relaxed);
        let renewed = link.renew(held).await;
        let replicas = match renewed {
            Ok(_) => {
                let args = vec![
                    fleet.replica.clone(),
                    millis(link.settings.lease_ttl).to_string(),
                ];
                link.call(
                    "heartbeat",
                    &[link.keys.replicas()],
                    &ops_args(Op::Heartbeat, args),
                )
                .await
                .map(|answer| answer.first().copied().unwrap_or(0))
            }
            Err(e) => Err(e),
        };
        match replicas {
            Ok(n) => {
                link.metrics.replicas.set(n);
                if was_degraded {
                    *lock(&link.since) = SystemTime::now();
                    link.metrics.degraded.set(0);
                    info!(
                        leases = count,
                        "shared state answering again: fleet-wide limits back in force"
                    );
                }
                next_renewal = tokio::time::Instant::now() + renew_every;
            }
            Err(_) => {
                link.degraded.store(true, Ordering::Relaxed);
                link.metrics.degraded.set(1);
            }
        }
    }
}

/// Reads the command channel: carries out other replicas' commands and answers them, and hands answers
/// to this replica's waiting requests.
async fn listen(link: Arc<Link>, fleet: Arc<FleetInner>, commands: Arc<dyn FleetCommands>) {
    let mut rx = link.subscriber.message_rx();
    loop {
        let message = tokio::select! {
            () = link.stop.cancelled() => return,
            m = rx.recv() => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let Some(text) = message.value.as_str().map(|s| s.to_string()) else {
            continue;
        };
        let Ok(parsed) = serde_json::from_str::<BusMessage>(&text) else {
            continue;
        };
        let (id, from, count, command) = match parsed {
            BusMessage::Done { id, to, count } => {
                if to == fleet.replica
                    && let Some(tx) = lock(&fleet.waiting).get(&id)
                {
                    let _ = tx.send(count);
                }
                continue;
            }
            BusMessage::Kick {
                from,
                id,
                mailbox,
                fold,
                pattern,
                tenant,
                store,
                network,
            } => {
                if from == fleet.replica {
                    continue;
                }
                let keys = &link.keys;
                let filter = SessionFilter {
                    tenant,
                    store,
                    mailbox: pattern.map(MailboxMatch::Pattern),
                    network,
                };
                let n = commands.kick(&|e| {
                    filter.matches(e)
                        && mailbox
                            .as_ref()
                            .is_none_or(|d| keys.mailbox(&fold_if(e.mailbox, fold)).digest == *d)
                });
                (id, from, n, "kick")
            }
            BusMessage::Store {
                from,
                id,
                store,
                state,
                weight,
            } => {
                if from == fleet.replica {
                    continue;
                }
                let n = commands.store_control(&store, state.as_deref(), weight);
                (id, from, n, "store")
            }
            BusMessage::Flush { id, from } => {
                if from == fleet.replica {
                    continue;
                }
                (id, from, commands.flush_auth_cache(), "auth_cache_flush")
            }
        };
        link.metrics.commands.with_label_values(&[command]).inc();
        let answer = BusMessage::Done {
            id,
            to: from,
            count,
        };
        let _ = link.publish(&answer).await;
    }
}

fn fold_if(mailbox: &str, fold: bool) -> String {
    if fold {
        mailbox.to_ascii_lowercase()
    } else {
        mailbox.to_string()
    }
}

/// EVALSHA as a plain command (fred's pipelines have no script interface), routed by its first key.
fn evalsha() -> fred::types::CustomCommand {
    fred::types::CustomCommand::new_static("EVALSHA", fred::types::ClusterHash::Offset(2), false)
}

/// EVAL, the same way (once per server that answered NOSCRIPT).
fn eval() -> fred::types::CustomCommand {
    fred::types::CustomCommand::new_static("EVAL", fred::types::ClusterHash::Offset(2), false)
}

/// `sha-or-body numkeys keys... args...`.
fn eval_args(script: &str, keys: &[String], args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(2 + keys.len() + args.len());
    out.push(script.to_string());
    out.push(keys.len().to_string());
    out.extend(keys.iter().cloned());
    out.extend(args.iter().cloned());
    out
}

/// The arguments of a call of one op: its name, then its own.
fn ops_args(op: Op, mut args: Vec<String>) -> Vec<String> {
    args.insert(0, op.name().to_string());
    args
}

fn is_noscript(e: &fred::error::Error) -> bool {
    e.details().starts_with("NOSCRIPT") || e.to_string().contains("NOSCRIPT")
}

/// The server-clock score of "now" is not known here; heartbeats expire `lease_ttl` after their last
/// renewal, so counting members with a score above the local clock's now is exact up to clock skew.
fn now_score() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A lease that was never taken (refused, or the round trip failed): dropped without a release (its
/// `Drop` finds nothing held).
fn forget(lease: Option<Lease>) {
    if let Some(lease) = lease {
        lock(&lease.fleet.held).remove(&lease.id);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The policy for one kind of limit.
pub fn closed(policy: FailPolicy) -> bool {
    policy == FailPolicy::Closed
}
