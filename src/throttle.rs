//! Edge defences: failed-login throttling and lockout per client IP and per mailbox, the new-connection
//! rate and concurrent-session caps per client IP, the concurrent-session caps per mailbox and per
//! tenant, and the minimum interval between one mailbox's logins.
//!
//! This module owns the bookkeeping and the verdicts only: it does no I/O, never sleeps (a
//! [`Verdict::Delay`] is applied by the caller before it answers `-ERR`), and never logs or exports a
//! mailbox, which is a user name. Time is passed in: every method has an `_at(now)` twin, so tests are
//! exact without sleeping or pausing a runtime.
//!
//! Memory stays bounded by forgetting: an idle key (no failure for `forget_after`, no lock in force, a full
//! rate bucket, no session open, no login interval running) carries no information and is dropped by
//! [`Throttle::purge`], which the caller runs periodically. Session counters drop their key as soon as the last guard is released.
//! Every map also has a hard cap (`max_tracked_keys`): a new key that finds its map full first evicts an
//! eighth of it, in this order: idle keys (no lock in force, oldest last failure first), then locks closest
//! to their end. A flood of keys therefore costs at most the cap, never more, and what it pushes out first
//! is what carries the least information.
//!
//! Mailboxes are never stored by name: each is keyed by a 128-bit keyed digest (xxh3 with a per-process
//! random seed), so a 9,000-byte login name costs the same 16 bytes as a short one and no user name sits
//! in memory for a dump to reveal. A wrong password is remembered as a 32-bit keyed digest, only so that a
//! mail client polling with an old password counts once, not once per poll.
//!
//! IPv6 clients are grouped by prefix (a subscriber gets a whole /64, so counting single addresses would
//! let one client walk past every per-IP limit), and IPv4-mapped IPv6 addresses count as the IPv4 address.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// Longest span any setting is taken to mean, so `now + span` can never overflow an `Instant`.
const MAX_SPAN: Duration = Duration::from_hours(365 * 24);

/// What the edge enforces. Every limit that is an `Option` is off when `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Client networks exempt from failed-login delays and lockouts and from the per-IP caps (webmail
    /// front ends, monitoring). Default: none.
    pub trusted: Vec<IpNet>,
    /// Delay before the `-ERR` of the first failed login; doubled for each further failure of the same
    /// client IP or mailbox (whichever has more). Default: 1 s.
    pub failed_login_delay: Duration,
    /// Longest delay before a failed login's `-ERR`. Default: 15 s.
    pub failed_login_max_delay: Duration,
    /// Failures of one client IP, or of one mailbox, that lock it out for `lockout_for` (0: never lock
    /// out). Default: 10.
    pub lockout_after: u32,
    /// How long a lockout lasts; afterwards the key starts again from zero failures. Default: 10 min.
    pub lockout_for: Duration,
    /// A key with no failure for this long is forgotten: its count restarts, and `purge` frees it.
    /// Default: 30 min.
    pub forget_after: Duration,
    /// Concurrent sessions per client IP (IPv6: per prefix). Default: 100, since carrier-grade NAT puts
    /// many subscribers behind one address.
    pub max_sessions_per_ip: Option<usize>,
    /// New connections per client IP as a token bucket: `(burst, refill interval of one token)`.
    /// Default: a burst of 30, then one every 200 ms (5 per second).
    pub connection_rate_per_ip: Option<(u32, Duration)>,
    /// Concurrent logged-in sessions per mailbox; past it the login gets `-ERR [IN-USE]`. Default: off
    /// (stores enforce their own mailbox locks).
    pub max_sessions_per_mailbox: Option<usize>,
    /// IPv6 clients are counted per prefix of this length (128: per address). Default: 64.
    pub ipv6_prefix_len: u8,
    /// Keys each map holds at most (see the module doc for the eviction order). Default: 100,000.
    pub max_tracked_keys: usize,
    /// A locked-out mailbox still admits an address it logged in from successfully within
    /// `known_address_for`, so a stranger's guessing cannot lock its owner out. The trade-off: a guesser
    /// behind the same address (carrier-grade NAT) is not stopped by the mailbox lock either, only by the
    /// per-IP lock and the growing delays. Default: true.
    pub spare_known_addresses: bool,
    /// How long a successful login's address is remembered for `spare_known_addresses`. Default: 7 days.
    pub known_address_for: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            trusted: Vec::new(),
            failed_login_delay: Duration::from_secs(1),
            failed_login_max_delay: Duration::from_secs(15),
            lockout_after: 10,
            lockout_for: Duration::from_mins(10),
            forget_after: Duration::from_mins(30),
            max_sessions_per_ip: Some(100),
            connection_rate_per_ip: Some((30, Duration::from_millis(200))),
            max_sessions_per_mailbox: None,
            ipv6_prefix_len: 64,
            max_tracked_keys: 100_000,
            spare_known_addresses: true,
            known_address_for: Duration::from_hours(7 * 24),
        }
    }
}

impl ThrottleConfig {
    /// The settings a config file gives (`throttle:`), with what is off there off here.
    pub fn from_settings(s: &crate::config::ThrottleSettings) -> Self {
        ThrottleConfig {
            trusted: s.trusted_networks.clone(),
            failed_login_delay: s.failed_login_delay.get(),
            failed_login_max_delay: s.failed_login_max_delay.get(),
            lockout_after: s.lockout_after,
            lockout_for: s.lockout_for.get(),
            forget_after: s.forget_after.get(),
            max_sessions_per_ip: (s.max_sessions_per_ip > 0).then_some(s.max_sessions_per_ip),
            connection_rate_per_ip: (s.connection_burst > 0 && s.connections_per_second > 0).then(
                || {
                    (
                        s.connection_burst,
                        Duration::from_secs(1) / s.connections_per_second,
                    )
                },
            ),
            max_sessions_per_mailbox: (s.max_sessions_per_mailbox > 0)
                .then_some(s.max_sessions_per_mailbox),
            max_tracked_keys: s.max_tracked_keys,
            spare_known_addresses: s.spare_known_addresses,
            known_address_for: s.known_address_for.get(),
            ..ThrottleConfig::default()
        }
    }
}

/// What to do with a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead (check the credentials, or answer at once).
    Allow,
    /// Wait this long before answering `-ERR` (may be zero when `failed_login_delay` is zero).
    Delay(Duration),
    /// The client IP or the mailbox is locked out: refuse without checking credentials.
    LockedOut {
        /// Time left until the lockout ends (the longer of the two when both are locked).
        retry_after: Duration,
    },
}

/// The edge defences' shared state. Cheap to clone (clones share the state); `Send + Sync`.
#[derive(Clone)]
pub struct Throttle {
    inner: Arc<Inner>,
}

/// Client IP as counted: IPv4, or an IPv6 address with its host bits cleared.
type IpKey = IpAddr;

/// A mailbox as the throttle keys it: a keyed digest of its normalised name (see the module doc).
type MailboxKey = u128;

/// Wrong passwords remembered per mailbox, so a client repeating one counts once.
const REMEMBERED_PASSWORDS: usize = 4;

/// Addresses remembered per mailbox for `spare_known_addresses`.
const REMEMBERED_ADDRESSES: usize = 4;

struct Inner {
    /// Swapped whole by [`Throttle::reconfigure`]; the counters are kept.
    config: arc_swap::ArcSwap<ThrottleConfig>,
    /// Seeds the digests of mailboxes and passwords; random per process.
    seed: u64,
    ip_failures: Mutex<HashMap<IpKey, Failures>>,
    mailbox_failures: Mutex<HashMap<MailboxKey, Failures>>,
    /// Per client IP, the GCRA "theoretical arrival time": the bucket is full once it is not after now.
    connection_rate: Mutex<HashMap<IpKey, Instant>>,
    ip_sessions: Mutex<HashMap<IpKey, usize>>,
    mailbox_sessions: Mutex<HashMap<MailboxKey, usize>>,
    tenant_sessions: Mutex<HashMap<String, usize>>,
    /// Per mailbox, when its next login may start (only while a minimum interval is running).
    next_login: Mutex<HashMap<MailboxKey, Instant>>,
    /// Per mailbox, the addresses (as digests) it last logged in from, and when.
    known_addresses: Mutex<HashMap<MailboxKey, [(u64, Instant); REMEMBERED_ADDRESSES]>>,
    /// Typical time a store takes to refuse a login, in microseconds (an exponential moving average; 0
    /// until one was seen). Refusals popgate decides alone wait about as long (see [`Throttle::refusal_time`]).
    refusal_micros: std::sync::atomic::AtomicU64,
}

/// Failed logins of one client IP or one mailbox.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
    /// Digests of the wrong passwords counted last (mailboxes only; 0 is an empty slot).
    passwords: [u32; REMEMBERED_PASSWORDS],
}

/// One failed login, as the throttle is told of it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The normalised mailbox, only when the name routed to a tenant: unknown names are counted against
    /// the client address alone, so they cannot fill memory with per-name state.
    pub mailbox: Option<&'a str>,
    /// The secret the client presented (password, digest), when one was: the same wrong one again for
    /// the same mailbox counts once.
    pub secret: Option<&'a [u8]>,
}

/// Holds one of a client IP's session slots; releases it on drop. A no-op for trusted clients and when
/// the per-IP cap is off.
pub struct IpGuard {
    slot: Option<(Arc<Inner>, IpKey)>,
}

/// Holds one of a mailbox's session slots; releases it on drop. A no-op when the per-mailbox cap is off.
pub struct MailboxGuard {
    slot: Option<(Arc<Inner>, MailboxKey)>,
}

/// Holds one of a tenant's session slots; releases it on drop. A no-op when the tenant has no cap.
pub struct TenantGuard {
    slot: Option<(Arc<Inner>, String)>,
}

// === impl Throttle ===

impl Throttle {
    /// Makes the shared state. Durations beyond a year are taken as a year.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config: arc_swap::ArcSwap::from_pointee(Self::clamped(config)),
                seed: random_seed(),
                ip_failures: Mutex::default(),
                mailbox_failures: Mutex::default(),
                connection_rate: Mutex::default(),
                ip_sessions: Mutex::default(),
                mailbox_sessions: Mutex::default(),
                tenant_sessions: Mutex::default(),
                next_login: Mutex::default(),
                known_addresses: Mutex::default(),
                refusal_micros: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Puts new settings in force (a config reload). Failure counts, lockouts, rate buckets and open
    /// sessions are kept: a reload must not pardon an attacker or forget who holds a slot.
    pub fn reconfigure(&self, config: ThrottleConfig) {
        self.inner.config.store(Arc::new(Self::clamped(config)));
    }

    /// Durations beyond a year are taken as a year; a zero burst as one.
    fn clamped(mut config: ThrottleConfig) -> ThrottleConfig {
        for d in [
            &mut config.failed_login_delay,
            &mut config.failed_login_max_delay,
            &mut config.lockout_for,
            &mut config.forget_after,
            &mut config.known_address_for,
        ] {
            *d = (*d).min(MAX_SPAN);
        }
        if let Some((burst, per)) = &mut config.connection_rate_per_ip {
            *burst = (*burst).max(1);
            *per = (*per).min(MAX_SPAN);
        }
        config.ipv6_prefix_len = config.ipv6_prefix_len.min(128);
        config.max_tracked_keys = config.max_tracked_keys.max(1);
        config
    }

    /// The settings in force (after clamping).
    pub fn config(&self) -> Arc<ThrottleConfig> {
        self.inner.config.load_full()
    }

    /// Whether `ip` is in a trusted network (exempt from login throttling and per-IP caps).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.inner
            .config
            .load()
            .trusted
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// Before accepting a connection from `ip`: the new-connection rate and the per-IP session cap.
    /// Returns a guard holding a session slot until dropped.
    ///
    /// # Errors
    /// The reason to refuse the connection, usable as a metric label: `"rate"` or `"ip_sessions"`.
    pub fn admit(&self, ip: IpAddr) -> Result<IpGuard, &'static str> {
        self.admit_at(ip, Instant::now())
    }

    /// [`Throttle::admit`] at a given time.
    pub fn admit_at(&self, ip: IpAddr, now: Instant) -> Result<IpGuard, &'static str> {
        if self.is_trusted(ip) {
            return Ok(IpGuard { slot: None });
        }
        let key = self.ip_key(ip);
        let config = self.inner.config.load();
        if let Some((burst, per)) = config.connection_rate_per_ip
            && !per.is_zero()
        {
            let mut buckets = lock(&self.inner.connection_rate);
            if !buckets.contains_key(&key) {
                // The fullest buckets (earliest arrival time) say least: they go first.
                make_room(&mut buckets, config.max_tracked_keys, |tat| *tat);
            }
            if !gcra_take(&mut buckets, key, burst, per, now) {
                return Err("rate");
            }
        }
        let Some(max) = config.max_sessions_per_ip else {
            return Ok(IpGuard { slot: None });
        };
        if !take_slot(&mut lock(&self.inner.ip_sessions), &key, max) {
            return Err("ip_sessions");
        }
        Ok(IpGuard {
            slot: Some((Arc::clone(&self.inner), key)),
        })
    }

    /// Before anything else of a login: is this client address locked out? Checked before the name is
    /// routed, so a locked-out address costs no per-mailbox work at all.
    pub fn check_ip(&self, ip: IpAddr) -> Verdict {
        self.check_ip_at(ip, Instant::now())
    }

    /// [`Throttle::check_ip`] at a given time.
    pub fn check_ip_at(&self, ip: IpAddr, now: Instant) -> Verdict {
        if self.is_trusted(ip) {
            return Verdict::Allow;
        }
        let key = self.ip_key(ip);
        match lock(&self.inner.ip_failures)
            .get(&key)
            .and_then(|f| f.lock_left(now))
        {
            Some(retry_after) => Verdict::LockedOut { retry_after },
            None => Verdict::Allow,
        }
    }

    /// Before checking credentials: is this client IP or this mailbox locked out? A mailbox's lock does
    /// not apply to an address it logged in from lately when `spare_known_addresses` is on.
    /// Returns [`Verdict::Allow`] or [`Verdict::LockedOut`].
    pub fn check_login(&self, ip: IpAddr, mailbox: &str) -> Verdict {
        self.check_login_at(ip, mailbox, Instant::now())
    }

    /// [`Throttle::check_login`] at a given time.
    pub fn check_login_at(&self, ip: IpAddr, mailbox: &str, now: Instant) -> Verdict {
        if self.is_trusted(ip) {
            return Verdict::Allow;
        }
        let key = self.ip_key(ip);
        let ip_left = lock(&self.inner.ip_failures)
            .get(&key)
            .and_then(|f| f.lock_left(now));
        let mailbox = self.mailbox_key(mailbox);
        let mailbox_left = lock(&self.inner.mailbox_failures)
            .get(&mailbox)
            .and_then(|f| f.lock_left(now))
            .filter(|_| !self.is_known_address(mailbox, key, now));
        match ip_left.max(mailbox_left) {
            Some(retry_after) => Verdict::LockedOut { retry_after },
            None => Verdict::Allow,
        }
    }

    /// A failure with a new secret for `mailbox` (counted for the address and the mailbox), at `now`: the
    /// unit tests' shorthand for [`Throttle::failed_at`].
    #[cfg(test)]
    fn login_failed_at(&self, ip: IpAddr, mailbox: &str, now: Instant) -> Verdict {
        self.failed_at(
            ip,
            Failure {
                mailbox: Some(mailbox),
                secret: None,
            },
            now,
        )
    }

    /// After a failed login: counts it for the client IP and, when the name routed to a tenant, for the
    /// mailbox (an unrouted name gets no state of its own). Returns the delay to wait before the `-ERR`
    /// (growing with the failures), or [`Verdict::LockedOut`] once either reaches `lockout_after` (or is
    /// already locked). Trusted clients get [`Verdict::Allow`] and are not counted. A secret this mailbox
    /// already failed with lately counts for neither the address nor the mailbox (a mail client polling
    /// with an old password is one mistake, not one per poll).
    pub fn failed(&self, ip: IpAddr, failure: Failure<'_>) -> Verdict {
        self.failed_at(ip, failure, Instant::now())
    }

    /// [`Throttle::failed`] at a given time.
    pub fn failed_at(&self, ip: IpAddr, failure: Failure<'_>, now: Instant) -> Verdict {
        if self.is_trusted(ip) {
            return Verdict::Allow;
        }
        let config = self.inner.config.load();
        let key = self.ip_key(ip);
        let mailbox = failure.mailbox.map(|m| self.mailbox_key(m));
        let secret = failure.secret.map(|s| self.secret_digest(s));
        // The mailbox first: it decides whether this failure is a repeat that counts for nobody.
        let (mailbox_count, mailbox_locked, repeat) = match mailbox {
            None => (0, None, false),
            Some(mailbox) => {
                let mut failures = lock(&self.inner.mailbox_failures);
                if !failures.contains_key(&mailbox) {
                    make_room(&mut failures, config.max_tracked_keys, |f| f.rank(now));
                }
                let f = failures
                    .entry(mailbox)
                    .or_insert_with(|| Failures::new(now));
                let repeat = secret.is_some_and(|s| f.seen_password(s, now, &config));
                let (count, locked) = if repeat {
                    (f.count, f.lock_left(now))
                } else {
                    let counted = f.record(now, &config);
                    if let Some(s) = secret {
                        f.remember_password(s);
                    }
                    counted
                };
                let spared = locked.is_some() && self.is_known_address(mailbox, key, now);
                (count, locked.filter(|_| !spared), repeat)
            }
        };
        let (ip_count, ip_locked) = {
            let mut failures = lock(&self.inner.ip_failures);
            if !failures.contains_key(&key) {
                make_room(&mut failures, config.max_tracked_keys, |f| f.rank(now));
            }
            let f = failures.entry(key).or_insert_with(|| Failures::new(now));
            if repeat {
                (f.count, f.lock_left(now))
            } else {
                f.record(now, &config)
            }
        };
        match ip_locked.max(mailbox_locked) {
            Some(retry_after) => Verdict::LockedOut { retry_after },
            None => Verdict::Delay(self.delay_for(ip_count.max(mailbox_count))),
        }
    }

    /// After a successful login: forgets the client IP's and the mailbox's failures, remembers the address
    /// as known for the mailbox, then takes one of the mailbox's session slots (released when the guard
    /// drops).
    ///
    /// # Errors
    /// `"mailbox_sessions"` when `max_sessions_per_mailbox` are already open (the caller answers
    /// `-ERR [IN-USE]`; the credentials were right, so the failure counts are cleared all the same).
    pub fn login_ok(&self, ip: IpAddr, mailbox: &str) -> Result<MailboxGuard, &'static str> {
        self.login_ok_at(ip, mailbox, Instant::now())
    }

    /// [`Throttle::login_ok`] at a given time.
    pub fn login_ok_at(
        &self,
        ip: IpAddr,
        mailbox: &str,
        now: Instant,
    ) -> Result<MailboxGuard, &'static str> {
        let config = self.inner.config.load();
        let mailbox = self.mailbox_key(mailbox);
        if !self.is_trusted(ip) {
            let key = self.ip_key(ip);
            lock(&self.inner.ip_failures).remove(&key);
            if config.spare_known_addresses {
                let address = self.address_digest(key);
                let mut known = lock(&self.inner.known_addresses);
                if !known.contains_key(&mailbox) {
                    make_room(&mut known, config.max_tracked_keys, |slots| {
                        slots.iter().map(|(_, at)| *at).max()
                    });
                }
                let slots = known
                    .entry(mailbox)
                    .or_insert([(0, now); REMEMBERED_ADDRESSES]);
                // This address's slot, else the oldest one.
                let slot = match slots.iter().position(|(a, _)| *a == address) {
                    Some(i) => i,
                    None => (0..REMEMBERED_ADDRESSES)
                        .min_by_key(|&i| (slots[i].0 != 0, slots[i].1))
                        .unwrap_or(0),
                };
                slots[slot] = (address, now);
            }
        }
        lock(&self.inner.mailbox_failures).remove(&mailbox);
        let Some(max) = config.max_sessions_per_mailbox else {
            return Ok(MailboxGuard { slot: None });
        };
        if !take_slot(&mut lock(&self.inner.mailbox_sessions), &mailbox, max) {
            return Err("mailbox_sessions");
        }
        Ok(MailboxGuard {
            slot: Some((Arc::clone(&self.inner), mailbox)),
        })
    }

    /// The client address as the limits count it: IPv4, or the IPv6 prefix (what the shared state keys).
    pub fn counted_ip(&self, ip: IpAddr) -> IpAddr {
        self.ip_key(ip)
    }

    /// The delay before the `-ERR` of a login with `failures` failures counted (the shared state's count
    /// gets the same growing delay as a local one).
    pub fn delay_for_failures(&self, failures: u32) -> Duration {
        self.delay_for(failures)
    }

    /// Records a lockout the shared state reported (another replica counted the failures), so this
    /// replica refuses the address or the mailbox on its own until it ends, without asking again.
    pub fn note_lockout(&self, ip: Option<IpAddr>, mailbox: Option<&str>, left: Duration) {
        self.note_lockout_at(ip, mailbox, left, Instant::now());
    }

    /// [`Throttle::note_lockout`] at a given time.
    pub fn note_lockout_at(
        &self,
        ip: Option<IpAddr>,
        mailbox: Option<&str>,
        left: Duration,
        now: Instant,
    ) {
        let config = self.inner.config.load();
        let until = now + left.min(MAX_SPAN);
        if let Some(ip) = ip {
            let key = self.ip_key(ip);
            lock_until(&mut lock(&self.inner.ip_failures), key, until, now, &config);
        }
        if let Some(mailbox) = mailbox {
            let key = self.mailbox_key(mailbox);
            lock_until(
                &mut lock(&self.inner.mailbox_failures),
                key,
                until,
                now,
                &config,
            );
        }
    }

    /// Drops every idle key (see the module doc). Run it periodically, e.g. every minute.
    pub fn purge(&self) {
        self.purge_at(Instant::now());
    }

    /// [`Throttle::purge`] at a given time.
    pub fn purge_at(&self, now: Instant) {
        let config = self.inner.config.load();
        let forget_after = config.forget_after;
        lock(&self.inner.ip_failures).retain(|_, f| !f.is_idle(now, forget_after));
        lock(&self.inner.mailbox_failures).retain(|_, f| !f.is_idle(now, forget_after));
        lock(&self.inner.connection_rate).retain(|_, tat| *tat > now);
        lock(&self.inner.next_login).retain(|_, next| *next > now);
        let known_for = config.known_address_for;
        lock(&self.inner.known_addresses).retain(|_, slots| {
            slots
                .iter()
                .any(|(a, at)| *a != 0 && now.saturating_duration_since(*at) < known_for)
        });
    }

    /// Keys held in all maps (failures, rate buckets, session counters, known addresses): the memory in
    /// use.
    pub fn tracked_keys(&self) -> usize {
        lock(&self.inner.ip_failures).len()
            + lock(&self.inner.mailbox_failures).len()
            + lock(&self.inner.connection_rate).len()
            + lock(&self.inner.ip_sessions).len()
            + lock(&self.inner.mailbox_sessions).len()
            + lock(&self.inner.tenant_sessions).len()
            + lock(&self.inner.next_login).len()
            + lock(&self.inner.known_addresses).len()
    }

    /// Before asking a store: takes one of `tenant`'s session slots when it has a cap (`max` > 0).
    ///
    /// # Errors
    /// `"tenant_sessions"` when `max` sessions of the tenant are already open (the caller answers
    /// `-ERR [SYS/TEMP]`).
    pub fn tenant_session(&self, tenant: &str, max: usize) -> Result<TenantGuard, &'static str> {
        if max == 0 {
            return Ok(TenantGuard { slot: None });
        }
        if !take_slot(
            &mut lock(&self.inner.tenant_sessions),
            &tenant.to_owned(),
            max,
        ) {
            return Err("tenant_sessions");
        }
        Ok(TenantGuard {
            slot: Some((Arc::clone(&self.inner), tenant.to_owned())),
        })
    }

    /// After a successful login of `mailbox` to a tenant with a minimum interval between logins:
    /// records it, or refuses it when the previous one was less than `min` ago.
    ///
    /// # Errors
    /// The time left until the mailbox may log in again (the caller answers `-ERR [LOGIN-DELAY]`). A
    /// refused login does not restart the interval.
    pub fn login_interval(&self, mailbox: &str, min: Duration) -> Result<(), Duration> {
        self.login_interval_at(mailbox, min, Instant::now())
    }

    /// [`Throttle::login_interval`] at a given time.
    pub fn login_interval_at(
        &self,
        mailbox: &str,
        min: Duration,
        now: Instant,
    ) -> Result<(), Duration> {
        let min = min.min(MAX_SPAN);
        if min.is_zero() {
            return Ok(());
        }
        let mailbox = self.mailbox_key(mailbox);
        let mut next = lock(&self.inner.next_login);
        match next.get_mut(&mailbox) {
            Some(at) if *at > now => Err(at.duration_since(now)),
            Some(at) => {
                *at = now + min;
                Ok(())
            }
            None => {
                make_room(&mut next, self.inner.config.load().max_tracked_keys, |at| {
                    *at
                });
                next.insert(mailbox, now + min);
                Ok(())
            }
        }
    }

    /// Records how long a store took to refuse a login (from the request to its `-ERR`).
    pub fn store_refused_after(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let micros = u64::try_from(took.as_micros())
            .unwrap_or(u64::MAX)
            .min(10_000_000);
        // An average over about the last eight refusals; the first one sets it.
        let _ = self
            .inner
            .refusal_micros
            .fetch_update(Relaxed, Relaxed, |old| {
                Some(if old == 0 {
                    micros.max(1)
                } else {
                    (old * 7 + micros) / 8
                })
            });
    }

    /// How long a refusal popgate decides alone (an unknown domain, a malformed name) should take, so it
    /// cannot be told from a store's refusal by its timing: the stores' typical refusal time, varied by
    /// `jitter` (any number; its low bits pick a point between 3/4 and 5/4 of it). Zero until a store
    /// refused a login.
    pub fn refusal_time(&self, jitter: u64) -> Duration {
        let typical = self
            .inner
            .refusal_micros
            .load(std::sync::atomic::Ordering::Relaxed);
        let spread = typical / 2;
        let offset = if spread == 0 { 0 } else { jitter % spread };
        Duration::from_micros(typical - typical / 4 + offset)
    }

    /// The key of a mailbox: a keyed 128-bit digest of its normalised name.
    fn mailbox_key(&self, mailbox: &str) -> MailboxKey {
        xxhash_rust::xxh3::xxh3_128_with_seed(mailbox.as_bytes(), self.inner.seed)
    }

    /// A wrong secret as remembered: a keyed 32-bit digest, never 0 (0 marks an empty slot).
    fn secret_digest(&self, secret: &[u8]) -> u32 {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(secret, self.inner.seed ^ 0x5ec2_e7d1);
        u32::try_from(h >> 32).unwrap_or(1).max(1)
    }

    /// An address as remembered for `spare_known_addresses`: a keyed digest, never 0.
    fn address_digest(&self, key: IpKey) -> u64 {
        let bytes = match key {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, self.inner.seed ^ 0xadd2).max(1)
    }

    /// Whether `spare_known_addresses` is on and `key` logged in to `mailbox` lately.
    fn is_known_address(&self, mailbox: MailboxKey, key: IpKey, now: Instant) -> bool {
        let config = self.inner.config.load();
        if !config.spare_known_addresses {
            return false;
        }
        let address = self.address_digest(key);
        lock(&self.inner.known_addresses)
            .get(&mailbox)
            .is_some_and(|slots| {
                slots.iter().any(|(a, at)| {
                    *a == address && now.saturating_duration_since(*at) < config.known_address_for
                })
            })
    }

    /// `failed_login_delay` doubled per failure after the first, capped at `failed_login_max_delay`.
    fn delay_for(&self, failures: u32) -> Duration {
        let config = self.inner.config.load();
        let doublings = failures.saturating_sub(1).min(31);
        config
            .failed_login_delay
            .checked_mul(1 << doublings)
            .unwrap_or(Duration::MAX)
            .min(config.failed_login_max_delay)
    }

    fn ip_key(&self, ip: IpAddr) -> IpKey {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u32::from(self.inner.config.load().ipv6_prefix_len);
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
            IpAddr::V4(v4) => IpAddr::V4(v4),
        }
    }
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("config", &self.inner.config.load())
            .field("tracked_keys", &self.tracked_keys())
            .finish()
    }
}

/// Puts `key` under a lockout until `until` (kept if one already runs longer).
fn lock_until<K: Hash + Eq + Copy>(
    failures: &mut HashMap<K, Failures>,
    key: K,
    until: Instant,
    now: Instant,
    config: &ThrottleConfig,
) {
    if !failures.contains_key(&key) {
        make_room(failures, config.max_tracked_keys, |f| f.rank(now));
    }
    let f = failures.entry(key).or_insert_with(|| Failures::new(now));
    f.count = f.count.max(config.lockout_after);
    f.last = now;
    f.locked_until = Some(f.locked_until.map_or(until, |u| u.max(until)));
}

// === impl HeldCap ===

/// A cap on things held open for clients, in all and per client address: the store connections held for
/// greetings of clients that have not logged in yet (APOP passthrough), so anonymous connects cannot tie
/// up a store's login processes.
#[derive(Debug)]
pub struct HeldCap {
    max: usize,
    max_per_ip: usize,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One slot of a [`HeldCap`]; released on drop.
#[derive(Debug)]
pub struct Held {
    cap: Arc<HeldCap>,
    ip: IpAddr,
}

impl HeldCap {
    /// A cap of `max` in all and `max_per_ip` per client address.
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            max_per_ip,
            held: Mutex::default(),
        })
    }

    /// Takes a slot for `ip`, or `None` when either cap is reached.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Held> {
        let ip = ip.to_canonical();
        let mut held = lock(&self.held);
        if held.0 >= self.max || !take_slot(&mut held.1, &ip, self.max_per_ip) {
            return None;
        }
        held.0 += 1;
        Some(Held {
            cap: Arc::clone(self),
            ip,
        })
    }

    /// Slots held now.
    pub fn held(&self) -> usize {
        lock(&self.held).0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = lock(&self.cap.held);
        held.0 = held.0.saturating_sub(1);
        release_slot(&mut held.1, &self.ip);
    }
}

// === impl Failures ===

impl Failures {
    fn new(now: Instant) -> Self {
        Self {
            count: 0,
            last: now,
            locked_until: None,
            passwords: [0; REMEMBERED_PASSWORDS],
        }
    }

    /// Eviction rank, lowest first: keys with no lock in force by their last failure, then locks by
    /// their end.
    fn rank(&self, now: Instant) -> (bool, Instant) {
        match self.lock_left(now) {
            Some(_) => (true, self.locked_until.unwrap_or(now)),
            None => (false, self.last),
        }
    }

    /// Whether this wrong password was counted lately (and the count is still current).
    fn seen_password(&self, digest: u32, now: Instant, config: &ThrottleConfig) -> bool {
        now.duration_since(self.last) < config.forget_after && self.passwords.contains(&digest)
    }

    /// Remembers a counted wrong password, pushing out the oldest.
    fn remember_password(&mut self, digest: u32) {
        self.passwords.rotate_right(1);
        self.passwords[0] = digest;
    }

    /// Time left of a lockout in force.
    fn lock_left(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Counts one failure; returns the count and, when locked, the time left.
    fn record(&mut self, now: Instant, config: &ThrottleConfig) -> (u32, Option<Duration>) {
        if let Some(left) = self.lock_left(now) {
            return (self.count, Some(left));
        }
        if self.locked_until.take().is_some()
            || now.duration_since(self.last) >= config.forget_after
        {
            // A served lockout, or a long quiet spell, starts the key afresh.
            self.count = 0;
            self.passwords = [0; REMEMBERED_PASSWORDS];
        }
        self.count = self.count.saturating_add(1);
        self.last = now;
        if config.lockout_after > 0 && self.count >= config.lockout_after {
            self.locked_until = Some(now + config.lockout_for);
            return (self.count, Some(config.lockout_for));
        }
        (self.count, None)
    }

    fn is_idle(&self, now: Instant, forget_after: Duration) -> bool {
        self.lock_left(now).is_none() && now.duration_since(self.last) >= forget_after
    }
}

// === impl IpGuard, MailboxGuard ===

impl Drop for IpGuard {
    fn drop(&mut self) {
        if let Some((inner, key)) = self.slot.take() {
            release_slot(&mut lock(&inner.ip_sessions), &key);
        }
    }
}

impl fmt::Debug for IpGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpGuard")
            .field("counted", &self.slot.is_some())
            .finish()
    }
}

impl Drop for MailboxGuard {
    fn drop(&mut self) {
        if let Some((inner, mailbox)) = self.slot.take() {
            release_slot(&mut lock(&inner.mailbox_sessions), &mailbox);
        }
    }
}

impl Drop for TenantGuard {
    fn drop(&mut self) {
        if let Some((inner, tenant)) = self.slot.take() {
            release_slot(&mut lock(&inner.tenant_sessions), &tenant);
        }
    }
}

impl fmt::Debug for TenantGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantGuard")
            .field("counted", &self.slot.is_some())
            .finish()
    }
}

impl fmt::Debug for MailboxGuard {
    // The mailbox is a user name: it stays out of Debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailboxGuard")
            .field("counted", &self.slot.is_some())
            .finish()
    }
}

// === helpers ===

/// A poisoned lock only means another thread panicked mid-update of plain counters: keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Generic cell rate algorithm (a token bucket kept as one timestamp): takes a token for `key` if one
/// is left. `burst` tokens at most; one comes back every `per`.
fn gcra_take(
    buckets: &mut HashMap<IpKey, Instant>,
    key: IpKey,
    burst: u32,
    per: Duration,
    now: Instant,
) -> bool {
    let tolerance = per.saturating_mul(burst.saturating_sub(1));
    let tat = buckets.get(&key).copied().unwrap_or(now).max(now);
    if tat.duration_since(now) > tolerance {
        return false;
    }
    buckets.insert(key, tat + per);
    true
}

fn take_slot<Q>(counts: &mut HashMap<Q::Owned, usize>, key: &Q, max: usize) -> bool
where
    Q: ?Sized + Hash + Eq + ToOwned,
    Q::Owned: Hash + Eq + std::borrow::Borrow<Q>,
{
    match counts.get_mut(key) {
        Some(open) if *open >= max => false,
        Some(open) => {
            *open += 1;
            true
        }
        None if max == 0 => false,
        None => {
            counts.insert(key.to_owned(), 1);
            true
        }
    }
}

/// Makes room for one more key when `map` holds `cap` or more: drops the lowest-ranked eighth (at least
/// one key). Amortised over the insertions that follow, this costs a few comparisons per new key.
fn make_room<K: Hash + Eq + Copy, V, R: Ord>(
    map: &mut HashMap<K, V>,
    cap: usize,
    rank: impl Fn(&V) -> R,
) {
    if map.len() < cap {
        return;
    }
    let drop_n = (map.len() + 1 - cap).max(cap / 8).max(1);
    let mut ranked: Vec<(R, K)> = map.iter().map(|(k, v)| (rank(v), *k)).collect();
    if drop_n < ranked.len() {
        ranked.select_nth_unstable_by(drop_n, |a, b| a.0.cmp(&b.0));
        ranked.truncate(drop_n);
    }
    for (_, k) in ranked {
        map.remove(&k);
    }
}

/// A seed for the keyed digests, from the operating system's random source.
fn random_seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // Should the source fail, the clock still makes the seed unknown to a remote client.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos as u64).to_le_bytes();
    }
    u64::from_le_bytes(bytes)
}

fn release_slot<K: Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(open) = counts.get_mut(key) {
        *open = open.saturating_sub(1);
        if *open == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Only what a test names is on; everything else off.
    fn bare() -> ThrottleConfig {
        ThrottleConfig {
            trusted: Vec::new(),
            failed_login_delay: S,
            failed_login_max_delay: 8 * S,
            lockout_after: 0,
            lockout_for: 60 * S,
            forget_after: 600 * S,
            max_sessions_per_ip: None,
            connection_rate_per_ip: None,
            max_sessions_per_mailbox: None,
            ipv6_prefix_len: 64,
            max_tracked_keys: 100_000,
            spare_known_addresses: false,
            known_address_for: 3600 * S,
        }
    }

    fn fail<'a>(mailbox: Option<&'a str>, secret: &'static [u8]) -> Failure<'a> {
        Failure {
            mailbox,
            secret: Some(secret),
        }
    }

    #[test]
    fn unrouted_names_cost_no_per_name_state_and_long_names_cost_no_more_than_short() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 3,
            ..bare()
        });
        let now = Instant::now();
        let attacker = ip("192.0.2.66");
        for i in 0..5_000 {
            let name = format!("{i:09000}\0pw");
            let _ = t.failed_at(attacker, fail(None, b"pw"), now);
            // A routed name is one fixed-size key, whatever its length.
            if i < 3 {
                let _ = t.failed_at(attacker, fail(Some(&name), b"x"), now);
            }
        }
        // One address key and three mailbox keys: nothing grew with the 5,000 names.
        assert_eq!(t.tracked_keys(), 4);
        assert!(matches!(
            t.check_ip_at(attacker, now),
            Verdict::LockedOut { .. }
        ));
        assert_eq!(t.check_ip_at(ip("192.0.2.67"), now), Verdict::Allow);
    }

    #[test]
    fn maps_are_capped_and_evict_idle_keys_before_locks() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 2,
            max_tracked_keys: 64,
            ..bare()
        });
        let now = Instant::now();
        // One mailbox locked out first...
        let a = ip("192.0.2.1");
        let _ = t.failed_at(a, fail(Some("locked@example.com"), b"1"), now);
        let _ = t.failed_at(a, fail(Some("locked@example.com"), b"2"), now);
        assert!(matches!(
            t.check_login_at(ip("198.51.100.9"), "locked@example.com", now),
            Verdict::LockedOut { .. }
        ));
        // ...then thousands of single failures of other names from many addresses.
        for i in 0..5_000u32 {
            let from = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let name = format!("user{i}@example.com");
            let _ = t.failed_at(from, fail(Some(&name), b"x"), now + S);
        }
        let inner = &t.inner;
        assert!(lock(&inner.mailbox_failures).len() <= 64);
        assert!(lock(&inner.ip_failures).len() <= 64);
        // The lock in force outlived the flood of unlocked keys.
        assert!(matches!(
            t.check_login_at(ip("198.51.100.9"), "locked@example.com", now + S),
            Verdict::LockedOut { .. }
        ));
    }

    #[test]
    fn a_repeated_wrong_password_counts_once() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 3,
            ..bare()
        });
        let now = Instant::now();
        let client = ip("192.0.2.10");
        // A mail client polling every minute with an old password, for an hour.
        for minute in 0..60 {
            let v = t.failed_at(
                client,
                fail(Some("bob@example.com"), b"old-password"),
                now + minute * 60 * S,
            );
            assert_eq!(v, Verdict::Delay(S), "minute {minute}");
        }
        assert_eq!(
            t.check_login_at(client, "bob@example.com", now + 3600 * S),
            Verdict::Allow
        );
        // Different passwords still count, and lock out at the third.
        let _ = t.failed_at(client, fail(Some("bob@example.com"), b"guess-1"), now);
        let v = t.failed_at(client, fail(Some("bob@example.com"), b"guess-2"), now);
        assert!(matches!(v, Verdict::LockedOut { .. }), "{v:?}");
    }

    #[test]
    fn a_locked_mailbox_still_admits_an_address_it_logged_in_from() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 3,
            spare_known_addresses: true,
            ..bare()
        });
        let now = Instant::now();
        let owner = ip("192.0.2.20");
        t.login_ok_at(owner, "carol@example.com", now).unwrap();
        // Strangers at three addresses lock the mailbox out.
        for (i, guess) in [b"a", b"b", b"c"].iter().enumerate() {
            let stranger = IpAddr::from([198, 51, 100, u8::try_from(i).unwrap()]);
            let _ = t.failed_at(stranger, fail(Some("carol@example.com"), *guess), now);
        }
        let stranger = ip("198.51.100.77");
        assert!(matches!(
            t.check_login_at(stranger, "carol@example.com", now),
            Verdict::LockedOut { .. }
        ));
        // The owner's address still gets in, and its own wrong password is delayed, not locked out.
        assert_eq!(
            t.check_login_at(owner, "carol@example.com", now),
            Verdict::Allow
        );
        assert!(matches!(
            t.failed_at(owner, fail(Some("carol@example.com"), b"typo"), now),
            Verdict::Delay(_)
        ));
        // Once its memory of the owner fades, the lock applies to the owner's address too.
        let later = now + 3601 * S;
        let _ = t.failed_at(stranger, fail(Some("carol@example.com"), b"d"), later);
        let _ = t.failed_at(stranger, fail(Some("carol@example.com"), b"e"), later);
        let _ = t.failed_at(stranger, fail(Some("carol@example.com"), b"f"), later);
        assert!(matches!(
            t.check_login_at(owner, "carol@example.com", later),
            Verdict::LockedOut { .. }
        ));
        // Off: the lock applies to everyone.
        let strict = Throttle::new(ThrottleConfig {
            lockout_after: 1,
            ..bare()
        });
        strict.login_ok_at(owner, "dave@example.com", now).unwrap();
        let _ = strict.failed_at(stranger, fail(Some("dave@example.com"), b"x"), now);
        assert!(matches!(
            strict.check_login_at(owner, "dave@example.com", now),
            Verdict::LockedOut { .. }
        ));
    }

    #[test]
    fn refusal_time_follows_the_stores_and_varies() {
        let t = Throttle::new(bare());
        assert_eq!(t.refusal_time(12345), Duration::ZERO);
        t.store_refused_after(Duration::from_millis(400));
        let times: Vec<Duration> = (0..50).map(|j| t.refusal_time(j * 7919)).collect();
        for d in &times {
            assert!(
                (Duration::from_millis(300)..=Duration::from_millis(500)).contains(d),
                "{d:?}"
            );
        }
        assert!(times.iter().any(|d| *d != times[0]), "no jitter");
        for _ in 0..40 {
            t.store_refused_after(Duration::from_millis(40));
        }
        assert!(t.refusal_time(0) < Duration::from_millis(60));
    }

    #[test]
    fn held_slots_are_capped_in_all_and_per_address_and_released() {
        let cap = HeldCap::new(3, 2);
        let a = cap.take(ip("192.0.2.1")).unwrap();
        let _b = cap.take(ip("192.0.2.1")).unwrap();
        assert!(cap.take(ip("192.0.2.1")).is_none(), "per-address cap");
        let _c = cap.take(ip("192.0.2.2")).unwrap();
        assert!(cap.take(ip("192.0.2.3")).is_none(), "total cap");
        drop(a);
        assert_eq!(cap.held(), 2);
        assert!(cap.take(ip("192.0.2.3")).is_some());
    }

    #[test]
    fn is_send_sync_and_guards_are_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Throttle>();
        check::<IpGuard>();
        check::<MailboxGuard>();
    }

    #[test]
    fn tenant_sessions_are_capped_and_released() {
        let t = Throttle::new(bare());
        let a = t.tenant_session("acme", 2).unwrap();
        let _b = t.tenant_session("acme", 2).unwrap();
        assert_eq!(t.tenant_session("acme", 2).unwrap_err(), "tenant_sessions");
        // Another tenant has its own count; 0 is no cap and holds nothing.
        let _c = t.tenant_session("other", 2).unwrap();
        let before = t.tracked_keys();
        let _free = t.tenant_session("acme", 0).unwrap();
        assert_eq!(t.tracked_keys(), before);
        drop(a);
        assert!(t.tenant_session("acme", 2).is_ok());
    }

    #[test]
    fn login_interval_refuses_early_logins_then_allows_and_forgets() {
        let t = Throttle::new(bare());
        let now = Instant::now();
        let min = 300 * S;
        assert_eq!(t.login_interval_at("a@example.com", min, now), Ok(()));
        assert_eq!(
            t.login_interval_at("a@example.com", min, now + 100 * S),
            Err(200 * S)
        );
        // A refused login does not restart the interval; another mailbox is not affected.
        assert_eq!(
            t.login_interval_at("a@example.com", min, now + 299 * S),
            Err(S)
        );
        assert_eq!(
            t.login_interval_at("b@example.com", min, now + 100 * S),
            Ok(())
        );
        assert_eq!(
            t.login_interval_at("a@example.com", min, now + 300 * S),
            Ok(())
        );
        assert_eq!(
            t.login_interval_at("a@example.com", min, now + 301 * S),
            Err(299 * S)
        );
        // Once every interval has run out the keys are forgotten.
        t.purge_at(now + 601 * S);
        assert_eq!(t.tracked_keys(), 0);
    }

    #[test]
    fn reconfigure_changes_limits_and_keeps_counts() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 3,
            ..bare()
        });
        let now = Instant::now();
        let client = ip("192.0.2.7");
        t.login_failed_at(client, "a@example.com", now);
        t.login_failed_at(client, "a@example.com", now);
        assert_eq!(
            t.check_login_at(client, "a@example.com", now),
            Verdict::Allow
        );
        // The new config locks out after two: the two failures already counted bring the next to a lock.
        t.reconfigure(ThrottleConfig {
            lockout_after: 2,
            ..bare()
        });
        assert_eq!(t.config().lockout_after, 2);
        assert!(matches!(
            t.login_failed_at(client, "a@example.com", now),
            Verdict::LockedOut { .. }
        ));
        // Trusting the client's network now exempts it.
        t.reconfigure(ThrottleConfig {
            trusted: vec!["192.0.2.0/24".parse().unwrap()],
            ..bare()
        });
        assert_eq!(
            t.check_login_at(client, "a@example.com", now),
            Verdict::Allow
        );
    }

    #[test]
    fn failed_logins_get_growing_delays_up_to_the_cap() {
        let t = Throttle::new(bare());
        let now = Instant::now();
        let delays: Vec<_> = (0..6)
            .map(|_| t.login_failed_at(ip("192.0.2.1"), "a@example.com", now))
            .collect();
        let secs = |n| Verdict::Delay(n * S);
        assert_eq!(
            delays,
            [secs(1), secs(2), secs(4), secs(8), secs(8), secs(8)]
        );
    }

    #[test]
    fn the_delay_follows_the_worse_of_ip_and_mailbox() {
        let t = Throttle::new(bare());
        let now = Instant::now();
        for _ in 0..3 {
            t.login_failed_at(ip("192.0.2.1"), "a@example.com", now);
        }
        // A fresh address against the same mailbox: the mailbox's fourth failure.
        assert_eq!(
            t.login_failed_at(ip("192.0.2.2"), "a@example.com", now),
            Verdict::Delay(8 * S)
        );
        // The first address against a fresh mailbox: the address's fourth failure.
        assert_eq!(
            t.login_failed_at(ip("192.0.2.1"), "b@example.com", now),
            Verdict::Delay(8 * S)
        );
        // Neither seen before.
        assert_eq!(
            t.login_failed_at(ip("192.0.2.3"), "c@example.com", now),
            Verdict::Delay(S)
        );
    }

    #[test]
    fn a_zero_delay_stays_zero() {
        let t = Throttle::new(ThrottleConfig {
            failed_login_delay: Duration::ZERO,
            ..bare()
        });
        let now = Instant::now();
        for _ in 0..40 {
            assert_eq!(
                t.login_failed_at(ip("192.0.2.1"), "a@example.com", now),
                Verdict::Delay(Duration::ZERO)
            );
        }
    }

    #[test]
    fn lockout_after_n_failures_then_expiry_starts_afresh() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 3,
            ..bare()
        });
        let (client, mailbox) = (ip("192.0.2.1"), "a@example.com");
        let t0 = Instant::now();
        assert_eq!(t.check_login_at(client, mailbox, t0), Verdict::Allow);
        assert_eq!(t.login_failed_at(client, mailbox, t0), Verdict::Delay(S));
        assert_eq!(
            t.login_failed_at(client, mailbox, t0),
            Verdict::Delay(2 * S)
        );
        assert_eq!(
            t.login_failed_at(client, mailbox, t0),
            Verdict::LockedOut {
                retry_after: 60 * S
            }
        );
        assert_eq!(
            t.check_login_at(client, mailbox, t0 + 10 * S),
            Verdict::LockedOut {
                retry_after: 50 * S
            }
        );
        // A failure counted while locked (a racing session) does not extend the lockout.
        assert_eq!(
            t.login_failed_at(client, mailbox, t0 + 20 * S),
            Verdict::LockedOut {
                retry_after: 40 * S
            }
        );
        let t1 = t0 + 60 * S;
        assert_eq!(t.check_login_at(client, mailbox, t1), Verdict::Allow);
        assert_eq!(
            t.login_failed_at(client, mailbox, t1),
            Verdict::Delay(S),
            "a served lockout starts the count again"
        );
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_spell() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 3,
            ..bare()
        });
        let (client, mailbox) = (ip("192.0.2.1"), "a@example.com");
        let t0 = Instant::now();
        t.login_failed_at(client, mailbox, t0);
        t.login_failed_at(client, mailbox, t0);
        // Without purging: a failure after forget_after counts as the first.
        assert_eq!(
            t.login_failed_at(client, mailbox, t0 + 600 * S),
            Verdict::Delay(S)
        );
    }

    #[test]
    fn an_ip_locked_out_by_brute_force_leaves_other_clients_alone() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 10,
            ..bare()
        });
        let (attacker, user) = (ip("203.0.113.66"), ip("198.51.100.7"));
        let now = Instant::now();
        let mut refused_unchecked = 0;
        let mut max_delay = Duration::ZERO;
        for n in 0..100 {
            let mailbox = format!("victim{}@example.com", n % 7);
            match t.check_login_at(attacker, &mailbox, now) {
                Verdict::LockedOut { .. } => refused_unchecked += 1,
                Verdict::Allow => match t.login_failed_at(attacker, &mailbox, now) {
                    Verdict::Delay(d) => max_delay = max_delay.max(d),
                    Verdict::LockedOut { .. } => {}
                    Verdict::Allow => panic!("an untrusted failure is never just allowed"),
                },
                Verdict::Delay(_) => panic!("check_login never delays"),
            }
        }
        assert_eq!(refused_unchecked, 90, "the tenth failure locks the address");
        assert_eq!(max_delay, 8 * S);
        // The victims' mailboxes saw at most two failures each: not locked.
        assert_eq!(
            t.check_login_at(user, "victim0@example.com", now),
            Verdict::Allow
        );
        // Another address, another mailbox: no delay, no lock, a session slot.
        assert_eq!(
            t.check_login_at(user, "someone@example.com", now),
            Verdict::Allow
        );
        assert!(t.login_ok_at(user, "someone@example.com", now).is_ok());
        assert!(matches!(
            t.check_login_at(attacker, "someone@example.com", now),
            Verdict::LockedOut { .. }
        ));
    }

    #[test]
    fn a_mailbox_locked_out_from_many_addresses_leaves_those_addresses_free_elsewhere() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 5,
            ..bare()
        });
        let now = Instant::now();
        let mut last = Verdict::Allow;
        for n in 1..=5 {
            last = t.login_failed_at(ip(&format!("192.0.2.{n}")), "ceo@example.com", now);
        }
        assert_eq!(
            last,
            Verdict::LockedOut {
                retry_after: 60 * S
            }
        );
        assert!(matches!(
            t.check_login_at(ip("192.0.2.99"), "ceo@example.com", now),
            Verdict::LockedOut { .. }
        ));
        assert_eq!(
            t.check_login_at(ip("192.0.2.1"), "other@example.com", now),
            Verdict::Allow
        );
    }

    #[test]
    fn a_successful_login_clears_both_counts() {
        let t = Throttle::new(bare());
        let (client, mailbox) = (ip("192.0.2.1"), "a@example.com");
        let now = Instant::now();
        for _ in 0..4 {
            t.login_failed_at(client, mailbox, now);
        }
        drop(t.login_ok_at(client, mailbox, now).unwrap());
        assert_eq!(t.login_failed_at(client, mailbox, now), Verdict::Delay(S));
    }

    #[test]
    fn trusted_networks_are_exempt() {
        let t = Throttle::new(ThrottleConfig {
            trusted: vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8:1::/48".parse().unwrap(),
            ],
            lockout_after: 3,
            max_sessions_per_ip: Some(1),
            connection_rate_per_ip: Some((1, 60 * S)),
            ..bare()
        });
        let now = Instant::now();
        for webmail in [ip("10.1.2.3"), ip("::ffff:10.9.9.9"), ip("2001:db8:1:2::5")] {
            for _ in 0..100 {
                assert_eq!(
                    t.login_failed_at(webmail, "a@example.com", now),
                    Verdict::Allow
                );
                assert_eq!(
                    t.check_login_at(webmail, "a@example.com", now),
                    Verdict::Allow
                );
            }
            let guards: Vec<_> = (0..10).map(|_| t.admit_at(webmail, now).unwrap()).collect();
            drop(guards);
        }
        assert_eq!(t.tracked_keys(), 0, "trusted clients leave no trace");
        // A mailbox locked from the internet is still reachable from a trusted network.
        for _ in 0..3 {
            t.login_failed_at(ip("203.0.113.1"), "b@example.com", now);
        }
        assert!(matches!(
            t.check_login_at(ip("203.0.113.2"), "b@example.com", now),
            Verdict::LockedOut { .. }
        ));
        assert_eq!(
            t.check_login_at(ip("10.1.2.3"), "b@example.com", now),
            Verdict::Allow
        );
    }

    #[test]
    fn the_connection_rate_refills_one_token_per_interval() {
        let t = Throttle::new(ThrottleConfig {
            connection_rate_per_ip: Some((3, 10 * S)),
            ..bare()
        });
        let (client, other) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(t.admit_at(client, t0).is_ok());
        }
        assert_eq!(t.admit_at(client, t0).unwrap_err(), "rate");
        assert!(t.admit_at(other, t0).is_ok(), "buckets are per client");
        assert_eq!(t.admit_at(client, t0 + 9 * S).unwrap_err(), "rate");
        assert!(t.admit_at(client, t0 + 10 * S).is_ok());
        assert_eq!(t.admit_at(client, t0 + 10 * S).unwrap_err(), "rate");
        // A long pause refills the whole burst, never more.
        let t1 = t0 + 1000 * S;
        for _ in 0..3 {
            assert!(t.admit_at(client, t1).is_ok());
        }
        assert_eq!(t.admit_at(client, t1).unwrap_err(), "rate");
    }

    #[test]
    fn ipv6_clients_count_per_prefix() {
        let t = Throttle::new(ThrottleConfig {
            connection_rate_per_ip: Some((2, 10 * S)),
            ..bare()
        });
        let now = Instant::now();
        assert!(t.admit_at(ip("2001:db8:0:1::1"), now).is_ok());
        assert!(t.admit_at(ip("2001:db8:0:1:ffff::2"), now).is_ok());
        assert_eq!(
            t.admit_at(ip("2001:db8:0:1::3"), now).unwrap_err(),
            "rate",
            "the same /64"
        );
        assert!(
            t.admit_at(ip("2001:db8:0:2::1"), now).is_ok(),
            "another /64"
        );
        // An IPv4-mapped address is the IPv4 client.
        assert!(t.admit_at(ip("192.0.2.1"), now).is_ok());
        assert!(t.admit_at(ip("::ffff:192.0.2.1"), now).is_ok());
        assert_eq!(t.admit_at(ip("192.0.2.1"), now).unwrap_err(), "rate");

        let per_address = Throttle::new(ThrottleConfig {
            ipv6_prefix_len: 128,
            connection_rate_per_ip: Some((1, 10 * S)),
            ..bare()
        });
        assert!(per_address.admit_at(ip("2001:db8::1"), now).is_ok());
        assert!(per_address.admit_at(ip("2001:db8::2"), now).is_ok());
    }

    #[test]
    fn per_ip_sessions_are_capped_and_released_by_guards() {
        let t = Throttle::new(ThrottleConfig {
            max_sessions_per_ip: Some(2),
            ..bare()
        });
        let (client, other) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let now = Instant::now();
        let first = t.admit_at(client, now).unwrap();
        let second = t.admit_at(client, now).unwrap();
        assert_eq!(t.admit_at(client, now).unwrap_err(), "ip_sessions");
        let elsewhere = t.admit_at(other, now).unwrap();
        drop(first);
        let third = t.admit_at(client, now).unwrap();
        assert_eq!(t.admit_at(client, now).unwrap_err(), "ip_sessions");
        drop((second, third, elsewhere));
        assert_eq!(t.tracked_keys(), 0, "a counter goes with its last guard");
    }

    #[test]
    fn per_mailbox_sessions_are_capped_and_released_by_guards() {
        let t = Throttle::new(ThrottleConfig {
            max_sessions_per_mailbox: Some(1),
            ..bare()
        });
        let now = Instant::now();
        let held = t
            .login_ok_at(ip("192.0.2.1"), "a@example.com", now)
            .unwrap();
        assert_eq!(
            t.login_ok_at(ip("192.0.2.2"), "a@example.com", now)
                .unwrap_err(),
            "mailbox_sessions"
        );
        let other = t
            .login_ok_at(ip("192.0.2.2"), "b@example.com", now)
            .unwrap();
        assert_eq!(format!("{held:?}"), "MailboxGuard { counted: true }");
        drop(held);
        let again = t
            .login_ok_at(ip("192.0.2.2"), "a@example.com", now)
            .unwrap();
        drop((again, other));
        assert_eq!(t.tracked_keys(), 0);

        let closed = Throttle::new(ThrottleConfig {
            max_sessions_per_mailbox: Some(0),
            ..bare()
        });
        assert!(
            closed
                .login_ok_at(ip("192.0.2.1"), "a@example.com", now)
                .is_err()
        );
        assert_eq!(closed.tracked_keys(), 0);
    }

    #[test]
    fn purge_forgets_idle_keys_but_keeps_locks_in_force() {
        let t = Throttle::new(ThrottleConfig {
            lockout_after: 2,
            lockout_for: 900 * S,
            forget_after: 600 * S,
            connection_rate_per_ip: Some((5, S)),
            ..bare()
        });
        let t0 = Instant::now();
        for n in 0..50 {
            let client = ip(&format!("192.0.2.{n}"));
            let _ = t.admit_at(client, t0).unwrap();
            t.login_failed_at(client, &format!("user{n}@example.com"), t0);
        }
        // The attacker gets locked (two failures, one mailbox each).
        t.login_failed_at(ip("203.0.113.9"), "x@example.com", t0);
        t.login_failed_at(ip("203.0.113.9"), "y@example.com", t0);
        assert_eq!(t.tracked_keys(), 50 * 3 + 3);

        t.purge_at(t0 + S);
        assert_eq!(t.tracked_keys(), 50 * 2 + 3, "full rate buckets go first");
        t.purge_at(t0 + 599 * S);
        assert_eq!(
            t.tracked_keys(),
            50 * 2 + 3,
            "failures are kept until forget_after"
        );
        t.purge_at(t0 + 600 * S);
        assert_eq!(t.tracked_keys(), 1, "only the lock in force is left");
        assert!(matches!(
            t.check_login_at(ip("203.0.113.9"), "z@example.com", t0 + 600 * S),
            Verdict::LockedOut { .. }
        ));
        t.purge_at(t0 + 900 * S);
        assert_eq!(t.tracked_keys(), 0);
    }

    #[test]
    fn absurd_settings_are_clamped_not_overflowed() {
        let t = Throttle::new(ThrottleConfig {
            failed_login_max_delay: Duration::MAX,
            lockout_after: 40,
            lockout_for: Duration::MAX,
            forget_after: Duration::MAX,
            connection_rate_per_ip: Some((0, Duration::MAX)),
            ipv6_prefix_len: 200,
            ..bare()
        });
        let now = Instant::now();
        let mut last = Verdict::Allow;
        for _ in 0..40 {
            last = t.login_failed_at(ip("2001:db8::1"), "a@example.com", now);
        }
        assert_eq!(
            last,
            Verdict::LockedOut {
                retry_after: MAX_SPAN
            }
        );
        assert!(t.admit_at(ip("2001:db8::1"), now).is_ok());
        assert_eq!(t.admit_at(ip("2001:db8::1"), now).unwrap_err(), "rate");
        t.purge_at(now);
    }
}
