//! Configuration: the YAML schema, its documented defaults, loading and whole-file validation.
//!
//! This module owns the shape of `popgate.yaml` and the rules a config must pass before any port is bound.
//! It does no network I/O; it only reads the config file and checks that referenced certificate files load.
//! Every struct refuses unknown fields and the YAML parser refuses duplicate keys, so a typo is an error
//! with a line number rather than a silently ignored setting.

mod cluster;
mod duration;
mod placement;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use serde_saphyr::Spanned;

pub use cluster::{ClusterConfig, ClusterMode, ClusterTls, FailPolicy, WhenUnavailable};
pub use duration::Seconds;
pub use placement::{LdapPlacement, NotFound, PlacementCache, PlacementConfig, SqlPlacement};
pub use store::{
    ClientIpForwarding, DnsConfig, HealthConfig, PoolConfig, ProxyProtocolIn, StoreSpec, StoreTls,
    StoreTlsMode,
};

pub use crate::vocab::{LoginCase, Policy, normalize_domain_pattern};

/// Everything popgate needs to run, as read from one YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Ports popgate accepts POP3 clients on. At least one.
    pub listeners: Vec<Spanned<ListenerConfig>>,
    /// The default server certificate and key; tenants may add their own for SNI. When absent and a
    /// listener needs TLS, popgate makes a self-signed certificate and warns.
    #[serde(default)]
    pub tls: Option<CertificateFiles>,
    /// TLS session resumption for clients that come back: tickets (keys shared by replicas through a
    /// secret file) and a bounded cache of sessions.
    #[serde(default)]
    pub tls_sessions: TlsSessions,
    /// How login names are split into mailbox and domain.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Timeouts for each phase of a session.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Bounds that protect popgate and the stores from misbehaving clients.
    #[serde(default)]
    pub limits: Limits,
    /// The admin HTTP server (metrics, health, status, reload, kick). Absent: no admin server.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Edge defences: failed-login throttling, per-IP caps and connection rates.
    #[serde(default)]
    pub throttle: ThrottleSettings,
    /// DNS used to find stores given by name or SRV.
    #[serde(default)]
    pub dns: DnsConfig,
    /// What the metrics endpoint exports beyond the fixed set.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Shared state across replicas (Redis/Valkey). Absent: each replica keeps its limits to itself.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// Tenants by name. The name is the metrics label and appears in logs.
    pub tenants: BTreeMap<String, Spanned<TenantConfig>>,
    /// Where relative paths in this file are resolved from (the file's directory); not read from YAML.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// Metrics settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Export `backend_connect_seconds` and `backend_login_seconds` per tenant and store (two histograms
    /// of 14 series each per tenant × store). Turn off for thousands of tenants: the per-store series
    /// (`store_*`) stay. Default true.
    pub tenant_store_histograms: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            tenant_store_histograms: true,
        }
    }
}

/// The admin HTTP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to bind. Default `127.0.0.1:9110` (loopback: put it behind your own access control).
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
    /// Bearer token required for `POST /reload` and `POST /kick` (and for everything when
    /// `token_for_reads` is true). Default: none.
    #[serde(default)]
    pub token: Option<crate::secret::SecretString>,
    /// A file holding the token instead (a mounted Kubernetes Secret, a systemd credential): its first line,
    /// read at start and at every reload, so a rotated token takes effect on the next reload. Not with `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Require the token for GET endpoints too, except the probes' `/livez` and `/readyz`, which never
    /// need it. Default false (Prometheus and status readers read freely).
    #[serde(default)]
    pub token_for_reads: bool,
    /// With `token_for_reads`, still let `/metrics` be scraped without the token (a Prometheus that cannot
    /// send one). Default false.
    #[serde(default)]
    pub metrics_without_token: bool,
    /// Which store health `/readyz` waits for, beside bound listeners and no drain. Default `any_tenant`.
    #[serde(default)]
    pub ready_when: ReadyWhen,
    /// Admin connections open at once, a cap of the admin server's own (POP3's `limits.max_connections` is
    /// separate): past it an accepted connection is closed at once, so a flood of admin connections cannot
    /// use up the descriptors POP3 needs. A count, at least 1. Read at start (a reload does not change it).
    /// Default 64.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from connecting and again after each response
    /// (so it is also how long an idle keep-alive connection stays open). A duration like `5s`, longer than
    /// zero. Read at start (a reload does not change it). Default 5s.
    #[serde(default = "default_admin_header_timeout")]
    pub header_timeout: Seconds,
    /// Extra names this server may be reached by, e.g. `popgate-admin.mail.svc`: host names only (no port,
    /// no scheme, no wildcard), compared without case. A request's `Host` must be an IP address, `localhost`
    /// or one of these (a guard against DNS rebinding); others get 421. Follows reloads. Default: none.
    #[serde(default)]
    pub hosts: Vec<String>,
}

fn default_admin_max_connections() -> usize {
    64
}

fn default_admin_header_timeout() -> Seconds {
    Seconds::from_secs(5)
}

/// What `/readyz` needs of the stores. Every tenant shares the process, so a readiness probe that fails
/// for one tenant's outage takes the replica away from all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyWhen {
    /// Some tenant has a store up: only a replica that reaches no store at all (its own network or DNS
    /// broken, most likely) leaves the load balancer. The default.
    #[default]
    AnyTenant,
    /// Every tenant has a store up: one tenant's outage takes the replica out for every tenant.
    AllTenants,
    /// Stores do not matter: ready whenever listening and not draining; clients of a tenant whose stores
    /// are all down get `-ERR [SYS/TEMP]`.
    Listening,
}

fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9110))
}

/// One listening socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// A short name for logs and metrics, unique among listeners.
    pub name: String,
    /// Address and port to bind, e.g. `0.0.0.0:110` or `[::]:995`.
    pub bind: SocketAddr,
    /// `none` (plain POP3, no STLS), `starttls` (plain POP3 offering STLS), `implicit` (POP3S).
    #[serde(default)]
    pub tls: ListenerTls,
    /// Only this tenant's users may log in here.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Expect a PROXY protocol v1/v2 header from these trusted networks (a load balancer in front).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolIn>,
}

/// How a listener uses TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTls {
    /// Plain POP3 and no STLS.
    None,
    /// Plain POP3 that offers STLS (RFC 2595). The default.
    #[default]
    Starttls,
    /// TLS from the first byte (POP3S, RFC 8314).
    Implicit,
}

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM file with the leaf certificate first, then intermediates.
    pub certificate: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Login-name splitting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Characters that separate mailbox and domain, in order of precedence; the last occurrence splits.
    /// Default `["@", "+", "%"]` (`@` and the SDPS forms `john+example.com`, `john%example.com`).
    #[serde(default = "default_separators")]
    pub separators: Vec<char>,
    /// Tenant for names without a known domain (or without a domain at all). Default: none.
    #[serde(default)]
    pub default_tenant: Option<String>,
    /// Offer `UTF8` (RFC 6856): after it, USER and APOP may carry UTF-8 names (SASL names are UTF-8
    /// anyway), and a store that offers UTF8 is switched to it too. Default true.
    #[serde(default = "default_true")]
    pub utf8: bool,
}

/// Per-phase timeouts. Written as `30s`, `10m`, `1h30m` or plain seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Whole time a client has to finish TLS and log in. Default 60s.
    pub pre_login: Seconds,
    /// Time allowed for one TLS handshake with a client. Default 10s.
    pub tls_handshake: Seconds,
    /// After login: close a session that moved no bytes either way for this long. Default 10m (RFC 1939).
    pub idle: Seconds,
    /// Connecting to a store. Default 5s.
    pub backend_connect: Seconds,
    /// Waiting for a store's greeting or for its answer to a login command. Default 30s.
    pub backend_reply: Seconds,
    /// After the client's QUIT and its disconnect, how long to wait for the store to finish UPDATE. Default 30s.
    pub quit_drain: Seconds,
    /// On SIGTERM, how long relayed sessions may continue before they are closed. Default 30s.
    pub shutdown_grace: Seconds,
}

/// TLS session resumption on the client leg.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSessions {
    /// Issue session tickets (TLS 1.3 and 1.2). Default true.
    pub tickets: bool,
    /// A file whose first line (at least 32 characters) keys the tickets: every replica given the same file
    /// resumes the others' sessions. Without it, each process makes its own keys (resumption then works
    /// only on the replica that issued the ticket). Re-read at every reload.
    pub ticket_secret_file: Option<PathBuf>,
    /// How often the ticket key changes (derived from the secret and the time, so replicas agree without
    /// talking); a ticket is accepted for up to two periods. Default 6h.
    pub rotate_every: Seconds,
    /// Sessions kept for resumption by session id (TLS 1.2 clients, or with tickets off). Default 4096.
    pub cache_size: usize,
}

impl Default for TlsSessions {
    fn default() -> Self {
        Self {
            tickets: true,
            ticket_secret_file: None,
            rotate_every: Seconds::from_secs(6 * 3600),
            cache_size: 4096,
        }
    }
}

/// Bounds on clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections open at once across all listeners; the rest get `-ERR [SYS/TEMP]`. Default 10000.
    pub max_connections: usize,
    /// Bad or out-of-state commands before a pre-login connection is closed. Default 10.
    pub max_bad_commands: u32,
    /// Failed logins on one connection before it is closed. Default 3.
    pub max_failed_logins: u32,
    /// Pre-warmed idle store connections across every store's pool (0: no cap beyond each pool's
    /// `max_idle`). Default 1000.
    pub max_idle_store_connections: usize,
}

/// One tenant: the domains it owns and the stores that hold their mail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Domains, exact (`example.com`) or wildcard (`*.example.com`: any subdomain, not the domain itself).
    #[serde(default)]
    pub domains: Vec<Spanned<String>>,
    /// Stores: `host:port` (IP or A/AAAA name), `{address: "host:port", weight: N}`, or
    /// `{srv: "_pop3._tcp.store.mail.svc.cluster.local"}`. May be left out when `auth_http` names each
    /// login's store.
    #[serde(default)]
    pub backends: Vec<Spanned<StoreSpec>>,
    /// `round_robin` (default), `least_connections`, or `consistent_hash` of the mailbox (a user always lands
    /// on the same store while it is in the group).
    #[serde(default)]
    pub balance: Policy,
    /// Whether all stores hold every mailbox. When true, a login retries another store if the first cannot be
    /// reached; when false, the user gets `-ERR [SYS/TEMP]` rather than a store without their mail.
    /// Default: false with `consistent_hash`, true otherwise.
    #[serde(default)]
    pub shared_storage: Option<bool>,
    /// TLS to the stores.
    #[serde(default)]
    pub backend_tls: StoreTls,
    /// How the client's address reaches the store: `xclient` (default), `proxy_v1`, `proxy_v2`, `none`.
    #[serde(default)]
    pub client_ip: ClientIpForwarding,
    /// Health checks.
    #[serde(default)]
    pub health: HealthConfig,
    /// Pre-warmed connections per store.
    #[serde(default)]
    pub pool: PoolConfig,
    /// The name popgate logs in to the store with: `full` (`local@domain`, the default), `local`, or
    /// `{template: "..."}` with `{local}`, `{domain}` and `{login}` placeholders.
    #[serde(default)]
    pub backend_username: UsernameForm,
    /// `require_tls` (default): USER/PASS and SASL PLAIN/LOGIN only after TLS. `allow`: also in plaintext.
    #[serde(default)]
    pub plaintext_login: PlaintextLogin,
    /// The tenant's own certificate, served when SNI names one of `server_names`.
    #[serde(default)]
    pub tls: Option<TenantTls>,
    /// Login mechanisms accepted: `user`, `apop`, `plain`, `login`, `cram-md5`, `xoauth2`, `oauthbearer`,
    /// `scram-sha-1`, `scram-sha-256`. Default: `user`, `plain`, `login`, `apop` (APOP is offered only where it
    /// can work: with `secrets`, or a single store shown before the greeting), plus `cram-md5` with `secrets`.
    #[serde(default)]
    pub mechanisms: Option<Vec<crate::vocab::Mechanism>>,
    /// A YAML file of `mailbox: secret` (mailbox as `local@domain`), reloaded with the config. Lets popgate
    /// check APOP and CRAM-MD5 itself and then log in to the store with the secret.
    #[serde(default)]
    pub secrets: Option<PathBuf>,
    /// Ask an nginx-style `auth_http` service for each login of this tenant: it authenticates the client
    /// and names the store (Auth-Server may be a host name). Default: none.
    #[serde(default)]
    pub auth_http: Option<AuthHttpSettings>,
    /// Where each mailbox lives, looked up per login in a map file, LDAP or SQL before the balance policy
    /// picks a store. Default: none (the policy alone).
    #[serde(default)]
    pub placement: Option<PlacementConfig>,
    /// How popgate logs in to the store: `client` (default: a name and password as AUTH PLAIN where the
    /// store offers it, else USER/PASS; SASL relays and digests as the client sent them), `user_pass`,
    /// `auth_plain` (the same as `client`, kept for existing configs), or `{master: {user: NAME, password:
    /// SECRET}}` (`mailbox*NAME` with the master password, as Dovecot accepts; only after popgate itself
    /// checked the client).
    #[serde(default)]
    pub backend_login: StoreLogin,
    /// How the case of the local part is treated: `insensitive` (default: `John` and `john` are one
    /// mailbox for popgate's hashing, throttles and secrets; the store gets the name as written),
    /// `lower` (as `insensitive`, and the store gets it lowercased too), or `sensitive` (different
    /// mailboxes). Domains are always case-insensitive.
    #[serde(default)]
    pub login_case: LoginCase,
    /// Logged-in sessions of this tenant at once; past it, `-ERR [SYS/TEMP]` before the store is asked.
    /// 0 (the default) means no cap beyond the global ones.
    #[serde(default)]
    pub max_sessions: usize,
    /// Minimum time between two successful logins to one mailbox, answered with `-ERR [LOGIN-DELAY]` and
    /// announced as `LOGIN-DELAY` in CAPA (RFC 2449). Default: none.
    #[serde(default)]
    pub min_login_interval: Option<Seconds>,
    /// APOP without `secrets`: on a listener (or SNI name) bound to this tenant, when it has a single store,
    /// popgate takes a store connection before greeting the client and shows the store's APOP timestamp,
    /// so the client's digest is valid there. Each such connection holds one of the store's login
    /// processes until the client logs in or leaves, so it is off unless set, and capped. Default: off.
    #[serde(default)]
    pub apop_passthrough: Option<ApopPassthrough>,
}

/// Limits on store connections held for clients that have not logged in yet (APOP passthrough). Past
/// either, the client is greeted by popgate itself, without an APOP timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApopPassthrough {
    /// Held at once for this tenant, all clients together. Default 16.
    #[serde(default = "default_passthrough_pending")]
    pub max_pending: usize,
    /// Held at once for one client address. Default 2.
    #[serde(default = "default_passthrough_pending_per_ip")]
    pub max_pending_per_ip: usize,
}

fn default_passthrough_pending() -> usize {
    16
}
fn default_passthrough_pending_per_ip() -> usize {
    2
}

/// A tenant certificate and the names it is served for.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantTls {
    /// PEM certificate chain.
    pub certificate: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// SNI names (exact or `*.wildcard`) that select this certificate. Default: each domain `d` as `d` and `*.d`.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// Edge defences (see `popgate::throttle`). Defaults suit an ISP edge with carrier-grade NAT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleSettings {
    /// Client networks exempt from login throttling and per-IP caps (webmail front ends, local checks).
    /// Default: loopback (`127.0.0.0/8`, `::1/128`).
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// Delay before the `-ERR` of a failed login, doubling per further failure. Default 1s.
    pub failed_login_delay: Seconds,
    /// Longest such delay. Default 15s.
    pub failed_login_max_delay: Seconds,
    /// Failures (per client IP, or per mailbox) that lock it out; 0 never. Default 10.
    pub lockout_after: u32,
    /// Lockout length. Default 10m.
    pub lockout_for: Seconds,
    /// Forget a quiet key after this long (memory bound). Default 30m.
    pub forget_after: Seconds,
    /// Concurrent connections per client IP (IPv6 per /64). Default 100; 0 turns it off.
    pub max_sessions_per_ip: usize,
    /// New connections per client IP: burst. Default 30; 0 turns the rate limit off.
    pub connection_burst: u32,
    /// New connections per client IP per second after the burst. Default 5.
    pub connections_per_second: u32,
    /// Concurrent logged-in sessions per mailbox (`-ERR [IN-USE]` past it); 0 off. Default 0.
    pub max_sessions_per_mailbox: usize,
    /// Keys each of the throttle's tables holds at most (failures per address and per mailbox, rate
    /// buckets, login intervals, known addresses); past it the least informative eighth is forgotten (idle
    /// keys first, then the locks closest to their end). About 80 bytes a key. Default 100000.
    pub max_tracked_keys: usize,
    /// A mailbox locked out by failed logins still admits an address it logged in from successfully within
    /// `known_address_for`, so strangers guessing cannot lock its owner out. Trade-off: a guesser sharing
    /// the owner's address (carrier-grade NAT) is then held back only by the per-address lockout and the
    /// growing delays. Default true.
    pub spare_known_addresses: bool,
    /// How long a successful login's address is remembered for `spare_known_addresses`. Default 7d.
    pub known_address_for: Seconds,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            trusted_networks: ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            failed_login_delay: Seconds::from_secs(1),
            failed_login_max_delay: Seconds::from_secs(15),
            lockout_after: 10,
            lockout_for: Seconds::from_secs(600),
            forget_after: Seconds::from_secs(1800),
            max_sessions_per_ip: 100,
            connection_burst: 30,
            connections_per_second: 5,
            max_sessions_per_mailbox: 0,
            max_tracked_keys: 100_000,
            spare_known_addresses: true,
            known_address_for: Seconds::from_secs(7 * 24 * 3600),
        }
    }
}

/// An nginx `auth_http`-compatible service.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthHttpSettings {
    /// `http://host:port/path`, or `https://…` (verified against `ca`, else the system's roots).
    pub url: String,
    /// PEM trust anchors for an `https://` service; without it, the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Extra request headers after nginx's own, in order (nginx `auth_http_header`); a value may come
    /// from a file (a shared secret from a Kubernetes Secret, say). Values never reach a log.
    #[serde(default)]
    pub headers: Vec<AuthHttpHeader>,
    /// One lookup's limit. Default 5s.
    #[serde(default = "default_auth_timeout")]
    pub timeout: Seconds,
    /// How long an OK answer is reused. Default 60s.
    #[serde(default = "default_auth_cache")]
    pub cache_ttl: Seconds,
    /// How long a refusal is reused. Default 10s.
    #[serde(default = "default_auth_negative_cache")]
    pub negative_cache_ttl: Seconds,
    /// Answers kept at most. Default 10000.
    #[serde(default = "default_auth_cache_size")]
    pub cache_size: usize,
}

/// One extra auth_http request header: `value`, or the contents of `value_file` (a trailing newline
/// dropped).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthHttpHeader {
    /// The header's name, an HTTP token (`X-Auth-Key`).
    pub name: String,
    /// The value, given here.
    #[serde(default)]
    pub value: Option<crate::secret::SecretString>,
    /// The value, read from this file at start and at every reload.
    #[serde(default)]
    pub value_file: Option<PathBuf>,
}

fn default_auth_timeout() -> Seconds {
    Seconds::from_secs(5)
}
fn default_auth_cache() -> Seconds {
    Seconds::from_secs(60)
}
fn default_auth_negative_cache() -> Seconds {
    Seconds::from_secs(10)
}
fn default_auth_cache_size() -> usize {
    10_000
}

/// How popgate logs in to stores.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreLogin {
    /// A name and password (USER/PASS, AUTH PLAIN, AUTH LOGIN) as AUTH PLAIN where the store offers it
    /// (one round trip), else USER/PASS; SASL relays and digests as the client's mechanism says.
    #[default]
    Client,
    /// Always USER/PASS for a name and password.
    UserPass,
    /// The same as `Client`: AUTH PLAIN where the store offers it, else USER/PASS. Kept so existing configs
    /// still load.
    AuthPlain,
    /// A master user: `mailbox*user` with the master password.
    Master(MasterUser),
}

/// A store-side master user.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterUser {
    /// The master user's name.
    pub user: String,
    /// Its password.
    pub password: crate::secret::SecretString,
    /// Separator between mailbox and master name. Default `*`.
    #[serde(default = "default_master_separator")]
    pub separator: String,
}

fn default_master_separator() -> String {
    "*".into()
}

/// The backend login name form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsernameForm {
    /// `local@domain`, with the domain normalised, whatever separator the client used.
    #[default]
    Full,
    /// The local part alone.
    Local,
    /// A template with `{local}`, `{domain}` and `{login}` (the name exactly as the client sent it).
    Template(UsernameTemplate),
}

/// A `backend_username` template, parsed once when the config loads: literal text and placeholders.
/// Filling it appends each part in turn, so braces typed by a client are copied, never expanded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UsernameTemplate {
    parts: Vec<TemplatePart>,
}

/// One piece of a [`UsernameTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// Copied as written.
    Text(String),
    /// The local part.
    Local,
    /// The normalised domain.
    Domain,
    /// The login name as the client sent it.
    Login,
}

impl UsernameTemplate {
    /// The parts in order.
    pub fn parts(&self) -> &[TemplatePart] {
        &self.parts
    }
}

/// Why a `backend_username` template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template `{0}`: a brace outside {{local}}, {{domain}} or {{login}}")]
    StrayBrace(String),
    #[error(
        "template `{template}`: unknown placeholder {{{placeholder}}} (use {{local}}, {{domain}} or {{login}})"
    )]
    UnknownPlaceholder {
        template: String,
        placeholder: String,
    },
    #[error("template `{0}` needs at least one of {{local}}, {{domain}}, {{login}}")]
    NoPlaceholder(String),
}

impl TryFrom<String> for UsernameTemplate {
    type Error = TemplateError;

    fn try_from(text: String) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let Some(open) = rest.find(['{', '}']) else {
                parts.push(TemplatePart::Text(rest.to_string()));
                break;
            };
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_string()));
            }
            rest = &rest[open..];
            let Some(close) = rest.find('}').filter(|_| rest.starts_with('{')) else {
                return Err(TemplateError::StrayBrace(text));
            };
            parts.push(match &rest[1..close] {
                "local" => TemplatePart::Local,
                "domain" => TemplatePart::Domain,
                "login" => TemplatePart::Login,
                other => {
                    return Err(TemplateError::UnknownPlaceholder {
                        placeholder: other.to_owned(),
                        template: text,
                    });
                }
            });
            rest = &rest[close + 1..];
        }
        if !parts.iter().any(|p| !matches!(p, TemplatePart::Text(_))) {
            return Err(TemplateError::NoPlaceholder(text));
        }
        Ok(Self { parts })
    }
}

/// Whether plaintext logins are allowed before TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaintextLogin {
    /// Only over TLS (implicit or after STLS). The default.
    #[default]
    RequireTls,
    /// Also on plain connections.
    Allow,
}

/// A store address: `host:port`, where host is an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreAddr {
    /// IP address or host name (brackets removed from IPv6).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// YAML syntax, a wrong type, an unknown field or a duplicate key; the message names the line.
    #[error("{0}")]
    Parse(String),
    /// The file parsed but breaks a rule; each problem names the field and, where known, the line.
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One validation problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field, e.g. `tenants.acme.backends[1]`.
    pub field: String,
    /// 1-based line in the file, when known.
    pub line: Option<u64>,
    /// What is wrong.
    pub message: String,
}

// === impl Config ===

impl TenantConfig {
    /// Whether two tenants' settings are the same, whatever lines they were written on (a reload keeps
    /// the runtime of a tenant whose settings it did not change). Every field is named, so a new field
    /// cannot be left out of the comparison.
    pub fn same_settings(&self, other: &Self) -> bool {
        let Self {
            domains,
            backends,
            balance,
            shared_storage,
            backend_tls,
            client_ip,
            health,
            pool,
            backend_username,
            plaintext_login,
            tls,
            mechanisms,
            secrets,
            auth_http,
            placement,
            backend_login,
            login_case,
            max_sessions,
            min_login_interval,
            apop_passthrough,
        } = self;
        domains
            .iter()
            .map(|d| &d.value)
            .eq(other.domains.iter().map(|d| &d.value))
            && backends
                .iter()
                .map(|b| &b.value)
                .eq(other.backends.iter().map(|b| &b.value))
            && *balance == other.balance
            && *shared_storage == other.shared_storage
            && *backend_tls == other.backend_tls
            && *client_ip == other.client_ip
            && *health == other.health
            && *pool == other.pool
            && *backend_username == other.backend_username
            && *plaintext_login == other.plaintext_login
            && *tls == other.tls
            && *mechanisms == other.mechanisms
            && *secrets == other.secrets
            && *auth_http == other.auth_http
            && *placement == other.placement
            && *backend_login == other.backend_login
            && *login_case == other.login_case
            && *max_sessions == other.max_sessions
            && *min_login_interval == other.min_login_interval
            && *apop_passthrough == other.apop_passthrough
    }
}

impl Config {
    /// Reads and validates a config file; relative paths inside it resolve from its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_yaml_str(&text, &base).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates YAML text; `base_dir` resolves relative certificate paths.
    pub fn from_yaml_str(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let options = serde_saphyr::options! {
            duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
            strict_booleans: true,
            // A snippet of the file would put its text (passwords, tokens) into logs and the status page.
            with_snippet: false,
        };
        let mut config: Config = serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| ConfigError::Parse(with_key(e.to_string(), e.location(), text)))?;
        config.base_dir = base_dir.to_path_buf();
        config.validate()?;
        if let Some(path) = config.admin.as_ref().and_then(|a| a.token_file.clone()) {
            // validate() has read it once; a file that vanished since is still reported, not ignored.
            let token = crate::secret::files::read_token_file(&config.resolve_path(&path))
                .map_err(|e| {
                    ConfigError::Invalid(vec![Problem {
                        field: "admin.token_file".into(),
                        line: None,
                        message: e.to_string(),
                    }])
                })?;
            if let Some(admin) = config.admin.as_mut() {
                admin.token = Some(token);
            }
        }
        Ok(config)
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// Checks the rules that span fields: unique names, domains owned once, tenants that exist,
    /// non-empty backend lists, readable certificates. Collects every problem, not just the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut push = |field: String, line: Option<u64>, message: String| {
            problems.push(Problem {
                field,
                line,
                message,
            })
        };

        if let Some(cluster) = &self.cluster {
            for (field, message) in cluster.problems() {
                push(field, None, message);
            }
            match crate::secret::files::read_token_file(
                &self.resolve_path(&cluster.key_secret_file),
            ) {
                Ok(key) if key.expose().len() < 16 => push(
                    "cluster.key_secret_file".into(),
                    None,
                    "the key must be at least 16 bytes".into(),
                ),
                Ok(_) => {}
                Err(e) => push("cluster.key_secret_file".into(), None, e.to_string()),
            }
            if let Some(path) = &cluster.password_file
                && let Err(e) = crate::secret::files::read_token_file(&self.resolve_path(path))
            {
                push("cluster.password_file".into(), None, e.to_string());
            }
            if let Some(ca) = cluster.tls.as_ref().and_then(|t| t.ca.as_ref())
                && let Err(e) = crate::certs::load_roots(&self.resolve_path(ca))
            {
                push("cluster.tls.ca".into(), None, e.to_string());
            }
        }
        if self.listeners.is_empty() {
            push(
                "listeners".into(),
                None,
                "at least one listener is required".into(),
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let line = Some(l.defined.line());
            let field = format!("listeners[{i}]");
            if l.value.name.is_empty() {
                push(format!("{field}.name"), line, "must not be empty".into());
            }
            if let Some(first) = names.insert(&l.value.name, i) {
                push(
                    format!("{field}.name"),
                    line,
                    format!("`{}` is already used by listeners[{first}]", l.value.name),
                );
            }
            // Port 0 (the OS picks a free port) is how tests bind; it never collides.
            if l.value.bind.port() != 0
                && let Some(first) = binds.insert(l.value.bind, i)
            {
                push(
                    format!("{field}.bind"),
                    line,
                    format!("{} is already bound by listeners[{first}]", l.value.bind),
                );
            }
            if let Some(t) = &l.value.tenant
                && !self.tenants.contains_key(t)
            {
                push(
                    format!("{field}.tenant"),
                    line,
                    format!("no tenant named `{t}`"),
                );
            }
        }

        if let Some(admin) = &self.admin {
            if admin.token.is_some() && admin.token_file.is_some() {
                push(
                    "admin.token_file".into(),
                    None,
                    "set `token` or `token_file`, not both".into(),
                );
            }
            if admin.token.as_ref().is_some_and(|t| t.expose().is_empty()) {
                push(
                    "admin.token".into(),
                    None,
                    "must not be empty (leave it out for no token)".into(),
                );
            }
            if let Some(path) = &admin.token_file
                && let Err(e) = crate::secret::files::read_token_file(&self.resolve_path(path))
            {
                push("admin.token_file".into(), None, e.to_string());
            }
            if admin.max_connections == 0 {
                push(
                    "admin.max_connections".into(),
                    None,
                    "must be at least 1".into(),
                );
            }
            if admin.header_timeout.get().is_zero() {
                push(
                    "admin.header_timeout".into(),
                    None,
                    "must be longer than zero".into(),
                );
            }
            for (i, host) in admin.hosts.iter().enumerate() {
                if crate::vocab::normalize_domain(host).is_none() {
                    push(
                        format!("admin.hosts[{i}]"),
                        None,
                        format!(
                            "`{host}` is not a host name (write it without scheme, port or wildcard)"
                        ),
                    );
                }
            }
        }

        if self.routing.separators.is_empty() {
            push(
                "routing.separators".into(),
                None,
                "at least one separator is required".into(),
            );
        }
        for c in &self.routing.separators {
            if c.is_alphanumeric() || c.is_whitespace() || *c == '.' || *c == '-' {
                push(
                    "routing.separators".into(),
                    None,
                    format!("`{c}` cannot separate a mailbox from a domain"),
                );
            }
        }
        if let Some(t) = &self.routing.default_tenant
            && !self.tenants.contains_key(t)
        {
            push(
                "routing.default_tenant".into(),
                None,
                format!("no tenant named `{t}`"),
            );
        }

        if self.dns.min_ttl > self.dns.max_ttl {
            push(
                "dns.min_ttl".into(),
                None,
                "must not exceed dns.max_ttl".into(),
            );
        }
        if self.tls_sessions.rotate_every.get() < std::time::Duration::from_secs(60) {
            push(
                "tls_sessions.rotate_every".into(),
                None,
                "must be at least 1m (a ticket lives up to two periods)".into(),
            );
        }
        if let Some(path) = &self.tls_sessions.ticket_secret_file
            && let Err(e) = crate::certs::read_ticket_secret(&self.resolve_path(path))
        {
            push(
                "tls_sessions.ticket_secret_file".into(),
                None,
                e.to_string(),
            );
        }
        if self.limits.max_connections == 0 {
            push(
                "limits.max_connections".into(),
                None,
                "must be at least 1".into(),
            );
        }
        if self.throttle.max_tracked_keys == 0 {
            push(
                "throttle.max_tracked_keys".into(),
                None,
                "must be at least 1".into(),
            );
        }
        if self.limits.max_failed_logins == 0 {
            push(
                "limits.max_failed_logins".into(),
                None,
                "must be at least 1".into(),
            );
        }
        for (field, value) in [
            ("timeouts.pre_login", self.timeouts.pre_login),
            ("timeouts.tls_handshake", self.timeouts.tls_handshake),
            ("timeouts.idle", self.timeouts.idle),
            ("timeouts.backend_connect", self.timeouts.backend_connect),
            ("timeouts.backend_reply", self.timeouts.backend_reply),
        ] {
            if value.get().is_zero() {
                push(field.into(), None, "must be longer than zero".into());
            }
        }

        if self.tenants.is_empty() {
            push(
                "tenants".into(),
                None,
                "at least one tenant is required".into(),
            );
        }
        let mut owners: HashMap<String, &str> = HashMap::new();
        for (name, tenant) in &self.tenants {
            let t = &tenant.value;
            let line = Some(tenant.defined.line());
            let field = format!("tenants.{name}");
            if !is_label_safe(name) {
                push(
                    field.clone(),
                    line,
                    "tenant names may use letters, digits, `-`, `_` and `.` only".into(),
                );
            }
            // With auth_http the service names each login's store: no placeholder store is needed.
            if t.backends.is_empty() && t.auth_http.is_none() {
                push(
                    format!("{field}.backends"),
                    line,
                    "at least one store is required (or auth_http, which names each login's store)"
                        .into(),
                );
            }
            if let Some(p) = &t.placement {
                for (sub, message) in p.problems() {
                    let at = if sub.is_empty() {
                        format!("{field}.placement")
                    } else {
                        format!("{field}.placement.{sub}")
                    };
                    push(at, line, message);
                }
                if t.auth_http.is_some() {
                    push(
                        format!("{field}.placement"),
                        line,
                        "auth_http already names each login's store: use one of the two".into(),
                    );
                }
                if t.apop_passthrough.is_some() {
                    push(
                        format!("{field}.placement"),
                        line,
                        "apop_passthrough greets with one store's timestamp before the mailbox is known: \
                         it cannot go with placement"
                            .into(),
                    );
                }
            }
            for (i, h) in t
                .auth_http
                .iter()
                .flat_map(|a| a.headers.iter().enumerate())
            {
                if h.value.is_some() == h.value_file.is_some() {
                    push(
                        format!("{field}.auth_http.headers[{i}]"),
                        line,
                        format!(
                            "header {}: give exactly one of value and value_file",
                            h.name
                        ),
                    );
                }
            }
            if t.domains.is_empty() && self.routing.default_tenant.as_deref() != Some(name) {
                push(
                    format!("{field}.domains"),
                    line,
                    "a tenant needs at least one domain unless it is routing.default_tenant".into(),
                );
            }
            for (i, d) in t.domains.iter().enumerate() {
                let dline = Some(d.defined.line());
                match normalize_domain_pattern(&d.value) {
                    Ok(norm) => {
                        if let Some(other) = owners.insert(norm.clone(), name) {
                            push(
                                format!("{field}.domains[{i}]"),
                                dline,
                                format!("`{norm}` is also claimed by tenant `{other}`"),
                            );
                        }
                    }
                    Err(why) => push(format!("{field}.domains[{i}]"), dline, why.to_string()),
                }
            }
            self.validate_stores(name, t, line, &mut push);
            if let Some(path) = &t.secrets
                && let Err(e) =
                    crate::secret::files::load_secrets(&self.resolve_path(path), t.login_case)
            {
                push(format!("{field}.secrets"), line, e.to_string());
            }
            if matches!(t.backend_login, StoreLogin::Master(_)) && t.secrets.is_none() {
                push(
                    format!("{field}.backend_login"),
                    line,
                    "a master user logs in without the user's password, so popgate must check clients itself: set `secrets`"
                        .into(),
                );
            }
            if let Some(tls) = &t.tls {
                check_cert_files(
                    self,
                    &tls.certificate,
                    &tls.key,
                    &format!("{field}.tls"),
                    line,
                    &mut push,
                );
                for n in &tls.server_names {
                    if let Err(why) = normalize_domain_pattern(n) {
                        push(format!("{field}.tls.server_names"), line, why.to_string());
                    }
                }
            }
        }
        if let Some(files) = &self.tls {
            check_cert_files(self, &files.certificate, &files.key, "tls", None, &mut push);
        }
        self.validate_server_names(&mut push);

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

impl Config {
    /// SNI names select a tenant's certificate and bind the connection to that tenant, so a name that two
    /// tenants claim, or that lies under another tenant's domain, would silently lock that tenant's users
    /// out. Checked on each tenant's effective names (`server_names`, or each domain `d` as `d` and `*.d`).
    fn validate_server_names(&self, push: &mut impl FnMut(String, Option<u64>, String)) {
        // name (normalised, `*.` kept for wildcards) → tenant claiming it
        let mut claimed: BTreeMap<String, &str> = BTreeMap::new();
        for (name, tenant) in &self.tenants {
            let Some(tls) = &tenant.value.tls else {
                continue;
            };
            let line = Some(tenant.defined.line());
            let names: Vec<String> = if tls.server_names.is_empty() {
                tenant
                    .value
                    .domains
                    .iter()
                    .filter_map(|d| normalize_domain_pattern(&d.value).ok())
                    .flat_map(|d| {
                        let d = d.trim_start_matches("*.").to_string();
                        [format!("*.{d}"), d]
                    })
                    .collect()
            } else {
                tls.server_names
                    .iter()
                    .filter_map(|n| normalize_domain_pattern(n).ok())
                    .collect()
            };
            for n in names {
                if let Some(other) = claimed.insert(n.clone(), name)
                    && other != name
                {
                    push(
                        format!("tenants.{name}.tls.server_names"),
                        line,
                        format!("`{n}` is also a server name of tenant `{other}`"),
                    );
                }
            }
        }
        // Which tenant an SNI name selects: exact first, then the longest wildcard (as the resolver does).
        let selects = |sni: &str| -> Option<&str> {
            if let Some(t) = claimed.get(sni) {
                return Some(t);
            }
            let mut rest = sni;
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(t) = claimed.get(&format!("*.{parent}")) {
                    return Some(t);
                }
                rest = parent;
            }
            None
        };
        for (name, tenant) in &self.tenants {
            for (i, d) in tenant.value.domains.iter().enumerate() {
                let Ok(norm) = normalize_domain_pattern(&d.value) else {
                    continue;
                };
                // A wildcard domain is probed with a name under it.
                let probe = match norm.strip_prefix("*.") {
                    Some(parent) => format!("sni-probe.{parent}"),
                    None => norm.clone(),
                };
                if let Some(other) = selects(&probe)
                    && other != name
                {
                    push(
                        format!("tenants.{name}.domains[{i}]"),
                        Some(d.defined.line()),
                        format!(
                            "SNI for `{norm}` would select tenant `{other}`'s certificate and bind the connection to `{other}`, refusing this tenant's users: give one of them `tls.server_names` that do not overlap"
                        ),
                    );
                }
            }
        }
    }

    fn validate_stores(
        &self,
        name: &str,
        t: &TenantConfig,
        line: Option<u64>,
        push: &mut impl FnMut(String, Option<u64>, String),
    ) {
        let field = format!("tenants.{name}");
        let tls = &t.backend_tls;
        if Self::uses_store_tls(t) {
            match (&tls.ca, tls.insecure_skip_verify) {
                (None, false) => push(
                    format!("{field}.backend_tls.ca"),
                    line,
                    "a CA bundle is required to verify stores (or set insecure_skip_verify: true)"
                        .into(),
                ),
                (Some(ca), _) => {
                    if let Err(e) = crate::certs::load_roots(&self.resolve_path(ca)) {
                        push(format!("{field}.backend_tls.ca"), line, e.to_string());
                    }
                }
                (None, true) => {}
            }
        }
        match (&tls.certificate, &tls.key) {
            (Some(c), Some(k)) => {
                check_cert_files(self, c, k, &format!("{field}.backend_tls"), line, push);
            }
            (None, None) => {}
            _ => push(
                format!("{field}.backend_tls"),
                line,
                "a client certificate needs both `certificate` and `key`".into(),
            ),
        }
        if let Some(n) = &tls.server_name
            && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
        {
            push(
                format!("{field}.backend_tls.server_name"),
                line,
                format!("`{n}` is not a server name"),
            );
        }
        if t.health.rise == 0 || t.health.fall == 0 {
            push(
                format!("{field}.health"),
                line,
                "rise and fall must be at least 1".into(),
            );
        }
        if t.health.interval.get().is_zero() || t.health.timeout.get().is_zero() {
            push(
                format!("{field}.health"),
                line,
                "interval and timeout must be longer than zero".into(),
            );
        }
        if t.pool.max_idle < t.pool.min_idle {
            push(
                format!("{field}.pool.max_idle"),
                line,
                "must be at least min_idle".into(),
            );
        }
        if t.pool.min_idle > 0 && t.pool.max_age.get().is_zero() {
            push(
                format!("{field}.pool.max_age"),
                line,
                "must be longer than zero".into(),
            );
        }
    }

    /// Whether any of the tenant's stores is reached over TLS (tenant default or a store's own `tls`).
    pub fn uses_store_tls(t: &TenantConfig) -> bool {
        t.backend_tls.mode != StoreTlsMode::None
            || t.backends.iter().any(|b| {
                matches!(&b.value, StoreSpec::Host { tls: Some(m), .. } if *m != StoreTlsMode::None)
            })
    }

    /// Whether the tenant's stores share mail (see [`TenantConfig::shared_storage`]).
    pub fn shared_storage(t: &TenantConfig) -> bool {
        t.shared_storage
            .unwrap_or(t.balance != Policy::ConsistentHash)
    }
}

fn check_cert_files(
    config: &Config,
    cert: &Path,
    key: &Path,
    field: &str,
    line: Option<u64>,
    push: &mut impl FnMut(String, Option<u64>, String),
) {
    if let Err(e) =
        crate::certs::load_certified_key(&config.resolve_path(cert), &config.resolve_path(key))
    {
        push(format!("{field}.certificate"), line, e.to_string());
    }
}

/// Names used as metric labels must stay printable and short.
fn is_label_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A parse error without a snippet of the file (which may hold a password) names the mapping key on the
/// line it points at, when that line starts with one: `… at line 10, column 9 (key `idle`)`.
fn with_key(message: String, at: Option<serde_saphyr::Location>, text: &str) -> String {
    let key = at
        .and_then(|l| usize::try_from(l.line()).ok())
        .and_then(|n| text.lines().nth(n.checked_sub(1)?))
        .and_then(|line| {
            let line = line.trim_start().trim_start_matches("- ");
            let (key, _) = line.split_once(':')?;
            let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
            let plain = !key.is_empty()
                && key.len() <= 64
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            plain.then(|| key.to_string())
        });
    match key {
        Some(key) => format!("{message} (key `{key}`)"),
        None => message,
    }
}

// === defaults ===

fn default_separators() -> Vec<char> {
    vec!['@', '+', '%']
}

fn default_true() -> bool {
    true
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            separators: default_separators(),
            default_tenant: None,
            utf8: true,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            pre_login: Seconds::from_secs(60),
            tls_handshake: Seconds::from_secs(10),
            idle: Seconds::from_secs(600),
            backend_connect: Seconds::from_secs(5),
            backend_reply: Seconds::from_secs(30),
            quit_drain: Seconds::from_secs(30),
            shutdown_grace: Seconds::from_secs(30),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_bad_commands: 10,
            max_failed_logins: 3,
            max_idle_store_connections: 1000,
        }
    }
}

// === impl StoreAddr ===

/// Why a store address cannot be used (the address, as written, is in the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("`{0}` is not host:port")]
    NoPort(String),
    #[error("`{port}` in `{addr}` is not a port number (1-65535)")]
    BadPort { addr: String, port: String },
    #[error("port 0 in `{0}` is not a port a store can listen on")]
    PortZero(String),
    #[error("`{0}` has no host")]
    NoHost(String),
    #[error("`{0}` is neither an IP address nor a host name")]
    BadHost(String),
    #[error("`{0}` is not an SRV name like _pop3._tcp.store.example.com")]
    BadSrvName(String),
}

impl FromStr for StoreAddr {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| AddressError::NoPort(s.to_owned()))?;
        let port: u16 = port.parse().map_err(|_| AddressError::BadPort {
            addr: s.to_owned(),
            port: port.to_owned(),
        })?;
        if port == 0 {
            return Err(AddressError::PortZero(s.to_owned()));
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(AddressError::NoHost(s.to_owned()));
        }
        if host.parse::<std::net::IpAddr>().is_err()
            && crate::vocab::normalize_domain(host).is_none()
        {
            return Err(AddressError::BadHost(host.to_owned()));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for StoreAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for StoreAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

#[cfg(test)]
mod tests;
