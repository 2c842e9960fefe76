//! Hand-over: a logged-in session leaves AUTHORIZATION — registered (for `/kick` and `/status`), the
//! store's `+OK` sent to the client, the commands it pipelined behind its login queued for the store —
//! and becomes a relay that holds everything the session must keep until it ends.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tracing::info;

use crate::context::{Context, Registered, SessionEntry};
use crate::metrics::TenantMetrics;
use crate::relay::{RelayConfig, RelayStats, relay};
use crate::session::{ClientSession, SessionEnd};
use crate::store::group::ActiveSession;
use crate::throttle::MailboxGuard;

use super::admit::Admitted;
use super::snapshot::Shared;

/// A logged-in session on its way to the relay: the relay, and what must live as long as it.
pub(super) struct Handover<'c> {
    /// Boxed: allocated once at its own size, not stored again in each future that awaits it.
    pub(super) relay: Pin<Box<dyn Future<Output = RelayStats> + Send>>,
    /// The client's address (from the PROXY header when there was one), for the closing log line.
    pub(super) client: SocketAddr,
    metrics: Arc<TenantMetrics>,
    _active: Option<ActiveSession>,
    _registered: Registered<'c>,
    _mailbox_slot: MailboxGuard,
    _tenant_slot: crate::throttle::TenantGuard,
    _leases: Vec<crate::cluster::Lease>,
}

/// A relayed session's summary.
pub(super) struct Relayed {
    pub(super) tenant: String,
    pub(super) store: String,
    pub(super) stats: RelayStats,
}

impl Handover<'_> {
    /// Kept boxed while it runs: the session's task holds a pointer, not the handover.
    pub(super) async fn relay(mut self: Box<Self>) -> Relayed {
        let stats = self.relay.as_mut().await;
        self.metrics.active.dec();
        if let Some(active) = &self._active {
            active.store().count_bytes(stats.bytes_up, stats.bytes_down);
        }
        let entry = self._registered.entry();
        Relayed {
            tenant: entry.tenant.clone(),
            store: entry.store.clone(),
            stats,
        }
    }
}

/// Turns an admitted login into a relay; `client` is the client's address (for the closing log line and
/// `/sessions`), `listener` the listener's name.
pub(super) async fn hand_over<'c>(
    ctx: &'c Context,
    shared: &Shared,
    session: ClientSession,
    admitted: Admitted,
    (client, listener): (SocketAddr, &str),
    id: u64,
) -> Result<Box<Handover<'c>>, SessionEnd> {
    let Admitted {
        logged_in,
        active,
        store,
        tenant,
        mailbox,
        mailbox_slot,
        tenant_slot,
        leases,
        mechanism,
    } = admitted;
    let metrics = &ctx.metrics;
    metrics.login(&tenant, mechanism, "ok");
    info!(store = %store, mechanism, "logged in");
    let kick = ctx.stop.child_token();
    let registered = ctx.sessions.register(
        id,
        SessionEntry {
            tenant: tenant.clone(),
            mailbox,
            store,
            client,
            listener: listener.to_string(),
            since: std::time::SystemTime::now(),
            kick: kick.clone(),
        },
    );
    let tenant_metrics = metrics.tenant(&tenant);
    let (mut to_client, pipelined) = session.into_parts().ok_or(SessionEnd::Disconnected)?;
    tokio::io::AsyncWriteExt::write_all(&mut to_client, &logged_in.reply)
        .await
        .map_err(SessionEnd::Io)?;
    // Counted from here: `Handover::relay` takes it off when the relay ends.
    tenant_metrics.active.inc();
    let timeouts = &shared.config.timeouts;
    Ok(Box::new(Handover {
        relay: Box::pin(relay(
            to_client,
            logged_in.stream,
            pipelined,
            logged_in.leftover,
            RelayConfig {
                idle: timeouts.idle.get(),
                quit_drain: timeouts.quit_drain.get(),
            },
            tenant_metrics.clone(),
            kick,
        )),
        client,
        metrics: tenant_metrics,
        _active: active,
        _registered: registered,
        _mailbox_slot: mailbox_slot,
        _tenant_slot: tenant_slot,
        _leases: leases,
    }))
}
