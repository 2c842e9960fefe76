//! The fleet's limits at each gate of a session: the shared state's answers (`crate::cluster`) turned into
//! the same verdicts the local throttle gives, and `cluster.when_unavailable` applied when it cannot
//! answer. The local throttle always runs first; these add what the other replicas know.

use std::net::IpAddr;
use std::time::Duration;

use crate::cluster::{AddressLimits, IpAdmission, Lease, LeaseKind, Limits, Unavailable, closed};
use crate::context::Context;
use crate::throttle::Verdict;

/// Why the fleet refuses.
#[derive(Debug)]
pub(super) enum Refused {
    /// The address or the mailbox is locked out fleet-wide.
    Locked,
    /// A session cap (tenant, mailbox, address) is reached fleet-wide: the reason as a metric label.
    Full(&'static str),
    /// The mailbox logged in less than its minimum interval ago (on some replica): the time left.
    LoginDelay(Duration),
    /// The shared state cannot be asked and this limit's policy is `closed`.
    Unavailable,
    /// The address opened connections too fast fleet-wide.
    Rate,
}

/// The client address as the shared state keys it, or `None` for a trusted client (exempt).
fn counted(ctx: &Context, ip: IpAddr) -> Option<IpAddr> {
    (!ctx.throttle.is_trusted(ip)).then(|| ctx.throttle.counted_ip(ip))
}

/// `known_address_for` when `spare_known_addresses` is on.
fn known_for(ctx: &Context) -> Option<Duration> {
    let config = ctx.throttle.config();
    config
        .spare_known_addresses
        .then_some(config.known_address_for)
}

/// A connection's standing with the fleet's per-address limits (connection rate, sessions per address):
/// checked together with the locks on its first login attempt that reaches a tenant, so a connection
/// costs no round trip of its own; the lease is held until the connection ends. Connections that never
/// try to log in are bounded by each replica's own limits, checked at accept.
#[derive(Debug, Default)]
pub(super) struct AddressSlot {
    checked: bool,
    lease: Option<Lease>,
}

impl AddressSlot {
    /// The address's lease, for the logged-in session to hold.
    pub(super) fn take_lease(&mut self) -> Option<Lease> {
        self.lease.take()
    }
}

/// Before a store is asked: the fleet-wide locks of the address and the mailbox, the tenant's session
/// lease (`tenant.1` 0: no cap), and the address's limits on the connection's first attempt.
pub(super) async fn before_store(
    ctx: &Context,
    ip: IpAddr,
    mailbox: &str,
    tenant: (&str, usize),
    address: &mut AddressSlot,
) -> Result<Option<Lease>, Refused> {
    let fleet = &ctx.fleet;
    let counted_ip = counted(ctx, ip);
    let config = ctx.throttle.config();
    let limits = AddressLimits {
        rate: config.connection_rate_per_ip,
        max_sessions: config.max_sessions_per_ip,
    };
    let asked = (!address.checked).then_some(limits);
    match fleet
        .before_login(counted_ip, mailbox, tenant, known_for(ctx), asked)
        .await
    {
        Ok(answer) => {
            match answer.address {
                Some(IpAdmission::Admitted(lease)) => {
                    address.checked = true;
                    address.lease = lease;
                }
                Some(IpAdmission::Refused("rate")) => return Err(Refused::Rate),
                Some(IpAdmission::Refused(reason)) => return Err(Refused::Full(reason)),
                None => {}
            }
            if answer.ip_locked.is_some() || answer.mailbox_locked.is_some() {
                // Remembered here: the next attempt is refused without a round trip.
                note(
                    ctx,
                    counted_ip,
                    mailbox,
                    answer.ip_locked,
                    answer.mailbox_locked,
                );
                return Err(Refused::Locked);
            }
            answer.tenant.map_err(|()| Refused::Full("tenant_sessions"))
        }
        Err(Unavailable::Off) => Ok(None),
        Err(Unavailable::Degraded) => {
            let policy = fleet.when_unavailable();
            let address_closed = !address.checked
                && ((limits.rate.is_some() && closed(policy.connection_rate))
                    || (limits.max_sessions.is_some() && closed(policy.sessions)));
            if address_closed
                || (counted_ip.is_some() && closed(policy.lockouts))
                || (tenant.1 > 0 && closed(policy.sessions))
            {
                return Err(Refused::Unavailable);
            }
            if !address.checked
                && let Some(ip) = counted_ip
            {
                address.checked = true;
                address.lease = limits
                    .max_sessions
                    .and_then(|_| fleet.local_lease(LeaseKind::Ip(ip)));
            }
            Ok((tenant.1 > 0)
                .then(|| fleet.local_lease(LeaseKind::Tenant(tenant.0)))
                .flatten())
        }
    }
}

/// After the store accepted the credentials: the mailbox's fleet-wide session cap and LOGIN-DELAY, and
/// its failures (and the address's) forgotten.
pub(super) async fn after_store(
    ctx: &Context,
    ip: IpAddr,
    mailbox: &str,
    min_interval: Option<Duration>,
) -> Result<Option<Lease>, Refused> {
    let fleet = &ctx.fleet;
    let max = ctx.throttle.config().max_sessions_per_mailbox.unwrap_or(0);
    match fleet
        .after_login(counted(ctx, ip), mailbox, max, min_interval, known_for(ctx))
        .await
    {
        Ok(answer) => {
            if let Some(left) = answer.login_delay {
                return Err(Refused::LoginDelay(left));
            }
            answer
                .mailbox
                .map_err(|()| Refused::Full("mailbox_sessions"))
        }
        Err(Unavailable::Off) => Ok(None),
        Err(Unavailable::Degraded) => {
            let policy = fleet.when_unavailable();
            if (max > 0 && closed(policy.sessions))
                || (min_interval.is_some() && closed(policy.login_delay))
            {
                return Err(Refused::Unavailable);
            }
            Ok((max > 0)
                .then(|| fleet.local_lease(LeaseKind::Mailbox(mailbox)))
                .flatten())
        }
    }
}

/// A failed login, counted fleet-wide: the verdict from the fleet's counts (`None` when the shared state
/// is off or unavailable: the local verdict stands).
pub(super) async fn count_failure(
    ctx: &Context,
    ip: IpAddr,
    mailbox: Option<&str>,
    secret: &[u8],
) -> Option<Verdict> {
    let fleet = &ctx.fleet;
    if !fleet.is_on() {
        return None;
    }
    let counted_ip = counted(ctx, ip)?;
    let config = ctx.throttle.config();
    let limits = Limits {
        lockout_after: config.lockout_after,
        lockout_for: config.lockout_for,
        forget_after: config.forget_after,
        known_for: known_for(ctx),
    };
    let counted = fleet
        .failed(Some(counted_ip), mailbox, Some(secret), limits)
        .await
        .ok()?;
    note(
        ctx,
        Some(counted_ip),
        mailbox.unwrap_or_default(),
        counted.ip_locked,
        counted.mailbox_locked,
    );
    Some(match counted.ip_locked.max(counted.mailbox_locked) {
        Some(retry_after) => Verdict::LockedOut { retry_after },
        None => Verdict::Delay(ctx.throttle.delay_for_failures(counted.failures)),
    })
}

/// Remembers the fleet's lockouts in the local throttle, each for its own key.
fn note(
    ctx: &Context,
    ip: Option<IpAddr>,
    mailbox: &str,
    ip_locked: Option<Duration>,
    mailbox_locked: Option<Duration>,
) {
    if let Some(left) = ip_locked {
        ctx.throttle.note_lockout(ip, None, left);
    }
    if let Some(left) = mailbox_locked
        && !mailbox.is_empty()
    {
        ctx.throttle.note_lockout(None, Some(mailbox), left);
    }
}

/// The stricter of two verdicts (a lockout over a delay, the longer delay).
pub(super) fn stricter(a: Verdict, b: Option<Verdict>) -> Verdict {
    match (a, b) {
        (a, None) => a,
        (Verdict::LockedOut { retry_after: x }, Some(Verdict::LockedOut { retry_after: y })) => {
            Verdict::LockedOut {
                retry_after: x.max(y),
            }
        }
        (l @ Verdict::LockedOut { .. }, _) | (_, Some(l @ Verdict::LockedOut { .. })) => l,
        (Verdict::Delay(x), Some(Verdict::Delay(y))) => Verdict::Delay(x.max(y)),
        (Verdict::Allow, Some(b)) => b,
        (a, Some(Verdict::Allow)) => a,
    }
}
