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

struct Inner {
    /// Swapped whole by [`Throttle::reconfigure`]; the counters are kept.
    config: arc_swap::ArcSwap<ThrottleConfig>,
    ip_failures: Mutex<HashMap<IpKey, Failures>>,
    mailbox_failures: Mutex<HashMap<String, Failures>>,
    /// Per client IP, the GCRA "theoretical arrival time": the bucket is full once it is not after now.
    connection_rate: Mutex<HashMap<IpKey, Instant>>,
    ip_sessions: Mutex<HashMap<IpKey, usize>>,
    mailbox_sessions: Mutex<HashMap<String, usize>>,
    tenant_sessions: Mutex<HashMap<String, usize>>,
    /// Per mailbox, when its next login may start (only while a minimum interval is running).
    next_login: Mutex<HashMap<String, Instant>>,
}

/// Failed logins of one client IP or one mailbox.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Holds one of a client IP's session slots; releases it on drop. A no-op for trusted clients and when
/// the per-IP cap is off.
pub struct IpGuard {
    slot: Option<(Arc<Inner>, IpKey)>,
}

/// Holds one of a mailbox's session slots; releases it on drop. A no-op when the per-mailbox cap is off.
pub struct MailboxGuard {
    slot: Option<(Arc<Inner>, String)>,
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
                ip_failures: Mutex::default(),
                mailbox_failures: Mutex::default(),
                connection_rate: Mutex::default(),
                ip_sessions: Mutex::default(),
                mailbox_sessions: Mutex::default(),
                tenant_sessions: Mutex::default(),
                next_login: Mutex::default(),
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
        ] {
            *d = (*d).min(MAX_SPAN);
        }
        if let Some((burst, per)) = &mut config.connection_rate_per_ip {
            *burst = (*burst).max(1);
            *per = (*per).min(MAX_SPAN);
        }
        config.ipv6_prefix_len = config.ipv6_prefix_len.min(128);
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
            && !gcra_take(&mut lock(&self.inner.connection_rate), key, burst, per, now)
        {
            return Err("rate");
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

    /// Before checking credentials: is this client IP or this mailbox locked out?
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
        let mailbox_left = lock(&self.inner.mailbox_failures)
            .get(mailbox)
            .and_then(|f| f.lock_left(now));
        match ip_left.max(mailbox_left) {
            Some(retry_after) => Verdict::LockedOut { retry_after },
            None => Verdict::Allow,
        }
    }

    /// After a failed login: counts it for the client IP and the mailbox. Returns the delay to wait
    /// before the `-ERR` (growing with the failures), or [`Verdict::LockedOut`] once either reaches
    /// `lockout_after` (or is already locked). Trusted clients get [`Verdict::Allow`] and are not counted.
    pub fn login_failed(&self, ip: IpAddr, mailbox: &str) -> Verdict {
        self.login_failed_at(ip, mailbox, Instant::now())
    }

    /// [`Throttle::login_failed`] at a given time.
    pub fn login_failed_at(&self, ip: IpAddr, mailbox: &str, now: Instant) -> Verdict {
        if self.is_trusted(ip) {
            return Verdict::Allow;
        }
        let config = self.inner.config.load();
        let key = self.ip_key(ip);
        let (ip_count, ip_locked) = lock(&self.inner.ip_failures)
            .entry(key)
            .or_insert_with(|| Failures::new(now))
            .record(now, &config);
        let (mailbox_count, mailbox_locked) = {
            let mut failures = lock(&self.inner.mailbox_failures);
            // Look up before inserting so a repeat offender's name is not copied again.
            match failures.get_mut(mailbox) {
                Some(f) => f.record(now, &config),
                None => failures
                    .entry(mailbox.to_owned())
                    .or_insert_with(|| Failures::new(now))
                    .record(now, &config),
            }
        };
        match ip_locked.max(mailbox_locked) {
            Some(retry_after) => Verdict::LockedOut { retry_after },
            None => Verdict::Delay(self.delay_for(ip_count.max(mailbox_count))),
        }
    }

    /// After a successful login: forgets the client IP's and the mailbox's failures, then takes one of
    /// the mailbox's session slots (released when the guard drops).
    ///
    /// # Errors
    /// `"mailbox_sessions"` when `max_sessions_per_mailbox` are already open (the caller answers
    /// `-ERR [IN-USE]`; the credentials were right, so the failure counts are cleared all the same).
    pub fn login_ok(&self, ip: IpAddr, mailbox: &str) -> Result<MailboxGuard, &'static str> {
        self.login_ok_at(ip, mailbox, Instant::now())
    }

    /// [`Throttle::login_ok`] at a given time (kept for symmetry: a success needs no clock today).
    pub fn login_ok_at(
        &self,
        ip: IpAddr,
        mailbox: &str,
        _now: Instant,
    ) -> Result<MailboxGuard, &'static str> {
        if !self.is_trusted(ip) {
            lock(&self.inner.ip_failures).remove(&self.ip_key(ip));
        }
        lock(&self.inner.mailbox_failures).remove(mailbox);
        let Some(max) = self.inner.config.load().max_sessions_per_mailbox else {
            return Ok(MailboxGuard { slot: None });
        };
        if !take_slot(&mut lock(&self.inner.mailbox_sessions), mailbox, max) {
            return Err("mailbox_sessions");
        }
        Ok(MailboxGuard {
            slot: Some((Arc::clone(&self.inner), mailbox.to_owned())),
        })
    }

    /// Drops every idle key (see the module doc). Run it periodically, e.g. every minute.
    pub fn purge(&self) {
        self.purge_at(Instant::now());
    }

    /// [`Throttle::purge`] at a given time.
    pub fn purge_at(&self, now: Instant) {
        let forget_after = self.inner.config.load().forget_after;
        lock(&self.inner.ip_failures).retain(|_, f| !f.is_idle(now, forget_after));
        lock(&self.inner.mailbox_failures).retain(|_, f| !f.is_idle(now, forget_after));
        lock(&self.inner.connection_rate).retain(|_, tat| *tat > now);
        lock(&self.inner.next_login).retain(|_, next| *next > now);
    }

    /// Keys held in all maps (failures, rate buckets, session counters): the memory in use.
    pub fn tracked_keys(&self) -> usize {
        lock(&self.inner.ip_failures).len()
            + lock(&self.inner.mailbox_failures).len()
            + lock(&self.inner.connection_rate).len()
            + lock(&self.inner.ip_sessions).len()
            + lock(&self.inner.mailbox_sessions).len()
            + lock(&self.inner.tenant_sessions).len()
            + lock(&self.inner.next_login).len()
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
        let mut next = lock(&self.inner.next_login);
        match next.get_mut(mailbox) {
            Some(at) if *at > now => Err(at.duration_since(now)),
            Some(at) => {
                *at = now + min;
                Ok(())
            }
            None => {
                next.insert(mailbox.to_owned(), now + min);
                Ok(())
            }
        }
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

// === impl Failures ===

impl Failures {
    fn new(now: Instant) -> Self {
        Self {
            count: 0,
            last: now,
            locked_until: None,
        }
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
        }
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
