//! Offer: what a connection advertises before anyone logs in — the greeting (with an APOP timestamp only
//! where APOP can work), the mechanisms, `UTF8` and `LOGIN-DELAY` — given the tenants that can log in on
//! it; and, for a tenant that turned on APOP passthrough, the store connection whose timestamp the
//! greeting shows.

use crate::config::ListenerTls;
use crate::router::TenantId;
use crate::session::driver::StartTls;
use crate::session::state::Limits;
use crate::session::{Authorization, Mechanism, Offer, Transport};
use crate::store::connection::Prepared;
use crate::store::group::ActiveSession;
use crate::throttle::Held;

use super::accept::Accepted;
use super::snapshot::{ListenerInfo, Shared};

/// A store connection taken before the greeting for APOP passthrough, and the slot it holds.
pub(super) struct Passthrough {
    pub(super) prepared: Prepared,
    pub(super) active: ActiveSession,
    pub(super) tenant: TenantId,
    pub(super) _held: Held,
}

/// What the session starts with.
pub(super) struct Greeting {
    /// The AUTHORIZATION state machine, with this connection's offer.
    pub(super) authorization: Authorization,
    /// STLS, where the snapshot has TLS.
    pub(super) starttls: Option<StartTls>,
    pub(super) passthrough: Option<Passthrough>,
}

/// Works out the offer for an accepted connection.
pub(super) async fn greeting(
    shared: &Shared,
    listener: &ListenerInfo,
    accepted: &Accepted,
    id: u64,
) -> Greeting {
    let config = &shared.config;
    let transport = Transport {
        tls: accepted.stream.is_tls(),
        stls_offered: listener.tls == ListenerTls::Starttls && shared.tls.is_some(),
        plaintext_before_tls: shared.plaintext_possible(listener),
    };
    let limits = Limits {
        max_bad_commands: config.limits.max_bad_commands,
        max_failed_logins: config.limits.max_failed_logins,
    };
    let starttls = shared
        .tls
        .as_ref()
        .map(|(server_config, resolver)| StartTls {
            server_config: server_config.clone(),
            resolver: resolver.clone(),
            handshake_timeout: config.timeouts.tls_handshake.get(),
        });
    // What this connection can offer depends on which tenants can log in here.
    let bound = listener.tenant.or(accepted.sni_tenant);
    let passthrough = passthrough(shared, bound, accepted).await;
    let offer = offer(shared, bound, passthrough.as_ref(), id);
    Greeting {
        authorization: Authorization::with_offer(transport, limits, offer),
        starttls,
        passthrough,
    }
}

/// APOP passthrough, where the tenant turned it on: the route is fixed before the greeting and the tenant
/// has one store and no secrets: greet the client with that store's APOP timestamp, so the client's
/// digest is valid there. The store connection is held until the client logs in or leaves, so a client
/// address may hold only a few and the tenant only so many (past them popgate greets alone, without
/// APOP).
async fn passthrough(
    shared: &Shared,
    bound: Option<TenantId>,
    accepted: &Accepted,
) -> Option<Passthrough> {
    let t = bound?;
    let tenant = shared.tenant(t)?;
    let cap = tenant.passthrough.as_ref()?;
    if tenant.secrets.is_some() || !tenant.mechanisms.contains(&Mechanism::Apop) {
        return None;
    }
    let held = cap.take(accepted.client.peer.ip())?;
    let (prepared, active) = tenant.group.prepare_for_greeting(&accepted.client).await?;
    prepared.timestamp()?;
    Some(Passthrough {
        prepared,
        active,
        tenant: t,
        _held: held,
    })
}

/// The offer: a greeting with the passthrough store's timestamp, with popgate's own challenge where some
/// tenant here checks APOP/CRAM-MD5 itself, or without any (and then without those mechanisms). The
/// greeting's text is always popgate's own: a store's banner and capability tags stay private.
fn offer(
    shared: &Shared,
    bound: Option<TenantId>,
    passthrough: Option<&Passthrough>,
    id: u64,
) -> Offer {
    let reach = shared.reach(bound);
    let mechanisms = reach.mechanisms.clone();
    let utf8 = shared.config.routing.utf8;
    let login_delay = reach.login_delay;
    let challenge = match passthrough {
        Some(p) => Some(p.prepared.timestamp().unwrap_or_default().to_string()),
        None if reach.own_challenge => Some(make_challenge(id)),
        None => None,
    };
    match challenge {
        Some(challenge) => Offer {
            mechanisms,
            greeting: format!("+OK popgate ready {challenge}\r\n").into_bytes(),
            challenge: Some(challenge),
            utf8,
            login_delay,
        },
        None => Offer {
            mechanisms: mechanisms
                .into_iter()
                .filter(|m| !matches!(m, Mechanism::Apop | Mechanism::CramMd5))
                .collect(),
            utf8,
            login_delay,
            ..Offer::basic()
        },
    }
}

/// A fresh APOP timestamp / CRAM-MD5 challenge (RFC 1939: `<process-ID.clock@hostname>`), unique per session.
fn make_challenge(session: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "popgate".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        .collect();
    format!("<{}.{session}.{nanos}@{host}>", std::process::id())
}
