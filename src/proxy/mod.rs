//! The one place that sees every stage of a session and composes them, as a pipeline of rooms:
//!
//! - [`accept`]: PROXY header, implicit TLS, the SNI tenant → a client stream;
//! - [`offer`]: the greeting and what this connection advertises (APOP passthrough included);
//! - the AUTHORIZATION state machine ([`session`](crate::session)) reads credentials;
//! - [`admit`]: one login attempt → a logged-in store connection, or a refusal the client may retry;
//! - [`handover`]: registration, the store's `+OK` to the client, and the [`relay`](crate::relay).
//!
//! [`snapshot`] is what every session of one config shares; [`auth_http_login`] logs in where an auth_http
//! service says (what to send a store is [`crate::auth::decision`]). Each room returns a value; none calls back up.

mod accept;
mod admit;
mod auth_http_login;
mod fleet;
mod handover;
mod offer;
mod snapshot;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span};

use crate::config::ListenerTls;
use crate::context::Context;
use crate::session::{ClientSession, SessionEnd, Step};

use self::admit::Admission;
use self::handover::{Handover, Relayed};

pub use self::snapshot::{ListenerInfo, Reach, Shared, SharedError, TenantRuntime};

/// Serves one accepted client connection to its end; `keep` (the connection's admission guards) is held
/// until then.
///
/// Not an `async fn`: its arguments would be stored in the task beside the block that moves them. The
/// session's span lives through the login phase only: an idle relayed session keeps no span (its slot and
/// formatted fields), and the closing line is logged in a fresh span with the same fields.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would store its arguments beside the block's own copies (rust-lang/rust#62958)"
)]
pub fn serve<K: Send + 'static>(
    ctx: Arc<Context>,
    shared: Arc<Shared>,
    listener: Arc<ListenerInfo>,
    tcp: TcpStream,
    peer: SocketAddr,
    keep: K,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let id = ctx.next_session_id();
        let started = Instant::now();
        let span = info_span!("session", id, client = %peer, listener = %listener.name, tenant = tracing::field::Empty);
        // Boxed, and dropped at the end of this statement: the login phase's state (session driver, offer,
        // credentials) is freed before relaying, so an idle logged-in session keeps only what the relay needs.
        let summary = Box::pin(run(&ctx, &shared, &listener, tcp, peer, id))
            .instrument(span.clone())
            .await;
        let metrics = &ctx.metrics;
        match summary {
            Summary::LoggedIn(handover) => {
                drop(span);
                let client = handover.client;
                let Relayed {
                    tenant,
                    store,
                    stats,
                } = handover.relay().await;
                let secs = started.elapsed().as_secs_f64();
                metrics.session_ended(&tenant, &listener.name, stats.end.as_str());
                let t = metrics.tenant(&tenant);
                t.duration.observe(secs);
                t.bytes_to_store.inc_by(stats.bytes_up);
                t.bytes_to_client.inc_by(stats.bytes_down);
                let span = info_span!("session", id, client = %client, listener = %listener.name, tenant = tenant.as_str());
                let _entered = span.enter();
                info!(
                    tenant = %tenant,
                    store = %store,
                    bytes_in = stats.bytes_up,
                    bytes_out = stats.bytes_down,
                    commands = stats.commands,
                    duration_s = secs,
                    outcome = stats.end.as_str(),
                    "session closed"
                )
            }
            Summary::NoLogin(tenant, end) => {
                let secs = started.elapsed().as_secs_f64();
                let tenant = tenant.as_deref().unwrap_or(crate::metrics::UNKNOWN_TENANT);
                metrics.session_ended(tenant, &listener.name, end.as_str());
                let _entered = span.enter();
                info!(duration_s = secs, outcome = end.as_str(), detail = %end, "session closed before login")
            }
        }
        drop(keep);
    }
}

enum Summary<'c> {
    /// Logged in; the relay is still to run (see `serve`).
    LoggedIn(Box<Handover<'c>>),
    /// The session ended before a login; the tenant, when one was routed to.
    NoLogin(Option<String>, SessionEnd),
}

/// A session from its first byte to a logged-in hand-over, or to its end before a login.
async fn run<'c>(
    ctx: &'c Context,
    shared: &Shared,
    listener: &ListenerInfo,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
) -> Summary<'c> {
    let deadline = Instant::now() + shared.config.timeouts.pre_login.get();
    let accepted = match accept::accept(ctx, shared, listener, tcp, peer, id).await {
        Ok(accepted) => accepted,
        Err(end) => return Summary::NoLogin(None, end),
    };
    greeted(ctx, shared, listener, accepted, deadline, id).await
}

/// The session after its connection was accepted: greeting, credentials and login attempts.
async fn greeted<'c>(
    ctx: &'c Context,
    shared: &Shared,
    listener: &ListenerInfo,
    accepted: accept::Accepted,
    deadline: Instant,
    id: u64,
) -> Summary<'c> {
    let greeting = offer::greeting(shared, listener, &accepted, id).await;
    let client = accepted.client;
    let mut passthrough = greeting.passthrough;
    let mut session = ClientSession::new(
        accepted.stream,
        greeting.authorization,
        greeting.starttls,
        deadline,
        accepted.sni_tenant,
    );
    let mut routed: Option<String> = None;
    if let Err(end) = session.greet().await {
        return Summary::NoLogin(routed, end);
    }
    let mut stls_counted = false;
    let mut attempts: u32 = 0;
    // The fleet's per-address limits, checked on the first attempt that reaches a tenant.
    let mut address = fleet::AddressSlot::default();
    // A store connection made ready at the client's USER (only reported where a tenant sets
    // `pool.xclient_at_user`), for the login its PASS asks for: one per login attempt at most, so a client
    // repeating USER cannot churn the stores' pools.
    session.report_names(shared.xclient_at_user);
    let mut introduced = None;
    let mut may_introduce = true;
    loop {
        let creds = match credentials(ctx, listener, &mut session, &mut stls_counted).await {
            Ok(Step::Login(creds)) => creds,
            Ok(Step::Named(name)) => {
                if std::mem::take(&mut may_introduce) {
                    let passthrough = passthrough.as_ref();
                    introduced = admit::introduce(
                        ctx,
                        shared,
                        listener,
                        &session,
                        &client,
                        passthrough,
                        &name,
                    )
                    .await;
                }
                continue;
            }
            Err(end) => return Summary::NoLogin(routed, end),
        };
        may_introduce = true;
        attempts = attempts.saturating_add(1);
        let asked = Instant::now();
        let admission = admit::admit(
            ctx,
            shared,
            listener,
            &mut session,
            &client,
            &mut passthrough,
            creds,
            attempts,
            &mut routed,
            &mut address,
            introduced.take(),
        )
        .await;
        match admission {
            Admission::Admitted(admitted) => {
                let tenant = admitted.tenant.clone();
                let handed = handover::hand_over(
                    ctx,
                    shared,
                    session,
                    *admitted,
                    (client.peer, &listener.name),
                    id,
                )
                .await;
                if handed.is_ok() {
                    let secs = asked.elapsed().as_secs_f64();
                    ctx.metrics.login_duration(&tenant, "ok", secs);
                }
                return handed.map_or_else(|end| Summary::NoLogin(routed, end), Summary::LoggedIn);
            }
            Admission::Refused(mut refusal) => {
                let outcome = refusal.outcome.take();
                if let Err(end) = refusal.send(&mut session).await {
                    return Summary::NoLogin(routed, end);
                }
                if let Some((tenant, result)) = outcome {
                    let secs = asked.elapsed().as_secs_f64();
                    ctx.metrics.login_duration(&tenant, result, secs);
                }
            }
            Admission::Closed(end) => return Summary::NoLogin(routed, end),
        }
    }
}

/// The client's next credentials or USER name, or how the session ended; a shutdown ends it with
/// `-ERR [SYS/TEMP]`. An STLS handshake on a STARTTLS listener is counted once.
async fn credentials(
    ctx: &Context,
    listener: &ListenerInfo,
    session: &mut ClientSession,
    stls_counted: &mut bool,
) -> Result<Step, SessionEnd> {
    let next = tokio::select! {
        r = session.next_step() => r,
        () = ctx.draining.cancelled() => {
            session.shutting_down().await;
            return Err(SessionEnd::Shutdown);
        }
    };
    if listener.tls == ListenerTls::Starttls && !*stls_counted {
        let metrics = &ctx.metrics;
        match (&next, session.is_tls()) {
            (Err(SessionEnd::Tls(_)), _) => {
                metrics.tls_handshake(&listener.name, false, "none", "none");
            }
            (_, true) => {
                *stls_counted = true;
                metrics.tls_handshake(
                    &listener.name,
                    true,
                    session.tls_version().unwrap_or("unknown"),
                    session.tls_handshake_kind(),
                );
            }
            _ => {}
        }
    }
    next
}
