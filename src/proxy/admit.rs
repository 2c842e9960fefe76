//! Admit: one login attempt, from the client's credentials to a logged-in store connection or a refusal.
//! In order: the client address's lockout (before any per-mailbox work), the route and the plaintext rule
//! (alike for every name before routing reveals anything), the tenant's own gates (mechanism, mailbox
//! lockout, session cap), how to log in at the store, the store itself, then the gates that need the
//! store's word (per-mailbox sessions, the minimum interval between logins).
//!
//! Every refusal says what to answer and whether it counts against the connection's failed logins; the
//! session stays in AUTHORIZATION either way. Refusals popgate decides alone take as long as a store's.

use tracing::{info, warn};

use crate::config::NotFound;
use crate::config::{ListenerTls, PlaintextLogin};
use crate::context::Context;
use crate::placement::{Lookup, Placed};
use crate::router::Route;
use crate::session::{ClientSession, Credentials, SessionEnd};
use crate::store::LoggedIn;
use crate::store::LoginError;
use crate::store::connection::ClientInfo;
use crate::store::group::{ActiveSession, GroupError, Introduced};
use crate::throttle::{Failure, MailboxGuard, TenantGuard, Verdict};
use crate::vocab::{Mechanism, TenantId};

use super::auth_http_login::{AuthHttpLogin, AuthHttpOutcome, auth_http_login};
use super::fleet;
use super::offer::Passthrough;
use super::snapshot::{ListenerInfo, Shared, TenantRuntime};
use crate::auth::decision::{LoginRules, OwnedAuth, store_auth};

const AUTH_FAILED: &[u8] = b"-ERR [AUTH] Authentication failed.\r\n";
const LOCKED_OUT: &[u8] = b"-ERR [AUTH] Too many failed logins; try again later\r\n";
const IN_USE: &[u8] = b"-ERR [IN-USE] Too many sessions for this mailbox\r\n";
const TENANT_FULL: &[u8] =
    b"-ERR [SYS/TEMP] Too many sessions for this domain, try again later\r\n";
const STORE_UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] Mail store unavailable, try again later\r\n";
const TOO_MANY_FROM_ADDRESS: &[u8] =
    b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n";
const CHECKS_UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] Login checks unavailable, try again later\r\n";

/// How one login attempt ended.
pub(super) enum Admission {
    /// Logged in at a store.
    Admitted(Box<Admitted>),
    /// Refused: the client is answered and may try again.
    Refused(Refusal),
    /// The connection ends.
    Closed(SessionEnd),
}

/// A refused login: the answer, and whether it counts against the connection's failed logins.
pub(super) struct Refusal {
    reply: Vec<u8>,
    /// `-ERR` for the credentials (counted), or for now only (`[SYS/TEMP]`, `[IN-USE]`: not counted).
    counted: bool,
    /// The tenant label and result the attempt was counted under, for the client-side login histogram.
    pub(super) outcome: Option<(String, &'static str)>,
}

/// A logged-in store connection and what must live as long as the session.
pub(super) struct Admitted {
    pub(super) logged_in: LoggedIn,
    pub(super) active: Option<ActiveSession>,
    /// The store's label (or `host:port` from auth_http), for logs, `/status` and `/sessions`.
    pub(super) store: String,
    pub(super) tenant: String,
    /// The normalised mailbox, what `/kick` matches.
    pub(super) mailbox: String,
    pub(super) mailbox_slot: MailboxGuard,
    pub(super) tenant_slot: TenantGuard,
    /// The fleet's session leases (tenant, mailbox) when `cluster:` is on.
    pub(super) leases: Vec<crate::cluster::Lease>,
    /// The client's mechanism, as a metric label.
    pub(super) mechanism: &'static str,
}

impl Refusal {
    fn reject(reply: impl Into<Vec<u8>>) -> Self {
        Self {
            reply: reply.into(),
            counted: true,
            outcome: None,
        }
    }

    fn unavailable(reply: impl Into<Vec<u8>>) -> Self {
        Self {
            reply: reply.into(),
            counted: false,
            outcome: None,
        }
    }

    /// Answers the client; the session stays in AUTHORIZATION unless it is over its bounds.
    pub(super) async fn send(self, session: &mut ClientSession) -> Result<(), SessionEnd> {
        if self.counted {
            session.reject(self.reply).await
        } else {
            session.unavailable(self.reply).await
        }
    }
}

/// A pooled store connection made ready at the client's USER for the login its PASS asks for.
pub(super) struct Introduction {
    tenant: TenantId,
    mailbox: String,
    held: Introduced,
}

/// At the client's USER: where the name routes to a tenant whose group picks the store (no placement
/// directory, no auth_http, no APOP passthrough), holds a pooled connection to the store the login will
/// go to and sends it XCLIENT now ([`crate::store::group::StoreGroup::introduce`]), so the PASS waits for
/// one store round trip instead of two. Nothing for a name that does not route, or whose login would be
/// refused before a store is asked (TLS required, no USER/PASS for the tenant, a locked-out address or
/// mailbox).
pub(super) async fn introduce(
    ctx: &Context,
    shared: &Shared,
    listener: &ListenerInfo,
    session: &ClientSession,
    client: &ClientInfo,
    passthrough: Option<&Passthrough>,
    name: &str,
) -> Option<Introduction> {
    let bound = listener.tenant.or(session.sni_tenant());
    let route = shared.table.route(name, bound).ok()?;
    let tenant = shared.tenant(route.tenant)?;
    let refused_before_store = (!session.is_tls()
        && tenant.plaintext == PlaintextLogin::RequireTls)
        || !tenant.mechanisms.contains(&Mechanism::UserPass)
        || matches!(
            ctx.throttle.check_login(client.peer.ip(), &route.key),
            Verdict::LockedOut { .. }
        );
    let elsewhere = tenant.placement.is_some()
        || tenant.auth_http.is_some()
        || passthrough.is_some_and(|p| p.tenant == route.tenant);
    if refused_before_store || elsewhere {
        return None;
    }
    let held = tenant.group.introduce(&route.key, client).await?;
    Some(Introduction {
        tenant: route.tenant,
        mailbox: route.key,
        held,
    })
}

/// One login attempt of `session`'s client. `routed` is set to the tenant once the name routes to one
/// (for the session's summary).
#[allow(clippy::too_many_arguments)] // the session's facts, each used; a struct would only rename them
pub(super) async fn admit(
    ctx: &Context,
    shared: &Shared,
    listener: &ListenerInfo,
    session: &mut ClientSession,
    client: &ClientInfo,
    passthrough: &mut Option<Passthrough>,
    creds: Credentials,
    number: u32,
    routed: &mut Option<String>,
    address: &mut fleet::AddressSlot,
    mut introduced: Option<Introduction>,
) -> Admission {
    let attempt = Attempt {
        number,
        ctx,
        shared,
        creds: &creds,
        mechanism: creds.mechanism.as_str(),
        // Per login: whether the client asked for UTF-8 mode, which the store is then asked for too.
        client: ClientInfo {
            utf8: session.utf8_enabled(),
            ..*client
        },
        outcome: std::sync::OnceLock::new(),
    };
    let refused = |mut refusal: Refusal, attempt: Attempt<'_>| {
        refusal.outcome = attempt.outcome.into_inner();
        Admission::Refused(refusal)
    };
    if let Some(refusal) = attempt.address_locked_out(routed.as_deref()) {
        return refused(refusal, attempt);
    }
    let route = match attempt.route(listener, session).await {
        Ok(route) => route,
        Err(refusal) => return refused(refusal, attempt),
    };
    let tenant_name = &shared.table.tenant(route.tenant).name;
    tracing::Span::current().record("tenant", tenant_name.as_str());
    *routed = Some(tenant_name.clone());
    let Some(tenant) = shared.tenant(route.tenant) else {
        return Admission::Closed(SessionEnd::Policy);
    };
    match attempt
        .at_tenant(
            tenant_name,
            tenant,
            &route,
            session,
            (passthrough, &mut introduced),
            address,
        )
        .await
    {
        Ok(admitted) => Admission::Admitted(Box::new(admitted)),
        Err(refusal) => refused(refusal, attempt),
    }
}

/// One attempt's facts.
struct Attempt<'a> {
    ctx: &'a Context,
    shared: &'a Shared,
    creds: &'a Credentials,
    mechanism: &'static str,
    client: ClientInfo,
    /// This attempt's number on the connection, from 1.
    number: u32,
    /// The tenant label and result the attempt was counted under (set once, where it is decided).
    outcome: std::sync::OnceLock<(String, &'static str)>,
}

impl Attempt<'_> {
    /// Counts the attempt's result under `tenant`, and keeps both for the client-side histogram.
    fn counted(&self, tenant: &str, result: &'static str) {
        self.ctx.metrics.login(tenant, self.mechanism, result);
        let _ = self.outcome.set((tenant.to_string(), result));
    }

    /// A locked-out address is refused before its name is even routed: it costs no per-mailbox work.
    fn address_locked_out(&self, routed: Option<&str>) -> Option<Refusal> {
        let Verdict::LockedOut { .. } = self.ctx.throttle.check_ip(self.client.peer.ip()) else {
            return None;
        };
        let label = routed.unwrap_or(crate::metrics::UNKNOWN_TENANT);
        self.ctx.metrics.throttled(label, "lockout");
        self.counted(label, "throttled");
        Some(Refusal::reject(LOCKED_OUT))
    }

    /// Routes the name. Plaintext is refused alike for every name before routing reveals anything: a name
    /// that routes nowhere gets the same "TLS required" as a tenant that requires TLS, wherever such a
    /// tenant is reachable. A name that routes nowhere is refused as a store would refuse it, as slowly,
    /// and counted against the address only: it gets no state of its own.
    async fn route(
        &self,
        listener: &ListenerInfo,
        session: &ClientSession,
    ) -> Result<Route, Refusal> {
        let shared = self.shared;
        let bound = listener.tenant.or(session.sni_tenant());
        let route = shared.table.route(&self.creds.login, bound);
        if !session.is_tls() {
            let tls_required = match &route {
                Ok(r) => shared
                    .tenant(r.tenant)
                    .is_none_or(|t| t.plaintext == PlaintextLogin::RequireTls),
                Err(_) => shared.reach(bound).tls_required,
            };
            if tls_required {
                let label = match &route {
                    Ok(r) => shared.table.tenant(r.tenant).name.as_str(),
                    Err(_) => crate::metrics::UNKNOWN_TENANT,
                };
                self.counted(label, "tls_required");
                let stls_offered = listener.tls == ListenerTls::Starttls && shared.tls.is_some();
                return Err(Refusal::reject(if stls_offered {
                    &b"-ERR [AUTH] TLS required: use STLS before logging in\r\n"[..]
                } else {
                    &b"-ERR [AUTH] TLS required: connect to the POP3S port\r\n"[..]
                }));
            }
        }
        let error = match route {
            Ok(route) => return Ok(route),
            Err(e) => e,
        };
        info!(mechanism = self.mechanism, reason = %error, "login refused: no route");
        self.counted(crate::metrics::UNKNOWN_TENANT, "no_route");
        like_a_store_refusal(self.ctx, self.client.session).await;
        let reply = self
            .count_failure(crate::metrics::UNKNOWN_TENANT, None, AUTH_FAILED.to_vec())
            .await;
        Err(Refusal::reject(reply))
    }

    /// Everything after the name routed to `tenant`.
    async fn at_tenant(
        &self,
        tenant_name: &str,
        tenant: &TenantRuntime,
        route: &Route,
        session: &mut ClientSession,
        (passthrough, introduced): (&mut Option<Passthrough>, &mut Option<Introduction>),
        address: &mut fleet::AddressSlot,
    ) -> Result<Admitted, Refusal> {
        let mailbox = route.key.as_str();
        let (tenant_slot, tenant_lease) = self
            .tenant_gates(tenant_name, tenant, mailbox, address)
            .await?;
        let placed = self.placed(tenant_name, tenant, mailbox).await?;
        // A directory may name the account to use at the store.
        let placed_login = placed.as_ref().and_then(|p| p.login.clone());
        let via_passthrough = passthrough
            .as_ref()
            .is_some_and(|p| p.tenant == route.tenant);
        let rules = LoginRules {
            secrets: tenant.secrets.as_ref(),
            backend_login: &tenant.backend_login,
        };
        let auth = match store_auth(
            rules,
            self.creds,
            placed_login.as_deref().unwrap_or(&route.store_user),
            || {
                placed_login
                    .clone()
                    .unwrap_or_else(|| self.shared.table.checked_user(route))
            },
            mailbox,
            via_passthrough,
        ) {
            Ok(auth) => auth,
            Err(crate::auth::decision::NotChecked) => {
                info!(
                    mechanism = self.mechanism,
                    "login refused: digest does not match"
                );
                self.counted(tenant_name, "rejected");
                like_a_store_refusal(self.ctx, self.client.session).await;
                let reply = self
                    .count_failure(tenant_name, Some(mailbox), AUTH_FAILED.to_vec())
                    .await;
                return Err(Refusal::reject(reply));
            }
        };
        let asked = tokio::time::Instant::now();
        let (logged_in, active, store) = match self
            .ask_store(
                tenant,
                route,
                &auth,
                session,
                (passthrough, introduced),
                placed.as_ref(),
            )
            .await
        {
            Ok(done) => done,
            Err(e) => return Err(self.store_refused(tenant_name, mailbox, e, asked).await),
        };
        let (mailbox_slot, mailbox_lease) = self.after_login(tenant_name, tenant, mailbox).await?;
        // `logged_in` is dropped on a refusal above: the store session closes without QUIT, so nothing it
        // did may be committed.
        Ok(Admitted {
            logged_in,
            active,
            store,
            tenant: tenant_name.to_string(),
            mailbox: mailbox.to_string(),
            mailbox_slot,
            tenant_slot,
            leases: tenant_lease
                .into_iter()
                .chain(mailbox_lease)
                .chain(address.take_lease())
                .collect(),
            mechanism: self.mechanism,
        })
    }

    /// The tenant's own gates, before any store is asked: the mechanism, the mailbox's lockout, the
    /// tenant's session cap (here, then fleet-wide).
    async fn tenant_gates(
        &self,
        tenant_name: &str,
        tenant: &TenantRuntime,
        mailbox: &str,
        address: &mut fleet::AddressSlot,
    ) -> Result<(TenantGuard, Option<crate::cluster::Lease>), Refusal> {
        let (ctx, metrics) = (self.ctx, &self.ctx.metrics);
        if !tenant.mechanisms.contains(&self.creds.mechanism) {
            self.counted(tenant_name, "rejected");
            like_a_store_refusal(ctx, self.client.session).await;
            return Err(Refusal::reject(AUTH_FAILED));
        }
        if let Verdict::LockedOut { .. } = ctx.throttle.check_login(self.client.peer.ip(), mailbox)
        {
            metrics.throttled(tenant_name, "lockout");
            self.counted(tenant_name, "throttled");
            return Err(Refusal::reject(LOCKED_OUT));
        }
        let slot = ctx
            .throttle
            .tenant_session(tenant_name, tenant.max_sessions)
            .map_err(|reason| {
                metrics.throttled(tenant_name, reason);
                self.counted(tenant_name, "throttled");
                Refusal::unavailable(TENANT_FULL)
            })?;
        let peer = self.client.peer.ip();
        let gate = (tenant_name, tenant.max_sessions);
        match fleet::before_store(ctx, peer, mailbox, gate, address).await {
            Ok(lease) => Ok((slot, lease)),
            Err(refused) => Err(self.fleet_refused(tenant_name, refused)),
        }
    }

    /// The answer to a fleet-wide refusal (counted in the metrics as the local one would be).
    fn fleet_refused(&self, tenant_name: &str, refused: fleet::Refused) -> Refusal {
        let metrics = &self.ctx.metrics;
        let (reason, refusal) = match refused {
            fleet::Refused::Locked => ("lockout", Refusal::reject(LOCKED_OUT)),
            fleet::Refused::Full("tenant_sessions") => {
                ("tenant_sessions", Refusal::unavailable(TENANT_FULL))
            }
            fleet::Refused::Full("ip_sessions") => {
                ("ip_sessions", Refusal::unavailable(TOO_MANY_FROM_ADDRESS))
            }
            fleet::Refused::Rate => ("rate", Refusal::unavailable(TOO_MANY_FROM_ADDRESS)),
            fleet::Refused::Full(reason) => (reason, Refusal::unavailable(IN_USE)),
            fleet::Refused::LoginDelay(left) => {
                info!(
                    wait_s = left.as_secs(),
                    "login refused: minimum interval between logins (fleet-wide)"
                );
                ("login_delay", Refusal::unavailable(login_delay_reply(left)))
            }
            fleet::Refused::Unavailable => (
                "cluster_unavailable",
                Refusal::unavailable(CHECKS_UNAVAILABLE),
            ),
        };
        metrics.throttled(tenant_name, reason);
        self.counted(tenant_name, "throttled");
        refusal
    }

    /// Where the tenant's directory places `mailbox`: `None` when it has none, or does not know the mailbox
    /// and the balance policy is to pick. A mailbox it does not know is refused like a wrong password when
    /// the tenant says so; a directory that cannot answer (and has nothing cached) gets `[SYS/TEMP]`.
    async fn placed(
        &self,
        tenant_name: &str,
        tenant: &TenantRuntime,
        mailbox: &str,
    ) -> Result<Option<Placed>, Refusal> {
        let Some(placement) = &tenant.placement else {
            return Ok(None);
        };
        let limit = self.shared.config.timeouts.backend_reply.get();
        // Boxed: a directory client's futures are large, and every connection's task would carry their size
        // from its first byte if they were inline.
        match Box::pin(placement.lookup(mailbox, limit)).await {
            Ok(Lookup::Found(placed)) => Ok(Some(placed)),
            Ok(Lookup::NotFound) if placement.not_found == NotFound::Balance => Ok(None),
            Ok(Lookup::NotFound) => {
                info!(
                    mechanism = self.mechanism,
                    "login refused: placement does not know the mailbox"
                );
                self.counted(tenant_name, "rejected");
                like_a_store_refusal(self.ctx, self.client.session).await;
                let reply = self
                    .count_failure(tenant_name, Some(mailbox), AUTH_FAILED.to_vec())
                    .await;
                Err(Refusal::reject(reply))
            }
            Err(e) => {
                warn!(source = placement.source(), error = %e, "no placement answer");
                self.counted(tenant_name, "unavailable");
                Err(Refusal::unavailable(STORE_UNAVAILABLE))
            }
        }
    }

    /// Logs in at the store a placement answer names: one of the tenant's, or a host in the placement's
    /// `allowed_networks`; any other answer is refused (a compromised directory must not make popgate a
    /// relay to arbitrary hosts).
    async fn at_placed(
        &self,
        tenant: &TenantRuntime,
        placed: &Placed,
        auth: &OwnedAuth,
        session: &mut ClientSession,
    ) -> Result<(LoggedIn, Option<ActiveSession>, String), GroupError> {
        let Some(placement) = &tenant.placement else {
            return Err(GroupError::NoStore("no placement".into()));
        };
        let group = &tenant.group;
        let default_port = placement.default_port();
        if let Some(store) = group.member_named(&placed.store, default_port) {
            let (logged_in, active) = group
                .login_at(&store, &auth.as_store_auth(), &self.client, session)
                .await?;
            return Ok((logged_in, Some(active), store.label.clone()));
        }
        let (host, port) = crate::vocab::split_host_port(&placed.store, default_port);
        let target = crate::store::dns::Target::Host {
            host: host.to_string(),
            port,
        };
        let endpoint = match self.shared.discovery.resolve(&target).await {
            Ok((endpoints, _)) => endpoints
                .into_iter()
                .find(|e| placement.allows(e.addr.ip())),
            Err(_) => None,
        };
        let Some(endpoint) = endpoint else {
            placement.refused();
            warn!(store = %placed.store, "placement answer names a store outside the tenant's stores and allowed networks; refused");
            return Err(GroupError::NoStore(format!(
                "placement named {}, which is not the tenant's",
                placed.store
            )));
        };
        let logged_in = group
            .login_direct(&endpoint, &auth.as_store_auth(), &self.client, session)
            .await?;
        Ok((logged_in, None, format!("{host}:{port}")))
    }

    /// Logs in at a store: the one shown in the greeting (APOP passthrough), the one a placement answer
    /// or auth_http names, or one the tenant's group picks. Returns the session, its store slot and the
    /// store's name.
    async fn ask_store(
        &self,
        tenant: &TenantRuntime,
        route: &Route,
        auth: &OwnedAuth,
        session: &mut ClientSession,
        (passthrough, introduced): (&mut Option<Passthrough>, &mut Option<Introduction>),
        placed: Option<&Placed>,
    ) -> Result<(LoggedIn, Option<ActiveSession>, String), GroupError> {
        if let Some(placed) = placed {
            return Box::pin(self.at_placed(tenant, placed, auth, session)).await;
        }
        if let Some(p) = passthrough.take_if(|p| p.tenant == route.tenant) {
            let Passthrough {
                prepared, active, ..
            } = p;
            let logged_in = tenant
                .group
                .login_prepared(
                    prepared,
                    active.store(),
                    &auth.as_store_auth(),
                    &self.client,
                    session,
                )
                .await?;
            let store = active.store().label.clone();
            return Ok((logged_in, Some(active), store));
        }
        let Some(service) = &tenant.auth_http else {
            // The connection made ready at this name's USER, when the name is the one now logging in.
            let ready = introduced
                .take()
                .filter(|i| i.tenant == route.tenant && i.mailbox == route.key);
            let group = &tenant.group;
            let store_auth = auth.as_store_auth();
            let (logged_in, active) = match ready {
                Some(i) => {
                    group
                        .login_introduced(i.held, &route.key, &store_auth, &self.client, session)
                        .await?
                }
                None => {
                    group
                        .login(&route.key, &store_auth, &self.client, session)
                        .await?
                }
            };
            let store = active.store().label.clone();
            return Ok((logged_in, Some(active), store));
        };
        let login = AuthHttpLogin {
            service,
            discovery: &self.shared.discovery,
            tenant,
            creds: self.creds,
            auth,
            store_user: &route.store_user,
            client: &self.client,
            attempt: self.number,
        };
        let outcome = auth_http_login(login, session).await;
        match outcome {
            AuthHttpOutcome::LoggedIn(logged_in, store) => Ok((logged_in, None, store)),
            AuthHttpOutcome::Refused(line) => Err(GroupError::Login(LoginError::Rejected(line))),
            AuthHttpOutcome::Temporary(line) => Err(GroupError::Login(LoginError::Temporary(line))),
            AuthHttpOutcome::Unavailable(why) => Err(GroupError::NoStore(why)),
        }
    }

    /// The answer to a store that said no (a failed login, timed for the refusal clock), not now, or
    /// nothing at all.
    async fn store_refused(
        &self,
        tenant_name: &str,
        mailbox: &str,
        error: GroupError,
        asked: tokio::time::Instant,
    ) -> Refusal {
        let label = match &error {
            GroupError::Login(l) => l.as_str(),
            GroupError::NoStore(_) => "unavailable",
        };
        self.counted(tenant_name, label);
        match error {
            GroupError::Login(LoginError::Rejected(line)) => {
                info!(mechanism = self.mechanism, "login refused by store");
                self.ctx.throttle.store_refused_after(asked.elapsed());
                Refusal::reject(self.count_failure(tenant_name, Some(mailbox), line).await)
            }
            GroupError::Login(LoginError::Temporary(line)) => {
                info!("store refused login for now");
                Refusal::unavailable(line)
            }
            GroupError::Login(LoginError::Unavailable(why) | LoginError::Dropped(why))
            | GroupError::NoStore(why) => {
                warn!(reason = %why, "no store available");
                Refusal::unavailable(STORE_UNAVAILABLE)
            }
        }
    }

    /// The gates that need the store's word that the credentials are right: the mailbox's session cap
    /// (failure counts are cleared all the same) and the minimum interval between its logins.
    async fn after_login(
        &self,
        tenant_name: &str,
        tenant: &TenantRuntime,
        mailbox: &str,
    ) -> Result<(MailboxGuard, Option<crate::cluster::Lease>), Refusal> {
        let (ctx, metrics) = (self.ctx, &self.ctx.metrics);
        let slot = ctx
            .throttle
            .login_ok(self.client.peer.ip(), mailbox)
            .map_err(|reason| {
                metrics.throttled(tenant_name, reason);
                self.counted(tenant_name, "throttled");
                Refusal::unavailable(IN_USE)
            })?;
        if let Some(min) = tenant.min_login_interval
            && let Err(left) = ctx.throttle.login_interval(mailbox, min)
        {
            metrics.throttled(tenant_name, "login_delay");
            self.counted(tenant_name, "throttled");
            info!(
                wait_s = left.as_secs(),
                "login refused: minimum interval between logins"
            );
            return Err(Refusal::unavailable(login_delay_reply(left)));
        }
        let peer = self.client.peer.ip();
        match fleet::after_store(ctx, peer, mailbox, tenant.min_login_interval).await {
            Ok(lease) => Ok((slot, lease)),
            Err(refused) => Err(self.fleet_refused(tenant_name, refused)),
        }
    }

    /// Records a failed login with the edge defences; waits the growing delay before the `-ERR` goes out
    /// (slows password guessing without holding a store connection), and turns the reply into a lockout
    /// notice once the threshold is reached. `mailbox` only for a name that routed to a tenant.
    async fn count_failure(&self, tenant: &str, mailbox: Option<&str>, reply: Vec<u8>) -> Vec<u8> {
        let ctx = self.ctx;
        let failure = Failure {
            mailbox,
            secret: Some(self.creds.password.expose()),
        };
        let here = ctx.throttle.failed(self.client.peer.ip(), failure);
        let fleet_wide = fleet::count_failure(
            ctx,
            self.client.peer.ip(),
            mailbox,
            self.creds.password.expose(),
        )
        .await;
        match fleet::stricter(here, fleet_wide) {
            Verdict::Allow => reply,
            Verdict::Delay(d) => {
                ctx.metrics.throttled(tenant, "failed_login_delay");
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    () = ctx.draining.cancelled() => {}
                }
                reply
            }
            Verdict::LockedOut { .. } => {
                ctx.metrics.throttled(tenant, "lockout");
                LOCKED_OUT.to_vec()
            }
        }
    }
}

/// `-ERR [LOGIN-DELAY]` with the whole seconds left (at least one).
fn login_delay_reply(left: std::time::Duration) -> String {
    format!(
        "-ERR [LOGIN-DELAY] Logged in too recently; try again in {} seconds\r\n",
        left.as_secs().max(1)
    )
}

/// Waits about as long as the stores take to refuse a login, before a refusal popgate decided without
/// asking one (an unknown domain, a malformed name, a digest that does not match): the answer then takes
/// the same time as a wrong password would, so hosted domains cannot be told apart by timing.
async fn like_a_store_refusal(ctx: &Context, session: u64) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = xxhash_rust::xxh3::xxh3_64(&session.to_le_bytes()) ^ u64::from(nanos);
    let wait = ctx.throttle.refusal_time(jitter);
    if wait.is_zero() {
        return;
    }
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = ctx.draining.cancelled() => {}
    }
}
